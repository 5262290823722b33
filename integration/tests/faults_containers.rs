//! Faults of containers: 100 checkpoint/restore cycles of a runc container (`cedana dump runc` / `cedana
//! restore runc`) with its count verified at each, and SIGKILL of `cedana-runc` (the runtime wrapper
//! containerd and dockerd call) at each phase of a checkpoint and of a restore. After each: the container
//! runs unfrozen (or, for a restore, runs correctly or is absent), no CRIU process, temporary or mount is
//! left, and a later checkpoint works.
//! Run as root: `cargo test -p cedana-integration --test faults_containers -- --test-threads=1`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::images::Bundle;
use cedana_integration::invariants::*;
use cedana_integration::lines::{numbers, Lines};
use cedana_integration::moto::MotoServer;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(20);
const CYCLES: usize = 100;

fn id(name: &str) -> String {
    format!("ced-f-{name}-{}", std::process::id())
}

/// `cedana restore runc --detach` of `checkpoint` as `cid` from `bundle` in `scene`; the restored container's
/// output (its stdio are the restore command's).
fn restore_runc(scene: &Scene, runc: &RuncRoot, checkpoint: &Path, cid: &str, bundle: &Path) -> Lines {
    runc.track(cid);
    let mut cmd = scene.cedana(&["restore", "runc", "--detach", "--id", cid, "--path"]);
    cmd.arg(checkpoint).arg("--bundle").arg(bundle).arg("--root").arg(&runc.root);
    let lines = piped(&mut cmd);
    let status = cmd.status().expect("cedana restore runc");
    assert!(status.success(), "cedana restore runc {cid}: {:?}", lines.snapshot());
    lines
}

/// The container is running, not paused, and its init neither stopped nor traced.
fn assert_container_runs(runc: &RuncRoot, cid: &str, what: &str) {
    let state = runc.state(cid).unwrap_or_else(|| panic!("{what}: container {cid} is gone"));
    assert_eq!(state["status"], "running", "{what}: {state}");
    let pid = state["pid"].as_i64().expect("a running container has a PID") as i32;
    assert!(!frozen_or_traced(pid), "{what}: its init is {:?}", status_field(pid, "State"));
}

#[test]
fn a_container_survives_100_cycles_with_its_count_intact() {
    require_root();
    let scene = Scene::new();
    let runc = RuncRoot::new(scene.root(), "runc");
    let cid = id("cycles");
    let bundle = Bundle::counter(&scene.root().join("bundle"));
    let mut out = runc.run_detached(&bundle.dir, &cid);
    out.wait_for(2, T);
    let dest = scene.dest();
    let started = Instant::now();
    let (mut dumps, mut restores) = (Duration::ZERO, Duration::ZERO);
    // The first number the running container printed (after a restore: the one after the dump's last).
    let mut first: u64 = 0;
    for cycle in 0..CYCLES {
        let name = format!("c{cycle}");
        let t = Instant::now();
        let mut cmd = scene.cedana(&["dump", "runc", &cid, "--root"]);
        cmd.arg(&runc.root).arg("--dir").arg(&dest).args(["--name", &name, "--compression", "lz4"]);
        let dumped = cmd.output().unwrap();
        dumps += t.elapsed();
        assert!(dumped.status.success(), "cycle {cycle}: dump: {}", String::from_utf8_lossy(&dumped.stderr));
        // The dump ends the container: its output closes, and runc forgets it.
        let before = numbers(&out.wait_closed(T));
        assert_eq!(runc.status(&cid), None, "cycle {cycle}: the dumped container must be gone");
        let at_dump = *before.last().expect("output before the dump");
        // Every number once, in order, from where this container began to the dump.
        assert_eq!(before, (first..=at_dump).collect::<Vec<_>>(), "cycle {cycle}: gap or repeat before the dump");
        let path = dest.join(format!("{name}.tar.lz4"));
        let t = Instant::now();
        out = restore_runc(&scene, &runc, &path, &cid, &bundle.dir);
        restores += t.elapsed();
        // It goes on where it stopped, and keeps counting.
        let after = out.wait_numbers(2, T);
        assert_eq!(after[..2], [at_dump + 1, at_dump + 2], "cycle {cycle}: the restored counter must continue from {at_dump}");
        first = at_dump + 1;
        assert_container_runs(&runc, &cid, &format!("cycle {cycle}"));
        std::fs::remove_file(&path).unwrap();
        assert!(entries(&dest).is_empty(), "cycle {cycle}: {:?}", entries(&dest));
        scene.assert_no_criu();
        scene.assert_no_temporaries();
        scene.assert_no_mounts();
    }
    eprintln!("{CYCLES} container cycles in {:?} (dumps {dumps:?}, restores {restores:?})", started.elapsed());
    runc.ok(&["delete", "--force", &cid]);
}

