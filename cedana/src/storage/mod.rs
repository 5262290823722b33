//! Checkpoint archives in object stores: Amazon S3 and S3-compatible stores (`s3://bucket/key`), Google
//! Cloud Storage (`gs://bucket/key`).
//!
//! - [`open_sink`]: an [`ObjectSink`], the [`ArchiveSink`](crate::checkpoint::ArchiveSink) the checkpoint
//!   writer uploads an archive through (a multipart upload in fixed-size parts, several in flight; the
//!   object appears only once finished);
//! - [`open_source`]: an [`ObjectSource`], the [`ArchiveSource`](crate::checkpoint::ArchiveSource) a restore
//!   reads an archive from, by byte range;
//! - [`exists`], [`size`], [`delete`], [`list`]: managing stored checkpoints.
//!
//! Credentials and endpoints come from the environment (the standard `AWS_*` and `GOOGLE_*` variables, see
//! [`config`]) unless [`StorageConfig`] sets them; URLs never carry credentials, and no message does.
//!
//! Everything here is synchronous: the object stores' async clients run on a small tokio runtime owned by
//! this module (two worker threads, created on first use), and each call waits for its result on the calling
//! thread. Call from ordinary threads (or `spawn_blocking`), not from inside an async task, where the wait
//! would hold up one of the caller's runtime workers.

pub mod config;
mod error;
pub mod journal;
pub mod parts;
mod runtime;
mod sink;
mod source;
mod url;

#[cfg(test)]
mod tests;

pub use config::{
    Credentials, RetrySettings, StorageConfig, DEFAULT_PART_SIZE, DEFAULT_READ_SEGMENT, MAX_PART_SIZE, MIN_PART_SIZE,
};
pub use error::StorageError;
pub use sink::ObjectSink;
pub use source::ObjectSource;
pub use url::{is_object_url, ObjectUrl, Scheme};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use crate::checkpoint::Existing;
use config::Store;

/// Start uploading an archive to `url` (an object, not a prefix); refused when an object is there already.
/// Contacts the store: checks the key is free and creates the multipart upload.
pub fn open_sink(url: &ObjectUrl, config: &StorageConfig) -> Result<ObjectSink, StorageError> {
    open_sink_with(url, config, Existing::Refuse)
}

/// Like [`open_sink`], doing `existing` about an object already at `url` ([`Existing::Replace`]: the old
/// object stays as it was until the new one is complete).
pub fn open_sink_with(url: &ObjectUrl, config: &StorageConfig, existing: Existing) -> Result<ObjectSink, StorageError> {
    ObjectSink::start(Store::connect(url, config)?, url, config, existing)
}

/// Open the archive at `url` for reading (one HEAD request: its size and version).
pub fn open_source(url: &ObjectUrl, config: &StorageConfig) -> Result<ObjectSource, StorageError> {
    ObjectSource::open(Store::connect(url, config)?, url, config)
}

/// Whether an object is at `url`.
pub fn exists(url: &ObjectUrl, config: &StorageConfig) -> Result<bool, StorageError> {
    match size(url, config) {
        Ok(_) => Ok(true),
        Err(StorageError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The size in bytes of the object at `url`.
pub fn size(url: &ObjectUrl, config: &StorageConfig) -> Result<u64, StorageError> {
    size_in(Store::connect(url, config)?, url)
}

/// Delete the object at `url` ([`StorageError::NotFound`] when there is none).
pub fn delete(url: &ObjectUrl, config: &StorageConfig) -> Result<(), StorageError> {
    delete_in(Store::connect(url, config)?, url)
}

/// The objects under the prefix `prefix` (`s3://bucket/checkpoints/`; a trailing `/` is implied: `ckpt`
/// lists `ckpt/a` but not `ckpt-old/a`), at any depth, with their sizes, sorted by key.
pub fn list(prefix: &ObjectUrl, config: &StorageConfig) -> Result<Vec<(ObjectUrl, u64)>, StorageError> {
    list_in(Store::connect(prefix, config)?, prefix)
}

fn size_in(store: Store, url: &ObjectUrl) -> Result<u64, StorageError> {
    let path = url.path()?;
    let u = url.to_string();
    runtime::run(async move {
        store.objects.head(&path).await.map(|m| m.size).map_err(|e| StorageError::from_store(&u, &e, &store.secrets))
    })
}

fn delete_in(store: Store, url: &ObjectUrl) -> Result<(), StorageError> {
    let path = url.path()?;
    let u = url.to_string();
    // S3 answers a delete of a missing key with success: look first, to say so.
    runtime::run(async move {
        let err = |e: object_store::Error| StorageError::from_store(&u, &e, &store.secrets);
        store.objects.head(&path).await.map_err(err)?;
        store.objects.delete(&path).await.map_err(err)?;
        tracing::info!(url = %u, "object deleted");
        Ok(())
    })
}

fn list_in(store: Store, prefix: &ObjectUrl) -> Result<Vec<(ObjectUrl, u64)>, StorageError> {
    let path = prefix.path()?;
    let u = prefix.to_string();
    let mut found = runtime::run(async move {
        let prefix = (!path.as_ref().is_empty()).then_some(path);
        let metas: Vec<_> = store
            .objects
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|e| StorageError::from_store(&u, &e, &store.secrets))?;
        Ok(metas.into_iter().map(|m| (m.location.to_string(), m.size)).collect::<Vec<_>>())
    })?;
    found.sort();
    Ok(found.into_iter().map(|(key, size)| (prefix.with_key(key), size)).collect())
}
