//! `containerd-shim-cedana-v2` under a private containerd: `ctr run --runtime io.containerd.cedana.v2`
//! detached (running, killed, stopped, deleted, no shim left) and attached (output reaches ctr, exit code).
//! containerd finds the shim on its PATH, which the test extends with the build's target folder.
//! Build first, then run as root:
//! `cargo build -p containerd-shim-cedana-v2 -p cedana-runc && cargo test -p cedana-integration --test shim`.

use std::process::Stdio;
use std::time::Duration;

use cedana_integration::engines::{Containerd, ShimHost as Setup};
use cedana_integration::{target_dir, wait_for};

const RUNTIME: &str = "io.containerd.cedana.v2";
const SHIM: &str = "containerd-shim-cedana-v2";
const T: Duration = Duration::from_secs(30);

fn setup() -> Setup {
    Setup::start()
}

/// PIDs of our shim serving task `id` (its command line has `-id ID`).
fn shim_pids(id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_shim = args.first().is_some_and(|a| a.ends_with(SHIM));
        if is_shim && args.windows(2).any(|w| w[0] == "-id" && w[1] == id) && cedana_integration::alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn detached_container_runs_is_killed_and_deleted_through_the_shim() {
    let s = setup();
    let id = "shim-detached";
    // ctr's `--rootfs` is a switch: the folder is the first argument, after every flag.
    let mut cmd = s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--rootfs"]);
    cmd.arg(&s.rootfs).args([id, "/bin/sh", "-c", "echo hello; sleep 1000"]);
    let out = cmd.stdin(Stdio::null()).output().expect("ctr run");
    assert!(
        out.status.success(),
        "ctr run --detach failed: {}{} (containerd log: {})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.d.dir.join("containerd.log").display()
    );
    wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    assert_eq!(shim_pids(id).len(), 1, "one shim serves the task");
    // The shim drives cedana-runc from beside itself when it was built, else runc.
    let bundle = s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(id);
    let used = std::fs::read_to_string(bundle.join("cedana-runtime")).expect("the shim records its runtime");
    let wrapper = target_dir().join("cedana-runc");
    let expected = if wrapper.is_file() { wrapper.display().to_string() } else { "runc".to_string() };
    assert_eq!(used.trim(), expected);
    let ps = s.d.ok(&["task", "ps", id]);
    assert!(ps.lines().count() >= 2, "ctr task ps lists the init: {ps}");

    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to be STOPPED", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", id]);
    assert_eq!(s.d.task_status(id), None);
    s.d.ok(&["container", "rm", id]);
    wait_for("the shim to exit", T, || shim_pids(id).is_empty().then_some(()));
}

#[test]
fn piped_stdin_reaches_the_container_and_its_end_too() {
    let s = setup();
    let id = "shim-stdin";
    let mut cmd = s.d.ctr_cmd(&["run", "--rm", "--runtime", RUNTIME, "--rootfs"]);
    cmd.arg(&s.rootfs).args([id, "/bin/sh", "-c", "wc -l; echo done"]);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ctr run");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"one\ntwo\nthree\n").unwrap();
    // A container that never sees the end of its input would hang the test: ctr is killed after T instead.
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let ctr = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        if watch.recv_timeout(T).is_err() {
            let _ = nix::sys::signal::kill(ctr, nix::sys::signal::Signal::SIGKILL);
        }
    });
    // Our end of its stdin is closed: the container reads to its end, counts, and exits.
    let out = child.wait_with_output().expect("ctr run");
    let _ = done.send(());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.split_whitespace().collect::<Vec<_>>(), ["3", "done"], "{stdout:?}");
}

#[test]
fn attached_run_gets_the_output_and_the_exit_code() {
    let s = setup();
    let id = "shim-attached";
    let mut cmd = s.d.ctr_cmd(&["run", "--rm", "--runtime", RUNTIME, "--rootfs"]);
    cmd.arg(&s.rootfs).args([id, "/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"]);
    let out = cmd.stdin(Stdio::null()).output().expect("ctr run");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "exit code of the container; stdout {stdout:?}, stderr {stderr:?}");
    assert_eq!(stdout.trim(), "hello");
    assert!(stderr.contains("oops"), "stderr reaches ctr: {stderr:?}");
    assert_eq!(s.d.task_status(id), None);
    wait_for("the shim to exit", T, || shim_pids(id).is_empty().then_some(()));
}

