//! The I/O hub of an attachable job: its stdin, stdout and stderr are pipes whose far ends the daemon holds.
//!
//! One pump thread per hub polls the job's stdout and stderr pipes and copies every chunk read into
//! - the job's log file, when it has one (appended, in arrival order);
//! - a replay buffer holding the last [`REPLAY_BYTES`] of output, so that a client attaching late first
//!   sees recent output;
//! - every current subscriber ([`Subscription`]).
//!
//! A slow subscriber never blocks the job: each subscriber may have at most [`SUBSCRIBER_BACKLOG`] bytes of
//! output waiting in its queue; a chunk that would exceed that disconnects it (its [`Subscription`] then
//! ends with [`RecvError::Lagged`] after the chunks already queued). The job keeps running and other
//! subscribers are unaffected. A client that lagged may subscribe again (it gets the replay buffer).
//!
//! When the job exits, the hub drains what the job wrote before exiting (what is in the pipes), then sends
//! [`Chunk::Exit`] to every subscriber and ends their queues. Later subscribers get the replay buffer and
//! the exit. Output written after the exit by processes that inherited the pipes (background grandchildren)
//! still goes to the log and the replay buffer until the pipes close.
//!
//! The hubs are owned by [`super::supervisor::Supervisor`], which addresses them by PID.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::holder::HolderLink;
use super::supervisor::ExitInfo;

/// How much recent output (stdout and stderr together) a late subscriber is replayed.
pub const REPLAY_BYTES: usize = 64 * 1024;
/// How many bytes of output may wait in one subscriber's queue before it is disconnected as too slow.
pub const SUBSCRIBER_BACKLOG: usize = 4 * 1024 * 1024;
/// The largest single read from a job's pipe (and so the largest chunk).
const READ_CHUNK: usize = 64 * 1024;
/// After the job exits, at most this much is drained from each pipe before [`Chunk::Exit`] is sent (a
/// background process still writing must not delay the exit forever).
const EXIT_DRAIN_LIMIT: usize = 2 * 1024 * 1024;
/// Consecutive output of one stream is merged into replay entries of up to this size.
const REPLAY_ENTRY: usize = 16 * 1024;

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes the job wrote to its stdout.
    Stdout(Vec<u8>),
    /// Bytes the job wrote to its stderr.
    Stderr(Vec<u8>),
    /// The job exited (the status is `None` when it was not our child and so could not be known). Always
    /// the last chunk of a subscription.
    Exit(Option<ExitInfo>),
}

impl Chunk {
    fn data_len(&self) -> usize {
        match self {
            Chunk::Stdout(d) | Chunk::Stderr(d) => d.len(),
            Chunk::Exit(_) => 0,
        }
    }
}

/// Why [`Subscription::recv`] returned no chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// Nothing arrived within the timeout (the subscription goes on).
    #[error("no output within the timeout")]
    Timeout,
    /// The subscription is over: [`Chunk::Exit`] was delivered, or the hub went away.
    #[error("the job's output has ended")]
    Ended,
    /// The subscriber fell more than [`SUBSCRIBER_BACKLOG`] bytes behind and was disconnected; subscribe
    /// again to continue (from the replay buffer).
    #[error("the subscriber fell behind and was disconnected")]
    Lagged,
}

/// Accounting shared by a subscriber's sending and receiving sides.
#[derive(Debug, Default)]
struct Backlog {
    bytes: AtomicUsize,
    lagged: AtomicBool,
}

/// One client's view of a job's output: first the replay buffer, then live output, then the exit.
#[derive(Debug)]
pub struct Subscription {
    replay: VecDeque<Chunk>,
    rx: Option<Receiver<Chunk>>,
    backlog: Arc<Backlog>,
    ended: bool,
}

impl Subscription {
    /// The next chunk, waiting as long as it takes.
    pub fn recv(&mut self) -> Result<Chunk, RecvError> {
        self.next(None)
    }

