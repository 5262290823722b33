//! Hooks around CRIU: work a dump or restore does before and after the kernel-level part. The GPU backend
//! (a later issue) implements [`Hook`] to lock devices and move their state; users can run their own
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

    /// The `after-*` point matching a `before-*` one (itself for an `after-*` point).
    pub fn after(self) -> HookPoint {
        match self {
            HookPoint::BeforeDump | HookPoint::AfterDump => HookPoint::AfterDump,
            HookPoint::BeforeRestore | HookPoint::AfterRestore => HookPoint::AfterRestore,
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

/// Work run around CRIU. `before-*` points may refuse; `after-*` points only report (the outcome is
/// already decided).
pub trait Hook: Send + Sync {
    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), HookError>;
}

/// The hooks of an engine, run in order at each `before-*` point. A hook whose `before-*` ran is always
/// told the outcome at the matching `after-*` point (in reverse order), also when a later hook refused:
/// what it locked or changed can be undone.
#[derive(Clone, Default)]
pub struct Hooks {
    list: Vec<std::sync::Arc<dyn Hook>>,
}

/// How many hooks passed a `before-*` point (they are owed the matching `after-*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Passed(usize);

impl Hooks {
    /// Add a hook at the end of the list.
    pub fn push(&mut self, hook: std::sync::Arc<dyn Hook>) {
        self.list.push(hook);
    }

    /// Whether there is anything to run (callers skip gathering context only hooks would read).
    pub fn active(&self) -> bool {
        !self.list.is_empty()
    }

    /// Run every hook at a `before-*` point. On a refusal, the hooks that had passed are told the
    /// operation failed (at `after`, reverse order) before the error is returned.
    pub fn before(&self, point: HookPoint, ctx: &HookContext) -> Result<Passed, HookError> {
        for (i, hook) in self.list.iter().enumerate() {
            if let Err(e) = hook.run(point, ctx) {
                let failed = HookContext { succeeded: Some(false), ..ctx.clone() };
                self.after(point.after(), &failed, Passed(i));
                return Err(e);
            }
        }
        Ok(Passed(self.list.len()))
    }

    /// Run an `after-*` point for the hooks that passed its `before-*`, in reverse order. A failure here
    /// cannot change the outcome: it is logged.
    pub fn after(&self, point: HookPoint, ctx: &HookContext, passed: Passed) {
        for hook in self.list.iter().take(passed.0).rev() {
            if let Err(e) = hook.run(point, ctx) {
                tracing::warn!(error = %e, hook = point.name(), "hook failed after the operation");
            }
        }
    }
}

/// Runs a user command at every hook point, with the context in `CEDANA_*` environment variables; a
/// non-zero exit fails the hook. Its output goes to our stderr.
pub struct CommandHook {
    command: PathBuf,
}

impl CommandHook {
    pub fn new(command: &Path) -> Self {
        Self { command: command.to_path_buf() }
    }
}

impl Hook for CommandHook {
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
        let hooks = CommandHook::new(&script);
        hooks.run(HookPoint::BeforeDump, &ctx()).unwrap();
        let err = hooks.run(HookPoint::BeforeRestore, &ctx()).unwrap_err();
        assert!(err.to_string().contains("before-restore hook failed"), "{err}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "before-dump process 42 /tmp/c\nbefore-restore process 42 /tmp/c\n");
        let missing = CommandHook::new(Path::new("/nonexistent/hook")).run(HookPoint::BeforeDump, &ctx()).unwrap_err();
        assert!(missing.to_string().contains("cannot run /nonexistent/hook"), "{missing}");
    }

    struct Recorder {
        name: &'static str,
        refuse: bool,
        log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Hook for Recorder {
        fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), HookError> {
            self.log.lock().unwrap().push(format!("{} {} {:?}", self.name, point.name(), ctx.succeeded));
            if self.refuse && point == HookPoint::BeforeDump {
                return Err(HookError { point: point.name(), message: "no".into() });
            }
            Ok(())
        }
    }

    #[test]
    fn a_refusal_unwinds_the_hooks_that_passed() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hooks = Hooks::default();
        for (name, refuse) in [("gpu", false), ("user", true), ("never", false)] {
            hooks.push(std::sync::Arc::new(Recorder { name, refuse, log: log.clone() }));
        }
        assert!(hooks.before(HookPoint::BeforeDump, &ctx()).is_err());
        assert_eq!(
            *log.lock().unwrap(),
            ["gpu before-dump None", "user before-dump None", "gpu after-dump Some(false)"],
            "the refusing hook and those after it are not told; the one before is"
        );
        log.lock().unwrap().clear();
        hooks.list.remove(1);
        let passed = hooks.before(HookPoint::BeforeRestore, &ctx()).unwrap();
        hooks.after(HookPoint::AfterRestore, &HookContext { succeeded: Some(true), ..ctx() }, passed);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "gpu before-restore None",
                "never before-restore None",
                "never after-restore Some(true)",
                "gpu after-restore Some(true)"
            ]
        );
    }
}
