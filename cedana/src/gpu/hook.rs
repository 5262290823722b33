//! The GPU as one of the engine's hooks. At `before-dump`, while CRIU starts up (CRIU waits for it at its
//! `pre-dump` step, before it freezes anything), it finds the tree's CUDA processes (nothing else
//! happens for a tree without any: the cost of a non-GPU dump is the detection) and, for each in parallel,
//! locks it (bounded by the lock timeout) and checkpoints its device memory into host memory; any failure
//! puts back every process it had moved and refuses the dump. At `after-dump`, when the workload lives on
//! (`--leave-running`, or a failed dump), each is restored and unlocked. At `before-restore` the GPUs the
//! restored workload is given (a container's by its spec's `CUDA_VISIBLE_DEVICES`/`NVIDIA_VISIBLE_DEVICES`, a
//! process's by the checkpoint's) are checked against the checkpoint's record, and paired with the recorded
//! ones when their UUIDs differ (see [`super::placement`]); at `restored` (CRIU's tree runs, its CUDA
//! processes still checkpointed) each is restored (onto the paired GPUs) and unlocked, and a failure there
//! fails the restore (the engine then kills the tree).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::backend::{describe_pairs, Action, CudaState, GpuBackend};
use super::inventory::{GpuRecord, Inventory};
use super::placement::{place, GpuPair, Visible};
use super::{detect, GpuError, GpuSettings};
use crate::engine::hooks::{Hook, HookContext, HookError, HookPoint};

/// What the dump did to one CUDA process, to be undone when the workload lives on.
#[derive(Debug, Clone, Copy)]
struct Moved {
    pid: i32,
    /// We locked it (it was running): unlock it when giving it back.
    locked: bool,
    /// We checkpointed it: restore it when giving it back.
    checkpointed: bool,
}

/// Finds the CUDA processes of a tree (replaceable in tests).
type Detector = fn(i32) -> Vec<i32>;

/// GPU checkpoint/restore as a [`Hook`]; one per engine, shared by concurrent operations.
pub struct GpuHook {
    settings: GpuSettings,
    /// Built at the first CUDA process met (an error is reported to every operation).
    backend: OnceLock<Result<Arc<dyn GpuBackend>, GpuError>>,
    detector: Detector,
    /// Per dump (by root PID): the processes it moved.
    moved: Mutex<HashMap<i32, Vec<Moved>>>,
}

impl GpuHook {
    /// A hook with `settings`; nothing is loaded or run until a CUDA process is met.
    pub fn new(settings: GpuSettings) -> Self {
        Self { settings, backend: OnceLock::new(), detector: detect::gpu_processes, moved: Mutex::default() }
    }

    /// A hook driving `backend`, with CUDA processes found by `detector` (tests).
    pub fn with_backend(settings: GpuSettings, backend: Arc<dyn GpuBackend>, detector: Detector) -> Self {
        let hook = Self { settings, backend: OnceLock::new(), detector, moved: Mutex::default() };
        let _ = hook.backend.set(Ok(backend));
        hook
    }

    fn backend(&self) -> Result<Arc<dyn GpuBackend>, GpuError> {
        self.backend
            .get_or_init(|| match self.settings.build_backend() {
                Ok(Some(b)) => {
                    tracing::info!(backend = b.name(), "GPU checkpoint backend chosen");
                    Ok(Arc::from(b))
                }
                Ok(None) => Err(GpuError::NoBackend { reason: "GPU support is off (gpu.backend = \"off\")".into() }),
                Err(e) => Err(e),
            })
            .clone()
    }

