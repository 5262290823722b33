//! GPU-aware checkpoint/restore of CUDA processes, following NVIDIA's checkpoint API (driver r570+): before
//! CRIU freezes a tree, every CUDA process in it is locked (with a timeout) and its device memory copied into
//! its host memory (checkpoint), so CRIU dumps it like any process; after a `--leave-running` dump or any
//! failure, each is restored and unlocked again. After CRIU restores a tree, each CUDA process is restored
//! and unlocked before the restore is reported done; if that fails the restored tree is killed.
//!
//! - [`detect`]: which processes use a GPU (libcuda mapped, an NVIDIA device open);
//! - [`inventory`]: the host's GPUs (`nvidia-smi`), the checkpoint's record of them, the driver check;
//! - [`placement`]: the GPUs a restored workload is given, checked against the record and paired with it;
//! - [`backend`]: the seam, with [`utility`] (`cuda-checkpoint`) and [`driver`] (libcuda's
//!   `cuCheckpointProcess*`, loaded at run time);
//! - [`hook`]: all of it as one of the engine's hooks.

pub mod backend;
pub mod detect;
pub mod driver;
pub mod hook;
pub mod inventory;
pub mod placement;
pub mod utility;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use backend::{Action, CudaState, GpuBackend};
pub use hook::GpuHook;
pub use inventory::{GpuDevice, GpuRecord, Inventory};
pub use placement::{GpuPair, Placement, Visible};

use crate::error::ErrorKind;

/// Errors of GPU checkpoint and restore.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU checkpoint backend: {reason}")]
    NoBackend { reason: String },
    #[error("the NVIDIA driver is too old for checkpointing (r570 or newer is needed): {detail}")]
    DriverTooOld { detail: String },
    #[error("process {pid} is not a CUDA process: {detail}")]
    NotCuda { pid: i32, detail: String },
    #[error("CUDA {action} of process {pid} failed: {message}")]
    Action { pid: i32, action: &'static str, message: String },
    #[error("no NVIDIA GPU found on this host: {reason}")]
    NoGpu { reason: String },
    #[error("this host cannot take the checkpoint's GPU state: {reason}")]
    HostMismatch { reason: String },
    #[error("the checkpoint's GPUs must be remapped onto others ({pairs}), which the {backend} backend cannot do: {detail}")]
    NoRemap { backend: &'static str, pairs: String, detail: String },
}

impl GpuError {
    /// The kind a wire protocol maps this error to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GpuError::NoBackend { .. } | GpuError::NoGpu { .. } => ErrorKind::Unavailable,
            GpuError::DriverTooOld { .. }
            | GpuError::HostMismatch { .. }
            | GpuError::NotCuda { .. }
            | GpuError::NoRemap { .. } => ErrorKind::FailedPrecondition,
            GpuError::Action { .. } => ErrorKind::Internal,
        }
    }
}

/// Which backend drives NVIDIA's checkpoint API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// The driver API when libcuda has it, else `cuda-checkpoint` when found (chosen at the first CUDA
    /// process met, so hosts without GPUs pay nothing).
    Auto,
    /// The `cuda-checkpoint` utility.
    CudaCheckpoint,
    /// libcuda's `cuCheckpointProcess*`.
    Driver,
    /// No GPU support: CUDA processes are dumped as they are (CRIU then fails on their device files).
    Off,
}

impl BackendChoice {
    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::CudaCheckpoint => "cuda-checkpoint",
            BackendChoice::Driver => "driver",
            BackendChoice::Off => "off",
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "cuda-checkpoint" => Ok(BackendChoice::CudaCheckpoint),
            "driver" => Ok(BackendChoice::Driver),
            "off" | "none" => Ok(BackendChoice::Off),
            other => Err(format!("unknown GPU backend {other:?}: use auto, cuda-checkpoint, driver or off")),
        }
    }
}

/// Default bound on locking a process (waiting for its submitted CUDA work).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The GPU settings an engine uses (from the `[gpu]` table of the configuration).
#[derive(Debug, Clone)]
pub struct GpuSettings {
    pub backend: BackendChoice,
    /// `cuda-checkpoint` (a path, or a name looked up in PATH).
    pub cuda_checkpoint: PathBuf,
    /// The CUDA driver library (a path, or a name for the dynamic loader).
    pub libcuda: PathBuf,
    /// `nvidia-smi` (a path, or a name looked up in PATH).
    pub nvidia_smi: PathBuf,
    /// Bound on locking each process.
    pub lock_timeout: Duration,
}

impl Default for GpuSettings {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            cuda_checkpoint: "cuda-checkpoint".into(),
            libcuda: "libcuda.so.1".into(),
            nvidia_smi: "nvidia-smi".into(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }
}

impl GpuSettings {
    /// The backend these settings choose, built now; `Ok(None)` when GPU support is off.
    pub fn build_backend(&self) -> Result<Option<Box<dyn GpuBackend>>, GpuError> {
        match self.backend {
            BackendChoice::Off => Ok(None),
            BackendChoice::CudaCheckpoint => Ok(Some(Box::new(utility::CudaCheckpoint::new(&self.cuda_checkpoint)?))),
            BackendChoice::Driver => Ok(Some(Box::new(driver::DriverApi::load(&self.libcuda)?))),
            BackendChoice::Auto => match driver::DriverApi::load(&self.libcuda) {
                Ok(api) => Ok(Some(Box::new(api))),
                Err(driver_err) => match utility::CudaCheckpoint::new(&self.cuda_checkpoint) {
                    Ok(tool) => Ok(Some(Box::new(tool))),
                    Err(tool_err) => Err(GpuError::NoBackend {
                        reason: format!(
                            "neither the CUDA driver API ({driver_err}) nor the cuda-checkpoint utility \
                             ({tool_err}) is usable"
                        ),
                    }),
                },
            },
        }
    }
}
