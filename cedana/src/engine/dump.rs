//! The dump pipeline, the same for every target: prepare the target, run the `before-dump` hooks, open the
//! destination, let the target run CRIU while page images stream into the archive, package the rest at the
//! moment every image is written and the workload is still frozen, write the manifest last, finish the
//! destination (atomic rename), finish the target, run the `after-dump` hooks.
//!
//! Any failure or cancellation before the checkpoint is complete rolls back: the workload runs, unfrozen
//! (CRIU resumes a tree whose `post-dump` step failed; a runc target resumes its container), and nothing is
//! left under the checkpoint's name. Once CRIU has let a tree die, its images are never thrown away.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::live::Packing;
use crate::checkpoint::manifest::PhaseTime;
use crate::checkpoint::tail::TailHasher;
use crate::checkpoint::{CheckpointError, CheckpointKind, CheckpointWriter, Existing, Manifest, FORMAT_VERSION, MANIFEST_NAME};
use crate::codec::Compression;
use crate::criu::options::CriuOptions;
use crate::engine::context::OpContext;
use crate::engine::hooks::{Before, HookContext, HookPoint, Passed};
use crate::engine::leftovers;
use crate::engine::location::Destination;
use crate::engine::stream::{self, StreamIntake};
use crate::engine::targets::{self, CheckpointCall, DumpTarget, Prepared, TargetSpec};
use crate::engine::{Engine, EngineError};

/// A dump, as data.
#[derive(Debug)]
pub struct DumpRequest {
    pub target: TargetSpec,
    /// Where the checkpoint goes. A checkpoint of the same name there is refused, unless the destination is
    /// [`Destination::replacing`] (what a front end's overwrite option maps to).
    pub destination: Destination,
    /// Checkpoint name (without extension); derived from the target and time if absent.
    pub name: Option<String>,
    pub compression: Compression,
    pub leave_running: bool,
    pub options: CriuOptions,
    /// Stream the images from CRIU into the archive (`criu dump --stream`), with no image file on disk;
    /// `None`: the configured default. Only archives in a format with units, written where headers can be
    /// patched in, of targets whose CRIU we run ourselves (processes), stream: the others are dumped to
    /// files whatever this says.
    pub stream: Option<bool>,
}

/// A finished dump.
#[derive(Debug, Clone)]
pub struct DumpOutcome {
    /// Where the checkpoint is.
    pub path: PathBuf,
    pub manifest: Manifest,
    /// Size of the checkpoint on disk (0 when written to a caller's writer).
    pub size: u64,
    pub criu_time: Duration,
    pub package_time: Duration,
    pub total_time: Duration,
    /// Options turned on after inspecting the workload.
    pub detected: Vec<&'static str>,
    /// Whether the images were streamed from CRIU (no image file on disk).
    pub streamed: bool,
}

/// Default checkpoint name: `dump-<kind>-<id>-<unix time>`.
pub fn default_name(kind: CheckpointKind, id: &str) -> String {
    format!("dump-{kind}-{id}-{}", chrono::Utc::now().timestamp())
}

/// `base`, or `base-2`, `base-3`, ... when a checkpoint of that name exists already in a local destination
/// (default names carry the time in seconds: two dumps of one workload within a second must not collide).
pub fn free_name(destination: &Destination, base: &str, compression: Compression) -> String {
    let Some(dir) = destination.local_dir() else { return base.to_string() };
    let taken = |n: &str| CheckpointWriter::path_for(dir, n, compression).symlink_metadata().is_ok();
    if !taken(base) {
        return base.to_string();
    }
    (2..).map(|i| format!("{base}-{i}")).find(|n| !taken(n)).unwrap_or_else(|| base.to_string())
}

pub(crate) fn check_name(name: &str) -> Result<(), EngineError> {
    let bad = |reason| Err(EngineError::BadName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("it must not contain '/' (the folder is given separately)");
    }
    if name.starts_with('.') {
        return bad("it must not start with '.'");
    }
    Ok(())
}

