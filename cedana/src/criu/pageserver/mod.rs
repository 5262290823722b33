//! Our page server for lazy restores: it speaks CRIU's page-server protocol (see [`protocol`]) to CRIU's
//! `lazy-pages` daemon on a socket handed to it (`criu lazy-pages --page-server --ps-socket FD`), and serves
//! the pages it asks for out of our checkpoint, located through the processes' pagemaps ([`pagemap`]) and
//! read through a [`PageStore`] (a page image in a folder, or in place in an uncompressed archive).
//!
//! The daemon asks first for the pages the restored program faults on, then for the rest in the background,
//! until every lazy page is in place; then it closes the session and exits.

pub mod pagemap;
pub mod protocol;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pagemap::{Pagemap, PAGE_SIZE};
use protocol::{Iov, IOV_SIZE, PE_PRESENT, PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE, PS_IOV_GET};

/// Errors of the page server.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("{0}")]
    BadImage(String),
    #[error("CRIU's lazy-pages daemon sent {0}")]
    Protocol(String),
    #[error("CRIU's lazy-pages daemon asked for pages of PID {pid} at {vaddr:#x}, which the checkpoint does not hold")]
    NoSuchPages { pid: u64, vaddr: u64 },
    #[error("the session with CRIU's lazy-pages daemon ended before it closed it")]
    Hangup,
    #[error("reading pages-{pages_id}.img at {offset}: {source}")]
    Read {
        pages_id: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to CRIU's lazy-pages daemon: {0}")]
    Io(#[from] std::io::Error),
}

impl PageServerError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            PageServerError::BadImage(_) | PageServerError::NoSuchPages { .. } => K::FailedPrecondition,
            PageServerError::Read { source, .. } => K::of_io(source),
            _ => K::Internal,
        }
    }
}

/// Where the bytes of the page images are.
pub trait PageStore: Send + Sync {
    /// Fill `buf` with the bytes of `pages-<pages_id>.img` from `offset` on.
    fn read_at(&self, pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// Write `len` bytes of `pages-<pages_id>.img` from `offset` on to `out`; by default through a buffer
    /// and [`PageStore::read_at`] (a read failure is returned before anything is written).
    fn send_to(&self, pages_id: u32, offset: u64, len: usize, out: &mut UnixStream, buf: &mut Vec<u8>) -> Result<(), SendError> {
        buf.resize(len, 0);
        self.read_at(pages_id, offset, buf).map_err(SendError::Read)?;
        out.write_all(buf).map_err(SendError::Write)
    }
}

/// Why [`PageStore::send_to`] failed.
#[derive(Debug)]
pub enum SendError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Page images in files: each at an offset of a file (a folder's `pages-N.img` at 0, or the entry's data in
/// an uncompressed archive).
pub struct FilePages {
    files: HashMap<u32, (Arc<std::fs::File>, u64)>,
}

impl FilePages {
    /// No page images yet.
    pub fn new() -> Self {
        Self { files: HashMap::new() }
    }

    /// `pages-<pages_id>.img` starts at `base` in `file`.
    pub fn insert(&mut self, pages_id: u32, file: Arc<std::fs::File>, base: u64) {
        self.files.insert(pages_id, (file, base));
    }
}

impl Default for FilePages {
    fn default() -> Self {
        Self::new()
    }
}

impl FilePages {
    fn file(&self, pages_id: u32) -> std::io::Result<&(Arc<std::fs::File>, u64)> {
        self.files
            .get(&pages_id)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no pages-{pages_id}.img")))
    }
}

impl PageStore for FilePages {
    fn read_at(&self, pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (file, base) = self.file(pages_id)?;
        file.read_exact_at(buf, base + offset)
    }

    /// The kernel copies the bytes from the file (its page cache) into the socket (`sendfile`).
    fn send_to(&self, pages_id: u32, offset: u64, len: usize, out: &mut UnixStream, _buf: &mut Vec<u8>) -> Result<(), SendError> {
        let (file, base) = self.file(pages_id).map_err(SendError::Read)?;
        let mut at = (base + offset) as libc::off_t;
        let mut left = len;
        while left > 0 {
            // SAFETY: both descriptors are open for the call (borrowed from live objects) and `at` is a
            // valid off_t the kernel advances.
            let n = unsafe { libc::sendfile(out.as_raw_fd(), file.as_raw_fd(), &mut at, left) };
            match n {
                n if n > 0 => left -= n as usize,
                0 => return Err(SendError::Read(std::io::ErrorKind::UnexpectedEof.into())),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    // Which side failed is not told apart by sendfile: a page image past its end reads as 0.
                    return Err(SendError::Write(e));
                }
            }
        }
        Ok(())
    }
}

/// What a session served.
#[derive(Debug, Default)]
pub struct Served {
    pub pages: AtomicU64,
}

/// The pagemaps of a restored tree, by virtual PID, and where their pages are.
pub struct PageServer {
    maps: HashMap<u64, Pagemap>,
    store: Arc<dyn PageStore>,
    served: Arc<Served>,
}

/// The most pages sent in one answer (CRIU's daemon asks for at most what it handles at once).
const MAX_PAGES_PER_ANSWER: u64 = 8192;

impl PageServer {
    pub fn new(maps: HashMap<u64, Pagemap>, store: Arc<dyn PageStore>) -> Self {
        Self { maps, store, served: Arc::default() }
    }

