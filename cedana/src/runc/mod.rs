//! The runc driver: runs the real `runc` binary for the container operations the engine needs (state, pause,
//! resume, checkpoint, restore, kill, delete) and turns its failures into errors quoting runc's own message.

mod locate;

pub use locate::{locate, RUNC_BINARY_ENV};

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize;

use crate::binary::describe_status;

/// Default state folder of runc (`--root`).
pub const DEFAULT_ROOT: &str = "/run/runc";

/// Errors of the runc driver.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("runc not found (looked for {tried}): install runc, or set {RUNC_BINARY_ENV}")]
    NotFound { tried: String },
    #[error("{binary} resolves to cedana-runc itself ({resolved}): point {RUNC_BINARY_ENV} at the real runc")]
    Recursion { binary: PathBuf, resolved: PathBuf },
    #[error("running {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container does not exist: no container {id:?} under runc root {root}; check the id with `runc --root {root} list`")]
    NoSuchContainer { id: String, root: PathBuf },
    #[error("container {id:?} already exists under runc root {root}: choose another id, or delete it first")]
    Exists { id: String, root: PathBuf },
    #[error("container {id:?} is {status}: {what} needs a running or paused container")]
    NotRunning { id: String, status: String, what: &'static str },
    #[error("runc {command} {id} failed ({status}): {message}")]
    Failed { command: String, id: String, status: String, message: String },
    #[error("runc checkpoint has no equivalent of {option}: drop it for runc containers")]
    Unsupported { option: String },
    #[error("bundle {bundle} is not a folder (a bundle holds the container's config.json and rootfs)")]
    NoBundle { bundle: PathBuf },
    #[error("runc state {id} printed output that is not a container state ({detail})")]
    BadState { id: String, detail: String },
}

impl RuncError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            RuncError::NotFound { .. } | RuncError::Spawn { .. } => K::Unavailable,
            RuncError::Recursion { .. } | RuncError::Unsupported { .. } | RuncError::NoBundle { .. } => K::InvalidArgument,
            RuncError::NoSuchContainer { .. } => K::NotFound,
            RuncError::Exists { .. } => K::AlreadyExists,
            RuncError::NotRunning { .. } => K::FailedPrecondition,
            RuncError::Failed { .. } | RuncError::BadState { .. } => K::Internal,
        }
    }
}

/// The state of a container, as `runc state` prints it (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub bundle: PathBuf,
}

/// Flags of `runc restore` besides the image path and id.
#[derive(Debug, Clone, Default)]
pub struct RestoreFlags {
    pub bundle: PathBuf,
    pub work_path: Option<PathBuf>,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    /// Any other restore flags, verbatim (e.g. `--tcp-established`, `--no-subreaper`).
    pub extra: Vec<OsString>,
    /// The restored container's stdin, stdout and stderr (runc hands its own to the container, in place of
    /// streams that were pipes at dump time); the caller's own when `None`.
    pub stdio: Option<std::sync::Arc<[std::os::fd::OwnedFd; 3]>>,
}

/// What runc 1.1 has no flags for, handed to the CRIU it runs: CRIU options (as lines of a CRIU
/// configuration file, e.g. `external file[1b:2a]`, `inherit-fd fd[100]:file[1b:2a]`) and descriptors CRIU
/// inherits at fixed numbers (for `inherit-fd`). CRIU reads the file named by `$CRIU_CONFIG_FILE` also when
/// runc drives it over RPC (`criu swrk`), before runc's own settings; runc keeps descriptors it inherits open
/// for CRIU.
#[derive(Debug, Default)]
pub struct CriuExtras {
    /// Configuration lines: an option without its leading `--`, and its value.
    pub options: Vec<String>,
    /// Descriptors for CRIU: (the number it sees, the file).
    pub fds: Vec<(i32, std::os::fd::OwnedFd)>,
}

impl CriuExtras {
    /// Whether there is nothing to hand over.
    pub fn is_empty(&self) -> bool {
        self.options.is_empty() && self.fds.is_empty()
    }
}

