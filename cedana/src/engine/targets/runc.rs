//! A runc container, checkpointed through the runtime (`runc checkpoint`), which runs CRIU itself.
//!
//! Dump: the container is paused (unless it already was, or the dump leaves it running anyway), the runtime
//! writes CRIU's images with `--leave-running`, and the pipeline packages them with the bundle's config.json.
//! Only once the checkpoint is complete is the container deleted; any failure resumes it, so a dump never
//! loses or freezes a container without saying so. Should the dump's process be killed while the container
//! is paused, a guard started before the pause resumes it once that runc and its CRIU are done too (see
//! [`super::pause_guard`]). A container restored from such a checkpoint comes back
//! running (measured with runc 1.1.5 on cgroup v1); a detached restore resumes it should it come back paused.
//!
//! Files the container's processes hold outside its mounts (its stdout redirected to a host file) are
//! external to CRIU (see [`crate::checkpoint::external`]): runc 1.1 has no flag for that, so they reach the
//! CRIU that runc runs through a CRIU configuration file (`external file[..]` at dump, `inherit-fd` at
//! restore, with the files handed down open).
//!
//! Bind mounts of host files that are not in the container's spec (made by a runtime hook such as NVIDIA's
//! legacy `nvidia-container-runtime-hook`) are external to CRIU too (see [`crate::checkpoint::mounts`]):
//! `external mnt[..]` lines at dump, and at restore the same lines binding each host file again. runc runs
//! the spec's prestart and createRuntime hooks again at restore, at CRIU's `setup-namespaces` notification,
//! before CRIU rebuilds the container's mounts: what such a hook mounts then is not what the restored
//! container sees (CRIU's mounts are).
//!
//! Restore: the verified images go to `runc restore` under a new id.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::pause_guard::{PauseGuard, LIFELINE_FD};
use super::{CheckpointCall, DumpTarget, Prepared, RestoreTarget, Restored};
use crate::checkpoint::external::{self, ExternalFile};
use crate::checkpoint::mounts::{self, ExternalMount};
use crate::checkpoint::{CheckpointKind, ContainerInfo, OpenedCheckpoint};
use crate::criu::options::CriuOptions;
use crate::engine::context::OpContext;
use crate::engine::lazy::LazyRestore;
use crate::engine::restore::{Gate, RestoreRequest};
use crate::engine::{Engine, EngineError};
use crate::procfs;
use crate::runc::{ContainerRuntime, CriuExtras, RestoreFlags, RuncError};

/// Name of the bundle's config.json inside our checkpoint.
pub const CONFIG_FILE: &str = "container/config.json";

/// The lowest descriptor number at which runc (and the CRIU it runs) gets the external files of a restore:
/// far above what runc opens itself (CRIU's own descriptors are 3 and up).
const EXTERNAL_FD_BASE: i32 = 100;

/// A runc container to checkpoint.
#[derive(Debug, Clone)]
pub struct RuncSpec {
    pub id: String,
    /// The runtime to drive (with its `--root` and other global flags); the engine's runc under `root`
    /// when `None`.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    /// The runtime's state folder, when `runtime` is `None` (runc's default when `None` too).
    pub root: Option<PathBuf>,
    /// CRIU's work folder (log, stats); a temporary one when `None`, kept if the dump fails.
    pub work_path: Option<PathBuf>,
    /// Further `runc checkpoint` flags, verbatim (e.g. `--manage-cgroups-mode full` from cedana-runc).
    pub extra_flags: Vec<OsString>,
}

/// What a restore of a container needs besides the checkpoint.
#[derive(Debug, Clone)]
pub struct ContainerRestore {
    /// The new container's id.
    pub id: String,
    /// As in [`RuncSpec`].
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    pub root: Option<PathBuf>,
    /// Bundle, pid file, console socket, detach, and extra `runc restore` flags. When the bundle has no
    /// config.json, the checkpoint's is written there.
    pub flags: RestoreFlags,
}

fn runtime_for(
    engine: &Engine,
    given: &Option<Arc<dyn ContainerRuntime>>,
    root: &Option<PathBuf>,
) -> Result<Arc<dyn ContainerRuntime>, EngineError> {
    match given {
        Some(rt) => Ok(Arc::clone(rt)),
        None => engine.runtime(root.as_deref()),
    }
}

