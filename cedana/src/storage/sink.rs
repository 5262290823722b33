//! [`ObjectSink`]: an archive uploaded to an object store as a multipart upload, in fixed-size parts.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::multipart::PartId;
use object_store::{MultipartId, ObjectStoreExt, PutPayload};
use tokio::task::JoinHandle;

use super::config::Store;
use super::parts::PartBuffer;
use super::url::ObjectUrl;
use super::{runtime, StorageConfig, StorageError};
use crate::checkpoint::{ArchiveSink, CheckpointError, Existing, Unfinished};

/// The longest a failed upload waits for the store to abort it (the next start's journal sweep retries).
const ABORT_LIMIT: Duration = Duration::from_secs(5);

/// An archive uploaded to an object store as it is written: a multipart upload in parts of
/// [`StorageConfig::part_size`] (every part but the last full; the size doubles every thousand parts, see
/// [`super::parts::PartLayout`]), up to [`StorageConfig::max_in_flight`] of them uploading at once in the
/// background, each with object_store's retries and back-off.
///
/// The object appears only when [`ArchiveSink::finish`] completes the upload; until then nothing is visible
/// at its key. Parts holding a range announced with [`ArchiveSink::hold`] stay in memory until
/// [`ArchiveSink::patch`] releases them. Memory: about `part_size * (1 + max(max_in_flight, held parts + 1))`
/// (25 MiB with the defaults, for archives up to 4.9 GiB; twice that up to 14.6 GiB, and so on). Once an
/// upload fails, every later call returns that error. Aborted, or dropped unfinished, it aborts the upload: no
/// object, and no parts left stored.
///
/// Its calls block the calling thread until the network is done with them: call them from ordinary threads,
/// not from async tasks (see [`super`]).
pub struct ObjectSink {
    url: ObjectUrl,
    /// `url`, as `location()` returns it.
    location: PathBuf,
    store: Store,
    path: object_store::path::Path,
    upload: MultipartId,
    parts: PartBuffer,
    max_in_flight: usize,
    /// See [`super::RetrySettings::stall_timeout`].
    stall_timeout: Duration,
    in_flight: Vec<(usize, JoinHandle<Result<PartId, StorageError>>)>,
    /// Each part's upload says here that it ended (its index), so a writer waiting for a slot wakes at once.
    ended_tx: std::sync::mpsc::Sender<usize>,
    ended_rx: std::sync::mpsc::Receiver<usize>,
    /// Uploaded parts, by index.
    done: Vec<Option<PartId>>,
    existing: Existing,
    /// The first failure: every later call returns it.
    failed: Option<StorageError>,
    /// The last part was handed out: no more writes.
    sealed: bool,
    /// Completed or aborted: nothing to clean up.
    settled: bool,
    /// The local record of the upload in progress (see [`super::journal`]).
    record: super::journal::Record,
}

impl ObjectSink {
    /// Start a multipart upload at `url` (refused up front when an object is there and `existing` says
    /// refuse).
    pub(crate) fn start(store: Store, url: &ObjectUrl, config: &StorageConfig, existing: Existing) -> Result<Self, StorageError> {
        config.validate()?;
        if url.is_prefix() {
            let detail = "this names a folder (a prefix), not an object: add the checkpoint's name".to_string();
            return Err(StorageError::InvalidUrl { url: url.to_string(), detail });
        }
        let path = url.path()?;
        if existing == Existing::Refuse && head_exists(&store, url, &path)? {
            return Err(StorageError::AlreadyExists { url: url.to_string() });
        }
        let (mp, p, u, secrets) = (store.multipart.clone(), path.clone(), url.to_string(), store.secrets.clone());
        let upload =
            runtime::run(async move { mp.create_multipart(&p).await.map_err(|e| StorageError::from_store(&u, &e, &secrets)) })?;
        tracing::debug!(url = %url, part_size = config.part_size, "multipart upload started");
        let record = super::journal::Record::write(url, &upload);
        let (ended_tx, ended_rx) = std::sync::mpsc::channel();
        Ok(Self {
            location: PathBuf::from(url.to_string()),
            url: url.clone(),
            store,
            path,
            upload,
            parts: PartBuffer::new(config.part_size),
            max_in_flight: config.max_in_flight,
            stall_timeout: config.retry.stall_timeout,
            in_flight: Vec::new(),
            ended_tx,
            ended_rx,
            done: Vec::new(),
            existing,
            failed: None,
            sealed: false,
            settled: false,
            record,
        })
    }

    /// The object's URL.
    pub fn url(&self) -> &ObjectUrl {
        &self.url
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.parts.written()
    }

