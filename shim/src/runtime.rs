//! The container runtime behind the shim: a [`Runtime`] trait, and [`RuncRuntime`], which drives a
//! runc-compatible binary (`cedana-runc` by default) with its state root under the shim's state folder.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use containerd_shim_protos::cgroups::metrics::Metrics;

use crate::error::{Error, Kind, Result};
use crate::reaper::Reaper;

/// Environment variable naming the runtime binary (when the runtime options name none).
pub const RUNTIME_ENV: &str = "CEDANA_SHIM_RUNTIME";
/// The runtime used when nothing else is configured and it is found.
pub const DEFAULT_RUNTIME: &str = "cedana-runc";
/// The last resort.
pub const FALLBACK_RUNTIME: &str = "runc";
/// File in the bundle recording the runtime binary used, for `shim delete`.
pub const RUNTIME_RECORD: &str = "cedana-runtime";
/// File in the bundle recording the runtime's state root, for `shim delete`.
pub const ROOT_RECORD: &str = "cedana-runtime-root";
/// The runtime's state root when the runtime options name none (the runc shim's default); the task's
/// namespace is appended, so `cedana dump containerd` finds a container of either shim the same way.
pub const DEFAULT_ROOT: &str = "/run/containerd/runc";

/// What creating a container needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateOpts {
    pub id: String,
    pub bundle: PathBuf,
    /// FIFO paths (or files) for the container's stdio; empty means /dev/null.
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    /// The runtime binary named by the runtime options (`BinaryName`), if any.
    pub binary_name: Option<String>,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    /// The runtime's state root named by the runtime options (`Root`), before the namespace is appended.
    pub root: Option<String>,
    /// The console socket the runtime sends the container's terminal to (`--console-socket`), for a container
    /// with a terminal; its stdio is then the terminal, and the runtime command gets /dev/null.
    pub console_socket: Option<PathBuf>,
}

/// What checkpointing a container needs (runc's checkpoint flags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointOpts {
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    /// Stop the container after the checkpoint (else `--leave-running`).
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    /// Give up after this long: the runtime is asked to stop (SIGTERM, then SIGKILL after
    /// [`DEADLINE_GRACE`]) and the checkpoint fails (checkpoint-on-stop's budget).
    pub deadline: Option<Duration>,
}

/// How long a runtime asked to stop at a deadline may take to roll its work back before it is killed.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// What starting an exec process needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOpts {
    pub exec_id: String,
    /// The container's bundle: the process file, PID file and log of the exec go there.
    pub bundle: PathBuf,
    /// The OCI Process to run, as JSON (the spec of containerd's Exec request).
    pub spec: Vec<u8>,
    /// FIFO paths (or files) for the process's stdio; empty means /dev/null.
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    /// The console socket the runtime sends the process's terminal to (`--console-socket`), for a process with
    /// a terminal; its stdio is then the terminal, and the runtime command gets /dev/null.
    pub console_socket: Option<PathBuf>,
}

/// A container's status as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeState {
    pub status: String,
    pub pid: i32,
}

/// A runc-compatible container runtime. Exits of the container's init are reported separately (by the
/// reaper in the shim, by the stub in tests).
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Create the container (not started); returns its init PID.
    async fn create(&self, opts: &CreateOpts) -> Result<i32>;
    async fn start(&self, id: &str) -> Result<()>;
    async fn state(&self, id: &str) -> Result<RuntimeState>;
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    async fn delete(&self, id: &str, force: bool) -> Result<()>;
    async fn pids(&self, id: &str) -> Result<Vec<i32>>;
    async fn pause(&self, _id: &str) -> Result<()> {
        Err(Error::unimplemented("pause is not supported by this runtime"))
    }
    async fn resume(&self, _id: &str) -> Result<()> {
        Err(Error::unimplemented("resume is not supported by this runtime"))
    }
    /// Checkpoint a container into `opts.image_path`.
    async fn checkpoint(&self, _id: &str, _opts: &CheckpointOpts) -> Result<()> {
        Err(Error::unimplemented("checkpoint is not supported by this runtime"))
    }
    /// Restore a container (created from `opts`) from the checkpoint at `image_path`, detached; returns its
    /// init PID.
    async fn restore(&self, _opts: &CreateOpts, _image_path: &Path) -> Result<i32> {
        Err(Error::unimplemented("restore is not supported by this runtime"))
    }
    /// Start an additional process in the running container `id`, detached; returns its PID (which the
    /// runtime watches, so its exit is reported like the init's).
    async fn exec(&self, _id: &str, _opts: &ExecOpts) -> Result<i32> {
        Err(Error::unimplemented("exec is not supported by this runtime"))
    }
    /// Send `signal` to process `pid` directly (how the runc shim signals exec processes).
    async fn signal(&self, pid: i32, signal: u32) -> Result<()> {
        signal_pid(pid, signal)
    }
    /// Change the resources of container `id` to the OCI `LinuxResources` given as JSON.
    async fn update(&self, _id: &str, _resources: &[u8]) -> Result<()> {
        Err(Error::unimplemented("update is not supported by this runtime"))
    }
    /// Statistics of container `id`'s cgroups, as containerd's cgroup v1 metrics.
    async fn stats(&self, _id: &str) -> Result<Metrics> {
        Err(Error::unimplemented("stats are not supported by this runtime"))
    }
}

