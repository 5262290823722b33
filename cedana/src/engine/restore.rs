//! Restore: verify the whole checkpoint first, make sure its PIDs are free, then let CRIU restore it with the
//! options the dump recorded.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::checkpoint::{CheckpointKind, Manifest, OpenedCheckpoint};
use crate::config::Config;
use crate::criu::options::CriuOptions;
use crate::criu::{Criu, RestoreCall};
use crate::engine::hooks::{self, HookContext, HookPoint};
use crate::engine::EngineError;
use crate::procfs;
use crate::progress::Progress;

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
}

/// A restore, as data.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub path: PathBuf,
    pub kind: CheckpointKind,
    /// Options on top of what the dump recorded.
    pub options: CriuOptions,
    /// Become the parent of the restored tree (the caller then waits with [`wait_for_exit`]).
    pub adopt: bool,
    pub stdio: RestoreStdio,
    pub pid_file: Option<PathBuf>,
}

/// A finished restore.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    pub pid: i32,
    pub manifest: Manifest,
    /// Time spent verifying that the restore waited for (a folder is mostly verified while CRIU starts up).
    pub verify_time: Duration,
    /// CRIU's own time, without its wait for the verification.
    pub criu_time: Duration,
}

/// How long to wait for a PID of the checkpoint held by a zombie that its parent has not reaped yet.
const ZOMBIE_GRACE: Duration = Duration::from_secs(5);

/// Verify and restore the checkpoint `req` names.
pub fn restore(cfg: &Config, req: &RestoreRequest, progress: &dyn Progress) -> Result<RestoreOutcome, EngineError> {
    let criu = Criu::locate(cfg.criu.binary_path.as_deref())?;
    criu.supported_version()?;
    let started = Instant::now();
    // A folder is verified while CRIU starts up (CRIU is held at its pre-restore hook, before it restores
    // anything, until every checksum matched); an archive is verified as it is extracted.
    let folder = std::fs::metadata(&req.path).map(|m| m.is_dir()).unwrap_or(false);
    let (opened, mut pending) = if folder {
        let (opened, pending) = OpenedCheckpoint::open_folder_verifying(&req.path)?;
        (opened, Some(pending))
    } else {
        let total = crate::engine::dump::disk_size(&req.path);
        progress.phase("verifying", Some(total));
        let opened = OpenedCheckpoint::open(&req.path, &cfg.scratch_dir(), &|n| progress.advance(n));
        progress.finish();
        (opened?, None)
    };
    let mut verify_time = started.elapsed();
    let mut gate_wait = Duration::ZERO;
    if opened.manifest.kind != req.kind {
        return Err(EngineError::WrongKind { path: req.path.clone(), found: opened.manifest.kind });
    }
    wait_until_free(&opened.manifest.process.pids)?;

    let mut user = req.options.clone();
    let stdio_file = match &req.stdio {
        RestoreStdio::Inherit => None,
        RestoreStdio::File(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(EngineError::io(format!("opening {}", p.display())))?,
        ),
        RestoreStdio::Null => {
            Some(File::options().read(true).write(true).open("/dev/null").map_err(EngineError::io("opening /dev/null"))?)
        }
    };
    for pipe in &opened.manifest.process.stdio_pipes {
        user.inherit_fd.push(format!("fd[{}]:{}", pipe.fd, pipe.resource));
    }
    let options = opened.manifest.criu_options.merged_with(&user);
    if req.adopt {
        become_subreaper()?;
    }
    let work = tempfile::Builder::new().prefix("cedana-restore-").tempdir().map_err(EngineError::io("creating a work folder"))?;
    let call = RestoreCall { images_dir: &opened.images_dir, work_dir: work.path(), options: &options, stdio: stdio_file };
    let criu_start = Instant::now();
    let hooks = cfg.hooks();
    let mut ctx = HookContext { kind: req.kind, pid: 0, container_id: None, checkpoint: req.path.clone(), succeeded: None };
    let mut verdict: Result<(), EngineError> = Ok(());
    let mut gate = |action: &str| -> bool {
        if action != "pre-restore" {
            return true;
        }
        if let Some(p) = pending.take() {
            let waited = Instant::now();
            verdict = p.wait().map_err(EngineError::from);
            gate_wait = waited.elapsed();
        }
        if verdict.is_ok() {
            verdict = hooks.run(HookPoint::BeforeRestore, &ctx).map_err(EngineError::from);
        }
        verdict.is_ok()
    };
    let restored = criu.restore(&call, &mut gate);
    // CRIU may have stopped before its pre-restore hook: a failed verification is still the cause to report.
    if let Some(p) = pending.take() {
        verdict = p.wait().map_err(EngineError::from);
    }
    ctx.pid = *restored.as_ref().unwrap_or(&0);
    ctx.succeeded = Some(verdict.is_ok() && restored.is_ok());
    hooks::report(hooks.as_ref(), HookPoint::AfterRestore, &ctx);
    verdict?;
    let pid = match restored {
        Ok(pid) => pid,
        Err(e) => {
            let kept = work.keep();
            tracing::info!(log = %kept.display(), "criu restore failed; its log was kept");
            return Err(e.into());
        }
    };
    let criu_time = criu_start.elapsed().saturating_sub(gate_wait);
    verify_time += gate_wait;
    if let Some(pf) = &req.pid_file {
        std::fs::write(pf, format!("{pid}\n")).map_err(EngineError::io(format!("writing {}", pf.display())))?;
    }
    Ok(RestoreOutcome { pid, manifest: opened.manifest.clone(), verify_time, criu_time })
}

/// Fail if a PID of the checkpoint is taken by a live process; give zombies a moment to be reaped.
/// A PID stays taken while any process, even a zombie, still uses it as its process group or session.
fn wait_until_free(pids: &[i32]) -> Result<(), EngineError> {
    let deadline = Instant::now() + ZOMBIE_GRACE;
    loop {
        match procfs::pid_users(pids).into_iter().next() {
            None => return Ok(()),
            Some(user) if user.zombie && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Some(user) => {
                let how = match (user.holder == user.pid, user.zombie) {
                    (true, false) => user.comm,
                    (true, true) => format!("{} (a zombie that its parent has not reaped)", user.comm),
                    (false, zombie) => format!(
                        "{} (PID {}{}, which uses it as its process group or session)",
                        user.comm,
                        user.holder,
                        if zombie { ", a zombie that its parent has not reaped" } else { "" }
                    ),
                };
                return Err(EngineError::PidInUse { pid: user.pid, comm: how });
            }
        }
    }
}

fn become_subreaper() -> Result<(), EngineError> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(EngineError::Io {
            what: "becoming the parent of the restored tree".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Wait for an adopted restored tree's root to exit, reaping any other orphan on the way, and return its
/// exit code (128 + signal when killed, as shells report it).
pub fn wait_for_exit(pid: i32) -> Result<i32, EngineError> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => return Ok(code),
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(EngineError::Io { what: format!("waiting for restored PID {pid}"), source: std::io::Error::from(e) })
            }
        }
    }
}
