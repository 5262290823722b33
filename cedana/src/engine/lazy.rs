//! The lazy part of a lazy restore: CRIU's `lazy-pages` daemon (our child, started before `criu restore
//! --lazy-pages`, which connects to it through `lazy-pages.socket` in the shared work folder) fills the
//! restored tree's memory on demand through userfaultfd, asking our page server (on the other end of a
//! socket pair, `--page-server --ps-socket`) for the pages; once the program runs, the daemon pushes the
//! rest in the background until the memory is wholly local, then ends the session and exits. Meanwhile
//! every page image is checked against the manifest; should one not match, or the transfer fail, the
//! restored tree is killed (a tree whose lazy memory can no longer arrive must not run on).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checkpoint::lazy::LazyPages;
use crate::checkpoint::lazy_store::ChunkedPages;
use crate::checkpoint::CheckpointError;
use crate::criu::pageserver::{FilePages, PageServer, PageServerError, PageStore, Served};
use crate::engine::EngineError;

/// The descriptor number the daemon gets its end of the socket pair at.
const PS_SOCKET_FD: i32 = 3;
/// How long the daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// CRIU's socket for the restore, in the work folder.
const LAZY_SOCKET: &str = "lazy-pages.socket";
/// The daemon's log, in the work folder.
pub(crate) const LAZY_LOG: &str = "lazy-pages.log";

/// A running lazy-pages daemon with our page server and the check of the page images.
pub(crate) struct LazyDaemon {
    child: Child,
    server: JoinHandle<Result<(), PageServerError>>,
    verify: Verify,
    served: Arc<Served>,
    log: PathBuf,
}

/// How the page images are checked against the manifest.
enum Verify {
    /// Local files: read once more by a thread of their own while the program runs (from the page cache).
    Reread(JoinHandle<Result<(), CheckpointError>>),
    /// Read by ranges: hashed as the page server fetches them; the rest fetched once the transfer is over.
    AsServed(Arc<ChunkedPages>),
}

/// What the background transfer did.
#[derive(Debug, Clone, Copy)]
pub struct LazyTransfer {
    /// Pages sent by our page server (on demand and in the background).
    pub pages: u64,
    /// From the program's start to its memory being wholly local.
    pub time: Duration,
}