fn sigkill(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// `cedana-runc --root ROOT ARGS` in `scene` (its TMPDIR and scratch folder), with `env`, spawned.
fn spawn_wrapper<V: AsRef<std::ffi::OsStr>>(scene: &Scene, runc: &RuncRoot, args: &[&str], env: &[(&str, V)]) -> Child {
    let mut cmd = std::process::Command::new(bin("cedana-runc"));
    cmd.arg("--root").arg(&runc.root).args(args);
    scene.env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("run cedana-runc")
}

/// A container holding `MIB` MiB with a known checksum (`/bin/memory`), and its first output line.
const MIB: &str = "256";

fn memory_container(scene: &Scene, runc: &RuncRoot, name: &str) -> (Bundle, String, Lines, String) {
    let bundle = Bundle::busybox(&scene.root().join(format!("bundle-{name}")), &["/bin/memory", MIB]);
    cedana_integration::images::add_static_workload(&bundle.rootfs(), "memory");
    let cid = id(name);
    let out = runc.run_detached(&bundle.dir, &cid);
    let sum = out.wait_line("the memory checksum", Duration::from_secs(60), |l| l.starts_with("sum "));
    (bundle, cid, out, sum)
}

/// Ask the memory workload of container `cid` for its checksum again: it must be `sum`.
fn assert_container_memory(runc: &RuncRoot, cid: &str, out: &Lines, sum: &str) {
    let n = out.snapshot().len();
    runc.ok(&["kill", cid, "USR1"]);
    let got = out.wait_for(n + 1, Duration::from_secs(60));
    assert_eq!(got[n], sum, "the container's memory changed");
}

/// Wait until the container is running and unpaused (a guard may still be resuming it); panics otherwise.
fn wait_container_runs(runc: &RuncRoot, cid: &str, what: &str) {
    let deadline = Instant::now() + SETTLE;
    while runc.status(cid).as_deref() != Some("running") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_container_runs(runc, cid, what);
}

/// Where a checkpoint by cedana-runc is killed.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// At a blocking `before-dump` hook: nothing is paused yet.
    BeforeFreezing,
    /// Once CRIU has seized the container's init (the container is paused and frozen).
    Frozen,
    /// While the hidden checkpoint grows (CRIU writes the images, they are packed as they come).
    Writing,
}