    /// The next chunk, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Chunk, RecvError> {
        self.next(Some(timeout))
    }

    /// Whether this subscriber was disconnected for falling behind.
    pub fn lagged(&self) -> bool {
        self.backlog.lagged.load(Ordering::SeqCst)
    }

    fn next(&mut self, timeout: Option<Duration>) -> Result<Chunk, RecvError> {
        if let Some(chunk) = self.replay.pop_front() {
            self.ended |= matches!(chunk, Chunk::Exit(_));
            return Ok(chunk);
        }
        if self.ended {
            return Err(RecvError::Ended);
        }
        let Some(rx) = &self.rx else {
            self.ended = true;
            return Err(RecvError::Ended);
        };
        let got = match timeout {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(t) => rx.recv_timeout(t),
        };
        match got {
            Ok(chunk) => {
                self.backlog.bytes.fetch_sub(chunk.data_len(), Ordering::SeqCst);
                self.ended |= matches!(chunk, Chunk::Exit(_));
                Ok(chunk)
            }
            Err(RecvTimeoutError::Timeout) => Err(RecvError::Timeout),
            Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                Err(if self.lagged() { RecvError::Lagged } else { RecvError::Ended })
            }
        }
    }
}

/// Which of the job's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn chunk(self, data: Vec<u8>) -> Chunk {
        match self {
            Stream::Stdout => Chunk::Stdout(data),
            Stream::Stderr => Chunk::Stderr(data),
        }
    }
}

/// The last [`REPLAY_BYTES`] of output, as entries per stream in arrival order.
#[derive(Debug, Default)]
struct Replay {
    entries: VecDeque<(Stream, Vec<u8>)>,
    total: usize,
}

impl Replay {
    fn push(&mut self, stream: Stream, data: &[u8]) {
        let data = &data[data.len().saturating_sub(REPLAY_BYTES)..];
        match self.entries.back_mut() {
            Some((s, last)) if *s == stream && last.len() + data.len() <= REPLAY_ENTRY => last.extend_from_slice(data),
            _ => self.entries.push_back((stream, data.to_vec())),
        }
        self.total += data.len();
        while self.total > REPLAY_BYTES {
            let excess = self.total - REPLAY_BYTES;
            let Some((_, front)) = self.entries.front_mut() else { break };
            if front.len() <= excess {
                self.total -= front.len();
                self.entries.pop_front();
            } else {
                front.drain(..excess);
                self.total -= excess;
            }
        }
    }

    fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        self.entries.iter().map(|(s, d)| s.chunk(d.clone()))
    }
}

struct Subscriber {
    tx: Sender<Chunk>,
    backlog: Arc<Backlog>,
}

#[derive(Default)]
struct HubState {
    replay: Replay,
    subscribers: Vec<Subscriber>,
    /// Set once [`Chunk::Exit`] has been delivered.
    exit: Option<Option<ExitInfo>>,
    /// The exit the supervisor reported, waiting for the pump to drain the pipes.
    exit_pending: Option<Option<ExitInfo>>,
}

/// The I/O hub of one attachable job (see the module documentation).
pub struct OutputHub {
    state: Mutex<HubState>,
    /// Our end of the job's stdin (non-blocking), until closed.
    stdin: Mutex<Option<Arc<OwnedFd>>>,
    /// Serializes writers, so that two clients' writes do not interleave.
    stdin_writer: Mutex<()>,
    stdin_closed: AtomicBool,
    exited: AtomicBool,
    /// Wakes the pump thread when the exit is reported.
    wake: OwnedFd,
    /// The link to the job's stdio holder ([`super::holder`]), until the exit is delivered.
    holder: Mutex<Option<HolderLink>>,
}

impl std::fmt::Debug for OutputHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputHub").field("exited", &self.exited.load(Ordering::SeqCst)).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