impl LazyDaemon {
    /// Start `criu lazy-pages` on `images` with `work` as its work folder, served from `lazy`; returns once
    /// it listens for the restore.
    pub(crate) fn start(criu: &Path, images: &Path, work: &Path, lazy: &LazyPages, location: &Path) -> Result<Self, EngineError> {
        let (store, verify): (Arc<dyn PageStore>, Option<Arc<ChunkedPages>>) = match &lazy.chunked {
            Some(chunked) => (chunked.clone(), Some(chunked.clone())),
            None => {
                let mut files = FilePages::new();
                for page in &lazy.pages {
                    if let (Some(id), Some(file)) = (page.pages_id(), &page.file) {
                        files.insert(id, Arc::clone(file), page.base);
                    }
                }
                (Arc::new(files), None)
            }
        };
        let server = PageServer::new(lazy.pagemaps.clone(), store);
        let served = server.served();
        let (ours, theirs) = UnixStream::pair().map_err(EngineError::io("creating the page server's socket"))?;
        let theirs = OwnedFd::from(theirs);
        let raw = theirs.as_raw_fd();
        let log = work.join(LAZY_LOG);
        let mut cmd = Command::new(criu);
        cmd.arg("lazy-pages")
            .arg("-D")
            .arg(images)
            .arg("-W")
            .arg(work)
            .args(["--page-server", "--ps-socket", &PS_SOCKET_FD.to_string(), "-v2", "-o"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls dup2 (async-signal-safe);
        // dup2 leaves the copy without close-on-exec, so CRIU finds it at PS_SOCKET_FD.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, PS_SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(EngineError::io(format!("running {} lazy-pages", criu.display())))?;
        drop(theirs);
        let socket = work.join(LAZY_SOCKET);
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(daemon_failed(format!("exited ({status}) before it listened"), &log));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(daemon_failed(format!("did not listen within {START_TIMEOUT:?}"), &log));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let server = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || server.serve(ours))
            .map_err(EngineError::io("starting the page server"))?;
        let verify = match verify {
            Some(chunked) => Verify::AsServed(chunked),
            None => {
                let (pages, location) = (lazy.pages.clone(), location.to_path_buf());
                let thread = std::thread::Builder::new()
                    .name("lazy-verify".into())
                    .spawn(move || pages.iter().try_for_each(|p| p.verify(&location)))
                    .map_err(EngineError::io("starting the page images' check"))?;
                Verify::Reread(thread)
            }
        };
        Ok(Self { child, server, verify, served, log })
    }

    /// Once the restored tree runs: wait until its memory is wholly local and every page image matched; on
    /// any failure, kill `pids` (the restored tree) and say why.
    pub(crate) fn finish(mut self, pids: &[i32]) -> Result<LazyTransfer, EngineError> {
        let running_since = Instant::now();
        let status = self.child.wait().map_err(EngineError::io("waiting for CRIU's lazy-pages daemon"));
        let served = self.server.join().unwrap_or(Err(PageServerError::Hangup));
        let verified = match self.verify {
            Verify::Reread(t) => t.join().unwrap_or(Err(CheckpointError::LivePacking("the page check panicked"))),
            // Only once the transfer is over: it reads what the daemon never asked for.
            Verify::AsServed(chunked) if served.is_ok() => chunked.verify(),
            Verify::AsServed(_) => Ok(()),
        };
        // The first cause wins: a page image that does not match, then what our page server could not
        // serve (a store that stopped answering, a unit that does not decode), then the daemon's own end.
        let failure = match (status, served, verified) {
            (_, _, Err(e)) => Some(EngineError::Checkpoint(e)),
            (_, Err(e @ (PageServerError::Read { .. } | PageServerError::NoSuchPages { .. })), _) => Some(serving_failed(e)),
            (Err(e), _, _) => Some(e),
            (Ok(s), _, _) if !s.success() => Some(daemon_failed(format!("failed ({s})"), &self.log)),
            (_, Err(e), _) => Some(serving_failed(e)),
            _ => None,
        };
        if let Some(e) = failure {
            kill_tree(pids);
            return Err(e);
        }
        Ok(LazyTransfer { pages: self.served.pages.load(Ordering::Relaxed), time: running_since.elapsed() })
    }

    /// The restore failed: stop the daemon (and with it the page server). The page server's own failure,
    /// if it had one (a store that stopped answering): that is why CRIU failed.
    pub(crate) fn abort(mut self) -> Option<EngineError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let served = self.server.join();
        if let Verify::Reread(t) = self.verify {
            let _ = t.join();
        }
        match served {
            Ok(Err(e @ (PageServerError::Read { .. } | PageServerError::NoSuchPages { .. } | PageServerError::BadImage(_)))) => {
                Some(serving_failed(e))
            }
            _ => None,
        }
    }
}

fn serving_failed(e: PageServerError) -> EngineError {
    EngineError::Io { what: "serving pages to CRIU's lazy-pages daemon".into(), source: std::io::Error::other(e) }
}

fn daemon_failed(what: String, log: &Path) -> EngineError {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail = crate::criu::log::error_lines(&text).join("\n  ");
    EngineError::Io {
        what: "CRIU's lazy-pages daemon".into(),
        source: std::io::Error::other(format!("{what}\n  {tail}\n  full log: {}", log.display())),
    }
}

/// SIGKILL every process of a restored tree.
fn kill_tree(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    tracing::error!(pids = ?pids, "the lazy restore failed after the program started: the restored tree was killed");
}
