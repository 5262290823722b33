//! The CRIU driver: finds the binary, checks its version, runs dump/restore with our action-script hooks,
//! and turns failures into errors that quote CRIU's log and name the fix.

pub mod cli;
pub mod hook;
pub mod log;
pub mod options;
pub mod pages;
pub mod rpc;
pub mod socket;
pub mod stats;
pub mod streamer;
pub mod swrk;
pub mod uffd;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use options::CriuOptions;

/// Oldest CRIU that works on the kernels we target (older ones fail on the 6.13+ vDSO layout or on sockets).
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// Errors of the CRIU driver.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("CRIU not found (looked for {tried})")]
    NotFound { tried: String },
    #[error("running {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version printed {output:?}, which is not a CRIU version")]
    BadVersion { binary: PathBuf, output: String },
    #[error("CRIU {found} at {binary} is too old: cedana needs CRIU >= {}.{} on this kernel", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { binary: PathBuf, found: String },
    #[error("criu {action} failed ({status}){}{}\n  full log: {}", render_errors(.errors), render_hint(.hint), .log.display())]
    Failed { action: &'static str, status: String, errors: Vec<String>, hint: Option<String>, log: PathBuf },
    #[error("CRIU option refused: {message}")]
    BadOption { message: String },
    #[error("setting up CRIU hooks in {dir}: {source}")]
    Hook {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CriuError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            CriuError::NotFound { .. } | CriuError::Spawn { .. } | CriuError::BadVersion { .. } => K::Unavailable,
            CriuError::TooOld { .. } => K::FailedPrecondition,
            CriuError::BadOption { .. } => K::InvalidArgument,
            CriuError::Failed { .. } | CriuError::Hook { .. } => K::Internal,
        }
    }
}

fn render_errors(errors: &[String]) -> String {
    let tail: Vec<&String> = errors.iter().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
    tail.iter().map(|e| format!("\n  {e}")).collect()
}

fn render_hint(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default()
}

/// A CRIU binary.
#[derive(Debug, Clone)]
pub struct Criu {
    binary: PathBuf,
}

/// What to dump.
pub struct DumpCall<'a> {
    pub pid: i32,
    pub images_dir: &'a Path,
    /// Private folder for CRIU's log, stats and our hook socket.
    pub work_dir: &'a Path,
    pub options: &'a CriuOptions,
    pub leave_running: bool,
    /// Stream the images through the image-streamer socket in `images_dir` (`--stream`; see [`streamer`])
    /// instead of writing files.
    pub stream: bool,
}

/// What to restore. The restore is always detached from CRIU: the driver returns once the tree runs.
pub struct RestoreCall<'a> {
    pub images_dir: &'a Path,
    pub work_dir: &'a Path,
    pub options: &'a CriuOptions,
    /// CRIU's standard streams (and so those the restored tree inherits through `inherit_fd`).
    pub stdio: CriuStdio,
    /// Make the restored root a child of the calling process, so that it can be waited for by its PID
    /// (`waitpid(pid)`); otherwise it is left to whoever reaps orphans.
    pub as_child: bool,
    /// Read the images through the image-streamer socket in `images_dir` (`--stream`).
    pub stream: bool,
}

/// The standard streams a CRIU child gets.
#[derive(Debug)]
pub enum CriuStdio {
    /// The caller's own.
    Caller,
    /// One file on all three.
    All(std::fs::File),
    /// One each: stdin, stdout, stderr.
    Each([std::fs::File; 3]),
}

impl CriuStdio {
    /// Three files for the child's fds 0, 1, 2 (duplicates), or `None` for the caller's own.
    pub fn files(&self) -> std::io::Result<Option<Vec<std::fs::File>>> {
        match self {
            CriuStdio::Caller => Ok(None),
            CriuStdio::All(f) => (0..3).map(|_| f.try_clone()).collect::<Result<Vec<_>, _>>().map(Some),
            CriuStdio::Each(files) => files.iter().map(|f| f.try_clone()).collect::<Result<Vec<_>, _>>().map(Some),
        }
    }
}

