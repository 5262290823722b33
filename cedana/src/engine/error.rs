//! Errors of the engine's operations. Each has a [`ErrorKind`] a wire protocol can map; messages say what
//! happened and what state things were left in, never which flag of which front end to use (front ends add
//! their own advice).

use std::path::PathBuf;

use crate::checkpoint::{CheckpointError, CheckpointKind};
use crate::criu::CriuError;
use crate::engine::hooks::HookError;
use crate::error::ErrorKind;
use crate::procfs::ProcError;
use crate::runc::RuncError;

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
    Hook(#[from] HookError),
    #[cfg(feature = "storage")]
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{cause}\n  and resuming container {id} afterwards failed ({resume}): it is still paused; resume it with `runc --root {root} resume {id}`")]
    LeftPaused { id: String, root: PathBuf, cause: Box<EngineError>, resume: Box<RuncError> },
    #[error("PID {pid} holds established TCP connections ({conns}): checkpointing them needs the tcp-established option (the restore then needs the same addresses), or close them first")]
    NeedsTcpEstablished { pid: i32, conns: String },
    #[error("invalid checkpoint name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("interrupted: the dump was cancelled, the workload was left running and no checkpoint was written")]
    Interrupted,
    #[error("interrupted: the restore was cancelled before anything was restored")]
    RestoreCancelled,
    #[error(
        "CRIU checkpointed PID {pid} and the process is gone, but finishing the checkpoint failed: {source}. \
         Nothing was deleted: CRIU's images are kept at {kept} (for a folder, `criu restore -D {kept}` restores them)"
    )]
    Unfinished {
        pid: i32,
        kept: PathBuf,
        #[source]
        source: CheckpointError,
    },
    #[error(
        "CRIU failed after it had written the checkpoint of PID {pid}, and may have ended the process ({cause}). \
         The checkpoint was completed and kept at {kept}: restore it if the process is gone"
    )]
    CriuFailedAfterDump { pid: i32, kept: PathBuf, cause: Box<EngineError> },
    #[error("writing the checkpoint failed: {source}; the workload was left running and nothing was written")]
    Package {
        #[source]
        source: CheckpointError,
    },
    #[error(
        "cannot restore: PID {pid} is in use by {comm}; CRIU restores processes under their original PIDs. \
             If the original is still running (dumped and left running), stop it first"
    )]
    PidInUse { pid: i32, comm: String },
    #[error("{path} holds a {found} checkpoint, not a {wanted} one")]
    WrongKind { path: PathBuf, found: CheckpointKind, wanted: CheckpointKind },
    #[error("restoring a {kind} checkpoint needs {what}")]
    MissingTarget { kind: CheckpointKind, what: &'static str },
    #[error("{what} is not supported yet: {detail}")]
    Unsupported { what: String, detail: String },
    #[error("a {kind} checkpoint cannot be restored lazily (only process and runc checkpoints can, so far)")]
    NotLazy { kind: CheckpointKind },
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

    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Process(e) => e.kind(),
            EngineError::Criu(e) => e.kind(),
            EngineError::Checkpoint(e) => e.kind(),
            EngineError::Runc(e) => e.kind(),
            EngineError::Hook(h) => match h.source.as_deref().and_then(|s| s.downcast_ref::<crate::gpu::GpuError>()) {
                Some(gpu) => gpu.kind(),
                None => ErrorKind::FailedPrecondition,
            },
            EngineError::LeftPaused { .. } | EngineError::Unfinished { .. } | EngineError::CriuFailedAfterDump { .. } => {
                ErrorKind::Internal
            }
            EngineError::NeedsTcpEstablished { .. } | EngineError::PidInUse { .. } => ErrorKind::FailedPrecondition,
            EngineError::BadName { .. } | EngineError::WrongKind { .. } | EngineError::MissingTarget { .. } => {
                ErrorKind::InvalidArgument
            }
            EngineError::Interrupted | EngineError::RestoreCancelled => ErrorKind::Cancelled,
            EngineError::Unsupported { .. } | EngineError::NotLazy { .. } => ErrorKind::Unimplemented,
            EngineError::Package { source } => source.kind(),
            #[cfg(feature = "storage")]
            EngineError::Storage(e) => e.kind(),
            EngineError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_cause() {
        let full = CheckpointError::NoSpace { dir: "/x".into() };
        assert_eq!(EngineError::Package { source: full }.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(EngineError::Interrupted.kind(), ErrorKind::Cancelled);
        assert_eq!(EngineError::from(ProcError::NoSuchProcess(7)).kind(), ErrorKind::NotFound);
        let exists = RuncError::Exists { id: "a".into(), root: "/r".into() };
        assert_eq!(EngineError::from(exists).kind(), ErrorKind::AlreadyExists);
        let missing = CriuError::NotFound { tried: "criu".into() };
        assert_eq!(EngineError::from(missing).kind(), ErrorKind::Unavailable);
        let text = EngineError::NeedsTcpEstablished { pid: 1, conns: "a".into() }.to_string();
        assert!(!text.contains("--"), "library messages name no CLI flags: {text}");
    }
}
