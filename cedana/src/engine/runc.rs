//! Dump and restore of runc containers, through the real runc.
//!
//! Dump: the container is paused (unless it already was, or the dump leaves it running anyway),
//! `runc checkpoint --leave-running` writes CRIU's images into a staging folder (a folder checkpoint is
//! hashed as they land), and we package them with the bundle's config.json into our format. Only then is
//! the container deleted. Any failure resumes it, so a dump never loses or freezes a container without
//! saying so. A container restored from such a checkpoint comes back
//! running (measured with runc 1.1.5 on cgroup v1); [`restore`] resumes it should it come back paused.
//!
//! Restore: verify and extract the checkpoint, then `runc restore` it under a new id.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::live::Packing;
use crate::checkpoint::{CheckpointKind, ContainerInfo, Manifest, OpenedCheckpoint};
use crate::config::Config;
use crate::criu::options::CriuOptions;
use crate::criu::Criu;
use crate::engine::dump::{
    check_name, default_name, disk_size, follow_in_place, new_manifest, open_writer, package_images, DumpOutcome, DumpRequest,
    ImagesToPackage, Release,
};
use crate::engine::hooks::{self, HookContext, HookPoint, Hooks};
use crate::engine::EngineError;
use crate::progress::Progress;
use crate::runc::{RestoreFlags, Runc, RuncError};
use crate::{interrupt, procfs};

/// Name of the bundle's config.json inside our checkpoint.
pub const CONFIG_FILE: &str = "container/config.json";

/// A runc container to checkpoint.
#[derive(Debug, Clone)]
pub struct RuncTarget {
    pub id: String,
    /// The runc to drive, with its `--root` and other global flags.
    pub runc: Runc,
    /// CRIU's work folder (log, stats); a temporary one when `None`, kept if the dump fails.
    pub work_path: Option<PathBuf>,
    /// Further `runc checkpoint` flags, verbatim (e.g. `--manage-cgroups-mode full` from cedana-runc).
    pub extra_flags: Vec<OsString>,
}

/// A restore of a runc checkpoint as a new container.
#[derive(Debug, Clone)]
pub struct RuncRestoreRequest {
    pub path: PathBuf,
    pub id: String,
    pub runc: Runc,
    /// Bundle, pid file, console socket, detach, and extra `runc restore` flags. When the bundle has no
    /// config.json, the checkpoint's is written there.
    pub flags: RestoreFlags,
}

/// A finished runc restore.
#[derive(Debug, Clone)]
pub struct RuncRestoreOutcome {
    pub manifest: Manifest,
    /// runc's exit code: 0 for a detached restore; the container's own when attached.
    pub exit_code: i32,
    pub verify_time: Duration,
    pub restore_time: Duration,
}

/// Checkpoint the container `target` names into our format (called through [`crate::engine::dump::dump`]).
pub fn dump(cfg: &Config, req: &DumpRequest, target: &RuncTarget, progress: &dyn Progress) -> Result<DumpOutcome, EngineError> {
    let hooks = cfg.hooks();
    let mut ctx = None;
    let result = dump_container(cfg, req, target, progress, hooks.as_ref(), &mut ctx);
    if let Some(mut ctx) = ctx {
        ctx.succeeded = Some(result.is_ok());
        hooks::report(hooks.as_ref(), HookPoint::AfterDump, &ctx);
    }
    result
}

