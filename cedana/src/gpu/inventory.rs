//! What GPUs a host has (from `nvidia-smi`), what a checkpoint recorded of them, and whether a host can take
//! a checkpoint: at least as many GPUs, each with at least the memory of the one it replaces, and a driver
//! no older than the one the checkpoint was made with.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::GpuError;

/// One GPU of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub index: u32,
    /// The model, e.g. `NVIDIA A100-SXM4-40GB`.
    pub name: String,
    /// Device memory in MiB.
    pub memory_mib: u64,
    #[serde(default)]
    pub uuid: String,
}

/// A host's GPUs and driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub devices: Vec<GpuDevice>,
    /// The display driver's version, e.g. `570.86.10`.
    pub driver_version: String,
    /// The CUDA version the driver supports, e.g. `12.8` (empty when unknown).
    pub cuda_version: String,
}

/// What a checkpoint records of the GPU state it holds (the manifest's `gpu`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    /// The PIDs of the tree's CUDA processes at dump.
    pub pids: Vec<i32>,
    /// The backend that moved the device state (`cuda-checkpoint` or `driver`).
    pub backend: String,
    /// The GPUs the workload could use (those of `visible_devices` when set, else all of the host's).
    pub devices: Vec<GpuDevice>,
    pub driver_version: String,
    pub cuda_version: String,
    /// `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES` of the root process, as set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visible_devices: Option<String>,
}

impl Inventory {
    /// Ask `nvidia-smi` (a path, or a name looked up in `PATH`).
    pub fn query(nvidia_smi: &Path) -> Result<Inventory, GpuError> {
        let run = |args: &[&str]| -> Result<String, GpuError> {
            let out = Command::new(nvidia_smi)
                .args(args)
                .output()
                .map_err(|e| GpuError::NoGpu { reason: format!("cannot run {}: {e}", nvidia_smi.display()) })?;
            if !out.status.success() {
                return Err(GpuError::NoGpu {
                    reason: format!(
                        "{} exited with {}: {}",
                        nvidia_smi.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let csv = run(&["--query-gpu=index,name,memory.total,driver_version,uuid", "--format=csv,noheader,nounits"])?;
        let (devices, driver_version) = parse_query(&csv).map_err(|reason| GpuError::NoGpu { reason })?;
        let cuda_version = run(&[]).map(|header| parse_cuda_version(&header)).unwrap_or_default();
        Ok(Inventory { devices, driver_version, cuda_version })
    }

    /// The devices a process with `visible` (`CUDA_VISIBLE_DEVICES` or `NVIDIA_VISIBLE_DEVICES`) can use:
    /// those listed by index or UUID, all for `all` or when unset, none for `none`/`void`/empty.
    pub fn visible(&self, visible: Option<&str>) -> Vec<GpuDevice> {
        let Some(list) = visible.map(str::trim) else { return self.devices.clone() };
        match list {
            "all" => self.devices.clone(),
            "" | "none" | "void" | "NoDevFiles" => Vec::new(),
            _ => list
                .split(',')
                .map(str::trim)
                .filter_map(|id| self.devices.iter().find(|d| d.index.to_string() == id || (!d.uuid.is_empty() && d.uuid == id)))
                .cloned()
                .collect(),
        }
    }

    /// Refuse a host whose driver is older than the one the checkpoint `record` was made with.
    pub fn check_driver(&self, record: &GpuRecord) -> Result<(), GpuError> {
        if version_key(&self.driver_version) < version_key(&record.driver_version) {
            return Err(GpuError::HostMismatch {
                reason: format!(
                    "the checkpoint was made with NVIDIA driver {} but this host has the older {}",
                    record.driver_version, self.driver_version
                ),
            });
        }
        Ok(())
    }
}

/// Parse `index, name, memory.total, driver_version, uuid` lines (csv, noheader, nounits).
fn parse_query(csv: &str) -> Result<(Vec<GpuDevice>, String), String> {
    let mut devices = Vec::new();
    let mut driver = String::new();
    for line in csv.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [index, name, memory, driver_version, uuid] = f[..] else {
            return Err(format!("nvidia-smi printed {line:?}, not index, name, memory, driver, uuid"));
        };
        let bad = |what: &str| format!("nvidia-smi printed {line:?}: the {what} is not a number");
        devices.push(GpuDevice {
            index: index.parse().map_err(|_| bad("index"))?,
            name: name.to_string(),
            memory_mib: memory.parse().map_err(|_| bad("memory"))?,
            uuid: uuid.to_string(),
        });
        driver = driver_version.to_string();
    }
    if devices.is_empty() {
        return Err("nvidia-smi lists no GPU".into());
    }
    Ok((devices, driver))
}

/// `CUDA Version: 12.8` from nvidia-smi's header.
fn parse_cuda_version(header: &str) -> String {
    header
        .split("CUDA Version:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|v| v.trim_end_matches('|').to_string())
        .unwrap_or_default()
}

/// A dotted version as numbers, for ordering (`570.86.10` → [570, 86, 10]).
pub(crate) fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.trim().parse().unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32, memory_mib: u64) -> GpuDevice {
        GpuDevice { index, name: format!("GPU{index}"), memory_mib, uuid: format!("GPU-{index}") }
    }

    fn host(n: u32, mib: u64, driver: &str) -> Inventory {
        Inventory { devices: (0..n).map(|i| dev(i, mib)).collect(), driver_version: driver.into(), cuda_version: "12.8".into() }
    }

    fn record(devices: Vec<GpuDevice>, driver: &str) -> GpuRecord {
        GpuRecord {
            pids: vec![1],
            backend: "cuda-checkpoint".into(),
            devices,
            driver_version: driver.into(),
            cuda_version: "12.8".into(),
            visible_devices: None,
        }
    }

    #[test]
    fn nvidia_smi_output_is_parsed() {
        let (d, driver) = parse_query(
            "0, NVIDIA A100-SXM4-40GB, 40960, 570.86.10, GPU-aaa\n1, NVIDIA A100-SXM4-40GB, 40960, 570.86.10, GPU-bbb\n",
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].index, d[1].memory_mib, d[1].uuid.as_str()), (1, 40960, "GPU-bbb"));
        assert_eq!(driver, "570.86.10");
        assert!(parse_query("").unwrap_err().contains("no GPU"));
        assert!(parse_query("0, x, lots, 570, u").unwrap_err().contains("memory"));
        let header = "| NVIDIA-SMI 570.86.10    Driver Version: 570.86.10    CUDA Version: 12.8     |";
        assert_eq!(parse_cuda_version(header), "12.8");
        assert_eq!(parse_cuda_version("nothing"), "");
    }

    #[test]
    fn a_host_with_an_older_driver_is_refused() {
        let rec = record(vec![dev(0, 40960)], "570.86.10");
        host(1, 40960, "570.86.10").check_driver(&rec).unwrap();
        host(1, 40960, "575.1").check_driver(&rec).unwrap();
        let old = host(1, 40960, "570.86.9").check_driver(&rec).unwrap_err().to_string();
        assert!(old.contains("driver 570.86.10 but this host has the older 570.86.9"), "{old}");
    }

    #[test]
    fn visible_devices_select_by_index_or_uuid() {
        let h = host(3, 1024, "570");
        assert_eq!(h.visible(None).len(), 3);
        assert_eq!(h.visible(Some("all")).len(), 3);
        assert!(h.visible(Some("none")).is_empty());
        let v = h.visible(Some("2,GPU-0"));
        assert_eq!(v.iter().map(|d| d.index).collect::<Vec<_>>(), [2, 0]);
    }
}
