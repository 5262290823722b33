//! The CRIU driver that speaks CRIU's RPC protocol to a `criu swrk` child: one request, CRIU's notifications
//! answered over the same socket, one final response. Unlike [`super::cli::CliDriver`] it needs no action
//! script, so it works from any executable, and the restored PID comes back in the response.
//!
//! How CRIU reads the request (cr-service.c, CRIU 4.2):
//! - `images_dir_fd` / `work_dir_fd` are opened as `/proc/<peer>/fd/<N>`, the peer being the socket's
//!   SO_PEERCRED process: for a socketpair, the process that created it, i.e. us. We also let the child
//!   inherit both at the same numbers, so they name the same folders in either process.
//! - `inherit_fd { key, fd }` names the criu process's OWN descriptor `fd` (it is dup'ed into the restored
//!   task). The CLI form `fd[N]:RESOURCE` means our fd N, which `criu restore` sees as its fd N: the driver
//!   makes the child inherit our fd N at N (or, for N = 0..2, the stdio given in the call).
//! - `rst_sibling` forks the restored root with CLONE_PARENT: it becomes the child of CRIU's parent (us).
//! - `config_file` is read after the RPC options and overrides them; it takes CRIU's long options, one per
//!   line (`name` or `name value`): that is how [`CriuOptions::extra`] reaches CRIU.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use prost::Message;

use super::options::CriuOptions;
use super::rpc::{CriuCgMode, CriuNetworkLockMethod, CriuOpts, CriuReq, CriuReqType, CriuResp, InheritFd};
use super::{log, Criu, CriuDriver, CriuError, DumpCall, RestoreCall};

/// CRIU's log level for our runs (`-v4`, as the CLI driver).
const LOG_LEVEL: i32 = 4;
/// Largest message we accept from CRIU (its responses are a few hundred bytes).
const MAX_MESSAGE: usize = 64 << 10;

/// Runs CRIU as `criu swrk <fd>` and drives it over its RPC socket.
#[derive(Debug, Clone)]
pub struct SwrkDriver {
    criu: Criu,
}

impl SwrkDriver {
    pub fn new(criu: Criu) -> Self {
        Self { criu }
    }
}

impl CriuDriver for SwrkDriver {
    fn criu(&self) -> &Criu {
        &self.criu
    }