/// A file a front end adds to a checkpoint (e.g. the record of a containerd container): its name in the
/// checkpoint, and what produces its content, called once CRIU has dumped the workload (so that, without
/// `leave_running`, it sees the workload's final state).
pub type Attachment = (String, std::sync::Arc<dyn Fn() -> std::io::Result<Vec<u8>> + Send + Sync>);

/// Run the dump `req` describes, adding `attachments` to the checkpoint.
pub(crate) fn run(
    engine: &Engine,
    req: DumpRequest,
    attachments: &[Attachment],
    ctx: &OpContext,
) -> Result<DumpOutcome, EngineError> {
    let started = Instant::now();
    let mut target = targets::dump_target(&req.target);
    let prepared = target.prepare(engine, &req.options)?;
    let name = match &req.name {
        Some(n) => n.clone(),
        None => free_name(&req.destination, &default_name(prepared.kind, &prepared.id), req.compression),
    };
    check_name(&name)?;
    if let Some(dir) = req.destination.local_dir() {
        leftovers::sweep(dir);
    }
    let (writer, staging, images_dir) = open_writer(engine, &req, &name)?;
    let mut hook_ctx =
        HookContext::new(prepared.kind, prepared.process.pid, prepared.container_id.clone(), writer.final_path().to_path_buf());
    hook_ctx.leave_running = req.leave_running;
    let hooks = engine.hooks();
    // Hooks that can (the GPU's lock and checkpoint) run while CRIU starts up; the others, and the wait for
    // those, come at the last moment before the workload is frozen.
    let before = hooks.begin(HookPoint::BeforeDump, &hook_ctx).run_inline()?;
    let what = Dumped { prepared: &prepared, attachments, hooks: &hook_ctx };
    let (result, passed) = checkpoint(engine, &req, ctx, target.as_mut(), what, before, writer, &images_dir);
    drop(staging);
    hook_ctx.succeeded = Some(result.is_ok());
    let recorded = hook_ctx.reported().phases.len();
    hooks.after(HookPoint::AfterDump, &hook_ctx, &passed);
    for (phase, time) in hook_ctx.reported().phases.into_iter().skip(recorded) {
        ctx.record(phase, time);
    }
    let mut outcome = result?;
    outcome.detected = prepared.detected;
    outcome.total_time = started.elapsed();
    ctx.record("total", outcome.total_time);
    Ok(outcome)
}

/// A checkpoint writer for `req`, the staging folder (if any) and the folder CRIU writes its images into:
/// the checkpoint folder itself for `none`, else a hidden staging folder beside the checkpoint (or in the
/// scratch folder for a caller's writer), deleted when dropped.
fn open_writer(
    engine: &Engine,
    req: &DumpRequest,
    name: &str,
) -> Result<(CheckpointWriter, Option<tempfile::TempDir>, PathBuf), EngineError> {
    let (writer, staging_parent) = match &req.destination {
        Destination::Dir(dir) | Destination::DirReplacing(dir) => {
            if dir.exists() && !dir.is_dir() {
                // What runc says of an image path that is a file ("mkdir PATH: not a directory").
                let what = format!("creating checkpoint folder {}", dir.display());
                return Err(EngineError::Io { what, source: std::io::ErrorKind::NotADirectory.into() });
            }
            std::fs::create_dir_all(dir).map_err(EngineError::io(format!("creating checkpoint folder {}", dir.display())))?;
            let path = CheckpointWriter::path_for(dir, name, req.compression);
            let existing = if req.destination.replaces_existing() { Existing::Replace } else { Existing::Refuse };
            let direct = engine.config().direct_writes();
            (CheckpointWriter::create_with(path, req.compression, existing, direct)?, dir.clone())
        }
        #[cfg(feature = "storage")]
        Destination::Url(url) => {
            let scratch = engine.scratch_dir();
            std::fs::create_dir_all(&scratch).map_err(EngineError::io(format!("creating {}", scratch.display())))?;
            (crate::engine::remote::writer(engine, url, name, req.compression)?, scratch)
        }
        #[cfg(not(feature = "storage"))]
        Destination::Url(url) => return Err(crate::engine::location::unsupported_url(url)),
        Destination::Sink(slot) => {
            let sink = slot.lock().ok().and_then(|mut s| s.take()).ok_or_else(|| EngineError::Io {
                what: "writing the checkpoint".into(),
                source: std::io::Error::other("the destination's writer was already used"),
            })?;
            let scratch = engine.scratch_dir();
            std::fs::create_dir_all(&scratch).map_err(EngineError::io(format!("creating {}", scratch.display())))?;
            (CheckpointWriter::to_sink(sink, req.compression)?, scratch)
        }
    };
    if let Some(dir) = writer.in_place_dir() {
        let dir = dir.to_path_buf();
        return Ok((writer, None, dir));
    }
    let staging = tempfile::Builder::new()
        .prefix(&leftovers::prefix(".cedana-images-"))
        .tempdir_in(&staging_parent)
        .map_err(EngineError::io(format!("creating a staging folder in {}", staging_parent.display())))?;
    let dir = staging.path().to_path_buf();
    Ok((writer, Some(staging), dir))
}

