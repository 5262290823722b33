//! `cedana dump containerd` and `cedana restore containerd` against a private containerd: a counter run by
//! the stock runc shim and one run by ours are checkpointed (the task stops), restored as new containers
//! through our shim (the `io.cedana.restore` annotation), and count on from where they were; with
//! `--rootfs`, the files the counter wrote into its rootfs come along. Errors name what is wrong.
//! Build first, then run as root: `cargo build --workspace && cargo test -p cedana-integration --test containerd_cli`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cedana_integration::engines::{put_shim_on_path, Containerd};
use cedana_integration::images::busybox_rootfs;
use cedana_integration::{bin, cedana, require_root, wait_for};

const RUNC_SHIM: &str = "io.containerd.runc.v2";
const CEDANA_SHIM: &str = "io.containerd.cedana.v2";
const T: Duration = Duration::from_secs(30);
/// Counts in its memory and appends each number to /count in its rootfs.
const COUNTER: &str = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.1; done";

struct Setup {
    d: Containerd,
    image: String,
    tmp: tempfile::TempDir,
}

fn setup(image: &str) -> Setup {
    require_root();
    bin("containerd-shim-cedana-v2");
    bin("cedana-runc");
    put_shim_on_path();
    let tmp = tempfile::tempdir().unwrap();
    let d = Containerd::start(&tmp.path().join("containerd"));
    let rootfs = busybox_rootfs(&tmp.path().join("rootfs"));
    let image = format!("docker.io/cedana/{image}:latest");
    d.import(&rootfs, &image);
    Setup { d, image, tmp }
}

impl Setup {
    fn address(&self) -> String {
        self.d.socket.display().to_string()
    }

    /// `cedana ARGS --address SOCKET --namespace NS`.
    fn cedana(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--address".into(), self.address(), "--namespace".into(), self.d.namespace.clone()]);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        cedana(&refs)
    }

    fn run_counter(&self, runtime: &str, id: &str) -> i32 {
        let out = self
            .d
            .ctr_cmd(&["run", "--runtime", runtime, "--detach", "--null-io", &self.image, id, "/bin/sh", "-c", COUNTER])
            .stdin(Stdio::null())
            .output()
            .expect("ctr run");
        assert!(out.status.success(), "ctr run: {}", String::from_utf8_lossy(&out.stderr));
        wait_for("the task to be RUNNING", T, || (self.d.task_status(id).as_deref() == Some("RUNNING")).then_some(()));
        let pid = self.d.task_pid(id);
        wait_for("the counter to count", T, || (counts(pid).len() >= 5).then_some(()));
        pid
    }

