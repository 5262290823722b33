//! A process tree, checkpointed by CRIU directly. CRIU freezes the tree; the pipeline packages the images at
//! CRIU's `post-dump` notification, while the tree is still frozen, and only a complete checkpoint lets CRIU
//! kill it (a refused `post-dump` makes CRIU resume it). Restore makes sure the tree's PIDs are free, wires
//! the standard streams that were pipes, and holds CRIU at `pre-restore` until the verification is done.

use std::fs::File;
use std::time::{Duration, Instant};

use super::{CheckpointCall, DumpTarget, Prepared, RestoreTarget, Restored};
use crate::checkpoint::{CheckpointKind, OpenedCheckpoint};
use crate::criu::options::CriuOptions;
use crate::criu::{CriuStdio, DumpCall, RestoreCall};
use crate::engine::context::OpContext;
use crate::engine::restore::{Gate, RestoreRequest, RestoreStdio};
use crate::engine::{Engine, EngineError};
use crate::procfs;

/// How long to wait for a PID of the checkpoint held by a zombie that its parent has not reaped yet.
const ZOMBIE_GRACE: Duration = Duration::from_secs(5);

/// Dump target: the tree rooted at `pid`.
pub(crate) struct ProcessTarget {
    pid: i32,
}

impl ProcessTarget {
    pub fn new(pid: i32) -> Self {
        Self { pid }
    }
}

impl DumpTarget for ProcessTarget {
    fn prepare(&mut self, _engine: &Engine, options: &CriuOptions) -> Result<Prepared, EngineError> {
        let pid = self.pid;
        let root = procfs::check_dumpable(pid)?;
        let info = procfs::describe(pid)?;
        let mut options = options.clone();
        let mut detected = Vec::new();
        if !options.shell_job && procfs::needs_shell_job(&root, &info.pids) {
            tracing::info!(pid, sid = root.sid, pgid = root.pgid, "session or group leader outside the tree: using shell-job");
            options.shell_job = true;
            detected.push("--shell-job");
        }
        if !options.tcp_established && !options.tcp_close {
            let conns = procfs::established_tcp(&info.pids);
            if !conns.is_empty() {
                return Err(EngineError::NeedsTcpEstablished { pid, conns: conns.join(", ") });
            }
        }
        Ok(Prepared {
            kind: CheckpointKind::Process,
            id: pid.to_string(),
            container_id: None,
            process: info,
            container: None,
            options,
            detected,
            extra_files: Vec::new(),
            work_path: None,
        })
    }

    fn survives_criu(&self, leave_running: bool) -> bool {
        leave_running
    }

    fn checkpoint(
        &mut self,
        engine: &Engine,
        call: &CheckpointCall<'_>,
        frozen: &mut dyn FnMut() -> bool,
    ) -> Result<(), EngineError> {
        let dump = DumpCall {
            pid: self.pid,
            images_dir: call.images_dir,
            work_dir: call.work_dir,
            options: call.options,
            leave_running: call.leave_running,
        };
        let mut notify = |action: &str| action != "post-dump" || frozen();
        engine.criu().dump(&dump, &mut notify).map_err(EngineError::from)
    }

    fn finish(&mut self, _leave_running: bool) -> Result<(), EngineError> {
        // CRIU ended the tree itself once `post-dump` let it.
        Ok(())
    }

    fn roll_back(&mut self, cause: EngineError) -> EngineError {
        // CRIU resumes the tree when `post-dump` fails, and a tree left running was never stopped.
        cause
    }
}

/// Restore target for process checkpoints.
pub(crate) struct ProcessRestore;

impl RestoreTarget for ProcessRestore {
    fn precheck(&self, _engine: &Engine, _req: &RestoreRequest) -> Result<(), EngineError> {
        Ok(())
    }

    fn restore(
        &self,
        engine: &Engine,
        ctx: &OpContext,
        req: &RestoreRequest,
        opened: &OpenedCheckpoint,
        gate: &mut Gate<'_>,
    ) -> Result<Restored, EngineError> {
        wait_until_free(&opened.manifest.process.pids, ctx)?;
        let process = &req.process;
        let mut user = req.options.clone();
        let stdio = match &process.stdio {
            RestoreStdio::Inherit => CriuStdio::Caller,
            RestoreStdio::File(p) => CriuStdio::All(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(EngineError::io(format!("opening {}", p.display())))?,
            ),
            RestoreStdio::Null => CriuStdio::All(
                File::options().read(true).write(true).open("/dev/null").map_err(EngineError::io("opening /dev/null"))?,
            ),
            RestoreStdio::Fds(fds) => {
                let dup = |i: usize| fds[i].try_clone().map(File::from).map_err(EngineError::io("duplicating the stdio given"));
                CriuStdio::Each([dup(0)?, dup(1)?, dup(2)?])
            }
        };
        for pipe in &opened.manifest.process.stdio_pipes {
            user.inherit_fd.push(format!("fd[{}]:{}", pipe.fd, pipe.resource));
        }
        let options = opened.manifest.criu_options.merged_with(&user);
        let work =
            tempfile::Builder::new().prefix("cedana-restore-").tempdir().map_err(EngineError::io("creating a work folder"))?;
        let call = RestoreCall {
            images_dir: &opened.images_dir,
            work_dir: work.path(),
            options: &options,
            stdio,
            as_child: process.as_child,
        };
        let started = Instant::now();
        let mut notify = |action: &str| action != "pre-restore" || gate.pass();
        let restored = engine.criu().restore(&call, &mut notify);
        let criu_time = started.elapsed().saturating_sub(gate.waited());
        let pid = match restored {
            Ok(pid) => pid,
            Err(e) => {
                let kept = work.keep();
                tracing::info!(log = %kept.display(), "criu restore failed; its log was kept");
                return Err(e.into());
            }
        };
        if let Some(pf) = &process.pid_file {
            std::fs::write(pf, format!("{pid}\n")).map_err(EngineError::io(format!("writing {}", pf.display())))?;
        }
        Ok(Restored { pid, exit_code: None, criu_time })
    }
}

/// Fail if a PID of the checkpoint is taken by a live process; give zombies a moment to be reaped.
/// A PID stays taken while any process, even a zombie, still uses it as its process group or session.
fn wait_until_free(pids: &[i32], ctx: &OpContext) -> Result<(), EngineError> {
    let deadline = Instant::now() + ZOMBIE_GRACE;
    loop {
        match procfs::pid_users(pids).into_iter().next() {
            None => return Ok(()),
            Some(user) if user.zombie && Instant::now() < deadline && !ctx.is_cancelled() => {
                std::thread::sleep(Duration::from_millis(20))
            }
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