/// `kill(pid, signal)`; a process that is gone is NotFound ("process already finished"), as in the runc shim.
pub fn signal_pid(pid: i32, signal: u32) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    if pid <= 0 {
        return Err(Error::precondition("process not created"));
    }
    let sig = i32::try_from(signal)
        .ok()
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| Error::invalid(format!("unsupported signal {signal}")))?;
    match kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ESRCH) => Err(Error::not_found(format!("process {pid} already finished"))),
        Err(e) => Err(Error::internal(format!("signalling process {pid}: {e}"))),
    }
}

/// Find the runtime binary: the options' `BinaryName`, else `$CEDANA_SHIM_RUNTIME`, else `cedana-runc` next
/// to the shim binary, else `cedana-runc` on PATH, else `runc`.
pub fn resolve_binary(binary_name: Option<&str>) -> PathBuf {
    let configured = binary_name
        .filter(|b| !b.is_empty())
        .map(str::to_string)
        .or_else(|| std::env::var(RUNTIME_ENV).ok().filter(|b| !b.is_empty()));
    if let Some(name) = configured {
        return lookup(&name).unwrap_or_else(|| PathBuf::from(name));
    }
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(DEFAULT_RUNTIME)));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return p;
    }
    lookup(DEFAULT_RUNTIME).unwrap_or_else(|| PathBuf::from(FALLBACK_RUNTIME))
}

/// The runtime's state root for tasks of `namespace`: `root` (the runtime options' `Root`) or
/// [`DEFAULT_ROOT`], with the namespace appended, as containerd's runc shim does.
pub fn namespace_root(root: Option<&str>, namespace: &str) -> PathBuf {
    Path::new(root.filter(|r| !r.is_empty()).unwrap_or(DEFAULT_ROOT)).join(namespace)
}