impl OutputHub {
    /// A hub over our ends of a job's pipes (`stdin`: the write end, `None` when already closed; `stdout`,
    /// `stderr`: the read ends), with its pump thread started. All three are made non-blocking (only our
    /// ends: the job's ends are other open file descriptions).
    pub(crate) fn start(
        pid: i32,
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
        log: Option<File>,
    ) -> io::Result<Arc<OutputHub>> {
        for fd in [stdin.as_ref(), Some(&stdout), Some(&stderr)].into_iter().flatten() {
            set_nonblocking(fd.as_fd())?;
        }
        let (wake_r, wake_w) = pipe()?;
        set_nonblocking(wake_r.as_fd())?;
        set_nonblocking(wake_w.as_fd())?;
        let hub = Arc::new(OutputHub {
            state: Mutex::new(HubState::default()),
            stdin_closed: AtomicBool::new(stdin.is_none()),
            stdin: Mutex::new(stdin.map(Arc::new)),
            stdin_writer: Mutex::new(()),
            exited: AtomicBool::new(false),
            wake: wake_w,
            holder: Mutex::new(None),
        });
        let pump = Pump { hub: Arc::clone(&hub), pid, pipes: [Some(stdout), Some(stderr)], wake: wake_r, log };
        std::thread::Builder::new().name(format!("cedana-job-io-{pid}")).spawn(move || pump.run())?;
        Ok(hub)
    }

    /// A new subscription: the replay buffer, then live output, then the exit.
    pub fn subscribe(&self) -> Subscription {
        let mut st = lock(&self.state);
        let replay: VecDeque<Chunk> = st.replay.chunks().collect();
        let backlog = Arc::new(Backlog::default());
        if let Some(status) = st.exit {
            let mut replay = replay;
            replay.push_back(Chunk::Exit(status));
            return Subscription { replay, rx: None, backlog, ended: false };
        }
        let (tx, rx) = mpsc::channel();
        st.subscribers.push(Subscriber { tx, backlog: Arc::clone(&backlog) });
        Subscription { replay, rx: Some(rx), backlog, ended: false }
    }

    /// Write all of `data` to the job's stdin. Blocks while the pipe is full (the job is not reading), but
    /// gives up with `BrokenPipe` once stdin is closed or the job has exited.
    pub fn write_stdin(&self, data: &[u8]) -> io::Result<()> {
        let _one_writer = lock(&self.stdin_writer);
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed");
        let fd = lock(&self.stdin).clone().ok_or_else(closed)?;
        let mut off = 0;
        while off < data.len() {
            if self.stdin_closed.load(Ordering::SeqCst) {
                return Err(closed());
            }
            match nix::unistd::write(&*fd, &data[off..]) {
                Ok(n) => off += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if self.exited.load(Ordering::SeqCst) {
                        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the job has exited"));
                    }
                    let mut fds = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLOUT)];
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8)) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Close our end of the job's stdin, and the stdio holder's (the job reads end of file once other
    /// holders are gone too). A write in progress gives up.
    pub fn close_stdin(&self) {
        self.stdin_closed.store(true, Ordering::SeqCst);
        lock(&self.stdin).take();
        if let Some(link) = &*lock(&self.holder) {
            link.close_stdin();
        }
    }

    /// Keep the link to the job's stdio holder (until the exit is delivered).
    pub(crate) fn set_holder(&self, link: HolderLink) {
        if self.stdin_closed.load(Ordering::SeqCst) {
            link.close_stdin();
        }
        *lock(&self.holder) = Some(link);
    }

    /// Whether the job's exit has been reported to the hub.
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// The supervisor reports the job's exit; the pump delivers it after draining the pipes.
    pub(crate) fn process_exited(&self, status: Option<ExitInfo>) {
        lock(&self.state).exit_pending = Some(status);
        self.exited.store(true, Ordering::SeqCst);
        // A full wake pipe already holds a wake-up.
        let _ = nix::unistd::write(&self.wake, &[1]);
    }

    fn deliver(&self, stream: Stream, data: &[u8]) {
        let mut st = lock(&self.state);
        st.replay.push(stream, data);
        st.subscribers.retain(|sub| {
            let queued = sub.backlog.bytes.load(Ordering::SeqCst);
            if queued + data.len() > SUBSCRIBER_BACKLOG {
                sub.backlog.lagged.store(true, Ordering::SeqCst);
                tracing::debug!(queued, "disconnecting a subscriber that fell behind");
                return false;
            }
            sub.backlog.bytes.fetch_add(data.len(), Ordering::SeqCst);
            sub.tx.send(stream.chunk(data.to_vec())).is_ok()
        });
    }

    fn deliver_exit(&self, status: Option<ExitInfo>) {
        lock(&self.holder).take();
        let mut st = lock(&self.state);
        st.exit = Some(status);
        for sub in st.subscribers.drain(..) {
            let _ = sub.tx.send(Chunk::Exit(status));
        }
    }
}

