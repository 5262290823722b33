//! [`ObjectSource`]: an archive in an object store, read by byte range.

use std::io::{self, Read};
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::config::Store;
use super::url::ObjectUrl;
use super::{runtime, StorageConfig, StorageError};
use crate::checkpoint::ArchiveSource;

/// An archive in an object store, read with ranged GETs. Every read asks for the version that was there when
/// it was opened (its ETag): an object replaced or deleted meanwhile fails the read instead of mixing two
/// archives. [`ArchiveSource::read_exact_at`] splits a large read into GETs of [`StorageConfig::read_piece`]
/// bytes, [`StorageConfig::read_ahead`] of them at once. [`ArchiveSource::read_from`] streams GET bodies
/// (one per [`StorageConfig::read_segment`] bytes) with a bounded read-ahead of `read_ahead * read_piece`
/// bytes: never the whole object in memory. Several streams can be read at once.
///
/// Its calls block the calling thread until the network is done with them: call them from ordinary threads,
/// not from async tasks (see [`super`]).
pub struct ObjectSource {
    url: ObjectUrl,
    location: String,
    fetch: Fetch,
    len: u64,
    piece: usize,
    ahead: usize,
    segment: u64,
}

/// What a ranged GET needs, cheap to clone into a task.
#[derive(Clone)]
struct Fetch {
    store: Store,
    path: object_store::path::Path,
    url: String,
    etag: Option<String>,
}

impl Fetch {
    /// The body of `range`, as it arrives.
    async fn body(&self, range: Range<u64>) -> Result<BoxStream<'static, object_store::Result<Bytes>>, StorageError> {
        let mut opts = GetOptions::new().with_if_match(self.etag.clone());
        opts.range = Some(GetRange::Bounded(range));
        match self.store.objects.get_opts(&self.path, opts).await {
            Ok(r) => Ok(r.into_stream()),
            Err(e) => Err(StorageError::from_store(&self.url, &e, &self.store.secrets)),
        }
    }

    /// Send the body of `range` into `tx` as it arrives, each piece with its offset from `base`; exactly the
    /// range's bytes, or an error (a body longer or shorter than asked for: the object changed).
    async fn send_range(self, range: Range<u64>, base: u64, tx: mpsc::Sender<Piece>) -> Result<(), StorageError> {
        let mut body = self.body(range.clone()).await?;
        let mut pos = range.start;
        while let Some(item) = body.next().await {
            let bytes = item.map_err(|e| StorageError::from_store(&self.url, &e, &self.store.secrets))?;
            if pos + bytes.len() as u64 > range.end {
                return Err(self.changed(&range, "went on past its end"));
            }
            let at = (pos - base) as usize;
            pos += bytes.len() as u64;
            if tx.send((at, bytes)).await.is_err() {
                return Ok(()); // the reader gave up
            }
        }
        if pos != range.end {
            return Err(self.changed(&range, &format!("ended at {pos}")));
        }
        Ok(())
    }

    fn changed(&self, range: &Range<u64>, what: &str) -> StorageError {
        let detail =
            format!("the body of bytes {}..{} {what}: the object is not what it was when it was opened", range.start, range.end);
        StorageError::Other { url: self.url.clone(), detail }
    }
}

/// Bytes of a ranged read, with their place in the caller's buffer.
type Piece = (usize, Bytes);

/// Body pieces of a ranged read waiting to be copied, at most (each holds on to the HTTP client's buffer it
/// came in; the copy is quick, so a few are slack enough).
const PIECES_WAITING: usize = 2;

impl ObjectSource {
    /// Open the object at `url`: one HEAD for its size and version.
    pub(crate) fn open(store: Store, url: &ObjectUrl, config: &StorageConfig) -> Result<Self, StorageError> {
        config.validate()?;
        let path = url.path()?;
        let (objects, p, u, secrets) = (store.objects.clone(), path.clone(), url.to_string(), store.secrets.clone());
        let meta = runtime::run(async move { objects.head(&p).await.map_err(|e| StorageError::from_store(&u, &e, &secrets)) })?;
        Ok(Self {
            location: url.to_string(),
            url: url.clone(),
            fetch: Fetch { store, path, url: url.to_string(), etag: meta.e_tag },
            len: meta.size,
            piece: config.read_piece,
            ahead: config.read_ahead,
            segment: config.read_segment,
        })
    }

    /// The object's URL.
    pub fn url(&self) -> &ObjectUrl {
        &self.url
    }