/// What the packaging step, run at CRIU's `post-dump`, found.
#[derive(Default)]
struct Packaged {
    done: bool,
    cancelled: bool,
    error: Option<CheckpointError>,
    time: Duration,
    /// The checkpoint, finished while the workload was frozen (destinations that cannot keep an unfinished
    /// checkpoint: see [`CheckpointWriter::keeps_unfinished`]).
    committed: Option<(PathBuf, Manifest)>,
}

/// What goes into the checkpoint besides CRIU's images: the prepared target's files and the caller's.
struct Dumped<'a> {
    prepared: &'a Prepared,
    attachments: &'a [Attachment],
    /// Where the `before-dump` hooks report (the GPU hook's record of the tree's device state, their phases).
    hooks: &'a HookContext,
}

/// From CRIU to a committed checkpoint and a finished target; rolls the target back on any failure. The
/// `before-dump` hooks under way (`before`) are passed at the last moment before anything is frozen; the
/// hooks that passed are returned with the outcome (they are owed the `after-dump` point).
#[allow(clippy::too_many_arguments)] // the pipeline's parts, each used once
fn checkpoint(
    engine: &Engine,
    req: &DumpRequest,
    ctx: &OpContext,
    target: &mut dyn DumpTarget,
    what: Dumped<'_>,
    mut before: Before,
    writer: CheckpointWriter,
    images_dir: &Path,
) -> (Result<DumpOutcome, EngineError>, Passed) {
    let mut hook_phases = 0;
    let result = {
        let mut ready = || {
            let ok = !ctx.is_cancelled() && before.pass();
            // The hooks' phases so far (the GPU's checkpoint) belong in the manifest's timings.
            for (phase, time) in what.hooks.reported().phases.into_iter().skip(hook_phases) {
                ctx.record(phase, time);
                hook_phases += 1;
            }
            ok
        };
        checkpoint_with(engine, req, ctx, target, &what, &mut ready, writer, images_dir)
    };
    match before.finish() {
        Ok(passed) => (result, passed),
        // The refusal is why the dump stopped (CRIU only says its pre-dump step failed); nothing was frozen.
        Err(refusal) => match result {
            Err(EngineError::Interrupted) if ctx.is_cancelled() => (Err(EngineError::Interrupted), Passed::default()),
            // The target was rolled back already (nothing was frozen): the refusal replaces CRIU's account.
            Err(_) => (Err(refusal.into()), Passed::default()),
            // Not reached: targets stop when `ready` says no. Should one go on, its checkpoint stands.
            Ok(outcome) => {
                tracing::error!(error = %refusal, "the dump went on past a hook's refusal");
                (Ok(outcome), Passed::default())
            }
        },
    }
}

