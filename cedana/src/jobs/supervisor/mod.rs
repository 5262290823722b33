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

mod events;
mod spawn;
mod sweep;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::attach::{self, OutputHub, RestoreHandle, RestorePipes, Subscription};
use super::fifos::ContainerFifos;
use super::holder::{self, HolderConfig, HolderError, PipeEnds};
use crate::error::ErrorKind;
pub(crate) use events::pidfd_open;
use events::{event_loop, open_pidfd, wait_pidfd};
use spawn::open_log;

pub use events::{ExitInfo, JobEvent};
pub use spawn::{Credentials, Output, SpawnSpec, Spawned};
pub use sweep::{become_subreaper, Exclusion, ForkScope};

/// Settings of a [`Supervisor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// How often the orphan sweeper runs; `None`: only on [`Supervisor::sweep`].
    pub sweep_interval: Option<Duration>,
    /// Start a stdio holder ([`super::holder`]) next to each attachable job, so it outlives the daemon.
    pub holder: Option<HolderConfig>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig { sweep_interval: Some(Duration::from_millis(250)), holder: None }
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
    #[error(transparent)]
    Holder(#[from] HolderError),
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
            SupervisorError::Holder(e) => e.kind(),
        }
    }
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
    holder: Option<HolderConfig>,
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

impl Core {
    fn wake(&self) {
        // A full pipe already holds a wake-up.
        let _ = nix::unistd::write(&self.wake, &[1]);
    }
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
            holder: config.holder.clone(),
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
        self.start(spec)
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
        ForkScope::open(self.core())
    }

    /// Keep the sweeper away from `pid` while the guard lives (hold it while waiting for that child).
    /// Register it before the child can exit, or inside a [`ForkScope`] (see [`ForkScope::exclude`]).
    pub fn exclude(&self, pid: i32) -> Exclusion {
        Exclusion::new(self.core(), pid)
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

    /// FIFOs for an attachable container's stdio in `dir` (see [`super::fifos`]); once its task runs, hand
    /// [`ContainerFifos::opened`] to [`Supervisor::attach_restored`]. `log`: where its output is also appended.
    pub fn prepare_fifos(&self, dir: &Path, log: Option<&Path>) -> Result<ContainerFifos, SupervisorError> {
        let log = log.map(open_log).transpose()?;
        ContainerFifos::create(dir, log).map_err(|source| SupervisorError::System { what: "creating FIFOs", source })
    }

    /// Connect a restored job's pipes (from [`Supervisor::prepare_restore_pipes`]) to a new hub and
    /// supervise it: as [`Supervisor::adopt_child`] when `child` (restored as our child), else as
    /// [`Supervisor::watch`]. Do not also call those for this PID. Returns the serial.
    pub fn attach_restored(&self, handle: RestoreHandle, pid: i32, child: bool) -> Result<u64, SupervisorError> {
        let RestoreHandle { stdin, stdout, stderr, log } = handle;
        let hub = self
            .start_hub(pid, Some(stdin), stdout, stderr, log)
            .map_err(|source| SupervisorError::System { what: "starting the job's output pump", source })?;
        self.attach_hub(pid, hub, child)
    }

    /// Take an attachable job's pipes back from its stdio holder (a job the daemon started before it
    /// restarted) and supervise it as [`Supervisor::watch`] does, with a new hub appending to `log`.
    pub fn reattach(&self, pid: i32, log: Option<&Path>) -> Result<u64, SupervisorError> {
        let config = self.core().holder.as_ref().ok_or(SupervisorError::NotAttachable(pid))?;
        let back = holder::reclaim(&config.dir, pid)?;
        let log = log.map(open_log).transpose()?;
        let hub = OutputHub::start(pid, back.stdin, back.stdout, back.stderr, log)
            .map_err(|source| SupervisorError::System { what: "starting the job's output pump", source })?;
        hub.set_holder(back.link);
        self.attach_hub(pid, hub, false)
    }

    /// A hub over a job's pipes, with a stdio holder next to the job when configured (a holder that
    /// cannot start is logged: the job then depends on the daemon, as without one).
    pub(super) fn start_hub(
        &self,
        pid: i32,
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
        log: Option<std::fs::File>,
    ) -> io::Result<Arc<OutputHub>> {
        let link = self.core().holder.as_ref().and_then(|config| {
            let ends = PipeEnds {
                stdin: stdin.as_ref().map(|f| f.as_fd()),
                stdout: stdout.as_fd(),
                stderr: stderr.as_fd(),
                log: log.as_ref().map(|f| f.as_fd()),
            };
            let _scope = self.fork_scope();
            holder::spawn(config, pid, ends)
                .inspect_err(|e| tracing::warn!(pid, error = %e, "the job will not outlive the daemon's pipes"))
                .ok()
        });
        let hub = OutputHub::start(pid, stdin, stdout, stderr, log)?;
        if let Some(link) = link {
            hub.set_holder(link);
        }
        Ok(hub)
    }

    /// Supervise `pid` with `hub` (see [`Supervisor::attach_restored`]).
    fn attach_hub(&self, pid: i32, hub: Arc<OutputHub>, child: bool) -> Result<u64, SupervisorError> {
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