/// The numbers the counter wrote to `/count` in the rootfs of task `pid` (read through /proc).
fn counts(pid: i32) -> Vec<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/root/count")).unwrap_or_default();
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The checkpoint blobs of the content store, as the files of their tar (the folder the shim wrote).
fn checkpoint_blob_files(d: &Containerd) -> Vec<Vec<String>> {
    let ls = d.ok(&["content", "ls"]);
    let mut found = Vec::new();
    // `ctr content ls` shows no media types: list every blob that is a tar.
    for line in ls.lines().skip(1) {
        let Some(digest) = line.split_whitespace().next() else { continue };
        let blob = d.ctr(&["content", "get", digest]);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &blob.stdout).unwrap();
        let list = std::process::Command::new("tar").arg("-tf").arg(tmp.path()).output().unwrap();
        if list.status.success() {
            found.push(String::from_utf8_lossy(&list.stdout).lines().map(str::to_string).collect());
        }
    }
    found
}

const COUNTER: &str = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.1; done";

/// Run the counter through our shim from an imported image, then `ctr task checkpoint` and
/// `ctr container checkpoint --task --rw` it (the client pauses the task, the shim checkpoints through the
/// runtime into containerd's folder, which containerd stores as a checkpoint blob holding our
/// `cedana-checkpoint.*`); the task keeps running.
fn counter_checkpointed(s: &Setup, id: &str) {
    let image = "docker.io/cedana/busybox-shim-cp:latest";
    s.d.import(&s.rootfs, image);
    let out =
        s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--null-io", image, id, "/bin/sh", "-c", COUNTER])
            .stdin(Stdio::null())
            .output()
            .expect("ctr run");
    assert!(out.status.success(), "ctr run: {}", String::from_utf8_lossy(&out.stderr));
    wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    let pid = s.d.task_pid(id);
    wait_for("the counter to count", T, || (counts(pid).len() >= 5).then_some(()));

    // ctr task checkpoint: ctr 1.6 sends no options for a runtime not named io.containerd.runc.* (so
    // --image-path and --exit are not passed on); containerd gives its own folder and stores the result.
    let dir = tempfile::tempdir().unwrap();
    s.d.ok(&["task", "checkpoint", "--image-path", dir.path().to_str().unwrap(), id]);
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"), "the task runs on after the checkpoint");
    let blobs = checkpoint_blob_files(&s.d);
    assert!(
        blobs.iter().any(|files| files.iter().any(|f| f.contains("cedana-checkpoint."))),
        "a checkpoint blob holding our checkpoint: {blobs:?}"
    );

    // ctr container checkpoint --task --rw (v2 CheckpointOptions: file locks, no exit, no image path).
    let reference = "cedana/shim-cp-checkpoint:1";
    s.d.ok(&["container", "checkpoint", "--task", "--rw", id, reference]);
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"), "the task runs on after the checkpoint");
    let n = counts(pid).len();
    wait_for("the counter to go on", T, || (counts(pid).len() > n + 3).then_some(()));
}

#[test]
fn checkpoint_through_ctr_keeps_the_task_running() {
    let s = setup();
    let id = "shim-cp";
    counter_checkpointed(&s, id);
    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to be STOPPED", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", id]);
}

