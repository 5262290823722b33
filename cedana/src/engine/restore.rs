//! The restore pipeline, the same for every target: open the checkpoint (a folder is verified while CRIU
//! starts up, an archive as it is extracted), dispatch on the kind its manifest records (a front end may
//! restrict it), and let the target restore; nothing is restored before every checksum matched and the
//! `before-restore` hooks agreed (the [`Gate`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::checkpoint::lazy_store;
use crate::checkpoint::{CheckpointKind, FileRedirect, Manifest, OpenedCheckpoint, PendingVerification};
use crate::criu::options::CriuOptions;
use crate::engine::context::OpContext;
use crate::engine::hooks::{Before, HookContext, HookPoint, Passed};
use crate::engine::location::Source;
use crate::engine::targets::{self, runc::ContainerRestore};
use crate::engine::{Engine, EngineError};

/// Where the standard streams of the restored tree go, when they were pipes at dump time (the other end of
/// those pipes is gone).
#[derive(Debug, Clone)]
pub enum RestoreStdio {
    /// Onto the caller's own stdin/stdout/stderr (attached restores).
    Inherit,
    /// Onto a file, appended (detached restores).
    File(PathBuf),
    /// Onto /dev/null.
    Null,
    /// Onto these: stdin, stdout, stderr (e.g. pipes a daemon holds for an attachable job).
    Fds(std::sync::Arc<[std::os::fd::OwnedFd; 3]>),
}

/// What a restore of a process tree needs besides the checkpoint.
#[derive(Debug, Clone)]
pub struct ProcessRestoreOptions {
    /// Make the restored root a child of the caller, to be waited for with [`wait_for_exit`].
    pub as_child: bool,
    pub stdio: RestoreStdio,
    pub pid_file: Option<PathBuf>,
}

impl Default for ProcessRestoreOptions {
    fn default() -> Self {
        Self { as_child: false, stdio: RestoreStdio::Null, pid_file: None }
    }
}

/// A restore, as data.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub source: Source,
    /// Refuse checkpoints of any other kind (e.g. `cedana restore runc`).
    pub only: Option<CheckpointKind>,
    /// Options on top of what the dump recorded.
    pub options: CriuOptions,
    /// For process checkpoints.
    pub process: ProcessRestoreOptions,
    /// For container checkpoints: the new container.
    pub container: Option<ContainerRestore>,
    /// Where files the workload held outside its mounts at dump time (recorded in the manifest, e.g. a
    /// container's stdout redirected to a host file) are reconnected, by the descriptor of the restored root
    /// or by their original path; the others go back to their original paths. A missing file is created, and
    /// an empty one is extended to the size the original had (the workload writes on at its own offset).
    /// Empty by default.
    pub external_files: Vec<FileRedirect>,
    /// Stream the images from the archive to CRIU (`criu restore --stream`), with no extraction; `None`:
    /// the configured default. Only process checkpoints in an archive with an index stream; the others are
    /// extracted whatever this says.
    pub stream: Option<bool>,
    /// Restore lazily: the program runs before its memory has arrived, which our lazy-pages handler fills
    /// on demand and then in the background (see [`super::lazy`]); the restore returns
    /// once the memory is wholly local. Process and runc checkpoints whose page images can be read in pieces
    /// (a folder, or an archive of this version in any compression), local or in an object store.
    pub lazy: bool,
    /// With `lazy`: restore normally when the checkpoint cannot be restored lazily (an archive of an older
    /// version, a container), instead of refusing it.
    pub lazy_fallback: bool,
    /// A normal restore whose memory comes through our lazy-pages handler: CRIU restores the tree with its
    /// memory left behind userfaultfd, and at `post-restore` (nothing resumed) the handler fills all of it and
    /// the page images are verified, before the tree resumes (a mismatch: CRIU kills the tree). Set by the
    /// engine where it is the faster way (a local archive of a process, when streaming is the default and
    /// `stream` was not asked for); callers leave it `false`.
    pub through_uffd: bool,
    /// Restore a checkpoint holding GPU state even on a host whose GPUs do not match it (fewer, smaller, an
    /// older driver): the GPU restore may then fail, and the restored tree is killed.
    pub skip_gpu_check: bool,
}