    fn dump(&self, call: &DumpCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<(), CriuError> {
        if call.stream {
            // CRIU's service cannot stream images (it has no streamer mode): the command line can.
            return super::cli::CliDriver::new(self.criu.clone()).dump(call, on_notify);
        }
        let dirs = self.open_dirs(call.images_dir, call.work_dir)?;
        let mut opts = dump_opts(call.options, call.pid, call.leave_running).map_err(|e| self.invalid(e))?;
        self.complete(&mut opts, &dirs, "dump", call.work_dir, &call.options.extra)?;
        let null = || std::fs::File::options().read(true).write(true).open("/dev/null");
        let stdio = (0..3).map(|_| null()).collect::<Result<Vec<_>, _>>().map_err(|e| self.spawn_error(e))?;
        self.run("dump", CriuReqType::Dump, opts, &dirs, call.work_dir, Some(stdio), Vec::new(), on_notify)?;
        Ok(())
    }

    fn restore(&self, call: &RestoreCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<i32, CriuError> {
        if call.stream {
            return super::cli::CliDriver::new(self.criu.clone()).restore(call, on_notify);
        }
        // Checked before our own descriptors exist, so a caller's fd N cannot collide with them.
        let opts = restore_opts(call.options, call.as_child).map_err(|e| self.invalid(e))?;
        let passed: Vec<RawFd> = opts.inherit_fd.iter().map(|i| i.fd).filter(|fd| *fd > 2).collect();
        for fd in &passed {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } == -1 {
                return Err(self.invalid(format!("--inherit-fd fd[{fd}]: descriptor {fd} is not open in this process")));
            }
        }
        let dirs = self.open_dirs(call.images_dir, call.work_dir)?;
        let mut opts = opts;
        self.complete(&mut opts, &dirs, "restore", call.work_dir, &call.options.extra)?;
        let stdio = call.stdio.files().map_err(|e| self.spawn_error(e))?;
        let resp = self.run("restore", CriuReqType::Restore, opts, &dirs, call.work_dir, stdio, passed, on_notify)?;
        match resp.restore.map(|r| r.pid) {
            Some(pid) if pid > 0 => Ok(pid),
            other => Err(CriuError::Failed {
                action: "restore",
                status: "no PID reported".into(),
                errors: vec![format!("CRIU's RESTORE response carried no PID ({other:?})")],
                hint: None,
                log: call.work_dir.join("restore.log"),
            }),
        }
    }
}

/// `Some(true)` for a set flag, absent otherwise (as the CLI driver passes a flag or not).
fn on(flag: bool) -> Option<bool> {
    flag.then_some(true)
}

/// The RPC form of a dump's options: what `CriuOptions::dump_args` gives the CLI, `extra` aside.
fn dump_opts(o: &CriuOptions, pid: i32, leave_running: bool) -> Result<CriuOpts, String> {
    // Every field is named (no `..`): an option added to `CriuOptions` must be given its RPC form here.
    let CriuOptions {
        tcp_established,
        tcp_close: _,
        skip_in_flight,
        file_locks,
        shell_job,
        ext_unix_sk,
        link_remap,
        external,
        inherit_fd: _,
        ghost_limit,
        network_lock,
        manage_cgroups,
        timeout,
        evasive_devices,
        extra: _,
    } = o;
    Ok(CriuOpts {
        pid: Some(pid),
        leave_running: on(leave_running),
        tcp_established: on(*tcp_established),
        tcp_skip_in_flight: on(*skip_in_flight),
        file_locks: on(*file_locks),
        shell_job: on(*shell_job),
        ext_unix_sk: on(*ext_unix_sk),
        link_remap: on(*link_remap),
        evasive_devices: on(*evasive_devices),
        external: external.clone(),
        ghost_limit: ghost_limit.as_deref().map(parse_ghost_limit).transpose()?,
        timeout: *timeout,
        network_lock: network_lock.as_deref().map(parse_network_lock).transpose()?,
        manage_cgroups_mode: manage_cgroups.as_deref().map(parse_cg_mode).transpose()?,
        ..CriuOpts::default()
    })
}

/// The RPC form of a restore's options: what `CriuOptions::restore_args` gives the CLI, `extra` aside.
fn restore_opts(o: &CriuOptions, as_child: bool) -> Result<CriuOpts, String> {
    let CriuOptions {
        tcp_established,
        tcp_close,
        skip_in_flight: _,
        file_locks,
        shell_job,
        ext_unix_sk,
        link_remap: _,
        external,
        inherit_fd,
        ghost_limit: _,
        network_lock,
        manage_cgroups,
        timeout: _,
        evasive_devices: _,
        extra: _,
    } = o;
    Ok(CriuOpts {
        rst_sibling: on(as_child),
        tcp_established: on(*tcp_established),
        tcp_close: on(*tcp_close),
        file_locks: on(*file_locks),
        shell_job: on(*shell_job),
        ext_unix_sk: on(*ext_unix_sk),
        external: external.clone(),
        inherit_fd: parse_inherit_fds(inherit_fd)?,
        network_lock: network_lock.as_deref().map(parse_network_lock).transpose()?,
        manage_cgroups_mode: manage_cgroups.as_deref().map(parse_cg_mode).transpose()?,
        ..CriuOpts::default()
    })
}

/// `--ghost-limit` as bytes: a number with an optional `K`, `M` or `G` (CRIU's suffixes, powers of 1024).
fn parse_ghost_limit(v: &str) -> Result<u32, String> {
    let bad = || format!("ghost limit {v:?}: expected a number of bytes with an optional K, M or G, below 4G");
    let (digits, shift) = match v.strip_suffix(['K', 'M', 'G']) {
        Some(d) => (
            d,
            if v.ends_with('K') {
                10
            } else if v.ends_with('M') {
                20
            } else {
                30
            },
        ),
        None => (v, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_shl(shift).filter(|b| b >> shift == n).and_then(|b| u32::try_from(b).ok()).ok_or_else(bad)
}

/// `--network-lock` as CRIU names its methods.
fn parse_network_lock(v: &str) -> Result<i32, String> {
    Ok(match v {
        "iptables" => CriuNetworkLockMethod::Iptables,
        "nftables" => CriuNetworkLockMethod::Nftables,
        "skip" | "none" => CriuNetworkLockMethod::Skip,
        _ => return Err(format!("network lock {v:?}: expected iptables, nftables or skip")),
    } as i32)
}

/// `--manage-cgroups=MODE` as CRIU names its modes.
fn parse_cg_mode(v: &str) -> Result<i32, String> {
    Ok(match v {
        "none" => CriuCgMode::CgNone,
        "props" => CriuCgMode::Props,
        "soft" => CriuCgMode::Soft,
        "full" => CriuCgMode::Full,
        "strict" => CriuCgMode::Strict,
        "ignore" => CriuCgMode::Ignore,
        _ => return Err(format!("cgroup mode {v:?}: expected none, props, soft, full, strict or ignore")),
    } as i32)
}

/// The images and work folders, open for the child.
struct Dirs {
    images: OwnedFd,
    work: OwnedFd,
}

impl SwrkDriver {
    fn spawn_error(&self, source: io::Error) -> CriuError {
        CriuError::Spawn { binary: self.criu.binary().to_path_buf(), source }
    }

    /// Options the RPC form cannot carry (refused before CRIU starts).
    fn invalid(&self, message: String) -> CriuError {
        CriuError::BadOption { message }
    }

    fn open_dirs(&self, images: &Path, work: &Path) -> Result<Dirs, CriuError> {
        let open = |dir: &Path, what: &str| {
            std::fs::File::open(dir)
                .map(OwnedFd::from)
                .and_then(above_stdio)
                .map_err(|e| self.spawn_error(io::Error::new(e.kind(), format!("opening the {what} {}: {e}", dir.display()))))
        };
        Ok(Dirs { images: open(images, "images folder")?, work: open(work, "work folder")? })
    }

    /// What every request carries: the folders, the log, notifications, and `extra` as a config file.
    fn complete(
        &self,
        opts: &mut CriuOpts,
        dirs: &Dirs,
        action: &str,
        work_dir: &Path,
        extra: &[String],
    ) -> Result<(), CriuError> {
        opts.images_dir_fd = dirs.images.as_raw_fd();
        opts.work_dir_fd = Some(dirs.work.as_raw_fd());
        opts.log_file = Some(format!("{action}.log"));
        opts.log_level = Some(LOG_LEVEL);
        opts.notify_scripts = Some(true);
        if !extra.is_empty() {
            let text = config_file_text(extra).map_err(|e| self.invalid(e))?;
            let path = absolute(&work_dir.join(format!("{action}.conf")));
            std::fs::write(&path, text)
                .map_err(|e| self.spawn_error(io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))))?;
            opts.config_file = Some(path.display().to_string());
        }
        Ok(())
    }

    /// Start `criu swrk`, send the request, answer its notifications, and return its final response.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        action: &'static str,
        kind: CriuReqType,
        opts: CriuOpts,
        dirs: &Dirs,
        work_dir: &Path,
        stdio: Option<Vec<std::fs::File>>,
        passed: Vec<RawFd>,
        on_notify: &mut dyn FnMut(&str) -> bool,
    ) -> Result<CriuResp, CriuError> {
        let log = work_dir.join(format!("{action}.log"));
        let config_file = opts.config_file.clone();
        let (ours, theirs) = socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| self.spawn_error(e.into()))?;
        let theirs = above_stdio(theirs).map_err(|e| self.spawn_error(e))?;

