//! Dump: CRIU writes images, we package them while CRIU holds the tree frozen, and only a complete
//! checkpoint lets CRIU kill the tree. Any failure or interruption fails CRIU's post-dump hook, so the tree
//! resumes running and nothing is left under the checkpoint's name.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::live::Packing;
use crate::checkpoint::tail::TailHasher;
use crate::checkpoint::{CheckpointKind, CheckpointWriter, ContainerInfo, Manifest, ProcessInfo, FORMAT_VERSION, MANIFEST_NAME};
use crate::codec::Compression;
use crate::config::Config;
use crate::criu::options::CriuOptions;
use crate::criu::{self, Criu, DumpCall};
use crate::engine::hooks::{self, HookContext, HookPoint};
use crate::engine::EngineError;
use crate::progress::Progress;
use crate::{interrupt, procfs};

/// What to checkpoint.
#[derive(Debug, Clone)]
pub enum DumpTarget {
    /// A process tree by the PID of its root.
    Process { pid: i32 },
    /// A runc container (checkpointed through the real runc, see [`crate::engine::runc`]).
    Runc(crate::engine::runc::RuncTarget),
}

/// A dump, as data.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    pub target: DumpTarget,
    /// Parent folder of the checkpoint.
    pub dir: PathBuf,
    /// Checkpoint name (without extension); derived from the target and time if absent.
    pub name: Option<String>,
    pub compression: Compression,
    pub leave_running: bool,
    pub options: CriuOptions,
}

/// A finished dump.
#[derive(Debug, Clone)]
pub struct DumpOutcome {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// Size of the checkpoint on disk.
    pub size: u64,
    pub criu_time: Duration,
    pub package_time: Duration,
    pub total_time: Duration,
    /// Options we turned on ourselves after inspecting the process.
    pub detected: Vec<&'static str>,
}

/// Default checkpoint name: `dump-<kind>-<id>-<unix time>`.
pub fn default_name(kind: CheckpointKind, id: &str) -> String {
    format!("dump-{kind}-{id}-{}", chrono::Utc::now().timestamp())
}

pub(crate) fn check_name(name: &str) -> Result<(), EngineError> {
    let bad = |reason| Err(EngineError::BadName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("it must not contain '/' (use --dir for the folder)");
    }
    if name.starts_with('.') {
        return bad("it must not start with '.'");
    }
    Ok(())
}

/// Checkpoint what `req` names.
pub fn dump(cfg: &Config, req: &DumpRequest, progress: &dyn Progress) -> Result<DumpOutcome, EngineError> {
    match req.target {
        DumpTarget::Process { pid } => dump_process(cfg, req, pid, progress),
        DumpTarget::Runc(ref target) => crate::engine::runc::dump(cfg, req, target, progress),
    }
}

fn dump_process(cfg: &Config, req: &DumpRequest, pid: i32, progress: &dyn Progress) -> Result<DumpOutcome, EngineError> {
    let started = Instant::now();
    let root = procfs::check_dumpable(pid)?;
    let info = procfs::describe(pid)?;
    let mut options = req.options.clone();
    let mut detected = Vec::new();
    if !options.shell_job && procfs::needs_shell_job(&root, &info.pids) {
        tracing::info!(pid, sid = root.sid, pgid = root.pgid, "session or group leader outside the tree: using --shell-job");
        options.shell_job = true;
        detected.push("--shell-job");
    }
    if !options.tcp_established {
        let conns = procfs::established_tcp(&info.pids);
        if !conns.is_empty() {
            return Err(EngineError::NeedsTcpEstablished { pid, conns: conns.join(", ") });
        }
    }
    let criu = Criu::locate(cfg.criu.binary_path.as_deref())?;
    let criu_version = criu.supported_version()?;
    let name = req.name.clone().unwrap_or_else(|| default_name(CheckpointKind::Process, &pid.to_string()));
    check_name(&name)?;
    let images = ImagesToPackage { kind: CheckpointKind::Process, process: info, container: None, criu_version };
    let hooks = cfg.hooks();
    let mut ctx = HookContext {
        kind: CheckpointKind::Process,
        pid,
        container_id: None,
        checkpoint: CheckpointWriter::path_for(&req.dir, &name, req.compression),
        succeeded: None,
    };
    hooks.run(HookPoint::BeforeDump, &ctx)?;
    let result = run_dump(&criu, req, &name, &options, images, progress);
    ctx.succeeded = Some(result.is_ok());
    hooks::report(hooks.as_ref(), HookPoint::AfterDump, &ctx);
    let mut outcome = result?;
    outcome.detected = detected;
    outcome.total_time = started.elapsed();
    Ok(outcome)
}

