//! runc containers as managed jobs, against the real runc and CRIU: `run runc` (the daemon creates and starts
//! the container), `ps`, `dump job` (the container is checkpointed and gone), `restore job` (it counts on
//! without a gap), kill and delete; `manage runc` of a container started with plain `runc run -d`;
//! `manage --upcoming runc` and `manage --upcoming process --name`, which wait in a client until the
//! workload appears (and stop waiting when the client goes away). Each test runs its own daemon on private
//! state, and containers under a private runc root, with ids of their own (cgroups are named after them).
//!
//! The counter containers write their progress to a file inside their rootfs (`/count`), which the test
//! reads from the host; their stdio is /dev/null (the daemon's default for runc jobs).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cedana_integration::daemon::{numbers_in, wait_for_count, Daemon};
use cedana_integration::engines::{wait_child, RuncRoot};
use cedana_integration::images::Bundle;
use cedana_integration::workload::session_command;
use cedana_integration::{alive, wait_for, workload_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(20);

/// Counts 0, 1, 2, ... into /count inside the container, every 100 ms.
const COUNT_TO_FILE: &str = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.1; done";

/// A name unique to this test run (container ids name cgroups, which are shared by every runc root).
fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// A busybox bundle at `dir` counting into its rootfs's /count.
fn counting_bundle(dir: &Path) -> Bundle {
    Bundle::busybox(dir, &["sh", "-c", COUNT_TO_FILE])
}

/// The numbers the container wrote into /count so far.
fn counts(bundle: &Bundle) -> Vec<u64> {
    numbers_in(&bundle.rootfs().join("count"))
}

fn wait_counts(bundle: &Bundle, n: usize) -> Vec<u64> {
    wait_for_count(&bundle.rootfs().join("count"), n, T)
}

/// 0, 1, 2, ... with no gap and no repeat.
fn from_zero_without_gaps(v: &[u64]) -> bool {
    v.iter().enumerate().all(|(i, n)| *n == i as u64)
}

fn runc_pid(runc: &RuncRoot, id: &str) -> i32 {
    runc.state(id).unwrap_or_else(|| panic!("container {id} exists"))["pid"].as_i64().unwrap() as i32
}

fn listed(runc: &RuncRoot, id: &str) -> bool {
    runc.ok(&["list", "-q"]).lines().any(|l| l.trim() == id)
}

/// The PID a `run` or `manage` printed after the job id.
fn printed_pid(out: &str, jid: &str) -> i32 {
    assert!(out.starts_with(&format!("{jid} ")), "{out}");
    cedana_integration::daemon::printed_pid(out)
}

#[test]
fn a_runc_job_runs_is_dumped_and_restored_and_counts_on_without_a_gap() {
    let d = Daemon::start();
    let runc = RuncRoot::new(d.dir(), "runc");
    let root = runc.root.to_str().unwrap().to_string();
    let bundle = counting_bundle(&d.dir().join("bundle"));
    let jid = unique("counting");
    runc.track(&jid);
    let started = Instant::now();
    let out = d.ok(&["run", "runc", "--bundle", bundle.dir.to_str().unwrap(), "--root", &root, "--jid", &jid, "--detach"]);
    let pid = printed_pid(&out, &jid);
    eprintln!("run runc: {:?}", started.elapsed());
    assert_eq!(pid, runc_pid(&runc, &jid), "the job's PID is the container's init; the container id is the job id");
    assert_eq!(runc.status(&jid).as_deref(), Some("running"));
    wait_counts(&bundle, 5);
    let row = d.row(&jid);
    assert_eq!(row[1], "runc", "{row:?}");
    assert_eq!(row[2], pid.to_string(), "{row:?}");
    assert!(["sleep", "running"].contains(&row[3].as_str()), "{row:?}");
    // runc run --detach left the init to the daemon, a subreaper: it is the daemon's child.
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<i32>()
        .unwrap();
    assert_eq!(ppid, d.pid(), "the container's init is re-parented to the daemon");

    let t = Instant::now();
    let dumped = d.ok(&["dump", "job", &jid]);
    eprintln!("dump job: {:?}", t.elapsed());
    assert!(dumped.contains(&format!("dump-runc-{jid}-")), "the checkpoint is named after the job: {dumped}");
    let row = d.row(&jid);
    assert_eq!(row[3], "halted", "{row:?}");
    assert!(row.join(" ").contains("ago"), "the checkpoint is recorded: {row:?}");
    assert!(!listed(&runc, &jid), "the dumped container is gone from runc list");
    wait_for("the dumped init to be gone", T, || (!alive(pid)).then_some(()));
    let before = counts(&bundle);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(counts(&bundle), before, "nothing counts while the job is halted");

    let t = Instant::now();
    let restored = d.ok(&["restore", "job", &jid]);
    eprintln!("restore job: {:?}", t.elapsed());
    let new_pid = runc_pid(&runc, &jid);
    assert!(restored.contains(&format!("as PID {new_pid}")), "{restored}\nrunc state: {:?}", runc.state(&jid));
    assert_eq!(runc.status(&jid).as_deref(), Some("running"));
    let row = d.row(&jid);
    assert!(["sleep", "running"].contains(&row[3].as_str()), "{row:?}");
    assert_eq!(row[2], new_pid.to_string(), "{row:?}");
    let after = wait_counts(&bundle, before.len() + 10);
    assert!(from_zero_without_gaps(&after), "the count goes on where it stopped: {after:?}");

    d.ok(&["job", "kill", &jid]);
    d.wait_status(&jid, &["exited"]);
    d.ok(&["job", "delete", &jid]);
    assert!(d.ps().is_empty(), "{:?}", d.ps());
    assert!(!listed(&runc, &jid), "deleting the job removes its stopped container");
}

#[test]
fn a_runc_job_with_a_log_keeps_logging_through_a_dump_and_restore_and_a_daemon_crash() {
    // stdout through pipes the daemon holds (a host file as the container's stdout could not be dumped).
    let mut d = Daemon::start();
    let runc = RuncRoot::new(d.dir(), "runc");
    let bundle = Bundle::counter(&d.dir().join("bundle"));
    let (jid, id) = (unique("logging"), unique("logging-ctr"));
    runc.track(&id);
    let log = d.dir().join("out.log");
    let root = runc.root.to_str().unwrap();
    let bdir = bundle.dir.to_str().unwrap();
    let out = d.ok(&["run", "runc", "-b", bdir, "--root", root, "--jid", &jid, "--id", &id, "--out", log.to_str().unwrap()]);
    printed_pid(&out, &jid);
    assert_eq!(d.row(&jid).last().unwrap(), log.to_str().unwrap(), "the LOG column");
    let numbers = || numbers_in(&log);
    wait_for("output in the log", T, || (numbers().len() >= 3).then_some(()));
    d.ok(&["dump", "job", &jid, "--compression", "zstd"]);
    assert_eq!(d.row(&jid)[3], "halted");
    let before = numbers().len();
    d.ok(&["restore", "job", &jid]);
    let after = wait_for("the restored container to log on", T, || {
        let v = numbers();
        (v.len() >= before + 5).then_some(v)
    });
    assert!(from_zero_without_gaps(&after), "{after:?}");
    // The daemon crashes: the container's output goes on into the log through its stdio holder (with no
    // reader left it would die of SIGPIPE), and the restarted daemon takes its pipes back.
    d.kill_hard();
    let down = numbers().len();
    wait_for("the log to grow while the daemon is away", T, || (numbers().len() >= down + 3).then_some(()));
    d.spawn();
    let back = numbers().len();
    wait_for("the log to grow after the restart", T, || (numbers().len() >= back + 3).then_some(()));
    assert!(from_zero_without_gaps(&numbers()), "{:?}", numbers());
    assert!(["running", "sleep"].contains(&d.row(&jid)[3].as_str()), "{:?}", d.row(&jid));
    d.ok(&["job", "kill", &jid]);
    d.wait_status(&jid, &["exited"]);
    d.ok(&["job", "delete", &jid]);
}

#[test]
fn manage_adopts_a_container_started_with_plain_runc() {
    let d = Daemon::start();
    let runc = RuncRoot::new(d.dir(), "runc");
    let bundle = counting_bundle(&d.dir().join("bundle"));
    let id = unique("adopted");
    runc.track(&id);
    let st = runc
        .cmd(&["run", "--detach", "--bundle", bundle.dir.to_str().unwrap(), &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    wait_counts(&bundle, 3);
    let jid = "adopted-job";
    let out = d.ok(&["manage", "runc", &id, "--root", runc.root.to_str().unwrap(), "--jid", jid]);
    let pid = printed_pid(&out, jid);
    assert_eq!(pid, runc_pid(&runc, &id));
    let row = d.row(jid);
    assert_eq!(&row[1..3], ["runc", &pid.to_string()], "{row:?}");
    let again = d.cedana(&["manage", "runc", &id, "--root", runc.root.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("already") && err.contains(jid), "{err}");

    // An adopted container is dumped and restored like one the daemon started.
    d.ok(&["dump", "job", jid]);
    assert_eq!(d.row(jid)[3], "halted");
    assert!(!listed(&runc, &id));
    let before = counts(&bundle).len();
    d.ok(&["restore", "job", jid]);
    let after = wait_counts(&bundle, before + 5);
    assert!(from_zero_without_gaps(&after), "{after:?}");
    d.ok(&["job", "kill", jid]);
    d.wait_status(jid, &["exited"]);
    d.ok(&["job", "delete", jid]);
}

#[test]
fn manage_upcoming_runc_waits_until_the_container_runs() {
    let d = Daemon::start();
    let runc = RuncRoot::new(d.dir(), "runc");
    let bundle = counting_bundle(&d.dir().join("bundle"));
    let id = unique("upcoming");
    runc.track(&id);
    let root = runc.root.to_str().unwrap();
    let jid = "upcoming-job";
    let mut waiting = d
        .command(&["manage", "--upcoming", "runc", &id, "--root", root, "--jid", jid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(waiting.try_wait().unwrap().is_none(), "manage --upcoming waits while there is no container");
    assert!(d.ps().is_empty());
    // `runc create` first: a created container does not run yet, and is not adopted before it starts.
    runc.cmd(&["create", "--bundle", bundle.dir.to_str().unwrap(), &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(waiting.try_wait().unwrap().is_none(), "a created container that does not run yet is not adopted");
    let started = Instant::now();
    runc.ok(&["start", &id]);
    let status = wait_child(&mut waiting, T);
    eprintln!("adopted {:?} after the container started", started.elapsed());
    let mut out = String::new();
    std::io::Read::read_to_string(waiting.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "manage --upcoming: {out} / daemon log:\n{}", d.log());
    let pid = printed_pid(&out, jid);
    assert_eq!(pid, runc_pid(&runc, &id));
    assert_eq!(&d.row(jid)[1..3], ["runc", &pid.to_string()]);
    wait_counts(&bundle, 3);
    d.ok(&["job", "kill", jid]);
    d.wait_status(jid, &["exited"]);
}

#[test]
fn a_client_that_stops_waiting_ends_the_wait_in_the_daemon() {
    let d = Daemon::start();
    let runc = RuncRoot::new(d.dir(), "runc");
    let mut waiting = d
        .command(&["manage", "--upcoming", "runc", "never-created", "--root", runc.root.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the daemon to wait", T, || d.log().contains("waiting for an upcoming workload").then_some(()));
    kill(Pid::from_raw(waiting.id() as i32), Signal::SIGINT).unwrap();
    assert!(!waiting.wait().unwrap().success());
    wait_for("the daemon to stop waiting", T, || d.log().contains("stopped waiting: the client went away").then_some(()));
    assert!(d.ps().is_empty());
}

#[test]
fn manage_upcoming_process_adopts_the_process_of_that_name() {
    let d = Daemon::start();
    // A program whose command name (/proc/PID/comm, the file name) is ours alone.
    let name = format!("cdw{}", std::process::id() % 1_000_000);
    let program = d.dir().join(&name);
    std::fs::copy(workload_bin("counter"), &program).unwrap();
    let jid = "by-name";
    let mut waiting = d
        .command(&["manage", "--upcoming", "process", "--name", &name, "--jid", jid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(waiting.try_wait().unwrap().is_none(), "waits while no process has that name");
    let mut child = session_command(&program).stdout(Stdio::null()).spawn().unwrap();
    let status = wait_child(&mut waiting, T);
    let mut out = String::new();
    std::io::Read::read_to_string(waiting.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "manage --upcoming process: {out} / daemon log:\n{}", d.log());
    assert_eq!(printed_pid(&out, jid), child.id() as i32);
    assert_eq!(&d.row(jid)[1..3], ["process", &child.id().to_string()]);
    // Already a job: a second wait does not take it again.
    let mut second = d.command(&["manage", "--upcoming", "process", "--name", &name]).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(second.try_wait().unwrap().is_none(), "a process that is a job already is not adopted twice");
    let _ = second.kill();
    let _ = second.wait();
    child.kill().unwrap();
    child.wait().unwrap();
    d.wait_status(jid, &["exited"]);
}

#[test]
fn dump_runc_goes_through_the_daemon_when_it_runs_and_restores() {
    let d = Daemon::start();
    let runc = RuncRoot::new(d.dir(), "runc");
    let root = runc.root.to_str().unwrap().to_string();
    let id = unique("via-daemon");
    let (bundle, out) = runc.run_counter(&d.dir().join("c"), &id, 3, T);
    runc.track(&id);
    let dir = d.dir().join("cps");
    let dumped = d.ok(&["dump", "runc", &id, "--root", &root, "--dir", dir.to_str().unwrap(), "--name", "viad"]);
    let path = dir.join("viad.tar");
    assert_eq!(dumped.lines().last(), Some(format!("checkpoint  {}", path.display()).as_str()), "{dumped}");
    assert!(path.is_file());
    let log = d.log();
    assert!(log.contains("dump requested") && log.contains(&id), "the daemon did the dump:\n{log}");
    assert_eq!(runc.status(&id), None, "the dump ends the container");
    let before = cedana_integration::lines::numbers(&out.snapshot());

    // The checkpoint restores (here, in this process) and the counter goes on.
    let copy = unique("via-daemon-restored");
    runc.track(&copy);
    let mut restore = cedana_integration::cedana_cmd(&[
        "restore",
        "runc",
        "--path",
        path.to_str().unwrap(),
        "--id",
        &copy,
        "--bundle",
        bundle.dir.to_str().unwrap(),
        "--root",
        &root,
        "--detach",
    ]);
    let lines = cedana_integration::engines::piped(&mut restore);
    let status = restore.status().unwrap();
    assert!(status.success());
    let next = wait_for("the restored counter to print", T, || {
        let n = cedana_integration::lines::numbers(&lines.snapshot());
        (n.len() >= 2).then_some(n)
    });
    assert_eq!(next[0], before.last().unwrap() + 1, "the restored counter goes on: {before:?} then {next:?}");
}