/// Dump target: one container.
pub(crate) struct RuncTarget {
    spec: RuncSpec,
    runtime: Option<Arc<dyn ContainerRuntime>>,
    was_paused: bool,
    we_paused: bool,
    /// Resumes the container should this process be killed while it is paused by us.
    guard: Option<PauseGuard>,
    /// Files outside the container's mounts, marked external for CRIU.
    external: Vec<ExternalFile>,
    /// Bind mounts of host files the spec does not have (a runtime hook's), marked external for CRIU.
    mounts: Vec<ExternalMount>,
}

impl RuncTarget {
    pub fn new(spec: RuncSpec) -> Self {
        Self { spec, runtime: None, was_paused: false, we_paused: false, guard: None, external: Vec::new(), mounts: Vec::new() }
    }

    /// The dump no longer pauses the container (it resumed or deleted it): its guard exits without acting.
    fn disarm_guard(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.disarm();
        }
    }

    fn rt(&self) -> Result<&Arc<dyn ContainerRuntime>, EngineError> {
        self.runtime.as_ref().ok_or_else(|| EngineError::Io {
            what: "checkpointing a container".into(),
            source: std::io::Error::other("the target was not prepared"),
        })
    }
}

impl DumpTarget for RuncTarget {
    fn prepare(&mut self, engine: &Engine, options: &CriuOptions) -> Result<Prepared, EngineError> {
        let runtime = runtime_for(engine, &self.spec.runtime, &self.spec.root)?;
        let id = self.spec.id.as_str();
        let state = runtime.state(id)?;
        if state.status != "running" && state.status != "paused" {
            return Err(RuncError::NotRunning { id: id.into(), status: state.status, what: "a checkpoint" }.into());
        }
        checkpoint_flags(options)?;
        self.was_paused = state.status == "paused";
        let process = procfs::describe(state.pid)?;
        self.external = external::find(state.pid, &process.pids)?;
        for f in &self.external {
            tracing::info!(id, key = %f.key, path = %f.path.display(), fds = ?f.fds, "a file outside the container's mounts: external");
        }
        let config_path = state.bundle.join("config.json");
        let config_bytes = std::fs::read(&config_path).map_err(EngineError::io(format!("reading {}", config_path.display())))?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes).map_err(|e| EngineError::Io {
            what: format!("parsing {}", config_path.display()),
            source: std::io::Error::other(e),
        })?;
        self.mounts = mounts::find(state.pid, &config)?;
        for m in &self.mounts {
            tracing::info!(id, mountpoint = %m.mountpoint, host = %m.host_path.display(), "a bind mount not in the spec: external");
        }
        let container = ContainerInfo {
            id: id.to_string(),
            bundle: Some(state.bundle.clone()),
            root: Some(runtime.root().to_path_buf()),
            config: Some(config),
            external_files: self.external.clone(),
            external_mounts: self.mounts.clone(),
        };
        self.runtime = Some(runtime);
        Ok(Prepared {
            kind: CheckpointKind::Runc,
            id: id.to_string(),
            container_id: Some(id.to_string()),
            process,
            container: Some(container),
            options: options.clone(),
            detected: Vec::new(),
            extra_files: vec![(CONFIG_FILE.to_string(), config_bytes)],
            work_path: self.spec.work_path.clone(),
        })
    }

    fn survives_criu(&self, _leave_running: bool) -> bool {
        // Always checkpointed with --leave-running: we end it ourselves once the checkpoint is written.
        true
    }

    fn checkpoint(
        &mut self,
        _engine: &Engine,
        call: &CheckpointCall<'_>,
        ready: &mut dyn FnMut() -> bool,
        frozen: &mut dyn FnMut() -> bool,
    ) -> Result<(), EngineError> {
        let runtime = Arc::clone(self.rt()?);
        // The runtime runs CRIU itself: the last moment before anything is frozen is before the pause.
        if !ready() {
            // The pipeline knows why it refused; this only stops the dump.
            return Err(EngineError::Interrupted);
        }
        let id = self.spec.id.clone();
        let mut flags = vec![OsString::from("--leave-running")];
        flags.extend(checkpoint_flags(call.options)?);
        flags.extend(self.spec.extra_flags.iter().cloned());
        // A pause keeps the container from running past the checkpoint when we end it afterwards. A dump
        // that leaves it running lets it go on anyway, so it is not paused (two runtime calls fewer).
        if !self.was_paused && !call.leave_running {
            match runtime.resume_command(&id).map(|resume| PauseGuard::start(&resume)) {
                Some(Ok(guard)) => self.guard = Some(guard),
                Some(Err(e)) => {
                    return Err(EngineError::Io { what: "starting the guard that resumes a paused container".into(), source: e })
                }
                None => tracing::debug!(id, "the runtime gives no resume command: no guard for the pause"),
            }
            runtime.pause(&id)?;
            self.we_paused = true;
        }
        tracing::info!(id, was_paused = self.was_paused, images = %call.images_dir.display(), "checkpointing runc container");
        let mut fds = Vec::new();
        if let Some(guard) = &self.guard {
            let lifeline = guard.lifeline().map_err(EngineError::io("handing the pause guard's lifeline to runc"))?;
            fds.push((LIFELINE_FD, lifeline));
        }
        let mut options: Vec<String> = self.external.iter().map(|f| format!("external {}", f.key)).collect();
        options.extend(mounts::dump_options(&self.mounts));
        let extras = CriuExtras { options, fds };
        runtime.checkpoint(&id, call.images_dir, call.work_dir, &flags, &extras)?;
        if frozen() {
            Ok(())
        } else {
            // The pipeline knows why it refused; this only stops the dump.
            Err(EngineError::Interrupted)
        }
    }

    fn finish(&mut self, leave_running: bool) -> Result<(), EngineError> {
        if !leave_running {
            // The checkpoint is complete: end the container as `runc checkpoint` would (it destroys it).
            let deleted = self.rt()?.delete(&self.spec.id, true);
            // Also when the delete failed: the checkpoint is complete, and a container resumed after it would
            // run on past it; it stays paused, and the error says so.
            self.disarm_guard();
            deleted?;
        }
        Ok(())
    }

    fn roll_back(&mut self, cause: EngineError) -> EngineError {
        let (Some(runtime), true) = (self.runtime.as_ref(), self.we_paused) else { return cause };
        let id = self.spec.id.as_str();
        match runtime.resume(id) {
            Ok(()) => {
                self.we_paused = false;
                if let Some(guard) = self.guard.take() {
                    guard.disarm();
                }
                tracing::warn!(id, "dump failed; the container was resumed");
                cause
            }
            Err(resume) => EngineError::LeftPaused {
                id: id.into(),
                root: runtime.root().to_path_buf(),
                cause: Box::new(cause),
                resume: Box::new(resume),
            },
        }
    }
}

