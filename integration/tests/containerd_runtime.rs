//! cedana-runc behind containerd's runc shim (`io.containerd.runc.v2` with `--runc-binary`), driven with ctr
//! against a private containerd the tests start (own root, state, sockets and namespace): checkpoints to an
//! image path and as checkpoint images, restores through `ctr container restore --live` and through the
//! annotation `io.cedana.restore`, and errors that reach ctr's users. Also `cedana restore runc` attached and
//! `cedana-runc run` of an annotated bundle. Containers write to pipes (the shim's, or ours); the shim copies
//! their output into a log file on the host (`--log-uri file://...`), which is never the container's own fd.
//! Run as root: `cargo test -p cedana-integration --test containerd_runtime -- --test-threads=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cedana_integration::engines::{piped, wait_child, Containerd, RuncRoot};
use cedana_integration::images::{busybox_rootfs, Bundle, COUNTER, RESTORE_ANNOTATION};
use cedana_integration::lines::numbers;
use cedana_integration::{bin, cedana_ok, require_root, wait_for};

const T: Duration = Duration::from_secs(30);
const IMAGE: &str = "docker.io/cedana-test/busybox:1";
/// A counter that stops at 39 and exits with 7: attached restores must return that exit code.
const FINITE_COUNTER: &str = "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.1; done; exit 7";
/// The message of cedana-runc when a restore names something that is not a checkpoint.
const NO_CHECKPOINT: &str = "which holds no cedana checkpoint";

/// Fields drop in order: containerd (which removes its containers) before the temporary folder.
struct Setup {
    dir: PathBuf,
    d: Containerd,
    rootfs: PathBuf,
    /// The shim's runc root (`--runc-root`); runc's state of our namespace is under `runc_root/NAMESPACE`.
    runc_root: PathBuf,
    _tmp: tempfile::TempDir,
}

fn setup() -> Setup {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let d = Containerd::start(&dir.join("containerd"));
    let rootfs = busybox_rootfs(&dir.join("rootfs"));
    Setup { runc_root: dir.join("runc"), dir, d, rootfs, _tmp: tmp }
}

impl Setup {
    /// `ctr run -d` through the runc shim with cedana-runc as its runc, output into `DIR/NAME.log`; `extra`
    /// are more `ctr run` flags; `image` is an image reference, or `None` for our rootfs (`--rootfs`).
    fn run(&self, id: &str, extra: &[&str], image: Option<&str>, args: &[&str]) -> std::process::Output {
        let log = format!("file://{}", self.log(id).display());
        let mut cmd = self.d.ctr_cmd(&["run", "-d", "--runc-binary"]);
        cmd.arg(bin("cedana-runc")).arg("--runc-root").arg(&self.runc_root).args(["--log-uri", &log]).args(extra);
        match image {
            Some(image) => cmd.arg(image),
            None => cmd.arg("--rootfs").arg(&self.rootfs),
        };
        cmd.arg(id).args(args).stdin(Stdio::null()).output().expect("ctr run")
    }

