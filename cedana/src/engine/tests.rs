//! The dump and restore pipelines end to end, through fakes of CRIU and of the container runtime (see
//! [`super::fakes`]) acting on real `sleep` processes: successes, the rollback at each phase, cancellation
//! at each phase, dispatch of restores, and concurrent dumps. No root needed.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fakes::{
    self, images_of, is_running, pages_intact, record, snapshot, Events, Failures, FakeCriu, FakeRuntime, Workload,
};
use super::*;
use crate::cancel::Cancel;
use crate::checkpoint::{CheckpointError, CheckpointKind, CheckpointWriter, OpenedCheckpoint};
use crate::codec::Compression;
use crate::config::Config;
use crate::criu::options::CriuOptions;
use crate::criu::CriuError;
use crate::error::ErrorKind;
use crate::procfs::ProcError;
use crate::progress::Progress;
use crate::runc::{RestoreFlags, RuncError};

// ---------------------------------------------------------------------------------------------------------
// Set-up

/// A hook that records every call (in the shared event log, and with its context), refusing at one point.
struct Recorder {
    events: Events,
    refuse: Option<HookPoint>,
    seen: Mutex<Vec<(HookPoint, HookContext)>>,
}

impl Hook for Recorder {
    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), hooks::HookError> {
        record(&self.events, format!("hook {} {:?}", point.name(), ctx.succeeded));
        self.seen.lock().unwrap().push((point, ctx.clone()));
        if self.refuse == Some(point) {
            return Err(hooks::HookError::new(point, "refused by the test"));
        }
        Ok(())
    }
}

impl Recorder {
    /// The context of the last call at `point`.
    fn at(&self, point: HookPoint) -> Option<HookContext> {
        self.seen.lock().unwrap().iter().rev().find(|(p, _)| *p == point).map(|(_, c)| c.clone())
    }
}

/// A `before-dump` hook that puts a file where the checkpoint is to appear, so that its commit fails.
struct Squatter;

impl Hook for Squatter {
    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), hooks::HookError> {
        if point == HookPoint::BeforeDump {
            std::fs::write(&ctx.checkpoint, b"squatter").unwrap();
        }
        Ok(())
    }
}

/// An engine on fakes, with a recording hook, checkpoints under `DIR` (`tmp/ckpts`).
struct Harness {
    events: Events,
    criu: Arc<FakeCriu>,
    runtime: Arc<FakeRuntime>,
    hook: Arc<Recorder>,
    engine: Engine,
    tmp: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::build(|c, _| c, None, None)
    }

    /// `criu` configures the fake CRIU (given the checkpoint folder); `refuse` makes the recorder refuse at a
    /// point; `extra` is a further hook.
    fn build(criu: impl FnOnce(FakeCriu, &Path) -> FakeCriu, refuse: Option<HookPoint>, extra: Option<Arc<dyn Hook>>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let events = fakes::events();
        let criu = Arc::new(criu(FakeCriu::new(events.clone()), &tmp.path().join("ckpts")));
        let runtime = Arc::new(FakeRuntime::new(events.clone()));
        let hook = Arc::new(Recorder { events: events.clone(), refuse, seen: Mutex::default() });
        let rt = Arc::clone(&runtime);
        let mut builder = Engine::builder(Config::default(), criu.clone() as Arc<dyn crate::criu::CriuDriver>, "4.2.1".into())
            .runtimes(Arc::new(move |_root: Option<&Path>| Ok(rt.clone() as Arc<dyn crate::runc::ContainerRuntime>)))
            .hook(hook.clone())
            .scratch(tmp.path().join("scratch"));
        if let Some(h) = extra {
            builder = builder.hook(h);
        }
        Self { events, criu, runtime, hook, engine: builder.build(), tmp }
    }

    /// The checkpoint folder (`DIR`).
    fn dir(&self) -> PathBuf {
        self.tmp.path().join("ckpts")
    }

    fn scratch(&self) -> PathBuf {
        self.tmp.path().join("scratch")
    }

    fn dump_request(&self, target: TargetSpec, c: Compression, leave_running: bool) -> DumpRequest {
        DumpRequest {
            target,
            destination: Destination::dir(self.dir()),
            name: Some("ckpt".into()),
            compression: c,
            leave_running,
            options: CriuOptions::default(),
            stream: None,
        }
    }

    fn dump_process(&self, w: &Workload, c: Compression, ctx: &OpContext) -> Result<DumpOutcome, EngineError> {
        self.engine.dump(self.dump_request(TargetSpec::Process { pid: w.pid }, c, false), ctx)
    }

    fn events(&self) -> Vec<String> {
        snapshot(&self.events)
    }

    /// Whether any event starts with `prefix`.
    fn saw(&self, prefix: &str) -> bool {
        self.events().iter().any(|e| e.starts_with(prefix))
    }

    /// Everything in `DIR` (hidden entries included), sorted; empty when `DIR` does not exist.
    fn left(&self) -> Vec<String> {
        entries(&self.dir())
    }

    /// Remove the work folders the engine kept after a CRIU failure (as it should), checking they were kept.
    fn remove_kept_work_dirs(&self) {
        let kept: Vec<PathBuf> = self.criu.work_dirs().into_iter().filter(|d| d.exists()).collect();
        assert!(!kept.is_empty(), "CRIU failed: its work folder (with its log) is kept");
        for d in kept {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Work folders kept by a failed CRIU are the engine's to keep, ours to clean (also when a test fails).
        for d in self.criu.work_dirs() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn checkpoint_name(c: Compression) -> String {
    CheckpointWriter::path_for(Path::new(""), "ckpt", c).display().to_string()
}

/// A bundle folder with a config.json, and a container `id` in `status` around a new workload.
fn container(h: &Harness, id: &str, status: &str) -> (Workload, PathBuf) {
    let w = Workload::spawn();
    let bundle = h.tmp.path().join(format!("bundle-{id}"));
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), CONFIG_JSON).unwrap();
    h.runtime.add(id, status, w.pid, &bundle);
    (w, bundle)
}