    fn eof(&self, offset: u64, len: usize) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{}: bytes {offset}..{} asked for, the object has {}", self.location, offset + len as u64, self.len),
        )
    }

    /// `len` bytes from `offset` as the ranges of one GET each ([`StorageConfig::read_piece`] bytes, the last
    /// shorter); an error if the object ends before.
    fn ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len).ok_or_else(|| self.eof(offset, len as usize))?;
        Ok((offset..end).step_by(self.piece).map(|start| start..(start + self.piece as u64).min(end)).collect())
    }

    /// [`ArchiveSource::read_in_pieces`]: GETs of [`StorageConfig::read_piece`] bytes one after another, each
    /// body's pieces handed on as they arrive (at most [`PIECES_WAITING`] of them waiting).
    fn pieces_to(&self, offset: u64, len: u64, each: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let ranges = self.ranges(offset, len)?;
        if ranges.is_empty() {
            return Ok(());
        }
        let fetch = self.fetch.clone();
        let (tx, mut rx) = mpsc::channel::<Piece>(PIECES_WAITING);
        let task = runtime::spawn(async move {
            for range in ranges {
                if tx.is_closed() {
                    break; // the reader stopped
                }
                fetch.clone().send_range(range, offset, tx.clone()).await?;
            }
            Ok::<(), StorageError>(())
        })?;
        let mut handed = 0usize;
        let mut failed = None;
        // Not tokio's blocking receive: it refuses to run on a thread that is inside a runtime.
        while let Some((at, bytes)) = futures::executor::block_on(rx.recv()) {
            // The ranges go in order and each body's pieces come in order: a gap is a bug, not the network.
            debug_assert_eq!(at, handed, "pieces of a range arrive in order");
            handed += bytes.len();
            if let Err(e) = each(&bytes) {
                failed = Some(e);
                break;
            }
        }
        drop(rx); // a task still sending stops at its next piece
        let fetched = runtime::wait(task);
        if let Some(e) = failed {
            return Err(e);
        }
        fetched?;
        Ok(())
    }
}

impl ArchiveSource for ObjectSource {
    fn location(&self) -> &str {
        &self.location
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // Large reads in pieces, several at once; the bodies are copied into `buf` as they arrive (no copy
        // of a whole piece in between, no piece-sized allocation on the runtime's threads).
        let ranges = self.ranges(offset, buf.len() as u64)?;
        let (fetch, ahead) = (self.fetch.clone(), self.ahead);
        let (tx, mut rx) = mpsc::channel::<Piece>(PIECES_WAITING);
        let task = runtime::spawn(async move {
            futures::stream::iter(ranges)
                .map(|r| fetch.clone().send_range(r, offset, tx.clone()))
                .buffer_unordered(ahead)
                .try_collect::<Vec<()>>()
                .await
                .map(|_| ())
        })?;
        // Not tokio's blocking receive: it refuses to run on a thread that is inside a runtime.
        while let Some((at, bytes)) = futures::executor::block_on(rx.recv()) {
            // In bounds: each body was checked against its range, and the ranges cover `buf`.
            buf[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        // The channel closed: every body ended, or one failed (its error is the task's).
        runtime::wait(task)?;
        Ok(())
    }

    fn read_in_pieces(&self, offset: u64, len: u64, each: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Option<io::Result<()>> {
        Some(self.pieces_to(offset, len, each))
    }

    fn read_from(&self, offset: u64) -> io::Result<Box<dyn Read + Send>> {
        let start = offset.min(self.len);
        let (tx, rx) = mpsc::channel((self.ahead * self.piece / CHUNK).max(1));
        let task = runtime::spawn(produce(self.fetch.clone(), start, self.len, self.segment, tx))?;
        Ok(Box::new(BodyStream { rx, current: Bytes::new(), task, done: false }))
    }
}

/// The granularity of a stream's read-ahead buffer.
const CHUNK: usize = 1 << 20;

/// Stream `start..end` of the object into `tx` in chunks of [`CHUNK`] bytes: one GET per segment, its body
/// read as it arrives (object_store resumes a body cut short, checking the ETag). Waits while the channel is
/// full, which bounds the read-ahead. Ends at the end (the channel closes), at the first error (sent), or
/// when the reader goes away.
async fn produce(fetch: Fetch, mut pos: u64, end: u64, segment: u64, tx: mpsc::Sender<Result<Bytes, StorageError>>) {
    while pos < end {
        let range = pos..(pos + segment).min(end);
        let mut body = match fetch.body(range.clone()).await {
            Ok(body) => body,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut buf = BytesMut::with_capacity(CHUNK);
        while let Some(item) = body.next().await {
            let bytes = match item {
                Ok(bytes) => bytes,
                Err(e) => {
                    let _ = tx.send(Err(StorageError::from_store(&fetch.url, &e, &fetch.store.secrets))).await;
                    return;
                }
            };
            pos += bytes.len() as u64;
            buf.extend_from_slice(&bytes);
            if buf.len() >= CHUNK {
                let full = std::mem::replace(&mut buf, BytesMut::with_capacity(CHUNK));
                if tx.send(Ok(full.freeze())).await.is_err() {
                    return;
                }
            }
        }
        if !buf.is_empty() && tx.send(Ok(buf.freeze())).await.is_err() {
            return;
        }
        if pos != range.end {
            let detail = format!(
                "the body of bytes {}..{} ended at {pos}: the object is shorter than when it was opened",
                range.start, range.end
            );
            let _ = tx.send(Err(StorageError::Other { url: fetch.url.clone(), detail })).await;
            return;
        }
    }
}

/// The bytes from an offset to the end of an object, as [`produce`] delivers them.
struct BodyStream {
    rx: mpsc::Receiver<Result<Bytes, StorageError>>,
    current: Bytes,
    task: JoinHandle<()>,
    /// The stream ended or failed: nothing more comes.
    done: bool,
}

impl Read for BodyStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() && !buf.is_empty() && !self.done {
            match futures::executor::block_on(self.rx.recv()) {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(e.into());
                }
                None => self.done = true,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for ObjectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSource").field("url", &self.location).field("len", &self.len).finish_non_exhaustive()
    }
}
