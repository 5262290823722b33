//! Our lazy-pages handler, in place of CRIU's `lazy-pages` daemon: it listens on `lazy-pages.socket` in
//! the restore's work folder, takes each restored process's userfaultfd from `criu restore --lazy-pages`
//! ([`restorer`]), and fills the process's lazy memory straight from our checkpoint ([`PageStore`]):
//! first the pages the program faults on (each fault brings the block around it), then, once the restore
//! has finished, the rest in the background: first the blocks an earlier restore of the checkpoint saw the
//! program touch, in that order ([`order`]: recorded by each lazy restore), then on from where the program
//! last faulted (what it touches next is most likely near what it touched last) in growing chunks, until
//! the memory is wholly local; then it lets go of the userfaultfds, and nothing of the restore remains.
//!
//! A page that cannot be read (a store that stopped answering, a unit that does not decode) ends the
//! handler with an error while it still holds the userfaultfds: the caller kills the restored tree before
//! letting them go, so no thread of it ever sees the zero page the kernel would map instead.

pub mod kernel;
pub mod order;
pub mod ranges;
pub mod restorer;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kernel::{Event, Filled};
use order::PageOrder;
use prost::Message as _;
use ranges::{Missing, Run};

use crate::criu::pages::pagemap::{Pagemap, PAGE_SIZE};
use crate::criu::pages::PageStore;

/// Errors of the lazy-pages handler.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("{0}")]
    BadImage(String),
    #[error("the restore {0}")]
    Restore(String),
    #[error("the restored process {pid} needs its page at {vaddr:#x}, which the checkpoint does not hold")]
    NoSuchPages { pid: i32, vaddr: u64 },
    #[error("reading pages-{pages_id}.img at {offset}: {source}")]
    Read {
        pages_id: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("filling the memory of the restored process {pid}: {source}")]
    Fill {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("stopped before the restored memory was wholly local")]
    Stopped,
    #[error("lazy-pages handler: {0}")]
    Io(#[from] std::io::Error),
}

impl LazyError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            LazyError::BadImage(_) | LazyError::NoSuchPages { .. } => K::FailedPrecondition,
            LazyError::Read { source, .. } => K::of_io(source),
            LazyError::Stopped => K::Cancelled,
            _ => K::Internal,
        }
    }
}

/// The bytes behind a lazy restore: each process's pagemap (by PID), where the page images are, and the
/// images folder (for each process's `mm-<PID>.img`: the mappings its lazy pages lie in).
pub struct Pages {
    pub maps: HashMap<u64, Pagemap>,
    pub store: Arc<dyn PageStore>,
    pub images: PathBuf,
    /// Told the bytes copied in, as they are (a progress bar).
    pub advance: Option<crate::progress::Advancer>,
    /// The blocks to bring first in the background, in order (recorded by an earlier restore).
    pub order: PageOrder,
}

/// What the handler filled.
#[derive(Debug, Default, Clone)]
pub struct Transferred {
    /// Pages copied into the processes (on demand and in the background).
    pub pages: u64,
    /// Page faults the program waited on.
    pub faults: u64,
    /// Pages brought in the background by the given order ([`Pages::order`]).
    pub ordered: u64,
    /// The blocks the program faulted on, in order (a block again only when its fault had to be retried).
    pub touched: PageOrder,
}

/// A handler running on a thread of its own.
pub struct LazyHandler {
    thread: JoinHandle<Ended>,
    stop: OwnedFd,
    /// Asks for every page now ([`LazyHandler::fill_all`]); the answer comes on `filled`.
    fill: OwnedFd,
    filled: std::sync::mpsc::Receiver<()>,
}

/// How the handler's thread ended: on failure, with the userfaultfds it still holds.
struct Ended {
    result: Result<Transferred, LazyError>,
    held: Vec<OwnedFd>,
}