/// The container runtime the engine drives (runc, or anything that speaks its command line): the seam unit
/// tests replace with a fake. Implemented by [`Runc`].
pub trait ContainerRuntime: Send + Sync + std::fmt::Debug {
    /// The runtime's state folder (`--root`).
    fn root(&self) -> &Path;
    /// `state ID`.
    fn state(&self, id: &str) -> Result<ContainerState, RuncError>;
    /// Whether container `id` exists.
    fn exists(&self, id: &str) -> Result<bool, RuncError>;
    /// `pause ID`.
    fn pause(&self, id: &str) -> Result<(), RuncError>;
    /// `resume ID`.
    fn resume(&self, id: &str) -> Result<(), RuncError>;
    /// `delete [--force] ID`.
    fn delete(&self, id: &str, force: bool) -> Result<(), RuncError>;
    /// `checkpoint --image-path IMAGES --work-path WORK FLAGS... ID`, with CRIU options runc has no flags for
    /// (`extras`; a runtime that cannot pass them refuses non-empty ones).
    fn checkpoint(&self, id: &str, images: &Path, work: &Path, flags: &[OsString], extras: &CriuExtras) -> Result<(), RuncError>;
    /// `restore --image-path IMAGES ... ID`, with CRIU options and descriptors runc has no flags for; runc's
    /// exit code.
    fn restore(&self, id: &str, images: &Path, flags: &RestoreFlags, extras: CriuExtras) -> Result<i32, RuncError>;
    /// The command line of `resume ID`, for a process other than this one to run (see
    /// [`crate::engine`]'s pause guard); `None` when the runtime cannot say (nothing then resumes a container
    /// paused by a dump whose process was killed).
    fn resume_command(&self, _id: &str) -> Option<Command> {
        None
    }
}

impl ContainerRuntime for Runc {
    fn root(&self) -> &Path {
        Runc::root(self)
    }
    fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        Runc::state(self, id)
    }
    fn exists(&self, id: &str) -> Result<bool, RuncError> {
        Runc::exists(self, id)
    }
    fn pause(&self, id: &str) -> Result<(), RuncError> {
        Runc::pause(self, id)
    }
    fn resume(&self, id: &str) -> Result<(), RuncError> {
        Runc::resume(self, id)
    }
    fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        Runc::delete(self, id, force)
    }
    fn checkpoint(&self, id: &str, images: &Path, work: &Path, flags: &[OsString], extras: &CriuExtras) -> Result<(), RuncError> {
        Runc::checkpoint(self, id, images, work, flags, extras)
    }
    fn restore(&self, id: &str, images: &Path, flags: &RestoreFlags, extras: CriuExtras) -> Result<i32, RuncError> {
        Runc::restore(self, id, images, flags, extras)
    }
    fn resume_command(&self, id: &str) -> Option<Command> {
        let mut cmd = self.command();
        cmd.args(["resume", id]);
        Some(cmd)
    }
}

/// A runc binary plus the global flags every command gets (`--root`, `--criu`, `--log`, ...).
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    global: Vec<OsString>,
    /// `--log FILE --log-format F`: for the commands that change the container, not for queries.
    log: Vec<OsString>,
}

