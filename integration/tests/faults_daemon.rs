//! SIGKILL of the daemon in the middle of a job's dump and of its restore, then a restarted daemon: the
//! job's workload runs unfrozen (CRIU gives it back when the daemon is gone) or, for a restore, runs
//! correctly or is absent; no CRIU process is left; the restarted daemon removes what the killed one left
//! (hidden checkpoints, staging and work folders) and its job store is consistent: the job is `running`
//! with its process re-adopted when that process runs (never `halted` with its process alive), and no
//! checkpoint is recorded for a dump that did not finish.

use std::process::Stdio;
use std::time::Duration;

use cedana_integration::attach::KillOnDrop;
use cedana_integration::daemon::{printed_pid, Daemon};
use cedana_integration::invariants::*;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A daemon with its temporary and scratch folders in its own folder (where the test looks for leftovers).
fn daemon() -> (Daemon, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap().keep();
    let t = tmp.to_str().unwrap().to_string();
    let d = Daemon::start_with_env(&[("TMPDIR", &t), ("CEDANA_SCRATCH_DIR", &t)]);
    (d, tmp)
}

/// Run the memory workload (256 MiB) as job `jid`; its PID, log and first checksum.
fn run_memory_job(d: &Daemon, jid: &str) -> (i32, std::path::PathBuf, String) {
    let log = d.dir().join(format!("{jid}.log"));
    let memory = workload_bin("memory");
    let out = d.ok(&["run", "process", "--jid", jid, "--out", log.to_str().unwrap(), "--", memory.to_str().unwrap(), "256"]);
    let pid = printed_pid(&out);
    let sum = wait_for("the checksum", Duration::from_secs(60), || sums(&log).first().cloned());
    (pid, log, sum)
}

fn temporaries_of(d: &Daemon, tmp: &std::path::Path) -> Vec<String> {
    let mut v = temporaries(&d.checkpoints());
    v.extend(temporaries(tmp));
    v
}

/// Kill the daemon once `when` says the dump of the job reached its phase; check everything.
fn kill_daemon_mid_dump(compression: &str, when: impl Fn(&Daemon, i32)) {
    require_root();
    let (mut d, tmp) = daemon();
    let (pid, log, sum) = run_memory_job(&d, "big");
    let _guard = KillOnDrop(vec![pid]);
    let client = d
        .command(&["dump", "job", "big", "--compression", compression])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    when(&d, pid);
    d.kill_hard();
    let _ = client.wait_with_output();
    wait_for("no CRIU left", SETTLE, || criu_processes_under(d.dir()).is_empty().then_some(()));
    wait_for("no CRIU left", SETTLE, || criu_processes_under(&tmp).is_empty().then_some(()));
    assert_running_unfrozen(pid);
    assert_memory_intact(pid, &log, &sum);
    // The restarted daemon: the job runs (re-adopted), nothing is recorded, nothing is left.
    d.spawn();
    let row = d.row("big");
    // `ps` shows a running job's process state (`sleep`, `running`).
    assert_eq!(row[2], pid.to_string(), "the same process: {row:?}");
    assert!(["sleep", "running"].contains(&row[3].as_str()), "the job store after the crash: {row:?}\n{}", d.log());
    let checkpoints = d.ok(&["job", "checkpoints", "big"]);
    assert_eq!(checkpoints.lines().count(), 1, "no checkpoint recorded (header only): {checkpoints}");
    let left = temporaries_of(&d, &tmp);
    assert!(left.is_empty(), "the restarted daemon removes what the killed one left: {left:?}");
    let visible: Vec<String> = entries(&d.checkpoints()).into_iter().filter(|n| !n.starts_with('.')).collect();
    assert!(visible.is_empty(), "no checkpoint visible: {visible:?}");
    // The job is managed again: its exit is seen, and it can be dumped.
    d.ok(&["dump", "job", "big", "--compression", "lz4"]);
    assert_eq!(d.row("big")[3], "halted");
    d.ok(&["job", "delete", "big"]);
    let _ = std::fs::remove_dir_all(tmp);
}

#[test]
fn a_daemon_killed_while_criu_holds_a_job_frozen() {
    kill_daemon_mid_dump("none", |_, pid| {
        wait_until_seized(pid, Duration::from_secs(30));
    });
}