/// `cedana-runc checkpoint` of a 256 MiB container, SIGKILLed at `phase`: the container runs on unpaused
/// with its memory; no CRIU process is left; the next checkpoint's start sweeps what was left and works.
fn kill_checkpoint(phase: Phase) {
    require_root();
    let scene = Scene::new();
    let runc = RuncRoot::new(scene.root(), "runc");
    // Ids differ between the tests, which may run at once (runc names the container's cgroups after it).
    let (_bundle, cid, out, sum) = memory_container(&scene, &runc, &format!("kill-{phase:?}").to_lowercase());
    let init = runc.state(&cid).unwrap()["pid"].as_i64().unwrap() as i32;
    let images = scene.dest().join("images");
    let hook = blocking_hook(scene.root(), "before-dump");
    let env: Vec<(&str, &Path)> = match phase {
        Phase::BeforeFreezing => vec![("CEDANA_HOOK_COMMAND", hook.as_path())],
        _ => Vec::new(),
    };
    let args = ["checkpoint", "--image-path", images.to_str().unwrap(), &cid];
    let child = spawn_wrapper(&scene, &runc, &args, &env);
    let started = Instant::now();
    let mut blocked = None;
    match phase {
        Phase::BeforeFreezing => blocked = Some(hook_pid(scene.root())),
        Phase::Frozen => {
            wait_until_seized(init, Duration::from_secs(30));
        }
        Phase::Writing => {
            wait_for_fast("the hidden checkpoint to grow", Duration::from_secs(60), || {
                std::fs::read_dir(&images).ok()?.flatten().find(|e| {
                    e.file_name().to_string_lossy().contains(".partial-")
                        && e.metadata().map(|m| m.len() > 16 << 20).unwrap_or(false)
                })
            });
        }
    }
    sigkill(child.id() as i32);
    eprintln!("{phase:?}: cedana-runc killed after {:?} (container {:?})", started.elapsed(), runc.status(&cid));
    if let Some(h) = blocked {
        sigkill(h);
    }
    let _ = child.wait_with_output();
    scene.assert_no_criu();
    wait_container_runs(&runc, &cid, &format!("{phase:?}"));
    assert_container_memory(&runc, &cid, &out, &sum);
    let visible: Vec<String> = entries(&images).into_iter().filter(|n| !n.starts_with('.')).collect();
    assert!(visible.is_empty(), "{phase:?}: no checkpoint may be visible: {visible:?}");
    // The next checkpoint into that image path (a retry) sweeps what the killed one left, and works.
    let args = ["checkpoint", "--leave-running", "--image-path", images.to_str().unwrap(), &cid];
    let done = spawn_wrapper::<&str>(&scene, &runc, &args, &[]).wait_with_output().unwrap();
    assert!(done.status.success(), "{phase:?}: the next checkpoint: {}", String::from_utf8_lossy(&done.stderr));
    assert!(images.join("cedana-checkpoint.tar.zst").is_file(), "{phase:?}: {:?}", entries(&images));
    for dir in [&images, &scene.tmp()] {
        let left = temporaries(dir);
        assert!(left.is_empty(), "{phase:?}: temporaries left in {}: {left:?}", dir.display());
    }
    scene.assert_no_mounts();
    scene.assert_no_criu();
    wait_container_runs(&runc, &cid, &format!("{phase:?}, after the next checkpoint"));
    runc.ok(&["delete", "--force", &cid]);
}

#[test]
fn killing_cedana_runc_before_it_pauses_leaves_the_container_running() {
    kill_checkpoint(Phase::BeforeFreezing);
}

#[test]
fn killing_cedana_runc_while_criu_holds_the_container_leaves_it_running() {
    kill_checkpoint(Phase::Frozen);
}

#[test]
fn killing_cedana_runc_while_the_checkpoint_is_written_leaves_the_container_running() {
    kill_checkpoint(Phase::Writing);
}

/// `cedana-runc checkpoint --image-path s3://...` of a 256 MiB container, SIGKILLed while its parts are
/// uploaded to moto: the container runs on unpaused with its memory, no object appears, and the next
/// checkpoint's start aborts the upload the killed one left pending.
#[test]
fn killing_cedana_runc_while_it_uploads_leaves_the_container_running_and_no_object() {
    require_root();
    let scene = Scene::new();
    let runc = RuncRoot::new(scene.root(), "runc");
    let moto = MotoServer::start();
    let (_bundle, cid, out, sum) = memory_container(&scene, &runc, "kill-upload");
    let mut env = moto.env();
    env.push(("CEDANA_CHECKPOINT_COMPRESSION", "lz4".into()));
    let spawn = |prefix: &str| {
        let args = ["checkpoint", "--leave-running", "--image-path", &moto.url(prefix), &cid];
        spawn_wrapper(&scene, &runc, &args, &env)
    };
    let child = spawn("kill");
    wait_for("a part upload", Duration::from_secs(60), || moto.log().contains("partNumber=").then_some(()));
    sigkill(child.id() as i32);
    let _ = child.wait_with_output();
    scene.assert_no_criu();
    wait_container_runs(&runc, &cid, "after a kill mid-upload");
    assert_container_memory(&runc, &cid, &out, &sum);
    assert!(!moto.has_object("kill/cedana-checkpoint.tar.lz4"), "no object may appear");
    assert_eq!(moto.pending_uploads().len(), 1, "the killed upload is left pending: {:?}", moto.pending_uploads());
    // The next checkpoint (to another prefix) aborts it at its start, and completes its own.
    let done = spawn("next").wait_with_output().unwrap();
    assert!(done.status.success(), "the next checkpoint: {}", String::from_utf8_lossy(&done.stderr));
    assert!(moto.has_object("next/cedana-checkpoint.tar.lz4"));
    assert!(moto.pending_uploads().is_empty(), "pending: {:?}", moto.pending_uploads());
    assert!(!moto.has_object("kill/cedana-checkpoint.tar.lz4"));
    let left = temporaries(&scene.tmp());
    assert!(left.is_empty(), "temporaries left: {left:?}");
    scene.assert_no_mounts();
    wait_container_runs(&runc, &cid, "after the next checkpoint");
    runc.ok(&["delete", "--force", &cid]);
}