/// `runc checkpoint` flags for the CRIU options of a dump (runc 1.1 has no flag for the others).
fn checkpoint_flags(o: &CriuOptions) -> Result<Vec<OsString>, RuncError> {
    let unsupported = [
        (!o.external.is_empty(), "--external"),
        (o.skip_in_flight, "--skip-in-flight"),
        (o.link_remap, "--link-remap"),
        (o.tcp_close, "--tcp-close"),
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

/// Restore target for runc checkpoints.
pub(crate) struct RuncRestore;

fn container_of(req: &RestoreRequest) -> Result<&ContainerRestore, EngineError> {
    req.container.as_ref().ok_or(EngineError::MissingTarget { kind: CheckpointKind::Runc, what: "a container id and a bundle" })
}

impl RestoreTarget for RuncRestore {
    fn precheck(&self, engine: &Engine, req: &RestoreRequest) -> Result<(), EngineError> {
        let c = container_of(req)?;
        let runtime = runtime_for(engine, &c.runtime, &c.root)?;
        if runtime.exists(&c.id)? {
            return Err(RuncError::Exists { id: c.id.clone(), root: runtime.root().to_path_buf() }.into());
        }
        if !c.flags.bundle.is_dir() {
            return Err(RuncError::NoBundle { bundle: c.flags.bundle.clone() }.into());
        }
        Ok(())
    }

    fn restore(
        &self,
        engine: &Engine,
        _ctx: &OpContext,
        req: &RestoreRequest,
        opened: &OpenedCheckpoint,
        gate: &mut Gate<'_>,
    ) -> Result<Restored, EngineError> {
        let c = container_of(req)?;
        let runtime = runtime_for(engine, &c.runtime, &c.root)?;
        // Refused before anything runs when this host lacks a file a hook had mounted into the container.
        let recorded = opened.manifest.container.as_ref().map(|c| c.external_mounts.as_slice()).unwrap_or_default();
        let mount_options = mounts::restore_options(recorded)?;
        // runc runs CRIU itself and answers no hooks of ours: the gate is passed before it starts.
        if !gate.pass() {
            return Err(EngineError::RestoreCancelled);
        }
        write_config_if_missing(&c.flags.bundle, &opened.images_dir)?;
        let mut flags = c.flags.clone();
        let mut recorded = runc_flags(&opened.manifest.criu_options.merged_with(&req.options));
        recorded.retain(|f| !flags.extra.contains(f));
        flags.extra.extend(recorded);
        let temp_work = tempfile::Builder::new()
            .prefix(&crate::engine::leftovers::prefix("cedana-runc-restore-"))
            .tempdir()
            .map_err(EngineError::io("creating a work folder"))?;
        if flags.work_path.is_none() {
            flags.work_path = Some(temp_work.path().to_path_buf());
        }
        let started = Instant::now();
        tracing::info!(id = %c.id, images = %opened.images_dir.display(), bundle = %flags.bundle.display(), "restoring runc container");
        let mut extras = external_files(opened, req)?;
        extras.options.extend(mount_options);
        // A lazy restore: our lazy-pages handler listens in the work folder runc gives the CRIU it runs.
        let lazy = match (&opened.lazy, &flags.work_path) {
            (Some(pages), Some(work)) => {
                flags.extra.push("--lazy-pages".into());
                Some(LazyRestore::start(&opened.images_dir, work, pages, &opened.path, false, None)?)
            }
            _ => None,
        };
        let exit_code = match runtime.restore(&c.id, &opened.images_dir, &flags, extras) {
            Ok(code) => code,
            Err(e) => {
                let cause = lazy.and_then(LazyRestore::abort);
                let kept = temp_work.keep();
                crate::engine::leftovers::mark_kept(&kept);
                tracing::error!(work = %kept.display(), "runc restore failed; its work folder was kept");
                return Err(cause.unwrap_or_else(|| e.into()));
            }
        };
        let criu_time = started.elapsed();
        let mut pid = 0;
        if flags.detach {
            if let Ok(state) = runtime.state(&c.id) {
                pid = state.pid;
                if state.status == "paused" {
                    tracing::info!(id = %c.id, "the container came back paused: resuming it");
                    runtime.resume(&c.id)?;
                }
            }
        }
        // Should the memory not arrive, the container's init goes, and with it its PID namespace.
        let init = [pid];
        let pids = if pid > 0 { &init[..] } else { &[] };
        let lazy = match lazy.map(|daemon| daemon.finish(pids)).transpose() {
            Ok(lazy) => lazy,
            Err(e) => {
                let kept = temp_work.keep();
                crate::engine::leftovers::mark_kept(&kept);
                tracing::error!(work = %kept.display(), "the lazy restore failed; the work folder was kept");
                return Err(e);
            }
        };
        Ok(Restored { pid, exit_code: Some(exit_code), criu_time, lazy })
    }
}

/// The checkpoint's external files, opened (at their paths, or where the request sends them) and handed to
/// CRIU under their keys at descriptors [`EXTERNAL_FD_BASE`] and up (above every descriptor opened here, so
/// that placing one never closes another).
fn external_files(opened: &OpenedCheckpoint, req: &RestoreRequest) -> Result<CriuExtras, EngineError> {
    use std::os::fd::AsRawFd;
    let recorded = opened.manifest.container.as_ref().map(|c| c.external_files.as_slice()).unwrap_or_default();
    let reopened = external::open_for_restore(recorded, &req.external_files)?;
    let base = reopened.iter().map(|r| r.handle.as_raw_fd() + 1).fold(EXTERNAL_FD_BASE, i32::max);
    let mut extras = CriuExtras::default();
    for (n, r) in (base..).zip(reopened) {
        tracing::info!(key = %r.file.key, path = %r.path.display(), fds = ?r.file.fds, "reconnecting an external file");
        extras.options.push(format!("inherit-fd fd[{n}]:{}", r.file.key));
        extras.fds.push((n, r.handle.into()));
    }
    Ok(extras)
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