        let mut cmd = Command::new(self.criu.binary());
        cmd.arg("swrk").arg(theirs.as_raw_fd().to_string());
        if let Some(mut files) = stdio {
            if let (Some(err), Some(out), Some(inp)) = (files.pop(), files.pop(), files.pop()) {
                cmd.stdin(Stdio::from(inp)).stdout(Stdio::from(out)).stderr(Stdio::from(err));
            }
        }
        // Own process group: a Ctrl-C on the terminal must not kill CRIU while it holds the tree frozen.
        cmd.process_group(0);
        // Everything we open is close-on-exec (other threads may be spawning too); the child alone clears
        // the flag on what it must keep, at the same numbers.
        let mut keep = vec![theirs.as_raw_fd(), dirs.images.as_raw_fd(), dirs.work.as_raw_fd()];
        keep.extend(passed);
        // SAFETY: the closure runs between fork and exec and only calls fcntl (async-signal-safe) on a
        // vector allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        tracing::debug!(binary = %self.criu.binary().display(), ?opts, "running criu swrk");
        let child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        drop(theirs); // CRIU's end lives on in CRIU alone: its exit is our end of file.
        let mut swrk = Running { sock: Some(ours), child };
        let talk = swrk.converse(CriuReq::with_opts(kind, opts), on_notify);
        let status = swrk.finish().map_err(|e| self.spawn_error(e))?;
        let failed = |status_text: String, extra_error: Option<String>| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let mut errors = log::error_lines(&text);
            if errors.is_empty() {
                errors.extend(extra_error);
            }
            CriuError::Failed { action, status: status_text, errors, hint: log::hint(&text), log: log.clone() }
        };
        let resp = match talk {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(failed(format!("criu swrk ended without a reply: {}", crate::binary::describe_status(status)), None))
            }
            Err(e) => {
                return Err(failed(
                    format!("talking to criu swrk: {e} ({})", crate::binary::describe_status(status)),
                    Some(e.to_string()),
                ))
            }
        };
        let errno = resp.cr_errno.filter(|e| *e != 0);
        if !resp.success || resp.r#type != kind as i32 {
            let mut text = format!("reported failure, {}", crate::binary::describe_status(status));
            if let Some(e) = errno {
                text.push_str(&format!(", cr_errno {e} ({})", io::Error::from_raw_os_error(e)));
            }
            let note = resp.cr_errmsg.clone().or_else(|| {
                (errno == Some(libc::EBADRQC)).then(|| match &config_file {
                    Some(c) => format!("CRIU refused the request's options before opening its log (check the options in {c})"),
                    None => "CRIU refused the request's options before opening its log".to_string(),
                })
            });
            return Err(failed(text, note));
        }
        if !status.success() || errno.is_some() {
            // The operation is done (a dump's tree is gone, a restore's runs): report it as done.
            tracing::warn!(status = %crate::binary::describe_status(status), ?errno, log = %log.display(),
                "criu swrk reported success but ended abnormally or with an error number");
        }
        Ok(resp)
    }
}