impl Runc {
    /// Drive `binary` with state under `root` (runc's default when `None`).
    pub fn new(binary: PathBuf, root: Option<PathBuf>) -> Self {
        Self { binary, root: root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)), global: Vec::new(), log: Vec::new() }
    }

    /// Locate runc (see [`locate`]) with state under `root`.
    pub fn locate(root: Option<PathBuf>) -> Result<Self, RuncError> {
        Ok(Self::new(locate()?, root))
    }

    /// Add global flags other than `--root` (e.g. `--criu PATH`, `--log FILE --log-format json`).
    pub fn with_global(mut self, flags: impl IntoIterator<Item = OsString>) -> Self {
        self.global.extend(flags);
        self
    }

    /// Log runc's messages of checkpoint, restore, pause, resume, kill and delete into `file` (runc's
    /// `--log`, `--log-format`); `runc state` probes are not logged (an absent container is no error).
    pub fn with_log(mut self, file: &Path, format: &str) -> Self {
        self.log = vec!["--log".into(), file.into(), "--log-format".into(), format.into()];
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A command for `runc GLOBAL... ARGS...`.
    pub fn command(&self) -> Command {
        let mut cmd = self.query();
        cmd.args(&self.log);
        cmd
    }

    /// A command without the log flags.
    fn query(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).args(&self.global);
        cmd
    }

    /// `runc state ID`; [`RuncError::NoSuchContainer`] when runc does not know it.
    pub fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let out = self.output("state", id, self.query().args(["state", id]))?;
        serde_json::from_slice(&out.stdout).map_err(|e| RuncError::BadState { id: id.into(), detail: e.to_string() })
    }

    /// Whether a container `id` exists (in any state).
    pub fn exists(&self, id: &str) -> Result<bool, RuncError> {
        match self.state(id) {
            Ok(_) => Ok(true),
            Err(RuncError::NoSuchContainer { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn pause(&self, id: &str) -> Result<(), RuncError> {
        self.output("pause", id, self.command().args(["pause", id])).map(drop)
    }

    pub fn resume(&self, id: &str) -> Result<(), RuncError> {
        self.output("resume", id, self.command().args(["resume", id])).map(drop)
    }

    /// `runc kill ID SIGNAL`.
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        self.output("kill", id, self.command().args(["kill", id, signal])).map(drop)
    }

    /// `runc delete [--force] ID`.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        self.output("delete", id, cmd.arg(id)).map(drop)
    }

    /// `runc checkpoint --image-path IMAGES --work-path WORK FLAGS... ID`, with CRIU options runc has no flags
    /// for (`extras`, through a CRIU configuration file) and descriptors runc and its CRIU inherit (the pause
    /// guard's lifeline).
    pub fn checkpoint(
        &self,
        id: &str,
        images: &Path,
        work: &Path,
        flags: &[OsString],
        extras: &CriuExtras,
    ) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("checkpoint").arg("--image-path").arg(images).arg("--work-path").arg(work).args(flags).arg(id);
        let _config = criu_config(&mut cmd, &extras.options).map_err(|source| self.spawn_error(source))?;
        pass_fds(&mut cmd, &extras.fds);
        self.output("checkpoint", id, &mut cmd).map(drop)
    }

    fn spawn_error(&self, source: std::io::Error) -> RuncError {
        RuncError::Spawn { binary: self.binary.clone(), source }
    }

    /// `runc restore --image-path IMAGES ... ID`. The caller's stdio is the restored container's (for pipes
    /// that were external at dump) and runc's; with `detach` this returns once the container runs, else
    /// when it exits. Returns runc's exit code when runc itself ran. `extras`: CRIU options runc has no flags for and descriptors CRIU inherits (runc keeps them open for
    /// the CRIU it runs; they are closed here once runc is done).
    pub fn restore(&self, id: &str, images: &Path, flags: &RestoreFlags, extras: CriuExtras) -> Result<i32, RuncError> {
        // runc's stderr is the container's: read its error back from the log instead (the caller's --log,
        // or a private one).
        let private_log = match self.log_file() {
            Some(_) => None,
            None => {
                Some(tempfile::NamedTempFile::new().map_err(|source| RuncError::Spawn { binary: self.binary.clone(), source })?)
            }
        };
        let (log_path, log_start) = match (&private_log, self.log_file()) {
            (Some(tmp), _) => (tmp.path().to_path_buf(), 0),
            (None, Some(p)) => (p.to_path_buf(), std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)),
            (None, None) => unreachable!("a private log exists whenever the caller gave none"),
        };
        let mut cmd = match &private_log {
            Some(tmp) => {
                let mut c = self.query();
                c.arg("--log").arg(tmp.path()).args(["--log-format", "json"]);
                c
            }
            None => self.command(),
        };
        cmd.arg("restore").arg("--image-path").arg(images).arg("--bundle").arg(&flags.bundle);
        if let Some(w) = &flags.work_path {
            cmd.arg("--work-path").arg(w);
        }
        if flags.detach {
            cmd.arg("--detach");
        }
        if let Some(p) = &flags.pid_file {
            cmd.arg("--pid-file").arg(p);
        }
        if let Some(s) = &flags.console_socket {
            cmd.arg("--console-socket").arg(s);
        }
        cmd.args(&flags.extra).arg(id);
        if let Some(fds) = &flags.stdio {
            let dup = |i: usize| fds[i].try_clone().map_err(|source| RuncError::Spawn { binary: self.binary.clone(), source });
            cmd.stdin(dup(0)?).stdout(dup(1)?).stderr(dup(2)?);
        }
        let _config = criu_config(&mut cmd, &extras.options).map_err(|source| self.spawn_error(source))?;
        pass_fds(&mut cmd, &extras.fds);
        tracing::debug!(?cmd, "running runc restore");
        let status = cmd.status().map_err(|source| RuncError::Spawn { binary: self.binary.clone(), source })?;
        // Our copies of the container's ends go with `cmd`, once runc has started.
        drop(cmd);
        match status.code() {
            Some(0) => Ok(0),
            Some(code) if !flags.detach => Ok(code),
            _ => Err(RuncError::Failed {
                command: "restore".into(),
                id: id.into(),
                status: describe_status(status),
                message: with_criu_errors(
                    last_logged_error(&log_path, log_start)
                        .unwrap_or_else(|| format!("runc gave no reason; see {}", log_path.display())),
                    &flags.work_path.clone().unwrap_or_else(|| images.to_path_buf()).join("restore.log"),
                ),
            }),
        }
    }

    /// The `--log FILE` given to runc, if any.
    fn log_file(&self) -> Option<&Path> {
        self.log.get(1).map(Path::new)
    }

    /// Run `cmd` (a runc command on container `id`) to completion, capturing its output.
    fn output(&self, command: &str, id: &str, cmd: &mut Command) -> Result<Output, RuncError> {
        tracing::debug!(?cmd, "running runc");
        let out = cmd.stdin(Stdio::null()).output().map_err(|source| RuncError::Spawn { binary: self.binary.clone(), source })?;
        if out.status.success() {
            return Ok(out);
        }
        let message = error_message(&String::from_utf8_lossy(&out.stderr));
        if message.contains("does not exist") || message.contains("container not found") {
            return Err(RuncError::NoSuchContainer { id: id.into(), root: self.root.clone() });
        }
        Err(RuncError::Failed { command: command.into(), id: id.into(), status: describe_status(out.status), message })
    }
}

