//! The seam between the GPU hook and NVIDIA's checkpoint API: lock a process's CUDA state, copy its device
//! memory into its host memory (checkpoint), copy it back (restore), unlock. Two implementations:
//! [`super::utility::CudaCheckpoint`] (the `cuda-checkpoint` utility) and [`super::driver::DriverApi`]
//! (`cuCheckpointProcess*` from libcuda, loaded at run time).

use std::time::Duration;

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
}
