//! The hook's order of operations and rollbacks, against a backend that keeps NVIDIA's per-process state
//! machine (running → locked → checkpointed → locked → running) and fails on demand.

use std::sync::{Arc, Mutex};

use super::*;
use crate::checkpoint::CheckpointKind;
use crate::engine::hooks::HookContext;

#[derive(Default)]
struct Machine {
    states: Mutex<HashMap<i32, CudaState>>,
    calls: Mutex<Vec<String>>,
    /// `(pid, action)` that fails.
    fail: Mutex<Option<(i32, Action)>>,
    /// Whether it takes GPU pairs (the driver API); those it was given, by PID.
    remaps: bool,
    pairs: Mutex<HashMap<i32, Vec<GpuPair>>>,
}

impl Machine {
    fn with(pids: &[i32]) -> Arc<Machine> {
        let m = Machine::default();
        m.states.lock().unwrap().extend(pids.iter().map(|p| (*p, CudaState::Running)));
        Arc::new(m)
    }
    fn state_of(&self, pid: i32) -> CudaState {
        self.states.lock().unwrap()[&pid]
    }
    fn calls(&self) -> Vec<String> {
        let mut c = self.calls.lock().unwrap().clone();
        c.sort(); // processes are handled in parallel
        c
    }
}

impl GpuBackend for Machine {
    fn name(&self) -> &'static str {
        "machine"
    }
    fn state(&self, pid: i32) -> Result<CudaState, GpuError> {
        self.states.lock().unwrap().get(&pid).copied().ok_or(GpuError::NotCuda { pid, detail: "none".into() })
    }
    fn can_remap(&self, pairs: &[GpuPair]) -> Result<(), GpuError> {
        match self.remaps {
            true => Ok(()),
            false => Err(GpuError::NoRemap { backend: "machine", pairs: describe_pairs(pairs), detail: "no".into() }),
        }
    }
    fn restore_onto(&self, pid: i32, pairs: &[GpuPair]) -> Result<(), GpuError> {
        if !pairs.is_empty() {
            self.can_remap(pairs)?;
            self.pairs.lock().unwrap().insert(pid, pairs.to_vec());
        }
        self.act(pid, Action::Restore, None)
    }
    fn act(&self, pid: i32, action: Action, timeout: Option<Duration>) -> Result<(), GpuError> {
        self.calls.lock().unwrap().push(format!("{pid} {}{}", action.name(), if timeout.is_some() { " t" } else { "" }));
        let mut states = self.states.lock().unwrap();
        let state = states.get_mut(&pid).ok_or(GpuError::NotCuda { pid, detail: "none".into() })?;
        let fail = |m: &str| Err(GpuError::Action { pid, action: action.name(), message: m.into() });
        if *self.fail.lock().unwrap() == Some((pid, action)) {
            if action == Action::Restore {
                *state = CudaState::Failed;
            }
            return fail("injected");
        }
        *state = match (action, *state) {
            (Action::Lock, CudaState::Running) => CudaState::Locked,
            (Action::Checkpoint, CudaState::Locked) => CudaState::Checkpointed,
            (Action::Restore, CudaState::Checkpointed) => CudaState::Locked,
            (Action::Unlock, CudaState::Locked) => CudaState::Running,
            _ => return fail("illegal transition"),
        };
        Ok(())
    }
}

fn three(_: i32) -> Vec<i32> {
    vec![10, 11, 12]
}

fn none(_: i32) -> Vec<i32> {
    Vec::new()
}

fn hook(machine: &Arc<Machine>, detector: Detector) -> GpuHook {
    let settings = GpuSettings { nvidia_smi: "/nonexistent/nvidia-smi".into(), ..Default::default() };
    GpuHook::with_backend(settings, machine.clone(), detector)
}

fn ctx() -> HookContext {
    HookContext::new(CheckpointKind::Process, 10, None, "/tmp/cp".into())
}