/// A running `criu swrk`. Finishing it, or dropping it (an error, a panicking callback), closes our end of
/// the socket first, so that a CRIU waiting for a notification answer sees it fail and gives up (resuming a
/// frozen tree) instead of waiting for us forever, then reaps CRIU by its PID.
struct Running {
    sock: Option<OwnedFd>,
    child: Child,
}

impl Running {
    /// Send `req`, answer every NOTIFY with `on_notify(script)`, and return the final response (`None` if
    /// CRIU ended without one).
    fn converse(&mut self, req: CriuReq, on_notify: &mut dyn FnMut(&str) -> bool) -> io::Result<Option<CriuResp>> {
        let Some(sock) = self.sock.as_ref() else { return Ok(None) };
        if !send(sock, &req)? {
            return Ok(None);
        }
        loop {
            let Some(resp) = recv(sock, &mut self.child)? else { return Ok(None) };
            if resp.r#type != CriuReqType::Notify as i32 {
                return Ok(Some(resp));
            }
            let script = resp.notify.as_ref().and_then(|n| n.script.clone()).unwrap_or_default();
            let ok = on_notify(&script);
            tracing::debug!(script, ok, "criu notification answered");
            if !send(sock, &CriuReq::notify_answer(ok))? {
                return Ok(None);
            }
        }
    }

    /// Close our end and wait for CRIU to exit.
    fn finish(mut self) -> io::Result<std::process::ExitStatus> {
        self.sock = None;
        self.child.wait()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.sock = None;
        // Returns at once when `finish` has reaped CRIU already (the status is kept).
        let _ = self.child.wait();
    }
}