fn dump_container(
    cfg: &Config,
    req: &DumpRequest,
    target: &RuncTarget,
    progress: &dyn Progress,
    hooks: &dyn Hooks,
    hook_ctx: &mut Option<HookContext>,
) -> Result<DumpOutcome, EngineError> {
    let started = Instant::now();
    let runc = &target.runc;
    let id = target.id.as_str();
    let state = runc.state(id)?;
    if state.status != "running" && state.status != "paused" {
        return Err(RuncError::NotRunning { id: id.into(), status: state.status, what: "a checkpoint" }.into());
    }
    // Always leave it running (paused): we end it ourselves once the checkpoint is safely written.
    let mut flags = vec![OsString::from("--leave-running")];
    flags.extend(checkpoint_flags(&req.options)?);
    flags.extend(target.extra_flags.iter().cloned());
    let criu_version = Criu::locate(cfg.criu.binary_path.as_deref())?.supported_version()?;
    let process = procfs::describe(state.pid)?;
    let config_path = state.bundle.join("config.json");
    let config_bytes = std::fs::read(&config_path).map_err(EngineError::io(format!("reading {}", config_path.display())))?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| EngineError::Io { what: format!("parsing {}", config_path.display()), source: std::io::Error::other(e) })?;
    let name = req.name.clone().unwrap_or_else(|| default_name(CheckpointKind::Runc, id));
    check_name(&name)?;
    let (writer, _staging, images_dir) = open_writer(req, &name)?;
    let temp_work = match &target.work_path {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new().prefix("cedana-runc-dump-").tempdir().map_err(EngineError::io("creating a work folder"))?,
        ),
    };
    let work = target.work_path.clone().unwrap_or_else(|| temp_work.as_ref().map(|t| t.path().to_path_buf()).unwrap_or_default());
    std::fs::create_dir_all(&work).map_err(EngineError::io(format!("creating {}", work.display())))?;

    let ctx = HookContext {
        kind: CheckpointKind::Runc,
        pid: state.pid,
        container_id: Some(id.to_string()),
        checkpoint: writer.final_path().to_path_buf(),
        succeeded: None,
    };
    hooks.run(HookPoint::BeforeDump, &ctx)?;
    *hook_ctx = Some(ctx);
    let was_paused = state.status == "paused";
    // A pause keeps the container from running past the checkpoint when we end it afterwards. A
    // --leave-running dump lets it go on anyway, so it is not paused (two runc calls fewer).
    let we_paused = !was_paused && !req.leave_running;
    if we_paused {
        runc.pause(id)?;
    }
    tracing::info!(id, pid = state.pid, was_paused, images = %images_dir.display(), "checkpointing runc container");
    let criu_start = Instant::now();
    progress.phase("dumping", None);
    let mut tail = follow_in_place(&writer)?;
    // Page images go into an archive while CRIU writes them.
    let mut packing = Packing::start(writer, &images_dir, progress.advancer());
    let checkpointed = runc.checkpoint(id, &images_dir, &work, &flags).map_err(EngineError::from);
    let criu_time = criu_start.elapsed();
    let package_start = Instant::now();
    let packaged = checkpointed.and_then(|()| {
        if interrupt::requested() {
            return Err(EngineError::Interrupted);
        }
        // The container is paused or left running until the checkpoint is committed.
        let writer = packing.writer().map_err(|source| EngineError::Package { source })?;
        package_images(writer, &images_dir, &mut tail, progress, Release::ProcessAlive)
            .map_err(|source| EngineError::Package { source })?;
        writer.add_bytes(CONFIG_FILE, &config_bytes).map_err(|source| EngineError::Package { source })?;
        Ok(())
    });
    progress.finish();
    if let Err(cause) = packaged {
        if matches!(cause, EngineError::Runc(_)) {
            if let Some(t) = temp_work {
                let kept = t.keep();
                tracing::error!(log = %kept.display(), "runc checkpoint failed; its work folder was kept");
            }
        }
        return Err(resume_after(runc, id, we_paused, cause));
    }
    let package_time = package_start.elapsed();
    let stats =
        crate::criu::stats::read_dump_stats(&work).map_err(|e| tracing::warn!(error = %e, "no CRIU dump statistics")).ok();
    let container = ContainerInfo {
        id: id.to_string(),
        bundle: Some(state.bundle.clone()),
        root: Some(runc.root().to_path_buf()),
        config: Some(config),
    };
    let images = ImagesToPackage { kind: CheckpointKind::Runc, process, container: Some(container), criu_version };
    let mut manifest = new_manifest(images, req.compression, &req.options, stats);
    let committed = packing.into_writer().and_then(|writer| writer.commit(&mut manifest));
    let path = match committed {
        Ok(p) => p,
        Err(source) => return Err(resume_after(runc, id, we_paused, EngineError::Package { source })),
    };
    if !req.leave_running {
        // The checkpoint is complete: end the container as `runc checkpoint` would (it destroys it).
        runc.delete(id, true)?;
    }
    let size = disk_size(&path);
    Ok(DumpOutcome { path, manifest, size, criu_time, package_time, total_time: started.elapsed(), detected: Vec::new() })
}

/// After a failed dump: resume the container if we paused it; say so if that fails too.
fn resume_after(runc: &Runc, id: &str, we_paused: bool, cause: EngineError) -> EngineError {
    if !we_paused {
        return cause;
    }
    match runc.resume(id) {
        Ok(()) => {
            tracing::warn!(id, "dump failed; the container was resumed");
            cause
        }
        Err(resume) => EngineError::LeftPaused {
            id: id.into(),
            root: runc.root().to_path_buf(),
            cause: Box::new(cause),
            resume: Box::new(resume),
        },
    }
}

/// `runc checkpoint` flags for the CRIU options of a dump (runc 1.1 has no flag for the others).
fn checkpoint_flags(o: &CriuOptions) -> Result<Vec<OsString>, RuncError> {
    let unsupported = [
        (!o.external.is_empty(), "--external"),
        (o.skip_in_flight, "--skip-in-flight"),
        (o.link_remap, "--link-remap"),
        (!o.extra.is_empty(), "--criu-opts"),
    ];
    if let Some((_, option)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(RuncError::Unsupported { option: option.to_string() });
    }
    Ok(runc_flags(o))
}

