//! Hooks around CRIU: work a dump or restore does before and after the kernel-level part. The GPU backend
//! (a later issue) implements [`Hook`] to lock devices and move their state; users can run their own
//! command at each point (`hooks.command` in the config, or `CEDANA_HOOK_COMMAND`), as with CRIU's action
//! scripts. A failing `before-*` hook stops the operation before anything was frozen or restored; a failing
//! `restored` hook (the GPU's state put back) fails a restore whose tree then is killed.

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
    /// CRIU (or runc) restored the tree and it runs; the restore is not reported done yet. A refusal
    /// fails the restore and the restored tree is killed. Only hooks that passed `before-restore` run here;
    /// user commands do not.
    Restored,
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
            HookPoint::Restored => "restored",
            HookPoint::AfterRestore => "after-restore",
        }
    }

    /// The `after-*` point matching a `before-*` one (itself for an `after-*` point).
    pub fn after(self) -> HookPoint {
        match self {
            HookPoint::BeforeDump | HookPoint::AfterDump => HookPoint::AfterDump,
            HookPoint::BeforeRestore | HookPoint::Restored | HookPoint::AfterRestore => HookPoint::AfterRestore,
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
    /// Dump: whether the workload keeps running after it (`--leave-running`).
    pub leave_running: bool,
    /// Restore: the checkpoint's record of the GPU state it holds.
    pub gpu: Option<crate::gpu::GpuRecord>,
    /// Restore: do not check that this host's GPUs can take the checkpoint.
    pub skip_gpu_check: bool,
    /// Restore of a container: the GPUs its spec gives it (`CUDA_VISIBLE_DEVICES`, else
    /// `NVIDIA_VISIBLE_DEVICES`; `Some(None)` when neither is set). `None` for a process, which keeps the
    /// checkpoint's variable.
    pub gpu_visible: Option<Option<crate::gpu::Visible>>,
    /// What hooks hand back to the operation, shared by the clones of this context.
    pub report: std::sync::Arc<std::sync::Mutex<HookReport>>,
}

impl HookContext {
    /// A context for an operation on `kind` rooted at `pid`, with nothing else known yet.
    pub fn new(kind: CheckpointKind, pid: i32, container_id: Option<String>, checkpoint: PathBuf) -> Self {
        Self {
            kind,
            pid,
            container_id,
            checkpoint,
            succeeded: None,
            leave_running: false,
            gpu: None,
            skip_gpu_check: false,
            gpu_visible: None,
            report: Default::default(),
        }
    }

    /// Add to what hooks report (see [`HookReport`]).
    pub fn report(&self, f: impl FnOnce(&mut HookReport)) {
        // A hook that panicked while holding the lock left a report that is still plain data.
        f(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// What hooks reported so far.
    pub fn reported(&self) -> HookReport {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What hooks hand back to the operation: a GPU record for the manifest, and the time of their own phases
/// for the operation's timings.
#[derive(Debug, Clone, Default)]
pub struct HookReport {
    pub gpu: Option<crate::gpu::GpuRecord>,
    /// Restore: the checkpoint's GPUs paired with those that take them over (empty: the same GPUs).
    pub gpu_pairs: Vec<crate::gpu::GpuPair>,
    pub phases: Vec<(&'static str, std::time::Duration)>,
}

/// A hook that refused to let the operation go on.
#[derive(Debug, thiserror::Error)]
#[error("the {point} hook failed: {message}")]
pub struct HookError {
    pub point: &'static str,
    pub message: String,
    /// The error behind the refusal, when the hook has one (a GPU hook's [`crate::gpu::GpuError`]); its text
    /// is `message`.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HookError {
    /// A refusal at `point` saying `message`.
    pub fn new(point: HookPoint, message: impl Into<String>) -> Self {
        Self { point: point.name(), message: message.into(), source: None }
    }

    /// A refusal at `point` because of `source`.
    pub fn caused(point: HookPoint, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { point: point.name(), message: source.to_string(), source: Some(Box::new(source)) }
    }
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

    /// Run every hook that passed `before-*` at a point that may refuse after the fact ([`HookPoint::Restored`]):
    /// the first refusal is returned, and the caller undoes the operation and runs the `after-*` point.
    pub fn check(&self, point: HookPoint, ctx: &HookContext, passed: Passed) -> Result<(), HookError> {
        self.list.iter().take(passed.0).try_for_each(|hook| hook.run(point, ctx))
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
        if point == HookPoint::Restored {
            return Ok(());
        }
        let fail = |message: String| HookError::new(point, message);
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
        HookContext::new(CheckpointKind::Process, 42, None, "/tmp/c".into())
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
                return Err(HookError::new(point, "no"));
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
