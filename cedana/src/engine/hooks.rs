//! Hooks around CRIU: work a dump or restore does before and after the kernel-level part. The GPU backend
//! (a later issue) implements [`Hook`] to lock devices and move their state; users can run their own
//! command at each point (`hooks.command` in the config, or `CEDANA_HOOK_COMMAND`), as with CRIU's action
//! scripts. A failing `before-*` hook stops the operation before anything was frozen or restored; a failing
//! `restored` hook (the GPU's state put back) fails a restore whose tree then is killed. Work that needs
//! nothing of CRIU's ([`Hook::beside_criu`]: the GPU's lock and checkpoint) runs on a thread of its own while
//! CRIU starts up, and CRIU waits for it at its `pre-dump` / `pre-restore` step ([`Before`]).

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

    /// Whether this hook's work at the `before-*` `point` may run on a thread of its own while CRIU starts
    /// up: it needs nothing CRIU does, and CRIU needs its outcome only before it freezes (dump) or restores
    /// (restore) anything. The GPU's lock and checkpoint are such work; a user's command is not (it runs
    /// where CRIU's action scripts would).
    fn beside_criu(&self, _point: HookPoint) -> bool {
        false
    }
}

/// The hooks of an engine, run in order at each `before-*` point (those that run beside CRIU first, on a
/// thread of their own: see [`Hooks::begin`]). A hook whose `before-*` ran is always told the outcome at
/// the matching `after-*` point (in the reverse of the order they passed), also when a later hook refused:
/// what it locked or changed can be undone.
#[derive(Clone, Default)]
pub struct Hooks {
    list: Vec<std::sync::Arc<dyn Hook>>,
}

/// The hooks that passed a `before-*` point, in the order they passed (they are owed the matching
/// `after-*`).
#[derive(Debug, Clone, Default)]
pub struct Passed(Vec<usize>);

impl Hooks {
    /// Add a hook at the end of the list.
    pub fn push(&mut self, hook: std::sync::Arc<dyn Hook>) {
        self.list.push(hook);
    }

    /// Whether there is anything to run (callers skip gathering context only hooks would read).
    pub fn active(&self) -> bool {
        !self.list.is_empty()
    }

    /// Run every hook at a `before-*` point, here and now. On a refusal, the hooks that had passed are told
    /// the operation failed (at `after`, reverse order) before the error is returned.
    pub fn before(&self, point: HookPoint, ctx: &HookContext) -> Result<Passed, HookError> {
        let mut started = self.begin(point, ctx);
        started.pass();
        started.finish()
    }

    /// Start a `before-*` point: the hooks that run beside CRIU ([`Hook::beside_criu`]) start at once on a
    /// thread of their own; the others run at [`Before::run_inline`] (a dump: before CRIU starts) or at
    /// [`Before::pass`], which the operation calls at the last moment before anything is frozen or restored.
    pub fn begin(&self, point: HookPoint, ctx: &HookContext) -> Before {
        let beside: Vec<usize> = (0..self.list.len()).filter(|i| self.list[*i].beside_criu(point)).collect();
        let thread = (!beside.is_empty()).then(|| {
            let (list, own_ctx, order) = (self.list.clone(), ctx.clone(), beside.clone());
            let spawned = std::thread::Builder::new()
                .name("cedana-hooks".into())
                .spawn(move || run_in_order(&list, &order, point, &own_ctx));
            match spawned {
                Ok(thread) => Beside::Running(thread),
                // No thread to be had: they run here and now, before CRIU starts.
                Err(e) => {
                    tracing::warn!(error = %e, hook = point.name(), "no thread for the hooks beside CRIU: running them first");
                    Beside::Done(run_in_order(&self.list, &beside, point, ctx))
                }
            }
        });
        Before { hooks: self.clone(), point, ctx: ctx.clone(), beside: thread, inline: None, outcome: None }
    }

    /// Run every hook that passed `before-*` at a point that may refuse after the fact ([`HookPoint::Restored`]):
    /// the first refusal is returned, and the caller undoes the operation and runs the `after-*` point.
    pub fn check(&self, point: HookPoint, ctx: &HookContext, passed: &Passed) -> Result<(), HookError> {
        passed.0.iter().try_for_each(|i| self.list[*i].run(point, ctx))
    }