/// `name` as given when it has a slash, else its first match on PATH.
fn lookup(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Drives a runc-compatible binary. One instance per shim; the binary is chosen at create.
pub struct RuncRuntime {
    /// The state root of the task's namespace (`Root` or [`DEFAULT_ROOT`], then the namespace).
    root: std::sync::Mutex<PathBuf>,
    namespace: String,
    reaper: Reaper,
    binary: std::sync::Mutex<Option<PathBuf>>,
}

#[derive(Deserialize)]
struct StateJson {
    status: String,
    #[serde(default)]
    pid: i32,
}

impl RuncRuntime {
    /// A runtime for tasks of `namespace`, with state under [`DEFAULT_ROOT`] until the runtime options of
    /// a Create name another root; spawning through `reaper`; `binary` is set now or at create.
    pub fn new(namespace: &str, reaper: Reaper, binary: Option<PathBuf>) -> RuncRuntime {
        RuncRuntime {
            root: std::sync::Mutex::new(namespace_root(None, namespace)),
            namespace: namespace.to_string(),
            reaper,
            binary: std::sync::Mutex::new(binary),
        }
    }

    fn root(&self) -> PathBuf {
        self.root.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn binary(&self) -> PathBuf {
        let mut b = self.binary.lock().unwrap_or_else(|e| e.into_inner());
        b.get_or_insert_with(|| resolve_binary(None)).clone()
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.binary());
        cmd.arg("--root").arg(self.root()).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// Run a command to completion; its stdout on success, else an error carrying its stderr.
    async fn run(&self, cmd: tokio::process::Command, what: &str) -> Result<Vec<u8>> {
        self.run_until(cmd, what, None).await
    }

    /// [`Self::run`], giving up after `deadline`: the command gets SIGTERM (our runtime rolls a checkpoint
    /// back on it), and SIGKILL when it has not ended [`DEADLINE_GRACE`] later.
    async fn run_until(&self, mut cmd: tokio::process::Command, what: &str, deadline: Option<Duration>) -> Result<Vec<u8>> {
        let child = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| Error::internal(format!("running {} {what}: {e}", self.binary().display())))?;
        let pid = child.id();
        let mut waiting = Box::pin(child.wait_with_output());
        let mut late = false;
        let out = match deadline {
            None => waiting.await,
            Some(limit) => match tokio::time::timeout(limit, &mut waiting).await {
                Ok(out) => out,
                Err(_) => {
                    late = true;
                    let signal = |s| pid.map(|p| signal_pid(p as i32, s as u32));
                    let _ = signal(libc::SIGTERM);
                    match tokio::time::timeout(DEADLINE_GRACE, &mut waiting).await {
                        Ok(out) => out,
                        Err(_) => {
                            let _ = signal(libc::SIGKILL);
                            waiting.await
                        }
                    }
                }
            },
        };
        self.reaper.release(pid);
        let out = out.map_err(|e| Error::internal(format!("waiting for {what}: {e}")))?;
        if late {
            let limit = deadline.unwrap_or_default();
            return Err(Error::new(
                Kind::DeadlineExceeded,
                format!("{what} did not finish within {} ms: stopped", limit.as_millis()),
            ));
        }
        if out.status.success() {
            return Ok(out.stdout);
        }
        let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.is_empty() {
            msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(classify(&format!("{} {what} failed ({}): {msg}", self.binary().display(), out.status)))
    }
}

/// The kind of a runtime failure, from its message.
fn classify(msg: &str) -> Error {
    let lower = msg.to_lowercase();
    let kind = if lower.contains("does not exist") || lower.contains("not found") || lower.contains("no such") {
        Kind::NotFound
    } else if lower.contains("already exists") {
        Kind::AlreadyExists
    } else if lower.contains("not running") || lower.contains("is not created") || lower.contains("cannot ") {
        Kind::FailedPrecondition
    } else {
        Kind::Internal
    };
    Error::new(kind, msg)
}

/// Open a stdio path for the container: a FIFO (containerd's, for `ctr run` and the CRI's logs) through a
/// pipe the shim copies to or from it, as containerd's runc shim does, so that the container holds pipes, which
/// CRIU checkpoints and runc reconnects at restore, and not a FIFO outside its mounts, which CRIU cannot reach;
/// a log file appended to; anything else (/dev/null, a terminal) as it is.
fn open_stdio(path: &str, input: bool) -> Result<Stdio> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if path.is_empty() {
        return Ok(Stdio::null());
    }
    let path = path.strip_prefix("file://").unwrap_or(path);
    if std::fs::metadata(path)?.file_type().is_fifo() {
        return if input { fifo_into_pipe(path) } else { fifo_through_pipe(path) };
    }
    let file = if input {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        // Back to blocking reads for the container.
        let flags = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
        f
    } else if std::fs::metadata(path)?.is_file() {
        // A log file (stdout and stderr may both be it): appended to, so neither overwrites the other.
        std::fs::OpenOptions::new().append(true).open(path)?
    } else {
        std::fs::OpenOptions::new().read(true).write(true).open(path)?
    };
    Ok(Stdio::from(file))
}

/// A pipe whose write end is the container's stdout or stderr, and a thread copying what comes out of it to
/// the FIFO until the container's last writer closed it.
fn fifo_through_pipe(path: &str) -> Result<Stdio> {
    use std::os::unix::fs::OpenOptionsExt;
    let (ours, theirs) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    // Read-write: opening never waits for the reader (containerd holds it, or opens it later).
    let fifo = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path)?;
    let name = path.to_string();
    std::thread::Builder::new()
        .name("stdio-copy".into())
        .spawn(move || {
            let mut ours = std::fs::File::from(ours);
            let mut fifo = fifo;
            if let Err(e) = std::io::copy(&mut ours, &mut fifo) {
                log::debug!("copying to {name}: {e}");
            }
        })
        .map_err(|e| Error::internal(format!("starting the copy of {path}: {e}")))?;
    Ok(Stdio::from(theirs))
}

