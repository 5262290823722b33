//! Where a restored workload's GPU state goes. The checkpoint records the GPUs its workload could use (those
//! `CUDA_VISIBLE_DEVICES` or `NVIDIA_VISIBLE_DEVICES` selected, by index or UUID). At restore the workload is
//! given GPUs again: a container by its own spec's variable, a process by the one it keeps from the
//! checkpoint. The GPUs given must be at least as many, each with at least the memory of the one it takes
//! over (in order); when their UUIDs differ from the recorded ones, each checkpointed GPU is paired with the
//! GPU that takes it over, and the pairs go to NVIDIA's restore (`CUcheckpointRestoreArgs.gpuPairs`, which
//! must then name every checkpointed GPU).

use super::inventory::{GpuDevice, GpuRecord, Inventory};
use super::GpuError;

/// The variable that selects a workload's GPUs, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    /// `CUDA_VISIBLE_DEVICES` or `NVIDIA_VISIBLE_DEVICES`.
    pub var: &'static str,
    pub value: String,
}

impl Visible {
    /// From `KEY=VALUE` entries: `CUDA_VISIBLE_DEVICES`, else `NVIDIA_VISIBLE_DEVICES` (the order in which the
    /// checkpoint's record takes them); `None` when neither is set.
    pub fn from_env<'a>(env: impl IntoIterator<Item = &'a str> + Clone) -> Option<Visible> {
        ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"].into_iter().find_map(|var| {
            env.clone()
                .into_iter()
                .find_map(|kv| kv.strip_prefix(var)?.strip_prefix('='))
                .map(|value| Visible { var, value: value.to_string() })
        })
    }

    fn describe(v: Option<&Visible>) -> String {
        match v {
            Some(v) => format!("by {}={}", v.var, v.value),
            None => "with no CUDA_VISIBLE_DEVICES or NVIDIA_VISIBLE_DEVICES set (all of this host's GPUs)".into(),
        }
    }
}

/// One checkpointed GPU and the GPU that takes it over, by UUID (`GPU-xxxxxxxx-xxxx-...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPair {
    pub old: String,
    pub new: String,
}

impl GpuPair {
    /// A UUID as NVIDIA's `CUuuid` (16 bytes): the hex digits after the `GPU-` (or `MIG-`) prefix.
    pub fn uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
        let hex: String = uuid.strip_prefix("GPU-").or_else(|| uuid.strip_prefix("MIG-")).unwrap_or(uuid).replace('-', "");
        if hex.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }
}

/// What a restore is given, and the remapping it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The GPUs the restored workload is given, in order.
    pub given: Vec<GpuDevice>,
    /// Empty when the workload finds its own GPUs again.
    pub pairs: Vec<GpuPair>,
}

/// Check that `host`, giving the restored workload the GPUs `visible` selects, can take the state `record`
/// describes, and pair the checkpoint's GPUs with those given. `what` names the workload in messages.
pub fn place(host: &Inventory, record: &GpuRecord, visible: Option<&Visible>, what: &str) -> Result<Placement, GpuError> {
    let short = |reason: String| Err(GpuError::HostMismatch { reason });
    host.check_driver(record)?;
    // (A dump that could not list its GPUs recorded none: then only the driver is checked.)
    let given = host.visible(visible.map(|v| v.value.as_str()));
    let recorded = match &record.visible_devices {
        Some(v) => format!("{} (selected by {v})", list(&record.devices)),
        None => list(&record.devices),
    };
    if given.len() < record.devices.len() {
        return short(format!(
            "the checkpoint used {} GPU(s): {recorded}, but the restored {what} is given {} {}{}",
            record.devices.len(),
            given.len(),
            Visible::describe(visible),
            if given.is_empty() { String::new() } else { format!(": {}", list(&given)) }
        ));
    }
    for (old, new) in record.devices.iter().zip(&given) {
        if new.memory_mib < old.memory_mib {
            return short(format!(
                "the checkpoint's GPU {} ({}, {} MiB) would go to GPU {} ({}, only {} MiB), given to the restored {what} {}",
                old.index,
                old.name,
                old.memory_mib,
                new.index,
                new.name,
                new.memory_mib,
                Visible::describe(visible)
            ));
        }
    }
    let moved = record.devices.iter().zip(&given).any(|(old, new)| !old.uuid.is_empty() && old.uuid != new.uuid);
    let pairs = if moved {
        record.devices.iter().zip(&given).map(|(old, new)| GpuPair { old: old.uuid.clone(), new: new.uuid.clone() }).collect()
    } else {
        Vec::new()
    };
    Ok(Placement { given, pairs })
}