#[test]
fn a_dump_locks_then_checkpoints_every_cuda_process_and_records_them() {
    let m = Machine::with(&[10, 11, 12]);
    let h = hook(&m, three);
    let c = ctx();
    h.run(HookPoint::BeforeDump, &c).unwrap();
    assert!([10, 11, 12].iter().all(|p| m.state_of(*p) == CudaState::Checkpointed));
    assert_eq!(m.calls(), ["10 checkpoint", "10 lock t", "11 checkpoint", "11 lock t", "12 checkpoint", "12 lock t"]);
    let report = c.reported();
    let record = report.gpu.unwrap();
    assert_eq!((record.pids, record.backend.as_str()), (vec![10, 11, 12], "machine"));
    assert!(report.phases.iter().any(|(p, _)| *p == "gpu checkpoint"));
    // A successful dump without --leave-running: the processes are gone, nothing is given back.
    h.run(HookPoint::AfterDump, &HookContext { succeeded: Some(true), ..c }).unwrap();
    assert!([10, 11, 12].iter().all(|p| m.state_of(*p) == CudaState::Checkpointed));
}

#[test]
fn leave_running_and_failed_dumps_give_every_process_its_gpu_back() {
    for (succeeded, leave_running) in [(true, true), (false, false)] {
        let m = Machine::with(&[10, 11, 12]);
        let h = hook(&m, three);
        let c = HookContext { leave_running, ..ctx() };
        h.run(HookPoint::BeforeDump, &c).unwrap();
        h.run(HookPoint::AfterDump, &HookContext { succeeded: Some(succeeded), ..c }).unwrap();
        assert!([10, 11, 12].iter().all(|p| m.state_of(*p) == CudaState::Running), "{succeeded} {leave_running}");
    }
}

#[test]
fn a_failed_lock_or_checkpoint_rolls_back_the_others_and_refuses() {
    for action in [Action::Lock, Action::Checkpoint] {
        let m = Machine::with(&[10, 11, 12]);
        *m.fail.lock().unwrap() = Some((11, action));
        let h = hook(&m, three);
        let err = h.run(HookPoint::BeforeDump, &ctx()).unwrap_err().to_string();
        assert!(err.contains(&format!("CUDA {} of process 11 failed", action.name())), "{err}");
        assert!(err.contains("left running on its GPU"), "{err}");
        assert!([10, 11, 12].iter().all(|p| m.state_of(*p) == CudaState::Running), "{:?}", m.calls());
        assert!(ctx().reported().gpu.is_none());
    }
}

#[test]
fn trees_without_cuda_processes_cost_only_the_detection() {
    let m = Machine::with(&[]);
    let h = hook(&m, none);
    let c = ctx();
    h.run(HookPoint::BeforeDump, &c).unwrap();
    h.run(HookPoint::AfterDump, &HookContext { succeeded: Some(false), ..c.clone() }).unwrap();
    assert!(m.calls().is_empty());
    let report = c.reported();
    assert!(report.gpu.is_none());
    assert_eq!(report.phases.iter().map(|(p, _)| *p).collect::<Vec<_>>(), ["gpu detect"]);
}

#[test]
fn a_restore_puts_back_each_process_and_fails_when_one_cannot() {
    let record = GpuRecord {
        pids: vec![10, 11, 12],
        backend: "machine".into(),
        devices: Vec::new(),
        driver_version: String::new(),
        cuda_version: String::new(),
        visible_devices: None,
    };
    let restore_ctx = HookContext { gpu: Some(record), skip_gpu_check: true, ..ctx() };
    let m = Machine::with(&[10, 11, 12]);
    let h = hook(&m, three);
    h.run(HookPoint::BeforeDump, &ctx()).unwrap();
    h.run(HookPoint::BeforeRestore, &restore_ctx).unwrap();
    h.run(HookPoint::Restored, &restore_ctx).unwrap();
    assert!([10, 11, 12].iter().all(|p| m.state_of(*p) == CudaState::Running));

    let m = Machine::with(&[10, 11, 12]);
    let h = hook(&m, three);
    h.run(HookPoint::BeforeDump, &ctx()).unwrap();
    *m.fail.lock().unwrap() = Some((12, Action::Restore));
    let err = h.run(HookPoint::Restored, &restore_ctx).unwrap_err().to_string();
    assert!(err.contains("CUDA restore of process 12 failed") && err.contains("killed"), "{err}");
    assert_eq!(m.state_of(12), CudaState::Failed);
}