/// One request, one packet. `false` when CRIU is gone.
fn send(sock: &OwnedFd, req: &CriuReq) -> io::Result<bool> {
    let bytes = req.encode_to_vec();
    loop {
        match socket::send(sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) if n == bytes.len() => return Ok(true),
            Ok(n) => return Err(io::Error::other(format!("short send to criu: {n} of {} bytes", bytes.len()))),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The next packet from CRIU, decoded; `None` at end of file, or when CRIU exited and nothing is left.
/// Descriptors CRIU attaches (to `orphan-pts-master` notifications) are closed.
fn recv(sock: &OwnedFd, child: &mut Child) -> io::Result<Option<CriuResp>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut exited = false;
    loop {
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(0) => {
                // Normally CRIU's exit closes its end and we read end of file; this covers a descendant of
                // CRIU that kept a copy of the socket.
                if exited {
                    return Ok(None);
                }
                exited = child.try_wait()?.is_some();
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, truncated) = {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: these descriptors were just received and belong to nobody else.
                        drop(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect::<Vec<_>>());
                    }
                }
            }
            (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC))
        };
        if n == 0 {
            return Ok(None);
        }
        if truncated {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a message from criu larger than 64 KiB"));
        }
        return CriuResp::decode(&buf[..n])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable message from criu: {e}")));
    }
}

/// `fd` moved to a number above 2, so that setting up the child's stdio cannot overwrite it.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that we own from here on.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `fd[N]:RESOURCE` entries (the CLI's `--inherit-fd`) as RPC `inherit_fd { key: RESOURCE, fd: N }`.
pub fn parse_inherit_fds(entries: &[String]) -> Result<Vec<InheritFd>, String> {
    entries
        .iter()
        .map(|e| {
            let bad = || format!("--inherit-fd {e:?}: expected fd[N]:RESOURCE, e.g. fd[1]:pipe:[1234]");
            let rest = e.strip_prefix("fd[").ok_or_else(bad)?;
            let (n, key) = rest.split_once("]:").ok_or_else(bad)?;
            let fd: i32 = n.parse().map_err(|_| bad())?;
            if fd < 0 || key.is_empty() {
                return Err(bad());
            }
            Ok(InheritFd { key: key.to_string(), fd })
        })
        .collect()
}

/// CRIU options (long names) a config file must not set: the driver sets them itself, and another value
/// would break the conversation or hide the log.
const RESERVED: &[&str] = &[
    "images-dir",
    "work-dir",
    "log-file",
    "tree",
    "config",
    "no-default-config",
    "restore-detached",
    "daemon",
    "restore-sibling",
    "exec-cmd",
    "help",
    "version",
];

/// Short options with a long name, for `extra` written the CLI way.
const SHORT: &[(char, &str)] =
    &[('j', "shell-job"), ('l', "file-locks"), ('x', "ext-unix-sk"), ('R', "leave-running"), ('s', "leave-stopped")];