/// The stdin copies in progress, by the FIFO each reads: dropping an entry (the write end of a pipe its thread
/// polls) ends that copy (CloseIO).
static STDIN_COPIES: std::sync::Mutex<Vec<(String, std::os::fd::OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// A pipe whose read end is the container's stdin, and a thread copying what the client writes into the FIFO
/// to it. The copy ends, and the container reads the end of its input, when the client's writer has come and
/// gone (the FIFO is read-only: before a writer first opens it, there is no end to read), or at CloseIO
/// ([`close_stdin`]), whichever is first, once what was written is in.
fn fifo_into_pipe(path: &str) -> Result<Stdio> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (theirs, ours) = nix::unistd::pipe2(cloexec).map_err(std::io::Error::from)?;
    let (stop, stopper) = nix::unistd::pipe2(cloexec).map_err(std::io::Error::from)?;
    let mut fifo = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK).open(path)?;
    {
        let mut copies = STDIN_COPIES.lock().unwrap_or_else(|e| e.into_inner());
        copies.retain(|(p, _)| p != path);
        copies.push((path.to_string(), stopper));
    }
    let name = path.to_string();
    std::thread::Builder::new()
        .name("stdin-copy".into())
        .spawn(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let mut ours = std::fs::File::from(ours);
            loop {
                let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::NONE).is_err() {
                    continue;
                }
                let ready = fds[0].any().unwrap_or(true);
                let stopped = fds[1].any().unwrap_or(true);
                // Readable or hung up: take what is there; the end of the stream ends the copy.
                if ready && drain(&mut fifo, &mut ours, &name) != Drained::Open {
                    break;
                }
                if stopped {
                    drain(&mut fifo, &mut ours, &name);
                    break;
                }
            }
            STDIN_COPIES.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _)| *p != name);
        })
        .map_err(|e| Error::internal(format!("starting the copy of {path}: {e}")))?;
    Ok(Stdio::from(theirs))
}

/// How a drain of the stdin FIFO ended.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// Nothing more to read for now.
    Open,
    /// The FIFO's writers are gone (after one came).
    Ended,
    /// The container's end of the pipe is gone, or the FIFO failed.
    Broken,
}

/// Copy what the (non-blocking) FIFO holds into the pipe.
fn drain(fifo: &mut std::fs::File, pipe: &mut std::fs::File, name: &str) -> Drained {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        match fifo.read(&mut buf) {
            Ok(0) => return Drained::Ended,
            Ok(n) => {
                if pipe.write_all(&buf[..n]).is_err() {
                    return Drained::Broken;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Drained::Open,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("reading {name}: {e}");
                return Drained::Broken;
            }
        }
    }
}

/// End the copy into a process's stdin from the FIFO `path` (CloseIO): the process reads the end of its input
/// once what was written is in. Nothing to do for a path no copy reads.
pub fn close_stdin(path: &str) {
    let path = path.strip_prefix("file://").unwrap_or(path);
    STDIN_COPIES.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _)| p != path);
}

/// The runtime command's stdio: /dev/null when a console socket gives the process a terminal, else the
/// process's own stdio paths.
fn set_stdio(cmd: &mut tokio::process::Command, console: bool, stdin: &str, stdout: &str, stderr: &str) -> Result<()> {
    if console {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        cmd.stdin(open_stdio(stdin, true)?).stdout(open_stdio(stdout, false)?).stderr(open_stdio(stderr, false)?);
    }
    Ok(())
}

