//! Bad input and failures: clear errors, a workload that keeps running, and no checkpoint that looks
//! complete when it is not.

use std::process::{Command, Stdio};
use std::time::Duration;

use cedana_integration::workload::{session_command, Workload};
use cedana_integration::*;
use nix::sys::signal::Signal;

#[test]
fn missing_and_forbidden_pids_are_refused() {
    require_root();
    let err = cedana_err(&["dump", "process", "999999"]);
    assert!(err.contains("no such process: PID 999999"), "{err}");
    let err = cedana_err(&["dump", "process", "1"]);
    assert!(err.contains("init process"), "{err}");
    let err = cedana_err(&["dump", "process", "2"]);
    assert!(err.contains("kernel thread"), "{err}");
}

#[test]
fn another_users_process_fails_cleanly_and_keeps_running() {
    require_root();
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = session_command(&workload_bin("counter")).uid(65534).gid(65534).stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    // Root without CAP_SYS_RESOURCE (as on these machines) cannot dump another user's process: CRIU fails,
    // and the failure must be clean. With the capability, the dump must succeed.
    let out = cedana(&["dump", "process", &pid.to_string(), "--dir", dir.path().to_str().unwrap(), "--leave-running"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if has_cap_sys_resource() {
        assert!(out.status.success(), "with CAP_SYS_RESOURCE the dump must succeed: {stderr}");
        assert_eq!(entries(dir.path()).len(), 1, "one checkpoint: {:?}", entries(dir.path()));
    } else {
        assert!(!out.status.success(), "without CAP_SYS_RESOURCE CRIU cannot dump another user's process");
        assert!(stderr.contains("criu dump failed") && stderr.contains("full log:"), "{stderr}");
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }
    assert!(alive(pid), "the process must keep running: {stderr}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of its effective capabilities).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff in /proc/self/status").trim();
    u64::from_str_radix(hex, 16).expect("CapEff is hex") & (1 << 24) != 0
}

#[test]
fn a_process_in_another_pid_namespace_is_sent_to_the_container_commands() {
    require_root();
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "sleep", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = wait_for("the process in the new PID namespace", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(format!("/proc/{}/task/{}/children", unshare.id(), unshare.id())).ok()?;
        text.split_whitespace().next().and_then(|p| p.parse::<i32>().ok())
    });
    let err = cedana_err(&["dump", "process", &child.to_string()]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL).ok();
    unshare.kill().ok();
    unshare.wait().ok();
    assert!(err.contains("another PID namespace") && err.contains("cedana dump runc"), "{err}");
}

#[test]
fn non_root_users_are_told_to_use_sudo() {
    require_root();
    use std::os::unix::process::CommandExt;
    for cmd in [&["dump", "process", "1"][..], &["restore", "process", "--path", "/tmp/x"][..]] {
        let out = Command::new(bin("cedana")).args(cmd).uid(65534).gid(65534).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("needs root") && err.contains("sudo"), "{cmd:?}: {err}");
    }
}

#[test]
fn unknown_compression_is_refused_with_the_valid_names() {
    let err = cedana_err(&["dump", "process", "1", "--compression", "bzip2"]);
    assert!(err.contains("bzip2") && err.contains("zstd"), "{err}");
}

#[test]
fn missing_checkpoint_is_named() {
    require_root();
    let err = cedana_err(&["restore", "process", "--path", "/nonexistent/ckpt.tar.zst"]);
    assert!(err.contains("no checkpoint at /nonexistent/ckpt.tar.zst"), "{err}");
}

/// Dump a counter into `dir` and return the checkpoint path and the (now free) PID.
fn dumped_counter(dir: &std::path::Path, compression: &str) -> (std::path::PathBuf, i32) {
    let mut w = Workload::start(&workload_bin("counter"), &[], dir);
    w.wait_lines(3);
    let out = cedana_ok(&[
        "dump",
        "process",
        &w.pid.to_string(),
        "--dir",
        dir.to_str().unwrap(),
        "--name",
        "c",
        "--compression",
        compression,
    ]);
    let path = out.lines().next().and_then(|l| l.rsplit(" to ").next()).unwrap().into();
    w.reap();
    (path, w.pid)
}

#[test]
fn truncated_checkpoints_are_refused_before_anything_is_restored() {
    require_root();
    for c in ["zstd", "gzip", "tar"] {
        let dir = tempfile::tempdir().unwrap();
        let (path, pid) = dumped_counter(dir.path(), c);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
        assert!(err.contains("corrupt") || err.contains("incomplete"), "{c}: {err}");
        assert!(!alive(pid), "{c}: nothing may be restored from a truncated checkpoint");
    }
}