/// [`checkpoint`] once the hooks are in hand: `ready` is called at the last moment before anything is
/// frozen, and its `false` stops the dump there.
#[allow(clippy::too_many_arguments)] // the pipeline's parts, each used once
fn checkpoint_with(
    engine: &Engine,
    req: &DumpRequest,
    ctx: &OpContext,
    target: &mut dyn DumpTarget,
    what: &Dumped<'_>,
    ready: &mut dyn FnMut() -> bool,
    mut writer: CheckpointWriter,
    images_dir: &Path,
) -> Result<DumpOutcome, EngineError> {
    let Dumped { prepared, attachments, hooks } = *what;
    writer.set_cancel(ctx.cancel().clone());
    let temp_work = match &prepared.work_path {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix(&leftovers::prefix("cedana-dump-"))
                .tempdir()
                .map_err(EngineError::io("creating a work folder"))?,
        ),
    };
    let work = match (&prepared.work_path, &temp_work) {
        (Some(p), _) => p.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary work folder exists whenever the caller gave none"),
    };
    std::fs::create_dir_all(&work).map_err(EngineError::io(format!("creating {}", work.display())))?;
    let mut tail = follow_in_place(&writer)?;
    let progress = ctx.progress();
    let streamed = req.stream.unwrap_or(engine.config().stream())
        && target.can_stream()
        && engine.criu().can_stream()
        && stream::can_stream(req.compression, &writer);
    let keeps_unfinished = writer.keeps_unfinished();
    // Page images go into the archive while CRIU writes them: straight from CRIU's pipes, or followed in
    // the images folder.
    let mut packing = if streamed {
        Intake::Stream(StreamIntake::start(writer, images_dir, progress.advancer())?, None)
    } else {
        Intake::Files(Packing::start(writer, images_dir, progress.advancer()))
    };
    let survives = target.survives_criu(req.leave_running);
    // Where an unfinished checkpoint could not be kept (an upload), it is finished at post-dump, while the
    // workload is frozen: a failure then gives the workload back instead of losing its images.
    let commit_frozen = !survives && !keeps_unfinished;
    let mut state = Packaged::default();
    let criu_start = Instant::now();
    // The files besides CRIU's images, the manifest last, and the checkpoint made visible.
    let finish = |mut writer: CheckpointWriter, stats| -> Result<(PathBuf, Manifest), CheckpointError> {
        for (name, bytes) in &prepared.extra_files {
            writer.add_bytes(name, bytes)?;
        }
        for (name, produce) in attachments {
            let bytes = produce().map_err(|e| CheckpointError::Io { path: PathBuf::from(name), source: e })?;
            writer.add_bytes(name, &bytes)?;
        }
        let mut manifest = new_manifest(engine, prepared, req.compression, stats, hooks.reported().gpu);
        manifest.streamed = streamed;
        manifest.phases = phases_so_far(ctx, criu_start.elapsed());
        let path = writer.commit(&mut manifest)?;
        Ok((path, manifest))
    };
    let call = CheckpointCall {
        images_dir,
        work_dir: &work,
        options: &prepared.options,
        leave_running: req.leave_running,
        stream: streamed,
    };
    if ctx.is_cancelled() {
        // Nothing is frozen yet: stop before CRIU runs.
        return Err(EngineError::Interrupted);
    }
    progress.phase("dumping", None);
    let mut lock_watch = super::netlock::Watch::start(prepared.options.tcp_established);
    let mut refused = false;
    let result = {
        let mut ready = || {
            refused = !ready();
            !refused
        };
        let mut frozen = || -> bool {
            if ctx.is_cancelled() {
                state.cancelled = true;
                return false;
            }
            if req.leave_running {
                return true;
            }
            let t = Instant::now();
            let mut res = packing.writer().and_then(|w| package_images(w, images_dir, &mut tail, ctx, Release::WorkloadAlive));
            if res.is_ok() && commit_frozen {
                // CRIU's statistics are written after this point: such a manifest has none.
                res = packing.take_writer().and_then(|w| finish(w, None)).map(|done| state.committed = Some(done));
            } else if res.is_ok() && !survives {
                // The last moment the workload can be given back: its images must still have a place to be
                // committed to (a folder removed under the dump would lose them once CRIU ends the tree).
                res = packing.writer().and_then(|w| still_in_place(w, req.destination.local_dir()));
            }
            state.time = t.elapsed();
            match res {
                Ok(()) => {
                    state.done = true;
                    true
                }
                Err(e) => {
                    state.cancelled = ctx.is_cancelled();
                    state.error = Some(e);
                    false
                }
            }
        };
        target.checkpoint(engine, &call, &mut ready, &mut frozen)
    };
    lock_watch.finished(result.is_ok());
    drop(lock_watch);
    let criu_time = criu_start.elapsed().saturating_sub(state.time);
    ctx.record("criu", criu_time);
    // What failed in the stream from CRIU (an image the archive could not take: a full disk, a cancel),
    // the cause of CRIU's own failure (its pipe closed).
    let stream_failure = if result.is_err() { packing.failure() } else { None };
    // A packaging failure, unless cancellation is what stopped it.
    let package_failure = |source| if ctx.is_cancelled() { EngineError::Interrupted } else { EngineError::Package { source } };
    let packaged_at_post_dump = state.done;
    let committed = state.committed.take();
    let commit = || {
        if let Some((path, manifest)) = committed {
            return Ok((path, manifest, state.time));
        }
        // The live packer finishing what CRIU wrote last (e.g. compressing the tail of the page images) is
        // packaging time too.
        let waited = Instant::now();
        let mut writer = packing.into_writer().map_err(package_failure)?;
        if !survives {
            // CRIU has let the tree die: from here on, a failure must not throw its images away.
            writer.keep_if_unfinished();
        }
        let mut package_time = state.time + waited.elapsed();
        if !state.done {
            let t = Instant::now();
            let release = if survives { Release::WorkloadAlive } else { Release::Keep };
            package_images(&mut writer, images_dir, &mut tail, ctx, release).map_err(package_failure)?;
            package_time += t.elapsed();
        }
        progress.finish();
        let stats = match crate::criu::stats::read_dump_stats(&work) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no CRIU dump statistics");
                None
            }
        };
        let kept = writer.temp_path().to_path_buf();
        let t = Instant::now();
        let (path, manifest) = finish(writer, stats).map_err(|source| {
            if survives {
                package_failure(source)
            } else {
                crate::engine::leftovers::mark_kept(&kept);
                EngineError::Unfinished { pid: prepared.process.pid, kept, source }
            }
        })?;
        package_time += t.elapsed();
        Ok((path, manifest, package_time))
    };
    if let Err(err) = result {
        progress.finish();
        if packaged_at_post_dump && !survives && !state.cancelled {
            // CRIU failed after it had written every image and been told to go on: it may have ended the
            // tree already. The images are complete, so the checkpoint is completed and kept, never deleted.
            tracing::error!(error = %err, "CRIU failed after post-dump; completing the checkpoint anyway");
            let outcome = commit();
            if let Some(t) = temp_work {
                // Kept outside the macro: tracing skips its arguments when the level is off.
                let kept = t.keep();
                crate::engine::leftovers::mark_kept(&kept);
                tracing::info!(log = %kept.display(), "CRIU's work folder was kept");
            }
            return Err(match outcome {
                Ok((kept, _, _)) => EngineError::CriuFailedAfterDump { pid: prepared.process.pid, kept, cause: Box::new(err) },
                Err(e) => e,
            });
        }
        let err = if state.cancelled || ctx.is_cancelled() || refused {
            // A refusal before the freeze is the caller's to report: CRIU's account would only echo it.
            EngineError::Interrupted
        } else if let Some(source) = state.error.take().or(stream_failure) {
            EngineError::Package { source }
        } else {
            if let Some(t) = temp_work {
                let kept = t.keep();
                crate::engine::leftovers::mark_kept(&kept);
                tracing::info!(log = %kept.display(), "the checkpoint failed in CRIU; its work folder was kept");
            }
            err
        };
        return Err(target.roll_back(err));
    }
    let (path, manifest, package_time) = match commit() {
        Ok(c) => c,
        Err(e) => {
            progress.finish();
            return Err(if survives { target.roll_back(e) } else { e });
        }
    };
    ctx.record("package", package_time);
    target.finish(req.leave_running)?;
    let size = match &req.destination {
        #[cfg(feature = "storage")]
        Destination::Url(_) => crate::engine::remote::size(engine, &path),
        _ => disk_size(&path),
    };
    Ok(DumpOutcome { path, manifest, size, criu_time, package_time, total_time: Duration::ZERO, detected: Vec::new(), streamed })
}