/// Environment variable naming the CRIU configuration file CRIU reads (also in RPC mode).
const CRIU_CONFIG_ENV: &str = "CRIU_CONFIG_FILE";

/// Point `cmd` (and the CRIU it runs) at a configuration file holding `options`, after the lines of the
/// file `$CRIU_CONFIG_FILE` names already, if any (CRIU reads only one such file). The file lives as long as
/// the returned handle; nothing is done for no options.
fn criu_config(cmd: &mut Command, options: &[String]) -> std::io::Result<Option<tempfile::NamedTempFile>> {
    if options.is_empty() {
        return Ok(None);
    }
    let mut text = match std::env::var_os(CRIU_CONFIG_ENV) {
        Some(p) => std::fs::read_to_string(&p).unwrap_or_default(),
        None => String::new(),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for line in options {
        text.push_str(line);
        text.push('\n');
    }
    let mut file = tempfile::Builder::new().prefix("cedana-criu-").suffix(".conf").tempfile()?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    tracing::debug!(path = %file.path().display(), options = ?options, "CRIU options through a configuration file");
    cmd.env(CRIU_CONFIG_ENV, file.path());
    Ok(Some(file))
}

/// Give the child of `cmd` each descriptor at its number (inherited across exec).
fn pass_fds(cmd: &mut Command, fds: &[(i32, std::os::fd::OwnedFd)]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    if fds.is_empty() {
        return;
    }
    let pairs: Vec<(i32, i32)> = fds.iter().map(|(target, fd)| (fd.as_raw_fd(), *target)).collect();
    // SAFETY: only dup2 and fcntl, which are async-signal-safe, run between fork and exec; the source
    // descriptors stay open in the parent (borrowed by `fds`) until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, target) in &pairs {
                if src == target {
                    // Already at its number: only let it survive exec.
                    let flags = libc::fcntl(src, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(src, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The last error runc logged in `path` after byte `start`, from JSON lines (`{"level":"error","msg":..}`)
/// or logrus text lines.
fn last_logged_error(path: &Path, start: u64) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(bytes.get(start as usize..)?);
    let json = text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v.get("level")?.as_str()? == "error").then(|| v.get("msg")?.as_str().map(str::to_string))?
    });
    json.or_else(|| text.lines().any(|l| l.contains("level=error")).then(|| error_message(&text)))
}

/// Append CRIU's own error lines (and a hint) from its log, which runc's message only points at.
fn with_criu_errors(message: String, criu_log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(criu_log) else { return message };
    // CRIU's first errors name the cause; the last ones only say that it failed.
    let causes: Vec<String> = crate::criu::log::error_lines(&text)
        .into_iter()
        .filter(|l| !l.contains("FAILED"))
        .take(2)
        .map(|l| l.find("Error (").map(|i| l[i..].to_string()).unwrap_or(l))
        .collect();
    let mut out = message;
    if !causes.is_empty() {
        out.push_str(&format!("; CRIU: {}", causes.join(" / ")));
    }
    if let Some(h) = crate::criu::log::hint(&text) {
        out.push_str(&format!("; hint: {h}"));
    }
    out
}

/// runc's error from its stderr: the `msg` of a logrus text line (`time=... level=error msg="..."`), else
/// the last non-empty line.
pub fn error_message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let logrus = lines.iter().rev().find_map(|l| {
        if !l.contains("level=error") {
            return None;
        }
        let start = l.find("msg=")? + 4;
        Some(unquote_go(&l[start..]))
    });
    logrus.or_else(|| lines.last().map(|l| l.to_string())).unwrap_or_else(|| "no error message".into())
}