const CONFIG_JSON: &str = r#"{"ociVersion":"1.0.2","process":{"args":["sleep","60"]},"root":{"path":"rootfs"}}"#;

fn runc_target(h: &Harness, id: &str) -> TargetSpec {
    let work = h.tmp.path().join(format!("work-{id}"));
    std::fs::create_dir_all(&work).unwrap();
    TargetSpec::Runc(RuncSpec { id: id.into(), runtime: None, root: None, work_path: Some(work), extra_flags: Vec::new() })
}

/// Whether the workload was ended with SIGKILL (and reaps it, freeing its PID).
fn killed(w: &mut Workload) -> bool {
    w.reap().and_then(|s| s.signal()) == Some(libc::SIGKILL)
}

/// A process left as it was: alive, not stopped, not a zombie.
fn assert_running(w: &Workload, what: &str) {
    assert!(w.is_running(), "{what}: PID {} must run, unfrozen (state {:?})", w.pid, w.state());
}

// ---------------------------------------------------------------------------------------------------------
// 1. Successful process dumps

#[test]
fn a_process_dump_commits_the_checkpoint_kills_the_process_and_tells_the_hook() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        let h = Harness::new();
        let mut w = Workload::spawn();
        let pid = w.pid;
        let ctx = OpContext::new();
        let out = h.dump_process(&w, c, &ctx).unwrap_or_else(|e| panic!("{c}: {e}"));

        let expected = CheckpointWriter::path_for(&h.dir(), "ckpt", c);
        assert_eq!(out.path, expected, "{c}");
        assert_eq!(h.left(), [checkpoint_name(c)], "{c}: only the checkpoint is left in DIR (no staging, no partial)");
        assert_eq!(out.manifest.kind, CheckpointKind::Process);
        assert_eq!(out.manifest.process.pid, pid);
        assert_eq!(out.manifest.process.cmdline.first().map(String::as_str), Some("sleep"));
        assert_eq!(out.manifest.compression, c);
        assert_eq!(out.manifest.criu_version, "4.2.1");
        assert!(killed(&mut w), "{c}: CRIU (the fake) killed the dumped process once post-dump agreed");
        assert_eq!(
            h.events(),
            [
                "hook before-dump None".to_string(),
                format!("criu pre-dump {pid}"),
                format!("criu froze {pid}"),
                format!("criu images {pid}"),
                format!("criu post-dump {pid} -> true"),
                format!("criu killed {pid}"),
                "hook after-dump Some(true)".to_string(),
            ],
            "{c}"
        );
        let after = h.hook.at(HookPoint::AfterDump).unwrap();
        assert_eq!((after.pid, after.succeeded, after.checkpoint), (pid, Some(true), expected.clone()));

        // The checkpoint verifies and holds CRIU's images, byte for byte.
        let opened = OpenedCheckpoint::open(&out.path, &h.scratch(), &|_| {}).unwrap();
        assert_eq!(images_of(&opened.images_dir), Some(pid), "{c}");
        assert!(pages_intact(&opened.images_dir, pid), "{c}: pages-1.img differs from what CRIU wrote");
        let mut names: Vec<String> = opened.manifest.files.iter().map(|f| f.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            [format!("core-{pid}.img"), "inventory.img".into(), format!("pagemap-{pid}.img"), "pages-1.img".into()]
        );
        let phases: Vec<&str> = ctx.timings().iter().map(|t| t.phase).collect();
        // The GPU hook looked for CUDA processes (none: nothing else of it ran).
        assert_eq!(phases, ["gpu detect", "criu", "package", "total"], "{c}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 2. Rollback at each phase

#[test]
fn a_dump_of_a_missing_pid_fails_in_prepare_before_criu_and_writes_nothing() {
    let h = Harness::new();
    // A PID that was ours a moment ago: killed and reaped since.
    let pid = Workload::spawn().pid;
    let err =
        h.engine.dump(h.dump_request(TargetSpec::Process { pid }, Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::Process(ProcError::NoSuchProcess(p)) if p == pid), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(h.events(), Vec::<String>::new(), "neither hooks nor CRIU ran");
    assert_eq!(h.left(), Vec::<String>::new());
}

#[test]
fn a_refusing_before_dump_hook_stops_the_dump_before_criu_and_writes_nothing() {
    for c in [Compression::None, Compression::Zstd] {
        let h = Harness::build(|c, _| c, Some(HookPoint::BeforeDump), None);
        let w = Workload::spawn();
        let err = h.dump_process(&w, c, &OpContext::new()).unwrap_err();
        assert!(matches!(err, EngineError::Hook(_)), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(h.events(), ["hook before-dump None"], "{c}: CRIU never ran");
        assert_eq!(h.left(), Vec::<String>::new(), "{c}");
        assert_running(&w, "after a refused dump");
    }
}

#[test]
fn a_criu_failure_before_post_dump_leaves_the_process_running_and_nothing_in_dir() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        let h = Harness::build(|c, _| c.failing_before_images(), None, None);
        let w = Workload::spawn();
        let pid = w.pid;
        let err = h.dump_process(&w, c, &OpContext::new()).unwrap_err();
        assert!(matches!(err, EngineError::Criu(CriuError::Failed { .. })), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert_running(&w, "after CRIU failed");
        assert_ne!(w.state(), Some('T'));
        assert!(!h.saw("criu post-dump"), "{c}");
        assert!(h.saw(&format!("criu resumed {pid}")), "{c}");
        assert_eq!(h.events().last().map(String::as_str), Some("hook after-dump Some(false)"));
        assert_eq!(h.left(), Vec::<String>::new(), "{c}: nothing under the checkpoint's name, no staging");
        h.remove_kept_work_dirs();
    }
}

#[test]
fn a_packaging_failure_makes_criu_resume_the_process_and_leaves_nothing() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        // The images vanish between CRIU writing them and post-dump: packaging cannot read them.
        let h = Harness::build(|c, _| c.between(|call| std::fs::remove_dir_all(call.images_dir).unwrap()), None, None);
        let w = Workload::spawn();
        let pid = w.pid;
        let err = h.dump_process(&w, c, &OpContext::new()).unwrap_err();
        assert!(matches!(err, EngineError::Package { .. }), "{c}: {err:?}");
        assert!(h.saw(&format!("criu post-dump {pid} -> false")), "{c}: CRIU is told the checkpoint failed");
        assert!(h.saw(&format!("criu resumed {pid}")), "{c}");
        assert!(!h.saw("criu killed"), "{c}");
        assert_running(&w, "after packaging failed");
        assert_eq!(h.left(), Vec::<String>::new(), "{c}");
        let after = h.hook.at(HookPoint::AfterDump).unwrap();
        assert_eq!(after.succeeded, Some(false));
    }
}

