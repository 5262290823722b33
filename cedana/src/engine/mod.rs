//! The engine: the only code that checkpoints or restores. Front ends (CLI, runtime wrapper, shim) build a
//! request, call [`dump::dump`] or [`restore::restore`], and render the outcome.

pub mod dump;
pub mod hooks;
pub mod restore;
pub mod runc;

use std::path::PathBuf;

use crate::checkpoint::{CheckpointError, CheckpointKind};
use crate::criu::CriuError;
use crate::procfs::ProcError;
use crate::runc::RuncError;

pub use dump::{DumpOutcome, DumpRequest, DumpTarget};
pub use restore::{wait_for_exit, RestoreOutcome, RestoreRequest, RestoreStdio};
pub use runc::{RuncRestoreOutcome, RuncRestoreRequest, RuncTarget};

/// Errors of a dump or restore.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Process(#[from] ProcError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error(transparent)]
    Hook(#[from] hooks::HookError),
    #[error("{cause}\n  and resuming container {id} afterwards failed ({resume}): it is still paused; resume it with `runc --root {root} resume {id}`")]
    LeftPaused { id: String, root: PathBuf, cause: Box<EngineError>, resume: Box<RuncError> },
    #[error("PID {pid} holds established TCP connections ({conns}): dump with --tcp-established (the restore then needs the same addresses), or close them first")]
    NeedsTcpEstablished { pid: i32, conns: String },
    #[error("invalid checkpoint name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("interrupted: the dump was cancelled, the process was left running and no checkpoint was written")]
    Interrupted,
    #[error(
        "CRIU checkpointed PID {pid} and the process is gone, but finishing the checkpoint failed: {source}. \
         Nothing was deleted: CRIU's images are kept at {kept} (for a folder, `criu restore -D {kept}` restores them)"
    )]
    Unfinished {
        pid: i32,
        kept: std::path::PathBuf,
        #[source]
        source: crate::checkpoint::CheckpointError,
    },
    #[error("writing the checkpoint failed: {source}; the process was left running and nothing was written")]
    Package {
        #[source]
        source: CheckpointError,
    },
    #[error(
        "cannot restore: PID {pid} is in use by {comm}; CRIU restores processes under their original PIDs. \
             If the original is still running (dumped with --leave-running), stop it first"
    )]
    PidInUse { pid: i32, comm: String },
    #[error("{path} holds a {found} checkpoint: restore it with `cedana restore {found}`")]
    WrongKind { path: PathBuf, found: CheckpointKind },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let what = what.into();
        move |source| EngineError::Io { what, source }
    }
}