/// Where a restore by cedana-runc is killed.
#[derive(Debug, Clone, Copy)]
enum RestorePhase {
    /// At a blocking `before-restore` hook.
    BeforeCriu,
    /// While the CRIU that runc runs restores the container.
    Restoring,
}

/// Checkpoint a 256 MiB container with cedana-runc (it ends), restore it with `cedana-runc restore
/// --detach`, SIGKILL cedana-runc at `phase`: the container is then absent, or running with its memory; no
/// CRIU process is left; a restore afterwards works and leaves no temporary.
fn kill_restore(phase: RestorePhase) {
    require_root();
    let scene = Scene::new();
    let runc = RuncRoot::new(scene.root(), "runc");
    let name = format!("rkill-{phase:?}").to_lowercase();
    let (bundle, cid, out, sum) = memory_container(&scene, &runc, &name);
    let images = scene.dest().join("images");
    let args = ["checkpoint", "--image-path", images.to_str().unwrap(), &cid];
    let done = spawn_wrapper::<&str>(&scene, &runc, &args, &[]).wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    out.wait_closed(T);
    let restored = id(&format!("{name}-restored"));
    runc.track(&restored);
    let hook = blocking_hook(scene.root(), "before-restore");
    let env: Vec<(&str, &Path)> = match phase {
        RestorePhase::BeforeCriu => vec![("CEDANA_HOOK_COMMAND", hook.as_path())],
        RestorePhase::Restoring => Vec::new(),
    };
    let restore_args = |cid: &str| -> Vec<String> {
        ["restore", "--image-path", images.to_str().unwrap(), "--detach", "--bundle", bundle.dir.to_str().unwrap(), cid]
            .map(str::to_string)
            .to_vec()
    };
    let args = restore_args(&restored);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The restored container's stdio are cedana-runc's: a pipe read here.
    let mut cmd = std::process::Command::new(bin("cedana-runc"));
    cmd.arg("--root").arg(&runc.root).args(&args);
    scene.env(&mut cmd);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let restored_out = piped(&mut cmd);
    let mut child = cmd.spawn().expect("run cedana-runc");
    let mut blocked = None;
    match phase {
        RestorePhase::BeforeCriu => blocked = Some(hook_pid(scene.root())),
        RestorePhase::Restoring => {
            wait_for_fast("CRIU to restore", Duration::from_secs(60), || scene.criu_processes().first().copied());
        }
    }
    sigkill(child.id() as i32);
    if let Some(h) = blocked {
        sigkill(h);
    }
    let _ = child.wait();
    scene.assert_no_criu();
    // Either absent, or running with its memory.
    let deadline = Instant::now() + SETTLE;
    while !matches!(runc.status(&restored).as_deref(), None | Some("running")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    match runc.status(&restored).as_deref() {
        None => eprintln!("{phase:?}: nothing restored"),
        Some("running") => {
            eprintln!("{phase:?}: the restore went through");
            assert_container_runs(&runc, &restored, &format!("{phase:?}"));
            assert_container_memory(&runc, &restored, &restored_out, &sum);
            runc.ok(&["delete", "--force", &restored]);
        }
        Some(other) => panic!("{phase:?}: the restored container is left {other}"),
    }
    // A restore afterwards works, and the start sweeps what the killed one left.
    let again = id(&format!("{name}-again"));
    runc.track(&again);
    let args = restore_args(&again);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = std::process::Command::new(bin("cedana-runc"));
    cmd.arg("--root").arg(&runc.root).args(&args);
    scene.env(&mut cmd);
    let again_out = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{phase:?}: the next restore: {:?}", again_out.snapshot());
    assert_container_runs(&runc, &again, &format!("{phase:?}, the next restore"));
    assert_container_memory(&runc, &again, &again_out, &sum);
    for dir in [&images, &scene.tmp()] {
        let left = temporaries(dir);
        assert!(left.is_empty(), "{phase:?}: temporaries left in {}: {left:?}", dir.display());
    }
    scene.assert_no_mounts();
    runc.ok(&["delete", "--force", &again]);
}

#[test]
fn killing_cedana_runc_before_criu_restores_restores_nothing() {
    kill_restore(RestorePhase::BeforeCriu);
}

#[test]
fn killing_cedana_runc_mid_restore_leaves_the_container_whole_or_absent() {
    kill_restore(RestorePhase::Restoring);
}

/// PIDs of our shim serving task `id` (its command line has `-id ID`).
fn shim_pids(id: &str) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let shim = args.first().is_some_and(|a| a.ends_with("containerd-shim-cedana-v2"));
            shim && args.windows(2).any(|w| w[0] == "-id" && w[1] == id) && alive(*pid)
        })
        .collect()
}