impl RuncRuntime {
    /// `RUNTIME exec --detach --process FILE --pid-file F ID` with the process's stdio; the PID it wrote.
    async fn exec_process(&self, id: &str, opts: &ExecOpts) -> Result<i32> {
        let binary = self.binary();
        let name = format!("exec-{}", opts.exec_id);
        let process_file = opts.bundle.join(format!("{name}.json"));
        let pid_file = opts.bundle.join(format!("{name}.pid"));
        let log = opts.bundle.join(format!("{name}.log"));
        std::fs::write(&process_file, &opts.spec)?;
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(&log);
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.arg("--root").arg(self.root()).arg("--log").arg(&log).args(["--log-format", "json", "exec", "--detach"]);
        cmd.arg("--process").arg(&process_file).arg("--pid-file").arg(&pid_file);
        if let Some(socket) = &opts.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        let spawned = (|| -> Result<tokio::process::Child> {
            set_stdio(&mut cmd, opts.console_socket.is_some(), &opts.stdin, &opts.stdout, &opts.stderr)?;
            self.reaper.spawn(&mut cmd).map_err(|e| Error::internal(format!("running {} exec: {e}", binary.display())))
        })();
        // Our copies of the stdio files go with the command object.
        drop(cmd);
        let status = match spawned {
            Ok(mut child) => {
                let pid = child.id();
                let status = child.wait().await;
                self.reaper.release(pid);
                status.map_err(|e| Error::internal(format!("waiting for exec: {e}")))
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&process_file);
        let status = status?;
        let errors = log_errors(&log);
        let _ = std::fs::remove_file(&log);
        if !status.success() {
            // The runc shim reports this as a plain error: UNKNOWN.
            return Err(Error::unknown(format!("OCI runtime exec failed ({status}): {errors}")));
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)?
            .trim()
            .parse()
            .map_err(|e| Error::internal(format!("reading {}: {e}", pid_file.display())))?;
        self.reaper.watch(pid);
        Ok(pid)
    }

    /// Create (`restore == None`) or restore (from the image path given) a container with its stdio, wait for
    /// the runtime command, and watch the init whose PID it wrote.
    async fn create_or_restore(&self, opts: &CreateOpts, restore: Option<&Path>) -> Result<i32> {
        let binary = opts.binary_name.as_deref().map(|b| resolve_binary(Some(b))).unwrap_or_else(|| self.binary());
        *self.binary.lock().unwrap_or_else(|e| e.into_inner()) = Some(binary.clone());
        let _ = std::fs::write(opts.bundle.join(RUNTIME_RECORD), binary.to_string_lossy().as_bytes());
        let root = namespace_root(opts.root.as_deref(), &self.namespace);
        *self.root.lock().unwrap_or_else(|e| e.into_inner()) = root.clone();
        let _ = std::fs::write(opts.bundle.join(ROOT_RECORD), root.to_string_lossy().as_bytes());
        std::fs::create_dir_all(&root)?;
        let pid_file = opts.bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let log = opts.bundle.join("runtime.log");
        let what = if restore.is_some() { "restore" } else { "create" };
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.arg("--root").arg(&root).arg("--log").arg(&log).args(["--log-format", "json", what]);
        if let Some(image_path) = restore {
            cmd.arg("--image-path").arg(image_path).arg("--work-path").arg(opts.bundle.join("criu-restore-work"));
            cmd.arg("--detach");
        }
        cmd.arg("--bundle").arg(&opts.bundle).arg("--pid-file").arg(&pid_file);
        if opts.no_pivot_root {
            cmd.arg("--no-pivot");
        }
        if opts.no_new_keyring && restore.is_none() {
            cmd.arg("--no-new-keyring");
        }
        if let Some(socket) = &opts.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(&opts.id);
        set_stdio(&mut cmd, opts.console_socket.is_some(), &opts.stdin, &opts.stdout, &opts.stderr)?;
        let mut child =
            self.reaper.spawn(&mut cmd).map_err(|e| Error::internal(format!("running {} {what}: {e}", binary.display())))?;
        // Our copies of the stdio files go with the command object.
        drop(cmd);
        let pid = child.id();
        let status = child.wait().await;
        self.reaper.release(pid);
        let status = status.map_err(|e| Error::internal(format!("waiting for {what}: {e}")))?;
        if !status.success() {
            return Err(classify(&format!("{} {what} failed ({status}): {}", binary.display(), log_errors(&log))));
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)?
            .trim()
            .parse()
            .map_err(|e| Error::internal(format!("reading {}: {e}", pid_file.display())))?;
        self.reaper.watch(pid);
        Ok(pid)
    }
}

#[async_trait]
impl Runtime for RuncRuntime {
    async fn create(&self, opts: &CreateOpts) -> Result<i32> {
        self.create_or_restore(opts, None).await
    }