    /// Run an `after-*` point for the hooks that passed its `before-*`, in reverse order. A failure here
    /// cannot change the outcome: it is logged.
    pub fn after(&self, point: HookPoint, ctx: &HookContext, passed: &Passed) {
        for i in passed.0.iter().rev() {
            if let Err(e) = self.list[*i].run(point, ctx) {
                tracing::warn!(error = %e, hook = point.name(), "hook failed after the operation");
            }
        }
    }
}

/// Hooks (by their place in the list) that ran in order, and the refusal that stopped them.
type Ran = (Vec<usize>, Result<(), HookError>);

/// Run the hooks `order` names at `point`, in that order, until one refuses.
fn run_in_order(list: &[std::sync::Arc<dyn Hook>], order: &[usize], point: HookPoint, ctx: &HookContext) -> Ran {
    let mut passed = Vec::new();
    for i in order {
        if let Err(e) = list[*i].run(point, ctx) {
            return (passed, Err(e));
        }
        passed.push(*i);
    }
    (passed, Ok(()))
}

/// The hooks of a `before-*` point that run beside CRIU: on their thread, or already run (no thread could
/// be started).
enum Beside {
    Running(std::thread::JoinHandle<Ran>),
    Done(Ran),
}

/// A `before-*` point under way (see [`Hooks::begin`]).
pub struct Before {
    hooks: Hooks,
    point: HookPoint,
    ctx: HookContext,
    /// The hooks running beside CRIU, until joined.
    beside: Option<Beside>,
    /// The other hooks, once run: those that passed, and the refusal.
    inline: Option<Ran>,
    /// Set once the point is decided: the hooks that passed, or the refusal (those that had passed already
    /// told the operation failed).
    outcome: Option<Result<Passed, HookError>>,
}

impl Before {
    /// Run the hooks that do not run beside CRIU, in order, now. On a refusal every hook that had passed
    /// (those beside CRIU waited for) is told the operation failed, and the refusal is returned.
    /// [`Before::pass`] runs them if this was not called.
    pub fn run_inline(mut self) -> Result<Before, HookError> {
        self.inline_now();
        match self.outcome.take() {
            Some(Err(e)) => Err(e),
            outcome => {
                self.outcome = outcome;
                Ok(self)
            }
        }
    }

    fn inline_now(&mut self) {
        if self.outcome.is_none() && self.inline.is_none() {
            let inline: Vec<usize> =
                (0..self.hooks.list.len()).filter(|i| !self.hooks.list[*i].beside_criu(self.point)).collect();
            let ran = run_in_order(&self.hooks.list, &inline, self.point, &self.ctx);
            let refused = ran.1.is_err();
            self.inline = Some(ran);
            if refused {
                self.decide();
            }
        }
    }

    /// Run the other hooks if [`Before::run_inline`] did not, and wait for those running beside CRIU; `true`
    /// lets the operation go on. On a refusal every hook that had passed is told the operation failed. Later
    /// calls give the same answer.
    pub fn pass(&mut self) -> bool {
        self.inline_now();
        if self.outcome.is_none() {
            self.decide();
        }
        matches!(self.outcome, Some(Ok(_)))
    }

    /// Join the hooks running beside CRIU and settle the point: every hook that passed, in the order they
    /// did, or the first refusal (the others that passed told the operation failed).
    fn decide(&mut self) {
        let (passed, verdict) = self.gather();
        let passed = Passed(passed);
        self.outcome = Some(match verdict {
            Ok(()) => Ok(passed),
            Err(e) => {
                self.unwind(&passed);
                Err(e)
            }
        });
    }

    /// End the point: the hooks that passed (owed the `after-*` point), or the refusal that stopped the
    /// operation. When [`Before::pass`] was never called (the operation stopped before its last moment), the
    /// hooks running beside CRIU are waited for: a refusal among them is logged and unwound, as the
    /// operation failed anyway.
    pub fn finish(mut self) -> Result<Passed, HookError> {
        if let Some(outcome) = self.outcome.take() {
            return outcome;
        }
        // A refusal among the inline hooks would have decided the point already: one here is a hook's beside CRIU.
        let (passed, verdict) = self.gather();
        if let Err(e) = verdict {
            tracing::warn!(error = %e, hook = self.point.name(), "a hook refused after the operation had stopped");
            // Unwound here with the others: the operation failed.
            self.unwind(&Passed(passed));
            return Ok(Passed::default());
        }
        Ok(Passed(passed))
    }