#[test]
fn a_daemon_killed_while_a_job_is_written() {
    kill_daemon_mid_dump("gzip", |d, _| wait_for_partial_checkpoint(&d.checkpoints(), 16 << 20));
}

#[test]
fn a_daemon_killed_mid_restore_leaves_the_job_running_or_halted_never_half() {
    require_root();
    let (mut d, tmp) = daemon();
    let (pid, log, sum) = run_memory_job(&d, "r");
    let _guard = KillOnDrop(vec![pid]);
    d.ok(&["dump", "job", "r", "--compression", "lz4"]);
    wait_for("the dumped job to be gone", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    let client = d.command(&["restore", "job", "r"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // As soon as the restored tree exists (CRIU holds it until its memory is loaded and verified).
    wait_for_fast("the restored tree", Duration::from_secs(60), || alive(pid).then_some(()));
    d.kill_hard();
    let _ = client.wait_with_output();
    wait_for("no CRIU left", SETTLE, || criu_processes_under(d.dir()).is_empty().then_some(()));
    wait_for("no CRIU left", SETTLE, || criu_processes_under(&tmp).is_empty().then_some(()));
    // Never left stopped: either gone or running.
    wait_for_fast("the restored tree to settle", SETTLE, || (!alive(pid) || !frozen_or_traced(pid)).then_some(()));
    let restored = alive(pid);
    d.spawn();
    let row = d.row("r");
    if restored {
        eprintln!("the restore went through: {row:?}");
        assert!(["sleep", "running"].contains(&row[3].as_str()), "a job whose process runs is running: {row:?}\n{}", d.log());
        assert_memory_intact(pid, &log, &sum);
    } else {
        eprintln!("nothing was restored: {row:?}");
        assert_eq!(row[3], "halted", "{row:?}");
        d.ok(&["restore", "job", "r"]);
        assert_memory_intact(pid, &log, &sum);
    }
    let left = temporaries_of(&d, &tmp);
    assert!(left.is_empty(), "the restarted daemon removes what the killed one left: {left:?}");
    d.ok(&["job", "kill", "r"]);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = std::fs::remove_dir_all(tmp);
}

/// The daemon killed while it uploads a job's dump to an object store: the workload runs on unfrozen with its
/// memory, no object appears, and the restarted daemon aborts the multipart upload the killed one left
/// pending (its journal), re-adopts the job and records no checkpoint.
#[test]
fn a_daemon_killed_while_it_uploads_a_job_to_an_object_store() {
    require_root();
    let moto = cedana_integration::moto::MotoServer::start();
    let tmp = tempfile::tempdir().unwrap().keep();
    let t = tmp.to_str().unwrap().to_string();
    let mut env: Vec<(&str, String)> = moto.env();
    env.extend([("TMPDIR", t.clone()), ("CEDANA_SCRATCH_DIR", t)]);
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Daemon::start_with_env(&vars);
    let (pid, log, sum) = run_memory_job(&d, "up");
    let _guard = KillOnDrop(vec![pid]);
    let client = d
        .command(&["dump", "job", "up", "--compression", "gzip", "--dir", &moto.url("daemon")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a part upload", Duration::from_secs(60), || moto.log().contains("partNumber=").then_some(()));
    d.kill_hard();
    let _ = client.wait_with_output();
    wait_for("no CRIU left", SETTLE, || criu_processes_under(&tmp).is_empty().then_some(()));
    assert_running_unfrozen(pid);
    assert_memory_intact(pid, &log, &sum);
    assert!(!moto.has_object("daemon/up.tar.gz"), "no object may appear");
    d.spawn();
    assert_store_clean(&moto, "daemon/");
    let row = d.row("up");
    assert!(["sleep", "running"].contains(&row[3].as_str()), "re-adopted: {row:?}\n{}", d.log());
    let checkpoints = d.ok(&["job", "checkpoints", "up"]);
    assert_eq!(checkpoints.lines().count(), 1, "no checkpoint recorded (header only): {checkpoints}");
    assert!(temporaries_of(&d, &tmp).is_empty(), "{:?}", temporaries_of(&d, &tmp));
    let _ = std::fs::remove_dir_all(tmp);
}