#[test]
fn corrupted_checkpoints_are_refused_by_checksum() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (path, pid) = dumped_counter(dir.path(), "tar");
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a byte inside the largest image's data (the pages), not in tar headers.
    let at = bytes.windows(4).position(|w| w == b"ELF\x02").map(|p| p + 64).unwrap_or(bytes.len() / 2);
    bytes[at] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains("checksum mismatch") || err.contains("corrupt"), "{err}");
    assert!(!alive(pid));
    let err = cedana_err(&["checkpoint", "inspect", "--verify", path.to_str().unwrap()]);
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn a_corrupted_folder_is_refused_before_criu_restores_anything() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (path, pid) = dumped_counter(dir.path(), "none");
    let pages = std::fs::read_dir(&path)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .expect("a pages image");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&pages, &bytes).unwrap();
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!alive(pid), "nothing may be restored from a corrupted folder");
    // Put the byte back: the same folder restores.
    bytes[100] ^= 0x01;
    std::fs::write(&pages, &bytes).unwrap();
    // A missing image, or one the manifest does not list, is refused before CRIU even starts.
    let core = path.join(format!("core-{pid}.img"));
    let saved = std::fs::read(&core).unwrap();
    std::fs::remove_file(&core).unwrap();
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains(&format!("core-{pid}.img listed in the manifest is missing")), "{err}");
    std::fs::write(&core, &saved).unwrap();
    std::fs::write(path.join("stray.img"), b"x").unwrap();
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains("unexpected file stray.img"), "{err}");
    assert!(!alive(pid), "nothing may be restored from an incomplete folder");
    std::fs::remove_file(path.join("stray.img")).unwrap();
    cedana_ok(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(alive(pid));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), Signal::SIGKILL).ok();
}

#[test]
fn a_folder_without_manifest_is_incomplete() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (path, pid) = dumped_counter(dir.path(), "none");
    std::fs::remove_file(path.join("manifest.json")).unwrap();
    let err = cedana_err(&["restore", "process", "--path", path.to_str().unwrap()]);
    assert!(err.contains("incomplete"), "{err}");
    assert!(!alive(pid));
}

/// Dump a 512 MiB workload with `compression`, send cedana SIGINT once `when` says so, and check that the
/// dump failed as interrupted, the process runs on unfrozen with its memory, and nothing was left behind.
fn interrupt_dump(compression: &str, when: impl Fn(&std::path::Path)) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = Workload::start(&workload_bin("memory"), &["512"], work.path());
    let before = w.wait_lines(1)[0].clone();
    let child = Command::new(bin("cedana"))
        .args(["dump", "process", &w.pid.to_string(), "--dir", dir.path().to_str().unwrap(), "--compression", compression])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    when(dir.path());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("interrupted"), "{compression}: {stderr}");
    assert!(alive(w.pid), "the process must survive an interrupted dump");
    let state = std::fs::read_to_string(format!("/proc/{}/stat", w.pid)).unwrap();
    assert!(!state.contains(") T "), "the process must not be left stopped: {state}");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], before, "the process still has its memory and keeps working");
    assert!(entries(dir.path()).is_empty(), "no checkpoint and no partial file: {:?}", entries(dir.path()));
}

#[test]
fn an_interrupted_dump_leaves_the_process_running_and_nothing_behind() {
    // While the archive is being written (CRIU holds the process frozen then): the partial file grows.
    interrupt_dump("gzip", |dir| wait_for_partial_checkpoint(dir, 4 << 20));
}

#[test]
fn an_interrupt_while_criu_dumps_resumes_the_process() {
    // CRIU needs a few hundred milliseconds for 512 MiB: the signal arrives while it holds the process.
    interrupt_dump("none", |_| std::thread::sleep(Duration::from_millis(120)));
}

/// A tmpfs of `size` at `dir/NAME`, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, name: &str, size: &str) -> SmallDisk {
        let mnt = dir.join(name);
        std::fs::create_dir(&mnt).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&mnt).status().unwrap();
        assert!(ok.success(), "mounting a {size} tmpfs");
        SmallDisk(mnt)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_dump_and_keeps_the_process() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // Room for the commit reserve but not for 64 MiB of random pages: the dump fails while writing.
    let disk = SmallDisk::mount(dir.path(), "small", "40m");
    let work = tempfile::tempdir().unwrap();
    let w = Workload::start(&workload_bin("memory"), &["64"], work.path());
    let before = w.wait_lines(1)[0].clone();
    for c in ["none", "zstd", "tar"] {
        let err = cedana_err(&["dump", "process", &w.pid.to_string(), "--dir", disk.0.to_str().unwrap(), "--compression", c]);
        assert!(err.to_lowercase().contains("space") || err.contains("failed"), "{c}: {err}");
        assert!(!err.contains("is full (not even"), "{c}: the reserve fits, the images do not: {err}");
        assert!(alive(w.pid), "{c}: the process must keep running");
        assert!(entries(&disk.0).is_empty(), "{c}: nothing may be left on the full disk: {:?}", entries(&disk.0));
    }
    // A disk without even the commit reserve is refused before CRIU runs.
    let tiny = SmallDisk::mount(dir.path(), "tiny", "8m");
    let err = cedana_err(&["dump", "process", &w.pid.to_string(), "--dir", tiny.0.to_str().unwrap()]);
    assert!(err.contains("is full") && err.contains("choose another --dir"), "{err}");
    assert!(entries(&tiny.0).is_empty(), "{:?}", entries(&tiny.0));
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], before);
}

