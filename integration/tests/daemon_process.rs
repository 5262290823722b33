//! `cedana dump process` / `restore process` ask the daemon when one runs, and `--no-server` keeps them in
//! the CLI, with the same checkpoints either way. What proves which process did the work:
//! - the daemon's own log (at debug level for the engine) names every CRIU it runs;
//! - the daemon's I/O counters (`/proc/PID/io`): it writes the archive of a dump, and reads it back for a
//!   restore;
//! - a tree the daemon restored is its child (it reaps it); one `restore process --no-server` restored is
//!   the CLI's child;
//! - errors from the daemon carry the kind of the gRPC status, e.g. "(not found)".

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::daemon::{check_sequence, Daemon};
use cedana_integration::workload::Workload;
use cedana_integration::{alive, bin, require_root, wait_for, workload_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A daemon whose engine logs at debug level: the engine's debug lines ("running criu swrk ..."), without
/// the HTTP/2 frames.
fn start() -> Daemon {
    Daemon::start_with_env(&[("RUST_LOG", "info,cedana=debug")])
}

/// How many times the daemon has run CRIU.
fn criu_runs(d: &Daemon) -> usize {
    // The swrk driver logs "running criu swrk", the command line (streamed dumps) "running criu".
    d.log().matches("running criu").count()
}

/// The daemon's (rchar, wchar): bytes it has read and written so far.
fn io(d: &Daemon) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{}/io", d.pid())).unwrap();
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).expect("a field of /proc/PID/io")
    };
    (field("rchar:"), field("wchar:"))
}

/// The error `cedana ARGS` prints in `cwd` (from "Error: " on; the lines before are logs); it must fail.
fn err_in(d: &Daemon, cwd: &Path, args: &[&str]) -> String {
    error_text(&d.err_in(cwd, args))
}

/// The error in a CLI's stderr: from "Error: " on (the lines before are logs).
fn error_text(stderr: &str) -> String {
    stderr.find("Error: ").map(|i| stderr[i..].to_string()).unwrap_or_else(|| stderr.to_string())
}

fn ppid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

