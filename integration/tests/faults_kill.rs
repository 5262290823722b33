//! SIGKILL of each actor at each phase of a dump and of a restore of a process: the `cedana` command and
//! the CRIU child it runs; before freezing, while frozen, while writing and compressing, while uploading.
//! After each: the workload runs unfrozen with its memory (or, for a restore, runs correctly or is absent),
//! no CRIU process is left, and the next command's start removes what the killed one left (hidden
//! checkpoints, reserves, staging and work folders), leaving no temporary and no incomplete checkpoint.
//!
//! Phases are found by what can be observed, never by sleeping: a `before-dump` / `before-restore` hook
//! that blocks (before freezing), the workload's TracerPid (CRIU has seized it: frozen), the hidden
//! checkpoint growing (writing, compressing), moto's log of part uploads (uploading).

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::invariants::*;
use cedana_integration::moto::MotoServer;
use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// MiB of memory of the workload: enough for each phase to last long enough to be caught.
const MIB: &str = "256";

fn sigkill(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Wait for `child` and return its stderr (it was killed, or failed).
fn finished(child: Child) -> String {
    let out = child.wait_with_output().expect("wait for cedana");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A hidden checkpoint (`.NAME.partial-PID`, a file or a folder) in `dir` holding more than `bytes`.
fn wait_for_hidden_checkpoint(dir: &Path, bytes: u64) {
    wait_for_fast("the hidden checkpoint to grow", Duration::from_secs(60), || {
        std::fs::read_dir(dir).ok()?.flatten().find(|e| {
            e.file_name().to_string_lossy().contains(".partial-")
                && e.metadata()
                    .map(|m| if m.is_dir() { cedana::engine::dump::disk_size(&e.path()) } else { m.len() } > bytes)
                    .unwrap_or(false)
        })
    });
}

/// The CRIU process of `scene` (waiting until there is one).
fn criu_of(scene: &Scene) -> i32 {
    wait_for_fast("CRIU to run", Duration::from_secs(30), || scene.criu_processes().first().copied())
}

/// Where a dump is killed, and who is.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// At the blocking `before-dump` hook: nothing is frozen yet.
    BeforeFreezing,
    /// As soon as CRIU has seized the workload.
    Frozen,
    /// While the hidden checkpoint grows.
    Writing,
}

#[derive(Debug, Clone, Copy)]
enum Victim {
    Cli,
    Criu,
}

/// One dump of the memory workload into `scene`'s destination (with `flags`), killed at `phase`; then
/// every invariant; then the next command's start must sweep what was left, and a dump must work.
fn kill_dump(phase: Phase, victim: Victim, flags: &[&str]) {
    require_root();
    let scene = Scene::new();
    let w = Workload::start(&workload_bin("memory"), &[MIB], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let dest = scene.dest();
    let mut cmd = scene
        .cedana(&[&["dump", "process", &pid, "--no-server", "--dir", dest.to_str().unwrap(), "--name", "k"][..], flags].concat());
    if let Phase::BeforeFreezing = phase {
        cmd.env("CEDANA_HOOK_COMMAND", blocking_hook(scene.root(), "before-dump"));
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let cli = child.id() as i32;
    let started = Instant::now();
    let mut hook = None;
    match phase {
        Phase::BeforeFreezing => hook = Some(hook_pid(scene.root())),
        Phase::Frozen => {
            wait_until_seized(w.pid, Duration::from_secs(30));
        }
        Phase::Writing => wait_for_hidden_checkpoint(&dest, 16 << 20),
    }
    match victim {
        Victim::Cli => sigkill(cli),
        Victim::Criu => {
            assert!(!matches!(phase, Phase::BeforeFreezing), "no CRIU runs before freezing");
            sigkill(criu_of(&scene));
        }
    }
    eprintln!("{phase:?}/{victim:?} {flags:?}: killed after {:?}", started.elapsed());
    if let Some(h) = hook {
        sigkill(h);
    }
    let stderr = finished(child);
    if let Victim::Criu = victim {
        assert!(stderr.contains("criu") || stderr.contains("CRIU"), "the error names CRIU: {stderr}");
    }
    scene.assert_no_criu();
    assert_running_unfrozen(w.pid);
    assert_memory_intact(w.pid, &w.log, &sum);
    let visible: Vec<String> = entries(&dest).into_iter().filter(|n| !n.starts_with('.')).collect();
    assert!(visible.is_empty(), "no checkpoint may be visible: {visible:?}");
    // The next start sweeps what the killed command left; its dump works.
    let out = scene
        .cedana(&["dump", "process", &pid, "--no-server", "--dir", dest.to_str().unwrap(), "--name", "next", "--leave-running"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the next dump: {}", String::from_utf8_lossy(&out.stderr));
    scene.assert_no_temporaries();
    scene.assert_no_mounts();
    scene.assert_no_criu();
    assert_eq!(entries(&dest), ["next.tar"], "only the next dump's checkpoint");
    assert_running_unfrozen(w.pid);
}

#[test]
fn killing_the_cli_before_freezing_leaves_the_workload_untouched() {
    kill_dump(Phase::BeforeFreezing, Victim::Cli, &[]);
}

#[test]
fn killing_the_cli_while_criu_holds_the_workload_frozen() {
    // A folder: CRIU (swrk) writes the images itself, the command waits for its notification.
    kill_dump(Phase::Frozen, Victim::Cli, &["--compression", "none"]);
    // Streamed: CRIU's images go through the command's pipes.
    kill_dump(Phase::Frozen, Victim::Cli, &["--compression", "lz4"]);
}

#[test]
fn killing_the_cli_while_the_checkpoint_is_written_and_compressed() {
    // Streamed through gzip (slow: the compressor is the bottleneck).
    kill_dump(Phase::Writing, Victim::Cli, &["--compression", "gzip"]);
    // CRIU's files packed and compressed as they grow.
    kill_dump(Phase::Writing, Victim::Cli, &["--compression", "zstd", "--no-stream"]);
    // A folder written in place.
    kill_dump(Phase::Writing, Victim::Cli, &["--compression", "none"]);
}

#[test]
fn killing_criu_while_it_holds_the_workload_frozen() {
    kill_dump(Phase::Frozen, Victim::Criu, &["--compression", "none"]);
    kill_dump(Phase::Frozen, Victim::Criu, &["--compression", "lz4"]);
}

#[test]
fn killing_criu_while_the_checkpoint_is_written() {
    kill_dump(Phase::Writing, Victim::Criu, &["--compression", "gzip"]);
    kill_dump(Phase::Writing, Victim::Criu, &["--compression", "none"]);
}

/// A dump to moto killed while its parts are uploaded: the workload runs on, and no object appears.
fn kill_upload(victim: Victim) {
    require_root();
    let scene = Scene::new();
    let moto = MotoServer::start();
    let w = Workload::start(&workload_bin("memory"), &[MIB], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let prefix = moto.url("kill");
    let mut cmd =
        scene.cedana(&["dump", "process", &pid, "--no-server", "--dir", &prefix, "--name", "k", "--compression", "gzip"]);
    cmd.envs(moto.env());
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a part upload", Duration::from_secs(60), || moto.log().contains("partNumber=").then_some(()));
    match victim {
        Victim::Cli => sigkill(child.id() as i32),
        Victim::Criu => sigkill(criu_of(&scene)),
    }
    let stderr = finished(child);
    scene.assert_no_criu();
    assert_running_unfrozen(w.pid);
    assert_memory_intact(w.pid, &w.log, &sum);
    assert!(!moto.has_object("kill/k.tar.gz"), "no object may appear: {stderr}");
    // The next start aborts the upload the killed command left pending.
    let mut next = scene.cedana(&[
        "dump",
        "process",
        &pid,
        "--no-server",
        "--dir",
        &moto.url("next"),
        "--leave-running",
        "--compression",
        "lz4",
    ]);
    let out = next.envs(moto.env()).output().unwrap();
    assert!(out.status.success(), "the next dump: {}", String::from_utf8_lossy(&out.stderr));
    assert_store_clean(&moto, "kill/");
    scene.assert_no_temporaries();
}

#[test]
fn killing_the_cli_while_uploading_leaves_no_object_and_no_pending_upload() {
    kill_upload(Victim::Cli);
}

#[test]
fn killing_criu_while_uploading_leaves_no_object_and_no_pending_upload() {
    kill_upload(Victim::Criu);
}

/// Where a restore is killed.
#[derive(Debug, Clone, Copy)]
enum RestorePhase {
    /// At the blocking `before-restore` hook.
    BeforeCriu,
    /// Once the restored tree exists (CRIU holds it until its memory is loaded and verified).
    Restoring,
}

/// Dump the memory workload (it exits), restore it, kill `victim` at `phase`: the workload is then either
/// absent or running with its memory, and a restore afterwards works.
fn kill_restore(phase: RestorePhase, victim: Victim, flags: &[&str]) {
    require_root();
    let scene = Scene::new();
    let mut w = Workload::start(&workload_bin("memory"), &[MIB], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let dest = scene.dest();
    let out = scene.dump(w.pid, dest.to_str().unwrap(), "r", "lz4").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.reap();
    let path = dest.join("r.tar.lz4");
    // A restored workload writes on at its offset of dump time: the log is cut back there before each restore.
    let rewind = || std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
    let mut cmd = scene.cedana(&[&["restore", "process", "--path", path.to_str().unwrap()][..], flags].concat());
    if let RestorePhase::BeforeCriu = phase {
        cmd.env("CEDANA_HOOK_COMMAND", blocking_hook(scene.root(), "before-restore"));
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut hook = None;
    match phase {
        RestorePhase::BeforeCriu => hook = Some(hook_pid(scene.root())),
        RestorePhase::Restoring => {
            wait_for_fast("the restored tree", Duration::from_secs(60), || alive(w.pid).then_some(()));
        }
    }
    match victim {
        Victim::Cli => sigkill(child.id() as i32),
        Victim::Criu => sigkill(criu_of(&scene)),
    }
    if let Some(h) = hook {
        sigkill(h);
    }
    let stderr = finished(child);
    scene.assert_no_criu();
    // Either absent, or running correctly: never half-restored.
    if alive(w.pid) && exiting(w.pid) {
        // Killed by CRIU as the restore failed: it must be gone once its teardown is over.
        let since = Instant::now();
        let gone = wait_for_value_or(Duration::from_secs(120), || !alive(w.pid));
        eprintln!("{phase:?}/{victim:?} {flags:?}: the restored tree was exiting; gone: {gone} after {:?}", since.elapsed());
        assert!(gone, "a restored tree killed mid-restore never finished exiting: {:?}", status_field(w.pid, "State"));
    }
    let settled = wait_for_value_or(Duration::from_secs(30), || !alive(w.pid) || !frozen_or_traced(w.pid));
    assert!(settled, "the restored tree is left stopped: {:?}", status_field(w.pid, "State"));
    if alive(w.pid) {
        eprintln!("{phase:?}/{victim:?} {flags:?}: the restore went through ({:?})", status_field(w.pid, "State"));
        assert_memory_intact(w.pid, &w.log, &sum);
        sigkill(w.pid);
        wait_for("the restored workload to go", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    } else {
        eprintln!("{phase:?}/{victim:?}: nothing restored ({})", stderr.lines().last().unwrap_or_default());
    }
    // The next restore sweeps what was left and works.
    rewind();
    let out = scene.cedana(&["restore", "process", "--path", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "the next restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_memory_intact(w.pid, &w.log, &sum);
    scene.assert_no_temporaries();
    scene.assert_no_mounts();
    sigkill(w.pid);
}

#[test]
fn killing_the_cli_before_criu_restores_restores_nothing() {
    kill_restore(RestorePhase::BeforeCriu, Victim::Cli, &[]);
}

#[test]
fn killing_the_cli_mid_restore_leaves_nothing_half_restored() {
    kill_restore(RestorePhase::Restoring, Victim::Cli, &[]);
}

#[test]
fn killing_the_cli_mid_restore_from_files_leaves_nothing_half_restored() {
    kill_restore(RestorePhase::Restoring, Victim::Cli, &["--no-stream"]);
}

#[test]
fn killing_criu_mid_restore_leaves_nothing_half_restored() {
    kill_restore(RestorePhase::Restoring, Victim::Criu, &[]);
    kill_restore(RestorePhase::Restoring, Victim::Criu, &["--no-stream"]);
}

/// Where a lazy restore is killed.
#[derive(Debug, Clone, Copy)]
enum LazyPhase {
    /// Its images folder (`.cedana-lazy-PID-*`) exists: the checkpoint is opened, CRIU not yet done.
    Opened,
    /// The restored tree runs while its memory is still arriving.
    Serving,
}

/// A lazy restore (`restore process --lazy`) of the memory workload killed at `phase`: the workload is
/// absent or runs with its memory, and the next start removes the lazy restore's images folder (named after
/// the killed command) and restores normally.
fn kill_lazy_restore(phase: LazyPhase) {
    require_root();
    let scene = Scene::new();
    let mut w = Workload::start(&workload_bin("memory"), &[MIB], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let dest = scene.dest();
    let out = scene.dump(w.pid, dest.to_str().unwrap(), "lazy", "lz4").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.reap();
    wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    let path = dest.join("lazy.tar.lz4");
    let rewind = || std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
    rewind();
    let child = scene
        .cedana(&["restore", "process", "--path", path.to_str().unwrap(), "--lazy"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cli = child.id() as i32;
    let folder = format!(".cedana-lazy-{cli}-");
    match phase {
        LazyPhase::Opened => wait_for_fast("the lazy restore's folder", Duration::from_secs(60), || {
            entries(&scene.tmp()).into_iter().find(|n| n.starts_with(&folder))
        }),
        LazyPhase::Serving => {
            wait_for_fast("the restored tree", Duration::from_secs(60), || alive(w.pid).then_some(()));
            entries(&scene.tmp()).into_iter().find(|n| n.starts_with(&folder)).expect("the folder is named after its owner")
        }
    };
    sigkill(cli);
    let stderr = finished(child);
    scene.assert_no_criu();
    let left: Vec<String> = entries(&scene.tmp()).into_iter().filter(|n| n.starts_with(&folder)).collect();
    eprintln!("{phase:?}: left by the killed restore: {left:?}");
    // Either absent, or running with its memory.
    let settled = wait_for_value_or(Duration::from_secs(60), || !alive(w.pid) || !frozen_or_traced(w.pid));
    assert!(settled, "the restored tree is left stopped: {:?}", status_field(w.pid, "State"));
    if alive(w.pid) {
        eprintln!("{phase:?}: the restored tree runs on ({:?})", status_field(w.pid, "State"));
        assert_memory_intact(w.pid, &w.log, &sum);
        sigkill(w.pid);
        wait_for("the restored workload to go", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    } else {
        eprintln!("{phase:?}: nothing restored ({})", stderr.lines().last().unwrap_or_default());
    }
    // The next start removes the killed command's folder, and its restore works.
    rewind();
    let out = scene.cedana(&["restore", "process", "--path", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "the next restore: {}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<String> = entries(&scene.tmp()).into_iter().filter(|n| n.starts_with(&folder)).collect();
    assert!(left.is_empty(), "the next start must remove the killed lazy restore's folder: {left:?}");
    assert_memory_intact(w.pid, &w.log, &sum);
    scene.assert_no_temporaries();
    scene.assert_no_mounts();
    sigkill(w.pid);
}

#[test]
fn killing_a_lazy_restore_leaves_its_folder_to_the_next_start() {
    kill_lazy_restore(LazyPhase::Opened);
    kill_lazy_restore(LazyPhase::Serving);
}
