//! The daemon against the real CRIU: the seed's quick start (run, ps, dump job, ps with the checkpoint,
//! restore job, output continues), persistence and re-adoption across a daemon restart, `manage`, and
//! bad input answered with the right error and nothing corrupted. Each test runs its own daemon on a
//! private socket, database and checkpoint folder, and stops it by PID.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cedana_integration::daemon::{consecutive, numbers_in, printed_pid, Daemon};
use cedana_integration::workload::session_command;
use cedana_integration::{alive, bin, require_root, wait_for, workload_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn wait_for_count(log: &Path, n: usize) -> Vec<u64> {
    cedana_integration::daemon::wait_for_count(log, n, Duration::from_secs(20))
}

#[test]
fn quick_start_run_ps_dump_restore_and_the_output_goes_on() {
    let d = Daemon::start();
    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let out = d.ok(&["run", "process", "--jid", "counter1", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let pid: i32 = printed_pid(&out);
    assert!(out.starts_with("counter1 "), "{out}");
    wait_for_count(&log, 5);
    let row = d.row("counter1");
    assert_eq!(&row[1..3], ["process", &pid.to_string()], "{row:?}");
    // Sleeping between counts, or caught counting (on a busy machine).
    assert!(row[3] == "sleep" || row[3] == "running", "{row:?}");
    assert_eq!(row[4], "no", "GPU column");
    assert_eq!(row.last().unwrap(), log.to_str().unwrap());

    let dumped = d.ok(&["dump", "job", "counter1"]);
    assert!(dumped.contains("dump-process-counter1-"), "the checkpoint is named after the job: {dumped}");
    let row = d.row("counter1");
    assert_eq!(row[3], "halted", "{row:?}");
    // "0 seconds ago", "1 second ago", ...: just taken.
    let text = row.join(" ");
    assert!(
        (text.contains(" seconds ago") || text.contains(" 1 second ago")) && text.contains("KiB"),
        "checkpoint time and size: {row:?}"
    );
    wait_for("the dumped job to be gone", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    let before = numbers_in(&log).len();

    let restored = d.ok(&["restore", "job", "counter1"]);
    assert!(restored.contains(&format!("as PID {pid}")), "{restored}");
    let after = wait_for_count(&log, before + 10);
    assert!(consecutive(&after), "the output goes on where it stopped: {after:?}");
    // Live again: sleeping between counts, or caught counting.
    let status = d.row("counter1")[3].clone();
    assert!(status == "sleep" || status == "running", "the restored job runs: {status}");
    let checkpoints = d.ok(&["job", "checkpoints", "counter1"]);
    assert_eq!(checkpoints.lines().count(), 2, "header + one checkpoint: {checkpoints}");
    assert!(checkpoints.lines().next().unwrap().split_whitespace().eq(["ID", "TIME", "SIZE", "PATH"]));

    d.ok(&["job", "kill", "counter1"]);
    wait_for("the job's exit to be recorded", Duration::from_secs(10), || (d.row("counter1")[3] == "exited").then_some(()));
    d.ok(&["job", "delete", "counter1"]);
    assert!(d.ps().is_empty());
}

#[test]
fn a_restarted_daemon_finds_its_jobs_readopts_the_living_and_marks_the_dead() {
    let mut d = Daemon::start();
    let counter = workload_bin("counter");
    let (la, lb) = (d.dir().join("a.log"), d.dir().join("b.log"));
    d.ok(&["run", "process", "--jid", "alive", "--out", la.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let out = d.ok(&["run", "process", "--jid", "dies", "--out", lb.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let dies: i32 = printed_pid(&out);
    wait_for_count(&la, 3);
    d.stop();
    // While no daemon runs: one job dies, the other keeps going.
    kill(Pid::from_raw(dies), Signal::SIGKILL).unwrap();
    let before = numbers_in(&la).len();
    wait_for_count(&la, before + 3);
    d.spawn();
    let alive_row = d.row("alive");
    assert_eq!(alive_row[3], "sleep", "re-adopted: {alive_row:?}");
    wait_for("the dead job to be marked", Duration::from_secs(10), || {
        let s = d.row("dies")[3].clone();
        (s == "lost" || s == "exited").then_some(())
    });
    // The re-adopted job's exit is still recorded.
    d.ok(&["job", "kill", "alive"]);
    wait_for("the re-adopted job's exit", Duration::from_secs(10), || (d.row("alive")[3] == "exited").then_some(()));
    d.restart();
    assert_eq!(d.ps().len(), 2, "the store survives restarts");
}

#[test]
fn manage_adopts_a_running_process_once() {
    let d = Daemon::start();
    let counter = workload_bin("counter");
    let mut child = session_command(&counter).stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id() as i32;
    let out = d.ok(&["manage", "process", &pid.to_string(), "--jid", "adopted"]);
    assert!(out.starts_with("adopted "), "{out}");
    assert_eq!(d.row("adopted")[2], pid.to_string());
    let again = d.err(&["manage", "process", &pid.to_string()]);
    assert!(again.contains("already") && again.contains("adopted"), "{again}");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the adopted process's exit", Duration::from_secs(10), || (d.row("adopted")[3] == "exited").then_some(()));
}

#[test]
fn bad_input_gets_the_right_code_and_changes_nothing() {
    let d = Daemon::start();
    let err = d.err(&["dump", "job", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = d.err(&["restore", "job", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let log = d.dir().join("c.log");
    let counter = workload_bin("counter");
    d.ok(&["run", "process", "--jid", "c", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let err = d.err(&["run", "process", "--jid", "c", "--", "/bin/true"]);
    assert!(err.contains("already exists"), "{err}");
    let err = d.err(&["restore", "job", "c"]);
    assert!(err.contains("running") && err.contains("failed precondition"), "{err}");
    wait_for_count(&log, 3);
    d.ok(&["dump", "job", "c"]);
    let err = d.err(&["dump", "job", "c"]);
    assert!(err.contains("halted") && err.contains("failed precondition"), "dumping a job that is not running: {err}");
    // A checkpoint deleted behind the store's back.
    let cp = d.ok(&["job", "checkpoints", "c"]);
    let path = cp.lines().nth(1).unwrap().split_whitespace().last().unwrap().to_string();
    std::fs::remove_file(&path).unwrap();
    let err = d.err(&["restore", "job", "c"]);
    assert!(err.contains("no checkpoint at") && err.contains("not found"), "{err}");
    assert_eq!(d.row("c")[3], "halted", "the job is as it was");
    let err = d.err(&["job", "delete", "nope"]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn commands_say_when_the_daemon_is_not_running() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("cedana")).arg("ps").env("CEDANA_ADDRESS", dir.path().join("none.sock")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("daemon is not running") && err.contains("cedana daemon start"), "{err}");
}

#[test]
fn a_job_with_children_is_restored_right_after_its_dump() {
    // The shell's `sleep` children die with it at the dump and are re-parented to the daemon as zombies
    // holding the job's PID as their process group: the daemon must reap them before the restore needs it.
    let d = Daemon::start();
    let log = d.dir().join("loop.log");
    let script = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done";
    d.ok(&["run", "process", "--jid", "loop", "--out", log.to_str().unwrap(), "--", "/bin/sh", "-c", script]);
    for round in 0..3 {
        let before = wait_for_count(&log, 5 * (round + 1)).len();
        d.ok(&["dump", "job", "loop"]);
        d.ok(&["restore", "job", "loop"]);
        let after = wait_for_count(&log, before + 5);
        assert!(consecutive(&after), "round {round}: {after:?}");
    }
    // Jobs outlive their daemon: end this one.
    d.ok(&["job", "kill", "loop"]);
}
