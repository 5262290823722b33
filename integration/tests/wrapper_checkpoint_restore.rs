//! cedana-runc's own commands, called the way containerd's shim and go-runc call runc: `checkpoint` into
//! our format, `restore` of ours or of plain CRIU images, and restore at create (bundle annotation), with
//! errors in the log format the caller asked for.
//! Run as root: `cargo test -p cedana-integration --test wrapper_checkpoint_restore -- --test-threads=1`.

use std::path::Path;
use std::time::Duration;

use cedana_integration::console::ConsoleSocket;
use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::images::{Bundle, RESTORE_ANNOTATION};
use cedana_integration::lines::{numbers, Lines};
use cedana_integration::{bin, require_root};

const T: Duration = Duration::from_secs(20);

fn id(name: &str) -> String {
    format!("ced-w-{name}-{}", std::process::id())
}

/// The json lines of a runc log.
fn log_lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?} is not JSON: {e}")))
        .collect()
}

/// Run `cedana-runc --root R --log LOG --log-format json ARGS` with its output piped.
fn wrapper(runc: &RuncRoot, log: &Path, args: &[&str]) -> (std::process::ExitStatus, Lines) {
    let mut cmd = std::process::Command::new(bin("cedana-runc"));
    cmd.arg("--root").arg(&runc.root).arg("--log").arg(log).args(["--log-format", "json"]).args(args);
    let lines = piped(&mut cmd);
    let status = cmd.status().expect("cedana-runc");
    (status, lines)
}

#[test]
fn checkpoint_and_restore_in_go_runc_form_continue_the_counter() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let log = tmp.path().join("log.json");
    let cid = id("cp");
    let (bundle, out) = runc.run_counter(tmp.path(), &cid, 5, T);

    let images = tmp.path().join("images");
    let work = tmp.path().join("work");
    let (status, _) = wrapper(
        &runc,
        &log,
        &["checkpoint", "--image-path", images.to_str().unwrap(), "--work-path", work.to_str().unwrap(), &cid],
    );
    assert!(status.success(), "{:?}", log_lines(&log));
    let last = *numbers(&out.wait_closed(T)).last().unwrap();
    assert_eq!(runc.status(&cid), None, "checkpoint without --leave-running ends the container, as runc does");
    let written = images.join("cedana-checkpoint.tar.zst");
    assert!(written.is_file(), "zstd by default");
    let lines = log_lines(&log);
    assert!(
        lines.iter().any(|l| l["level"] == "info" && l["msg"].as_str().unwrap().contains("cedana: checkpointed")),
        "{lines:?}"
    );
    assert!(work.join("dump.log").is_file(), "CRIU's log goes to the work path");

    let copy = id("cp-restored");
    runc.track(&copy);
    let pid_file = tmp.path().join("pid");
    let (status, after) = wrapper(
        &runc,
        &log,
        &[
            "restore",
            "--image-path",
            images.to_str().unwrap(),
            "--work-path",
            tmp.path().join("work2").to_str().unwrap(),
            "--detach",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "-no-subreaper",
            "--bundle",
            bundle.dir.to_str().unwrap(),
            &copy,
        ],
    );
    assert!(status.success(), "{:?} {:?}", log_lines(&log), after.snapshot());
    assert_eq!(after.wait_numbers(2, T)[..2], [last + 1, last + 2]);
    let state = runc.state(&copy).unwrap();
    assert_eq!(state["status"], "running");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), state["pid"].to_string());
}

#[test]
fn leave_running_and_the_configured_compression() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let cid = id("lr");
    let (_, out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let images = tmp.path().join("images");
    let status = runc
        .cmd(&["checkpoint", "--leave-running", "--image-path", images.to_str().unwrap(), &cid])
        .env("CEDANA_CHECKPOINT_COMPRESSION", "lz4")
        .status()
        .unwrap();
    assert!(status.success());
    assert!(images.join("cedana-checkpoint.tar.lz4").is_file());
    assert_eq!(runc.status(&cid).as_deref(), Some("running"));
    let n = out.snapshot().len();
    out.wait_for(n + 2, T);
}

