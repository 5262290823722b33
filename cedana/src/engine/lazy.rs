//! The lazy part of a lazy restore: our lazy-pages handler ([`crate::criu::uffd`]) listens on
//! `lazy-pages.socket` in the work folder before `criu restore --lazy-pages` begins, takes each restored
//! process's userfaultfd from it and fills the tree's memory on demand, then, once the program runs, the rest
//! in the background until the memory is wholly local. Meanwhile every page image is checked against the
//! manifest; should one not match, or a page not arrive, the restored tree is killed (a tree whose lazy
//! memory can no longer arrive must not run on).

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::checkpoint::lazy::LazyPages;
use crate::checkpoint::lazy_store::ChunkedPages;
use crate::checkpoint::CheckpointError;
use crate::criu::pages::{FilePages, PageStore};
use crate::criu::uffd::{LazyError, LazyHandler, Pages};
use crate::engine::EngineError;

/// CRIU's socket for the restore, in the work folder.
const LAZY_SOCKET: &str = "lazy-pages.socket";

/// A running lazy-pages handler and the check of the page images.
pub(crate) struct LazyRestore {
    handler: LazyHandler,
    verify: Verify,
    /// Why [`LazyRestore::fill_before_resume`] refused the memory.
    refused: Option<EngineError>,
    /// Filled before the tree resumes: the page images are local, and checked for the cause of any failure.
    before_resume: bool,
}

/// How the page images are checked against the manifest.
enum Verify {
    /// Local files: read once more by a thread of their own while the program runs (from the page cache).
    Reread(JoinHandle<Result<(), CheckpointError>>),
    /// Read by ranges: hashed as the handler fetches them; the rest fetched once the transfer is over.
    AsServed(Arc<ChunkedPages>),
    /// Verified already (before the tree resumed).
    Done,
}

/// What the background transfer did.
#[derive(Debug, Clone, Copy)]
pub struct LazyTransfer {
    /// Pages filled in (on demand and in the background).
    pub pages: u64,
    /// Page faults the program waited on.
    pub faults: u64,
    /// From the program's start to its memory being wholly local.
    pub time: Duration,
}

impl LazyRestore {
    /// Listen for the restore in `work`, serving the pages of `lazy` (the other images in `images`).
    /// With `before_resume`, every page is filled at `post-restore` ([`LazyRestore::fill_before_resume`]);
    /// `advance` is told the bytes filled in.
    pub(crate) fn start(
        images: &Path,
        work: &Path,
        lazy: &LazyPages,
        location: &Path,
        before_resume: bool,
        advance: Option<crate::progress::Advancer>,
    ) -> Result<Self, EngineError> {
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
        let pages = Pages { maps: lazy.pagemaps.clone(), store, images: images.to_path_buf(), advance };
        let handler = LazyHandler::listen(&work.join(LAZY_SOCKET), pages).map_err(serving_failed)?;
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
        Ok(Self { handler, verify, refused: None, before_resume })
    }

    /// At `post-restore` (nothing resumed): fill every page and verify every page image; `false` (CRIU then
    /// kills the tree) when a page could not be read or an image does not match ([`LazyRestore::abort`]
    /// says which).
    pub(crate) fn fill_before_resume(&mut self) -> bool {
        let filled = self.handler.fill_all();
        // A page image that does not match explains a page that could not be read (a unit that does not
        // decode), and must stop the tree anyway.
        if let Err(e) = verify_now(&mut self.verify) {
            self.refused = Some(e);
            return false;
        }
        match filled {
            Ok(()) => true,
            // The handler's own error (a page it could not read) comes from `abort`.
            Err(LazyError::Stopped) => false,
            Err(e) => {
                self.refused = Some(serving_failed(e));
                false
            }
        }
    }

    /// Once the restored tree runs: wait until its memory is wholly local and every page image matched; on
    /// any failure, kill `pids` (the restored tree) and say why.
    pub(crate) fn finish(self, pids: &[i32]) -> Result<LazyTransfer, EngineError> {
        let running_since = Instant::now();
        let (served, held) = self.handler.wait();
        let verified = match self.verify {
            Verify::Reread(t) => t.join().unwrap_or(Err(CheckpointError::LivePacking("the page check panicked"))),
            // Only once the transfer is over: it reads what the handler never asked for.
            Verify::AsServed(chunked) if served.is_ok() => chunked.verify(),
            Verify::AsServed(_) | Verify::Done => Ok(()),
        };
        // The first cause wins: a page image that does not match, then what could not be served (a store
        // that stopped answering, a unit that does not decode).
        let failure = match (served, verified) {
            (_, Err(e)) => Err(EngineError::Checkpoint(e)),
            (Err(e), _) => Err(serving_failed(e)),
            (Ok(t), Ok(())) => Ok(t),
        };
        match failure {
            Ok(t) => Ok(LazyTransfer { pages: t.pages, faults: t.faults, time: running_since.elapsed() }),
            Err(e) => {
                // Killed while its userfaultfds are still held: no thread of it runs on a zero page.
                kill_tree(pids);
                drop(held);
                Err(e)
            }
        }
    }

    /// The restore failed: stop the handler. Its own failure, if it had one (a store that stopped
    /// answering): that is why CRIU failed.
    pub(crate) fn abort(mut self) -> Option<EngineError> {
        let failed = self.handler.stop();
        if self.refused.is_some() {
            return self.refused;
        }
        // Filled before resuming, the pages are local: a damaged page image that CRIU read itself (the
        // pages it restores on its own) is why it failed.
        if self.before_resume {
            if let Err(e) = verify_now(&mut self.verify) {
                return Some(e);
            }
        } else if let Verify::Reread(t) = self.verify {
            let _ = t.join();
        }
        match failed {
            Some(e @ (LazyError::Read { .. } | LazyError::NoSuchPages { .. } | LazyError::BadImage(_))) => {
                Some(serving_failed(e))
            }
            _ => None,
        }
    }
}

/// Check every page image against the manifest now (once).
fn verify_now(verify: &mut Verify) -> Result<(), EngineError> {
    match std::mem::replace(verify, Verify::Done) {
        Verify::Reread(t) => t.join().unwrap_or(Err(CheckpointError::LivePacking("the page check panicked"))),
        Verify::AsServed(chunked) => chunked.verify(),
        Verify::Done => Ok(()),
    }
    .map_err(EngineError::Checkpoint)
}

fn serving_failed(e: LazyError) -> EngineError {
    EngineError::Io { what: "serving the lazy pages of the restored tree".into(), source: std::io::Error::other(e) }
}

/// SIGKILL every process of a restored tree.
fn kill_tree(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    tracing::error!(pids = ?pids, "the lazy restore failed after the program started: the restored tree was killed");
}