/// The pump thread's state: our read ends of stdout and stderr, the wake pipe, the log.
struct Pump {
    hub: Arc<OutputHub>,
    pid: i32,
    pipes: [Option<OwnedFd>; 2],
    wake: OwnedFd,
    log: Option<File>,
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

enum ReadOutcome {
    Data(usize),
    Empty,
    Closed,
}

impl Pump {
    fn run(mut self) {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut exit_delivered = false;
        loop {
            if exit_delivered && self.pipes.iter().all(Option::is_none) {
                break;
            }
            let (wake_ready, ready) = match self.wait() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "polling the job's output failed; output is no longer pumped");
                    // Still deliver the exit once it is known.
                    if !exit_delivered {
                        self.pipes = [None, None];
                        self.wait_for_exit_blocking();
                    }
                    break;
                }
            };
            for (i, is_ready) in ready.into_iter().enumerate() {
                if is_ready {
                    self.read_once(i, &mut buf);
                }
            }
            if wake_ready {
                let mut sink = [0u8; 64];
                while matches!(nix::unistd::read(&self.wake, &mut sink), Ok(n) if n > 0) {}
                let pending = lock(&self.hub.state).exit_pending.take();
                if let Some(status) = pending {
                    self.drain(&mut buf);
                    self.hub.deliver_exit(status);
                    exit_delivered = true;
                }
            }
        }
    }

    /// Poll the wake pipe (until the exit is delivered) and the open pipes.
    fn wait(&self) -> nix::Result<(bool, [bool; 2])> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let watch_wake = lock(&self.hub.state).exit.is_none();
        let mut fds = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        if watch_wake {
            fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
            which.push(None);
        }
        for (i, p) in self.pipes.iter().enumerate() {
            if let Some(p) = p {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(Some(i));
            }
        }
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let mut wake = false;
        let mut ready = [false; 2];
        for (fd, w) in fds.iter().zip(which) {
            if fd.revents().is_some_and(|r| !r.is_empty()) {
                match w {
                    None => wake = true,
                    Some(i) => ready[i] = true,
                }
            }
        }
        Ok((wake, ready))
    }

    fn read_once(&mut self, i: usize, buf: &mut [u8]) -> ReadOutcome {
        let Some(fd) = &self.pipes[i] else { return ReadOutcome::Closed };
        let outcome = loop {
            match nix::unistd::read(fd, buf) {
                Ok(0) => break ReadOutcome::Closed,
                Ok(n) => break ReadOutcome::Data(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break ReadOutcome::Empty,
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "reading the job's output failed");
                    break ReadOutcome::Closed;
                }
            }
        };
        match outcome {
            ReadOutcome::Data(n) => self.output(STREAMS[i], &buf[..n]),
            ReadOutcome::Closed => self.pipes[i] = None,
            ReadOutcome::Empty => {}
        }
        outcome
    }

    /// Read what is in the pipes now (bounded), before the exit is delivered.
    fn drain(&mut self, buf: &mut [u8]) {
        for i in 0..2 {
            let mut taken = 0;
            while taken < EXIT_DRAIN_LIMIT {
                match self.read_once(i, buf) {
                    ReadOutcome::Data(n) => taken += n,
                    ReadOutcome::Empty | ReadOutcome::Closed => break,
                }
            }
        }
    }

    fn output(&mut self, stream: Stream, data: &[u8]) {
        if let Some(log) = &mut self.log {
            if let Err(e) = log.write_all(data) {
                tracing::warn!(pid = self.pid, error = %e, "writing the job's log failed; its output is no longer logged");
                self.log = None;
            }
        }
        self.hub.deliver(stream, data);
    }

    fn wait_for_exit_blocking(&self) {
        loop {
            let pending = lock(&self.hub.state).exit_pending.take();
            if let Some(status) = pending {
                self.hub.deliver_exit(status);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What `/proc/PID/fd/{0,1,2}` of a process point to (`pipe:[INODE]`, a path, ...): the keys by which a
/// checkpoint of an attachable job names its stdio pipes, for CRIU's `inherit_fd` at restore.
pub fn stdio_links(pid: i32) -> io::Result<[String; 3]> {
    let link = |fd: i32| -> io::Result<String> {
        Ok(std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))?.to_string_lossy().into_owned())
    };
    Ok([link(0)?, link(1)?, link(2)?])
}

/// The child's side of fresh stdio pipes for restoring an attachable job, and the [`RestoreHandle`] that
/// holds our side (from [`super::supervisor::Supervisor::prepare_restore_pipes`]).
///
/// All descriptors are close-on-exec: the caller clears the flag on the ones it passes to CRIU (or
/// hands them over by number through `inherit_fd`). Drop the three child-side descriptors once the
/// restore is done (succeeded or not): while the daemon holds the write ends of stdout/stderr, the hub
/// never sees end of file on them.
#[derive(Debug)]
pub struct RestorePipes {
    /// The read end of the new stdin pipe (the restored process's fd 0).
    pub stdin: OwnedFd,
    /// The write end of the new stdout pipe (the restored process's fd 1).
    pub stdout: OwnedFd,
    /// The write end of the new stderr pipe (the restored process's fd 2).
    pub stderr: OwnedFd,
    /// Our ends, for [`super::supervisor::Supervisor::attach_restored`] once the restored PID is known.
    pub handle: RestoreHandle,
}

/// Our ends of a restored job's pipes, waiting for its PID.
#[derive(Debug)]
pub struct RestoreHandle {
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) log: Option<File>,
}