#[test]
fn plain_criu_images_are_restored_by_runc_itself() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = id("plain");
    let (bundle, out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let images = tmp.path().join("images");
    runc.ok(&["checkpoint", "--image-path", images.to_str().unwrap(), &cid]);
    let last = *numbers(&out.wait_closed(T)).last().unwrap();
    assert!(images.join("pages-1.img").is_file() || std::fs::read_dir(&images).unwrap().count() > 5);

    let wrapped = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let copy = id("plain-restored");
    wrapped.track(&copy);
    let mut cmd =
        wrapped.cmd(&["restore", "-d", "--image-path", images.to_str().unwrap(), "-b", bundle.dir.to_str().unwrap(), &copy]);
    let after = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", after.snapshot());
    assert_eq!(after.wait_numbers(1, T)[0], last + 1);
    // Our copy of the pipe's write end goes, so that it closes with the container.
    drop(cmd);

    // A checkpoint through cedana-runc into the same image path replaces runc's images with ours.
    wrapped.ok(&["checkpoint", "--image-path", images.to_str().unwrap(), &copy]);
    let last = *numbers(&after.wait_closed(T)).last().unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&images).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&"cedana-checkpoint.tar.zst".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with(".img") || n == "descriptors.json"), "runc's images are gone: {names:?}");
    let again = id("plain-again");
    wrapped.track(&again);
    let mut cmd =
        wrapped.cmd(&["restore", "-d", "--image-path", images.to_str().unwrap(), "-b", bundle.dir.to_str().unwrap(), &again]);
    let after = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", after.snapshot());
    assert_eq!(after.wait_numbers(1, T)[0], last + 1, "restored from our checkpoint");
}

/// The names and bytes of the files in `dir`.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_failed_second_checkpoint_leaves_the_first_intact_and_restorable() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let log = tmp.path().join("log.json");
    let cid = id("keep");
    let (bundle, out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let images = tmp.path().join("images");
    let (status, _) = wrapper(&runc, &log, &["checkpoint", "--image-path", images.to_str().unwrap(), &cid]);
    assert!(status.success(), "{:?}", log_lines(&log));
    let last = *numbers(&out.wait_closed(T)).last().unwrap();
    let first = snapshot(&images);

    let copy = id("keep-copy");
    runc.track(&copy);
    let mut cmd =
        runc.cmd(&["restore", "-d", "--image-path", images.to_str().unwrap(), "-b", bundle.dir.to_str().unwrap(), &copy]);
    let copy_out = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", copy_out.snapshot());
    copy_out.wait_numbers(2, T);
    let before = snapshot(&images);

    // runc fails once the container is paused (a bad flag it checks itself), and a container that does not exist.
    let (status, _) =
        wrapper(&runc, &log, &["checkpoint", "--manage-cgroups-mode", "bogus", "--image-path", images.to_str().unwrap(), &copy]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(runc.status(&copy).as_deref(), Some("running"), "the container is resumed");
    let n = copy_out.snapshot().len();
    copy_out.wait_for(n + 2, T);
    let (status, _) = wrapper(&runc, &log, &["checkpoint", "--image-path", images.to_str().unwrap(), "no-such-ctr"]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(snapshot(&images), before, "the first checkpoint is exactly as it was, with nothing beside it");
    assert!(first.iter().all(|f| before.contains(f)), "a restore adds only its logs");

    // And it still restores.
    runc.ok(&["delete", "--force", &copy]);
    let again = id("keep-again");
    runc.track(&again);
    let mut cmd =
        runc.cmd(&["restore", "-d", "--image-path", images.to_str().unwrap(), "-b", bundle.dir.to_str().unwrap(), &again]);
    let after = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", after.snapshot());
    assert_eq!(after.wait_numbers(2, T)[..2], [last + 1, last + 2]);
}

#[test]
fn an_annotated_bundle_is_restored_at_create_and_start_does_nothing() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let cid = id("orig");
    let (_, out) = runc.run_counter(tmp.path(), &cid, 5, T);
    let dir = tmp.path().join("cps");
    runc.cedana_dump_ok(&cid, &dir, &["--name", "a", "--compression", "gzip"]);
    let last = *numbers(&out.wait_closed(T)).last().unwrap();

    let restored = Bundle::counter(&tmp.path().join("restored"));
    restored.edit_config(|c| c["process"]["args"] = serde_json::json!(["sh", "-c", "echo fresh; sleep 100"]));
    restored.annotate(RESTORE_ANNOTATION, dir.join("a.tar.gz").to_str().unwrap());
    let log = tmp.path().join("log.json");
    let copy = id("at-create");
    runc.track(&copy);
    let pid_file = tmp.path().join("pid");
    let (status, after) = wrapper(
        &runc,
        &log,
        &["create", "--bundle", restored.dir.to_str().unwrap(), "--pid-file", pid_file.to_str().unwrap(), &copy],
    );
    assert!(status.success(), "{:?} {:?}", log_lines(&log), after.snapshot());
    let state = runc.state(&copy).unwrap();
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), state["pid"].to_string());
    assert_eq!(runc.ok(&["start", &copy]), "");
    assert_eq!(after.wait_numbers(2, T)[..2], [last + 1, last + 2]);
    assert!(!after.snapshot().iter().any(|l| l == "fresh"), "restored, not started fresh");
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));
    // A second start is runc's own error again.
    let again = runc.run(&["start", &copy]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("cannot start an already running container"));
    runc.ok(&["kill", &copy, "KILL"]);
    cedana_integration::wait_for("the container to stop", T, || (runc.status(&copy).as_deref() == Some("stopped")).then_some(()));
    runc.ok(&["delete", &copy]);
    assert_eq!(runc.status(&copy), None);
}