#[test]
fn a_commit_failure_after_criu_killed_the_process_reports_unfinished_and_keeps_the_images() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        let h = Harness::build(
            move |criu, dir| {
                let final_path = CheckpointWriter::path_for(dir, "ckpt", c);
                criu.between(move |_| std::fs::write(&final_path, b"squatter").unwrap())
            },
            None,
            None,
        );
        let mut w = Workload::spawn();
        let pid = w.pid;
        let err = h.dump_process(&w, c, &OpContext::new()).unwrap_err();
        let EngineError::Unfinished { pid: reported, kept, source } = &err else { panic!("{c}: {err:?}") };
        assert_eq!(*reported, pid);
        assert!(matches!(source, CheckpointError::Exists { .. }), "{c}: {source:?}");
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(err.to_string().contains(&kept.display().to_string()), "{c}: the message names where the images are");
        assert!(killed(&mut w), "{c}: the process is gone (CRIU killed it after post-dump agreed)");
        assert_eq!(std::fs::read(CheckpointWriter::path_for(&h.dir(), "ckpt", c)).unwrap(), b"squatter", "{c}: not overwritten");
        // CRIU's images are kept where the error says, whole.
        assert!(kept.exists(), "{c}: {} was deleted", kept.display());
        if c.is_archive() {
            // A complete archive (manifest included), only not renamed into place.
            let opened = OpenedCheckpoint::open(kept, &h.scratch(), &|_| {}).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert!(pages_intact(&opened.images_dir, pid), "{c}: the kept archive lost pages");
        } else {
            assert!(pages_intact(kept, pid), "{c}: the kept folder lost pages");
        }
        let kept_name = kept.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            h.left(),
            {
                // Marked as kept on purpose: a later start's sweep leaves it (see `leftovers`).
                let mut v = vec![checkpoint_name(c), format!("{kept_name}.kept"), kept_name];
                v.sort();
                v
            },
            "{c}: nothing else left"
        );
        assert_eq!(h.hook.at(HookPoint::AfterDump).unwrap().succeeded, Some(false));
    }
}

#[test]
fn a_commit_failure_with_leave_running_gives_the_process_back_and_keeps_nothing() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        let h = Harness::build(
            move |criu, dir| {
                let final_path = CheckpointWriter::path_for(dir, "ckpt", c);
                criu.between(move |_| std::fs::write(&final_path, b"squatter").unwrap())
            },
            None,
            None,
        );
        let w = Workload::spawn();
        let pid = w.pid;
        let err = h.engine.dump(h.dump_request(TargetSpec::Process { pid }, c, true), &OpContext::new()).unwrap_err();
        assert!(matches!(&err, EngineError::Package { source: CheckpointError::Exists { .. } }), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_running(&w, "left running");
        assert!(h.saw(&format!("criu resumed {pid}")) && !h.saw("criu killed"), "{c}");
        assert_eq!(h.left(), [checkpoint_name(c)], "{c}: only the squatter's file, nothing kept");
        assert_eq!(std::fs::read(CheckpointWriter::path_for(&h.dir(), "ckpt", c)).unwrap(), b"squatter");
    }
}

#[test]
fn a_criu_error_after_post_dump_agreed_keeps_the_images_of_the_dead_tree() {
    for c in [Compression::None, Compression::Zstd] {
        let h = Harness::build(|c, _| c.failing_after_post_dump(), None, None);
        let mut w = Workload::spawn();
        let pid = w.pid;
        let err = h.dump_process(&w, c, &OpContext::new()).unwrap_err();
        assert!(killed(&mut w), "{c}: CRIU ended the tree before it failed");
        // Wherever they are kept, the images must survive under DIR, and the error must say where.
        let left = h.left();
        assert_eq!(left.len(), 1, "{c}: the tree is gone and its images with it ({err}); left: {left:?}");
        let kept = h.dir().join(&left[0]);
        assert!(err.to_string().contains(&kept.display().to_string()), "{c}: {err}");
        if kept.is_dir() {
            assert!(pages_intact(&kept, pid), "{c}");
        } else {
            let opened = OpenedCheckpoint::open(&kept, &h.scratch(), &|_| {}).unwrap();
            assert!(pages_intact(&opened.images_dir, pid), "{c}");
        }
        h.remove_kept_work_dirs();
    }
}

