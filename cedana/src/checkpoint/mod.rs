//! Our checkpoint format: CRIU's images plus a manifest, as a folder or a (compressed) tar archive.
//!
//! Layout: the image files at the top level (and, for containers, a few files of ours), then `manifest.json`
//! last. In an archive, page images packed while CRIU wrote them come first (see [`live`]). A checkpoint is written under a temporary name and renamed into place when complete; a restore
//! verifies every file's checksum against the manifest before anything is restored.
//!
//! Readers treat an archive as hostile: only regular files under relative names, each once, held to the
//! sizes the manifest declares and within the scratch folder's free space, with no size field trusted for an
//! allocation (see `docs/fuzzing.md`, and `tar_guard.rs` for what the `tar` crate would buffer).

pub mod digest;
pub mod digest_job;
pub(crate) mod direct;
pub mod external;
pub mod index;
pub mod lazy;
pub mod lazy_store;
pub mod live;
pub mod manifest;
pub mod mounts;
pub mod reader;
pub mod release;
pub mod sink;
pub mod source;
pub mod tail;
pub(crate) mod tar_guard;
pub(crate) mod units_read;
pub mod writer;

pub use digest::FileDigest;
pub use external::{ExternalFile, FileRedirect, FileSelector};
pub use manifest::{CheckpointKind, ContainerInfo, Manifest, Placed, ProcessInfo, StdioPipe, FORMAT_VERSION, MANIFEST_NAME};
pub use mounts::{ExternalMount, MountedKind};
pub use reader::{read_entry, read_manifest, OpenedCheckpoint, PendingVerification};
pub use sink::{ArchiveSink, Existing, LocalFile, Stream, Unfinished};
pub use source::{ArchiveSource, LocalSource};
pub use units_read::UnitOut;
pub use writer::CheckpointWriter;

use std::path::PathBuf;

use crate::codec::CodecError;

/// Errors reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("{dir} is full (not even the {} MiB a checkpoint holds back for its last writes fit)", writer::COMMIT_RESERVE >> 20)]
    NoSpace { dir: PathBuf },
    #[error("{dir} has {free} bytes free, extracting the checkpoint needs {needed}: free space there or restore with another scratch folder")]
    ScratchFull { dir: PathBuf, needed: u64, free: u64 },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("no checkpoint at {path}: check the path")]
    NotFound { path: PathBuf },
    #[error("{path} is incomplete: it has no manifest (the dump that wrote it did not finish, or the file was cut short)")]
    Incomplete { path: PathBuf },
    #[error("{path} is corrupt: {detail}; it was not restored")]
    Corrupt { path: PathBuf, detail: String },
    /// Reading the checkpoint failed for a reason outside it (an object store that could not be reached):
    /// the message is the source's own, which names the place and what to do.
    #[error("{source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("packing page images while CRIU wrote them: {0}")]
    LivePacking(&'static str),
    #[error("CRIU's image stream: {0}")]
    Stream(String),
    #[error("external file {path}: {detail}")]
    ExternalFile { path: PathBuf, detail: String },
    #[error("mount {mountpoint} of the container: {detail}")]
    ExternalMount { mountpoint: String, detail: String },
    #[error("{path} uses checkpoint format {found}, this cedana reads format {expected}: use a matching cedana version")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("{path} is compressed ({compression}) in one piece: a lazy restore reads each page image by chunks, which needs a checkpoint written by this cedana version (any compression: none, tar, gzip, lz4, zlib or zstd)")]
    NotInPlace { path: PathBuf, compression: crate::codec::Compression },
}

impl CheckpointError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            CheckpointError::Io { source, .. } | CheckpointError::Source { source, .. } => K::of_io(source),
            CheckpointError::Codec(e) => e.kind(),
            CheckpointError::NoSpace { .. } | CheckpointError::ScratchFull { .. } => K::ResourceExhausted,
            CheckpointError::Exists { .. } => K::AlreadyExists,
            CheckpointError::NotFound { .. } => K::NotFound,
            CheckpointError::Incomplete { .. }
            | CheckpointError::Corrupt { .. }
            | CheckpointError::Version { .. }
            | CheckpointError::ExternalFile { .. }
            | CheckpointError::ExternalMount { .. } => K::FailedPrecondition,
            CheckpointError::LivePacking(_) | CheckpointError::Stream(_) => K::Internal,
            CheckpointError::NotInPlace { .. } => K::Unimplemented,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let path = path.into();
        move |source| CheckpointError::Io { path, source }
    }
}

/// Whether `name` is one of CRIU's page images (`pages-N.img`): nearly all of a checkpoint's bytes, written once,
/// front to back.
pub(crate) fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Files CRIU may add to an images folder at restore time; they are not part of the checkpoint.
pub(crate) const RESTORE_BYPRODUCTS: [&str; 2] = ["stats-restore", "restore.log"];

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod replace_tests;
#[cfg(test)]
mod sink_tests;
#[cfg(test)]
mod tests;
