//! Checkpoint-on-stop through a private containerd and our shim: a container annotated
//! `io.cedana.checkpoint-on-stop=DIR` is checkpointed when `ctr task kill` asks it to stop, before the signal,
//! once; a new container annotated `io.cedana.restore=DIR/ID` continues from that checkpoint; a checkpoint that
//! cannot finish within its budget is given up, published as an event, and the stop goes on.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cedana_integration::engines::ShimHost;
use cedana_integration::wait_for;

const RUNTIME: &str = "io.containerd.cedana.v2";
const IMAGE: &str = "docker.io/cedana/on-stop:latest";
const COUNTER: &str = "i=0; while true; do echo $i >> /out/count; i=$((i+1)); sleep 0.1; done";
const T: Duration = Duration::from_secs(30);

fn counts(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("count")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// `ctr run` of `args` in a container `id` of our shim with the output folder mounted at /out and `annotations`.
fn run(s: &ShimHost, id: &str, out: &Path, annotations: &[String], args: &[&str]) {
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let mut cmd = s.d.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--null-io", "--mount", &mount]);
    for a in annotations {
        cmd.args(["--annotation", a]);
    }
    cmd.args([IMAGE, id]).args(args);
    let done = cmd.stdin(Stdio::null()).output().expect("ctr run");
    assert!(done.status.success(), "ctr run {id}: {}", String::from_utf8_lossy(&done.stderr));
    wait_for("the task to be RUNNING", T, || (s.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
}

/// Kill the task with `signal` and wait until it stopped; the time that took.
fn stop(s: &ShimHost, id: &str, signal: &str) -> Duration {
    let t = Instant::now();
    s.d.ok(&["task", "kill", "-s", signal, id]);
    wait_for("the task to stop", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    t.elapsed()
}

fn remove(s: &ShimHost, id: &str) {
    s.d.ok(&["task", "delete", id]);
    s.d.ok(&["container", "rm", id]);
}

#[test]
fn a_stopping_container_is_checkpointed_first_and_a_new_one_continues_from_it() {
    let s = ShimHost::start();
    s.d.import(&s.rootfs, IMAGE);
    let stops = s.tmp.path().join("stops");
    let out = s.tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let id = "on-stop";
    run(&s, id, &out, &[format!("io.cedana.checkpoint-on-stop={}", stops.display())], &["/bin/sh", "-c", COUNTER]);
    wait_for("the counter to count", T, || (counts(&out).len() >= 5).then_some(()));

    // SIGTERM (which the shell, as the container's init, ignores): checkpointed first, running on.
    let events = s.d.ctr_cmd(&["events"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("ctr events");
    // The checkpoint is taken between these two readings of the counter.
    let before_kill = *counts(&out).last().unwrap();
    s.d.ok(&["task", "kill", id]);
    let checkpoint = stops.join(id).join("cedana-checkpoint.tar.zst");
    assert!(checkpoint.is_file(), "the checkpoint is complete when kill returns");
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"), "the checkpoint left the container running");
    let at_checkpoint = *counts(&out).last().unwrap();
    // SIGKILL: stopped, with no second checkpoint.
    let modified = std::fs::metadata(&checkpoint).unwrap().modified().unwrap();
    stop(&s, id, "SIGKILL");
    assert_eq!(std::fs::metadata(&checkpoint).unwrap().modified().unwrap(), modified, "one checkpoint per stop");
    remove(&s, id);
    let published = kill_and_read(events);
    assert!(published.contains("/tasks/checkpoint"), "the checkpoint is published: {published}");

    // A new container restored from it by annotation goes on counting from the checkpoint.
    let before = counts(&out).len();
    let restored = "on-stop-restored";
    let from = format!("io.cedana.restore={}", stops.join(id).display());
    run(&s, restored, &out, &[from], &["/bin/sh", "-c", "echo 1000000 >> /out/count; sleep 100"]);
    wait_for("the restored counter to count", T, || (counts(&out).len() > before + 3).then_some(()));
    let after = counts(&out)[before..].to_vec();
    assert!(
        after[0] > before_kill && after[0] <= at_checkpoint + 1,
        "continued from the checkpoint (taken while the counter went from {before_kill} to {at_checkpoint}): {after:?}"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    stop(&s, restored, "SIGKILL");
    remove(&s, restored);
}

#[test]
fn a_stopping_container_is_checkpointed_into_an_object_store() {
    let moto = cedana_integration::moto::MotoServer::start();
    let s = ShimHost::start_with_env(&moto.env());
    s.d.import(&s.rootfs, IMAGE);
    let out = s.tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let id = "on-stop-s3";
    run(&s, id, &out, &[format!("io.cedana.checkpoint-on-stop={}", moto.url("stops"))], &["/bin/sh", "-c", COUNTER]);
    wait_for("the counter to count", T, || (counts(&out).len() >= 5).then_some(()));
    // The checkpoint is taken during the kill, so after this count (the counter counts on until SIGKILL).
    let at_checkpoint = *counts(&out).last().unwrap();
    s.d.ok(&["task", "kill", id]);
    let key = format!("stops/{id}/cedana-checkpoint.tar.zst");
    assert!(moto.has_object(&key), "the checkpoint is an object of the store once kill returns");
    stop(&s, id, "SIGKILL");
    let last = *counts(&out).last().unwrap();
    remove(&s, id);

    // Restored from the object by annotation, as another node would.
    let before = counts(&out).len();
    let restored = "on-stop-s3-restored";
    let from = format!("io.cedana.restore={}", moto.url(&key));
    run(&s, restored, &out, &[from], &["/bin/sh", "-c", "sleep 100"]);
    wait_for("the restored counter to count", T, || (counts(&out).len() > before + 3).then_some(()));
    let after = counts(&out)[before..].to_vec();
    assert!(after[0] >= at_checkpoint && after[0] <= last + 1, "continued from the checkpoint: {after:?}");
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    stop(&s, restored, "SIGKILL");
    remove(&s, restored);
}

#[test]
fn a_checkpoint_that_exceeds_its_budget_is_given_up_and_the_stop_goes_on() {
    let s = ShimHost::start();
    s.d.import(&s.rootfs, IMAGE);
    let stops = s.tmp.path().join("stops");
    let out = s.tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let id = "on-stop-late";
    let annotations =
        [format!("io.cedana.checkpoint-on-stop={}", stops.display()), "io.cedana.checkpoint-on-stop.budget-ms=1".into()];
    run(&s, id, &out, &annotations, &["/bin/sh", "-c", COUNTER]);
    wait_for("the counter to count", T, || (counts(&out).len() >= 3).then_some(()));
    let events = s.d.ctr_cmd(&["events"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("ctr events");
    let took = stop(&s, id, "SIGKILL");
    assert!(took < Duration::from_secs(10), "the stop went on after the budget: {took:?}");
    let left: Vec<String> = std::fs::read_dir(stops.join(id))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!left.iter().any(|n| n.starts_with("cedana-checkpoint")), "no checkpoint that looks complete: {left:?}");
    remove(&s, id);
    let published = kill_and_read(events);
    assert!(published.contains("/cedana/checkpoint-on-stop/failed"), "the failure is published: {published}");
}

/// What `ctr events` printed so far.
fn kill_and_read(mut events: std::process::Child) -> String {
    std::thread::sleep(Duration::from_millis(300));
    let _ = events.kill();
    let out = events.wait_with_output().expect("ctr events output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