// ---------------------------------------------------------------------------------------------------------
// 3. Cancellation at each phase

/// A dump cancelled before CRIU starts never freezes anything.
#[test]
fn a_dump_cancelled_before_it_starts_never_runs_criu() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        let h = Harness::new();
        let w = Workload::spawn();
        let pid = w.pid;
        let cancel = Cancel::new();
        cancel.cancel();
        let err = h.dump_process(&w, c, &OpContext::new().with_cancel(cancel)).unwrap_err();
        assert!(matches!(err, EngineError::Interrupted), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::Cancelled);
        assert!(!h.saw(&format!("criu froze {pid}")), "{c}: CRIU must not run");
        assert_running(&w, "after a cancelled dump");
        assert_eq!(h.left(), Vec::<String>::new(), "{c}");
    }
}

#[test]
fn a_dump_cancelled_while_criu_runs_resumes_the_process_and_leaves_nothing() {
    for c in [Compression::None, Compression::Zstd, Compression::Zlib] {
        let cancel = Cancel::new();
        let token = cancel.clone();
        let h = Harness::build(move |criu, _| criu.between(move |_| token.cancel()), None, None);
        let w = Workload::spawn();
        let pid = w.pid;
        let err = h.dump_process(&w, c, &OpContext::new().with_cancel(cancel)).unwrap_err();
        assert!(matches!(err, EngineError::Interrupted), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::Cancelled);
        assert!(h.saw(&format!("criu post-dump {pid} -> false")), "{c}");
        assert_running(&w, "after a dump cancelled during CRIU");
        assert_eq!(h.left(), Vec::<String>::new(), "{c}");
    }
}

/// Cancels its operation on the first bytes packaged after CRIU is done (phase `packaging`).
struct CancelOnPackaging {
    cancel: Cancel,
    phase: Mutex<String>,
    fired: Mutex<Option<String>>,
}

impl Progress for CancelOnPackaging {
    fn phase(&self, name: &str, _total: Option<u64>) {
        *self.phase.lock().unwrap() = name.to_string();
    }
    fn advance(&self, bytes: u64) {
        let phase = self.phase.lock().unwrap().clone();
        let mut fired = self.fired.lock().unwrap();
        if phase == "packaging" && fired.is_none() {
            *fired = Some(format!("cancelled after {bytes} bytes"));
            self.cancel.cancel();
        }
    }
    fn finish(&self) {}
}

#[test]
fn a_dump_cancelled_during_packaging_resumes_the_process_and_leaves_nothing() {
    // Archives, so packaging reads files: the page image is packed while CRIU runs and the small images at
    // post-dump (zstd in frames, zlib in raw deflate units of one stream).
    for c in [Compression::Zstd, Compression::Zlib] {
        let h = Harness::new();
        let w = Workload::spawn();
        let pid = w.pid;
        let cancel = Cancel::new();
        let progress = Arc::new(CancelOnPackaging { cancel: cancel.clone(), phase: Mutex::default(), fired: Mutex::default() });
        let ctx = OpContext::new().with_cancel(cancel).with_progress(progress.clone());
        let res = h.dump_process(&w, c, &ctx);
        assert!(progress.fired.lock().unwrap().is_some(), "{c}: packaging never advanced: the test proves nothing");
        let err = res.map(|o| o.path).unwrap_err();
        assert!(matches!(err, EngineError::Interrupted), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::Cancelled);
        assert!(h.saw(&format!("criu post-dump {pid} -> false")), "{c}");
        assert!(h.saw(&format!("criu resumed {pid}")), "{c}");
        assert_running(&w, "after a dump cancelled while packaging");
        assert_eq!(h.left(), Vec::<String>::new(), "{c}");
    }
}