fn wait_gone(pid: i32) {
    wait_for(&format!("PID {pid} to be free"), Duration::from_secs(10), || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
}

fn numbers(lines: &[String]) -> Vec<u64> {
    lines.iter().map(|l| l.trim().parse().unwrap_or_else(|_| panic!("a number: {l:?}"))).collect()
}

/// The manifest of a checkpoint, through `cedana checkpoint inspect --json`.
fn manifest(path: &Path) -> serde_json::Value {
    let out = Command::new(bin("cedana")).args(["checkpoint", "inspect"]).arg(path).arg("--json").output().unwrap();
    assert!(out.status.success(), "inspect {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What must be the same in two checkpoints of the same process: everything but times, host and contents.
fn essentials(m: &serde_json::Value) -> serde_json::Value {
    let mut files: Vec<&str> = m["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    files.sort();
    serde_json::json!({
        "kind": m["kind"],
        "format_version": m["format_version"],
        "compression": m["compression"],
        "process": m["process"],
        "container": m["container"],
        "criu_options": m["criu_options"],
        "checksum": m["checksum"],
        "files": files,
    })
}

#[test]
fn dump_and_restore_process_go_through_the_running_daemon_and_no_server_does_not() {
    let d = start();
    // The CLI runs in a folder of its own and names the checkpoint folder relative to it: the daemon, which
    // runs elsewhere, must get it made absolute.
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let mut w = Workload::start(&workload_bin("counter"), &[], cwd);
    w.wait_lines(5);
    let pid = w.pid.to_string();

    // The same process dumped (left running) through the daemon and alone: the same checkpoint.
    let lr = ["--leave-running", "--dir", "lr"];
    let runs = criu_runs(&d);
    d.ok_in(cwd, &[&["dump", "process", &pid, "--name", "daemon"][..], &lr].concat());
    assert_eq!(criu_runs(&d), runs + 1, "the daemon ran CRIU:\n{}", d.log());
    d.ok_in(cwd, &[&["dump", "process", &pid, "--name", "alone", "--no-server"][..], &lr].concat());
    assert_eq!(criu_runs(&d), runs + 1, "the daemon ran no CRIU for --no-server:\n{}", d.log());
    assert_eq!(essentials(&manifest(&cwd.join("lr/daemon.tar"))), essentials(&manifest(&cwd.join("lr/alone.tar"))));
    assert!(alive(w.pid));

    // Dump through the daemon.
    let (runs, (_, wrote)) = (criu_runs(&d), io(&d));
    let t = Instant::now();
    let out = d.ok_in(cwd, &["dump", "process", &pid, "--dir", "rel", "--name", "via-daemon"]);
    let took = t.elapsed();
    let via_daemon = cwd.join("rel/via-daemon.tar");
    let size = std::fs::metadata(&via_daemon).unwrap_or_else(|e| panic!("{}: {e}\n{out}", via_daemon.display())).len();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(format!("Dumped PID {pid} (counter) to {}", via_daemon.display()).as_str()), "{out}");
    assert!(lines.next().is_some_and(|l| l.starts_with("  size      ") && l.contains("(tar, streamed, images ")), "{out}");
    assert!(out.contains("\ntimings\n") && out.contains("\n└─ total "), "{out}");
    assert_eq!(out.lines().last(), Some(format!("checkpoint  {}", via_daemon.display()).as_str()), "{out}");
    assert_eq!(criu_runs(&d), runs + 1, "the daemon ran CRIU for the dump:\n{}", d.log());
    let written = io(&d).1 - wrote;
    assert!(written >= size, "the daemon wrote the {size}-byte archive (it wrote {written} bytes)");
    eprintln!("dump process through the daemon: {took:.2?}, {size} bytes, the daemon wrote {written} bytes");
    w.reap();
    assert!(!alive(w.pid), "the dump ended the process");
    let at_dump = w.lines().len();

    // Restore through the daemon: the restored process is the daemon's child.
    let (runs, (read, _)) = (criu_runs(&d), io(&d));
    let t = Instant::now();
    let out = d.ok_in(cwd, &["restore", "process", "--path", "rel/via-daemon.tar"]);
    let took = t.elapsed();
    assert!(out.starts_with(&format!("Restored PID {pid} (counter) from rel/via-daemon.tar (verify ")), "{out}");
    assert_eq!(criu_runs(&d), runs + 1, "the daemon ran CRIU for the restore:\n{}", d.log());
    let was_read = io(&d).0 - read;
    assert!(was_read >= size, "the daemon read the {size}-byte archive (it read {was_read} bytes)");
    assert_eq!(ppid(w.pid), Some(d.pid()), "the daemon restored the process as its child");
    eprintln!("restore process through the daemon: {took:.2?}, the daemon read {was_read} bytes");
    check_sequence(&numbers(&w.wait_lines(at_dump + 10)), "after the restore through the daemon");

    // --no-server: the same dump in the CLI; the daemon does nothing (it only reaps its child the dump ends).
    let (runs, (_, wrote)) = (criu_runs(&d), io(&d));
    let out = d.ok_in(cwd, &["dump", "process", &pid, "--no-server", "--dir", "rel", "--name", "local"]);
    // Alone, the CLI prints the path as given.
    assert!(out.starts_with(&format!("Dumped PID {pid} (counter) to rel/local.tar\n")), "{out}");
    let local = cwd.join("rel/local.tar");
    assert_eq!(criu_runs(&d), runs, "the daemon ran no CRIU:\n{}", d.log());
    let written = io(&d).1 - wrote;
    let local_size = std::fs::metadata(&local).unwrap().len();
    assert!(written < local_size / 2, "the daemon wrote {written} bytes during a dump it had no part in ({local_size} bytes)");
    wait_gone(w.pid);
    let at_dump = w.lines().len();

    // `restore process --no-server` stays local and attached: the restored process is the CLI's child.
    let runs = criu_runs(&d);
    let mut attached = d
        .command(&["restore", "process", "--path", "rel/local.tar", "--no-server"])
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cli = attached.id() as i32;
    wait_for("the restored process under the CLI", Duration::from_secs(20), || {
        (alive(w.pid) && ppid(w.pid) == Some(cli)).then_some(())
    });
    assert_eq!(criu_runs(&d), runs, "the daemon ran no CRIU for a --no-server restore");
    check_sequence(&numbers(&w.wait_lines(at_dump + 10)), "after the attached restore");
    kill(Pid::from_raw(w.pid), Signal::SIGKILL).unwrap();
    let status = wait_for("the attached CLI to exit with its process", Duration::from_secs(10), || attached.try_wait().unwrap());
    assert!(!status.success(), "the CLI passes on the killed process's status: {status}");
}

#[test]
fn errors_from_the_daemon_keep_the_message_the_kind_and_the_advice() {
    let d = start();
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    // Each error as the daemon reports it and as the CLI does alone: the same text and advice, plus the kind.
    let same = |args: &[&str], kind: &str| {
        let via = err_in(&d, cwd, args);
        let mut local_args = args.to_vec();
        local_args.push("--no-server");
        let local = err_in(&d, cwd, &local_args);
        let first = local.lines().next().unwrap();
        assert_eq!(via, local.replacen(first, &format!("{first} ({kind})"), 1), "{args:?}");
        via
    };
    let err = same(&["dump", "process", "999999"], "not found");
    assert!(err.contains("no such process: PID 999999"), "{err}");
    let err = same(&["restore", "process", "--path", "/nonexistent/ckpt.tar.zst"], "not found");
    assert!(err.contains("no checkpoint at /nonexistent/ckpt.tar.zst") && err.contains("hint: check the --path"), "{err}");
    // A name that is taken: refused with the advice, and the process keeps running.
    let w = Workload::start(&workload_bin("counter"), &[], cwd);
    w.wait_lines(3);
    std::fs::write(cwd.join("taken.tar"), b"").unwrap();
    let err = same(&["dump", "process", &w.pid.to_string(), "--dir", cwd.to_str().unwrap(), "--name", "taken"], "already exists");
    assert!(err.contains("already exists") && err.contains("hint: choose another --name"), "{err}");
    assert!(alive(w.pid), "a refused dump leaves the process running");
    let before = w.lines().len();
    w.wait_lines(before + 3);
}

#[test]
fn without_a_daemon_the_commands_work_alone_quickly_and_quietly() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // No socket at all, and a socket left by a daemon that died (nobody listens).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [dir.path().join("none.sock"), stale] {
        let run = |args: &[&str]| {
            let t = Instant::now();
            let out = Command::new(bin("cedana")).args(args).env("CEDANA_ADDRESS", &socket).output().unwrap();
            (out, t.elapsed())
        };
        let (out, took) = run(&["dump", "process", "999999"]);
        let (alone, took_alone) = run(&["dump", "process", "999999", "--no-server"]);
        assert!(!out.status.success());
        assert_eq!(out.stderr, alone.stderr, "{}: the same error, and nothing else printed", socket.display());
        let text = error_text(&String::from_utf8_lossy(&out.stderr));
        assert!(text.starts_with("Error: no such process: PID 999999") && !text.contains("(not found)"), "{text}");
        eprintln!("{}: dump process {took:.2?}, with --no-server {took_alone:.2?}", socket.display());
        assert!(took < Duration::from_secs(2), "{took:?}");
        let (out, _) = run(&["restore", "process", "--path", "/nonexistent/ckpt.tar.zst"]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.starts_with("Error: no checkpoint at /nonexistent/ckpt.tar.zst") && !text.contains("(not found)"), "{text}");
    }
}
