//! Exits: [`ExitInfo`] and [`JobEvent`], and the event thread that waits for every supervised process at
//! once (a pidfd per process, polled together) and reaps children with `waitid(P_PIDFD)`, which can reap no
//! other process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::attach::OutputHub;
use super::{lock, Core, SupervisorError, Watched, Watching};

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

/// [`pidfd_open`] for a PID a caller named.
pub(super) fn open_pidfd(pid: i32) -> Result<OwnedFd, SupervisorError> {
    pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) | Some(libc::EINVAL) => SupervisorError::NoSuchProcess(pid),
        _ => SupervisorError::System { what: "pidfd_open", source: e },
    })
}

pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(super) enum Reaped {
    /// Not exited yet.
    Alive,
    /// Reaped (the status when it could be decoded), or not our child to reap.
    Done(Option<ExitInfo>),
}

/// `waitid` on a pidfd, so that exactly that process can be reaped. `nowait`: only look.
pub(super) fn wait_pidfd(fd: BorrowedFd<'_>, nowait: bool) -> io::Result<Reaped> {
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

impl Core {
    pub(super) fn register(&self, pid: i32, pidfd: OwnedFd, child: bool, hub: Option<Arc<OutputHub>>) -> u64 {
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
}

pub(super) fn event_loop(core: Arc<Core>, wake: OwnedFd, interval: Option<Duration>) {
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