/// Drives CRIU for the engine. One driver serves many operations at once (a daemon, a shim): nothing in it
/// may depend on the calling executable or on process-wide state.
///
/// `on_notify(name)` is called at each of CRIU's notification points (the names of its action scripts:
/// `pre-dump`, `post-dump`, `network-lock`, `pre-restore`, `post-restore`, `pre-resume`, ...) while CRIU waits
/// for the answer; `false` fails that step. A failed `post-dump` makes CRIU resume the dumped tree (unless
/// it was left running anyway) and fail the dump; a failed `pre-restore` stops a restore before anything is
/// restored.
pub trait CriuDriver: Send + Sync {
    /// The binary driven.
    fn criu(&self) -> &Criu;
    /// Dump a process tree into `call.images_dir`.
    fn dump(&self, call: &DumpCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<(), CriuError>;
    /// Restore a tree from `call.images_dir`; returns the PID of its root.
    fn restore(&self, call: &RestoreCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<i32, CriuError>;
    /// Whether this driver can stream images (`DumpCall::stream`, `RestoreCall::stream`) in this program:
    /// streaming runs the criu command line, whose notifications reach us through the running executable
    /// as action script (see [`hook::answers_hooks`]).
    fn can_stream(&self) -> bool {
        hook::answers_hooks()
    }
}

impl Criu {
    /// Use `configured` if given, else `criu` from PATH or the places scripts/setup.sh installs to.
    pub fn locate(configured: Option<&Path>) -> Result<Self, CriuError> {
        if let Some(path) = configured {
            return if path.is_file() {
                Ok(Self { binary: path.to_path_buf() })
            } else {
                Err(CriuError::NotFound { tried: path.display().to_string() })
            };
        }
        crate::binary::candidates("criu", &["/usr/local/sbin/criu", "/opt/cedana/criu/criu", "/usr/sbin/criu"])
            .iter()
            .find(|p| p.is_file())
            .map(|p| Self { binary: p.clone() })
            .ok_or_else(|| CriuError::NotFound { tried: "criu on PATH, /usr/local/sbin/criu, /opt/cedana/criu/criu".into() })
    }

    /// The binary this driver runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `criu --version`, e.g. `4.2.1`.
    pub fn version(&self) -> Result<String, CriuError> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .map_err(|source| CriuError::Spawn { binary: self.binary.clone(), source })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
            .filter(|v| parse_version(v).is_some())
            .ok_or_else(|| CriuError::BadVersion { binary: self.binary.clone(), output: text.trim().to_string() })
    }

    /// The version, refusing CRIU older than [`MIN_VERSION`]. Remembered per binary (path, size and
    /// modification time) in the temporary folder, so dumps and restores do not pay for a `criu --version`.
    pub fn supported_version(&self) -> Result<String, CriuError> {
        let cache = self.version_cache_path();
        let cached = cache.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).filter(|v| parse_version(v).is_some());
        let v = match cached {
            Some(v) => v,
            None => {
                let v = self.version()?;
                if let Some(p) = &cache {
                    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                    if std::fs::write(&tmp, &v).is_ok() {
                        let _ = std::fs::rename(&tmp, p);
                    }
                }
                v
            }
        };
        match parse_version(&v) {
            Some(found) if found >= MIN_VERSION => Ok(v),
            _ => Err(CriuError::TooOld { binary: self.binary.clone(), found: v }),
        }
    }

    fn version_cache_path(&self) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.binary).ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.binary, meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()).hash(&mut h);
        Some(std::env::temp_dir().join(format!(".cedana-criu-version-{:016x}", h.finish())))
    }

    /// Run `criu check`: whether it passed, and what it printed.
    pub fn check(&self) -> Result<(bool, String), CriuError> {
        let out = Command::new(&self.binary)
            .arg("check")
            .output()
            .map_err(|source| CriuError::Spawn { binary: self.binary.clone(), source })?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success() && text.contains("Looks good"), text.trim().to_string()))
    }

    /// Whether `criu check --feature NAME` passes (e.g. `mem_dirty_track`, which pre-dumps need).
    pub fn has_feature(&self, name: &str) -> Result<bool, CriuError> {
        let status = Command::new(&self.binary)
            .args(["check", "--feature", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| CriuError::Spawn { binary: self.binary.clone(), source })?;
        Ok(status.success())
    }
}

/// `4.2.1` → `(4, 2)`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map(|m| m.chars().take_while(|c| c.is_ascii_digit()).collect::<String>());
    Some((major, minor.and_then(|m| m.parse().ok()).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("4.2.1"), Some((4, 2)));
        assert_eq!(parse_version("3.17"), Some((3, 17)));
        assert_eq!(parse_version("4"), Some((4, 0)));
        assert!(parse_version("4.1.1").unwrap() < MIN_VERSION);
        assert_eq!(parse_version("abc"), None);
    }

    #[test]
    fn a_missing_configured_binary_is_named() {
        let err = Criu::locate(Some(Path::new("/nonexistent/criu"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/criu"), "{err}");
    }

    #[test]
    fn failures_render_errors_hint_and_log() {
        let e = CriuError::Failed {
            action: "dump",
            status: "exit code 1".into(),
            errors: vec!["Error (x): boom".into()],
            hint: Some("add --tcp-established".into()),
            log: PathBuf::from("/tmp/w/dump.log"),
        };
        let s = e.to_string();
        assert!(s.contains("boom") && s.contains("hint: add --tcp-established") && s.contains("/tmp/w/dump.log"), "{s}");
    }
}
