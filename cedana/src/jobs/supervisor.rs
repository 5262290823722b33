//! The job supervisor of the daemon: starts jobs, reaps them, watches processes it did not start, signals
//! them, reaps orphans, and (with [`super::attach`]) connects clients to attachable jobs' stdio.
//!
//! # Processes and statuses
//! - [`Supervisor::spawn`] starts a job as our child, in its own session, with only fds 0, 1 and 2 open.
//!   Its exit is reported with its real status.
//! - [`Supervisor::watch`] follows a process that is *not* our child (adopted with `cedana manage`,
//!   restored by a CRIU that left it to someone else): its exit is reported with status `None`, since
//!   only its parent can know the status. It is never reaped by us.
//! - [`Supervisor::adopt_child`] follows a process that *is* our child but that we did not spawn here (a
//!   tree CRIU restored as our child with `rst_sibling`): it is reaped by us and its real status reported.
//!
//! Every exit is one [`JobEvent::Exited`] on the channel given to [`Supervisor::new`], sent after the
//! process was reaped (for children). Each supervised process gets a `serial` (in [`Spawned`] and the
//! events) that tells apart two processes that had the same PID in turn.
//!
//! # Threads
//! One event thread per supervisor waits for every exit at once: a pidfd per process (`pidfd_open`; Linux
//! 5.4 or newer), polled together, and children reaped with `waitid(P_PIDFD)`, which can reap no other
//! process. The same thread runs the orphan sweeper on a timer. An attachable job adds one pump thread
//! (its output, see [`super::attach`]); a job with a log file needs no thread of its own (the log is its
//! stdout and stderr).
//!
//! # Orphans and who may reap what
//! The daemon is a child subreaper ([`become_subreaper`]): when a job's process dies, its children are
//! re-parented to the daemon, and stay zombies unless the daemon reaps them. At the same time engine
//! operations in the daemon spawn children of their own (`criu swrk`, runc) and wait for them by PID. The
//! supervisor never calls `waitpid(-1)`. Its sweeper (every [`SupervisorConfig::sweep_interval`], and on
//! demand with [`Supervisor::sweep`]) reaps a zombie whose parent is this process only when nobody can
//! be waiting for it:
//! - a PID under an [`Exclusion`] ([`Supervisor::exclude`]) is never touched: hold one while you wait for
//!   a child whose PID you know (our own jobs are excluded this way until the event thread reaps them);
//! - a zombie first seen by a sweep that began while a [`ForkScope`] was open is left alone until every
//!   scope open at that time has closed. **Hold a [`ForkScope`] ([`Supervisor::fork_scope`]) around any
//!   code that forks children and waits for them itself** (an engine dump or restore, `Command::output`,
//!   a tokio `Child`): a child created while the scope is open cannot be reaped by the sweeper before the
//!   scope ends, even in the instant between `fork` and the moment its PID is known. Zombies that were
//!   already seen before a scope opened cannot be that scope's children, so long scopes delay only the
//!   reaping of orphans that die during them.
//!
//! Code that forks and waits without a scope or exclusion may lose its child's status to the sweeper (it
//! then gets `ECHILD`).
//!
//! # Attachable jobs
//! With [`Output::Attachable`], stdin, stdout and stderr are pipes whose other ends the supervisor holds;
//! clients [`Supervisor::subscribe`] to the output (replay of the last 64 KiB, then live, then the exit)
//! and [`Supervisor::write_stdin`]. To restore such a job from a checkpoint, [`Supervisor::prepare_restore_pipes`]
//! makes new pipes for the restored process and [`Supervisor::attach_restored`] connects them to a new hub
//! once its PID is known.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::attach::{self, OutputHub, RestoreHandle, RestorePipes, Subscription};
use crate::error::ErrorKind;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitInfo {
    /// It exited with this code.
    Exited(i32),
    /// A signal (this number) killed it.
    Signaled(i32),
}

impl ExitInfo {
    /// The status `waitpid` stored, if it says the process ended.
    pub fn from_wait_status(status: i32) -> Option<ExitInfo> {
        if libc::WIFEXITED(status) {
            Some(ExitInfo::Exited(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(ExitInfo::Signaled(libc::WTERMSIG(status)))
        } else {
            None
        }
    }

    /// The exit code, when it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitInfo::Exited(c) => Some(c),
            ExitInfo::Signaled(_) => None,
        }
    }

    /// The signal that killed it, when one did.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitInfo::Signaled(s) => Some(s),
            ExitInfo::Exited(_) => None,
        }
    }

    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitInfo::Exited(0)
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Exited(c) => write!(f, "exit code {c}"),
            ExitInfo::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What the supervisor reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// A supervised process ended. `status` is `None` when it was not our child (so its status could not
    /// be known), or when something else reaped it first.
    Exited { pid: i32, serial: u64, status: Option<ExitInfo> },
}

/// Where a job's stdio goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// stdin is /dev/null; stdout and stderr are appended to this file (created with mode 0600 if missing).
    Log(PathBuf),
    /// stdin, stdout and stderr are pipes held by the supervisor (see [`Supervisor::subscribe`]); stdout
    /// and stderr are also appended to `log` when given.
    Attachable { log: Option<PathBuf> },
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The program (looked up in `PATH` unless it contains a `/`) and its arguments.
    pub args: Vec<String>,
    /// The working directory; the daemon's when `None`.
    pub cwd: Option<PathBuf>,
    /// Variables set for the job: added to (or overriding) the daemon's environment, or the whole
    /// environment when `clear_env` is set.
    pub env: Vec<(String, String)>,
    /// Start from an empty environment instead of the daemon's.
    pub clear_env: bool,
    /// Where stdio goes.
    pub output: Output,
}

impl SpawnSpec {
    /// `args` run with the daemon's working directory and environment.
    pub fn new<I, S>(args: I, output: Output) -> SpawnSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SpawnSpec { args: args.into_iter().map(Into::into).collect(), cwd: None, env: Vec::new(), clear_env: false, output }
    }
}

/// A started job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    pub pid: i32,
    /// Names this process in [`JobEvent`]s (a later process with the same PID gets another serial).
    pub serial: u64,
}