#[test]
fn errors_are_written_in_the_callers_log_format() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let log = tmp.path().join("log.json");

    let bundle = Bundle::counter(&tmp.path().join("bundle"));
    bundle.annotate(RESTORE_ANNOTATION, "/nonexistent/checkpoint.tar");
    let (status, out) = wrapper(&runc, &log, &["create", "--bundle", bundle.dir.to_str().unwrap(), &id("bad-annotation")]);
    assert_eq!(status.code(), Some(1));
    let last = log_lines(&log).pop().expect("an error line");
    assert_eq!(last["level"], "error");
    let msg = last["msg"].as_str().unwrap();
    assert!(
        msg.contains("the annotation io.cedana.restore names /nonexistent/checkpoint.tar, which holds no cedana checkpoint"),
        "{msg}"
    );
    assert!(out.wait_closed(T).iter().any(|l| l == msg), "the message is on stderr too, as runc prints it");

    let (status, _) =
        wrapper(&runc, &log, &["checkpoint", "--image-path", tmp.path().join("i").to_str().unwrap(), "no-such-ctr"]);
    assert_eq!(status.code(), Some(1));
    let last = log_lines(&log).pop().unwrap();
    assert!(last["msg"].as_str().unwrap().contains("no container \"no-such-ctr\""), "{last}");

    // Without --log, a logrus text line on stderr, as runc writes it.
    let out = runc.run(&["checkpoint", "--image-path", tmp.path().join("i").to_str().unwrap(), "no-such-ctr"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("time=\"") && err.contains(" level=error msg=\"cedana-runc: container does not exist: no container"),
        "{err}"
    );
}

