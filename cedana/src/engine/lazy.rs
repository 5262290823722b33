//! The lazy part of a lazy restore: our lazy-pages handler ([`crate::criu::uffd`]) listens on
//! `lazy-pages.socket` in the work folder before `criu restore --lazy-pages` begins, takes each restored
//! process's userfaultfd from it and fills the tree's memory on demand, then, once the program runs, the rest
//! in the background until the memory is wholly local. Meanwhile every page image is checked against the
//! manifest; should one not match, or a page not arrive, the restored tree is killed (a tree whose lazy
//! memory can no longer arrive must not run on).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::lazy::LazyPages;
use crate::checkpoint::lazy_store::{read_failed, ChunkedPages};
use crate::criu::uffd::order::PageOrder;
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
    /// The checkpoint, for errors.
    location: PathBuf,
    /// Where the order the program touched its memory in is to be kept, when none is yet.
    record_order: Option<PathBuf>,
}

/// How the page images are checked against the manifest.
enum Verify {
    /// Each chunk checked as the handler fetches it, before it is served; the chunks never asked for are
    /// fetched once the transfer is over, and each image's digest compared.
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
    /// Pages brought first, in the order an earlier lazy restore of the checkpoint saw the program touch
    /// them.
    pub ordered: u64,
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
        let store = Arc::clone(&lazy.chunked);
        // The program only runs before its memory is local in a lazy restore: only then does the order it
        // touches its memory in matter (and show).
        let (order, record_order) = match before_resume {
            true => (PageOrder::default(), None),
            false => match PageOrder::load(&lazy.order_file) {
                Some(order) => (order, None),
                None => (PageOrder::default(), Some(lazy.order_file.clone())),
            },
        };
        if !order.is_empty() {
            tracing::debug!(blocks = order.blocks.len(), file = %lazy.order_file.display(), "bringing the pages in a recorded order first");
        }
        let (maps, images) = (lazy.pagemaps.clone(), images.to_path_buf());
        let pages = Pages { maps, store, images, advance, order };
        let handler = LazyHandler::listen(work, LAZY_SOCKET, pages).map_err(|e| serving_failed(location, e))?;
        let verify = Verify::AsServed(Arc::clone(&lazy.chunked));
        Ok(Self { handler, verify, refused: None, before_resume, location: location.to_path_buf(), record_order })
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
                self.refused = Some(serving_failed(&self.location, e));
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
            // Only once the transfer is over: it reads what the handler never asked for.
            Verify::AsServed(chunked) if served.is_ok() => chunked.verify(),
            Verify::AsServed(_) | Verify::Done => Ok(()),
        };
        // The first cause wins: a page image that does not match, then what could not be served (a store
        // that stopped answering, a unit that does not decode).
        let failure = match (served, verified) {
            (_, Err(e)) => Err(EngineError::Checkpoint(e)),
            (Err(e), _) => Err(serving_failed(&self.location, e)),
            (Ok(t), Ok(())) => Ok(t),
        };
        match failure {
            Ok(t) => {
                if let Some(file) = self.record_order.filter(|_| !t.touched.is_empty()) {
                    // A hint for the next restores: a failure to keep it costs them speed only.
                    match t.touched.save(&file) {
                        Ok(()) => {
                            tracing::debug!(blocks = t.touched.blocks.len(), file = %file.display(), "recorded the page order")
                        }
                        Err(e) => tracing::warn!(error = %e, file = %file.display(), "could not keep the page order"),
                    }
                }
                let time = running_since.elapsed();
                Ok(LazyTransfer { pages: t.pages, faults: t.faults, ordered: t.ordered, time })
            }
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
        }
        match failed {
            Some(e @ (LazyError::Read { .. } | LazyError::NoSuchPages { .. } | LazyError::BadImage(_))) => {
                Some(serving_failed(&self.location, e))
            }
            _ => None,
        }
    }
}

/// Check every page image against the manifest now (once).
fn verify_now(verify: &mut Verify) -> Result<(), EngineError> {
    match std::mem::replace(verify, Verify::Done) {
        Verify::AsServed(chunked) => chunked.verify(),
        Verify::Done => Ok(()),
    }
    .map_err(EngineError::Checkpoint)
}

/// Why pages could not be served: a damaged checkpoint (a chunk that does not match its hash, a unit
/// that does not decode) as such, anything else as the failure to serve them.
fn serving_failed(location: &Path, e: LazyError) -> EngineError {
    use std::io::ErrorKind::{InvalidData, UnexpectedEof};
    match e {
        LazyError::Read { source, .. } if matches!(source.kind(), InvalidData | UnexpectedEof) => {
            EngineError::Checkpoint(read_failed(location, source))
        }
        e => EngineError::Io { what: "serving the lazy pages of the restored tree".into(), source: std::io::Error::other(e) },
    }
}

/// SIGKILL every process of a restored tree.
fn kill_tree(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    tracing::error!(pids = ?pids, "the lazy restore failed after the program started: the restored tree was killed");
}
