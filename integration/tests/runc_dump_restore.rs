//! `cedana dump runc` / `cedana restore runc` against real runc containers (busybox rootfs built locally,
//! private runc root). Run as root: `cargo test -p cedana-integration --test runc_dump_restore`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::images::Bundle;
use cedana_integration::lines::{numbers, Lines};
use cedana_integration::{bin, cedana, cedana_ok, entries, require_root, wait_for_partial_checkpoint};

const T: Duration = Duration::from_secs(20);

fn id(name: &str) -> String {
    format!("ced-{name}-{}", std::process::id())
}

/// Restore `checkpoint` as container `new_id` from `bundle`, detached; returns the restored output.
fn restore(runc: &RuncRoot, checkpoint: &Path, new_id: &str, bundle: &Path) -> Lines {
    runc.track(new_id);
    let mut cmd = Command::new(bin("cedana"));
    cmd.args(["restore", "runc", "--detach", "--id", new_id, "--path"])
        .arg(checkpoint)
        .arg("--bundle")
        .arg(bundle)
        .arg("--root")
        .arg(&runc.root);
    let lines = piped(&mut cmd);
    let status = cmd.status().expect("cedana restore runc");
    assert!(status.success(), "cedana restore runc {new_id}: {:?}", lines.snapshot());
    lines
}

/// A container holding 256 MiB with a known checksum (`/bin/memory 256`): its bundle, id, output and the
/// checksum line it printed.
fn memory_container(runc: &RuncRoot, tmp: &Path, name: &str) -> (Bundle, String, Lines, String) {
    let bundle = Bundle::busybox(&tmp.join(format!("bundle-{name}")), &["/bin/memory", "256"]);
    cedana_integration::images::add_static_workload(&bundle.rootfs(), "memory");
    let cid = id(name);
    let out = runc.run_detached(&bundle.dir, &cid);
    let sum = out.wait_line("the memory checksum", Duration::from_secs(60), |l| l.starts_with("sum "));
    (bundle, cid, out, sum)
}

/// The only checkpoint file in `dir`.
fn only_file(dir: &Path) -> std::path::PathBuf {
    let entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "expected one checkpoint in {}: {entries:?}", dir.display());
    entries[0].clone()
}

#[test]
fn the_counter_continues_where_it_was_with_every_compression() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    for compression in ["none", "tar", "gzip", "lz4", "zlib", "zstd"] {
        let bundle = Bundle::counter(&tmp.path().join(format!("bundle-{compression}")));
        let cid = id(&format!("count-{compression}"));
        let out = runc.run_detached(&bundle.dir, &cid);
        out.wait_for(5, T);
        let dir = tmp.path().join(format!("cp-{compression}"));
        runc.cedana_dump_ok(&cid, &dir, &["--compression", compression]);
        // The dump ends the container (as `runc checkpoint` does): its pipe closes and runc forgets it.
        let before = numbers(&out.wait_closed(T));
        assert_eq!(runc.status(&cid), None, "{compression}: the dumped container must be gone");
        let last = *before.last().expect("output before the dump");
        assert_eq!(before, (0..=last).collect::<Vec<_>>(), "{compression}: counter before the dump");

        let checkpoint = only_file(&dir);
        let new_id = id(&format!("restored-{compression}"));
        let after = restore(&runc, &checkpoint, &new_id, &bundle.dir);
        let got = after.wait_numbers(3, T);
        assert_eq!(got[..3], [last + 1, last + 2, last + 3], "{compression}: the restored counter must continue from {last}");
        assert_eq!(runc.status(&new_id).as_deref(), Some("running"), "{compression}");
        runc.ok(&["delete", "--force", &new_id]);
    }
}

#[test]
fn leave_running_keeps_the_original_and_the_copy_runs_beside_it() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = id("leave");
    let (bundle, out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let dir = tmp.path().join("cp");
    let summary = runc.cedana_dump_ok(&cid, &dir, &["--leave-running", "--name", "cp"]);
    assert!(summary.contains(&format!("Dumped container {cid}")), "{summary}");
    // Not left paused: it still counts.
    assert_eq!(runc.status(&cid).as_deref(), Some("running"));
    let n = out.snapshot().len();
    out.wait_for(n + 3, T);

    let copy = id("leave-copy");
    let after = restore(&runc, &dir.join("cp.tar"), &copy, &bundle.dir);
    let got = after.wait_numbers(2, T);
    assert!(got[1] == got[0] + 1, "the copy counts on: {got:?}");
    assert_eq!(runc.status(&cid).as_deref(), Some("running"));
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));

    // A checkpoint records what restore needs: the container's id, bundle and config.
    let m: serde_json::Value =
        serde_json::from_str(&cedana_ok(&["checkpoint", "inspect", "--json", "--verify", dir.join("cp.tar").to_str().unwrap()]))
            .unwrap();
    assert_eq!(m["kind"], "runc");
    assert_eq!(m["container"]["id"], cid.as_str());
    assert_eq!(m["container"]["bundle"], bundle.dir.to_str().unwrap());
    assert_eq!(m["container"]["config"]["process"]["args"][2], cedana_integration::images::COUNTER);
    assert!(m["files"].as_array().unwrap().iter().any(|f| f["name"] == "container/config.json"), "{m}");
}