#[test]
fn a_terminal_container_is_restored_onto_the_new_console_socket() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let bundle = Bundle::counter(&tmp.path().join("bundle"));
    bundle.edit_config(|c| c["process"]["terminal"] = true.into());
    let console = ConsoleSocket::bind(&tmp.path().join("console.sock"));
    let cid = id("tty");
    runc.track(&cid);
    runc.ok(&["run", "-d", "--console-socket", console.path.to_str().unwrap(), "--bundle", bundle.dir.to_str().unwrap(), &cid]);
    let out = console.receive(T);
    out.wait_numbers(5, T);

    let log = tmp.path().join("log.json");
    let images = tmp.path().join("images");
    let (status, _) = wrapper(&runc, &log, &["checkpoint", "--image-path", images.to_str().unwrap(), &cid]);
    assert!(status.success(), "{:?}", log_lines(&log));
    let last = *numbers(&out.wait_closed(T)).last().unwrap();

    let console = ConsoleSocket::bind(&tmp.path().join("console2.sock"));
    let copy = id("tty-restored");
    runc.track(&copy);
    let (status, _) = wrapper(
        &runc,
        &log,
        &[
            "restore",
            "--image-path",
            images.to_str().unwrap(),
            "--detach",
            "--console-socket",
            console.path.to_str().unwrap(),
            "--bundle",
            bundle.dir.to_str().unwrap(),
            &copy,
        ],
    );
    assert!(status.success(), "{:?}", log_lines(&log));
    let after = console.receive(T);
    assert_eq!(after.wait_numbers(2, T)[..2], [last + 1, last + 2], "the counter goes on, on the new terminal");
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));
}

/// A pre-dump, then a dump on top of it (`--parent-path`): plain CRIU images that runc writes and restores.
/// Where the kernel cannot track dirty memory (these VMs: no CONFIG_MEM_SOFT_DIRTY), the pre-dump is refused
/// up front with the reason, and the container keeps running.
#[test]
fn pre_dump_and_a_dump_on_its_parent_or_a_clear_refusal_without_memory_tracking() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), bin("cedana-runc"));
    let cid = id("pre");
    let (bundle, out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let log = tmp.path().join("log.json");
    let pre = tmp.path().join("pre");
    let tracking =
        std::process::Command::new("criu").args(["check", "--feature", "mem_dirty_track"]).output().unwrap().status.success();
    let (status, _) = wrapper(&runc, &log, &["checkpoint", "--pre-dump", "--image-path", pre.to_str().unwrap(), &cid]);
    if !tracking {
        assert_eq!(status.code(), Some(1));
        let last = log_lines(&log).pop().expect("an error line");
        let msg = last["msg"].as_str().unwrap();
        assert!(msg.contains("memory dirty tracking") && msg.contains("without --pre-dump"), "{msg}");
        assert_eq!(runc.status(&cid).as_deref(), Some("running"));
        let n = out.snapshot().len();
        out.wait_for(n + 2, T);
        return;
    }
    assert!(status.success(), "{:?}", log_lines(&log));
    assert_eq!(runc.status(&cid).as_deref(), Some("running"), "a pre-dump leaves the container running");
    let n = out.snapshot().len();
    out.wait_for(n + 3, T);

    let last_dump = tmp.path().join("final");
    let (status, _) =
        wrapper(&runc, &log, &["checkpoint", "--parent-path", "../pre", "--image-path", last_dump.to_str().unwrap(), &cid]);
    assert!(status.success(), "{:?}", log_lines(&log));
    assert_eq!(std::fs::read_link(last_dump.join("parent")).unwrap(), Path::new("../pre"), "CRIU links the pre-dump");
    assert!(find_file(&last_dump, "cedana-checkpoint").is_none(), "iterative dumps stay CRIU images for runc");
    let last = *numbers(&out.wait_closed(T)).last().unwrap();

    let copy = id("pre-restored");
    runc.track(&copy);
    let mut cmd = runc.cmd(&[
        "restore",
        "-d",
        "--image-path",
        last_dump.to_str().unwrap(),
        "--bundle",
        bundle.dir.to_str().unwrap(),
        &copy,
    ]);
    let after = piped(&mut cmd);
    assert!(cmd.status().unwrap().success(), "{:?}", after.snapshot());
    assert_eq!(after.wait_numbers(2, T)[..2], [last + 1, last + 2]);
}

fn find_file(dir: &Path, prefix: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
}