/// Settings of a [`Supervisor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// How often the orphan sweeper runs; `None`: only on [`Supervisor::sweep`].
    pub sweep_interval: Option<Duration>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig { sweep_interval: Some(Duration::from_millis(250)) }
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("nothing to run: the command is empty")]
    EmptyCommand,
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("cannot open the log file {}: {source}", path.display())]
    Log { path: PathBuf, source: io::Error },
    #[error("process {0} does not exist")]
    NoSuchProcess(i32),
    #[error("process {0} is not a child of the daemon (watch it instead)")]
    NotAChild(i32),
    #[error("process {0} is already supervised")]
    AlreadySupervised(i32),
    #[error("process {0} is not supervised")]
    NotSupervised(i32),
    #[error("job {0} is not attachable")]
    NotAttachable(i32),
    #[error("stdin of job {pid}: {source}")]
    Stdin { pid: i32, source: io::Error },
    #[error("signal {sig} to process {pid}: {source}")]
    Signal { pid: i32, sig: i32, source: io::Error },
    #[error("{what}: {source}")]
    System { what: &'static str, source: io::Error },
}

impl SupervisorError {
    /// The class of this error, for the wire.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SupervisorError::EmptyCommand => ErrorKind::InvalidArgument,
            SupervisorError::Spawn { source, .. } | SupervisorError::Log { source, .. } => ErrorKind::of_io(source),
            SupervisorError::NoSuchProcess(_) | SupervisorError::NotSupervised(_) => ErrorKind::NotFound,
            SupervisorError::NotAChild(_) | SupervisorError::NotAttachable(_) => ErrorKind::FailedPrecondition,
            SupervisorError::AlreadySupervised(_) => ErrorKind::AlreadyExists,
            SupervisorError::Stdin { source, .. } => match source.kind() {
                io::ErrorKind::BrokenPipe => ErrorKind::FailedPrecondition,
                _ => ErrorKind::of_io(source),
            },
            SupervisorError::Signal { source, .. } => match source.raw_os_error() {
                Some(libc::ESRCH) => ErrorKind::NotFound,
                Some(libc::EPERM) => ErrorKind::FailedPrecondition,
                _ => ErrorKind::of_io(source),
            },
            SupervisorError::System { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSYS) => ErrorKind::Unavailable,
                _ => ErrorKind::of_io(source),
            },
        }
    }
}

/// Make this process a child subreaper: orphaned descendants are re-parented to it (and must be reaped
/// by it: see the sweeper). For the daemon's start-up; it affects the whole process.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The supervisor: cheap to clone, usable from any thread. The event thread stops when the last clone
/// is dropped (supervised processes keep running, unreaped; exits after that are not reported).
#[derive(Clone)]
pub struct Supervisor {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.handle.core.state);
        f.debug_struct("Supervisor").field("supervised", &st.watched.len()).finish_non_exhaustive()
    }
}

struct Handle {
    core: Arc<Core>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.stop.store(true, Ordering::SeqCst);
        self.core.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Core {
    events: Sender<JobEvent>,
    state: Mutex<State>,
    hubs: Mutex<HashMap<i32, Arc<OutputHub>>>,
    serial: AtomicU64,
    /// The write end of the event thread's wake pipe (non-blocking).
    wake: OwnedFd,
    stop: AtomicBool,
    sweep_lock: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// PIDs the sweeper must not reap, with how many holders each.
    exclusions: HashMap<i32, usize>,
    /// Open fork scopes: id -> the sweep epoch when it opened.
    scopes: HashMap<u64, u64>,
    next_scope: u64,
    /// Advanced by every sweep, after its scan of /proc.
    epoch: u64,
    /// Zombies seen by earlier sweeps and left alone: (pid, start time) -> the epoch of the first sighting.
    seen: HashMap<(i32, u64), u64>,
    /// Supervised processes, for signals.
    watched: HashMap<i32, Watching>,
    /// Newly supervised processes, for the event thread to pick up.
    incoming: Vec<Watched>,
}

struct Watching {
    serial: u64,
    pidfd: Arc<OwnedFd>,
}

/// One supervised process, in the event thread.
struct Watched {
    pid: i32,
    serial: u64,
    pidfd: Arc<OwnedFd>,
    /// Our child, reaped by us (and excluded from the sweeper until then).
    child: bool,
    hub: Option<Arc<OutputHub>>,
}

/// A section during which children forked by this process are safe from the sweeper (see the module
/// documentation). Dropping it ends the section.
pub struct ForkScope {
    core: Arc<Core>,
    id: u64,
}

impl ForkScope {
    /// Keep the sweeper away from `pid` beyond the end of this scope (a child forked in it that the
    /// caller waits for later).
    pub fn exclude(&self, pid: i32) -> Exclusion {
        self.core.exclude(pid);
        Exclusion { core: Arc::clone(&self.core), pid }
    }
}

impl Drop for ForkScope {
    fn drop(&mut self) {
        lock(&self.core.state).scopes.remove(&self.id);
    }
}

impl std::fmt::Debug for ForkScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkScope").field("id", &self.id).finish()
    }
}

/// While held, the sweeper never reaps this PID.
pub struct Exclusion {
    core: Arc<Core>,
    pid: i32,
}

impl Exclusion {
    /// The excluded PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for Exclusion {
    fn drop(&mut self) {
        self.core.unexclude(self.pid);
    }
}

impl std::fmt::Debug for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exclusion").field("pid", &self.pid).finish()
    }
}

/// [`pidfd_open`] for a PID a caller named.
fn open_pidfd(pid: i32) -> Result<OwnedFd, SupervisorError> {
    pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) | Some(libc::EINVAL) => SupervisorError::NoSuchProcess(pid),
        _ => SupervisorError::System { what: "pidfd_open", source: e },
    })
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

enum Reaped {
    /// Not exited yet.
    Alive,
    /// Reaped (the status when it could be decoded), or not our child to reap.
    Done(Option<ExitInfo>),
}

/// `waitid` on a pidfd, so that exactly that process can be reaped. `nowait`: only look.
fn wait_pidfd(fd: BorrowedFd<'_>, nowait: bool) -> io::Result<Reaped> {
    let mut flags = libc::WEXITED | libc::WNOHANG;
    if nowait {
        flags |= libc::WNOWAIT;
    }
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value (si_pid 0 means nothing waited for).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which lives across the call.
        let rc = unsafe { libc::waitid(libc::P_PIDFD, fd.as_raw_fd() as libc::id_t, &mut info, flags) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled a SIGCHLD siginfo (or left it zeroed), for which these fields are valid.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(Reaped::Alive);
        }
        let exit = match info.si_code {
            libc::CLD_EXITED => Some(ExitInfo::Exited(status)),
            libc::CLD_KILLED | libc::CLD_DUMPED => Some(ExitInfo::Signaled(status)),
            _ => None,
        };
        return Ok(Reaped::Done(exit));
    }
}