    /// Remember the first failure, and return it.
    fn fail(&mut self, e: StorageError) -> StorageError {
        if self.failed.is_none() {
            tracing::warn!(url = %self.url, error = %e, "upload failed");
            self.failed = Some(e);
        }
        self.failed.clone().unwrap_or_else(|| StorageError::Other { url: self.url.to_string(), detail: "upload failed".into() })
    }

    fn check(&self) -> Result<(), StorageError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Collect the uploads that ended, without waiting.
    fn reap(&mut self) -> Result<(), StorageError> {
        while let Some(i) = self.in_flight.iter().position(|(_, t)| t.is_finished()) {
            let (part, task) = self.in_flight.swap_remove(i);
            self.collect(part, task)?;
        }
        Ok(())
    }

    /// Wait until at most `limit` parts are uploading, recording those that end; fail (and stay failed)
    /// when none ends for the stall limit.
    fn wait_below(&mut self, limit: usize) -> Result<(), StorageError> {
        let mut deadline = Instant::now() + self.stall_timeout;
        loop {
            self.reap()?;
            if self.in_flight.len() <= limit {
                return Ok(());
            }
            match self.ended_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(part) => {
                    // Its task returns right after saying so (it may have been reaped already).
                    if let Some(i) = self.in_flight.iter().position(|(p, _)| *p == part) {
                        let (part, task) = self.in_flight.swap_remove(i);
                        self.collect(part, task)?;
                    }
                    deadline = Instant::now() + self.stall_timeout;
                }
                Err(_) => {
                    let e = StorageError::Stalled {
                        url: self.url.to_string(),
                        endpoint: self.store.secrets.endpoint(),
                        secs: self.stall_timeout.as_secs(),
                    };
                    return Err(self.fail(e));
                }
            }
        }
    }

    /// Wait for one part's upload and record it.
    fn collect(&mut self, part: usize, task: JoinHandle<Result<PartId, StorageError>>) -> Result<(), StorageError> {
        match runtime::wait(task) {
            Ok(id) => {
                if self.done.len() <= part {
                    self.done.resize(part + 1, None);
                }
                self.done[part] = Some(id);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Upload every part that is free to go, waiting for a slot when `max_in_flight` are uploading (fewer
    /// while parts are kept back, so that memory stays bounded).
    fn pump(&mut self) -> Result<(), StorageError> {
        self.reap()?;
        while let Some((part, data)) = self.parts.take_ready() {
            self.send(part, data)?;
        }
        Ok(())
    }

    /// What a task on the storage runtime needs to address this upload.
    fn upload_ref(&self) -> UploadRef {
        UploadRef { store: self.store.clone(), path: self.path.clone(), id: self.upload.clone(), url: self.url.to_string() }
    }

    fn send(&mut self, part: usize, data: Vec<u8>) -> Result<(), StorageError> {
        let slots = self.max_in_flight.saturating_sub(self.parts.kept()).max(1);
        self.wait_below(slots - 1)?;
        let u = self.upload_ref();
        let len = data.len();
        let ended = self.ended_tx.clone();
        let task = runtime::spawn(async move {
            let payload = PutPayload::from(Bytes::from(data));
            let put = u.store.multipart.put_part(&u.path, &u.id, part, payload).await.map_err(|e| u.error(&e));
            // The sink waits for this, or has gone (then nobody listens).
            let _ = ended.send(part);
            put
        })?;
        tracing::trace!(url = %self.url, part, len, "part upload started");
        self.in_flight.push((part, task));
        Ok(())
    }

    fn write_storage(&mut self, mut buf: &[u8]) -> Result<(), StorageError> {
        self.check()?;
        if self.sealed {
            return Err(StorageError::Usage { url: self.url.to_string(), detail: "write after the upload was finished".into() });
        }
        while !buf.is_empty() {
            if self.parts.room(buf.len()) == 0 {
                let detail = format!(
                    "the archive outgrew the {} parts an upload may have ({} bytes written, in parts of {} bytes now): raise storage.part_size_mib",
                    super::parts::MAX_PARTS,
                    self.parts.written(),
                    self.parts.part_size_now()
                );
                return Err(self.fail(StorageError::Usage { url: self.url.to_string(), detail }));
            }
            let n = self.parts.write(buf);
            buf = &buf[n..];
            self.pump()?;
        }
        Ok(())
    }

    /// Upload what remains, wait for every part, and complete the upload.
    fn complete(&mut self) -> Result<(), StorageError> {
        self.check()?;
        if !self.sealed {
            if self.parts.open_holds() > 0 {
                tracing::warn!(url = %self.url, holds = self.parts.open_holds(), "upload finished with ranges held but never patched");
            }
            if self.existing == Existing::Refuse && head_exists(&self.store, &self.url, &self.path)? {
                return Err(StorageError::AlreadyExists { url: self.url.to_string() });
            }
            self.sealed = true;
            for (part, data) in self.parts.finish() {
                self.send(part, data)?;
            }
        }
        self.wait_below(0)?;
        let total = self.parts.total_parts();
        let ids: Option<Vec<PartId>> = (0..total).map(|i| self.done.get(i).cloned().flatten()).collect();
        let Some(ids) = ids else {
            let detail = "a part is missing from the upload (lost track of it)".to_string();
            return Err(self.fail(StorageError::Other { url: self.url.to_string(), detail }));
        };
        let u = self.upload_ref();
        // Not sticky: completing can be tried again (every part is uploaded).
        runtime::run(async move { u.store.multipart.complete_multipart(&u.path, &u.id, ids).await.map_err(|e| u.error(&e)) })?;
        self.settled = true;
        self.record.settle();
        tracing::info!(url = %self.url, bytes = self.parts.written(), parts = total, "upload complete");
        Ok(())
    }

    /// Stop the part uploads and abort the multipart upload: the store drops the parts it has.
    fn abort_upload(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        for (_, task) in &self.in_flight {
            task.abort();
        }
        for (_, task) in std::mem::take(&mut self.in_flight) {
            let _ = runtime::wait(task);
        }
        let u = self.upload_ref();
        // Briefly: a store that stopped answering must not hold up the failure (and the workload a dump
        // keeps frozen); the journal's record lets the next start abort it instead.
        let (limit, endpoint) = (self.stall_timeout.min(ABORT_LIMIT), self.store.secrets.endpoint());
        let aborted = runtime::run(async move {
            match tokio::time::timeout(limit, u.store.multipart.abort_multipart(&u.path, &u.id)).await {
                Ok(done) => done.map_err(|e| u.error(&e)),
                Err(_) => Err(StorageError::Stalled { url: u.url.clone(), endpoint, secs: limit.as_secs() }),
            }
        });
        match aborted {
            Ok(()) => {
                self.record.settle();
                tracing::debug!(url = %self.url, "multipart upload aborted")
            }
            Err(error) => tracing::warn!(
                url = %self.url, %error,
                "could not abort the multipart upload: the next start of cedana aborts it (else its parts stay stored, and billed, until a lifecycle rule removes them)"
            ),
        }
    }

    fn checkpoint_error(&self, e: StorageError) -> CheckpointError {
        match e {
            StorageError::AlreadyExists { .. } => CheckpointError::Exists { path: self.location.clone() },
            e => CheckpointError::Io { path: self.location.clone(), source: e.into() },
        }
    }
}

/// Whether an object is at `path` now.
fn head_exists(store: &Store, url: &ObjectUrl, path: &object_store::path::Path) -> Result<bool, StorageError> {
    let (objects, p, u, secrets) = (store.objects.clone(), path.clone(), url.to_string(), store.secrets.clone());
    runtime::run(async move {
        match objects.head(&p).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StorageError::from_store(&u, &e, &secrets)),
        }
    })
}

impl Write for ObjectSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_storage(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Ok(self.write_storage(buf)?)
    }

    /// Reports a failed upload; parts go out as they fill, not on flush.
    fn flush(&mut self) -> io::Result<()> {
        self.reap()?;
        Ok(self.check()?)
    }
}