    /// Every hook run so far (the inline ones, then those beside CRIU, joined), and the first refusal.
    fn gather(&mut self) -> Ran {
        let (mut passed, mut verdict) = self.inline.take().unwrap_or((Vec::new(), Ok(())));
        let (beside, beside_verdict) = self.join_beside();
        passed.extend(beside);
        if verdict.is_ok() {
            verdict = beside_verdict;
        }
        (passed, verdict)
    }

    fn join_beside(&mut self) -> Ran {
        match self.beside.take() {
            None => (Vec::new(), Ok(())),
            Some(Beside::Done(ran)) => ran,
            Some(Beside::Running(thread)) => match thread.join() {
                Ok(ran) => ran,
                // A hook that panicked is a bug; the operation is refused rather than lost with it.
                Err(_) => (Vec::new(), Err(HookError::new(self.point, "a hook panicked"))),
            },
        }
    }

    fn unwind(&self, passed: &Passed) {
        let failed = HookContext { succeeded: Some(false), ..self.ctx.clone() };
        self.hooks.after(self.point.after(), &failed, passed);
    }
}

impl Drop for Before {
    fn drop(&mut self) {
        // Never leave a hook's thread behind the operation: what it locked must be unwound.
        if self.outcome.is_none() {
            let (passed, _) = self.gather();
            if !passed.is_empty() {
                self.unwind(&Passed(passed));
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

    /// A [`Recorder`] that runs beside CRIU.
    struct Beside(Recorder);

    impl Hook for Beside {
        fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), HookError> {
            self.0.run(point, ctx)
        }

        fn beside_criu(&self, point: HookPoint) -> bool {
            point == HookPoint::BeforeDump
        }
    }

    #[test]
    fn hooks_beside_criu_run_at_once_and_are_unwound_when_the_operation_stops_early() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = |name, refuse| Recorder { name, refuse, log: log.clone() };
        let mut hooks = Hooks::default();
        hooks.push(std::sync::Arc::new(recorder("user", false)));
        hooks.push(std::sync::Arc::new(Beside(recorder("gpu", false))));
        // Stopped before its last moment (CRIU failed to start): the hook beside it is waited for and told.
        let before = hooks.begin(HookPoint::BeforeDump, &ctx()).run_inline().unwrap();
        let passed = before.finish().unwrap();
        hooks.after(HookPoint::AfterDump, &HookContext { succeeded: Some(false), ..ctx() }, &passed);
        let mut seen = log.lock().unwrap().clone();
        seen[..2].sort(); // the two ran at once
        assert_eq!(
            seen,
            ["gpu before-dump None", "user before-dump None", "gpu after-dump Some(false)", "user after-dump Some(false)"]
        );
        // Dropped unfinished: still unwound.
        log.lock().unwrap().clear();
        drop(hooks.begin(HookPoint::BeforeDump, &ctx()));
        assert_eq!(*log.lock().unwrap(), ["gpu before-dump None", "gpu after-dump Some(false)"]);
        // A refusal beside CRIU at the last moment: the inline hook that passed is unwound, and the refusal
        // comes out.
        log.lock().unwrap().clear();
        hooks.list[1] = std::sync::Arc::new(Beside(recorder("gpu", true)));
        let mut before = hooks.begin(HookPoint::BeforeDump, &ctx()).run_inline().unwrap();
        assert!(!before.pass());
        assert!(before.finish().unwrap_err().to_string().contains("before-dump hook failed: no"));
        let mut seen = log.lock().unwrap().clone();
        seen[..2].sort();
        assert_eq!(seen, ["gpu before-dump None", "user before-dump None", "user after-dump Some(false)"]);
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
        hooks.after(HookPoint::AfterRestore, &HookContext { succeeded: Some(true), ..ctx() }, &passed);
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