#[test]
fn a_criu_failure_quotes_its_log_and_keeps_the_process() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(3);
    let err = cedana_err(&[
        "dump",
        "process",
        &w.pid.to_string(),
        "--dir",
        dir.path().to_str().unwrap(),
        "--criu-opts",
        "--no-such-criu-option",
    ]);
    assert!(err.contains("criu dump failed") && err.contains("full log:"), "{err}");
    assert!(alive(w.pid));
    let n = w.lines().len();
    w.wait_lines(n + 2);
}

#[test]
fn check_reports_criu() {
    require_root();
    let out = cedana_ok(&["check"]);
    assert!(out.contains("CRIU        4."), "{out}");
    assert!(out.contains("criu check  ok"), "{out}");
    let out = Command::new(bin("cedana")).arg("check").env("CEDANA_CRIU_BINARY_PATH", "/nonexistent/criu").output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/nonexistent/criu") && text.contains("setup.sh"), "{text}");
}

#[test]
fn inspect_prints_the_manifest() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let (path, pid) = dumped_counter(dir.path(), "zstd");
    let out = cedana_ok(&["checkpoint", "inspect", path.to_str().unwrap()]);
    assert!(out.contains("Kind         process") && out.contains(&format!("PID {pid}")), "{out}");
    assert!(out.contains("pages-1.img"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&cedana_ok(&["checkpoint", "inspect", "--json", path.to_str().unwrap()])).unwrap();
    assert_eq!(json["process"]["pid"], pid);
    assert_eq!(json["compression"], "zstd");
    assert!(json["stats"]["pages_written"].as_u64().unwrap() > 0);
    assert!(json["files"].as_array().unwrap().iter().all(|f| f["xxh3"].as_str().unwrap().len() == 32));
}

#[test]
fn hooks_run_around_dump_and_restore_and_a_failing_one_stops_it() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("hook.sh");
    let calls = dir.path().join("calls");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$CEDANA_HOOK $CEDANA_PID $CEDANA_SUCCEEDED $(basename \"$CEDANA_CHECKPOINT\")\" >> {}\n\
             [ -z \"$REFUSE\" ] || [ \"$CEDANA_HOOK\" != \"$REFUSE\" ]\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(3);
    let pid = w.pid.to_string();
    let d = dir.path().to_str().unwrap();
    let run = |args: &[&str], refuse: &str| {
        Command::new(bin("cedana")).args(args).env("CEDANA_HOOK_COMMAND", &hook).env("REFUSE", refuse).output().unwrap()
    };
    // A refusing before-dump hook stops the dump before anything is frozen.
    let out = run(&["dump", "process", &pid, "--dir", d, "--name", "h"], "before-dump");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("before-dump hook failed"));
    assert!(alive(w.pid) && entries(dir.path()).iter().all(|e| !e.starts_with("h.")));
    let out = run(&["dump", "process", &pid, "--dir", d, "--name", "h"], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.reap();
    // A refusing before-restore hook stops the restore before CRIU restores anything.
    let out = run(&["restore", "process", "--path", dir.path().join("h.tar").to_str().unwrap()], "before-restore");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("before-restore hook failed"));
    assert!(!alive(w.pid));
    let out = run(&["restore", "process", "--path", dir.path().join("h.tar").to_str().unwrap()], "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(alive(w.pid));
    let log = std::fs::read_to_string(&calls).unwrap();
    let expected = [
        format!("before-dump {pid}  h.tar"),
        format!("before-dump {pid}  h.tar"),
        format!("after-dump {pid} true h.tar"),
        // A hook that refused is not told the outcome (the same at dump and restore); hooks before it in
        // the list would be (see engine::hooks).
        "before-restore 0  h.tar".to_string(),
        "before-restore 0  h.tar".to_string(),
        format!("after-restore {pid} true h.tar"),
    ];
    assert_eq!(log.lines().collect::<Vec<_>>(), expected, "{log}");
}