impl RestoreRequest {
    /// A restore of the checkpoint at `source` with default settings.
    pub fn new(source: Source) -> Self {
        Self {
            source,
            only: None,
            options: CriuOptions::default(),
            process: ProcessRestoreOptions::default(),
            container: None,
            external_files: Vec::new(),
            stream: None,
            lazy: false,
            lazy_fallback: false,
            through_uffd: false,
            skip_gpu_check: false,
        }
    }
}

/// A finished restore.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    /// PID of the restored root (0 when the runtime ran attached and the container has exited).
    pub pid: i32,
    pub manifest: Manifest,
    /// The runtime's exit code, for container restores.
    pub exit_code: Option<i32>,
    /// Time spent verifying that the restore waited for (a folder is mostly verified while CRIU starts up).
    pub verify_time: Duration,
    /// CRIU's (or the runtime's) own time, without its wait for the verification (for a lazy restore: until
    /// the program ran).
    pub criu_time: Duration,
    /// For a lazy restore: the transfer of the memory after the program started.
    pub lazy: Option<super::lazy::LazyTransfer>,
}

/// Holds a restore until the checkpoint is verified and the `before-restore` hooks agreed. Targets call
/// [`Gate::pass`] at the last moment before anything is restored (CRIU's `pre-restore`). Hooks that can (the
/// GPU's check of this host) run while CRIU starts up.
pub struct Gate<'a> {
    pending: Option<PendingVerification>,
    verdict: Result<(), EngineError>,
    /// The `before-restore` hooks, begun when the gate was made.
    before: Before,
    ctx: &'a OpContext,
    waited: Duration,
}

impl Gate<'_> {
    /// Wait for the verification, then for the `before-restore` hooks; `true` lets the restore go on.
    /// Later calls give the same answer.
    pub fn pass(&mut self) -> bool {
        if let Some(p) = self.pending.take() {
            let t = Instant::now();
            self.verdict = p.wait().map_err(EngineError::from);
            self.waited = t.elapsed();
        }
        if self.verdict.is_ok() {
            if self.ctx.is_cancelled() {
                self.verdict = Err(EngineError::RestoreCancelled);
            } else if !self.before.pass() {
                // A placeholder: the refusal itself comes out of `settle`.
                self.verdict = Err(EngineError::RestoreCancelled);
            }
        }
        self.verdict.is_ok()
    }

    /// How long [`Gate::pass`] waited for the verification.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The verdict, once the target is done, and the hooks owed `after-restore`: a failed verification is
    /// the cause to report even when the target stopped before it asked, then a hook's refusal.
    fn settle(mut self) -> (Result<(), EngineError>, Passed) {
        if let Some(p) = self.pending.take() {
            self.verdict = p.wait().map_err(EngineError::from);
        }
        match self.before.finish() {
            Ok(passed) => (self.verdict, passed),
            // Only a checkpoint that verified reaches the hooks: the refusal is the cause.
            Err(refusal) => (Err(refusal.into()), Passed::default()),
        }
    }
}

/// Run the restore `req` describes; a lazy one that cannot be lazy is run again normally when the request
/// allows it (nothing was restored: such checkpoints are refused before CRIU starts).
pub(crate) fn run(engine: &Engine, req: RestoreRequest, ctx: &OpContext) -> Result<RestoreOutcome, EngineError> {
    let fallback = req.lazy && req.lazy_fallback;
    match run_once(engine, req.clone(), ctx) {
        Err(e) if fallback && cannot_be_lazy(&e) => {
            tracing::warn!(error = %e, "this checkpoint cannot be restored lazily: restoring it normally");
            run_once(engine, RestoreRequest { lazy: false, ..req }, ctx)
        }
        result => result,
    }
}

/// A folder of this restore in the scratch folder (`.cedana-scratch-PID-*`), deleted when dropped.
fn operation_scratch(engine: &Engine) -> Result<tempfile::TempDir, EngineError> {
    let parent = engine.scratch_dir();
    std::fs::create_dir_all(&parent).map_err(EngineError::io(format!("creating {}", parent.display())))?;
    tempfile::Builder::new()
        .prefix(&crate::engine::leftovers::prefix(".cedana-scratch-"))
        .tempdir_in(&parent)
        .map_err(EngineError::io(format!("creating a folder in {}", parent.display())))
}