impl ArchiveSink for ObjectSink {
    fn location(&self) -> &Path {
        &self.location
    }

    fn patchable(&self) -> bool {
        true
    }

    fn drains_slowly(&self) -> bool {
        true
    }

    fn hold(&mut self, at: u64) {
        self.parts.hold(at);
    }

    fn patch(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        if let Err(e) = self.parts.patch(at, bytes) {
            return Err(StorageError::Usage { url: self.url.to_string(), detail: e.to_string() }.into());
        }
        Ok(self.pump()?)
    }

    fn finish(mut self: Box<Self>) -> Result<PathBuf, Unfinished> {
        match self.complete() {
            Ok(()) => Ok(self.location.clone()),
            Err(e) => {
                let error = self.checkpoint_error(e);
                Err(Unfinished { sink: self, error })
            }
        }
    }

    fn abort(mut self: Box<Self>, keep: bool) {
        if keep {
            tracing::warn!(url = %self.url, "an unfinished upload cannot be kept in an object store: aborting it");
        }
        self.abort_upload();
    }
}

impl Drop for ObjectSink {
    fn drop(&mut self) {
        self.abort_upload();
    }
}

impl std::fmt::Debug for ObjectSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSink")
            .field("url", &self.url.to_string())
            .field("written", &self.parts.written())
            .finish_non_exhaustive()
    }
}

/// This upload, owned, for a task on the storage runtime.
struct UploadRef {
    store: Store,
    path: object_store::path::Path,
    id: MultipartId,
    url: String,
}

impl UploadRef {
    fn error(&self, e: &object_store::Error) -> StorageError {
        StorageError::from_store(&self.url, e, &self.store.secrets)
    }
}
