//! Hooks around CRIU: work a dump or restore does before and after the kernel-level part. The GPU backend
//! (a later issue) implements [`Hooks`] to lock devices and move their state; users can run their own
//! command at each point (`hooks.command` in the config, or `CEDANA_HOOK_COMMAND`), as with CRIU's action
//! scripts. A failing `before-*` hook stops the operation before anything was frozen or restored.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::checkpoint::CheckpointKind;

/// The points at which hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// Before CRIU (or runc) freezes anything.
    BeforeDump,
    /// After the dump: the checkpoint is complete (`succeeded`) or absent.
    AfterDump,
    /// After the checkpoint was verified, before CRIU (or runc) restores anything.
    BeforeRestore,
    /// After the restore, successful or not.
    AfterRestore,
}

impl HookPoint {
    /// The name given to hook commands (`CEDANA_HOOK`).
    pub fn name(self) -> &'static str {
        match self {
            HookPoint::BeforeDump => "before-dump",
            HookPoint::AfterDump => "after-dump",
            HookPoint::BeforeRestore => "before-restore",
            HookPoint::AfterRestore => "after-restore",
        }
    }
}

/// What a hook is told about the operation.
#[derive(Debug, Clone)]
pub struct HookContext {
    pub kind: CheckpointKind,
    /// Root PID of the tree (the original at dump, the restored one after a restore; 0 when unknown).
    pub pid: i32,
    /// Container id, for containers.
    pub container_id: Option<String>,
    /// The checkpoint file or folder (final path at dump).
    pub checkpoint: PathBuf,
    /// Whether the operation succeeded (`after-*` only).
    pub succeeded: Option<bool>,
}

/// A hook that refused to let the operation go on.
#[derive(Debug, thiserror::Error)]
#[error("the {point} hook failed: {message}")]
pub struct HookError {
    pub point: &'static str,
    pub message: String,
}

/// Work run around CRIU. `before_*` may refuse; `after_*` only report (the outcome is already decided).
pub trait Hooks: Send + Sync {
    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), HookError>;

    /// Whether there is anything to run (callers skip gathering context only hooks would read).
    fn active(&self) -> bool {
        true
    }
}

/// No hooks.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn run(&self, _: HookPoint, _: &HookContext) -> Result<(), HookError> {
        Ok(())
    }
    fn active(&self) -> bool {
        false
    }
}

/// Runs a user command at every hook point, with the context in `CEDANA_*` environment variables; a
/// non-zero exit fails the hook. Its output goes to our stderr.
pub struct CommandHooks {
    command: PathBuf,
}

impl CommandHooks {
    pub fn new(command: &Path) -> Self {
        Self { command: command.to_path_buf() }
    }
}

impl Hooks for CommandHooks {
    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), HookError> {
        let fail = |message: String| HookError { point: point.name(), message };
        let mut cmd = Command::new(&self.command);
        cmd.env("CEDANA_HOOK", point.name())
            .env("CEDANA_KIND", ctx.kind.to_string())
            .env("CEDANA_PID", ctx.pid.to_string())
            .env("CEDANA_CHECKPOINT", &ctx.checkpoint)
            .env("CEDANA_CONTAINER_ID", ctx.container_id.as_deref().unwrap_or_default())
            .env("CEDANA_SUCCEEDED", ctx.succeeded.map(|s| s.to_string()).unwrap_or_default())
            .stdin(Stdio::null());
        // Keep our stdout for our own output.
        if let Ok(err) = std::io::stderr().as_fd().try_clone_to_owned() {
            cmd.stdout(Stdio::from(err));
        }
        let status = cmd.status().map_err(|e| fail(format!("cannot run {}: {e}", self.command.display())))?;
        tracing::info!(hook = point.name(), command = %self.command.display(), %status, "hook ran");
        if status.success() {
            Ok(())
        } else {
            Err(fail(format!("{} exited with {status}", self.command.display())))
        }
    }
}

/// Run an `after-*` hook: its failure cannot change the outcome, so it is logged.
pub(crate) fn report(hooks: &dyn Hooks, point: HookPoint, ctx: &HookContext) {
    if let Err(e) = hooks.run(point, ctx) {
        tracing::warn!(error = %e, "hook failed after the operation");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> HookContext {
        HookContext { kind: CheckpointKind::Process, pid: 42, container_id: None, checkpoint: "/tmp/c".into(), succeeded: None }
    }

    #[test]
    fn a_command_sees_the_context_and_its_exit_code_decides() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hook.sh");
        let log = dir.path().join("calls");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$CEDANA_HOOK $CEDANA_KIND $CEDANA_PID $CEDANA_CHECKPOINT\" >> {}\n[ \"$CEDANA_HOOK\" != before-restore ]\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let hooks = CommandHooks::new(&script);
        hooks.run(HookPoint::BeforeDump, &ctx()).unwrap();
        let err = hooks.run(HookPoint::BeforeRestore, &ctx()).unwrap_err();
        assert!(err.to_string().contains("before-restore hook failed"), "{err}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "before-dump process 42 /tmp/c\nbefore-restore process 42 /tmp/c\n");
        let missing = CommandHooks::new(Path::new("/nonexistent/hook")).run(HookPoint::BeforeDump, &ctx()).unwrap_err();
        assert!(missing.to_string().contains("cannot run /nonexistent/hook"), "{missing}");
    }
}
