//! Targets: what can be checkpointed and restored. A target describes its workload (what the manifest
//! records), prepares it, runs CRIU (or the runtime that runs CRIU) with the pipeline's packaging step at the
//! moment every image is written and the workload is still frozen, and finishes or rolls back. The dump and
//! restore pipelines ([`super::dump`], [`super::restore`]) are the same for every target.
//!
//! Adding a target is a file here plus a line in [`dump_target`] and [`restore_target`].

mod pause_guard;
pub mod process;
pub mod runc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checkpoint::{CheckpointKind, ContainerInfo, OpenedCheckpoint, ProcessInfo};
use crate::criu::options::CriuOptions;
use crate::engine::context::OpContext;
use crate::engine::restore::{Gate, RestoreRequest};
use crate::engine::{Engine, EngineError};

/// What a front end asks to checkpoint.
#[derive(Debug, Clone)]
pub enum TargetSpec {
    /// A process tree by the PID of its root.
    Process { pid: i32 },
    /// A runc container (checkpointed through the runtime).
    Runc(runc::RuncSpec),
}

/// A prepared target: what the checkpoint will record, and the settled CRIU options.
pub(crate) struct Prepared {
    pub kind: CheckpointKind,
    /// Identifies the workload in default checkpoint names (a PID, a container id).
    pub id: String,
    pub container_id: Option<String>,
    pub process: ProcessInfo,
    pub container: Option<ContainerInfo>,
    /// The options CRIU runs with (the request's, plus what the target detected).
    pub options: CriuOptions,
    /// Options turned on after inspecting the workload.
    pub detected: Vec<&'static str>,
    /// Files of ours that go into the checkpoint beside CRIU's images.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// CRIU's work folder, when the caller chose one (else a temporary one, kept if CRIU fails).
    pub work_path: Option<PathBuf>,
}

/// What CRIU is asked to do.
pub(crate) struct CheckpointCall<'a> {
    pub images_dir: &'a Path,
    pub work_dir: &'a Path,
    pub options: &'a CriuOptions,
    pub leave_running: bool,
    /// CRIU streams the images to the engine (`--stream`) instead of writing files.
    pub stream: bool,
}

/// A dump target.
pub(crate) trait DumpTarget: Send {
    /// Inspect the workload and settle the options; nothing is changed yet.
    fn prepare(&mut self, engine: &Engine, options: &CriuOptions) -> Result<Prepared, EngineError>;

    /// Whether the workload still exists once CRIU is done (until [`DumpTarget::finish`]): then a failure
    /// afterwards can always give it back, and its images need not be kept.
    fn survives_criu(&self, leave_running: bool) -> bool;

    /// Whether CRIU can stream this target's images to the engine (we run CRIU ourselves; a runtime that
    /// runs it writes files).
    fn can_stream(&self) -> bool {
        false
    }

    /// Freeze the workload (if the target does it itself) and have CRIU write its images. Call `ready()` at
    /// the last moment before anything is frozen (CRIU's `pre-dump`; the `before-dump` hooks finish there,
    /// some of them having run beside CRIU's start-up): its `false` stops the dump with nothing changed. Call
    /// `frozen()` once every image is written and the workload is still frozen (or left running); its
    /// `false` fails the dump, and the workload must then be running as before.
    fn checkpoint(
        &mut self,
        engine: &Engine,
        call: &CheckpointCall<'_>,
        ready: &mut dyn FnMut() -> bool,
        frozen: &mut dyn FnMut() -> bool,
    ) -> Result<(), EngineError>;

    /// The checkpoint is complete: end the workload, unless it is left running.
    fn finish(&mut self, leave_running: bool) -> Result<(), EngineError>;

    /// The dump failed after [`DumpTarget::checkpoint`] began: give the workload back as it was, and return
    /// the error to report.
    fn roll_back(&mut self, cause: EngineError) -> EngineError;
}

/// A restored workload.
#[derive(Debug, Clone)]
pub struct Restored {
    /// PID of the restored root.
    pub pid: i32,
    /// The runtime's exit code, where it ran attached (runc restore without detach).
    pub exit_code: Option<i32>,
    /// Time CRIU (or the runtime) took, without its wait for the verification.
    pub criu_time: Duration,
    /// For a lazy restore: the transfer of the memory after the program started.
    pub lazy: Option<crate::engine::lazy::LazyTransfer>,
}

/// A restore target.
pub(crate) trait RestoreTarget: Send + Sync {
    /// Check what can be checked before the checkpoint is read (a free container id, a bundle).
    fn precheck(&self, engine: &Engine, req: &RestoreRequest) -> Result<(), EngineError>;

    /// Restore the workload. `gate.pass()` must be called (and must have returned `true`) before anything
    /// is restored: it waits for the checkpoint's verification and runs the `before-restore` hooks.
    fn restore(
        &self,
        engine: &Engine,
        ctx: &OpContext,
        req: &RestoreRequest,
        opened: &OpenedCheckpoint,
        gate: &mut Gate<'_>,
    ) -> Result<Restored, EngineError>;
}

/// The dump target for a spec.
pub(crate) fn dump_target(spec: &TargetSpec) -> Box<dyn DumpTarget> {
    match spec {
        TargetSpec::Process { pid } => Box::new(process::ProcessTarget::new(*pid)),
        TargetSpec::Runc(spec) => Box::new(runc::RuncTarget::new(spec.clone())),
    }
}

/// The restore target for a checkpoint kind.
pub(crate) fn restore_target(kind: CheckpointKind) -> Result<Box<dyn RestoreTarget>, EngineError> {
    match kind {
        CheckpointKind::Process => Ok(Box::new(process::ProcessRestore)),
        CheckpointKind::Runc => Ok(Box::new(runc::RuncRestore)),
        CheckpointKind::Containerd => Err(EngineError::Unsupported {
            what: "restoring containerd checkpoints".into(),
            detail: "this cedana has no containerd target yet".into(),
        }),
    }
}
