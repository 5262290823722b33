//! `docker run --runtime cedana` against a private dockerd started by the test (experimental mode, its own
//! containerd, state under a temporary folder), with an image imported from a local busybox rootfs.
//! Run as root: `cargo test -p cedana-integration --test docker_runtime -- --test-threads=1`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cedana_integration::engines::{piped, Dockerd, RuncRoot};
use cedana_integration::images::{busybox_rootfs, COUNTER};
use cedana_integration::{bin, cedana_ok, require_root, wait_for};

const IMAGE: &str = "cedana-test/busybox:1";
const T: Duration = Duration::from_secs(30);

fn daemon(tmp: &Path) -> Dockerd {
    require_root();
    let d = Dockerd::start(&tmp.join("docker"), &[("cedana", &bin("cedana-runc"))]);
    d.import(&busybox_rootfs(&tmp.join("rootfs")), IMAGE);
    d
}

/// Start the counter under `runtime`, and wait until it has printed `n` numbers.
fn counter(d: &Dockerd, name: &str, runtime: &str, n: usize) -> String {
    let id = d.ok(&["run", "-d", "--runtime", runtime, "--name", name, IMAGE, "sh", "-c", COUNTER]);
    wait_for(&format!("{n} numbers from {name}"), T, || (d.log_numbers(name).len() >= n).then_some(()));
    id
}

/// The counter's log must be 0, 1, 2, ... with no gap and no restart.
fn assert_consecutive(numbers: &[u64], what: &str) {
    let expected: Vec<u64> = (0..numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "{what}: the counter must continue without a gap or restart");
}

fn checkpoint_dir(d: &Dockerd, id: &str, name: &str) -> PathBuf {
    d.data_root.join("containers").join(id).join("checkpoints").join(name)
}

/// `docker start --checkpoint CP NAME`. Docker uploads the checkpoint folder to its containerd's content store,
/// where the identical blob of `docker checkpoint create` may still lie until containerd's garbage collector
/// runs (its interval grows with the time a collection takes, so seconds on a slow machine): the start then
/// fails with "commit failed: content sha256:...: already exists" (moby/moby#42900, with runc as well). On
/// exactly that error, remove that stale blob from Docker's containerd and start again.
fn start_from_checkpoint(d: &Dockerd, name: &str, checkpoint: &str) {
    let mut err = String::new();
    for _ in 0..10 {
        let out = d.docker(&["start", "--checkpoint", checkpoint, name]);
        if out.status.success() {
            return;
        }
        err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("failed to upload checkpoint to containerd") && err.contains("already exists"), "{err}");
        if let Some(digest) = stale_digest(&err) {
            let rm = d.ctr(&["content", "rm", &digest]);
            eprintln!("moby/moby#42900: removed the stale {digest}: {}", String::from_utf8_lossy(&rm.stderr).trim());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("docker start --checkpoint {checkpoint} {name} kept failing on moby/moby#42900: {err}");
}

/// The digest in "... content sha256:HEX: already exists".
fn stale_digest(err: &str) -> Option<String> {
    let hex = err.split("content sha256:").nth(1)?.split(':').next()?;
    Some(format!("sha256:{hex}"))
}

#[test]
fn run_exec_logs_stop_and_rm_through_cedana_runc() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    let id = counter(&d, "life", "cedana", 3);
    assert_eq!(d.ok(&["inspect", "-f", "{{.HostConfig.Runtime}}", "life"]), "cedana");
    let options = std::fs::read_to_string(
        d.exec_root.join("containerd/daemon/io.containerd.runtime.v2.task/moby").join(&id).join("options.json"),
    )
    .unwrap();
    assert!(options.contains("cedana-runc"), "containerd's shim must run cedana-runc: {options}");
    assert_eq!(d.ok(&["exec", "life", "echo", "hello from exec"]), "hello from exec");
    let out = d.docker(&["exec", "life", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "exec exit codes pass through");
    let logs = d.log_numbers("life");
    assert!(logs.len() >= 3);
    assert_consecutive(&logs, "docker logs");
    d.ok(&["stop", "-t", "1", "life"]);
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.Status}}", "life"]), "exited");
    d.ok(&["rm", "life"]);
    assert!(!d.docker(&["inspect", "life"]).status.success());
}