/// An archive opened for a restore through userfaultfd, when it is a process checkpoint whose pages are in
/// place (`None`: another kind, or an archive of an older version, to be opened the usual way); its chunks
/// are fetched `ahead` at a time ahead of the one being copied.
fn through_uffd(opened: Result<OpenedCheckpoint, EngineError>, ahead: usize) -> Result<Option<OpenedCheckpoint>, EngineError> {
    match opened {
        Ok(opened) if opened.manifest.kind == CheckpointKind::Process => {
            // Filled front to back: a few chunks at a time are enough.
            if let Some(lazy) = opened.lazy.as_ref() {
                lazy.chunked.read_in_sequence(ahead);
            }
            Ok(Some(opened))
        }
        Ok(_) | Err(EngineError::Checkpoint(crate::checkpoint::CheckpointError::NotInPlace { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `e` refused a lazy restore of a checkpoint that a normal restore takes.
fn cannot_be_lazy(e: &EngineError) -> bool {
    matches!(e, EngineError::Checkpoint(crate::checkpoint::CheckpointError::NotInPlace { .. }) | EngineError::NotLazy { .. })
}

fn run_once(engine: &Engine, req: RestoreRequest, ctx: &OpContext) -> Result<RestoreOutcome, EngineError> {
    let started = Instant::now();
    // The reader's folders (an extraction, a streamed restore's small images, a download) go into a folder of
    // this operation, named after this process, which a later start sweeps should this one be killed (see
    // `leftovers`); dropped last, once nothing reads from it. A lazy restore's pages may outlive this call:
    // they stay in the scratch folder itself.
    let op_scratch = if req.lazy { None } else { Some(operation_scratch(engine)?) };
    let scratch = op_scratch.as_ref().map(|t| t.path().to_path_buf()).unwrap_or_else(|| engine.scratch_dir());
    let may_stream = req.stream.unwrap_or(engine.config().stream())
        && matches!(req.only, None | Some(CheckpointKind::Process))
        && engine.criu().can_stream()
        && !req.lazy;
    // An archive of a process restores fastest with its memory through userfaultfd (see
    // `RestoreRequest::through_uffd`): where streaming is the default, unless `--stream` asked for CRIU's.
    let uffd_wanted = may_stream
        && req.stream.is_none()
        && matches!(req.only, None | Some(CheckpointKind::Process))
        && crate::criu::uffd::kernel::noncooperative();
    let mut uffd_opened = None;
    // A checkpoint in an object store is read by ranges through userfaultfd, streams from it, or is downloaded
    // first (kept until the restore ends).
    #[cfg(feature = "storage")]
    if let Source::Url(u) = &req.source {
        // (Never for a lazy restore: `may_stream` excludes it.)
        if uffd_wanted {
            uffd_opened = through_uffd(crate::engine::remote::open_lazy(engine, u), lazy_store::AHEAD_FROM_STORE)?;
        }
    }
    let (path, from_store, _downloaded): (PathBuf, Option<OpenedCheckpoint>, Option<tempfile::TempDir>) = match &req.source {
        Source::Path(p) => (p.clone(), None, None),
        Source::Url(u) if uffd_opened.is_some() => (PathBuf::from(u), None, None),
        // A lazy restore reads the object by ranges, as the program needs its pages.
        #[cfg(feature = "storage")]
        Source::Url(u) if req.lazy => (PathBuf::from(u), Some(crate::engine::remote::open_lazy(engine, u)?), None),
        #[cfg(feature = "storage")]
        Source::Url(u) => match crate::engine::remote::open(engine, u, may_stream, &scratch)? {
            crate::engine::remote::Remote::Streamed(opened) => (PathBuf::from(u), Some(*opened), None),
            crate::engine::remote::Remote::Downloaded(p, guard) => (p, None, Some(guard)),
        },
        #[cfg(not(feature = "storage"))]
        Source::Url(u) => return Err(crate::engine::location::unsupported_url(u)),
    };
    let mut chosen = match req.only {
        Some(kind) => {
            let t = targets::restore_target(kind)?;
            t.precheck(engine, &req)?;
            Some(t)
        }
        None => None,
    };
    // A folder is verified while CRIU starts up (CRIU is held at its pre-restore step, before it restores
    // anything, until every checksum matched); an archive is verified as it is extracted.
    let folder = std::fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
    let progress = ctx.progress();
    if uffd_opened.is_none() && from_store.is_none() && !folder && uffd_wanted {
        uffd_opened = through_uffd(
            crate::checkpoint::lazy::open_lazy(&path, &scratch).map_err(EngineError::from),
            lazy_store::AHEAD_FROM_FILE,
        )?;
    }
    let req = RestoreRequest { through_uffd: uffd_opened.is_some(), ..req };
    let stream = may_stream && !folder && uffd_opened.is_none();
    // A streamed restore reads the archive's small files now and the page images as CRIU asks for them;
    // a checkpoint of another kind (its runtime runs CRIU) is extracted after all. A checkpoint opened in an
    // object store (streamed, or for a lazy restore) is used as it is.
    let streamed = match from_store {
        Some(opened) => Some(opened),
        None if stream => {
            OpenedCheckpoint::open_streamed(&path, &scratch)?.filter(|o| o.manifest.kind == CheckpointKind::Process)
        }
        None => None,
    };
    // A lazy restore reads the page images in place (in a local file, or by ranges from an object store).
    let (opened, pending) = if let Some(opened) = uffd_opened.or(streamed) {
        (opened, None)
    } else if req.lazy {
        (crate::checkpoint::lazy::open_lazy(&path, &engine.scratch_dir())?, None)
    } else if folder {
        let (opened, pending) = OpenedCheckpoint::open_folder_verifying(&path)?;
        (opened, Some(pending))
    } else {
        progress.phase("verifying", Some(crate::engine::dump::disk_size(&path)));
        let opened = OpenedCheckpoint::open(&path, &scratch, &|n| progress.advance(n));
        progress.finish();
        (opened?, None)
    };
    // A lazy (or userfaultfd) restore's sparse page images are still being written: CRIU waits for them at
    // its pre-restore step, as for a folder's verification.
    let pending = pending.or_else(|| opened.lazy.as_ref().and_then(|l| l.take_pending()));
    let kind = opened.manifest.kind;
    if let Some(wanted) = req.only.filter(|w| *w != kind) {
        return Err(EngineError::WrongKind { path, found: kind, wanted });
    }
    if req.lazy && !matches!(kind, CheckpointKind::Process | CheckpointKind::Runc) {
        return Err(EngineError::NotLazy { kind });
    }
    let target = match chosen.take() {
        Some(t) => t,
        None => {
            let t = targets::restore_target(kind)?;
            t.precheck(engine, &req)?;
            t
        }
    };
    if ctx.is_cancelled() {
        return Err(EngineError::RestoreCancelled);
    }
    let verify_time = started.elapsed();
    let hooks = engine.hooks();
    let mut hook_ctx = HookContext::new(kind, 0, req.container.as_ref().map(|c| c.id.clone()), path.clone());
    hook_ctx.gpu = opened.manifest.gpu.clone();
    hook_ctx.skip_gpu_check = req.skip_gpu_check;
    // Only a checkpoint with GPU state needs to know the GPUs a container is given.
    let gpu_container = req.container.as_ref().filter(|_| opened.manifest.gpu.is_some());
    hook_ctx.gpu_visible = gpu_container.map(|c| container_gpus(&c.flags.bundle, &opened));
    let (restored, verdict, passed, waited) = {
        let before = hooks.begin(HookPoint::BeforeRestore, &hook_ctx);
        let mut gate = Gate { pending, verdict: Ok(()), before, ctx, waited: Duration::ZERO };
        let locks = opened.manifest.criu_options.tcp_established || req.options.tcp_established;
        let mut lock_watch = super::netlock::Watch::start(locks);
        let restored = target.restore(engine, ctx, &req, &opened, &mut gate);
        lock_watch.finished(restored.is_ok());
        drop(lock_watch);
        let waited = gate.waited;
        let (verdict, passed) = gate.settle();
        (restored, verdict, passed, waited)
    };
    hook_ctx.pid = restored.as_ref().map(|r| r.pid).unwrap_or(0);
    let mut restored = verdict.and(restored);
    // The tree runs: hooks put back what they hold (a GPU's state); a refusal kills it.
    if let Ok(r) = &restored {
        if r.pid > 0 {
            if let Err(e) = hooks.check(HookPoint::Restored, &hook_ctx, &passed) {
                kill_restored_tree(r.pid);
                restored = Err(e.into());
            }
        }
    }
    for (phase, time) in hook_ctx.reported().phases {
        ctx.record(phase, time);
    }
    hook_ctx.succeeded = Some(restored.is_ok());
    hooks.after(HookPoint::AfterRestore, &hook_ctx, &passed);
    let restored = restored?;
    let verify_time = verify_time + waited;
    ctx.record("verify", verify_time);
    ctx.record("criu", restored.criu_time);
    if let Some(l) = &restored.lazy {
        ctx.record("lazy pages", l.time);
    }
    ctx.record("total", started.elapsed());
    Ok(RestoreOutcome {
        pid: restored.pid,
        manifest: opened.manifest.clone(),
        exit_code: restored.exit_code,
        verify_time,
        criu_time: restored.criu_time,
        lazy: restored.lazy,
    })
}

/// Kill a restored tree that must not run on (its GPU state could not be put back): every process of it,
/// root last, with SIGKILL. A container whose init dies stops with it.
fn kill_restored_tree(root: i32) {
    use nix::sys::signal::{kill, Signal};
    let pids = crate::procfs::tree_pids(root);
    tracing::warn!(root, processes = pids.len(), "killing the restored tree");
    for pid in pids.iter().rev() {
        let _ = kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

/// Wait for a restored root that is the caller's child (see [`ProcessRestoreOptions::as_child`]) to exit,
/// and return its exit code (128 + signal when killed, as shells report it). Waits for that PID only.
pub fn wait_for_exit(pid: i32) -> Result<i32, EngineError> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(EngineError::Io { what: format!("waiting for restored PID {pid}"), source: std::io::Error::from(e) })
            }
        }
    }
}

/// The GPUs a restored container's spec gives it: `CUDA_VISIBLE_DEVICES`, else `NVIDIA_VISIBLE_DEVICES` of the
/// bundle's config.json (the checkpoint's, which a bundle without one gets).
fn container_gpus(bundle: &std::path::Path, opened: &crate::checkpoint::OpenedCheckpoint) -> Option<crate::gpu::Visible> {
    let own = std::fs::read(bundle.join("config.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let config = own.or_else(|| opened.manifest.container.as_ref()?.config.clone())?;
    let env = config["process"]["env"].as_array()?;
    crate::gpu::Visible::from_env(env.iter().filter_map(|e| e.as_str()))
}

#[cfg(test)]
mod tests {
    use crate::checkpoint::{digest, CheckpointKind, CheckpointWriter, Manifest, OpenedCheckpoint, ProcessInfo, FORMAT_VERSION};
    use crate::codec::Compression;

    /// The format of a checkpoint comes from its content: a zstd archive renamed with a misleading
    /// extension, or none at all, opens and verifies as zstd (Cedana trusts the extension instead).
    #[test]
    fn a_checkpoint_is_opened_by_its_content_whatever_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = CheckpointWriter::path_for(dir.path(), "cp", Compression::Zstd);
        let mut w = CheckpointWriter::create(path, Compression::Zstd).unwrap();
        w.add_bytes("core-7.img", b"core").unwrap();
        w.add_bytes("pages-1.img", &[7u8; 100_000]).unwrap();
        let mut manifest = Manifest {
            format_version: FORMAT_VERSION,
            kind: CheckpointKind::Process,
            created_at: chrono::Utc::now(),
            hostname: "host".into(),
            cedana_version: "0".into(),
            criu_version: "4.2.1".into(),
            compression: Compression::Zstd,
            process: ProcessInfo { pid: 7, pids: vec![7], ..Default::default() },
            container: None,
            criu_options: Default::default(),
            stats: None,
            checksum: digest::ALGORITHM.into(),
            files: Vec::new(),
            placement: Vec::new(),
            streamed: false,
            gpu: None,
            phases: Vec::new(),
        };
        let written = w.commit(&mut manifest).unwrap();
        assert!(written.to_string_lossy().ends_with(".tar.zst"), "{}", written.display());
        let mut previous = written;
        for name in ["renamed.tar.jibberish", "renamed", "renamed.tar.gz"] {
            let renamed = dir.path().join(name);
            std::fs::rename(&previous, &renamed).unwrap();
            let opened = OpenedCheckpoint::open(&renamed, &dir.path().join("scratch"), &|_| {}).unwrap();
            assert_eq!(opened.manifest.compression, Compression::Zstd, "{name}");
            assert_eq!(std::fs::read(opened.images_dir.join("pages-1.img")).unwrap(), [7u8; 100_000], "{name}");
            previous = renamed;
        }
    }
}