/// Whether any child of this process is a zombie (without reaping it).
fn any_zombie_child() -> bool {
    // SAFETY: as in wait_pidfd; WNOWAIT leaves the child waitable.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    // SAFETY: a SIGCHLD siginfo (or zeroed).
    rc == 0 && unsafe { info.si_pid() } != 0
}

/// The zombies whose parent is `me`, as (pid, start time).
fn zombie_children(me: i32) -> Vec<(i32, u64)> {
    use std::io::Read;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    let mut buf = String::with_capacity(1024);
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        buf.clear();
        let read = File::open(format!("/proc/{pid}/stat")).and_then(|mut f| f.read_to_string(&mut buf));
        if read.is_err() {
            continue;
        }
        if let Some((state, ppid, start)) = parse_stat(&buf) {
            if ppid == me && state == 'Z' {
                out.push((pid, start));
            }
        }
    }
    out
}

/// State, parent PID and start time from a /proc/PID/stat line.
fn parse_stat(text: &str) -> Option<(char, i32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.chars().next()?, fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Mark every descriptor from 3 up close-on-exec. Runs between fork and exec: system calls only.
fn cloexec_from_3() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes descriptor flags.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: every possible descriptor, one by one.
    // SAFETY: sysconf and fcntl are async-signal-safe and touch no memory of ours.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(1024, 1 << 16) as i32;
    for fd in 3..max {
        // SAFETY: as above; a descriptor that is not open fails with EBADF, which is fine.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn open_log(path: &Path) -> Result<File, SupervisorError> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| SupervisorError::Log { path: path.to_path_buf(), source })
}

/// Kill and reap a child we cannot supervise after all.
fn abandon_child(pid: i32) {
    // SAFETY: plain system calls on a child of ours that nobody else reaps (it is excluded).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) == -1 && Errno::last() == Errno::EINTR {}
    }
}

impl Core {
    fn wake(&self) {
        // A full pipe already holds a wake-up.
        let _ = nix::unistd::write(&self.wake, &[1]);
    }

    fn exclude(&self, pid: i32) {
        *lock(&self.state).exclusions.entry(pid).or_insert(0) += 1;
    }

    fn unexclude(&self, pid: i32) {
        let mut st = lock(&self.state);
        if let Some(n) = st.exclusions.get_mut(&pid) {
            *n -= 1;
            if *n == 0 {
                st.exclusions.remove(&pid);
            }
        }
    }

    fn register(&self, pid: i32, pidfd: OwnedFd, child: bool, hub: Option<Arc<OutputHub>>) -> u64 {
        let serial = self.serial.fetch_add(1, Ordering::SeqCst) + 1;
        let pidfd = Arc::new(pidfd);
        {
            let mut st = lock(&self.state);
            st.watched.insert(pid, Watching { serial, pidfd: Arc::clone(&pidfd) });
            st.incoming.push(Watched { pid, serial, pidfd, child, hub });
        }
        self.wake();
        serial
    }

    /// Handle a watched process whose pidfd became readable: `true` when it is finished with.
    fn finish(&self, w: &Watched) -> bool {
        let status = if w.child {
            match wait_pidfd(w.pidfd.as_fd(), false) {
                Ok(Reaped::Alive) => return false,
                Ok(Reaped::Done(status)) => status,
                Err(e) => {
                    tracing::warn!(pid = w.pid, error = %e, "could not reap a supervised child (reaped elsewhere?)");
                    None
                }
            }
        } else {
            None
        };
        {
            let mut st = lock(&self.state);
            if st.watched.get(&w.pid).is_some_and(|x| x.serial == w.serial) {
                st.watched.remove(&w.pid);
            }
        }
        if w.child {
            self.unexclude(w.pid);
        }
        tracing::debug!(pid = w.pid, serial = w.serial, ?status, "supervised process ended");
        if let Some(hub) = &w.hub {
            hub.process_exited(status);
        }
        let _ = self.events.send(JobEvent::Exited { pid: w.pid, serial: w.serial, status });
        true
    }

    /// One sweep: reap zombie children that nobody can be waiting for. Returns how many were reaped.
    fn sweep(&self) -> usize {
        let _one_at_a_time = lock(&self.sweep_lock);
        if !any_zombie_child() {
            lock(&self.state).seen.clear();
            return 0;
        }
        let zombies = zombie_children(std::process::id() as i32);
        let mut st = lock(&self.state);
        // Every zombie in `zombies` existed before this point; a scope opened from now on has a later epoch.
        let epoch = st.epoch;
        st.epoch += 1;
        let oldest_scope = st.scopes.values().min().copied();
        let mut still = HashMap::new();
        let mut reaped = 0;
        for z in zombies {
            let first = st.seen.get(&z).copied().unwrap_or(epoch);
            let maybe_a_scopes_child = oldest_scope.is_some_and(|s| first >= s);
            if maybe_a_scopes_child || st.exclusions.contains_key(&z.0) {
                still.insert(z, first);
                continue;
            }
            let mut status = 0;
            // SAFETY: waitpid on one PID, writing only `status`; the state lock keeps exclusions from changing.
            let rc = unsafe { libc::waitpid(z.0, &mut status, libc::WNOHANG) };
            if rc == z.0 {
                tracing::debug!(pid = z.0, status = ?ExitInfo::from_wait_status(status), "reaped an orphan");
                reaped += 1;
            }
        }
        st.seen = still;
        reaped
    }
}