    /// Counters of what was served, shared with the session.
    pub fn served(&self) -> Arc<Served> {
        Arc::clone(&self.served)
    }

    /// Serve one session on `sock` until the daemon closes it; an error when it asks for what is not there,
    /// sends what the protocol does not have, or hangs up without closing.
    pub fn serve(&self, mut sock: UnixStream) -> Result<(), PageServerError> {
        let mut buf = Vec::new();
        loop {
            let mut raw = [0u8; IOV_SIZE];
            if !read_message(&mut sock, &mut raw)? {
                return Err(PageServerError::Hangup);
            }
            let iov = Iov::decode(&raw);
            match iov.cmd {
                PS_IOV_GET => self.answer(&mut sock, &iov, &mut buf)?,
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                    sock.write_all(&0i32.to_le_bytes())?;
                    return Ok(());
                }
                other => return Err(PageServerError::Protocol(format!("command {other:#x}, which a lazy restore does not use"))),
            }
        }
    }

    /// Answer a `PS_IOV_GET`: as many of the asked pages as one run of the pagemap holds from there.
    fn answer(&self, sock: &mut UnixStream, iov: &Iov, buf: &mut Vec<u8>) -> Result<(), PageServerError> {
        let missing = || PageServerError::NoSuchPages { pid: iov.dst_id, vaddr: iov.vaddr };
        let map = self.maps.get(&iov.dst_id).ok_or_else(missing)?;
        let (extent, left) = map.find(iov.vaddr).ok_or_else(missing)?;
        let nr_pages = iov.nr_pages.min(left).min(MAX_PAGES_PER_ANSWER);
        if nr_pages == 0 || !iov.vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(PageServerError::Protocol(format!("a request for {} pages at {:#x}", iov.nr_pages, iov.vaddr)));
        }
        let offset = extent.offset + (iov.vaddr - extent.vaddr);
        let head = Iov { cmd: PS_IOV_ADD_F, flags: PE_PRESENT, nr_pages, vaddr: iov.vaddr, dst_id: iov.dst_id };
        sock.write_all(&head.encode())?;
        self.store.send_to(map.pages_id, offset, (nr_pages * PAGE_SIZE) as usize, sock, buf).map_err(|e| match e {
            SendError::Read(source) => PageServerError::Read { pages_id: map.pages_id, offset, source },
            SendError::Write(e) => PageServerError::Io(e),
        })?;
        self.served.pages.fetch_add(nr_pages, Ordering::Relaxed);
        Ok(())
    }
}

/// Read one message; `false` when the peer closed the socket before its first byte.
fn read_message(sock: &mut UnixStream, raw: &mut [u8; IOV_SIZE]) -> Result<bool, PageServerError> {
    let mut got = 0;
    while got < raw.len() {
        match sock.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(PageServerError::Protocol(format!("a message cut short after {got} bytes"))),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}
