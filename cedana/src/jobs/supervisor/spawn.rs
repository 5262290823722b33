//! Starting jobs: what to run ([`SpawnSpec`]), where its stdio goes ([`Output`]), and the set-up between
//! fork and exec (a session of its own, every descriptor but 0, 1 and 2 closed on exec).

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::errno::Errno;

use super::events::pidfd_open;
use super::{lock, Supervisor, SupervisorError};

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
    /// Run as this user instead of the daemon's (root).
    pub user: Option<Credentials>,
}

/// A user to run a job as: uid, gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl SpawnSpec {
    /// `args` run with the daemon's working directory and environment.
    pub fn new<I, S>(args: I, output: Output) -> SpawnSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SpawnSpec {
            args: args.into_iter().map(Into::into).collect(),
            cwd: None,
            env: Vec::new(),
            clear_env: false,
            output,
            user: None,
        }
    }
}

/// A started job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    pub pid: i32,
    /// Names this process in [`JobEvent`](super::JobEvent)s (a later process with the same PID gets another serial).
    pub serial: u64,
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

pub(super) fn open_log(path: &Path) -> Result<File, SupervisorError> {
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

impl Supervisor {
    /// The body of [`Supervisor::spawn`].
    pub(super) fn start(&self, spec: &SpawnSpec) -> Result<Spawned, SupervisorError> {
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
        let user = spec.user.clone();
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe system calls (the
        // groups were collected before the fork).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(u) = &user {
                    // Groups first, then the gid, then the uid (after which nothing more may be changed).
                    if libc::setgroups(u.groups.len(), u.groups.as_ptr()) == -1
                        || libc::setresgid(u.gid, u.gid, u.gid) == -1
                        || libc::setresuid(u.uid, u.uid, u.uid) == -1
                    {
                        return Err(io::Error::last_os_error());
                    }
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
            match self.start_hub(pid, Some(i.into()), o.into(), e.into(), log) {
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
}