/// Whether the hidden checkpoint of `writer` is still where it will be committed, in the local folder `dir`
/// (nothing to check for other destinations).
fn still_in_place(writer: &CheckpointWriter, dir: Option<&Path>) -> Result<(), CheckpointError> {
    if dir.is_none() {
        return Ok(());
    }
    let temp = writer.temp_path();
    match temp.symlink_metadata() {
        Ok(_) => Ok(()),
        Err(source) => {
            tracing::error!(path = %temp.display(), "the checkpoint's folder was removed during the dump: giving the workload back");
            Err(CheckpointError::Io { path: temp.to_path_buf(), source })
        }
    }
}

/// Where CRIU's images go on their way into the checkpoint.
enum Intake {
    /// Files in the images folder (page images packed as they grow).
    Files(Packing),
    /// Pipes from CRIU; the writer once collected.
    Stream(StreamIntake, Option<Box<CheckpointWriter>>),
}

impl Intake {
    /// The writer, with every image CRIU has written so far in it (or, for files, packed live so far).
    fn writer(&mut self) -> Result<&mut CheckpointWriter, CheckpointError> {
        match self {
            Intake::Files(p) => p.writer(),
            Intake::Stream(s, slot) => {
                let w = match slot.take() {
                    Some(w) => w,
                    None => Box::new(s.collect()?),
                };
                Ok(&mut **slot.insert(w))
            }
        }
    }