#[test]
fn the_host_check_refuses_a_host_without_gpus_unless_skipped() {
    let record = GpuRecord {
        pids: vec![10],
        backend: "machine".into(),
        devices: vec![crate::gpu::GpuDevice { index: 0, name: "A".into(), memory_mib: 1024, uuid: String::new() }],
        driver_version: "570.1".into(),
        cuda_version: "12.8".into(),
        visible_devices: None,
    };
    let m = Machine::with(&[]);
    let h = hook(&m, none);
    let c = HookContext { gpu: Some(record), ..ctx() };
    let err = h.run(HookPoint::BeforeRestore, &c).unwrap_err().to_string();
    assert!(err.contains("no NVIDIA GPU found on this host") && err.contains("nvidia-smi"), "{err}");
    h.run(HookPoint::BeforeRestore, &HookContext { skip_gpu_check: true, ..c }).unwrap();
    // A checkpoint without GPU state is never checked.
    h.run(HookPoint::BeforeRestore, &ctx()).unwrap();
}

#[test]
fn gpus_with_other_uuids_are_paired_for_a_backend_that_remaps_and_refused_by_one_that_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let smi = dir.path().join("nvidia-smi");
    // This host's one GPU has another UUID than the checkpoint's.
    let csv = "0, A, 2048, 570.1, GPU-bbbbbbbb-0000-4000-8000-000000000000";
    std::fs::write(
        &smi,
        format!("#!/bin/sh\ncase \"$1\" in --query-gpu=*) echo '{csv}' ;; *) echo 'CUDA Version: 12.8' ;; esac\n"),
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let old = "GPU-aaaaaaaa-0000-4000-8000-000000000000";
    let record = GpuRecord {
        pids: vec![10],
        backend: "machine".into(),
        devices: vec![crate::gpu::GpuDevice { index: 0, name: "A".into(), memory_mib: 1024, uuid: old.into() }],
        driver_version: "570.1".into(),
        cuda_version: "12.8".into(),
        visible_devices: Some("0".into()),
    };
    let visible = Some(crate::gpu::Visible { var: "NVIDIA_VISIBLE_DEVICES", value: "0".into() });
    let c = HookContext { gpu: Some(record), gpu_visible: Some(visible), ..ctx() };
    for remaps in [false, true] {
        let m = Arc::new(Machine { remaps, ..Default::default() });
        m.states.lock().unwrap().insert(10, CudaState::Checkpointed);
        let settings = GpuSettings { nvidia_smi: smi.clone(), ..Default::default() };
        let h = GpuHook::with_backend(settings, m.clone(), |_| vec![10]);
        let c = HookContext { report: Default::default(), ..c.clone() };
        let checked = h.run(HookPoint::BeforeRestore, &c);
        if !remaps {
            let err = checked.unwrap_err().to_string();
            assert!(err.contains("remapped") && err.contains(old) && err.contains("GPU-bbbbbbbb"), "{err}");
            assert!(m.calls().is_empty(), "nothing was restored");
            continue;
        }
        checked.unwrap();
        h.run(HookPoint::Restored, &c).unwrap();
        let given = m.pairs.lock().unwrap()[&10].clone();
        assert_eq!(given, [GpuPair { old: old.into(), new: "GPU-bbbbbbbb-0000-4000-8000-000000000000".into() }]);
        assert_eq!(m.state_of(10), CudaState::Running);
    }
}