    async fn restore(&self, opts: &CreateOpts, image_path: &Path) -> Result<i32> {
        self.create_or_restore(opts, Some(image_path)).await
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.run(self.command(&["pause", id]), "pause").await.map(drop)
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.run(self.command(&["resume", id]), "resume").await.map(drop)
    }

    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        // An object store's URL is the runtime's to write to; a local image path is made here, as runc's shim does.
        if !opts.image_path.to_string_lossy().contains("://") {
            std::fs::create_dir_all(&opts.image_path)?;
        }
        let mut cmd = self.command(&["checkpoint"]);
        cmd.arg("--image-path").arg(&opts.image_path);
        if let Some(work) = &opts.work_path {
            std::fs::create_dir_all(work)?;
            cmd.arg("--work-path").arg(work);
        }
        for (on, flag) in [
            (!opts.exit, "--leave-running"),
            (opts.open_tcp, "--tcp-established"),
            (opts.external_unix_sockets, "--ext-unix-sk"),
            (opts.terminal, "--shell-job"),
            (opts.file_locks, "--file-locks"),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
        for ns in &opts.empty_namespaces {
            cmd.arg("--empty-ns").arg(ns);
        }
        cmd.arg(id);
        self.run_until(cmd, "checkpoint", opts.deadline).await.map(drop)
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.run(self.command(&["start", id]), "start").await.map(drop)
    }

    async fn exec(&self, id: &str, opts: &ExecOpts) -> Result<i32> {
        self.exec_process(id, opts).await
    }

    async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = self.command(&["update", "--resources", "-", id]);
        cmd.stdin(Stdio::piped());
        let mut child = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| Error::internal(format!("running {} update: {e}", self.binary().display())))?;
        let pid = child.id();
        if let Some(mut stdin) = child.stdin.take() {
            if let Err(e) = stdin.write_all(resources).await {
                log::warn!("writing resources to the runtime's update: {e}");
            }
        }
        let out = child.wait_with_output().await;
        self.reaper.release(pid);
        let out = out.map_err(|e| Error::internal(format!("waiting for update: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        Err(classify(&format!(
            "{} update failed ({}): {}",
            self.binary().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    async fn stats(&self, id: &str) -> Result<Metrics> {
        let out = self.run(self.command(&["events", "--stats", id]), "events --stats").await?;
        crate::stats::metrics_from_runtime_json(&out)
    }

    async fn state(&self, id: &str) -> Result<RuntimeState> {
        let out = self.run(self.command(&["state", id]), "state").await?;
        let s: StateJson = serde_json::from_slice(&out).map_err(|e| Error::internal(format!("runtime state: {e}")))?;
        Ok(RuntimeState { status: s.status, pid: s.pid })
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = signal.to_string();
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.extend([id, sig.as_str()]);
        self.run(self.command(&args), "kill").await.map(drop)
    }

    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let args: &[&str] = if force { &["delete", "--force", id] } else { &["delete", id] };
        self.run(self.command(args), "delete").await.map(drop)
    }

    async fn pids(&self, id: &str) -> Result<Vec<i32>> {
        let out = self.run(self.command(&["ps", "--format", "json", id]), "ps").await?;
        let pids: Option<Vec<i32>> = serde_json::from_slice(&out).map_err(|e| Error::internal(format!("runtime ps: {e}")))?;
        Ok(pids.unwrap_or_default())
    }
}

/// The error lines of a runc JSON log (or its raw text), for messages.
fn log_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect();
    if msgs.is_empty() {
        text.trim().to_string()
    } else {
        msgs.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified() {
        assert_eq!(classify("container \"x\" does not exist").kind, Kind::NotFound);
        assert_eq!(classify("container with id exists: x already exists").kind, Kind::AlreadyExists);
        assert_eq!(classify("cannot start a container that has stopped").kind, Kind::FailedPrecondition);
        assert_eq!(classify("something broke").kind, Kind::Internal);
    }

    #[test]
    fn signalling_a_finished_process_is_not_found() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Another test's reaper in this binary may reap it first (ECHILD here): either way it goes.
        let _ = child.wait();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SIGCONT: harmless should the PID have been reused already.
        assert_eq!(signal_pid(pid, libc::SIGCONT as u32).unwrap_err().kind, Kind::NotFound);
        assert_eq!(signal_pid(0, 9).unwrap_err().kind, Kind::FailedPrecondition);
        assert_eq!(signal_pid(std::process::id() as i32, 4096).unwrap_err().kind, Kind::InvalidArgument);
    }

    #[test]
    fn configured_binary_wins() {
        assert_eq!(resolve_binary(Some("/opt/x/my-runc")), PathBuf::from("/opt/x/my-runc"));
    }

    #[test]
    fn log_errors_picks_error_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        std::fs::write(&log, "{\"level\":\"info\",\"msg\":\"hi\"}\n{\"level\":\"error\",\"msg\":\"boom\"}\n").unwrap();
        assert_eq!(log_errors(&log), "boom");
    }
}