fn event_loop(core: Arc<Core>, wake: OwnedFd, interval: Option<Duration>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut watches: Vec<Watched> = Vec::new();
    let mut next_sweep = interval.map(|i| Instant::now() + i);
    loop {
        if core.stop.load(Ordering::SeqCst) {
            break;
        }
        watches.append(&mut lock(&core.state).incoming);
        let timeout = match next_sweep {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now()) + Duration::from_micros(999);
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut ready = Vec::new();
        let mut woken = false;
        {
            let mut fds = Vec::with_capacity(watches.len() + 1);
            fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
            fds.extend(watches.iter().map(|w| PollFd::new(w.pidfd.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "the supervisor cannot poll; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            for (i, fd) in fds.iter().enumerate() {
                if fd.revents().is_some_and(|r| !r.is_empty()) {
                    if i == 0 {
                        woken = true;
                    } else {
                        ready.push(i - 1);
                    }
                }
            }
        }
        if woken {
            let mut sink = [0u8; 64];
            while matches!(nix::unistd::read(&wake, &mut sink), Ok(n) if n > 0) {}
        }
        // Highest index first, so that swap_remove does not move a ready entry still to be handled.
        for i in ready.into_iter().rev() {
            if core.finish(&watches[i]) {
                watches.swap_remove(i);
            }
        }
        if let (Some(at), Some(every)) = (next_sweep, interval) {
            if Instant::now() >= at {
                core.sweep();
                next_sweep = Some(Instant::now() + every);
            }
        }
    }
    lock(&core.state).incoming.clear();
}

impl Supervisor {
    /// A supervisor reporting exits on `events`, sweeping orphans every 250 ms.
    pub fn new(events: Sender<JobEvent>) -> Result<Supervisor, SupervisorError> {
        Supervisor::with_config(events, SupervisorConfig::default())
    }

    /// A supervisor with explicit settings.
    pub fn with_config(events: Sender<JobEvent>, config: SupervisorConfig) -> Result<Supervisor, SupervisorError> {
        let system = |what| move |source| SupervisorError::System { what, source };
        let (wake_r, wake_w) = attach::pipe().map_err(system("creating the wake pipe"))?;
        attach::set_nonblocking(wake_r.as_fd()).map_err(system("creating the wake pipe"))?;
        attach::set_nonblocking(wake_w.as_fd()).map_err(system("creating the wake pipe"))?;
        let core = Arc::new(Core {
            events,
            state: Mutex::new(State::default()),
            hubs: Mutex::new(HashMap::new()),
            serial: AtomicU64::new(0),
            wake: wake_w,
            stop: AtomicBool::new(false),
            sweep_lock: Mutex::new(()),
        });
        let thread_core = Arc::clone(&core);
        let interval = config.sweep_interval;
        let thread = std::thread::Builder::new()
            .name("cedana-supervisor".into())
            .spawn(move || event_loop(thread_core, wake_r, interval))
            .map_err(system("starting the supervisor thread"))?;
        Ok(Supervisor { handle: Arc::new(Handle { core, thread: Some(thread) }) })
    }

    fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    /// Start a job (see [`SpawnSpec`], [`Output`]): its own session, only fds 0-2 open, reaped by us.
    pub fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned, SupervisorError> {
        let (program, rest) = spec.args.split_first().ok_or(SupervisorError::EmptyCommand)?;
        let mut cmd = Command::new(program);
        cmd.args(rest);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        if spec.clear_env {
            cmd.env_clear();
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let (attachable, log) = match &spec.output {
            Output::Log(path) => {
                let log = open_log(path)?;
                let err = log.try_clone().map_err(|source| SupervisorError::Log { path: path.clone(), source })?;
                cmd.stdin(Stdio::null()).stdout(log).stderr(err);
                (false, None)
            }
            Output::Attachable { log } => {
                let log = log.as_deref().map(open_log).transpose()?;
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
                (true, log)
            }
        };
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                cloexec_from_3();
                Ok(())
            });
        }
        let mut child = {
            let scope = self.fork_scope();
            // std waits for a child whose exec failed itself: the scope keeps the sweeper away from it.
            let child = cmd.spawn().map_err(|source| SupervisorError::Spawn { program: program.clone(), source })?;
            // Excluded until the event thread reaps it (Core::finish).
            self.core().exclude(child.id() as i32);
            drop(scope);
            child
        };
        let pid = child.id() as i32;
        let fail = |what: &'static str, source: io::Error| {
            abandon_child(pid);
            self.core().unexclude(pid);
            SupervisorError::System { what, source }
        };
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => return Err(fail("pidfd_open of a new job", e)),
        };
        let hub = if attachable {
            let (Some(i), Some(o), Some(e)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
                return Err(fail("taking the job's pipes", io::Error::other("missing pipe")));
            };
            match OutputHub::start(pid, i.into(), o.into(), e.into(), log) {
                Ok(hub) => {
                    lock(&self.core().hubs).insert(pid, Arc::clone(&hub));
                    Some(hub)
                }
                Err(e) => return Err(fail("starting the job's output pump", e)),
            }
        } else {
            None
        };
        drop(child); // neither waits nor kills
        let serial = self.core().register(pid, pidfd, true, hub);
        tracing::debug!(pid, serial, args = ?spec.args, "job started");
        Ok(Spawned { pid, serial })
    }

    fn refuse_if_watched(&self, pid: i32) -> Result<(), SupervisorError> {
        if lock(&self.core().state).watched.contains_key(&pid) {
            return Err(SupervisorError::AlreadySupervised(pid));
        }
        Ok(())
    }

    /// Follow a process that is not our child: its exit is reported with status `None` (promptly, even if
    /// its parent does not reap it). Not reaped by us; for a child of ours use [`Supervisor::adopt_child`].
    pub fn watch(&self, pid: i32) -> Result<u64, SupervisorError> {
        self.refuse_if_watched(pid)?;
        let pidfd = open_pidfd(pid)?;
        Ok(self.core().register(pid, pidfd, false, None))
    }

    /// Follow a child of ours that we did not spawn here (e.g. a tree CRIU restored with `rst_sibling`):
    /// reaped by us, with its real status reported. Call it while still holding the [`ForkScope`] of the
    /// operation that created the child, so the sweeper cannot have reaped it first. Fails with
    /// [`SupervisorError::NotAChild`] for another process's child.
    pub fn adopt_child(&self, pid: i32) -> Result<u64, SupervisorError> {
        self.adopt(pid, None)
    }

    fn adopt(&self, pid: i32, hub: Option<Arc<OutputHub>>) -> Result<u64, SupervisorError> {
        self.refuse_if_watched(pid)?;
        self.core().exclude(pid);
        let checked = open_pidfd(pid).and_then(|fd| match wait_pidfd(fd.as_fd(), true) {
            Ok(_) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Err(SupervisorError::NotAChild(pid)),
            Err(source) => Err(SupervisorError::System { what: "waitid", source }),
        });
        match checked {
            Ok(fd) => Ok(self.core().register(pid, fd, true, hub)),
            Err(e) => {
                self.core().unexclude(pid);
                Err(e)
            }
        }
    }

    /// Whether `pid` is supervised (spawned, watched or adopted, and not ended yet).
    pub fn is_supervised(&self, pid: i32) -> bool {
        lock(&self.core().state).watched.contains_key(&pid)
    }

    /// The supervised PIDs.
    pub fn supervised(&self) -> Vec<i32> {
        lock(&self.core().state).watched.keys().copied().collect()
    }

    /// Send signal `sig` to a supervised process (through its pidfd: never to a later process that reuses
    /// the PID). `NotSupervised` for any other PID.
    pub fn signal(&self, pid: i32, sig: i32) -> Result<(), SupervisorError> {
        let fd = lock(&self.core().state)
            .watched
            .get(&pid)
            .map(|w| Arc::clone(&w.pidfd))
            .ok_or(SupervisorError::NotSupervised(pid))?;
        // SAFETY: pidfd_send_signal with a null siginfo and no flags reads no memory of ours.
        let rc =
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0u32) };
        if rc == -1 {
            return Err(SupervisorError::Signal { pid, sig, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Send `sig` to the process group of a supervised job (a spawned job leads its own session and
    /// group, so this reaches the processes it started too, unless they moved to groups of their own).
    pub fn signal_group(&self, pid: i32, sig: i32) -> Result<(), SupervisorError> {
        if !self.is_supervised(pid) {
            return Err(SupervisorError::NotSupervised(pid));
        }
        // SAFETY: kill takes plain integers.
        if unsafe { libc::kill(-pid, sig) } == -1 {
            return Err(SupervisorError::Signal { pid, sig, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Open a section in which the children this process forks are safe from the sweeper (see the module
    /// documentation). Hold it around any operation that forks and waits for its own children.
    pub fn fork_scope(&self) -> ForkScope {
        let core = self.core();
        let mut st = lock(&core.state);
        let id = st.next_scope;
        st.next_scope += 1;
        let start = st.epoch;
        st.scopes.insert(id, start);
        ForkScope { core: Arc::clone(core), id }
    }

    /// Keep the sweeper away from `pid` while the guard lives (hold it while waiting for that child).
    /// Register it before the child can exit, or inside a [`ForkScope`] (see [`ForkScope::exclude`]).
    pub fn exclude(&self, pid: i32) -> Exclusion {
        self.core().exclude(pid);
        Exclusion { core: Arc::clone(self.core()), pid }
    }

    /// Sweep now: reap zombie children of this process that nobody can be waiting for. Returns how many
    /// were reaped.
    pub fn sweep(&self) -> usize {
        self.core().sweep()
    }

    fn hub(&self, pid: i32) -> Result<Arc<OutputHub>, SupervisorError> {
        lock(&self.core().hubs).get(&pid).cloned().ok_or(SupervisorError::NotAttachable(pid))
    }

    /// Subscribe to an attachable job's output: the last 64 KiB first, then live output, then the exit.
    /// Works after the exit too, until [`Supervisor::release`].
    pub fn subscribe(&self, pid: i32) -> Result<Subscription, SupervisorError> {
        Ok(self.hub(pid)?.subscribe())
    }

    /// Write to an attachable job's stdin (blocks while the pipe is full; fails once stdin is closed or
    /// the job has exited).
    pub fn write_stdin(&self, pid: i32, data: &[u8]) -> Result<(), SupervisorError> {
        self.hub(pid)?.write_stdin(data).map_err(|source| SupervisorError::Stdin { pid, source })
    }

    /// Close an attachable job's stdin.
    pub fn close_stdin(&self, pid: i32) -> Result<(), SupervisorError> {
        self.hub(pid)?.close_stdin();
        Ok(())
    }

    /// Forget an attachable job's hub (its replay buffer; our stdin end once the pump ends). Call it when
    /// the daemon forgets the job; a later job with the same PID replaces the hub anyway.
    pub fn release(&self, pid: i32) {
        lock(&self.core().hubs).remove(&pid);
    }

    /// New pipes for restoring an attachable job: the child's ends (to be the restored process's fds 0, 1
    /// and 2) and a handle holding ours. `log`: where the restored job's output is also appended.
    pub fn prepare_restore_pipes(&self, log: Option<&Path>) -> Result<RestorePipes, SupervisorError> {
        let log = log.map(open_log).transpose()?;
        RestorePipes::new(log).map_err(|source| SupervisorError::System { what: "creating pipes", source })
    }

    /// Connect a restored job's pipes (from [`Supervisor::prepare_restore_pipes`]) to a new hub and
    /// supervise it: as [`Supervisor::adopt_child`] when `child` (restored as our child), else as
    /// [`Supervisor::watch`]. Do not also call those for this PID. Returns the serial.
    pub fn attach_restored(&self, handle: RestoreHandle, pid: i32, child: bool) -> Result<u64, SupervisorError> {
        let RestoreHandle { stdin, stdout, stderr, log } = handle;
        let hub = OutputHub::start(pid, stdin, stdout, stderr, log)
            .map_err(|source| SupervisorError::System { what: "starting the job's output pump", source })?;
        let previous = lock(&self.core().hubs).insert(pid, Arc::clone(&hub));
        let serial = if child {
            self.adopt(pid, Some(Arc::clone(&hub)))
        } else {
            self.refuse_if_watched(pid)
                .and_then(|()| open_pidfd(pid))
                .map(|fd| self.core().register(pid, fd, false, Some(Arc::clone(&hub))))
        };
        if serial.is_err() {
            let mut hubs = lock(&self.core().hubs);
            match previous {
                Some(p) => hubs.insert(pid, p),
                None => hubs.remove(&pid),
            };
            // Nobody will report an exit to this hub: end its subscribers now.
            hub.process_exited(None);
        }
        serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::attach::{Chunk, RecvError, REPLAY_BYTES, SUBSCRIBER_BACKLOG};
    use std::sync::mpsc::{channel, Receiver};

    /// Tests that make their process a subreaper, sweep every zombie child of it, or open descriptors
    /// without close-on-exec run in a helper process of their own (this test binary, re-run with one test
    /// selected): other tests of the binary wait for children of their own.
    const HELPER_ENV: &str = "CEDANA_SUPERVISOR_TEST_HELPER";

    fn run_in_helper(name: &str) {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args([&format!("jobs::supervisor::tests::{name}"), "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, name)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stdout.contains("1 passed"), "helper {name} failed:\n{stdout}\n{stderr}");
    }

    fn in_helper(name: &str) -> bool {
        std::env::var(HELPER_ENV).as_deref() == Ok(name)
    }

    /// A supervisor without the periodic sweep (safe beside the other tests of this binary).
    fn quiet() -> (Supervisor, Receiver<JobEvent>) {
        let (tx, rx) = channel();
        (Supervisor::with_config(tx, SupervisorConfig { sweep_interval: None }).unwrap(), rx)
    }

    fn sh(script: &str, output: Output) -> SpawnSpec {
        SpawnSpec::new(["sh", "-c", script], output)
    }

    fn exit_of(rx: &Receiver<JobEvent>, pid: i32, serial: u64) -> Option<ExitInfo> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(JobEvent::Exited { pid: p, serial: s, status }) if s == serial => {
                    assert_eq!(p, pid);
                    return status;
                }
                Ok(_) => {}
                Err(e) => panic!("no exit event for {pid}: {e}"),
            }
        }
    }

    /// Everything a subscription yields until it ends: (stdout, stderr, exit chunk, how it ended).
    fn drain(sub: &mut Subscription) -> (Vec<u8>, Vec<u8>, Option<Option<ExitInfo>>, RecvError) {
        let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
        loop {
            match sub.recv_timeout(Duration::from_secs(20)) {
                Ok(Chunk::Stdout(d)) => out.extend(d),
                Ok(Chunk::Stderr(d)) => err.extend(d),
                Ok(Chunk::Exit(s)) => {
                    assert!(exit.is_none(), "two exits");
                    exit = Some(s);
                }
                Err(RecvError::Timeout) => panic!("subscription stalled"),
                Err(end) => return (out, err, exit, end),
            }
        }
    }

    /// Read stdout chunks until `want` has been seen.
    fn read_until(sub: &mut Subscription, want: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while !out.windows(want.len()).any(|w| w == want) {
            match sub.recv_timeout(Duration::from_secs(20)) {
                Ok(Chunk::Stdout(d)) => out.extend(d),
                Ok(_) => {}
                Err(e) => panic!("waiting for {:?}: {e}; got {:?}", String::from_utf8_lossy(want), String::from_utf8_lossy(&out)),
            }
        }
        out
    }

    fn proc_state(pid: i32) -> Option<(char, i32)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&text).map(|(state, ppid, _)| (state, ppid))
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn log_job_gets_both_streams_and_its_exit_code() {
        let (sup, rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job.log");
        let job = sup.spawn(&sh("echo out; echo err >&2; exit 7", Output::Log(log.clone()))).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(7)));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!sup.is_supervised(job.pid));
        // Appended, with the environment and working directory asked for.
        let mut spec = sh("echo \"$GREETING from $(pwd)\"", Output::Log(log.clone()));
        spec.env.push(("GREETING".into(), "hello".into()));
        spec.cwd = Some(dir.path().to_path_buf());
        let job = sup.spawn(&spec).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, format!("out\nerr\nhello from {}\n", dir.path().canonicalize().unwrap().display()));
    }

    #[test]
    fn attachable_cat_echoes_stdin_and_exits_zero() {
        let (sup, rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("cat.log");
        let job = sup.spawn(&SpawnSpec::new(["cat"], Output::Attachable { log: Some(log.clone()) })).unwrap();
        let mut sub = sup.subscribe(job.pid).unwrap();
        sup.write_stdin(job.pid, b"hello\n").unwrap();
        assert_eq!(read_until(&mut sub, b"hello\n"), b"hello\n");
        sup.write_stdin(job.pid, b"again\n").unwrap();
        assert_eq!(read_until(&mut sub, b"again\n"), b"again\n");
        sup.close_stdin(job.pid).unwrap();
        let (out, err, exit, end) = drain(&mut sub);
        assert!(out.is_empty() && err.is_empty());
        assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
        assert_eq!(end, RecvError::Ended);
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\nagain\n");
        let e = sup.write_stdin(job.pid, b"late").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    }

    #[test]
    fn late_subscribers_get_the_replay() {
        let (sup, rx) = quiet();
        let script = "echo early; echo early-err >&2; read line; echo \"late $line\"";
        let job = sup.spawn(&sh(script, Output::Attachable { log: None })).unwrap();
        // Nobody subscribed while the first lines were written: a subscriber sees them from the replay.
        let mut sub = loop {
            let mut sub = sup.subscribe(job.pid).unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Ok(chunk) = sub.recv_timeout(Duration::from_millis(50)) {
                match chunk {
                    Chunk::Stdout(d) => out.extend(d),
                    Chunk::Stderr(d) => err.extend(d),
                    Chunk::Exit(s) => panic!("exited early: {s:?}"),
                }
            }
            if out == b"early\n" && err == b"early-err\n" {
                break sub;
            }
        };
        sup.write_stdin(job.pid, b"x\n").unwrap();
        let (out, err, exit, _) = drain(&mut sub);
        assert_eq!((out.as_slice(), err.as_slice()), (&b"late x\n"[..], &b""[..]));
        assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        // After the exit: the whole replay, then the exit.
        let (out, err, exit, end) = drain(&mut sup.subscribe(job.pid).unwrap());
        assert_eq!(out, b"early\nlate x\n");
        assert_eq!(err, b"early-err\n");
        assert_eq!((exit, end), (Some(Some(ExitInfo::Exited(0))), RecvError::Ended));

        // The replay holds the last 64 KiB only.
        let job = sup.spawn(&sh("head -c 200000 /dev/zero | tr '\\0' a; echo END", Output::Attachable { log: None })).unwrap();
        // The exit event can come before the pump has read everything: wait for the hub's exit chunk.
        let (all, _, _, _) = drain(&mut sup.subscribe(job.pid).unwrap());
        assert!(all.len() <= 200_004 && all.ends_with(b"END\n"), "{}", all.len());
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        let (out, _, exit, _) = drain(&mut sup.subscribe(job.pid).unwrap());
        assert_eq!(out.len(), REPLAY_BYTES);
        assert!(out.ends_with(b"aaaaEND\n") && out[..REPLAY_BYTES - 4].iter().all(|b| *b == b'a'));
        assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
        sup.release(job.pid);
        assert_eq!(sup.subscribe(job.pid).unwrap_err().kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn slow_subscriber_is_disconnected_without_blocking_the_job() {
        let (sup, rx) = quiet();
        // 6.4 MiB, paced so that a reading subscriber keeps up even on a loaded machine, while one that
        // never reads passes the 4 MiB limit.
        const TOTAL: usize = 100 * 65536;
        let script = "i=0; while [ $i -lt 100 ]; do head -c 65536 /dev/zero; sleep 0.01; i=$((i+1)); done";
        let job = sup.spawn(&sh(script, Output::Attachable { log: None })).unwrap();
        let mut idle = sup.subscribe(job.pid).unwrap();
        let mut active = sup.subscribe(job.pid).unwrap();
        let reader = std::thread::spawn(move || {
            let (out, _, exit, end) = drain(&mut active);
            (out.len(), exit, end)
        });
        // The idle subscriber never reads while the job runs, and the job finishes all the same.
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        assert_eq!(reader.join().unwrap(), (TOTAL, Some(Some(ExitInfo::Exited(0))), RecvError::Ended));
        let (out, _, exit, end) = drain(&mut idle);
        assert!(out.len() <= SUBSCRIBER_BACKLOG && !out.is_empty(), "{}", out.len());
        assert_eq!((exit, end), (None, RecvError::Lagged));
        assert!(idle.lagged());
    }

    #[test]
    fn watch_reports_the_exit_of_a_non_child_without_status() {
        let (sup, rx) = quiet();
        let out = Command::new("sh").args(["-c", "sleep 1 >/dev/null 2>&1 & echo $!"]).output().unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let started = Instant::now();
        let serial = sup.watch(pid).unwrap();
        assert!(sup.is_supervised(pid));
        assert_eq!(sup.watch(pid).unwrap_err().kind(), ErrorKind::AlreadyExists);
        assert_eq!(exit_of(&rx, pid, serial), None);
        assert!(started.elapsed() >= Duration::from_millis(300), "reported too early: {:?}", started.elapsed());
        assert!(!sup.is_supervised(pid));
        let missing = sup.watch(i32::MAX).unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    }

    #[test]
    fn adopt_child_reports_the_real_status() {
        let (sup, rx) = quiet();
        let (pid, serial) = {
            let _scope = sup.fork_scope();
            // Reaped by the supervisor.
            let pid = Command::new("sh").args(["-c", "sleep 0.2; exit 3"]).spawn().unwrap().id() as i32;
            (pid, sup.adopt_child(pid).unwrap())
        };
        assert_eq!(exit_of(&rx, pid, serial), Some(ExitInfo::Exited(3)));
        assert!(proc_state(pid).is_none(), "not reaped");
        // Already exited (a zombie) when adopted.
        let (pid, serial) = {
            let _scope = sup.fork_scope();
            // Reaped by the supervisor.
            let pid = Command::new("sh").args(["-c", "kill -9 $$"]).spawn().unwrap().id() as i32;
            wait_for("the child to die", || proc_state(pid).is_some_and(|(s, _)| s == 'Z'));
            (pid, sup.adopt_child(pid).unwrap())
        };
        assert_eq!(exit_of(&rx, pid, serial), Some(ExitInfo::Signaled(libc::SIGKILL)));
        let e = sup.adopt_child(1).unwrap_err();
        assert!(matches!(e, SupervisorError::NotAChild(1)) && e.kind() == ErrorKind::FailedPrecondition, "{e}");
        assert!(lock(&sup.core().state).exclusions.is_empty());
    }

    #[test]
    fn signals_reach_supervised_processes_only() {
        let (sup, rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        let job = sup.spawn(&SpawnSpec::new(["sleep", "30"], Output::Log(dir.path().join("l")))).unwrap();
        sup.signal(job.pid, libc::SIGTERM).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Signaled(libc::SIGTERM)));
        let e = sup.signal(job.pid, libc::SIGTERM).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        // The group: the job and what it started.
        let log = dir.path().join("group");
        let job = sup.spawn(&sh("sleep 30 & echo $!; wait", Output::Log(log.clone()))).unwrap();
        wait_for("the background pid", || std::fs::read_to_string(&log).is_ok_and(|t| t.ends_with('\n')));
        let bg: i32 = std::fs::read_to_string(&log).unwrap().trim().parse().unwrap();
        let e = sup.signal(job.pid, 1000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        sup.signal_group(job.pid, libc::SIGKILL).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Signaled(libc::SIGKILL)));
        wait_for("the background sleep to die", || proc_state(bg).is_none_or(|(s, _)| s == 'Z'));
    }

    #[test]
    fn restored_pipes_feed_a_new_hub() {
        let (sup, rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("restored.log");
        let pipes = sup.prepare_restore_pipes(Some(&log)).unwrap();
        // Stands in for CRIU: a process whose fds 0-2 are the child's ends.
        let scope = sup.fork_scope();
        let pid = {
            let mut cmd = Command::new("cat");
            cmd.stdin(Stdio::from(pipes.stdin)).stdout(Stdio::from(pipes.stdout)).stderr(Stdio::from(pipes.stderr));
            cmd.spawn().unwrap().id() as i32
        };
        let serial = sup.attach_restored(pipes.handle, pid, true).unwrap();
        drop(scope);
        let mut sub = sup.subscribe(pid).unwrap();
        sup.write_stdin(pid, b"restored\n").unwrap();
        assert_eq!(read_until(&mut sub, b"restored\n"), b"restored\n");
        sup.close_stdin(pid).unwrap();
        let (_, _, exit, _) = drain(&mut sub);
        assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
        assert_eq!(exit_of(&rx, pid, serial), Some(ExitInfo::Exited(0)));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "restored\n");
    }

    #[test]
    fn errors_have_kinds() {
        let (sup, _rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        let log = Output::Log(dir.path().join("l"));
        let e = sup.spawn(&SpawnSpec::new(Vec::<String>::new(), log.clone())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = sup.spawn(&SpawnSpec::new(["/nonexistent/program"], log.clone())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        let e = sup.spawn(&SpawnSpec::new(["true"], Output::Log(dir.path().join("no/such/dir/l")))).unwrap_err();
        assert!(matches!(e, SupervisorError::Log { .. }) && e.kind() == ErrorKind::NotFound, "{e}");
        let job = sup.spawn(&SpawnSpec::new(["sleep", "10"], log)).unwrap();
        let e = sup.write_stdin(job.pid, b"x").unwrap_err();
        assert!(matches!(e, SupervisorError::NotAttachable(_)) && e.kind() == ErrorKind::FailedPrecondition, "{e}");
        sup.signal(job.pid, libc::SIGKILL).unwrap();
        assert!(lock(&sup.core().state).exclusions.len() <= 1);
    }

    #[test]
    fn spawned_jobs_have_only_stdio_open() {
        run_in_helper("helper_only_stdio");
    }

    #[test]
    #[ignore = "runs in a helper process (spawned_jobs_have_only_stdio_open)"]
    fn helper_only_stdio() {
        if !in_helper("helper_only_stdio") {
            return;
        }
        // A descriptor this process leaks (not close-on-exec) must not reach the job either.
        // SAFETY: open with a NUL-terminated path; the descriptor stays open for the test's lifetime.
        let leaked = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        assert!(leaked > 2);
        let (sup, rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        for output in [Output::Log(dir.path().join("l")), Output::Attachable { log: Some(dir.path().join("a")) }] {
            let job = sup.spawn(&SpawnSpec::new(["sleep", "30"], output)).unwrap();
            let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", job.pid))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            fds.sort();
            assert_eq!(fds, ["0", "1", "2"]);
            let st = crate::procfs::stat(job.pid).unwrap();
            assert_eq!((st.sid, st.pgid), (job.pid, job.pid), "not in a session of its own");
            sup.signal(job.pid, libc::SIGKILL).unwrap();
            assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Signaled(libc::SIGKILL)));
        }
    }

    #[test]
    fn sweeper_reaps_orphans_but_not_children_waited_for() {
        run_in_helper("helper_sweeper");
    }

    #[test]
    #[ignore = "runs in a helper process (sweeper_reaps_orphans_but_not_children_waited_for)"]
    fn helper_sweeper() {
        if !in_helper("helper_sweeper") {
            return;
        }
        become_subreaper().unwrap();
        let (tx, rx) = channel();
        let sup = Supervisor::with_config(tx, SupervisorConfig { sweep_interval: Some(Duration::from_millis(20)) }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job.log");
        // A child that this thread waits for itself, made while sweeps run: it exits at once.
        let waiter = {
            let sup = sup.clone();
            std::thread::spawn(move || {
                let (mut child, _exclusion) = {
                    let scope = sup.fork_scope();
                    let child = Command::new("sh").args(["-c", "exit 5"]).spawn().unwrap();
                    // A zombie for many sweeps while only the scope protects it...
                    std::thread::sleep(Duration::from_millis(300));
                    let exclusion = scope.exclude(child.id() as i32);
                    (child, exclusion)
                };
                // ... then for many more under the exclusion alone.
                std::thread::sleep(Duration::from_millis(300));
                child.wait().unwrap().code()
            })
        };
        // A job that leaves a grandchild behind, re-parented to us when the job exits.
        let job = sup.spawn(&sh("sleep 0.4 >/dev/null 2>&1 & echo $!", Output::Log(log.clone()))).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        let grandchild: i32 = std::fs::read_to_string(&log).unwrap().trim().parse().unwrap();
        assert_eq!(proc_state(grandchild).map(|(_, ppid)| ppid), Some(me()), "not re-parented to us");
        wait_for("the orphan to be reaped", || proc_state(grandchild).is_none());
        assert_eq!(waiter.join().unwrap(), Some(5));
        std::thread::sleep(Duration::from_millis(100));
        assert!(zombie_children(me()).is_empty(), "zombies left: {:?}", zombie_children(me()));
        assert!(lock(&sup.core().state).exclusions.is_empty());
    }

    #[test]
    fn sweep_on_demand_respects_scopes_and_exclusions() {
        run_in_helper("helper_sweep_on_demand");
    }

    #[test]
    #[ignore = "runs in a helper process (sweep_on_demand_respects_scopes_and_exclusions)"]
    fn helper_sweep_on_demand() {
        if !in_helper("helper_sweep_on_demand") {
            return;
        }
        become_subreaper().unwrap();
        let (sup, rx) = quiet();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job.log");
        assert_eq!(sup.sweep(), 0);
        let job = sup.spawn(&sh("sleep 0.2 >/dev/null 2>&1 & echo $!", Output::Log(log.clone()))).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
        let orphan: i32 = std::fs::read_to_string(&log).unwrap().trim().parse().unwrap();
        wait_for("the orphan to die", || proc_state(orphan) == Some(('Z', me())));

        // A scope opened before the orphan was first seen protects it (it might be the scope's child)...
        let scope = sup.fork_scope();
        let mut in_scope = Command::new("true").spawn().unwrap();
        let in_scope_pid = in_scope.id() as i32;
        wait_for("the scope's child to exit", || proc_state(in_scope_pid) == Some(('Z', me())));
        assert_eq!(sup.sweep(), 0);
        // ... and a scope opened after the sighting does not.
        drop(scope);
        let late_scope = sup.fork_scope();
        let _exclusion = sup.exclude(in_scope_pid);
        assert_eq!(sup.sweep(), 1);
        assert!(proc_state(orphan).is_none());
        assert_eq!(proc_state(in_scope_pid), Some(('Z', me())), "an excluded child was reaped");
        assert_eq!(in_scope.wait().unwrap().code(), Some(0));
        drop(late_scope);
        assert_eq!(sup.sweep(), 0);
        assert!(zombie_children(me()).is_empty());
    }

    #[test]
    fn fifty_jobs_from_five_threads() {
        run_in_helper("helper_fifty_jobs");
    }

    #[test]
    #[ignore = "runs in a helper process (fifty_jobs_from_five_threads)"]
    fn helper_fifty_jobs() {
        if !in_helper("helper_fifty_jobs") {
            return;
        }
        become_subreaper().unwrap();
        let (tx, rx) = channel();
        let sup = Supervisor::with_config(tx, SupervisorConfig { sweep_interval: Some(Duration::from_millis(20)) }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..5)
            .map(|t| {
                let sup = sup.clone();
                let log = dir.path().join(format!("t{t}.log"));
                std::thread::spawn(move || {
                    (0..10)
                        .map(|i| {
                            let code = t * 10 + i;
                            let attach = i % 3 == 0;
                            let output = if attach { Output::Attachable { log: None } } else { Output::Log(log.clone()) };
                            let job = sup.spawn(&sh(&format!("echo {code}; exit {code}"), output)).unwrap();
                            (job.serial, (job.pid, code))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut expected: HashMap<u64, (i32, i32)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(expected.len(), 50);
        for _ in 0..50 {
            match rx.recv_timeout(Duration::from_secs(20)).unwrap() {
                JobEvent::Exited { pid, serial, status } => {
                    let (want_pid, code) = expected.remove(&serial).expect("an unexpected or repeated event");
                    assert_eq!((pid, status), (want_pid, Some(ExitInfo::Exited(code))));
                }
            }
        }
        assert!(expected.is_empty());
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "more than 50 events");
        assert!(zombie_children(me()).is_empty(), "zombies left: {:?}", zombie_children(me()));
        assert!(sup.supervised().is_empty());
    }
}
