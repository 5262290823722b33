//! [`ObjectSource`]: an archive in an object store, read by byte range.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::ops::Range;

use bytes::{Buf, Bytes};
use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use tokio::task::JoinHandle;

use super::config::Store;
use super::url::ObjectUrl;
use super::{runtime, StorageConfig, StorageError};
use crate::checkpoint::ArchiveSource;

/// An archive in an object store, read with ranged GETs. Every read asks for the version that was there when
/// it was opened (its ETag): an object replaced or deleted meanwhile fails the read instead of mixing two
/// archives. [`ArchiveSource::read_from`] streams with a bounded read-ahead ([`StorageConfig::read_ahead`]
/// ranged GETs of [`StorageConfig::read_piece`] bytes in flight), never the whole object at once.
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
    /// The bytes of `range`, exactly.
    async fn range(self, range: Range<u64>) -> Result<Bytes, StorageError> {
        let mut opts = GetOptions::new().with_if_match(self.etag.clone());
        let want = range.end - range.start;
        opts.range = Some(GetRange::Bounded(range.clone()));
        let store = &self.store;
        let res = store.objects.get_opts(&self.path, opts).await;
        let got = match res {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = got.map_err(|e| StorageError::from_store(&self.url, &e, &store.secrets))?;
        if bytes.len() as u64 != want {
            let detail = format!(
                "asked for bytes {}..{}, got {}: the object is shorter than when it was opened",
                range.start,
                range.end,
                bytes.len()
            );
            return Err(StorageError::Other { url: self.url.clone(), detail });
        }
        Ok(bytes)
    }
}

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
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len).ok_or_else(|| self.eof(offset, buf.len()))?;
        // Large reads in pieces, several at once.
        let ranges: Vec<Range<u64>> =
            (offset..end).step_by(self.piece).map(|start| start..(start + self.piece as u64).min(end)).collect();
        let (fetch, ahead) = (self.fetch.clone(), self.ahead);
        let pieces = runtime::run(async move {
            futures::stream::iter(ranges).map(|r| fetch.clone().range(r)).buffered(ahead).try_collect::<Vec<Bytes>>().await
        })?;
        let mut at = 0;
        for p in pieces {
            buf[at..at + p.len()].copy_from_slice(&p);
            at += p.len();
        }
        Ok(())
    }

    fn read_from(&self, offset: u64) -> io::Result<Box<dyn Read + Send>> {
        let next = offset.min(self.len);
        Ok(Box::new(RangeStream {
            fetch: self.fetch.clone(),
            next,
            end: self.len,
            piece: self.piece as u64,
            ahead: self.ahead,
            pending: VecDeque::new(),
            current: Bytes::new(),
        }))
    }
}

/// The bytes from an offset to the end of an object, fetched in ranged GETs ahead of the reader.
struct RangeStream {
    fetch: Fetch,
    /// Where the next GET starts.
    next: u64,
    end: u64,
    piece: u64,
    ahead: usize,
    pending: VecDeque<JoinHandle<Result<Bytes, StorageError>>>,
    current: Bytes,
}

impl RangeStream {
    /// Keep `ahead` GETs in flight (fewer near the end).
    fn fill(&mut self) -> Result<(), StorageError> {
        while self.pending.len() < self.ahead && self.next < self.end {
            let range = self.next..(self.next + self.piece).min(self.end);
            self.next = range.end;
            self.pending.push_back(runtime::spawn(self.fetch.clone().range(range))?);
        }
        Ok(())
    }
}

impl Read for RangeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current.is_empty() || buf.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current[..n]);
                self.current.advance(n);
                return Ok(n);
            }
            self.fill()?;
            let Some(task) = self.pending.pop_front() else { return Ok(0) };
            self.current = runtime::wait(task)?;
            self.fill()?;
        }
    }
}

impl Drop for RangeStream {
    fn drop(&mut self) {
        for task in &self.pending {
            task.abort();
        }
    }
}

impl std::fmt::Debug for ObjectSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSource").field("url", &self.location).field("len", &self.len).finish_non_exhaustive()
    }
}
