//! The stdio holder of an attachable job: a small process (`cedana __hold-stdio`) started next to each
//! attachable job, holding copies of the daemon's ends of the job's pipes, so that the job does not depend
//! on the daemon staying up.
//!
//! Without it, a daemon that stops or crashes closes the only read ends of the job's stdout and stderr
//! (the job dies of SIGPIPE at its next write) and the only write end of its stdin (the job reads end of
//! file). With it:
//! - while the daemon runs, it holds a link to the holder (a socket pair). The holder only waits: the
//!   daemon's own pump reads the output. A `C` on the link makes the holder close its copy of stdin (a
//!   client closed the job's stdin);
//! - when the link closes (the daemon is gone), the holder reads the job's output itself and appends it to
//!   the job's log (when it has one; otherwise it is dropped), so the job never blocks on a full pipe, and
//!   keeps stdin open;
//! - a restarted daemon connects to the holder's socket (`DIR/PID.HOLDER_PID.sock`, in a root-only folder;
//!   the holder also checks that the caller's uid is its own) and receives the pipes again by
//!   `SCM_RIGHTS` ([`reclaim`]). From then on that connection is the link and the holder waits again;
//! - when the job exits the holder drains what is left in the pipes into the log (if no daemon is linked)
//!   and exits, removing its socket.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, socketpair, sockopt, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

use crate::engine::leftovers::running as alive;
use crate::error::ErrorKind;

/// The first argument that makes the `cedana` binary a holder ([`run_if_invoked`]).
pub const COMMAND: &str = "__hold-stdio";
/// On the link: close your copy of the job's stdin.
const CLOSE_STDIN: u8 = b'C';
/// In the hand-over message: stdin is among the descriptors (it comes last).
const HAS_STDIN: u8 = 1;
/// After the job exits, at most this much is drained from each pipe into the log.
const EXIT_DRAIN_LIMIT: usize = 2 * 1024 * 1024;

/// Where holders are started from and where their sockets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderConfig {
    /// The `cedana` binary (run as `cedana __hold-stdio ...`).
    pub exe: PathBuf,
    /// A root-only folder for the holders' sockets.
    pub dir: PathBuf,
}

/// What went wrong with a holder.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("starting the stdio holder of job {pid}: {source}")]
    Spawn { pid: i32, source: io::Error },
    #[error("no stdio holder of process {pid} answers in {}", dir.display())]
    NotFound { pid: i32, dir: PathBuf },
    #[error("the stdio holder of process {pid}: {source}")]
    Io { pid: i32, source: io::Error },
}

impl HolderError {
    /// The class of this error, for the wire.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HolderError::Spawn { source, .. } | HolderError::Io { source, .. } => ErrorKind::of_io(source),
            HolderError::NotFound { .. } => ErrorKind::NotFound,
        }
    }
}

/// The daemon's link to a running holder: while it is open the holder leaves the pipes to the daemon;
/// dropping it (or the daemon's death) tells the holder to take them over.
#[derive(Debug)]
pub struct HolderLink(OwnedFd);

impl HolderLink {
    /// Tell the holder to close its copy of the job's stdin (so that the job reads end of file).
    pub fn close_stdin(&self) {
        // A holder that is gone has no stdin to close.
        let _ = socket::send(self.0.as_raw_fd(), &[CLOSE_STDIN], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
    }
}

/// The job's pipes as the daemon holds them (stdin: the write end; stdout, stderr: the read ends).
#[derive(Debug, Clone, Copy)]
pub struct PipeEnds<'a> {
    pub stdin: Option<BorrowedFd<'a>>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    /// The job's log (append mode), where the holder writes while no daemon is linked.
    pub log: Option<BorrowedFd<'a>>,
}

/// Start a holder for job `pid` over copies of `ends`, in a session of its own. The caller reaps it when
/// it exits (the daemon's orphan sweeper does).
pub fn spawn(config: &HolderConfig, pid: i32, ends: PipeEnds<'_>) -> Result<HolderLink, HolderError> {
    let spawn_err = |source| HolderError::Spawn { pid, source };
    let (ours, theirs) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).map_err(|e| spawn_err(e.into()))?;
    let mut cmd = Command::new(&config.exe);
    cmd.arg(COMMAND).arg(pid.to_string()).arg(&config.dir);
    let mut keep: Vec<RawFd> = Vec::new();
    let mut pass = |cmd: &mut Command, name: &str, fd: Option<BorrowedFd<'_>>| {
        if let Some(fd) = fd {
            cmd.arg(format!("{name}={}", fd.as_raw_fd()));
            keep.push(fd.as_raw_fd());
        }
    };
    pass(&mut cmd, "link", Some(theirs.as_fd()));
    pass(&mut cmd, "stdin", ends.stdin);
    pass(&mut cmd, "stdout", Some(ends.stdout));
    pass(&mut cmd, "stderr", Some(ends.stderr));
    pass(&mut cmd, "log", ends.log);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe system calls: a new session, and the passed
    // descriptors made inheritable (they are close-on-exec in the daemon).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(spawn_err)?;
    tracing::debug!(pid, holder = child.id(), "stdio holder started");
    drop(child); // neither waits nor kills: the orphan sweeper reaps it
    Ok(HolderLink(ours))
}