    /// The writer, taken out (every image in it, as [`Intake::writer`]).
    fn take_writer(&mut self) -> Result<CheckpointWriter, CheckpointError> {
        self.writer()?;
        match self {
            Intake::Files(p) => std::mem::replace(p, Packing::Failed).into_writer(),
            Intake::Stream(_, slot) => {
                slot.take().map(|w| *w).ok_or(CheckpointError::LivePacking("the streamed checkpoint's writer was lost"))
            }
        }
    }

    /// Why the stream from CRIU failed, if it did (without waiting).
    fn failure(&self) -> Option<CheckpointError> {
        match self {
            Intake::Files(_) => None,
            Intake::Stream(s, _) => s.failure(),
        }
    }

    /// After CRIU exited: the writer.
    fn into_writer(self) -> Result<CheckpointWriter, CheckpointError> {
        match self {
            Intake::Files(p) => p.into_writer(),
            Intake::Stream(s, slot) => {
                let rest = s.finish()?;
                slot.map(|w| *w).or(rest).ok_or(CheckpointError::LivePacking("the streamed checkpoint's writer was lost"))
            }
        }
    }
}

/// The phases recorded so far, and `write`: from CRIU's start until the images were all written (for the
/// manifest, written last).
fn phases_so_far(ctx: &OpContext, write: Duration) -> Vec<PhaseTime> {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let mut phases: Vec<PhaseTime> =
        ctx.timings().into_iter().map(|t| PhaseTime { phase: t.phase.to_string(), ms: ms(t.time) }).collect();
    phases.push(PhaseTime { phase: "write".into(), ms: ms(write) });
    phases
}