#[test]
fn a_paused_container_stays_paused_and_a_bundle_without_config_gets_the_checkpoints() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = id("paused");
    let (_, out) = runc.run_counter(tmp.path(), &cid, 3, T);
    runc.ok(&["pause", &cid]);
    let dir = tmp.path().join("cp");
    runc.cedana_dump_ok(&cid, &dir, &["--leave-running", "--name", "p", "--compression", "zstd"]);
    assert_eq!(runc.status(&cid).as_deref(), Some("paused"));
    let frozen = numbers(&out.snapshot());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(numbers(&out.snapshot()), frozen, "a paused container must not run during or after the dump");

    // A new bundle with only the rootfs: restore writes the checkpoint's config.json into it.
    let bare = tmp.path().join("bare");
    cedana_integration::images::busybox_rootfs(&bare.join("rootfs"));
    let copy = id("paused-copy");
    let after = restore(&runc, &dir.join("p.tar.zst"), &copy, &bare);
    let got = after.wait_numbers(1, T);
    assert_eq!(got[0], frozen.last().unwrap() + 1, "the copy continues from the paused state");
    assert!(bare.join("config.json").is_file());
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));
}

#[test]
fn a_256_mib_container_keeps_its_memory_checksum() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let (bundle, cid, out, sum) = memory_container(&runc, tmp.path(), "memory");
    let dir = tmp.path().join("cp");
    let summary = runc.cedana_dump_ok(&cid, &dir, &["--compression", "lz4", "--name", "mem"]);
    assert!(summary.contains("images 25"), "about 256 MiB of images expected: {summary}");
    out.wait_closed(T);

    let copy = id("memory-copy");
    let after = restore(&runc, &dir.join("mem.tar.lz4"), &copy, &bundle.dir);
    runc.ok(&["kill", &copy, "USR1"]);
    let again = after.wait_line("the checksum after restore", Duration::from_secs(60), |l| l.starts_with("sum "));
    assert_eq!(again, sum, "the restored memory must hash the same");
}

