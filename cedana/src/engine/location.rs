//! Where a checkpoint goes and where one comes from, parsed once from what the user gave (`--dir`,
//! `--path`): a local folder or file, or an object-store URL (read and written with the `storage` feature,
//! refused without it); in-process writers (a pipe, an upload) take archives written without seeking.

use std::path::{Path, PathBuf};

use crate::engine::EngineError;

/// URL schemes of object stores.
const OBJECT_STORES: [&str; 3] = ["s3://", "gs://", "gcs://"];

/// Where a dump writes its checkpoint.
pub enum Destination {
    /// A local folder: the checkpoint is `DIR/NAME.<ext>` (or the folder `DIR/NAME` for `none`). A
    /// checkpoint of that name there already makes the dump fail (before anything is frozen).
    Dir(PathBuf),
    /// A local folder, as [`Destination::Dir`], where a checkpoint of the same name is replaced: atomically,
    /// once the new checkpoint is complete (an archive by a rename over the old file, a folder by exchanging
    /// the two). A dump that fails leaves the old checkpoint exactly as it was. Made by
    /// [`Destination::replacing`]; what an "overwrite" option of a front end maps to.
    DirReplacing(PathBuf),
    /// An object store (`s3://bucket/prefix`, `gs://...`).
    Url(String),
    /// Any writer, handed over by the caller (archives only; written front to back, never sought).
    Sink(std::sync::Mutex<Option<Box<dyn crate::checkpoint::sink::ArchiveSink>>>),
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Dir(d) => write!(f, "Dir({})", d.display()),
            Destination::DirReplacing(d) => write!(f, "DirReplacing({})", d.display()),
            Destination::Url(u) => write!(f, "Url({u})"),
            Destination::Sink(_) => f.write_str("Sink"),
        }
    }
}

impl Destination {
    /// Parse a `--dir` value: a URL of an object store, or a local folder.
    pub fn parse(s: &str) -> Self {
        if OBJECT_STORES.iter().any(|p| s.starts_with(p)) {
            return Destination::Url(s.to_string());
        }
        Destination::Dir(PathBuf::from(s))
    }

    /// A local folder.
    pub fn dir(dir: impl Into<PathBuf>) -> Self {
        Destination::Dir(dir.into())
    }

    /// The same destination, but a checkpoint of the same name found there is replaced instead of refused
    /// (see [`Destination::DirReplacing`]). Only local folders hold named checkpoints: other destinations are
    /// returned unchanged.
    pub fn replacing(self) -> Self {
        match self {
            Destination::Dir(d) => Destination::DirReplacing(d),
            other => other,
        }
    }

    /// Whether a checkpoint of the same name is replaced (else refused).
    pub fn replaces_existing(&self) -> bool {
        matches!(self, Destination::DirReplacing(_))
    }

    /// A caller's writer.
    pub fn sink(sink: Box<dyn crate::checkpoint::sink::ArchiveSink>) -> Self {
        Destination::Sink(std::sync::Mutex::new(Some(sink)))
    }

    /// The local folder, if this is one.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            Destination::Dir(d) | Destination::DirReplacing(d) => Some(d),
            _ => None,
        }
    }
}

/// Where a restore reads its checkpoint from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local checkpoint file or folder.
    Path(PathBuf),
    /// An object in an object store.
    Url(String),
}

impl Source {
    /// Parse a `--path` value.
    pub fn parse(s: &str) -> Self {
        if OBJECT_STORES.iter().any(|p| s.starts_with(p)) {
            return Source::Url(s.to_string());
        }
        Source::Path(PathBuf::from(s))
    }

    /// The local path, or the error saying that this source cannot be read yet.
    pub fn local(&self) -> Result<&Path, EngineError> {
        match self {
            Source::Path(p) => Ok(p),
            Source::Url(u) => Err(unsupported_url(u)),
        }
    }

    /// Read the one file `name` of this checkpoint, checked against its manifest (`None` when the manifest
    /// lists no such file): read only as far as that file locally, by ranged reads from an object store
    /// where the archive has an index (else downloaded into the scratch folder first). `config` supplies
    /// the object-store settings and the scratch folder.
    pub fn read_entry(&self, config: &crate::config::Config, name: &str) -> Result<Option<Vec<u8>>, EngineError> {
        match self {
            Source::Path(p) => Ok(crate::checkpoint::read_entry(p, name)?),
            #[cfg(feature = "storage")]
            Source::Url(u) => crate::engine::remote::read_entry(config, u, name),
            #[cfg(not(feature = "storage"))]
            Source::Url(u) => {
                let _ = config;
                Err(unsupported_url(u))
            }
        }
    }

    /// The checkpoint's manifest (not verified against the rest of the checkpoint).
    pub fn read_manifest(&self, config: &crate::config::Config) -> Result<crate::checkpoint::Manifest, EngineError> {
        match self {
            Source::Path(p) => Ok(crate::checkpoint::read_manifest(p, false)?),
            #[cfg(feature = "storage")]
            Source::Url(u) => crate::engine::remote::read_manifest(config, u),
            #[cfg(not(feature = "storage"))]
            Source::Url(u) => {
                let _ = config;
                Err(unsupported_url(u))
            }
        }
    }

    /// How to name it in messages.
    pub fn display(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Url(u) => u.clone(),
        }
    }
}

impl From<PathBuf> for Source {
    fn from(p: PathBuf) -> Self {
        Source::Path(p)
    }
}

pub(crate) fn unsupported_url(url: &str) -> EngineError {
    EngineError::Unsupported {
        what: "object storage".into(),
        detail: format!("{url} names an object store; use a local folder or file for now"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert!(matches!(Destination::parse("s3://b/p"), Destination::Url(_)));
        assert!(!Destination::parse("s3://b/p").replacing().replaces_existing(), "object stores hold no named files yet");
        let replacing = Destination::dir("/tmp/x").replacing();
        assert!(replacing.replaces_existing() && !Destination::dir("/tmp/x").replaces_existing());
        assert_eq!(replacing.local_dir(), Some(Path::new("/tmp/x")));
        assert_eq!(Destination::parse("/tmp/x").local_dir(), Some(Path::new("/tmp/x")));
        assert_eq!(Source::parse("relative/ckpt.tar"), Source::Path("relative/ckpt.tar".into()));
        let err = Source::parse("gs://b/o").local().unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Unimplemented);
    }
}