/// `extra` (CLI arguments, e.g. `--ghost-limit 1M --weak-sysctls`) as a CRIU configuration file: one option
/// per line, `name`, `name=value` or `name "value with spaces"`. What the format cannot express is refused,
/// naming the argument.
pub fn config_file_text(extra: &[String]) -> Result<String, String> {
    let mut out = String::new();
    let mut i = 0;
    while i < extra.len() {
        let arg = &extra[i];
        i += 1;
        let (name, inline) = if let Some(long) = arg.strip_prefix("--").filter(|l| !l.is_empty()) {
            match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            }
        } else if let Some(v) = arg.strip_prefix("-v").filter(|v| v.chars().all(|c| c.is_ascii_digit())) {
            ("verbosity".to_string(), (!v.is_empty()).then(|| v.to_string()))
        } else {
            let mut chars = arg.chars();
            match (chars.next(), chars.next(), chars.next()) {
                (Some('-'), Some(c), None) => match SHORT.iter().find(|(s, _)| *s == c) {
                    Some((_, long)) => (long.to_string(), None),
                    None => {
                        return Err(format!("criu option {arg:?} has no RPC form: give it by its long name (--name [value])"))
                    }
                },
                _ => return Err(format!("criu option {arg:?} has no RPC form: only options (--name [value]) are accepted")),
            }
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("criu option {arg:?} has no RPC form: bad option name"));
        }
        if RESERVED.contains(&name.strip_prefix("no-").unwrap_or(&name)) {
            return Err(format!("criu option --{name} cannot be given: the driver sets it"));
        }
        // A value is the next argument unless it looks like an option (CRIU takes no positional arguments).
        let value = match inline {
            Some(v) => Some(v),
            None if i < extra.len() && !extra[i].starts_with('-') && name != "verbosity" => {
                i += 1;
                Some(extra[i - 1].clone())
            }
            None => None,
        };
        match value {
            None => out.push_str(&name),
            Some(v) => {
                if v.contains(['\n', '\r', '#', '"']) {
                    return Err(format!(
                        "criu option --{name} {v:?} has no RPC form: CRIU's config file cannot hold a value with a newline, '#' or '\"'"
                    ));
                }
                if v.is_empty() || v.contains([' ', '\t']) {
                    out.push_str(&format!("{name} \"{v}\""));
                } else {
                    out.push_str(&format!("{name}={v}"));
                }
            }
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn every_option_maps_like_the_cli_arguments() {
        let all = CriuOptions {
            tcp_established: true,
            tcp_close: true,
            skip_in_flight: true,
            file_locks: true,
            shell_job: true,
            ext_unix_sk: true,
            link_remap: true,
            external: s(&["mnt[/a]:a"]),
            inherit_fd: s(&["fd[1]:pipe:[9]"]),
            ghost_limit: Some("10M".into()),
            network_lock: Some("skip".into()),
            manage_cgroups: Some("none".into()),
            timeout: Some(5),
            evasive_devices: true,
            extra: s(&["--ghost-limit", "1M"]),
        };
        let d = dump_opts(&all, 42, true).unwrap();
        let t = Some(true);
        assert_eq!((d.ghost_limit, d.timeout, d.evasive_devices), (Some(10 << 20), Some(5), t));
        assert_eq!((d.network_lock, d.manage_cgroups_mode), (Some(3), Some(CriuCgMode::CgNone as i32)));
        assert_eq!((d.pid, d.leave_running, d.rst_sibling), (Some(42), t, None));
        assert_eq!(
            (d.tcp_established, d.tcp_skip_in_flight, d.file_locks, d.shell_job, d.ext_unix_sk, d.link_remap),
            (t, t, t, t, t, t)
        );
        assert_eq!((d.tcp_close, d.inherit_fd.len()), (None, 0), "restore-only options stay out of a dump, as on the CLI");
        assert_eq!(d.external, all.external);
        let r = restore_opts(&all, true).unwrap();
        assert_eq!((r.pid, r.leave_running, r.rst_sibling), (None, None, t));
        assert_eq!((r.tcp_established, r.tcp_close, r.file_locks, r.shell_job, r.ext_unix_sk), (t, t, t, t, t));
        assert_eq!((r.tcp_skip_in_flight, r.link_remap), (None, None), "dump-only options stay out of a restore");
        assert_eq!(r.external, all.external);
        assert_eq!(r.inherit_fd, [InheritFd { key: "pipe:[9]".into(), fd: 1 }]);
        assert_eq!((r.network_lock, r.manage_cgroups_mode), (Some(3), Some(CriuCgMode::CgNone as i32)));
        assert_eq!((r.ghost_limit, r.timeout, r.evasive_devices), (None, None, None), "dump-only");
        let none = dump_opts(&CriuOptions::default(), 1, false).unwrap();
        assert_eq!(none, CriuOpts { pid: Some(1), ..CriuOpts::default() }, "unset flags are not sent");
        assert_eq!(restore_opts(&CriuOptions::default(), false).unwrap(), CriuOpts::default());
        let bad = CriuOptions { inherit_fd: s(&["1:pipe"]), ..CriuOptions::default() };
        assert!(restore_opts(&bad, false).unwrap_err().contains("fd[N]:RESOURCE"));
        for (o, needle) in [
            (CriuOptions { ghost_limit: Some("10m".into()), ..CriuOptions::default() }, "ghost limit \"10m\""),
            (CriuOptions { ghost_limit: Some("4G".into()), ..CriuOptions::default() }, "ghost limit"),
            (CriuOptions { network_lock: Some("ipfw".into()), ..CriuOptions::default() }, "network lock \"ipfw\""),
            (CriuOptions { manage_cgroups: Some("".into()), ..CriuOptions::default() }, "cgroup mode \"\""),
        ] {
            assert!(dump_opts(&o, 1, false).unwrap_err().contains(needle), "{needle}");
        }
    }

    #[test]
    fn ghost_limits_parse_as_criu_reads_them() {
        assert_eq!(parse_ghost_limit("0"), Ok(0));
        assert_eq!(parse_ghost_limit("1048576"), Ok(1 << 20));
        assert_eq!(parse_ghost_limit("64K"), Ok(64 << 10));
        assert_eq!(parse_ghost_limit("3G"), Ok(3 << 30));
        for bad in ["", "K", "1.5M", "-1", "5T", "99999999999", "1 M"] {
            assert!(parse_ghost_limit(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn inherit_fds_parse() {
        let v = parse_inherit_fds(&s(&["fd[1]:pipe:[1234]", "fd[7]:tty[88:1]"])).unwrap();
        assert_eq!(v, [InheritFd { key: "pipe:[1234]".into(), fd: 1 }, InheritFd { key: "tty[88:1]".into(), fd: 7 }]);
        for bad in ["1:pipe", "fd[x]:pipe", "fd[1]", "fd[-1]:a", "fd[2]:"] {
            assert!(parse_inherit_fds(&s(&[bad])).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn extra_arguments_become_a_config_file() {
        let text = config_file_text(&s(&[
            "--ghost-limit",
            "1M",
            "--weak-sysctls",
            "--external=mnt[/a]:a",
            "-j",
            "--lsm-profile",
            "a b",
            "--empty-ns",
            "",
            "-v4",
        ]))
        .unwrap();
        assert_eq!(
            text,
            "ghost-limit=1M\nweak-sysctls\nexternal=mnt[/a]:a\nshell-job\nlsm-profile \"a b\"\nempty-ns \"\"\nverbosity=4\n"
        );
        assert_eq!(config_file_text(&[]).unwrap(), "");
    }

    #[test]
    fn unexpressible_extra_arguments_are_refused_by_name() {
        for (args, needle) in [
            (&["-t", "5"][..], "\"-t\""),
            (&["stray"][..], "\"stray\""),
            (&["--log-file", "x.log"][..], "--log-file"),
            (&["--no-restore-detached"][..], "--no-restore-detached"),
            (&["--lsm-profile", "a#b"][..], "--lsm-profile"),
            (&["--ghost-limit", "-1"][..], "\"-1\""),
        ] {
            let err = config_file_text(&s(args)).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