#[test]
fn errors_name_the_problem() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let root = runc.root.to_str().unwrap();
    let dir = tmp.path().join("cp");

    let out = runc.cedana_dump("no-such-container", &dir, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no container \"no-such-container\""), "{err}");

    let cid = id("errors");
    let (bundle, _) = runc.run_counter(tmp.path(), &cid, 2, T);
    runc.cedana_dump_ok(&cid, &dir, &["--leave-running", "--name", "e"]);
    let cp = dir.join("e.tar");

    // Restoring under the id of a live container.
    let out = cedana(&[
        "restore",
        "runc",
        "--path",
        cp.to_str().unwrap(),
        "--id",
        &cid,
        "--bundle",
        bundle.dir.to_str().unwrap(),
        "--root",
        root,
        "--detach",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already exists"), "{err}");
    assert_eq!(runc.status(&cid).as_deref(), Some("running"), "the live container is untouched");

    // A bundle that is not there; a checkpoint that is not there; a checkpoint name taken.
    let out = cedana(&[
        "restore",
        "runc",
        "--path",
        cp.to_str().unwrap(),
        "--id",
        "x1",
        "--bundle",
        "/nonexistent/b",
        "--root",
        root,
        "--detach",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bundle /nonexistent/b is not a folder"), "{out:?}");
    let out = cedana(&[
        "restore",
        "runc",
        "--path",
        "/nonexistent.tar",
        "--id",
        "x2",
        "--bundle",
        bundle.dir.to_str().unwrap(),
        "--root",
        root,
        "--detach",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint at /nonexistent.tar"), "{out:?}");
    let out = runc.cedana_dump(&cid, &dir, &["--leave-running", "--name", "e"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"), "{out:?}");
    assert_eq!(runc.status(&cid).as_deref(), Some("running"), "a refused dump leaves the container running");
}

#[test]
fn a_failed_checkpoint_resumes_the_container_and_writes_nothing() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let bundle = Bundle::counter(&tmp.path().join("bundle"));
    let cid = id("fails");
    // stdout on a connected unix socket whose other end is ours: CRIU cannot dump it without
    // ext-unix-sk, so runc checkpoint fails.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    runc.track(&cid);
    let status = runc
        .cmd(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &cid])
        .stdin(std::process::Stdio::null())
        .stdout(std::os::fd::OwnedFd::from(theirs.try_clone().unwrap()))
        .stderr(std::os::fd::OwnedFd::from(theirs))
        .status()
        .unwrap();
    assert!(status.success());
    let out = Lines::read(ours);
    out.wait_for(3, T);
    let dir = tmp.path().join("cp");
    let result = runc.cedana_dump(&cid, &dir, &["--compression", "zstd"]).output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && err.contains("runc checkpoint") && err.contains("criu failed"), "{err}");
    assert_eq!(runc.status(&cid).as_deref(), Some("running"), "the container must be resumed");
    let n = out.snapshot().len();
    out.wait_for(n + 2, T);
    assert!(entries(&dir).is_empty(), "no partial checkpoint may be left: {:?}", entries(&dir));
}

#[test]
fn hooks_run_around_container_dumps_and_restores() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = id("hooks");
    let (bundle, _) = runc.run_counter(tmp.path(), &cid, 3, T);
    let hook = tmp.path().join("hook.sh");
    let calls = tmp.path().join("calls");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$CEDANA_HOOK $CEDANA_KIND $CEDANA_CONTAINER_ID $CEDANA_SUCCEEDED\" >> {}\n\
             [ -z \"$REFUSE\" ] || [ \"$CEDANA_HOOK\" != \"$REFUSE\" ]\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("cp");
    let root = runc.root.to_str().unwrap();
    let dump = |refuse: &str| {
        runc.cedana_dump(&cid, &dir, &["--name", "cp"]).env("CEDANA_HOOK_COMMAND", &hook).env("REFUSE", refuse).output().unwrap()
    };
    let refused = dump("before-dump");
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("before-dump hook failed"));
    assert_eq!(runc.status(&cid).as_deref(), Some("running"), "a refused dump leaves the container running, not paused");
    assert!(dump("").status.success());
    let new_id = id("hooks-restored");
    runc.track(&new_id);
    let restored = Command::new(bin("cedana"))
        .args(["restore", "runc", "--detach", "--id", &new_id, "--root", root, "--bundle"])
        .arg(&bundle.dir)
        .arg("--path")
        .arg(dir.join("cp.tar"))
        .env("CEDANA_HOOK_COMMAND", &hook)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(restored.success());
    let log = std::fs::read_to_string(&calls).unwrap();
    let expected = [
        format!("before-dump runc {cid} "),
        format!("before-dump runc {cid} "),
        format!("after-dump runc {cid} true"),
        format!("before-restore runc {new_id} "),
        format!("after-restore runc {new_id} true"),
    ];
    assert_eq!(log.lines().collect::<Vec<_>>(), expected, "{log}");
    runc.ok(&["delete", "--force", &new_id]);
}

#[test]
fn an_interrupted_container_dump_resumes_it_and_leaves_nothing() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let (_, cid, out, sum) = memory_container(&runc, tmp.path(), "interrupted");
    let dir = tmp.path().join("cp");
    let child = runc
        .cedana_dump(&cid, &dir, &["--compression", "gzip"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt while the archive is being written (the container is paused then).
    wait_for_partial_checkpoint(&dir, 4 << 20);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && stderr.contains("interrupted"), "{stderr}");
    assert_eq!(runc.status(&cid).as_deref(), Some("running"), "resumed, not left paused");
    assert!(entries(&dir).is_empty(), "no checkpoint and no partial file: {:?}", entries(&dir));
    runc.ok(&["kill", &cid, "USR1"]);
    let n = out.snapshot().iter().filter(|l| l.starts_with("sum ")).count();
    let again = cedana_integration::wait_for("the checksum after the interrupted dump", Duration::from_secs(60), || {
        let sums: Vec<String> = out.snapshot().into_iter().filter(|l| l.starts_with("sum ")).collect();
        (sums.len() > n).then(|| sums[n].clone())
    });
    assert_eq!(again, sum, "the container keeps its memory and works on");
}