impl RestorePipes {
    pub(crate) fn new(log: Option<File>) -> io::Result<RestorePipes> {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok(RestorePipes {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
            handle: RestoreHandle { stdin: in_w, stdout: out_r, stderr: err_r, log },
        })
    }
}

impl RestoreHandle {
    /// The raw numbers of our ends (stdin write end, stdout read end, stderr read end), for logging.
    pub fn raw_fds(&self) -> [i32; 3] {
        [self.stdin.as_raw_fd(), self.stdout.as_raw_fd(), self.stderr.as_raw_fd()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_the_last_bytes_in_order() {
        let mut r = Replay::default();
        r.push(Stream::Stdout, b"abc");
        r.push(Stream::Stdout, b"def");
        r.push(Stream::Stderr, b"E");
        assert_eq!(r.entries.len(), 2);
        let big = vec![b'x'; REPLAY_BYTES - 2];
        r.push(Stream::Stdout, &big);
        assert_eq!(r.total, REPLAY_BYTES);
        let all: Vec<u8> = r.entries.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(all.len(), REPLAY_BYTES);
        assert_eq!(&all[..2], b"fE");
        r.push(Stream::Stderr, &vec![b'y'; 3 * REPLAY_BYTES]);
        assert_eq!(r.total, REPLAY_BYTES);
        assert!(r.entries.iter().all(|(s, _)| *s == Stream::Stderr));
    }
}