    fn moved(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Vec<Moved>>> {
        // The map holds plain data: a panic elsewhere cannot leave it inconsistent.
        self.moved.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn before_dump(&self, ctx: &HookContext) -> Result<(), HookError> {
        let refuse = |context: String, e: GpuError| HookError {
            point: HookPoint::BeforeDump.name(),
            message: format!("{context}: {e}"),
            source: Some(Box::new(e)),
        };
        let t = Instant::now();
        let pids = (self.detector)(ctx.pid);
        ctx.report(|r| r.phases.push(("gpu detect", t.elapsed())));
        if pids.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let backend = self
            .backend()
            .map_err(|e| refuse(format!("the tree uses a GPU (CUDA processes {pids:?}) but cannot be checkpointed"), e))?;
        let timeout = self.settings.lock_timeout;
        // The host's GPUs (nvidia-smi, a few hundred ms on a real host) are asked about beside the actions.
        let (results, record) = std::thread::scope(|s| {
            let record = s.spawn(|| self.record(ctx.pid, &pids, backend.name()));
            let results = for_each(&pids, |pid| suspend(backend.as_ref(), *pid, timeout));
            // A panic in the query is a bug; propagate it as the scope would.
            (results, record.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        let (moved, failures) = split(results);
        if let Some(first) = failures.into_iter().next() {
            for_each(&moved, |m| give_back(backend.as_ref(), m));
            return Err(refuse("nothing was dumped and every CUDA process was left running on its GPU".into(), first));
        }
        let suspended: Vec<i32> = moved.iter().filter(|m| m.checkpointed).map(|m| m.pid).collect();
        tracing::info!(pids = ?suspended, backend = backend.name(), time = ?t.elapsed(), "CUDA state checkpointed");
        self.moved().insert(ctx.pid, moved);
        ctx.report(|r| {
            r.gpu = Some(record);
            r.phases.push(("gpu checkpoint", t.elapsed()));
        });
        Ok(())
    }

    fn after_dump(&self, ctx: &HookContext) {
        let Some(moved) = self.moved().remove(&ctx.pid) else { return };
        if ctx.succeeded == Some(true) && !ctx.leave_running {
            return; // CRIU ended the processes: their state is in the checkpoint.
        }
        let Ok(backend) = self.backend() else { return };
        let t = Instant::now();
        for r in for_each(&moved, |m| give_back(backend.as_ref(), m)) {
            if let Err(e) = r {
                tracing::error!(error = %e, "a CUDA process could not be given back its GPU state");
            }
        }
        ctx.report(|r| r.phases.push(("gpu resume", t.elapsed())));
    }

    fn before_restore(&self, ctx: &HookContext) -> Result<(), HookError> {
        let Some(record) = &ctx.gpu else { return Ok(()) };
        let refuse = |e| HookError::caused(HookPoint::BeforeRestore, e);
        let backend = self.backend().map_err(refuse)?;
        if !ctx.skip_gpu_check {
            let host = Inventory::query(&self.settings.nvidia_smi).map_err(refuse)?;
            // A container is given GPUs by its own spec; a process keeps the checkpoint's variable.
            let (visible, what) = match &ctx.gpu_visible {
                Some(v) => (v.clone(), "container"),
                None => {
                    let var = "CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES";
                    (record.visible_devices.clone().map(|value| Visible { var, value }), "process")
                }
            };
            let placement = place(&host, record, visible.as_ref(), what).map_err(refuse)?;
            if !placement.pairs.is_empty() {
                backend.can_remap(&placement.pairs).map_err(refuse)?;
                tracing::info!(pairs = %describe_pairs(&placement.pairs), "the checkpoint's GPUs are restored onto others");
            }
            ctx.report(|r| r.gpu_pairs = placement.pairs);
        }
        tracing::info!(backend = backend.name(), pids = ?record.pids, "restoring a checkpoint with GPU state");
        Ok(())
    }

    fn restored(&self, ctx: &HookContext) -> Result<(), HookError> {
        if ctx.gpu.is_none() {
            return Ok(());
        }
        let refuse = |e: GpuError| HookError {
            point: HookPoint::Restored.name(),
            message: format!("the restored processes were killed: {e}"),
            source: Some(Box::new(e)),
        };
        let backend = self.backend().map_err(refuse)?;
        let t = Instant::now();
        // The restored CUDA processes still map libcuda; their PIDs may differ from the dump's (containers).
        let pids = (self.detector)(ctx.pid);
        let pairs = ctx.reported().gpu_pairs;
        let results = for_each(&pids, |pid| resume(backend.as_ref(), *pid, &pairs));
        ctx.report(|r| r.phases.push(("gpu restore", t.elapsed())));
        match results.into_iter().find_map(Result::err) {
            Some(e) => Err(refuse(e)),
            None => {
                tracing::info!(pids = ?pids, time = ?t.elapsed(), "CUDA state restored");
                Ok(())
            }
        }
    }

    /// What the checkpoint records of the tree's GPUs (the host's, as far as `nvidia-smi` tells).
    fn record(&self, root: i32, pids: &[i32], backend: &str) -> GpuRecord {
        let visible = visible_devices(root);
        let inventory = Inventory::query(&self.settings.nvidia_smi)
            .inspect_err(|e| tracing::warn!(error = %e, "the checkpoint will not record the GPUs"))
            .ok();
        GpuRecord {
            pids: pids.to_vec(),
            backend: backend.to_string(),
            devices: inventory.as_ref().map(|i| i.visible(visible.as_deref())).unwrap_or_default(),
            driver_version: inventory.as_ref().map(|i| i.driver_version.clone()).unwrap_or_default(),
            cuda_version: inventory.map(|i| i.cuda_version).unwrap_or_default(),
            visible_devices: visible,
        }
    }
}

impl Hook for GpuHook {
    /// The lock and checkpoint (dump) and the host's check (restore) need nothing of CRIU's: they run while
    /// CRIU starts up, and CRIU waits for them only before it freezes or restores anything.
    fn beside_criu(&self, point: HookPoint) -> bool {
        matches!(point, HookPoint::BeforeDump | HookPoint::BeforeRestore)
    }

    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), HookError> {
        match point {
            HookPoint::BeforeDump => self.before_dump(ctx),
            HookPoint::AfterDump => {
                self.after_dump(ctx);
                Ok(())
            }
            HookPoint::BeforeRestore => self.before_restore(ctx),
            HookPoint::Restored => self.restored(ctx),
            HookPoint::AfterRestore => Ok(()),
        }
    }
}

/// Lock and checkpoint one process; on failure, give back what was done and say what failed.
fn suspend(backend: &dyn GpuBackend, pid: i32, timeout: Duration) -> Result<Option<Moved>, GpuError> {
    let state = match backend.state(pid) {
        Ok(s) => s,
        // It maps the driver but never initialised CUDA: it holds no device state.
        Err(GpuError::NotCuda { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut moved = Moved { pid, locked: false, checkpointed: false };
    match state {
        CudaState::Checkpointed => return Ok(Some(moved)),
        CudaState::Failed => {
            return Err(GpuError::Action { pid, action: "get-state", message: "its CUDA state is failed".into() })
        }
        CudaState::Running => {
            backend.act(pid, Action::Lock, Some(timeout))?;
            moved.locked = true;
        }
        CudaState::Locked => {}
    }
    if let Err(e) = backend.act(pid, Action::Checkpoint, None) {
        if let Err(undo) = give_back(backend, &moved) {
            tracing::error!(pid, error = %undo, "could not unlock after a failed CUDA checkpoint");
        }
        return Err(e);
    }
    moved.checkpointed = true;
    Ok(Some(moved))
}

/// Undo [`suspend`]: restore what was checkpointed, unlock what was locked.
fn give_back(backend: &dyn GpuBackend, m: &Moved) -> Result<(), GpuError> {
    if m.checkpointed {
        backend.act(m.pid, Action::Restore, None)?;
    }
    if m.locked {
        backend.act(m.pid, Action::Unlock, None)?;
    }
    Ok(())
}

/// Bring a restored process's CUDA state back to running, on the GPUs `pairs` name (its own when empty).
fn resume(backend: &dyn GpuBackend, pid: i32, pairs: &[GpuPair]) -> Result<(), GpuError> {
    match backend.state(pid) {
        Ok(CudaState::Checkpointed) => {
            backend.restore_onto(pid, pairs)?;
            backend.act(pid, Action::Unlock, None)
        }
        Ok(CudaState::Locked) => backend.act(pid, Action::Unlock, None),
        Ok(CudaState::Running) | Err(GpuError::NotCuda { .. }) => Ok(()),
        Ok(CudaState::Failed) => Err(GpuError::Action { pid, action: "restore", message: "its CUDA state is failed".into() }),
        Err(e) => Err(e),
    }
}

/// Run `f` for every item on its own thread (NVIDIA's actions on different processes proceed in parallel);
/// results in the items' order.
fn for_each<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|i| s.spawn(|| f(i))).collect();
        // A panic in `f` is a bug; propagate it as the scope would.
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// The processes moved, and the failures.
fn split(results: Vec<Result<Option<Moved>, GpuError>>) -> (Vec<Moved>, Vec<GpuError>) {
    let mut moved = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(Some(m)) => moved.push(m),
            Ok(None) => {}
            Err(e) => failures.push(e),
        }
    }
    (moved, failures)
}

/// `CUDA_VISIBLE_DEVICES` (else `NVIDIA_VISIBLE_DEVICES`) in the environment `pid` started with.
fn visible_devices(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Visible::from_env(env.split(|b| *b == 0).filter_map(|kv| std::str::from_utf8(kv).ok())).map(|v| v.value)
}

#[cfg(test)]
#[path = "hook_tests.rs"]
mod tests;