#[test]
fn ctr_container_checkpoint_and_restore_round_trip_through_the_shim() {
    let s = setup();
    let id = "shim-ctr-cr";
    let pid = run_counter_image(&s, "docker.io/cedana/busybox-ctr-cr:latest", id);
    s.d.ok(&["container", "checkpoint", "--task", "--rw", id, "cedana/shim-ctr-cr:1"]);
    let before = counts(pid);
    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to be STOPPED", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", id]);

    // ctr container restore --live --rw: containerd creates the task with the checkpoint (our shim records
    // the restore at Create and restores at Start) and the rw layer the checkpoint kept; the counter goes on
    // from the number it had at the checkpoint, in the file as it was then.
    let restored = "shim-ctr-cr-restored";
    s.d.ok(&["container", "restore", "--live", "--rw", restored, "cedana/shim-ctr-cr:1"]);
    assert_eq!(s.d.task_status(restored).as_deref(), Some("RUNNING"));
    let info = s.d.ok(&["container", "info", restored]);
    assert!(info.contains(RUNTIME), "restored on our shim: {info}");
    let pid = s.d.task_pid(restored);
    wait_for("the restored counter to count", T, || (counts(pid).len() > before.len() + 3).then_some(()));
    let after = counts(pid);
    assert_eq!(after[0], 0, "the rw layer came back with the file: {after:?}");
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "no number lost or repeated: {after:?}");
    s.d.ok(&["task", "kill", "-s", "SIGKILL", restored]);
    wait_for("the restored task to stop", T, || (s.d.task_status(restored).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", restored]);
}

#[test]
fn a_task_with_stdio_fifos_is_checkpointed_and_restored() {
    let s = setup();
    let id = "shim-fifos";
    let image = "docker.io/cedana/busybox-fifos:latest";
    s.d.import(&s.rootfs, image);
    // Without --null-io: containerd gives the task stdin, stdout and stderr FIFOs, which reach it through pipes.
    let out =
        s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", image, id, "/bin/sh", "-c", COUNTER])
            .stdin(Stdio::null())
            .output()
            .unwrap();
    assert!(out.status.success(), "ctr run: {}", String::from_utf8_lossy(&out.stderr));
    wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    let pid = s.d.task_pid(id);
    wait_for("the counter to count", T, || (counts(pid).len() >= 3).then_some(()));
    let fd0 = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    assert!(fd0.to_string_lossy().starts_with("pipe:"), "stdin is a pipe: {fd0:?}");
    s.d.ok(&["container", "checkpoint", "--task", "--rw", id, "cedana/shim-fifos:1"]);
    let before = counts(pid);
    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to be STOPPED", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", id]);
    let restored = "shim-fifos-restored";
    s.d.ok(&["container", "restore", "--live", "--rw", restored, "cedana/shim-fifos:1"]);
    let pid = s.d.task_pid(restored);
    wait_for("the restored counter to count", T, || (counts(pid).len() > before.len() + 3).then_some(()));
    let after = counts(pid);
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "no number lost or repeated: {after:?}");
    s.d.ok(&["task", "kill", "-s", "SIGKILL", restored]);
    wait_for("the restored task to stop", T, || (s.d.task_status(restored).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", restored]);
}

/// Run the counter detached through our shim from an imported image; its init's PID.
fn run_counter_image(s: &Setup, image: &str, id: &str) -> i32 {
    s.d.import(&s.rootfs, image);
    let out =
        s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--null-io", image, id, "/bin/sh", "-c", COUNTER])
            .stdin(Stdio::null())
            .output()
            .expect("ctr run");
    assert!(out.status.success(), "ctr run: {}", String::from_utf8_lossy(&out.stderr));
    wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    let pid = s.d.task_pid(id);
    wait_for("the counter to count", T, || (counts(pid).len() >= 3).then_some(()));
    pid
}

#[test]
fn tasks_survive_a_containerd_restart_and_stay_under_control() {
    let mut s = setup();
    let id = "shim-restart";
    let pid = run_counter_image(&s, "docker.io/cedana/busybox-restart:latest", id);
    let shim = shim_pids(id);
    s.d.restart();
    // containerd reconnects to the shim (its address is in the bundle): same task, same PID, same shim.
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"));
    assert_eq!(s.d.task_pid(id), pid);
    assert_eq!(shim_pids(id), shim, "the same shim serves the task");
    let n = counts(pid).len();
    wait_for("the counter to go on", T, || (counts(pid).len() > n + 2).then_some(()));
    // Calls reach the shim again, and its events reach containerd: pause, resume, checkpoint, kill, delete.
    s.d.ok(&["task", "pause", id]);
    assert_eq!(s.d.task_status(id).as_deref(), Some("PAUSED"));
    s.d.ok(&["task", "resume", id]);
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"));
    s.d.ok(&["task", "checkpoint", id]);
    assert!(
        checkpoint_blob_files(&s.d).iter().any(|files| files.iter().any(|f| f.contains("cedana-checkpoint."))),
        "a checkpoint blob holding our checkpoint"
    );
    s.d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to be STOPPED", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "delete", id]);
    s.d.ok(&["container", "rm", id]);
    wait_for("the shim to exit", T, || shim_pids(id).is_empty().then_some(()));
}

/// Whether anything is mounted at or under `path` (from /proc/self/mountinfo).
fn mounted_under(path: &std::path::Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    info.lines().filter_map(|l| l.split_whitespace().nth(4)).any(|m| m == p || m.starts_with(&format!("{p}/")))
}

#[test]
fn a_shim_killed_with_sigkill_is_cleaned_up_by_containerd() {
    let s = setup();
    let id = "shim-killed";
    let pid = run_counter_image(&s, "docker.io/cedana/busybox-killed:latest", id);
    let bundle = s.d.dir.join("state/io.containerd.runtime.v2.task").join(&s.d.namespace).join(id);
    let runc_state = std::path::Path::new("/run/containerd/runc").join(&s.d.namespace).join(id);
    assert!(mounted_under(&bundle.join("rootfs")), "the rootfs is mounted in the bundle");
    assert!(runc_state.is_dir(), "the runtime keeps its state at {}", runc_state.display());
    let shim = shim_pids(id);
    assert_eq!(shim.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    // containerd sees the shim go, runs `shim delete` (which deletes the container in the runtime, killing its
    // init) and forgets the task.
    wait_for("containerd to clean the task up", T, || {
        (!matches!(s.d.task_status(id).as_deref(), Some("RUNNING" | "PAUSED"))).then_some(())
    });
    wait_for("the init to be gone", T, || (!cedana_integration::alive(pid)).then_some(()));
    wait_for("the runtime's state to be gone", T, || (!runc_state.exists()).then_some(()));
    wait_for("the rootfs to be unmounted", T, || (!mounted_under(&bundle.join("rootfs"))).then_some(()));
    let _ = s.d.ctr(&["task", "delete", id]);
    s.d.ok(&["container", "rm", id]);
    // containerd removes the bundle last, on its own schedule.
    wait_for("the bundle to be removed", T, || (!bundle.exists()).then_some(()));
    assert!(shim_pids(id).is_empty());
}

/// The outcome of one ctr command: exit code, and the class of its error (containerd's words after "ctr: ").
fn outcome(out: &std::process::Output) -> (Option<i32>, String) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let class = ["not found", "already exists", "failed precondition", "unknown", "invalid argument", "not implemented"]
        .iter()
        .find(|c| stderr.contains(*c))
        .map(|c| c.to_string())
        .unwrap_or_default();
    (out.status.code(), class)
}

/// One lifecycle script through `runtime`: the outcomes of its steps, in order.
fn lifecycle(s: &Setup, runtime: &str, id: &str) -> Vec<(String, (Option<i32>, String))> {
    let mut steps = Vec::new();
    let ctr = |args: &[&str]| outcome(&s.d.ctr(args));
    let mut run = s.d.ctr_cmd(&["run", "--runtime", runtime, "--detach", "--null-io", "--rootfs"]);
    run.arg(&s.rootfs).args([id, "/bin/sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.1; done"]);
    let out = run.stdin(Stdio::null()).output().unwrap();
    steps.push(("run".into(), outcome(&out)));
    wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
    steps.push(("kill unknown task".into(), ctr(&["task", "kill", "no-such-task"])));
    steps.push(("delete running task".into(), ctr(&["task", "delete", id])));
    steps.push(("pause".into(), ctr(&["task", "pause", id])));
    steps.push(("pause again".into(), ctr(&["task", "pause", id])));
    steps.push(("resume".into(), ctr(&["task", "resume", id])));
    steps.push(("resume again".into(), ctr(&["task", "resume", id])));
    steps.push(("start again".into(), ctr(&["task", "start", id])));
    // SIGTERM: the trap exits; `ctr task wait` reports how.
    let mut wait = s.d.ctr_cmd(&["task", "wait", id]).stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    steps.push(("kill TERM".into(), ctr(&["task", "kill", "-s", "SIGTERM", id])));
    let status = cedana_integration::engines::wait_child(&mut wait, T);
    steps.push(("wait".into(), (status.code(), String::new())));
    wait_for("the task to be STOPPED", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    steps.push(("kill stopped task".into(), ctr(&["task", "kill", id])));
    steps.push(("exec in stopped task".into(), ctr(&["task", "exec", "--exec-id", "e1", id, "/bin/true"])));
    steps.push(("delete".into(), ctr(&["task", "delete", id])));
    steps.push(("delete again".into(), ctr(&["task", "delete", id])));
    steps.push(("container rm".into(), ctr(&["container", "rm", id])));
    steps
}

#[test]
fn the_same_ctr_lifecycle_gives_the_same_outcomes_as_the_runc_shim() {
    let s = setup();
    let theirs = lifecycle(&s, "io.containerd.runc.v2", "fidelity-runc");
    let ours = lifecycle(&s, RUNTIME, "fidelity-cedana");
    // Deliberate: an illegal transition is FAILED_PRECONDITION in our shim's state machine, where the runc shim
    // lets runc fail and answers UNKNOWN. The exit codes are the same.
    let deliberate = ["pause again", "resume again"];
    for ((step, t), (_, o)) in theirs.iter().zip(&ours) {
        let all = format!("all ours: {ours:?}\nall theirs: {theirs:?}");
        if deliberate.contains(&step.as_str()) {
            assert_eq!((o.0, o.1.as_str(), t.0), (t.0, "failed precondition", Some(1)), "step {step:?}\n{all}");
        } else {
            assert_eq!(o, t, "step {step:?}: ours {o:?}, the runc shim's {t:?}\n{all}");
        }
    }
    // The script does test something: successes and failures both.
    assert!(theirs.iter().any(|(_, (c, _))| *c == Some(0)) && theirs.iter().any(|(_, (c, _))| *c != Some(0)), "{theirs:?}");
    assert_eq!(ours.len(), theirs.len());
}