/// Whether anything is mounted at or under `path`.
fn mounted_under(path: &Path) -> bool {
    !mounts_under(path).is_empty()
}

#[test]
fn killing_the_shim_mid_checkpoint_leaves_nothing_frozen_and_a_later_checkpoint_works() {
    kill_shim_mid_checkpoint(Phase::Frozen);
}

#[test]
fn killing_the_shim_before_its_checkpoint_freezes_leaves_nothing_frozen_and_a_later_checkpoint_works() {
    kill_shim_mid_checkpoint(Phase::BeforeFreezing);
}

#[test]
fn killing_the_shim_while_its_checkpoint_is_written_leaves_no_checkpoint_that_looks_complete() {
    kill_shim_mid_checkpoint(Phase::Writing);
}

/// SIGKILL of our shim during `ctr task checkpoint` at `phase`: while cedana-runc waits at a blocking
/// `before-dump` hook (nothing is frozen yet), while CRIU holds the task's init, or while the hidden
/// checkpoint grows in the image path.
fn kill_shim_mid_checkpoint(phase: Phase) {
    use cedana_integration::engines::ShimHost;
    const RUNTIME: &str = "io.containerd.cedana.v2";
    // containerd passes its environment to its shims, and they to cedana-runc: the hook reaches the checkpoint.
    let hooks = tempfile::tempdir().unwrap();
    let hook = blocking_hook(hooks.path(), "before-dump");
    // containerd makes the folder a checkpoint is written into (`ctd-checkpoint*`) in its TMPDIR: a private one.
    let ctd_tmp = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, String)> = vec![("TMPDIR", ctd_tmp.path().display().to_string())];
    if matches!(phase, Phase::BeforeFreezing) {
        env.push(("CEDANA_HOOK_COMMAND", hook.display().to_string()));
    }
    let s = ShimHost::start_with_env(&env);
    cedana_integration::images::add_static_workload(&s.rootfs, "memory");
    let name = match phase {
        Phase::BeforeFreezing => "shim-kill-early",
        Phase::Frozen => "shim-kill",
        Phase::Writing => "shim-kill-writing",
    };
    let image = format!("docker.io/cedana/busybox-{name}:latest");
    let image = image.as_str();
    s.d.import(&s.rootfs, image);
    let run = |id: &str| {
        let out =
            s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--null-io", image, id, "/bin/memory", MIB])
                .stdin(Stdio::null())
                .output()
                .expect("ctr run");
        assert!(out.status.success(), "ctr run {id}: {}", String::from_utf8_lossy(&out.stderr));
        wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
        let pid = s.d.task_pid(id);
        // The workload has filled its memory once it waits for signals (sleeping).
        wait_for("the workload to fill its memory", Duration::from_secs(60), || {
            (status_field(pid, "State").is_some_and(|st| st.starts_with('S'))).then_some(())
        });
        pid
    };
    let id = name;
    let pid = run(id);
    let bundle = s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(id);
    let shim = shim_pids(id);
    assert_eq!(shim.len(), 1, "one shim serves the task");
    let checkpoint_images = || s.d.ok(&["image", "ls", "-q"]).lines().filter(|l| l.contains("checkpoint")).count();
    assert_eq!(checkpoint_images(), 0);
    let mut checkpoint =
        s.d.ctr_cmd(&["task", "checkpoint", id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr task checkpoint");
    match phase {
        Phase::BeforeFreezing => {
            // cedana-runc waits at its hook: nothing is frozen yet. The hook ends once the shim is gone.
            let blocked = hook_pid(hooks.path());
            assert!(!frozen_or_traced(pid), "nothing is frozen before the hook returns");
            sigkill(shim[0]);
            sigkill(blocked);
        }
        Phase::Frozen | Phase::Writing => {
            // Mid-checkpoint: the CRIU that cedana-runc's runc runs holds the task's init.
            let criu = wait_until_seized(pid, Duration::from_secs(60));
            assert!(is_criu(criu), "the init's tracer is CRIU");
            if matches!(phase, Phase::Writing) {
                // The hidden checkpoint in containerd's folder grows as CRIU writes the images.
                wait_for_fast("the hidden checkpoint to grow", Duration::from_secs(60), || {
                    let folders = std::fs::read_dir(ctd_tmp.path()).ok()?.flatten();
                    folders.flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten()).find(|e| {
                        e.file_name().to_string_lossy().contains(".partial-")
                            && e.metadata().map(|m| m.len() > 16 << 20).unwrap_or(false)
                    })
                });
            }
            sigkill(shim[0]);
            let gone = wait_for_value_or(SETTLE, || !alive(criu));
            assert!(gone, "the CRIU of the checkpoint is left: {:?}", status_field(criu, "State"));
        }
    }
    let status = cedana_integration::engines::wait_child(&mut checkpoint, Duration::from_secs(60));
    assert!(!status.success(), "a checkpoint whose shim was killed cannot succeed");
    // No checkpoint image was made, and containerd removes the folder the checkpoint was written into.
    assert_eq!(checkpoint_images(), 0, "{phase:?}: a failed checkpoint made an image");
    let checkpoint_folders = || entries(ctd_tmp.path()).into_iter().filter(|n| n.starts_with("ctd-checkpoint")).count();
    let settled = wait_for_value_or(SETTLE, || checkpoint_folders() == 0);
    assert!(settled, "{phase:?}: containerd's checkpoint folder is left: {:?}", entries(ctd_tmp.path()));
    // containerd sees the shim go and cleans its task up (`shim delete`: the container is deleted); nothing
    // may be left frozen, running CRIU, or mounted.
    wait_for("no CRIU of the checkpoint", SETTLE, || criu_processes_under(&bundle).is_empty().then_some(()));
    wait_for("containerd to clean the task up", SETTLE, || {
        (!matches!(s.d.task_status(id).as_deref(), Some("RUNNING" | "PAUSED"))).then_some(())
    });
    wait_for("the init to be gone", SETTLE, || (!alive(pid)).then_some(()));
    wait_for("the rootfs to be unmounted", SETTLE, || (!mounted_under(&bundle.join("rootfs"))).then_some(()));
    let _ = s.d.ctr(&["task", "delete", id]);
    s.d.ok(&["container", "rm", id]);
    // A later task from the same image runs, and its checkpoint works (it runs on); the hook lets it pass.
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    let again = format!("{name}-again");
    let again = again.as_str();
    let pid = run(again);
    s.d.ok(&["task", "checkpoint", again]);
    assert_eq!(checkpoint_images(), 1, "{phase:?}: the later checkpoint made its image");
    // cedana-runc inherits containerd's TMPDIR: CRIU's work folder of the killed dump is either kept there
    // with its log for the user (marked `.kept`), or swept by the later checkpoint's start once the killed
    // cedana-runc is gone; nothing else may be left.
    let left = temporaries(ctd_tmp.path());
    assert!(left.is_empty(), "{phase:?}: temporaries left: {left:?}");
    assert_eq!(s.d.task_status(again).as_deref(), Some("RUNNING"), "the task runs on after the checkpoint");
    assert!(!frozen_or_traced(pid));
    s.d.ok(&["task", "kill", "-s", "SIGKILL", again]);
    wait_for("the task to be STOPPED", T, || (s.d.task_status(again).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", again]);
}