/// The manifest of a new checkpoint (its file list is filled in by [`CheckpointWriter::commit`]).
fn new_manifest(
    engine: &Engine,
    prepared: &Prepared,
    compression: Compression,
    stats: Option<crate::criu::stats::DumpStats>,
    gpu: Option<crate::gpu::GpuRecord>,
) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        kind: prepared.kind,
        created_at: chrono::Utc::now(),
        hostname: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        cedana_version: env!("CARGO_PKG_VERSION").to_string(),
        criu_version: engine.criu_version().to_string(),
        compression,
        process: prepared.process.clone(),
        // External files as they are now that the workload is frozen (CRIU recorded their sizes then too).
        container: prepared.container.clone().map(|mut c| {
            c.external_files.iter_mut().for_each(crate::checkpoint::ExternalFile::refresh_size);
            c
        }),
        criu_options: prepared.options.recorded_for_restore(),
        stats,
        checksum: crate::checkpoint::digest::ALGORITHM.to_string(),
        files: Vec::new(),
        placement: Vec::new(),
        streamed: false,
        gpu,
        phases: Vec::new(),
    }
}

fn package(writer: &mut CheckpointWriter, images_dir: &Path, ctx: &OpContext) -> Result<(), CheckpointError> {
    // Page images packed while CRIU ran are not counted again.
    let packed: u64 = writer.files().iter().map(|f| f.size).sum();
    let total = dir_size(images_dir).saturating_sub(packed);
    let progress = ctx.progress();
    progress.phase("packaging", Some(total));
    writer.add_tree(images_dir, &|n| progress.advance(n))
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A folder checkpoint is hashed while CRIU writes it, on the core CRIU leaves idle.
fn follow_in_place(writer: &CheckpointWriter) -> Result<Option<TailHasher>, EngineError> {
    match writer.in_place_dir() {
        Some(dir) => Ok(Some(TailHasher::start(dir).map_err(EngineError::io("following the images as CRIU writes them"))?)),
        None => Ok(None),
    }
}

/// Whether staged images may be freed as they are packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// The workload is still alive (a failure gives it back): free each image once it is in the archive.
    WorkloadAlive,
    /// The workload may be gone: the images must survive a failure.
    Keep,
}

/// Package CRIU's images: finish the digests of a folder followed while CRIU wrote it, or write the
/// archive.
fn package_images(
    writer: &mut CheckpointWriter,
    images_dir: &Path,
    tail: &mut Option<TailHasher>,
    ctx: &OpContext,
    release: Release,
) -> Result<(), CheckpointError> {
    if release == Release::WorkloadAlive {
        writer.release_sources_while_reading();
    }
    match tail.take() {
        Some(t) => {
            let digests = t.finish(&[MANIFEST_NAME]).map_err(CheckpointError::io(images_dir))?;
            writer.add_in_place_digests(digests);
            Ok(())
        }
        None => package(writer, images_dir, ctx),
    }
}

/// Size of a checkpoint file or folder.
pub fn disk_size(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => dir_size(path),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Destination::dir(dir.path());
        assert_eq!(free_name(&dest, "d", Compression::Tar), "d");
        std::fs::write(dir.path().join("d.tar"), "").unwrap();
        std::fs::write(dir.path().join("d-2.tar"), "").unwrap();
        assert_eq!(free_name(&dest, "d", Compression::Tar), "d-3");
        assert_eq!(free_name(&dest, "d", Compression::None), "d", "a folder of that name does not exist");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("ok-name").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(".hidden").is_err());
        let n = default_name(CheckpointKind::Process, "42");
        assert!(n.starts_with("dump-process-42-"), "{n}");
    }
}