/// The pipes of a job taken back from its holder by a restarted daemon.
#[derive(Debug)]
pub struct Reclaimed {
    /// The write end of stdin; `None` when it had been closed.
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub link: HolderLink,
}

/// The job's and the holder's PIDs in a socket name `PID.HOLDER.sock`.
fn socket_pids(name: &str) -> Option<(i32, i32)> {
    let (job, holder) = name.strip_suffix(".sock")?.split_once('.')?;
    Some((job.parse().ok()?, holder.parse().ok()?))
}

/// Take job `pid`'s pipes back from its holder (see the module documentation). Sockets of holders that
/// are gone are removed on the way.
pub fn reclaim(dir: &Path, pid: i32) -> Result<Reclaimed, HolderError> {
    let io_err = |source| HolderError::Io { pid, source };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(HolderError::NotFound { pid, dir: dir.into() }),
        Err(e) => return Err(io_err(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(holder) = socket_pids(&name).filter(|(job, _)| *job == pid).map(|(_, h)| h) else { continue };
        let path = entry.path();
        if !alive(holder) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match take_over(&path) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => continue,
            Err(e) => tracing::warn!(pid, socket = %path.display(), error = %e, "a stdio holder did not hand over"),
        }
    }
    Err(HolderError::NotFound { pid, dir: dir.into() })
}

/// Connect to one holder and receive the pipes; `None` when it hung up without them (its job is gone).
fn take_over(path: &Path) -> io::Result<Option<Reclaimed>> {
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(5, 0))?;
    let mut flags = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut flags)];
    let mut space = nix::cmsg_space!([RawFd; 3]);
    let msg = loop {
        match recvmsg::<UnixAddr>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us alone.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.bytes == 0 {
        return Ok(None);
    }
    let has_stdin = flags[0] & HAS_STDIN != 0;
    if fds.len() != 2 + usize::from(has_stdin) {
        return Err(io::Error::other(format!("the holder sent {} descriptors", fds.len())));
    }
    let stdin = has_stdin.then(|| fds.pop()).flatten();
    let stderr = fds.pop();
    let stdout = fds.pop();
    let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
        return Err(io::Error::other("the holder sent too few descriptors"));
    };
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(0, 0))?;
    Ok(Some(Reclaimed { stdin, stdout, stderr, link: HolderLink(fd) }))
}

/// Remove the sockets in `dir` whose holder is gone (a killed holder leaves its socket).
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if socket_pids(&name).is_some_and(|(_, holder)| !alive(holder)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// When this process was started as a holder (`cedana __hold-stdio PID DIR name=FD...`), hold and exit.
pub fn run_if_invoked() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(COMMAND) {
        return;
    }
    let code = match parse(&args[2..]).and_then(|(held, dir)| hold(held, &dir)) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    std::process::exit(code);
}

fn parse(args: &[String]) -> io::Result<(Held, PathBuf)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("stdio holder: bad {what}"));
    let pid: i32 = args.first().and_then(|p| p.parse().ok()).ok_or_else(|| bad("PID"))?;
    let dir = PathBuf::from(args.get(1).ok_or_else(|| bad("folder"))?);
    let mut held = Held { pid, stdin: None, stdout: None, stderr: None, log: None, link: None };
    for a in &args[2..] {
        let (name, fd) = a.split_once('=').ok_or_else(|| bad("argument"))?;
        let fd: RawFd = fd.parse().map_err(|_| bad("descriptor"))?;
        if fd < 3 {
            return Err(bad("descriptor"));
        }
        // SAFETY: the daemon passed this descriptor to us by this number, for us alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match name {
            "link" => held.link = Some(owned),
            "stdin" => held.stdin = Some(owned),
            "stdout" => held.stdout = Some(owned),
            "stderr" => held.stderr = Some(owned),
            "log" => held.log = Some(File::from(owned)),
            _ => return Err(bad("argument")),
        }
    }
    Ok((held, dir))
}

/// What a holder holds.
#[derive(Debug)]
pub struct Held {
    pub pid: i32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub log: Option<File>,
    /// The link to the daemon that started the holder.
    pub link: Option<OwnedFd>,
}