#[test]
fn a_deadline_expiring_mid_dump_cancels_it_and_resumes_the_process() {
    for c in [Compression::None, Compression::Zstd] {
        // The deadline must pass while CRIU runs: a run where it passed before CRIU had written the images (a
        // loaded machine) proves nothing, and is tried again with a longer one.
        let mut conclusive = false;
        for timeout in [500, 2_000, 8_000, 30_000].map(Duration::from_millis) {
            let cancel = Cancel::new().with_timeout(timeout);
            let token = cancel.clone();
            let early = Arc::new(Mutex::new(None));
            let seen = early.clone();
            // CRIU is slow: the deadline passes after the images are written, before post-dump.
            let h = Harness::build(
                move |criu, _| {
                    criu.between(move |_| {
                        *seen.lock().unwrap() = Some(token.is_cancelled());
                        while !token.is_cancelled() {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    })
                },
                None,
                None,
            );
            let w = Workload::spawn();
            let pid = w.pid;
            let ctx = OpContext::new().with_cancel(cancel);
            let err = h.dump_process(&w, c, &ctx).unwrap_err();
            assert!(matches!(err, EngineError::Interrupted), "{c}: {err:?}");
            assert_eq!(err.kind(), ErrorKind::Cancelled);
            assert!(ctx.cancel().timed_out());
            assert!(h.saw(&format!("criu post-dump {pid} -> false")), "{c}");
            assert_running(&w, "after the deadline");
            assert_eq!(h.left(), Vec::<String>::new(), "{c}");
            if *early.lock().unwrap() == Some(false) {
                conclusive = true;
                break;
            }
        }
        assert!(conclusive, "{c}: the deadline always passed before CRIU had written the images");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 4. runc containers through the fake runtime

#[test]
fn a_runc_dump_pauses_checkpoints_and_deletes_the_container_after_the_commit() {
    for c in [Compression::None, Compression::Zstd] {
        let h = Harness::new();
        let (mut w, bundle) = container(&h, "c1", "running");
        let expected = CheckpointWriter::path_for(&h.dir(), "ckpt", c);
        h.runtime.watch_checkpoint(&expected);
        let out = h.engine.dump(h.dump_request(runc_target(&h, "c1"), c, false), &OpContext::new()).unwrap();
        assert_eq!(out.path, expected);
        assert_eq!(
            h.events(),
            [
                "hook before-dump None",
                "runc pause c1",
                "runc checkpoint c1 --leave-running",
                "runc delete c1 (checkpoint committed: true)",
                "hook after-dump Some(true)"
            ],
            "{c}"
        );
        assert!(h.runtime.container("c1").is_none(), "{c}: deleted");
        assert!(killed(&mut w), "{c}: the container's process ended with it");
        assert_eq!(out.manifest.kind, CheckpointKind::Runc);
        assert_eq!(out.manifest.process.pid, w.pid);
        let info = out.manifest.container.as_ref().unwrap();
        assert_eq!((info.id.as_str(), info.bundle.as_deref()), ("c1", Some(bundle.as_path())));
        assert_eq!(info.config, Some(serde_json::from_str::<serde_json::Value>(CONFIG_JSON).unwrap()));
        let opened = OpenedCheckpoint::open(&out.path, &h.scratch(), &|_| {}).unwrap();
        assert_eq!(std::fs::read_to_string(opened.images_dir.join(targets::runc::CONFIG_FILE)).unwrap(), CONFIG_JSON);
        assert!(pages_intact(&opened.images_dir, w.pid), "{c}");
        assert_eq!(h.left(), [checkpoint_name(c)]);
    }
}

#[test]
fn a_runc_checkpoint_failure_resumes_the_container_and_leaves_nothing() {
    let h = Harness::new();
    let (w, _bundle) = container(&h, "c1", "running");
    h.runtime.set_failures(Failures { checkpoint: true, ..Default::default() });
    let err = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(matches!(&err, EngineError::Runc(RuncError::Failed { command, .. }) if command == "checkpoint"), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(
        h.events(),
        ["hook before-dump None", "runc pause c1", "runc checkpoint c1 failed", "runc resume c1", "hook after-dump Some(false)"]
    );
    assert_eq!(h.runtime.container("c1").unwrap().status, "running");
    assert_running(&w, "a resumed container");
    assert_eq!(h.left(), Vec::<String>::new());
}

#[test]
fn a_runc_pause_failure_checkpoints_nothing_and_reports_the_pause_failure() {
    let h = Harness::new();
    let (w, _bundle) = container(&h, "c1", "running");
    h.runtime.set_failures(Failures { pause: true, ..Default::default() });
    let err = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(!h.saw("runc checkpoint"), "nothing checkpointed");
    assert!(matches!(&err, EngineError::Runc(RuncError::Failed { command, .. }) if command == "pause"), "{err}");
    assert!(!err.to_string().contains("still paused"), "{err}");
    assert_eq!(h.runtime.container("c1").unwrap().status, "running");
    assert_running(&w, "a container whose pause failed");
    assert_eq!(h.left(), Vec::<String>::new());
}

#[test]
fn a_runc_commit_failure_resumes_the_container_and_does_not_delete_it() {
    let h = Harness::build(|c, _| c, None, Some(Arc::new(Squatter)));
    let (w, _bundle) = container(&h, "c1", "running");
    let err = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(matches!(&err, EngineError::Package { source: CheckpointError::Exists { .. } }), "{err:?}");
    let runc: Vec<String> = h.events().into_iter().filter(|e| e.starts_with("runc")).collect();
    assert_eq!(runc, ["runc pause c1", "runc checkpoint c1 --leave-running", "runc resume c1"]);
    assert_eq!(h.runtime.container("c1").unwrap().status, "running");
    assert_running(&w, "a container whose checkpoint could not be committed");
    assert_eq!(h.left(), [checkpoint_name(Compression::Zstd)], "only the squatter's file");
}

#[test]
fn a_failed_resume_after_a_failed_runc_dump_reports_the_container_left_paused() {
    let h = Harness::new();
    let (w, _bundle) = container(&h, "c1", "running");
    h.runtime.set_failures(Failures { checkpoint: true, resume: true, ..Default::default() });
    let err = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    let EngineError::LeftPaused { id, cause, resume, .. } = &err else { panic!("{err:?}") };
    assert_eq!(id, "c1");
    assert!(matches!(cause.as_ref(), EngineError::Runc(RuncError::Failed { command, .. }) if command == "checkpoint"));
    assert!(matches!(resume.as_ref(), RuncError::Failed { command, .. } if command == "resume"));
    assert!(err.to_string().contains("still paused"), "{err}");
    assert_eq!(h.runtime.container("c1").unwrap().status, "paused", "what the error says is true");
    assert_eq!(w.state(), Some('T'));
    assert_eq!(h.left(), Vec::<String>::new());
}

#[test]
fn a_runc_dump_that_leaves_the_container_running_never_pauses_nor_deletes_it() {
    let h = Harness::new();
    let (w, _bundle) = container(&h, "c1", "running");
    let out = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, true), &OpContext::new()).unwrap();
    let runc: Vec<String> = h.events().into_iter().filter(|e| e.starts_with("runc")).collect();
    assert_eq!(runc, ["runc checkpoint c1 --leave-running"]);
    assert_eq!(h.runtime.container("c1").unwrap().status, "running");
    assert_running(&w, "a container left running");
    assert!(out.path.is_file());
}

#[test]
fn a_container_paused_beforehand_is_not_paused_again_and_stays_paused_after_a_failure() {
    let h = Harness::new();
    let (w, _bundle) = container(&h, "c1", "paused");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    h.runtime.set_failures(Failures { checkpoint: true, ..Default::default() });
    let err = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(matches!(&err, EngineError::Runc(RuncError::Failed { command, .. }) if command == "checkpoint"), "{err:?}");
    let runc: Vec<String> = h.events().into_iter().filter(|e| e.starts_with("runc")).collect();
    assert_eq!(runc, ["runc checkpoint c1 failed"], "neither paused nor resumed by the dump");
    assert_eq!(h.runtime.container("c1").unwrap().status, "paused", "left as it was found");
    assert_eq!(h.left(), Vec::<String>::new());

    h.runtime.set_failures(Failures::default());
    h.events.lock().unwrap().clear();
    let out = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap();
    let runc: Vec<String> = h.events().into_iter().filter(|e| e.starts_with("runc")).collect();
    assert_eq!(runc, ["runc checkpoint c1 --leave-running", "runc delete c1"]);
    assert_eq!(out.manifest.process.pid, w.pid);
}

#[test]
fn a_stopped_or_missing_container_is_refused_before_anything_runs() {
    let h = Harness::new();
    let (_w, _bundle) = container(&h, "c1", "stopped");
    let err = h.engine.dump(h.dump_request(runc_target(&h, "c1"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::Runc(RuncError::NotRunning { .. })), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let err = h.engine.dump(h.dump_request(runc_target(&h, "nope"), Compression::Zstd, false), &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::Runc(RuncError::NoSuchContainer { .. })), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(h.events(), Vec::<String>::new(), "no hook, no runtime call");
    assert_eq!(h.left(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------------------
// 5. Restores

/// A process checkpoint of a workload that is gone (reaped: its PID is free again).
fn process_checkpoint(h: &Harness, c: Compression) -> (PathBuf, i32) {
    let mut w = Workload::spawn();
    let out = h.dump_process(&w, c, &OpContext::new()).unwrap();
    assert!(killed(&mut w));
    h.events.lock().unwrap().clear();
    (out.path, w.pid)
}

/// A runc checkpoint of container `c1`, deleted since.
fn runc_checkpoint(h: &Harness, c: Compression) -> (PathBuf, i32) {
    let (mut w, _bundle) = container(h, "c1", "running");
    let out = h.engine.dump(h.dump_request(runc_target(h, "c1"), c, false), &OpContext::new()).unwrap();
    assert!(killed(&mut w));
    h.events.lock().unwrap().clear();
    (out.path, w.pid)
}

fn new_container(h: &Harness, id: &str) -> ContainerRestore {
    let bundle = h.tmp.path().join(format!("new-bundle-{id}"));
    std::fs::create_dir_all(&bundle).unwrap();
    ContainerRestore {
        id: id.into(),
        runtime: None,
        root: None,
        flags: RestoreFlags { bundle, detach: true, ..Default::default() },
    }
}

#[test]
fn a_process_checkpoint_goes_to_criu_and_the_after_restore_hook_gets_the_restored_pid() {
    for c in [Compression::None, Compression::Zstd] {
        let h = Harness::new();
        let (path, original) = process_checkpoint(&h, c);
        let out = h.engine.restore(RestoreRequest::new(Source::Path(path)), &OpContext::new()).unwrap();
        assert_eq!(out.manifest.kind, CheckpointKind::Process);
        assert!(is_running(out.pid), "{c}: the restored PID runs");
        assert_eq!(
            h.events(),
            [
                "criu restore".to_string(),
                "hook before-restore None".into(),
                "criu pre-restore -> true".into(),
                format!("criu restored {} (images of {original}, pages intact: true)", out.pid),
                // The tree runs: hooks that hold state (the GPU's) put it back before the restore is done.
                "hook restored None".into(),
                "hook after-restore Some(true)".into(),
            ],
            "{c}"
        );
        let after = h.hook.at(HookPoint::AfterRestore).unwrap();
        assert_eq!((after.pid, after.succeeded, after.kind), (out.pid, Some(true), CheckpointKind::Process));
    }
}

#[test]
fn a_runc_checkpoint_goes_to_the_runtime_with_the_saved_config() {
    for c in [Compression::None, Compression::Zstd] {
        let h = Harness::new();
        let (path, original) = runc_checkpoint(&h, c);
        let container = new_container(&h, "c2");
        let bundle = container.flags.bundle.clone();
        let req = RestoreRequest { container: Some(container), ..RestoreRequest::new(Source::Path(path)) };
        let out = h.engine.restore(req, &OpContext::new()).unwrap();
        assert_eq!(out.manifest.kind, CheckpointKind::Runc);
        let restored = h.runtime.container("c2").expect("restored by the runtime");
        assert_eq!((out.pid, out.exit_code), (restored.pid, Some(0)));
        assert!(!h.saw("criu"), "{c}: CRIU is not driven for a runc checkpoint");
        assert!(
            h.saw(&format!("runc restore c2 {} (images of {original}, pages intact: true)", out.pid)),
            "{c}: {:?}",
            h.events()
        );
        assert_eq!(std::fs::read_to_string(bundle.join("config.json")).unwrap(), CONFIG_JSON, "the checkpoint's config.json");
        let after = h.hook.at(HookPoint::AfterRestore).unwrap();
        assert_eq!((after.pid, after.container_id.as_deref()), (out.pid, Some("c2")));
    }
}

#[test]
fn restoring_only_runc_from_a_process_checkpoint_is_refused_before_anything_runs() {
    let h = Harness::new();
    let (path, _) = process_checkpoint(&h, Compression::Zstd);
    let req = RestoreRequest {
        only: Some(CheckpointKind::Runc),
        container: Some(new_container(&h, "c2")),
        ..RestoreRequest::new(Source::Path(path))
    };
    let err = h.engine.restore(req, &OpContext::new()).unwrap_err();
    assert!(
        matches!(err, EngineError::WrongKind { found: CheckpointKind::Process, wanted: CheckpointKind::Runc, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(h.events(), Vec::<String>::new(), "no hook, no CRIU, no runtime restore");
    assert!(h.runtime.container("c2").is_none());
}

#[test]
fn a_runc_checkpoint_without_a_container_is_refused() {
    let h = Harness::new();
    let (path, _) = runc_checkpoint(&h, Compression::Zstd);
    let err = h.engine.restore(RestoreRequest::new(Source::Path(path)), &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::MissingTarget { kind: CheckpointKind::Runc, .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(h.events(), Vec::<String>::new());
}

#[test]
fn a_corrupted_folder_checkpoint_is_refused_at_pre_restore_and_nothing_is_restored() {
    let h = Harness::new();
    let (path, _) = process_checkpoint(&h, Compression::None);
    let pages = path.join("pages-1.img");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[fakes::PAGES_SIZE / 2] ^= 0x40;
    std::fs::write(&pages, bytes).unwrap();
    let err = h.engine.restore(RestoreRequest::new(Source::Path(path)), &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::Checkpoint(CheckpointError::Corrupt { .. })), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(h.events(), ["criu restore", "criu pre-restore -> false"], "held at pre-restore; no hook, nothing restored");
    h.remove_kept_work_dirs();
}

#[test]
fn a_refusing_before_restore_hook_restores_nothing() {
    let h = Harness::build(|c, _| c, Some(HookPoint::BeforeRestore), None);
    let (path, _) = process_checkpoint(&h, Compression::Zstd);
    let err = h.engine.restore(RestoreRequest::new(Source::Path(path)), &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::Hook(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(h.events(), ["criu restore", "hook before-restore None", "criu pre-restore -> false"]);
    h.remove_kept_work_dirs();
}

#[test]
fn a_cancelled_restore_restores_nothing() {
    for c in [Compression::None, Compression::Zstd] {
        let h = Harness::new();
        let (path, _) = process_checkpoint(&h, c);
        let cancel = Cancel::new();
        cancel.cancel();
        let err = h.engine.restore(RestoreRequest::new(Source::Path(path)), &OpContext::new().with_cancel(cancel)).unwrap_err();
        assert!(matches!(err, EngineError::RestoreCancelled), "{c}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::Cancelled);
        assert!(!h.saw("criu restored") && !h.saw("hook"), "{c}: {:?}", h.events());
    }
}

// ---------------------------------------------------------------------------------------------------------
// 6. Concurrency

#[test]
fn two_dumps_at_once_on_one_engine_each_hold_their_own_process() {
    let h = Harness::new();
    let mut a = Workload::spawn();
    let mut b = Workload::spawn();
    let request = |w: &Workload, name: &str, c| DumpRequest {
        target: TargetSpec::Process { pid: w.pid },
        destination: Destination::dir(h.dir()),
        name: Some(name.into()),
        compression: c,
        leave_running: false,
        options: CriuOptions::default(),
        stream: None,
    };
    let (ra, rb) = std::thread::scope(|s| {
        let ja = s.spawn(|| h.engine.dump(request(&a, "a", Compression::Zstd), &OpContext::new()));
        let jb = s.spawn(|| h.engine.clone().dump(request(&b, "b", Compression::Zstd), &OpContext::new()));
        (ja.join().unwrap(), jb.join().unwrap())
    });
    let (oa, ob) = (ra.unwrap(), rb.unwrap());
    for (out, w) in [(&oa, &mut a), (&ob, &mut b)] {
        assert_eq!(out.manifest.process.pid, w.pid);
        let opened = OpenedCheckpoint::open(&out.path, &h.scratch(), &|_| {}).unwrap();
        assert_eq!(images_of(&opened.images_dir), Some(w.pid), "{}", out.path.display());
        assert!(pages_intact(&opened.images_dir, w.pid), "{}", out.path.display());
        assert!(killed(w));
    }
    assert_eq!(h.left(), ["a.tar.zst", "b.tar.zst"]);
}

// ---------------------------------------------------------------------------------------------------------
// Hooks that run beside CRIU's start-up (the GPU's)

/// A hook that runs beside CRIU at `before-dump` and `before-restore`: it waits (up to 5 s) until the fake
/// CRIU has started, records whether it saw it, takes a while more, and refuses at `refuse`.
struct BesideCriu {
    /// The harness's event log and CRIU, handed over once it is built.
    harness: std::sync::OnceLock<(Events, Arc<FakeCriu>)>,
    refuse: Option<HookPoint>,
}

impl BesideCriu {
    fn events(&self) -> &Events {
        &self.harness.get().expect("the test hands the hook its harness").0
    }

    fn criu_started(&self, point: HookPoint) -> bool {
        let criu = &self.harness.get().expect("the test hands the hook its harness").1;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let seen = match point {
                HookPoint::BeforeDump => !criu.work_dirs().is_empty(),
                _ => snapshot(self.events()).iter().any(|e| e == "criu restore"),
            };
            if seen {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl Hook for BesideCriu {
    fn beside_criu(&self, point: HookPoint) -> bool {
        matches!(point, HookPoint::BeforeDump | HookPoint::BeforeRestore)
    }

    fn run(&self, point: HookPoint, ctx: &HookContext) -> Result<(), hooks::HookError> {
        if !self.beside_criu(point) {
            record(self.events(), format!("beside {} {:?}", point.name(), ctx.succeeded));
            return Ok(());
        }
        let saw = self.criu_started(point);
        std::thread::sleep(Duration::from_millis(30));
        record(self.events(), format!("beside {} saw CRIU started: {saw}", point.name()));
        if self.refuse == Some(point) {
            return Err(hooks::HookError::new(point, "refused beside CRIU by the test"));
        }
        Ok(())
    }
}

fn beside_harness(refuse: Option<HookPoint>) -> Harness {
    let beside = Arc::new(BesideCriu { harness: Default::default(), refuse });
    let h = Harness::build(|c, _| c, None, Some(beside.clone()));
    // One event log for both: the order across the hook and CRIU is what is tested.
    let _ = beside.harness.set((h.events.clone(), h.criu.clone()));
    h
}

#[test]
fn a_hook_that_runs_beside_criu_overlaps_its_start_and_criu_waits_for_it_before_freezing() {
    let h = beside_harness(None);
    let mut w = Workload::spawn();
    let pid = w.pid;
    h.dump_process(&w, Compression::Zstd, &OpContext::new()).unwrap();
    assert!(killed(&mut w));
    assert_eq!(
        h.events(),
        [
            "hook before-dump None".to_string(),
            "beside before-dump saw CRIU started: true".into(),
            format!("criu pre-dump {pid}"),
            format!("criu froze {pid}"),
            format!("criu images {pid}"),
            format!("criu post-dump {pid} -> true"),
            format!("criu killed {pid}"),
            // The reverse of the order they passed: the hook beside CRIU passed last.
            "beside after-dump Some(true)".into(),
            "hook after-dump Some(true)".into(),
        ],
        "the user's kind of hook runs before CRIU; the one beside it while CRIU starts, and CRIU waits for it"
    );
}

#[test]
fn a_refusal_beside_criu_stops_the_dump_before_the_freeze_and_unwinds_the_hooks() {
    let h = beside_harness(Some(HookPoint::BeforeDump));
    let w = Workload::spawn();
    let pid = w.pid;
    let err = h.dump_process(&w, Compression::Zstd, &OpContext::new()).unwrap_err();
    assert!(matches!(err, EngineError::Hook(_)), "{err:?}");
    assert!(err.to_string().contains("refused beside CRIU by the test"), "the refusal, not CRIU's echo of it: {err}");
    assert_eq!(
        h.events(),
        [
            "hook before-dump None".to_string(),
            "beside before-dump saw CRIU started: true".into(),
            "hook after-dump Some(false)".into(),
            format!("criu pre-dump {pid} -> false"),
        ]
    );
    assert_running(&w, "after a refusal at pre-dump");
    assert_eq!(h.left(), Vec::<String>::new());
    assert!(h.criu.work_dirs().iter().all(|d| !d.exists()), "a refusal is not CRIU's failure: no work folder kept");
}

#[test]
fn a_restore_runs_hooks_beside_criu_while_it_starts_and_a_refusal_restores_nothing() {
    for refuse in [false, true] {
        let h = beside_harness(refuse.then_some(HookPoint::BeforeRestore));
        let (path, _) = process_checkpoint(&h, Compression::Zstd);
        let out = h.engine.restore(RestoreRequest::new(Source::Path(path)), &OpContext::new());
        let events = h.events();
        // The user's kind of hook runs at pre-restore, once the checkpoint is verified; the one beside CRIU
        // started with it, and CRIU waits at pre-restore for both.
        let beside = "beside before-restore saw CRIU started: true";
        assert_eq!(events[..3], ["criu restore", "hook before-restore None", beside], "{events:?}");
        if refuse {
            let err = out.unwrap_err();
            assert!(matches!(err, EngineError::Hook(_)), "{err:?}");
            assert!(err.to_string().contains("refused beside CRIU by the test"), "{err}");
            assert_eq!(events[3..5], ["hook after-restore Some(false)", "criu pre-restore -> false"], "{events:?}");
            assert!(!events.iter().any(|e| e.starts_with("criu restored")), "{events:?}");
            h.remove_kept_work_dirs();
        } else {
            let out = out.unwrap();
            assert!(is_running(out.pid));
            assert_eq!(events[3], "criu pre-restore -> true", "{events:?}");
            let after: Vec<&String> = events.iter().filter(|e| e.contains("after-restore")).collect();
            assert_eq!(after, ["beside after-restore Some(true)", "hook after-restore Some(true)"], "{events:?}");
        }
    }
}
