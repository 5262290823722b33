//! Checkpoints in object stores (`s3://bucket/prefix`, `gs://bucket/prefix`): a dump uploads its archive
//! through an [`ObjectSink`](crate::storage::ObjectSink) (the object appears only once complete), a restore
//! streams an indexed archive to CRIU by ranged reads, or downloads one without an index first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::index::IndexedArchive;
use crate::checkpoint::{ArchiveSource, CheckpointWriter, Existing, OpenedCheckpoint};
use crate::codec::Compression;
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::storage::{self, ObjectUrl, StorageConfig};

/// Settings of the engine's object-store clients (credentials and endpoints from the standard environment).
fn config(engine: &Engine) -> StorageConfig {
    storage_config(engine.config())
}

/// Object-store settings under `config` (credentials and endpoints from the standard environment).
pub(crate) fn storage_config(config: &Config) -> StorageConfig {
    let mut s = StorageConfig::default();
    s.retry.stall_timeout = config.storage_stall_timeout();
    s.part_size = config.storage_part_size();
    s.max_in_flight = config.storage_max_in_flight();
    s
}

/// A writer that uploads checkpoint `name` under the prefix `url`.
pub(crate) fn writer(engine: &Engine, url: &str, name: &str, compression: Compression) -> Result<CheckpointWriter, EngineError> {
    let Some(ext) = compression.extension() else {
        return Err(EngineError::Unsupported {
            what: "a folder checkpoint in an object store".into(),
            detail: format!("{url} is an object store, which holds archives: use tar, gzip, lz4, zlib or zstd"),
        });
    };
    let object = ObjectUrl::parse(url)?.join(&format!("{name}.{ext}"))?;
    let sink = storage::open_sink_with(&object, &config(engine), Existing::Refuse)?;
    Ok(CheckpointWriter::to_sink(Box::new(sink), compression)?)
}

/// The size of the object at `url`, or 0 when it cannot be asked.
pub(crate) fn size(engine: &Engine, url: &Path) -> u64 {
    let Some(u) = url.to_str().and_then(|u| ObjectUrl::parse(u).ok()) else { return 0 };
    storage::size(&u, &config(engine)).unwrap_or(0)
}

/// A checkpoint in an object store, opened for a restore: streamed from the store through its index when
/// `stream` allows and it has one, else downloaded into the scratch folder (the returned path, deleted with
/// the guard) to be opened as a local file.
pub(crate) enum Remote {
    Streamed(Box<OpenedCheckpoint>),
    Downloaded(PathBuf, tempfile::TempDir),
}

pub(crate) fn open(engine: &Engine, url: &str, stream: bool, scratch: &Path) -> Result<Remote, EngineError> {
    let object = ObjectUrl::parse(url)?;
    let source = Arc::new(storage::open_source(&object, &config(engine))?);
    if stream {
        let shared: Arc<dyn ArchiveSource> = source.clone();
        // Only process checkpoints stream (a container's runtime runs CRIU on files).
        if let Some(opened) = OpenedCheckpoint::open_streamed_from(shared, Path::new(url), scratch)?
            .filter(|o| o.manifest.kind == crate::checkpoint::CheckpointKind::Process)
        {
            return Ok(Remote::Streamed(Box::new(opened)));
        }
    }
    let (path, dir) = download(scratch, url, &object, &source)?;
    Ok(Remote::Downloaded(path, dir))
}

/// A checkpoint in an object store opened for a lazy restore: an uncompressed archive, its small files read
/// by ranges now, its page images by ranges as the restored program needs them (see
/// [`crate::checkpoint::lazy`]).
pub(crate) fn open_lazy(engine: &Engine, url: &str) -> Result<OpenedCheckpoint, EngineError> {
    let object = ObjectUrl::parse(url)?;
    let source: Arc<dyn ArchiveSource> = Arc::new(storage::open_source(&object, &config(engine))?);
    Ok(crate::checkpoint::lazy::open_lazy_source(source, Path::new(url), &engine.scratch_dir())?)
}

/// Download the object into a new folder in the scratch folder (deleted with the returned guard).
fn download(
    scratch: &Path,
    url: &str,
    object: &ObjectUrl,
    source: &storage::ObjectSource,
) -> Result<(PathBuf, tempfile::TempDir), EngineError> {
    std::fs::create_dir_all(scratch).map_err(EngineError::io(format!("creating {}", scratch.display())))?;
    let dir = tempfile::Builder::new()
        .prefix(&crate::engine::leftovers::prefix(".cedana-download-"))
        .tempdir_in(scratch)
        .map_err(EngineError::io(format!("creating a folder in {}", scratch.display())))?;
    let path = dir.path().join(object.name());
    let mut reader = source.read_from(0).map_err(EngineError::io(format!("downloading {url}")))?;
    let mut file = std::fs::File::create(&path).map_err(EngineError::io(format!("creating {}", path.display())))?;
    std::io::copy(&mut reader, &mut file).map_err(EngineError::io(format!("downloading {url}")))?;
    Ok((path, dir))
}

/// The largest small-file section read through the index to get one file out of a remote checkpoint.
const MAX_ENTRY_TAIL: u64 = 1 << 30;

/// The manifest of the checkpoint at `url` (not verified against the rest): through the index of an indexed
/// archive by ranged reads, else by downloading it first.
pub(crate) fn read_manifest(config: &Config, url: &str) -> Result<crate::checkpoint::Manifest, EngineError> {
    let object = ObjectUrl::parse(url)?;
    let source = Arc::new(storage::open_source(&object, &storage_config(config))?);
    let shared: Arc<dyn ArchiveSource> = source.clone();
    if let Some(archive) = IndexedArchive::open(shared, MAX_ENTRY_TAIL)? {
        return Ok(archive.manifest().clone());
    }
    let (path, _dir) = download(&config.scratch_dir(), url, &object, &source)?;
    Ok(crate::checkpoint::read_manifest(&path, false)?)
}

/// Read the one file `name` of the checkpoint at `url`, checked against its manifest; `None` when the
/// manifest lists no such file. An indexed archive is read by ranged reads (its small files and the one
/// file); one without an index is downloaded first.
pub(crate) fn read_entry(config: &Config, url: &str, name: &str) -> Result<Option<Vec<u8>>, EngineError> {
    let object = ObjectUrl::parse(url)?;
    let source = Arc::new(storage::open_source(&object, &storage_config(config))?);
    let shared: Arc<dyn ArchiveSource> = source.clone();
    if let Some(archive) = IndexedArchive::open(shared, MAX_ENTRY_TAIL)? {
        if !archive.contains(name) {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        archive.copy_to(name, &mut bytes)?;
        return Ok(Some(bytes));
    }
    let (path, _dir) = download(&config.scratch_dir(), url, &object, &source)?;
    Ok(crate::checkpoint::read_entry(&path, name)?)
}