    /// Dump container `id` into its own folder (zstd unless `extra` says otherwise); the checkpoint's path,
    /// the last field of the output's last line.
    fn dump(&self, id: &str, extra: &[&str]) -> PathBuf {
        let dir = self.tmp.path().join(format!("checkpoints-{id}"));
        let mut args = vec!["dump", "containerd", id, "--dir", dir.to_str().unwrap()];
        if !extra.contains(&"--compression") {
            args.extend(["--compression", "zstd"]);
        }
        args.extend_from_slice(extra);
        let out = self.cedana(&args);
        assert!(
            out.status.success(),
            "cedana dump containerd: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_default());
        assert!(path.starts_with(&dir) && path.exists(), "the last field is the checkpoint: {stdout}");
        path
    }

    fn restore(&self, checkpoint: &Path, id: &str) {
        let out = self.cedana(&["restore", "containerd", "--path", checkpoint.to_str().unwrap(), "--id", id, "--detach"]);
        assert!(
            out.status.success(),
            "cedana restore containerd: {}{} (containerd log: {})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.d.dir.join("containerd.log").display()
        );
    }
}

/// The numbers the counter wrote to `/count` in the rootfs of process `pid` (read through /proc).
fn counts(pid: i32) -> Vec<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/root/count")).unwrap_or_default();
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Checkpoint the counter `id`, check its task stopped, restore it as `new_id` through our shim; returns the
/// restored init's PID.
fn dump_and_restore(s: &Setup, id: &str, new_id: &str, extra: &[&str]) -> i32 {
    let checkpoint = s.dump(id, extra);
    wait_for("the checkpointed task to stop", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    s.restore(&checkpoint, new_id);
    assert_eq!(s.d.task_status(new_id).as_deref(), Some("RUNNING"), "the restored task runs");
    let info = s.d.ok(&["container", "info", new_id]);
    assert!(info.contains(CEDANA_SHIM), "the restored container runs on our shim: {info}");
    s.d.task_pid(new_id)
}

#[test]
fn a_runc_shim_container_is_dumped_and_restored_on_our_shim_and_counts_on() {
    let s = setup("counter-runc-shim");
    let pid = s.run_counter(RUNC_SHIM, "ctrd-runc");
    let seen = counts(pid).last().copied().unwrap();
    let restored = dump_and_restore(&s, "ctrd-runc", "ctrd-runc-restored", &[]);
    // Without --rootfs the restored container has a fresh rootfs: its /count starts where the memory was.
    wait_for("the restored counter to count", T, || (counts(restored).len() >= 3).then_some(()));
    let after = counts(restored);
    assert!(after[0] > seen, "the counter went on from its memory ({seen} seen before the dump), wrote {after:?}");
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "one count after another: {after:?}");
}

#[test]
fn a_restore_onto_another_image_name_sits_on_its_layers() {
    let s = setup("counter-image");
    s.run_counter(RUNC_SHIM, "ctrd-img");
    let checkpoint = s.dump("ctrd-img", &["--rootfs"]);
    // The same layers under another name (as on a node that tagged the image differently).
    let other = "docker.io/cedana/counter-image-retagged:2";
    s.d.ok(&["image", "tag", &s.image, other]);
    let out = s.cedana(&[
        "restore",
        "containerd",
        "--path",
        checkpoint.to_str().unwrap(),
        "--id",
        "ctrd-img-2",
        "--image",
        other,
        "--detach",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info = s.d.ok(&["container", "info", "ctrd-img-2"]);
    assert!(info.contains(other), "the new container names the image given: {info}");
    let restored = s.d.task_pid("ctrd-img-2");
    wait_for("the restored counter to count", T, || (counts(restored).len() >= 10).then_some(()));
    let all = counts(restored);
    assert!(all[0] == 0 && all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    // An image that is not there: refused with what to do, nothing created.
    let out = s.cedana(&[
        "restore",
        "containerd",
        "--path",
        checkpoint.to_str().unwrap(),
        "--id",
        "ctrd-img-3",
        "--image",
        "docker.io/cedana/nowhere:1",
        "--detach",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("nowhere") && e.contains("pull"), "{e}");
    assert!(!s.d.ok(&["containers", "ls", "-q"]).lines().any(|l| l == "ctrd-img-3"));
}

#[test]
fn with_rootfs_the_files_written_into_the_container_come_along() {
    let s = setup("counter-cedana-shim");
    s.run_counter(CEDANA_SHIM, "ctrd-rootfs");
    let restored = dump_and_restore(&s, "ctrd-rootfs", "ctrd-rootfs-restored", &["--rootfs"]);
    wait_for("the restored counter to count", T, || (counts(restored).len() >= 15).then_some(()));
    let all = counts(restored);
    assert_eq!(all[0], 0, "the file written before the dump is there: {all:?}");
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "no number lost or repeated across the restore: {all:?}");
}

#[test]
fn bad_requests_name_the_problem() {
    let s = setup("counter-errors");
    let err = |out: std::process::Output| {
        assert!(!out.status.success(), "must fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(s.cedana(&["dump", "containerd", "no-such-container", "--dir", s.tmp.path().to_str().unwrap()]));
    assert!(e.contains("no-such-container") && e.contains("not found") && e.contains(&s.d.namespace), "{e}");

    let missing = s.tmp.path().join("no-containerd.sock");
    let e = err(cedana(&["dump", "containerd", "x", "--address", missing.to_str().unwrap()]));
    assert!(e.contains("cannot reach containerd") && e.contains("--address"), "{e}");

    s.run_counter(RUNC_SHIM, "ctrd-taken");
    let checkpoint = s.dump("ctrd-taken", &["--leave-running"]);
    assert_eq!(s.d.task_status("ctrd-taken").as_deref(), Some("RUNNING"), "--leave-running keeps the task");
    let e = err(s.cedana(&["restore", "containerd", "--path", checkpoint.to_str().unwrap(), "--id", "ctrd-taken", "--detach"]));
    assert!(e.contains("already exists") && e.contains("ctrd-taken"), "{e}");
    let e = err(s.cedana(&["restore", "containerd", "--path", "/nonexistent/cp.tar.zst", "--id", "x", "--detach"]));
    assert!(e.contains("/nonexistent/cp.tar.zst"), "{e}");

    // A checkpoint whose page images were damaged after the dump: the shim's restore refuses it, and the
    // restore removes the container and the snapshot it had created.
    let folder = s.dump("ctrd-taken", &["--leave-running", "--compression", "none", "--name", "folder"]);
    let pages = cedana_integration::entries(&folder).into_iter().find(|f| f.starts_with("pages-")).expect("a pages image");
    let pages = folder.join(pages);
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();
    let e = err(s.cedana(&["restore", "containerd", "--path", folder.to_str().unwrap(), "--id", "ctrd-corrupt", "--detach"]));
    assert!(e.contains("ctrd-corrupt"), "{e}");
    let containers = s.d.ok(&["containers", "ls", "-q"]);
    assert!(!containers.lines().any(|l| l == "ctrd-corrupt"), "no container left behind: {containers}");
    let snapshots = s.d.ok(&["snapshots", "ls"]);
    assert!(!snapshots.lines().any(|l| l.starts_with("ctrd-corrupt ")), "no snapshot left behind: {snapshots}");
    assert_eq!(s.d.task_status("ctrd-taken").as_deref(), Some("RUNNING"), "the checkpointed container runs on");
}

#[test]
fn a_managed_containerd_container_is_dumped_and_restored_in_place_through_the_daemon() {
    let s = setup("counter-job");
    s.run_counter(RUNC_SHIM, "ctrd-job");
    let d = cedana_integration::daemon::Daemon::start();
    let (address, ns) = (s.address(), s.d.namespace.clone());
    let out = d.ok(&["manage", "containerd", "ctrd-job", "--address", &address, "--namespace", &ns, "--jid", "cjob"]);
    let pid = s.d.task_pid("ctrd-job");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["cjob", pid.to_string().as_str()], "{out}");
    let row = d.row("cjob");
    assert!(row.contains(&"containerd".to_string()) && row.contains(&pid.to_string()), "{row:?}");
    let e = d.err(&["manage", "containerd", "ctrd-job", "--address", &address, "--namespace", &ns]);
    assert!(e.contains("already"), "{e}");

    let out = d.ok(&["dump", "job", "cjob"]);
    let path = out.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_default().to_string();
    assert!(Path::new(&path).exists(), "the last field is the checkpoint: {out}");
    wait_for("the dumped task to stop", T, || (s.d.task_status("ctrd-job").as_deref() == Some("STOPPED")).then_some(()));
    d.wait_status("cjob", &["halted"]);

    d.ok(&["restore", "job", "cjob"]);
    assert_eq!(s.d.task_status("ctrd-job").as_deref(), Some("RUNNING"), "restored in place, under the same id");
    let info = s.d.ok(&["container", "info", "ctrd-job"]);
    assert!(info.contains(CEDANA_SHIM), "now on our shim: {info}");
    let restored = s.d.task_pid("ctrd-job");
    assert_eq!(d.row("cjob").iter().filter(|c| **c == restored.to_string()).count(), 1, "ps shows the new PID");
    // Its snapshot was kept: the file it wrote before the dump goes on, no number lost or repeated.
    wait_for("the restored counter to count", T, || (counts(restored).len() >= 15).then_some(()));
    let all = counts(restored);
    assert_eq!(all[0], 0, "{all:?}");
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
}

#[test]
fn restores_in_a_row_hold_their_snapshots_against_containerd_garbage_collection() {
    // Each removal below lets containerd collect garbage; a snapshot prepared for a restore must not be taken
    // before its container references it (the restore holds it with a lease, as containerd's clients do).
    let s = setup("counter-gc");
    s.run_counter(RUNC_SHIM, "ctrd-gc");
    let checkpoint = s.dump("ctrd-gc", &["--leave-running", "--compression", "lz4"]);
    for i in 0..8 {
        let id = format!("ctrd-gc-{i}");
        s.restore(&checkpoint, &id);
        assert_eq!(s.d.task_status(&id).as_deref(), Some("RUNNING"), "restore {i}");
        s.d.remove(&id);
        let _ = s.d.ctr(&["snapshots", "rm", &id]);
    }
    let leases = s.d.ok(&["leases", "ls"]);
    assert!(!leases.lines().any(|l| l.starts_with("cedana-")), "no lease of ours left: {leases}");
}

#[test]
fn an_attached_restore_waits_for_the_container_and_exits_with_its_code() {
    let s = setup("counter-attached");
    s.run_counter(RUNC_SHIM, "ctrd-att");
    let checkpoint = s.dump("ctrd-att", &[]);
    let mut args: Vec<String> = ["restore", "containerd", "--path", checkpoint.to_str().unwrap(), "--id", "ctrd-att-2"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(["--address".into(), s.address(), "--namespace".into(), s.d.namespace.clone()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = cedana_integration::cedana_cmd(&refs).stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap();
    wait_for("the restored task to run", T, || (s.d.task_status("ctrd-att-2").as_deref() == Some("RUNNING")).then_some(()));
    assert!(child.try_wait().unwrap().is_none(), "the attached restore waits while the container runs");
    s.d.ok(&["task", "kill", "-s", "SIGKILL", "ctrd-att-2"]);
    let status = cedana_integration::engines::wait_child(&mut child, T);
    assert_eq!(status.code(), Some(137), "the container's exit code (SIGKILL)");
    assert_eq!(s.d.task_status("ctrd-att-2"), None, "its task is deleted, as `ctr run` does");
}

#[test]
fn a_paused_task_is_dumped_and_stays_paused_when_left_running() {
    let s = setup("counter-paused");
    let pid = s.run_counter(CEDANA_SHIM, "ctrd-paused");
    s.d.ok(&["task", "pause", "ctrd-paused"]);
    let n = counts(pid).len();
    let checkpoint = s.dump("ctrd-paused", &["--leave-running"]);
    assert!(checkpoint.exists());
    assert_eq!(s.d.task_status("ctrd-paused").as_deref(), Some("PAUSED"), "a task paused beforehand stays paused");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counts(pid).len(), n, "and frozen: nothing counted");
    s.d.ok(&["task", "resume", "ctrd-paused"]);
    wait_for("the counter to go on", T, || (counts(pid).len() > n + 2).then_some(()));
}