/// Undo Go's `%q` quoting of a logrus field (`"a \"b\"\n"` → `a "b"` + newline); unquoted values as is.
fn unquote_go(s: &str) -> String {
    let Some(body) = s.strip_prefix('"') else { return s.split_whitespace().next().unwrap_or_default().to_string() };
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => break,
            },
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_errors_are_read_back_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        std::fs::write(&log, "{\"level\":\"error\",\"msg\":\"old failure\"}\n").unwrap();
        let start = std::fs::metadata(&log).unwrap().len();
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str(
            "{\"level\":\"info\",\"msg\":\"restoring\"}\n{\"level\":\"error\",\"msg\":\"criu failed: type RESTORE errno 0\"}\n",
        );
        std::fs::write(&log, text).unwrap();
        assert_eq!(last_logged_error(&log, start).as_deref(), Some("criu failed: type RESTORE errno 0"));
        assert_eq!(last_logged_error(&log, std::fs::metadata(&log).unwrap().len()), None);
    }

    #[test]
    fn error_messages_come_from_logrus_lines_or_the_last_line() {
        let text = "time=\"2026-01-01T00:00:00Z\" level=error msg=\"criu failed: type NOTIFY errno 0\\nlog file: /w/dump.log\"\n";
        assert_eq!(error_message(text), "criu failed: type NOTIFY errno 0\nlog file: /w/dump.log");
        assert_eq!(error_message("container does not exist\n\n"), "container does not exist");
        assert_eq!(error_message(""), "no error message");
    }

    #[test]
    fn state_json_parses() {
        let s: ContainerState = serde_json::from_str(
            r#"{"ociVersion":"1.0.2-dev","id":"c1","pid":42,"status":"paused","bundle":"/b","rootfs":"/b/rootfs","created":"x","owner":""}"#,
        )
        .unwrap();
        assert_eq!((s.id.as_str(), s.pid, s.status.as_str()), ("c1", 42, "paused"));
    }
}
