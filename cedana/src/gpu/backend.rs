//! The seam between the GPU hook and NVIDIA's checkpoint API: lock a process's CUDA state, copy its device
//! memory into its host memory (checkpoint), copy it back (restore), unlock. Two implementations:
//! [`super::utility::CudaCheckpoint`] (the `cuda-checkpoint` utility) and [`super::driver::DriverApi`]
//! (`cuCheckpointProcess*` from libcuda, loaded at run time).

use std::time::Duration;

use super::placement::GpuPair;
use super::GpuError;

/// The CUDA checkpoint state of a process (NVIDIA's `CUprocessState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaState {
    /// CUDA calls run.
    Running,
    /// CUDA calls block; device memory is still on the GPU.
    Locked,
    /// Device memory is in host memory and the process holds no GPU resource: CRIU can dump it.
    Checkpointed,
    /// A checkpoint or restore failed and left the process unusable.
    Failed,
}

impl CudaState {
    /// The word `cuda-checkpoint --get-state` prints.
    pub fn name(self) -> &'static str {
        match self {
            CudaState::Running => "running",
            CudaState::Locked => "locked",
            CudaState::Checkpointed => "checkpointed",
            CudaState::Failed => "failed",
        }
    }

    /// From the word `cuda-checkpoint --get-state` prints (its first word).
    pub fn parse(s: &str) -> Option<CudaState> {
        match s.split_whitespace().next()? {
            "running" => Some(CudaState::Running),
            "locked" => Some(CudaState::Locked),
            "checkpointed" => Some(CudaState::Checkpointed),
            "failed" => Some(CudaState::Failed),
            _ => None,
        }
    }
}

/// The actions of NVIDIA's checkpoint API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Lock,
    Checkpoint,
    Restore,
    Unlock,
}

impl Action {
    /// The name `cuda-checkpoint --action` takes.
    pub fn name(self) -> &'static str {
        match self {
            Action::Lock => "lock",
            Action::Checkpoint => "checkpoint",
            Action::Restore => "restore",
            Action::Unlock => "unlock",
        }
    }
}

/// A way to drive NVIDIA's checkpoint API for one process at a time. Calls for different PIDs may run
/// concurrently.
pub trait GpuBackend: Send + Sync {
    /// `cuda-checkpoint` or `driver`.
    fn name(&self) -> &'static str;
    /// The process's state; [`GpuError::NotCuda`] when it is not a CUDA process.
    fn state(&self, pid: i32) -> Result<CudaState, GpuError>;
    /// Run `action` on `pid`; `timeout` bounds a lock (the process stays running when it passes).
    fn act(&self, pid: i32, action: Action, timeout: Option<Duration>) -> Result<(), GpuError>;

    /// Whether this backend can restore onto other GPUs than the checkpointed ones; the error says why not.
    fn can_remap(&self, pairs: &[GpuPair]) -> Result<(), GpuError> {
        Err(GpuError::NoRemap {
            backend: self.name(),
            pairs: describe_pairs(pairs),
            detail: "it has no way to pass GPU pairs".into(),
        })
    }

    /// Restore `pid`'s device memory onto the GPUs `pairs` name (each checkpointed GPU to its new one), or
    /// onto its own GPUs when `pairs` is empty.
    fn restore_onto(&self, pid: i32, pairs: &[GpuPair]) -> Result<(), GpuError> {
        if pairs.is_empty() {
            return self.act(pid, Action::Restore, None);
        }
        self.can_remap(pairs)?;
        Err(GpuError::Action { pid, action: "restore", message: "this backend cannot restore onto other GPUs".into() })
    }
}

/// `old -> new, ...` for messages.
pub fn describe_pairs(pairs: &[GpuPair]) -> String {
    pairs.iter().map(|p| format!("{} -> {}", p.old, p.new)).collect::<Vec<_>>().join(", ")
}