/// What a dump records besides the images.
pub(crate) struct ImagesToPackage {
    pub kind: CheckpointKind,
    pub process: ProcessInfo,
    pub container: Option<ContainerInfo>,
    pub criu_version: String,
}

/// A checkpoint writer for `req`, and the folder CRIU should write its images into: the checkpoint folder
/// itself for `none`, else a hidden staging folder beside the checkpoint (deleted when dropped).
pub(crate) fn open_writer(
    req: &DumpRequest,
    name: &str,
) -> Result<(CheckpointWriter, Option<tempfile::TempDir>, PathBuf), EngineError> {
    let writer = CheckpointWriter::create(CheckpointWriter::path_for(&req.dir, name, req.compression), req.compression)?;
    if let Some(dir) = writer.in_place_dir() {
        let dir = dir.to_path_buf();
        return Ok((writer, None, dir));
    }
    let staging = tempfile::Builder::new()
        .prefix(".cedana-images-")
        .tempdir_in(&req.dir)
        .map_err(EngineError::io(format!("creating a staging folder in {}", req.dir.display())))?;
    let dir = staging.path().to_path_buf();
    Ok((writer, Some(staging), dir))
}

/// Create the writer, run CRIU with the packaging hook, write the manifest.
fn run_dump(
    criu: &Criu,
    req: &DumpRequest,
    name: &str,
    options: &CriuOptions,
    images: ImagesToPackage,
    progress: &dyn Progress,
) -> Result<DumpOutcome, EngineError> {
    let (writer, _staging, images_dir) = open_writer(req, name)?;
    let work = tempfile::Builder::new().prefix("cedana-dump-").tempdir().map_err(EngineError::io("creating a work folder"))?;
    let mut tail = follow_in_place(&writer)?;
    // Page images go into an archive while CRIU writes them.
    let mut packing = Packing::start(writer, &images_dir, progress.advancer());
    let criu_start = Instant::now();
    let mut package_time = Duration::ZERO;
    let mut packaged = false;
    let mut package_err = None;
    let mut interrupted = false;
    let call = DumpCall {
        pid: images.process.pid,
        images_dir: &images_dir,
        work_dir: work.path(),
        options,
        leave_running: req.leave_running,
    };
    progress.phase("dumping", None);
    let result = {
        let mut hook = |action: &str| -> bool {
            if action != "post-dump" {
                return true;
            }
            if interrupt::requested() {
                interrupted = true;
                return false;
            }
            if req.leave_running {
                return true;
            }
            let t = Instant::now();
            let res = packing
                .writer()
                .and_then(|writer| package_images(writer, &images_dir, &mut tail, progress, Release::ProcessAlive));
            package_time = t.elapsed();
            match res {
                Ok(()) => {
                    packaged = true;
                    true
                }
                Err(e) => {
                    interrupted = interrupt::requested();
                    package_err = Some(e);
                    false
                }
            }
        };
        criu.dump(&call, &mut hook)
    };
    let criu_time = criu_start.elapsed().saturating_sub(package_time);
    if let Err(err) = result {
        progress.finish();
        if interrupted {
            return Err(EngineError::Interrupted);
        }
        if let Some(source) = package_err {
            return Err(EngineError::Package { source });
        }
        let kept = work.keep();
        tracing::info!(log = %kept.display(), "criu dump failed; its log was kept");
        return Err(err.into());
    }
    // A packaging failure, unless a signal is what stopped it.
    let package_failure =
        |source| if interrupt::requested() { EngineError::Interrupted } else { EngineError::Package { source } };
    let mut writer = packing.into_writer().map_err(package_failure)?;
    if !req.leave_running {
        // CRIU has let the tree die: from here on, a failure must not throw its images away.
        writer.keep_if_unfinished();
    }
    if !packaged {
        let t = Instant::now();
        let release = if req.leave_running { Release::ProcessAlive } else { Release::Keep };
        package_images(&mut writer, &images_dir, &mut tail, progress, release).map_err(package_failure)?;
        package_time = t.elapsed();
    }
    progress.finish();
    let stats = match criu::stats::read_dump_stats(work.path()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no CRIU dump statistics");
            None
        }
    };
    let pid = images.process.pid;
    let mut manifest = new_manifest(images, req.compression, options, stats);
    let kept = writer.temp_path().to_path_buf();
    let path = writer.commit(&mut manifest).map_err(|source| {
        if req.leave_running {
            EngineError::from(source)
        } else {
            EngineError::Unfinished { pid, kept, source }
        }
    })?;
    let size = disk_size(&path);
    Ok(DumpOutcome { path, manifest, size, criu_time, package_time, total_time: Duration::ZERO, detected: Vec::new() })
}