/// Removes the holder's socket when it ends.
struct Socket(PathBuf);

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The holder's loop (see the module documentation); returns when the job has exited.
pub fn hold(mut held: Held, dir: &Path) -> io::Result<()> {
    let pidfd = crate::jobs::supervisor::pidfd_open(held.pid)?;
    let path = dir.join(format!("{}.{}.sock", held.pid, std::process::id()));
    let listener = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    let _ = std::fs::remove_file(&path);
    bind(listener.as_raw_fd(), &UnixAddr::new(&path)?)?;
    let _socket = Socket(path);
    listen(&listener, Backlog::new(4)?)?;
    for fd in [&held.stdout, &held.stderr].into_iter().flatten() {
        crate::jobs::attach::set_nonblocking(fd.as_fd())?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (exited, incoming, link_ready, ready) = wait(&held, &pidfd, &listener)?;
        if link_ready {
            read_link(&mut held);
        }
        if incoming {
            accept(&mut held, &listener, &pidfd);
        }
        for (i, is_ready) in ready.into_iter().enumerate() {
            if is_ready {
                pump_once(&mut held, i, &mut buf);
            }
        }
        if exited {
            if held.link.is_none() {
                for i in 0..2 {
                    let mut taken = 0;
                    while taken < EXIT_DRAIN_LIMIT {
                        match pump_once(&mut held, i, &mut buf) {
                            Some(n) if n > 0 => taken += n,
                            _ => break,
                        }
                    }
                }
            }
            return Ok(());
        }
    }
}

/// Poll the job's pidfd, the listener, and the link (while linked) or the pipes (while not).
fn wait(held: &Held, pidfd: &OwnedFd, listener: &OwnedFd) -> io::Result<(bool, bool, bool, [bool; 2])> {
    let mut fds = vec![PollFd::new(pidfd.as_fd(), PollFlags::POLLIN), PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let mut pipes = Vec::new();
    match &held.link {
        Some(link) => fds.push(PollFd::new(link.as_fd(), PollFlags::POLLIN)),
        None => {
            for (i, p) in [&held.stdout, &held.stderr].into_iter().enumerate() {
                if let Some(p) = p {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                    pipes.push(i);
                }
            }
        }
    }
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let set = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
    let link_ready = held.link.is_some() && set(2);
    let mut ready = [false; 2];
    for (k, i) in pipes.into_iter().enumerate() {
        ready[i] = set(2 + k);
    }
    Ok((set(0), set(1), link_ready, ready))
}

/// A message from the daemon, or its hang-up.
fn read_link(held: &mut Held) {
    let Some(link) = &held.link else { return };
    let mut msg = [0u8; 16];
    match socket::recv(link.as_raw_fd(), &mut msg, MsgFlags::MSG_DONTWAIT) {
        Ok(0) => held.link = None,
        Ok(n) => {
            if msg[..n].contains(&CLOSE_STDIN) {
                held.stdin = None;
            }
        }
        Err(Errno::EAGAIN | Errno::EINTR) => {}
        Err(_) => held.link = None,
    }
}

/// A daemon connects: hand it the pipes, and take its connection as the link.
fn accept(held: &mut Held, listener: &OwnedFd, pidfd: &OwnedFd) {
    let Ok(raw) = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) else { return };
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: geteuid cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    let Ok(cred) = getsockopt(&conn, sockopt::PeerCredentials) else { return };
    if cred.uid() != own_uid {
        return;
    }
    // A job that has just exited is not handed over (the connection closes without a message).
    let mut probe = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    if poll(&mut probe, PollTimeout::ZERO).unwrap_or(0) > 0 {
        return;
    }
    let (Some(out), Some(err)) = (&held.stdout, &held.stderr) else { return };
    let mut raws = vec![out.as_raw_fd(), err.as_raw_fd()];
    let mut flags = 0u8;
    if let Some(i) = &held.stdin {
        raws.push(i.as_raw_fd());
        flags |= HAS_STDIN;
    }
    let flags = [flags];
    let sent = sendmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &[IoSlice::new(&flags)],
        &[ControlMessage::ScmRights(&raws)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    if sent.is_ok() {
        held.link = Some(conn);
    }
}

/// Read one chunk of stream `i` into the log (while no daemon is linked). `Some(0)` at end of file.
fn pump_once(held: &mut Held, i: usize, buf: &mut [u8]) -> Option<usize> {
    let fd = [&held.stdout, &held.stderr][i].as_ref()?;
    let n = loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return None,
            Err(_) => break 0,
        }
    };
    if n == 0 {
        // Every writer is gone (no daemon is linked while the holder reads): stop watching it.
        match i {
            0 => held.stdout = None,
            _ => held.stderr = None,
        }
        return Some(0);
    }
    if let Some(log) = &mut held.log {
        if log.write_all(&buf[..n]).is_err() {
            held.log = None;
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests;