fn list(devices: &[GpuDevice]) -> String {
    devices.iter().map(|d| format!("GPU {} ({}, {} MiB)", d.index, d.name, d.memory_mib)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32, memory_mib: u64) -> GpuDevice {
        GpuDevice {
            index,
            name: format!("GPU{index}"),
            memory_mib,
            uuid: format!("GPU-0000000{index}-0000-4000-8000-000000000000"),
        }
    }

    fn host(devices: Vec<GpuDevice>) -> Inventory {
        Inventory { devices, driver_version: "570.86.10".into(), cuda_version: "12.8".into() }
    }

    fn record(devices: Vec<GpuDevice>, visible: Option<&str>) -> GpuRecord {
        GpuRecord {
            pids: vec![1],
            backend: "driver".into(),
            devices,
            driver_version: "570.86.10".into(),
            cuda_version: "12.8".into(),
            visible_devices: visible.map(str::to_string),
        }
    }

    fn nvidia(v: &str) -> Visible {
        Visible { var: "NVIDIA_VISIBLE_DEVICES", value: v.into() }
    }

    #[test]
    fn the_gpus_given_must_be_as_many_and_as_large_as_the_recorded_ones() {
        let h = host(vec![dev(0, 40960), dev(1, 81920)]);
        let rec = record(vec![dev(1, 81920)], Some("1"));
        // The same GPU again: nothing to remap.
        let p = place(&h, &rec, Some(&nvidia("1")), "container").unwrap();
        assert_eq!((p.given.len(), p.pairs.len()), (1, 0));
        // GPU 0 is smaller: refused, naming both GPUs and the variable.
        let e = place(&h, &rec, Some(&nvidia("0")), "container").unwrap_err().to_string();
        assert!(e.contains("81920 MiB") && e.contains("only 40960 MiB") && e.contains("NVIDIA_VISIBLE_DEVICES=0"), "{e}");
        // No GPU given, or fewer.
        let e = place(&h, &rec, Some(&nvidia("none")), "container").unwrap_err().to_string();
        assert!(e.contains("given 0 by NVIDIA_VISIBLE_DEVICES=none") && e.contains("selected by 1"), "{e}");
        let two = record(vec![dev(0, 40960), dev(1, 81920)], None);
        let e = place(&h, &two, Some(&nvidia("1")), "process").unwrap_err().to_string();
        assert!(e.contains("used 2 GPU(s)") && e.contains("given 1"), "{e}");
        // An older driver is refused whatever is given.
        let old = Inventory { driver_version: "565.57.01".into(), ..h.clone() };
        assert!(place(&old, &rec, Some(&nvidia("1")), "process").unwrap_err().to_string().contains("older 565.57.01"));
    }

    #[test]
    fn gpus_with_other_uuids_are_paired_in_order_with_every_checkpointed_gpu() {
        let rec = record(vec![dev(0, 40960), dev(1, 40960)], None);
        let mut other = host(vec![dev(0, 40960), dev(1, 81920)]);
        other.devices[0].uuid = "GPU-aaaaaaaa-0000-4000-8000-000000000000".into();
        let p = place(&other, &rec, None, "process").unwrap();
        assert_eq!(
            p.pairs,
            [
                GpuPair { old: dev(0, 0).uuid, new: "GPU-aaaaaaaa-0000-4000-8000-000000000000".into() },
                GpuPair { old: dev(1, 0).uuid, new: dev(1, 0).uuid },
            ]
        );
        // A bigger host in another order: the given GPUs take over by position.
        let p = place(&other, &record(vec![dev(0, 40960)], Some("0")), Some(&nvidia("1")), "container").unwrap();
        assert_eq!(p.pairs, [GpuPair { old: dev(0, 0).uuid, new: dev(1, 0).uuid }]);
    }

    #[test]
    fn uuids_become_nvidia_bytes_and_env_entries_name_the_variable() {
        let b = GpuPair::uuid_bytes("GPU-6661e5e0-0000-4000-8000-00000000000a").unwrap();
        assert_eq!(b[0..4], [0x66, 0x61, 0xe5, 0xe0]);
        assert_eq!(b[15], 0x0a);
        assert!(
            GpuPair::uuid_bytes("GPU-12").is_none() && GpuPair::uuid_bytes("GPU-zz61e5e0-0000-4000-8000-00000000000a").is_none()
        );
        let env = ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=1", "CUDA_VISIBLE_DEVICES_X=2"];
        assert_eq!(Visible::from_env(env), Some(nvidia("1")));
        let env = ["NVIDIA_VISIBLE_DEVICES=1", "CUDA_VISIBLE_DEVICES=0"];
        assert_eq!(Visible::from_env(env).map(|v| v.var), Some("CUDA_VISIBLE_DEVICES"));
        assert_eq!(Visible::from_env(["PATH=/bin"]), None);
    }
}