    /// Like [`Setup::run`], which must succeed.
    fn run_ok(&self, id: &str, extra: &[&str], image: Option<&str>, args: &[&str]) {
        let out = self.run(id, extra, image, args);
        assert!(
            out.status.success(),
            "ctr run {id} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// The numbers the container `id` printed so far.
    fn numbers(&self, id: &str) -> Vec<u64> {
        let text = std::fs::read_to_string(self.log(id)).unwrap_or_default();
        numbers(&text.lines().map(str::to_string).collect::<Vec<_>>())
    }

    fn wait_numbers(&self, id: &str, n: usize) -> Vec<u64> {
        wait_for(&format!("{n} numbers from {id}"), T, || {
            let got = self.numbers(id);
            (got.len() >= n).then_some(got)
        })
    }

    /// runc's state folder of container `id` (written by the shim's runc, i.e. cedana-runc).
    fn runc_state_dir(&self, id: &str) -> PathBuf {
        self.runc_root.join(&self.d.namespace).join(id)
    }

    /// The shim's bundle folder of `id` (holds runc's `log.json` while the task exists).
    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.d.dir.join("state/io.containerd.runtime.v2.task").join(&self.d.namespace).join(id)
    }
}

fn assert_consecutive(numbers: &[u64], what: &str) {
    let Some(&first) = numbers.first() else { panic!("{what}: no output") };
    let expected: Vec<u64> = (first..first + numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "{what}: the counter must count on without a gap or restart");
}

/// The first number after a restore continues the last one before the dump. CRIU also restores what was in
/// the stdout pipe at dump time, so a line the shim had not read yet comes out again: `last` itself may lead.
fn assert_continues(first: u64, last: u64, what: &str) {
    assert!(first == last + 1 || first == last, "{what}: the restored counter starts at {first}, it must continue from {last}");
}

/// Verify our checkpoint at `path` with `cedana checkpoint inspect --verify`; returns its manifest.
fn inspect(path: &Path) -> serde_json::Value {
    serde_json::from_str(&cedana_ok(&["checkpoint", "inspect", "--json", "--verify", path.to_str().unwrap()])).unwrap()
}

/// The file names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

/// PIDs of processes whose command line mentions `needle` (e.g. a shim of our namespace and container).
fn processes_with(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && cedana_integration::alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Nothing of container `id` is left: no task, no runc state, no shim, no process in its cgroup, not frozen.
fn assert_nothing_left(s: &Setup, id: &str) {
    assert_eq!(s.d.task_status(id), None, "{id}: no task may be left");
    let shim = format!("-namespace {} -id {id} ", s.d.namespace);
    wait_for(&format!("the shim of {id} to exit"), T, || processes_with(&shim).is_empty().then_some(()));
    assert!(!s.runc_state_dir(id).exists(), "{id}: runc's state must be gone");
    for controller in ["freezer", "memory", "pids", "cpu,cpuacct"] {
        let cg = Path::new("/sys/fs/cgroup").join(controller).join(&s.d.namespace).join(id);
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        assert!(procs.trim().is_empty(), "{id}: processes left in {}: {procs}", cg.display());
        let state = std::fs::read_to_string(cg.join("freezer.state")).unwrap_or_default();
        assert!(!state.contains("FROZEN"), "{id}: cgroup {} left frozen", cg.display());
    }
}

#[test]
fn ctr_checkpoint_to_an_image_path_writes_ours_and_the_annotation_restores_it() {
    let s = setup();
    let id = "counter";
    s.run_ok(id, &[], None, &["/bin/sh", "-c", COUNTER]);
    s.wait_numbers(id, 5);
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"));
    assert!(s.runc_state_dir(id).join("state.json").is_file(), "the shim runs its runc with our --runc-root");
    let out = s.d.ok(&["task", "exec", "--exec-id", "e1", id, "/bin/echo", "hello from exec"]);
    assert_eq!(out.trim(), "hello from exec", "exec passes through cedana-runc");

    let images = s.dir.join("images");
    let work = s.dir.join("work");
    s.d.ok(&[
        "task",
        "checkpoint",
        "--exit",
        "--image-path",
        images.to_str().unwrap(),
        "--work-path",
        work.to_str().unwrap(),
        id,
    ]);
    wait_for("the checkpointed task to stop", T, || (s.d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    let runc_log = std::fs::read_to_string(s.bundle_dir(id).join("log.json")).unwrap();
    assert!(runc_log.contains("cedana: checkpointed"), "the shim's runc is cedana-runc: {runc_log}");
    let before = s.numbers(id);
    assert_consecutive(&before, "before the checkpoint");
    assert_eq!(before[0], 0);
    let last = *before.last().unwrap();

    // The image path holds our checkpoint, and nothing else; CRIU's log is in the work path.
    assert_eq!(names(&images), ["cedana-checkpoint.tar.zst"]);
    let m = inspect(&images.join("cedana-checkpoint.tar.zst"));
    assert_eq!((m["kind"].as_str(), m["compression"].as_str()), (Some("runc"), Some("zstd")));
    assert_eq!(m["container"]["id"], id);
    assert!(work.join("dump.log").is_file(), "CRIU's log goes to ctr's --work-path");
    s.d.remove(id);

    // ctr 1.6 cannot restore from an image path (no `ctr run --checkpoint`), so restore at create through
    // the OCI annotation of a new container (its own command would print "fresh").
    let copy = "restored";
    let annotation = format!("{RESTORE_ANNOTATION}={}", images.display());
    s.run_ok(copy, &["--annotation", &annotation], None, &["/bin/sh", "-c", "echo fresh; sleep 100"]);
    let after = s.wait_numbers(copy, 3);
    assert_continues(after[0], last, "annotation restore of ctr's image path");
    assert_consecutive(&after, "after the restore");
    assert!(!std::fs::read_to_string(s.log(copy)).unwrap().contains("fresh"), "restored, not started fresh");
    assert_eq!(s.d.task_status(copy).as_deref(), Some("RUNNING"));
    let runc_log = std::fs::read_to_string(s.bundle_dir(copy).join("log.json")).unwrap();
    assert!(runc_log.contains("restored at create and runs already"), "{runc_log}");
    let ps = s.d.ok(&["task", "exec", "--exec-id", "e2", copy, "/bin/ps"]);
    assert!(ps.contains("while true"), "{ps}");
    let n = s.numbers(copy).len();
    s.wait_numbers(copy, n + 3);
    s.d.ok(&["task", "kill", "-s", "SIGKILL", copy]);
    wait_for("the restored task to stop", T, || (s.d.task_status(copy).as_deref() == Some("STOPPED")).then_some(()));
    s.d.ok(&["task", "rm", copy]);
    s.d.ok(&["container", "rm", copy]);
    assert_nothing_left(&s, copy);
}

/// The digest of the blob of `media_type` in the checkpoint image `reference`.
fn checkpoint_blob(d: &Containerd, reference: &str, media_type: &str) -> String {
    let images = d.ok(&["image", "ls"]);
    let line = images
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference))
        .unwrap_or_else(|| panic!("{reference} in {images}"));
    let index_digest = line.split_whitespace().nth(2).unwrap();
    let index: serde_json::Value = serde_json::from_str(&d.ok(&["content", "get", index_digest])).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let blob = manifests.iter().find(|m| m["mediaType"] == media_type).unwrap_or_else(|| panic!("no {media_type} in {index}"));
    blob["digest"].as_str().unwrap().to_string()
}

#[test]
fn ctr_container_checkpoint_and_restore_live_continue_the_counter() {
    let s = setup();
    s.d.import(&s.rootfs, IMAGE);
    let id = "img-counter";
    s.run_ok(id, &[], Some(IMAGE), &["/bin/sh", "-c", COUNTER]);
    let before = *s.wait_numbers(id, 5).last().unwrap();
    // A checkpoint image: containerd pauses the task, the shim's runc (cedana-runc) checkpoints it
    // (leaving it running), and containerd stores the image path as a tar blob.
    s.d.ok(&["container", "checkpoint", "--task", id, "cedana-test/checkpoint:1"]);
    let after = *s.numbers(id).last().unwrap();
    assert_eq!(s.d.task_status(id).as_deref(), Some("RUNNING"), "a container checkpoint leaves the task running");
    s.wait_numbers(id, after as usize + 3);
    assert_consecutive(&s.numbers(id), "the original across the checkpoint");

    let blob = checkpoint_blob(&s.d, "cedana-test/checkpoint:1", "application/vnd.containerd.container.criu.checkpoint.criu.tar");
    let tar = s.dir.join("criu.tar");
    let status = s.d.ctr_cmd(&["content", "get", &blob]).stdout(std::fs::File::create(&tar).unwrap()).status().unwrap();
    assert!(status.success());
    let unpacked = s.dir.join("criu");
    std::fs::create_dir_all(&unpacked).unwrap();
    assert!(Command::new("tar").arg("-C").arg(&unpacked).arg("-xf").arg(&tar).status().unwrap().success());
    assert_eq!(names(&unpacked), ["cedana-checkpoint.tar.zst"], "containerd stored our checkpoint");
    let m = inspect(&unpacked.join("cedana-checkpoint.tar.zst"));
    assert_eq!((m["kind"].as_str(), m["container"]["id"].as_str()), (Some("runc"), Some(id)));
    s.d.remove(id);

    // `ctr container restore --live`: the checkpoint's runtime options bring cedana-runc back, which
    // restores our checkpoint from the extracted image path.
    let copy = "img-restored";
    let mut restore = s.d.ctr_cmd(&["container", "restore", "--live", copy, "cedana-test/checkpoint:1"]);
    let restore_out = piped(&mut restore);
    let status = restore.status().unwrap();
    drop(restore); // it holds the pipe's write end
    assert!(status.success(), "ctr container restore --live: {:?}", restore_out.wait_closed(T));
    assert_eq!(s.d.task_status(copy).as_deref(), Some("RUNNING"));
    assert!(s.runc_state_dir(copy).join("state.json").is_file(), "restored by the shim's runc, in our --runc-root");
    // ctr returns after starting the task: what it printed, then the rest through `ctr task attach`.
    let mut printed = numbers(&restore_out.wait_closed(T));
    let mut attach = s.d.ctr_cmd(&["task", "attach", copy]);
    let attached = piped(&mut attach);
    let mut attach = attach.spawn().unwrap();
    let got = attached.wait_numbers(5, T);
    // ctr attach forwards SIGTERM to the task: stop it with SIGKILL (by PID).
    let _ = attach.kill();
    let _ = attach.wait();
    assert_consecutive(&got, "attached to the restored task");
    printed.extend(&got);
    let first = printed[0];
    assert!(
        first >= before && first <= after + 1,
        "the restored counter starts at {first}: checkpointed between {before} and {after}"
    );
    let ps = s.d.ok(&["task", "exec", "--exec-id", "e1", copy, "/bin/ps"]);
    assert!(ps.contains("while true"), "{ps}");
    s.d.remove(copy);
    assert_nothing_left(&s, copy);
}

#[test]
fn restore_errors_reach_ctr_users_and_leave_nothing_behind() {
    let s = setup();
    // CEDANA_RESTORE in the process env (`ctr run --env`) naming nothing.
    let out = s.run("bad-env", &["--env", "CEDANA_RESTORE=/nonexistent"], None, &["/bin/sh", "-c", "echo fresh; sleep 100"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("ctr said: {err}");
    assert!(!out.status.success(), "ctr run must fail");
    assert!(
        err.contains(&format!("cedana-runc: the environment variable CEDANA_RESTORE names /nonexistent, {NO_CHECKPOINT}")),
        "ctr shows our message: {err}"
    );
    assert_nothing_left(&s, "bad-env");
    assert!(!std::fs::read_to_string(s.log("bad-env")).unwrap_or_default().contains("fresh"), "nothing ran");

    // The annotation naming a file that is not a checkpoint: the engine's verification fails.
    let junk = s.dir.join("junk.tar.zst");
    std::fs::write(&junk, "not a checkpoint").unwrap();
    let annotation = format!("{RESTORE_ANNOTATION}={}", junk.display());
    let out = s.run("bad-file", &["--annotation", &annotation], None, &["/bin/sh", "-c", "echo fresh; sleep 100"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("ctr said: {err}");
    assert!(!out.status.success(), "ctr run must fail");
    assert!(
        err.contains("OCI runtime create failed: cedana-runc: ") && err.contains(junk.to_str().unwrap()),
        "ctr shows our message: {err}"
    );
    assert_nothing_left(&s, "bad-file");

    // A real checkpoint whose restore fails inside runc/CRIU (the new rootfs is empty: the process's
    // /bin/busybox is missing). ctr's users see the failure through cedana-runc, and nothing stays behind.
    s.run_ok("src", &[], None, &["/bin/sh", "-c", COUNTER]);
    s.wait_numbers("src", 3);
    let images = s.dir.join("images");
    s.d.ok(&["task", "checkpoint", "--exit", "--image-path", images.to_str().unwrap(), "src"]);
    s.d.remove("src");
    let empty = s.dir.join("empty-rootfs");
    std::fs::create_dir_all(&empty).unwrap();
    let annotation = format!("{RESTORE_ANNOTATION}={}", images.display());
    let mut cmd = s.d.ctr_cmd(&["run", "-d", "--runc-binary"]);
    cmd.arg(bin("cedana-runc")).arg("--runc-root").arg(&s.runc_root).args(["--annotation", &annotation, "--rootfs"]).arg(&empty);
    let out = cmd.args(["bad-rootfs", "/bin/busybox", "sleep", "100"]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("ctr said: {err}");
    assert!(!out.status.success(), "a restore into a rootfs without the checkpoint's files must fail");
    assert!(err.contains("OCI runtime create failed: cedana-runc: "), "ctr shows our message: {err}");
    assert!(err.contains("CRIU: Error (") && err.contains("bin/busybox"), "ctr shows CRIU's cause: {err}");
    assert_nothing_left(&s, "bad-rootfs");
}

/// A runc container running the finite counter, dumped with `cedana dump runc` once it printed 5 numbers;
/// returns the checkpoint and the last number before the dump.
fn dumped_finite_counter(runc: &RuncRoot, tmp: &Path, name: &str) -> (PathBuf, u64) {
    let bundle = Bundle::busybox(&tmp.join(format!("bundle-{name}")), &["sh", "-c", FINITE_COUNTER]);
    let cid = format!("ced-ctr-{name}-{}", std::process::id());
    let out = runc.run_detached(&bundle.dir, &cid);
    out.wait_for(5, T);
    let dir = tmp.join(format!("cp-{name}"));
    runc.cedana_dump_ok(&cid, &dir, &["--name", "cp", "--compression", "lz4"]);
    let before = numbers(&out.wait_closed(T));
    assert_consecutive(&before, "before the dump");
    (dir.join("cp.tar.lz4"), *before.last().unwrap())
}

#[test]
fn cedana_restore_runc_attached_streams_the_output_and_returns_the_exit_code() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let (cp, last) = dumped_finite_counter(&runc, tmp.path(), "attached");
    let bundle = Bundle::busybox(&tmp.path().join("bundle-restore"), &["sh", "-c", "echo fresh"]);
    let copy = format!("ced-ctr-attached-copy-{}", std::process::id());
    runc.track(&copy);
    let mut cmd = Command::new(bin("cedana"));
    cmd.args(["restore", "runc", "--id", &copy, "--path"])
        .arg(&cp)
        .arg("--bundle")
        .arg(&bundle.dir)
        .arg("--root")
        .arg(&runc.root);
    let out = piped(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // it holds the pipe's write end
               // While attached, the container runs and its output flows.
    let early = out.wait_numbers(2, T);
    assert_continues(early[0], last, "attached restore");
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));
    let status = wait_child(&mut child, T);
    let lines = out.wait_closed(T);
    assert_eq!(status.code(), Some(7), "the container's exit code comes back: {lines:?}");
    let after = numbers(&lines);
    assert_consecutive(&after, "attached restore");
    assert_eq!(after.last(), Some(&39), "the counter ran to its end");
    assert!(!lines.iter().any(|l| l == "fresh"));
    assert_eq!(runc.status(&copy), None, "like `runc restore` attached, the container is deleted when it exits");
}

#[test]
fn cedana_runc_run_of_an_annotated_bundle_restores_attached_and_detached() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let plain = RuncRoot::new(tmp.path(), "runc");
    let (cp, last) = dumped_finite_counter(&plain, tmp.path(), "run");
    let runc = RuncRoot::new(&tmp.path().join("wrapped"), bin("cedana-runc"));

    // Attached `run`: the restored counter's output flows, and run returns its exit code.
    let bundle = Bundle::busybox(&tmp.path().join("bundle-annotated"), &["sh", "-c", "echo fresh"]);
    bundle.annotate(RESTORE_ANNOTATION, cp.to_str().unwrap());
    let copy = format!("ced-ctr-run-{}", std::process::id());
    runc.track(&copy);
    let mut cmd = runc.cmd(&["run", "--bundle", bundle.dir.to_str().unwrap(), &copy]);
    let out = piped(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // it holds the pipe's write end
    let status = wait_child(&mut child, T);
    let lines = out.wait_closed(T);
    assert_eq!(status.code(), Some(7), "run returns the restored container's exit code: {lines:?}");
    let after = numbers(&lines);
    assert_continues(after[0], last, "cedana-runc run");
    assert_consecutive(&after, "cedana-runc run");
    assert_eq!(after.last(), Some(&39));
    assert!(!lines.iter().any(|l| l == "fresh"), "restored, not started fresh");
    assert_eq!(runc.status(&copy), None, "like `runc run`, the container is deleted when it exits");

    // `run -d`: restored detached, running, and no `start` needed (nor possible).
    let detached = format!("ced-ctr-run-d-{}", std::process::id());
    let out = runc.run_detached(&bundle.dir, &detached);
    let got = out.wait_numbers(2, T);
    assert_continues(got[0], last, "cedana-runc run -d");
    assert_eq!(runc.status(&detached).as_deref(), Some("running"));
    let again = runc.run(&["start", &detached]);
    assert_eq!(again.status.code(), Some(1), "a restored `run -d` container is started already");
    wait_for("the restored counter to finish", T, || (runc.status(&detached).as_deref() == Some("stopped")).then_some(()));
    let all = numbers(&out.wait_closed(T));
    assert_consecutive(&all, "cedana-runc run -d");
    assert_eq!(all.last(), Some(&39));
    runc.ok(&["delete", &detached]);
    assert_eq!(runc.status(&detached), None);
}