/// The manifest of a new checkpoint (its file list is filled in by [`CheckpointWriter::commit`]).
pub(crate) fn new_manifest(
    images: ImagesToPackage,
    compression: Compression,
    options: &CriuOptions,
    stats: Option<criu::stats::DumpStats>,
) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        kind: images.kind,
        created_at: chrono::Utc::now(),
        hostname: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        cedana_version: env!("CARGO_PKG_VERSION").to_string(),
        criu_version: images.criu_version,
        compression,
        process: images.process,
        container: images.container,
        criu_options: options.recorded_for_restore(),
        stats,
        checksum: crate::checkpoint::digest::ALGORITHM.to_string(),
        files: Vec::new(),
    }
}

fn package(
    writer: &mut CheckpointWriter,
    images_dir: &Path,
    progress: &dyn Progress,
) -> Result<(), crate::checkpoint::CheckpointError> {
    // Page images packed while CRIU ran are not counted again.
    let packed: u64 = writer.files().iter().map(|f| f.size).sum();
    let total = dir_size(images_dir).saturating_sub(packed);
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
pub(crate) fn follow_in_place(writer: &CheckpointWriter) -> Result<Option<TailHasher>, EngineError> {
    match writer.in_place_dir() {
        Some(dir) => Ok(Some(TailHasher::start(dir).map_err(EngineError::io("following the images as CRIU writes them"))?)),
        None => Ok(None),
    }
}

/// Whether staged images may be freed as they are packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The dumped process is still alive (a failure resumes it): free each image once it is in the archive.
    ProcessAlive,
    /// The process may be gone: the images must survive a failure.
    Keep,
}

/// Package CRIU's images: finish the digests of a folder followed while CRIU wrote it, or write the
/// archive.
pub(crate) fn package_images(
    writer: &mut CheckpointWriter,
    images_dir: &Path,
    tail: &mut Option<TailHasher>,
    progress: &dyn Progress,
    release: Release,
) -> Result<(), crate::checkpoint::CheckpointError> {
    if release == Release::ProcessAlive {
        writer.release_sources_while_reading();
    }
    match tail.take() {
        Some(t) => {
            let digests = t.finish(&[MANIFEST_NAME]).map_err(crate::checkpoint::CheckpointError::io(images_dir))?;
            writer.add_in_place_digests(digests);
            Ok(())
        }
        None => package(writer, images_dir, progress),
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
    fn names_are_checked() {
        assert!(check_name("ok-name").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(".hidden").is_err());
        let n = default_name(CheckpointKind::Process, "42");
        assert!(n.starts_with("dump-process-42-"), "{n}");
    }
}
