//! The `cuda-checkpoint` utility as a [`GpuBackend`]: `--action lock|checkpoint|restore|unlock --pid P
//! [--timeout MS]` and `--get-state --pid P`, one run per call. It needs a driver of r570 or newer (the
//! `--action` flag; r550's utility only toggles), checked once when the backend is built.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::backend::{Action, CudaState, GpuBackend};
use super::GpuError;

/// `cuda-checkpoint` at a known path.
pub struct CudaCheckpoint {
    binary: PathBuf,
}

impl CudaCheckpoint {
    /// Use the utility at `binary` (a path, or a name looked up in `PATH`), after checking that it has
    /// `--action` (driver r570+).
    pub fn new(binary: &Path) -> Result<Self, GpuError> {
        let binary = crate::binary::find(binary)
            .ok_or_else(|| GpuError::NoBackend { reason: format!("{} was not found", binary.display()) })?;
        let help = Command::new(&binary)
            .arg("--help")
            .output()
            .map_err(|e| GpuError::NoBackend { reason: format!("cannot run {}: {e}", binary.display()) })?;
        let text = String::from_utf8_lossy(&help.stdout) + String::from_utf8_lossy(&help.stderr);
        if !text.contains("--action") {
            return Err(GpuError::DriverTooOld {
                detail: format!("{} has no --action (lock/checkpoint/restore/unlock)", binary.display()),
            });
        }
        Ok(Self { binary })
    }

    fn run(&self, args: &[String]) -> Result<String, (String, Option<i32>)> {
        let out = Command::new(&self.binary).args(args).output().map_err(|e| (e.to_string(), None))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.is_empty() {
            msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err((format!("{} ({})", msg, out.status), out.status.code()))
    }
}

impl GpuBackend for CudaCheckpoint {
    fn name(&self) -> &'static str {
        "cuda-checkpoint"
    }

    fn state(&self, pid: i32) -> Result<CudaState, GpuError> {
        let out = self
            .run(&["--get-state".into(), "--pid".into(), pid.to_string()])
            .map_err(|(message, _)| GpuError::NotCuda { pid, detail: message })?;
        CudaState::parse(&out).ok_or_else(|| GpuError::Action {
            pid,
            action: "get-state",
            message: format!("{} printed {:?}, not a CUDA state", self.binary.display(), out.trim()),
        })
    }

    fn can_remap(&self, pairs: &[super::GpuPair]) -> Result<(), GpuError> {
        Err(GpuError::NoRemap {
            backend: self.name(),
            pairs: super::backend::describe_pairs(pairs),
            detail: "NVIDIA's cuda-checkpoint utility has no option for it (its r570 help lists only --get-state, \
                     --action, --toggle, --get-restore-tid, --pid and --timeout); the driver backend (gpu.backend = \
                     \"driver\") passes GPU pairs to cuCheckpointProcessRestore"
                .into(),
        })
    }

    fn act(&self, pid: i32, action: Action, timeout: Option<Duration>) -> Result<(), GpuError> {
        let mut args = vec!["--action".to_string(), action.name().into(), "--pid".into(), pid.to_string()];
        if let Some(t) = timeout.filter(|_| action == Action::Lock) {
            args.extend(["--timeout".into(), t.as_millis().max(1).to_string()]);
        }
        self.run(&args).map(drop).map_err(|(message, _)| GpuError::Action { pid, action: action.name(), message })
    }
}
