//! Both CRIU drivers (`CliDriver`, `SwrkDriver`) against the real CRIU, through `&dyn CriuDriver`.
//!
//! The drivers are driven by cedana's example binary `criu_drivers` (cedana/examples/criu_drivers.rs, built by
//! `cargo test --workspace` / `cargo build --workspace --examples`), not from this test process: the CLI
//! driver's action script is the calling executable, which must answer it from `main` (a test harness is
//! started by CRIU with no arguments and would run the whole suite), and this crate does not link cedana.
//! The example picks the driver by name and calls it through the trait object, so both go through the very
//! same code; restoring "as a child" makes the restored root a child of the example process, which then
//! waits for it by PID and reports its exit status.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cedana_integration::lines::{numbers, Lines};
use cedana_integration::workload::{session_command, Workload};
use cedana_integration::*;

/// The example binary that drives CRIU.
fn example() -> PathBuf {
    let p = target_dir().join("examples").join("criu_drivers");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p cedana --example criu_drivers` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

fn drive(args: &[&str]) -> Output {
    Command::new(example()).args(args).stdin(Stdio::null()).output().expect("run criu_drivers")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `criu_drivers ARGS` must succeed; returns (stdout, stderr).
fn drive_ok(args: &[&str]) -> (String, String) {
    let out = drive(args);
    let (o, e) = text(&out);
    assert!(out.status.success(), "criu_drivers {args:?} failed ({}):\nstdout: {o}\nstderr: {e}", out.status);
    (o, e)
}

/// `criu_drivers ARGS` must fail; returns (stdout, stderr).
fn drive_err(args: &[&str]) -> (String, String) {
    let out = drive(args);
    let (o, e) = text(&out);
    assert!(!out.status.success(), "criu_drivers {args:?} should have failed:\nstdout: {o}\nstderr: {e}");
    (o, e)
}

fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

/// The counter's numbers in its log must be exactly 1..=last.
fn assert_counts_to(lines: &[String], last: u64, what: &str) {
    let n = numbers(lines);
    assert_eq!(n, (1..=last).collect::<Vec<_>>(), "{what}: a gap, a restart or a repeat");
}

/// Dump a counter, see it gone, restore it as our child, see it finish counting and its exit status.
fn dump_then_restore_as_child(driver: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut w = Workload::start(&workload_bin("counter"), &["150", "7"], dir.path());
    w.wait_lines(10);
    let pid = w.pid.to_string();
    let (out, err) = drive_ok(&["dump", "--driver", driver, "--pid", &pid, "--dir", s(&images)]);
    assert!(out.contains("elapsed "), "{out}");
    assert!(err.contains("notify: post-dump"), "the post-dump notification must reach the callback: {err}");
    w.reap();
    assert!(!alive(w.pid), "the dump must end the process");
    let at_dump = w.lines().len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(w.lines().len(), at_dump, "nothing may run between dump and restore");

    let (out, err) = drive_ok(&["restore", "--driver", driver, "--dir", s(&images), "--wait"]);
    assert!(out.contains(&format!("restored PID {pid}\n")), "restored under its PID: {out}");
    assert!(out.contains(&format!("PID {pid} exited: code 7")), "waited for by PID with its exit status: {out}\n{err}");
    assert!(err.contains("notify: pre-restore") && err.contains("notify: post-restore"), "{err}");
    assert!(at_dump < 150, "the dump came too late to prove anything ({at_dump} lines)");
    assert_counts_to(&w.lines(), 150, "the counter across dump and restore");
}

#[test]
fn cli_dump_then_restore_as_child_continues_and_is_waited_for() {
    dump_then_restore_as_child("cli");
}

#[test]
fn swrk_dump_then_restore_as_child_continues_and_is_waited_for() {
    dump_then_restore_as_child("swrk");
}

/// A dump whose post-dump answer is `false` fails and leaves the process running (not stopped).
fn refused_post_dump(driver: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(5);
    let pid = w.pid.to_string();
    let images = dir.path().join("images");
    let args = ["dump", "--driver", driver, "--pid", &pid, "--dir", s(&images), "--refuse", "post-dump"];
    let (_, err) = drive_err(&args);
    assert!(err.contains("notify: post-dump") && err.contains("criu dump failed") && err.contains("full log:"), "{err}");
    assert!(alive(w.pid), "the process must survive a refused dump");
    let st = state(w.pid);
    assert!(matches!(st, Some('S' | 'R')), "the process must be resumed, not left stopped: state {st:?}");
    let n = w.lines().len();
    w.wait_lines(n + 5);
}

#[test]
fn cli_refused_post_dump_leaves_the_process_running() {
    refused_post_dump("cli");
}

#[test]
fn swrk_refused_post_dump_leaves_the_process_running() {
    refused_post_dump("swrk");
}

/// A restore whose pre-restore answer is `false` fails and restores nothing.
fn refused_pre_restore(driver: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let mut w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(5);
    let pid = w.pid.to_string();
    drive_ok(&["dump", "--driver", driver, "--pid", &pid, "--dir", s(&images)]);
    w.reap();
    let at_dump = w.lines().len();
    let (out, err) = drive_err(&["restore", "--driver", driver, "--dir", s(&images), "--refuse", "pre-restore"]);
    assert!(err.contains("notify: pre-restore") && err.contains("criu restore failed"), "{err}");
    assert!(!err.contains("notify: post-restore") && !out.contains("restored PID"), "{out}\n{err}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "nothing may be restored");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(w.lines().len(), at_dump, "nothing may run after a refused restore");
    // The images are intact: a second restore, answered, brings the counter back.
    let (out, _) = drive_ok(&["restore", "--driver", driver, "--dir", s(&images)]);
    assert!(out.contains(&format!("restored PID {pid}\n")), "{out}");
    w.wait_lines(at_dump + 5);
}

#[test]
fn cli_refused_pre_restore_restores_nothing() {
    refused_pre_restore("cli");
}

#[test]
fn swrk_refused_pre_restore_restores_nothing() {
    refused_pre_restore("swrk");
}

/// A pipe whose ends close on exec (tests run in parallel: no other child may inherit them).
fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe")
}

/// A counter writing into a pipe is dumped; the restore hands it a new pipe with `--inherit-fd fd[5]:pipe:[N]`
/// (fd 5 of the process driving CRIU): its output continues there.
fn inherited_pipe(driver: &str) {
    let DumpedWriter { before, k, mut cmd, resource, pid, dir: _dir } = dumped_pipe_writer(driver);
    let (r2, w2) = pipe();
    let spec = format!("fd[5]:{resource}");
    cmd.args(["--inherit-fd", &spec]);
    let w2_raw = w2.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if w2_raw == 5 {
                // dup2 onto itself would keep close-on-exec.
                if libc::fcntl(5, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(w2_raw, 5) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let restore = cmd.spawn().unwrap();
    drop(w2);
    let second = Lines::read(std::fs::File::from(r2));
    let out = restore.wait_with_output().unwrap();
    let (o, e) = text(&out);
    assert!(out.status.success(), "restore with --inherit-fd failed:\n{o}\n{e}");
    assert!(o.contains(&format!("PID {pid} exited: code 0")), "{o}");
    let after = numbers(&second.wait_closed(Duration::from_secs(10)));
    assert_continues(&before, k, &after);
}

/// As [`inherited_pipe`], the restored stdout being CRIU's own stdout (`RestoreCall::stdio`, a file here)
/// through `--inherit-fd fd[1]:pipe:[N]`.
fn inherited_stdio(driver: &str) {
    let DumpedWriter { before, k, mut cmd, resource, pid, dir } = dumped_pipe_writer(driver);
    let file = dir.path().join("restored.out");
    let spec = format!("fd[1]:{resource}");
    cmd.args(["--inherit-fd", &spec, "--stdio", s(&file)]);
    let out = cmd.output().unwrap();
    let (o, e) = text(&out);
    assert!(out.status.success(), "restore with --stdio failed:\n{o}\n{e}");
    assert!(o.contains(&format!("PID {pid} exited: code 0")), "{o}");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert_continues(&before, k, &numbers(&lines));
}

/// The restored counter's output `after` goes on from the `k` numbers `before` it, to 120.
fn assert_continues(before: &[u64], k: u64, after: &[u64]) {
    assert_eq!(before, (1..=k).collect::<Vec<_>>());
    // What sat unread in the old pipe at dump time is in `before` already; the new output starts no later than k+1.
    let start = after.first().copied().unwrap_or(0);
    assert!(start >= 1 && start <= k + 1, "the restored counter went on at {start}, dumped at {k}");
    assert_eq!(after, (start..=120).collect::<Vec<_>>(), "output after the restore");
}

/// A counter (to 120) that wrote into a pipe, dumped.
struct DumpedWriter {
    /// Its output up to the dump, and how many numbers that is.
    before: Vec<u64>,
    k: u64,
    /// The restore command to complete: `criu_drivers restore --driver D --dir IMAGES --wait`.
    cmd: Command,
    /// The pipe's `pipe:[N]`.
    resource: String,
    pid: i32,
    dir: tempfile::TempDir,
}

fn dumped_pipe_writer(driver: &str) -> DumpedWriter {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let (r1, w1) = pipe();
    let mut child = session_command(&workload_bin("counter")).args(["120", "0"]).stdout(Stdio::from(w1)).spawn().unwrap();
    let pid = child.id() as i32;
    let first = Lines::read(std::fs::File::from(r1));
    first.wait_for(10, Duration::from_secs(10));
    let resource = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap().to_string_lossy().into_owned();
    assert!(resource.starts_with("pipe:["), "{resource}");
    drive_ok(&["dump", "--driver", driver, "--pid", &pid.to_string(), "--dir", s(&images)]);
    child.wait().unwrap();
    let before = numbers(&first.wait_closed(Duration::from_secs(10)));
    let k = before.len() as u64;
    let mut cmd = Command::new(example());
    cmd.args(["restore", "--driver", driver, "--dir", s(&images), "--wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    DumpedWriter { before, k, cmd, resource, pid, dir }
}

#[test]
fn cli_restored_output_goes_to_an_inherited_pipe() {
    inherited_pipe("cli");
}

#[test]
fn swrk_restored_output_goes_to_an_inherited_pipe() {
    inherited_pipe("swrk");
}

#[test]
fn cli_restored_output_goes_to_the_given_stdio() {
    inherited_stdio("cli");
}

#[test]
fn swrk_restored_output_goes_to_the_given_stdio() {
    inherited_stdio("swrk");
}

/// One driver, two trees at once (one thread each, in one process): both dumped, both restored.
fn concurrent(driver: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut a = Workload::start(&workload_bin("counter"), &["150", "3"], &a_dir);
    let mut b = Workload::start(&workload_bin("counter"), &["150", "4"], &b_dir);
    a.wait_lines(5);
    b.wait_lines(5);
    let images = dir.path().join("images");
    let (pa, pb) = (a.pid.to_string(), b.pid.to_string());
    let (_, err) = drive_ok(&["dump", "--driver", driver, "--pid", &pa, "--pid", &pb, "--dir", s(&images)]);
    assert_eq!(err.matches("notify: post-dump").count(), 2, "{err}");
    a.reap();
    b.reap();
    let (ia, ib) = (images.join(&pa), images.join(&pb));
    let (out, _) = drive_ok(&["restore", "--driver", driver, "--dir", s(&ia), "--dir", s(&ib), "--wait"]);
    assert!(out.contains(&format!("PID {pa} exited: code 3")) && out.contains(&format!("PID {pb} exited: code 4")), "{out}");
    assert_counts_to(&a.lines(), 150, "counter a");
    assert_counts_to(&b.lines(), 150, "counter b");
}

#[test]
fn cli_dumps_and_restores_two_trees_at_once() {
    concurrent("cli");
}

#[test]
fn swrk_dumps_and_restores_two_trees_at_once() {
    concurrent("swrk");
}

/// `CriuOptions::extra` reaches `criu swrk` through its config file; what that file cannot say is refused
/// before CRIU starts, naming the argument.
#[test]
fn swrk_passes_extra_options_through_a_config_file() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(5);
    let pid = w.pid.to_string();
    let opts = "--skip-in-flight --ghost-limit 2M";
    let dump = ["dump", "--driver", "swrk", "--pid", &pid, "--dir", s(&images), "--leave-running", "--criu-opts", opts];
    drive_ok(&dump);
    let log = std::fs::read_to_string(dir.path().join("images.work").join("dump.log")).unwrap();
    assert!(log.contains("Will skip in-flight TCP connections"), "the config file's option must reach CRIU");
    assert!(alive(w.pid), "--leave-running");

    let bad = ["dump", "--driver", "swrk", "--pid", &pid, "--dir", s(&images), "--leave-running", "--criu-opts", "-D /x"];
    let (_, err) = drive_err(&bad);
    assert!(err.contains("\"-D\"") && err.contains("no RPC form"), "{err}");
    let unknown = ["dump", "--driver", "swrk", "--pid", &pid, "--dir", s(&images), "--leave-running", "--criu-opts", "--no-such"];
    let (_, err) = drive_err(&unknown);
    assert!(err.contains("criu dump failed") && err.contains("dump.conf"), "an option CRIU rejects is reported: {err}");
    assert!(alive(w.pid));
}