/// The runc flags (shared by checkpoint and restore) for CRIU options.
fn runc_flags(o: &CriuOptions) -> Vec<OsString> {
    [
        (o.tcp_established, "--tcp-established"),
        (o.ext_unix_sk, "--ext-unix-sk"),
        (o.shell_job, "--shell-job"),
        (o.file_locks, "--file-locks"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, f)| OsString::from(f))
    .collect()
}

/// Verify the checkpoint, then restore it with `runc restore` as container `req.id`.
pub fn restore(cfg: &Config, req: &RuncRestoreRequest, progress: &dyn Progress) -> Result<RuncRestoreOutcome, EngineError> {
    let started = Instant::now();
    if req.runc.exists(&req.id)? {
        return Err(RuncError::Exists { id: req.id.clone(), root: req.runc.root().to_path_buf() }.into());
    }
    if !req.flags.bundle.is_dir() {
        return Err(RuncError::NoBundle { bundle: req.flags.bundle.clone() }.into());
    }
    progress.phase("verifying", Some(disk_size(&req.path)));
    let opened = OpenedCheckpoint::open(&req.path, &cfg.scratch_dir(), &|n| progress.advance(n));
    progress.finish();
    let opened = opened?;
    if opened.manifest.kind != CheckpointKind::Runc {
        return Err(EngineError::WrongKind { path: req.path.clone(), found: opened.manifest.kind });
    }
    let verify_time = started.elapsed();
    write_config_if_missing(&req.flags.bundle, &opened.images_dir)?;
    let mut flags = req.flags.clone();
    let mut recorded = runc_flags(&opened.manifest.criu_options);
    recorded.retain(|f| !flags.extra.contains(f));
    flags.extra.extend(recorded);
    let temp_work =
        tempfile::Builder::new().prefix("cedana-runc-restore-").tempdir().map_err(EngineError::io("creating a work folder"))?;
    if flags.work_path.is_none() {
        flags.work_path = Some(temp_work.path().to_path_buf());
    }
    let restore_start = Instant::now();
    tracing::info!(id = %req.id, images = %opened.images_dir.display(), bundle = %flags.bundle.display(), "restoring runc container");
    let hooks = cfg.hooks();
    let mut ctx = HookContext {
        kind: CheckpointKind::Runc,
        pid: 0,
        container_id: Some(req.id.clone()),
        checkpoint: req.path.clone(),
        succeeded: None,
    };
    hooks.run(HookPoint::BeforeRestore, &ctx)?;
    let restored = req.runc.restore(&req.id, &opened.images_dir, &flags);
    if hooks.active() {
        ctx.pid = req.runc.state(&req.id).map(|s| s.pid).unwrap_or(0);
    }
    ctx.succeeded = Some(restored.is_ok());
    hooks::report(hooks.as_ref(), HookPoint::AfterRestore, &ctx);
    let exit_code = match restored {
        Ok(code) => code,
        Err(e) => {
            let kept = temp_work.keep();
            tracing::error!(work = %kept.display(), "runc restore failed; its work folder was kept");
            return Err(e.into());
        }
    };
    let restore_time = restore_start.elapsed();
    if flags.detach {
        if let Ok(state) = req.runc.state(&req.id) {
            if state.status == "paused" {
                tracing::info!(id = %req.id, "the container came back paused: resuming it");
                req.runc.resume(&req.id)?;
            }
        }
    }
    Ok(RuncRestoreOutcome { manifest: opened.manifest.clone(), exit_code, verify_time, restore_time })
}

/// A bundle without config.json gets the one saved in the checkpoint.
fn write_config_if_missing(bundle: &Path, images_dir: &Path) -> Result<(), EngineError> {
    let dest = bundle.join("config.json");
    if dest.exists() {
        return Ok(());
    }
    let src = images_dir.join(CONFIG_FILE);
    tracing::info!(bundle = %bundle.display(), "the bundle has no config.json: using the checkpoint's");
    std::fs::copy(&src, &dest).map(drop).map_err(EngineError::io(format!("copying {} to {}", src.display(), dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_options_map_to_runc_flags_or_are_refused() {
        let o = CriuOptions { tcp_established: true, file_locks: true, ..Default::default() };
        assert_eq!(checkpoint_flags(&o).unwrap(), ["--tcp-established", "--file-locks"]);
        let o = CriuOptions { external: vec!["mnt[/a]:a".into()], ..Default::default() };
        let err = checkpoint_flags(&o).unwrap_err().to_string();
        assert!(err.contains("--external"), "{err}");
    }
}