impl LazyHandler {
    /// Listen on socket `name` in `dir` (CRIU's restore connects to it) and serve `pages` on a thread of our
    /// own.
    pub fn listen(dir: &Path, name: &str, pages: Pages) -> Result<Self, LazyError> {
        let _ = std::fs::remove_file(dir.join(name));
        let listener = crate::criu::socket::bind_in(dir, name)?;
        let (stopped, stop) = pipe()?;
        let (fill_asked, fill) = pipe()?;
        let (answer, filled) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("lazy-pages".into()).spawn(move || {
            let mut session = Session::new(pages, stopped, fill_asked, answer);
            let result = session.run(listener);
            let held = match result {
                Ok(_) => Vec::new(),
                Err(_) => session.procs.drain(..).map(|p| p.uffd).collect(),
            };
            Ended { result, held }
        })?;
        Ok(Self { thread, stop, fill, filled })
    }

    /// Fill every page now, before the restored tree resumes (called while CRIU holds it at `post-restore`,
    /// when every process's userfaultfd has been sent): a normal restore whose memory comes through
    /// userfaultfd. Returns once the memory is wholly local.
    pub fn fill_all(&self) -> Result<(), LazyError> {
        // SAFETY: writes one byte from a live buffer to the pipe we own.
        unsafe { libc::write(self.fill.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        // A closed channel: the handler ended first, and its own error comes from `wait`/`stop`.
        self.filled.recv().map_err(|_| LazyError::Stopped)
    }

    /// Wait until the restored memory is wholly local. On failure the userfaultfds come back with the
    /// error: the caller kills the restored tree, then drops them.
    pub fn wait(self) -> (Result<Transferred, LazyError>, Vec<OwnedFd>) {
        // `self.stop` stays open until the thread is joined (its closing would read as a stop).
        match self.thread.join() {
            Ok(ended) => (ended.result, ended.held),
            Err(_) => (Err(LazyError::Io(std::io::Error::other("the lazy-pages handler panicked"))), Vec::new()),
        }
    }

    /// Stop now (the restore failed), and say why the handler had failed if it had.
    pub fn stop(self) -> Option<LazyError> {
        // SAFETY: writes one byte from a live buffer to the pipe we own.
        unsafe { libc::write(self.stop.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        match self.wait().0 {
            Err(LazyError::Stopped) | Ok(_) => None,
            Err(e) => Some(e),
        }
    }
}

/// One restored process.
struct Proc {
    /// Its PID at the dump (its images' name); a forked child keeps its parent's.
    pid: i32,
    uffd: OwnedFd,
    missing: Missing,
    /// Where the background transfer goes on.
    cursor: u64,
    gone: bool,
    /// Since when a fill found a missing page outside the process's registered memory: memory moved or
    /// unmapped, whose event is on its way (cleared by the next event).
    changing: Option<Instant>,
}

impl Proc {
    fn new(pid: i32, uffd: OwnedFd, missing: Missing, cursor: u64) -> Self {
        Self { pid, uffd, missing, cursor, gone: false, changing: None }
    }

    /// Stop serving this process: it exited (the kernel says so).
    fn set_gone(&mut self, why: &'static str) {
        tracing::debug!(pid = self.pid, why, missing_pages = self.missing.pages(), "a restored process is gone");
        self.gone = true;
    }

    /// Whether the background transfer may fill this process now.
    fn wants_pages(&self) -> bool {
        !self.gone && !self.missing.is_empty() && self.changing.is_none_or(|t| t.elapsed() >= UNMAPPED_GRACE)
    }

    /// Whether pages found outside the registered memory are past waiting for an event: unmapped for good.
    fn unmapped_for_good(&self) -> bool {
        self.changing.is_some_and(|t| t.elapsed() >= UNMAPPED_GRACE)
    }
}

/// The bytes fetched at a fault: the aligned block around it.
const FAULT_BLOCK: u64 = 64 << 10;
/// The most a block of a recorded order brings with it: the rest of its checksum chunk, which the page
/// store has read and decoded for it anyway.
const ORDER_CHUNK: u64 = crate::checkpoint::digest::CHUNK as u64;
/// Chunks of a recorded order fetched ahead of the one being copied, and how far ahead in the order the
/// handler looks for them.
const ORDER_AHEAD: usize = crate::checkpoint::lazy_store::READ_AHEAD;
const ORDER_LOOKAHEAD: usize = 64;
/// The background transfer's chunk right after a fault, and the most it grows to.
const FIRST_CHUNK: u64 = 256 << 10;
const MAX_CHUNK: u64 = 4 << 20;
/// How long missing pages found outside the process's registered memory wait for the event that says
/// where they went (`mremap`, `munmap`): since kernel 6.8 a fill that races with a move fails as "not
/// mapped" before the kernel says the memory is changing, and the event comes right after the move.
const UNMAPPED_GRACE: Duration = Duration::from_secs(2);
/// How often a handler waiting for such an event (or retrying a fault) looks again.
const RETRY_POLL_MS: i32 = 5;

struct Session {
    pages: Pages,
    stopped: OwnedFd,
    fill_asked: OwnedFd,
    answer: Option<std::sync::mpsc::Sender<()>>,
    /// Every page is wanted now (before the tree resumes).
    fill_now: bool,
    procs: Vec<Proc>,
    finished: bool,
    /// Faults whose page could not be filled yet (the process's memory was changing).
    pending: Vec<(usize, u64)>,
    chunk: u64,
    next: usize,
    buf: Vec<u8>,
    done: Transferred,
    /// What is left of [`Pages::order`].
    order: PageOrder,
    /// The process that faulted since the last chunk of the background transfer.
    after_fault: Option<usize>,
}

impl Session {
    fn new(mut pages: Pages, stopped: OwnedFd, fill_asked: OwnedFd, answer: std::sync::mpsc::Sender<()>) -> Self {
        let order = std::mem::take(&mut pages.order);
        Self {
            order,
            after_fault: None,
            pages,
            stopped,
            fill_asked,
            answer: Some(answer),
            fill_now: false,
            procs: Vec::new(),
            finished: false,
            pending: Vec::new(),
            chunk: FIRST_CHUNK,
            next: 0,
            buf: Vec::new(),
            done: Transferred::default(),
        }
    }

    fn run(&mut self, listener: UnixListener) -> Result<Transferred, LazyError> {
        if !self.wait_readable(listener.as_raw_fd())? {
            return Err(LazyError::Stopped);
        }
        let (client, _) = listener.accept()?;
        drop(listener);
        let mut client = Some(client);
        loop {
            let complete = self.procs.iter().all(|p| p.gone || p.missing.is_empty());
            if complete && (self.finished || (self.fill_now && self.answer.is_some())) {
                // Every page is in place: letting go of the userfaultfds ends the kernel's part.
                tracing::debug!(pages = self.done.pages, faults = self.done.faults, "the restored memory is wholly local");
                self.procs.clear();
                if let Some(answer) = self.answer.take().filter(|_| self.fill_now) {
                    let _ = answer.send(());
                }
                if self.finished {
                    return Ok(std::mem::take(&mut self.done));
                }
            }
            let transferring = self.finished || self.fill_now;
            let timeout = if transferring && self.procs.iter().any(Proc::wants_pages) {
                0
            } else if !self.pending.is_empty() || self.procs.iter().any(|p| p.changing.is_some()) {
                RETRY_POLL_MS
            } else {
                -1
            };
            let mut fds = vec![
                libc::pollfd { fd: self.stopped.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.fill_asked.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            if let Some(c) = &client {
                fds.push(libc::pollfd { fd: c.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            let first_proc = fds.len();
            let live: Vec<usize> = (0..self.procs.len()).filter(|&i| !self.procs[i].gone).collect();
            fds.extend(live.iter().map(|&i| libc::pollfd {
                fd: self.procs[i].uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            let n = poll(&mut fds, timeout)?;
            if fds[0].revents != 0 {
                return Err(LazyError::Stopped);
            }
            if fds[1].revents != 0 {
                let mut byte = [0u8; 1];
                // SAFETY: reads one byte into a live buffer from the pipe we own.
                unsafe { libc::read(self.fill_asked.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
                self.fill_now = true;
                // Every process's userfaultfd was sent before `post-restore`: take those still in the socket.
                while let Some(c) = client.as_mut().filter(|c| readable(c.as_raw_fd())) {
                    if !self.take_message(c)? {
                        client = None;
                    }
                }
            }
            if let Some(c) = client.as_mut().filter(|_| fds[2].revents != 0) {
                if !self.take_message(c)? {
                    client = None;
                }
            }
            for (k, &i) in live.iter().enumerate() {
                let revents = fds[first_proc + k].revents;
                if revents == 0 {
                    continue;
                }
                let mut any = false;
                while let Some(event) = kernel::read_event(self.procs[i].uffd.as_fd())
                    .map_err(|source| LazyError::Fill { pid: self.procs[i].pid, source })?
                {
                    any = true;
                    self.procs[i].changing = None;
                    self.handle(i, event)?;
                }
                if !any && revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                    self.procs[i].set_gone("its userfaultfd hung up");
                }
            }
            for (i, addr) in std::mem::take(&mut self.pending) {
                self.fault(i, addr)?;
            }
            if n == 0 && transferring {
                self.background()?;
            }
        }
    }

    /// Take one message of the restore; `false` when it closed the socket after it finished.
    fn take_message(&mut self, client: &mut UnixStream) -> Result<bool, LazyError> {
        match restorer::read_message(client).map_err(|e| LazyError::Restore(format!("sent what we cannot read: {e}")))? {
            Some(restorer::Message::Process { pid, uffd }) => {
                let missing = self.missing_of(pid)?;
                self.procs.push(Proc::new(pid, uffd, missing, 0));
            }
            Some(restorer::Message::Zombie) => {}
            Some(restorer::Message::Finished) => self.finished = true,
            None if self.finished => return Ok(false),
            None => return Err(LazyError::Restore("closed its socket before it finished".into())),
        }
        Ok(true)
    }

    /// Wait until `fd` is readable (`false`: stopped first).
    fn wait_readable(&self, fd: i32) -> Result<bool, LazyError> {
        let mut fds = [
            libc::pollfd { fd: self.stopped.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
        ];
        poll(&mut fds, -1)?;
        Ok(fds[0].revents == 0)
    }

    /// The lazy pages of the process `pid`: its pagemap's lazy runs, cut to its mappings.
    fn missing_of(&self, pid: i32) -> Result<Missing, LazyError> {
        let map = self
            .pages
            .maps
            .get(&(pid as u64))
            .ok_or_else(|| LazyError::BadImage(format!("the checkpoint holds no pagemap for the restored process {pid}")))?;
        let mm = self.pages.images.join(format!("mm-{pid}.img"));
        let vmas = read_vmas(&mm)?;
        let mut missing = Missing::default();
        for extent in map.extents.iter().filter(|e| e.lazy) {
            let (start, end) = (extent.vaddr, extent.vaddr + extent.len());
            for &(vs, ve) in vmas.iter().filter(|(vs, ve)| *vs < end && start < *ve) {
                missing.add(start.max(vs), end.min(ve));
            }
        }
        Ok(missing)
    }

    fn handle(&mut self, i: usize, event: Event) -> Result<(), LazyError> {
        match event {
            Event::PageFault { address } => {
                self.done.faults += 1;
                self.chunk = FIRST_CHUNK;
                self.fault(i, address & !(PAGE_SIZE - 1))
            }
            Event::Fork { uffd } => {
                let parent = &self.procs[i];
                tracing::debug!(pid = parent.pid, missing_pages = parent.missing.pages(), "a restored process forked");
                let child = Proc::new(parent.pid, uffd, parent.missing.clone(), parent.cursor);
                self.procs.push(child);
                Ok(())
            }
            Event::Remap { from, to, len } => {
                tracing::debug!(pid = self.procs[i].pid, from, to, len, "a restored process moved memory");
                self.procs[i].missing.remap(from, to, len);
                Ok(())
            }
            Event::Remove { start, end } => {
                let p = &mut self.procs[i];
                tracing::debug!(pid = p.pid, start, end, missing_pages = p.missing.pages(), "a restored process dropped memory");
                // From now on the range reads as zeros: the kernel handles its faults again.
                if !kernel::unregister(p.uffd.as_fd(), start, end - start)
                    .map_err(|source| LazyError::Fill { pid: p.pid, source })?
                {
                    p.set_gone("unregistering found no process");
                }
                p.missing.take(start, end);
                Ok(())
            }
            Event::Unmap { start, end } => {
                self.procs[i].missing.take(start, end);
                Ok(())
            }
        }
    }

    /// A thread of process `i` waits for the page at `addr`.
    fn fault(&mut self, i: usize, addr: u64) -> Result<(), LazyError> {
        let p = &self.procs[i];
        if p.gone {
            return Ok(());
        }
        let Some(run) = p.missing.find(addr) else {
            // Memory the checkpoint holds nothing for (never written before the dump): zeros.
            return match kernel::zero(p.uffd.as_fd(), addr, PAGE_SIZE).map_err(|source| LazyError::Fill { pid: p.pid, source })? {
                Filled::Retry(_) => {
                    self.pending.push((i, addr));
                    Ok(())
                }
                Filled::NoMapping(_) if !p.unmapped_for_good() => {
                    self.procs[i].changing.get_or_insert_with(Instant::now);
                    self.pending.push((i, addr));
                    Ok(())
                }
                Filled::Gone => {
                    self.procs[i].set_gone("a zero page found no process");
                    Ok(())
                }
                _ => Ok(()),
            };
        };
        let block = addr & !(FAULT_BLOCK - 1);
        self.done.touched.push(p.pid, block);
        self.after_fault = Some(i);
        let (from, to) = (run.start.max(block), run.end.min(block + FAULT_BLOCK));
        let filled = self.fill(i, Run { start: from, end: to, image: run.image + (from - run.start) })?;
        self.procs[i].cursor = to;
        if filled <= addr - from && !self.procs[i].gone && self.procs[i].missing.find(addr).is_some() {
            self.pending.push((i, addr));
        }
        Ok(())
    }

    /// One chunk of the background transfer: the next block of the given order still missing, on to the end of
    /// its checksum chunk (the unit the store reads and decodes at once) as far as the background's growing
    /// chunk goes, with the next chunks of the order fetched meanwhile; else from the next process in turn
    /// that misses pages.
    fn background(&mut self) -> Result<(), LazyError> {
        // Right after a fault, on from it first: a program that faulted where the order had not been yet
        // most likely goes on from there (a walk through its memory), whatever the order says next.
        if let Some(i) =
            self.after_fault.take().filter(|&i| !self.order.is_empty() && self.procs.get(i).is_some_and(Proc::wants_pages))
        {
            return self.on_from_cursor(i);
        }
        while let Some((pid, block)) = self.order.blocks.pop_front() {
            let Some((i, run)) = self.ordered_run(pid, block) else { continue };
            let (pages_id, offset) = self.locate(pid, run.image, PAGE_SIZE)?;
            let to_chunk_end = ORDER_CHUNK - offset % ORDER_CHUNK;
            let run = run.slice(run.start, run.end.min(run.start + to_chunk_end.min(self.chunk)));
            self.prefetch_order(pages_id, offset / ORDER_CHUNK);
            let filled = self.fill(i, run)?;
            self.procs[i].cursor = run.start + filled.max(PAGE_SIZE);
            self.chunk = (self.chunk * 2).min(MAX_CHUNK);
            self.done.ordered += filled / PAGE_SIZE;
            return Ok(());
        }
        let n = self.procs.len();
        let Some(i) = (0..n).map(|k| (self.next + k) % n).find(|&i| self.procs[i].wants_pages()) else {
            return Ok(());
        };
        self.next = (i + 1) % n;
        self.on_from_cursor(i)
    }

    /// One chunk of the background transfer into process `i`, on from its cursor.
    fn on_from_cursor(&mut self, i: usize) -> Result<(), LazyError> {
        let p = &self.procs[i];
        let Some(run) = p.missing.next_after(p.cursor, self.chunk) else {
            return Ok(());
        };
        let filled = self.fill(i, run)?;
        self.procs[i].cursor = run.start + filled.max(PAGE_SIZE);
        self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        Ok(())
    }

    /// The process that block `block` of a recorded order is for (the first of its PID at the dump: a forked
    /// child keeps its parent's), and the missing pages from the block's first missing one to the end of
    /// their run; `None` when none of the block is missing.
    fn ordered_run(&self, pid: i32, block: u64) -> Option<(usize, Run)> {
        let i = self.procs.iter().position(|p| p.pid == pid && p.wants_pages())?;
        let missing = &self.procs[i].missing;
        let end = block.saturating_add(FAULT_BLOCK);
        let first = missing.next_after(block, FAULT_BLOCK).filter(|r| r.start < end && r.end > block)?;
        let whole = missing.find(first.start)?;
        Some((i, whole.slice(first.start, whole.end)))
    }

    /// Have the store fetch the next [`ORDER_AHEAD`] chunks the order needs besides chunk `chunk` of
    /// `pages-<pages_id>.img`, while this one is copied.
    fn prefetch_order(&self, pages_id: u32, chunk: u64) {
        let mut asked: Vec<(u32, u64)> = vec![(pages_id, chunk)];
        for &(pid, block) in self.order.blocks.iter().take(ORDER_LOOKAHEAD) {
            if asked.len() > ORDER_AHEAD {
                break;
            }
            let Some((_, run)) = self.ordered_run(pid, block) else { continue };
            let Ok((id, offset)) = self.locate(pid, run.image, PAGE_SIZE) else { continue };
            if !asked.contains(&(id, offset / ORDER_CHUNK)) {
                asked.push((id, offset / ORDER_CHUNK));
                self.pages.store.prefetch(id, offset);
            }
        }
    }

    /// Copy `run` into process `i` from the checkpoint; how many bytes from its start are in place (the
    /// rest stays missing when the process's memory was changing).
    fn fill(&mut self, i: usize, run: Run) -> Result<u64, LazyError> {
        let len = run.end - run.start;
        let (pages_id, offset) = self.locate(self.procs[i].pid, run.image, len)?;
        let (store, buf, p) = (&self.pages.store, &mut self.buf, &mut self.procs[i]);
        let uffd = p.uffd.as_fd();
        let for_good = p.unmapped_for_good();
        // `at`: the bytes from the run's start dealt with; `copied`: those of them copied; `most`: the
        // longest copy to try (halved when a copy spans mappings the program split since the dump).
        let (mut at, mut copied, mut most, mut gone, mut unmapped, mut failed) = (0u64, 0u64, u64::MAX, false, false, None);
        // Pages passed over (there already, or unmapped for good).
        let mut skipped = 0u64;
        let mut each = |piece: &[u8]| -> bool {
            let (base, end) = (at, piece.len() as u64);
            let mut k = 0u64;
            while k < end {
                let len = (end - k).min(most);
                match kernel::copy(uffd, run.start + base + k, &piece[k as usize..(k + len) as usize]) {
                    Err(e) => failed = Some(e),
                    Ok(Filled::All) => {
                        copied += len;
                        k += len;
                        most = most.saturating_mul(2);
                        continue;
                    }
                    Ok(Filled::Retry(n)) if n > 0 => {
                        copied += n;
                        k += n;
                        continue;
                    }
                    Ok(Filled::Retry(_)) => {}
                    // A page there already: nothing to fill at it.
                    Ok(Filled::Exists(n)) => {
                        copied += n;
                        skipped += 1;
                        k = (k + n + PAGE_SIZE).min(end);
                        continue;
                    }
                    // Not all in one registered mapping: try less at once, down to the page.
                    Ok(Filled::NoMapping(n)) if len - n > PAGE_SIZE => {
                        copied += n;
                        k += n;
                        most = ((len - n) / 2) & !(PAGE_SIZE - 1);
                        continue;
                    }
                    // The page is in no registered mapping: unmapped for good, or moved (wait for the event).
                    Ok(Filled::NoMapping(n)) if for_good => {
                        copied += n;
                        skipped += 1;
                        k = (k + n + PAGE_SIZE).min(end);
                        continue;
                    }
                    Ok(Filled::NoMapping(n)) => {
                        copied += n;
                        k += n;
                        unmapped = true;
                    }
                    Ok(Filled::Gone) => gone = true,
                }
                at = base + k;
                return false;
            }
            at = base + end;
            true
        };
        store.each_piece(pages_id, offset, len as usize, buf, &mut each).map_err(|source| LazyError::Read {
            pages_id,
            offset,
            source,
        })?;
        if let Some(source) = failed {
            return Err(LazyError::Fill { pid: p.pid, source });
        }
        if gone {
            p.set_gone("a copy found no process");
            return Ok(0);
        }
        if skipped > 0 {
            tracing::debug!(pid = p.pid, start = run.start, skipped, "pages there already or unmapped were not filled");
        }
        if unmapped {
            p.changing.get_or_insert_with(Instant::now);
        }
        p.missing.take(run.start, run.start + at);
        self.done.pages += copied / PAGE_SIZE;
        if let Some(advance) = &self.pages.advance {
            advance(copied);
        }
        Ok(at)
    }

    /// Where the `len` bytes of process `pid`'s memory as dumped at `image` are: its pages image and the
    /// offset in it.
    fn locate(&self, pid: i32, image: u64, len: u64) -> Result<(u32, u64), LazyError> {
        let missing = || LazyError::NoSuchPages { pid, vaddr: image };
        let map = self.pages.maps.get(&(pid as u64)).ok_or_else(missing)?;
        let (extent, left) = map.find(image).ok_or_else(missing)?;
        if left * PAGE_SIZE < len {
            return Err(missing());
        }
        Ok((map.pages_id, extent.offset + (image - extent.vaddr)))
    }
}

/// Whether `fd` has something to read now.
fn readable(fd: i32) -> bool {
    let mut fds = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
    matches!(poll(&mut fds, 0), Ok(1))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> Result<(OwnedFd, OwnedFd), LazyError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn poll(fds: &mut [libc::pollfd], timeout: i32) -> Result<usize, LazyError> {
    loop {
        // SAFETY: poll reads and writes `fds.len()` pollfd entries of a live slice.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct VmaEntry {
    #[prost(uint64, required, tag = "1")]
    start: u64,
    #[prost(uint64, required, tag = "2")]
    end: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MmEntry {
    #[prost(message, repeated, tag = "14")]
    vmas: Vec<VmaEntry>,
}

/// The mappings `[start, end)` of CRIU's `mm-<PID>.img` (two magic words, then one length-prefixed
/// `mm_entry`).
fn read_vmas(path: &Path) -> Result<Vec<(u64, u64)>, LazyError> {
    let bad = |what: String| LazyError::BadImage(format!("{}: {what}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let len =
        bytes.get(8..12).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).ok_or_else(|| bad("truncated".into()))?;
    let body = bytes.get(12..12 + len).ok_or_else(|| bad("truncated".into()))?;
    let mm = MmEntry::decode(body).map_err(|e| bad(format!("not an mm image: {e}")))?;
    let mut vmas: Vec<(u64, u64)> = mm.vmas.iter().map(|v| (v.start, v.end)).collect();
    vmas.sort_unstable();
    Ok(vmas)
}