#[test]
fn docker_checkpoint_then_start_from_it_continues_the_counter() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    let id = counter(&d, "cp", "cedana", 5);
    d.ok(&["checkpoint", "create", "cp", "cp1"]);
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.Status}}", "cp"]), "exited");
    let before = d.log_numbers("cp");
    assert_consecutive(&before, "before the checkpoint");

    // Docker stored our checkpoint format, verifiable by cedana.
    let stored = checkpoint_dir(&d, &id, "cp1").join("cedana-checkpoint.tar.zst");
    let m: serde_json::Value =
        serde_json::from_str(&cedana_ok(&["checkpoint", "inspect", "--json", "--verify", stored.to_str().unwrap()])).unwrap();
    assert_eq!((m["kind"].as_str(), m["compression"].as_str()), (Some("runc"), Some("zstd")));
    assert_eq!(m["container"]["id"], id.as_str());

    start_from_checkpoint(&d, "cp", "cp1");
    wait_for("the restored counter", T, || (d.log_numbers("cp").len() > before.len() + 3).then_some(()));
    assert_consecutive(&d.log_numbers("cp"), "after docker start --checkpoint");
    assert_eq!(d.ok(&["exec", "cp", "echo", "restored"]), "restored");
    d.ok(&["rm", "-f", "cp"]);
}

#[test]
fn docker_run_with_cedana_restore_env_restores_at_create() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    let id = counter(&d, "orig", "cedana", 5);
    d.ok(&["checkpoint", "create", "orig", "c1"]);
    let last = *d.log_numbers("orig").last().unwrap();
    let cp = checkpoint_dir(&d, &id, "c1");

    let env = format!("CEDANA_RESTORE={}", cp.display());
    d.ok(&["run", "-d", "--runtime", "cedana", "--name", "copy", "-e", &env, IMAGE, "sh", "-c", "echo fresh; sleep 100"]);
    wait_for("the restored counter", T, || (d.log_numbers("copy").len() >= 3).then_some(()));
    let logs = String::from_utf8_lossy(&d.docker(&["logs", "copy"]).stdout).into_owned();
    assert!(!logs.contains("fresh"), "the container must be restored, not started fresh: {logs}");
    let got = d.log_numbers("copy");
    assert_eq!(got[..3], [last + 1, last + 2, last + 3], "restore at create continues from {last}");
    let ps = d.ok(&["exec", "copy", "ps"]);
    assert!(ps.contains("while true"), "{ps}");
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.Status}}", "copy"]), "running");
    d.ok(&["stop", "-t", "1", "copy"]);

    // A checkpoint that is not there: docker run fails with our message.
    let out =
        d.docker(&["run", "-d", "--runtime", "cedana", "--name", "bad", "-e", "CEDANA_RESTORE=/nonexistent/cp", IMAGE, "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("holds no cedana checkpoint"), "{err}");
}

#[test]
fn cedana_dump_runc_of_a_docker_container_restores_as_a_runc_container() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    // Docker's own runc: cedana checkpoints containers of any runtime.
    let id = counter(&d, "plain", "runc", 5);
    d.ok(&["pause", "plain"]);
    let last = *d.log_numbers("plain").last().unwrap();
    let root = d.runc_root();
    let dir = tmp.path().join("cps");
    cedana_ok(&[
        "dump",
        "runc",
        &id,
        "--root",
        root.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
        "--name",
        "d",
        "--leave-running",
        "--compression",
        "lz4",
    ]);
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.Status}}", "plain"]), "paused", "a paused container stays paused");
    let cp = dir.join("d.tar.lz4");

    // A bundle from the recorded config.json, in a cgroup of its own (the original still holds Docker's).
    let m: serde_json::Value =
        serde_json::from_str(&cedana_ok(&["checkpoint", "inspect", "--json", cp.to_str().unwrap()])).unwrap();
    let mut config = m["container"]["config"].clone();
    config["linux"]["cgroupsPath"] = format!("/cedana-test-copy-{}", std::process::id()).into();
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let copy = format!("docker-copy-{}", std::process::id());
    runc.track(&copy);
    let mut cmd = std::process::Command::new(bin("cedana"));
    cmd.args(["restore", "runc", "--detach", "--id", &copy, "--path"])
        .arg(&cp)
        .arg("--bundle")
        .arg(&bundle)
        .arg("--root")
        .arg(&runc.root);
    let lines = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", lines.snapshot());
    let got = lines.wait_numbers(2, T);
    assert_eq!(got[..2], [last + 1, last + 2], "the runc copy continues from {last}");
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));

    d.ok(&["unpause", "plain"]);
    wait_for("the original to count on", T, || (d.log_numbers("plain").len() as u64 > last + 3).then_some(()));
    runc.ok(&["delete", "--force", &copy]);
}
