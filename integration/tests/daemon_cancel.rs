//! A dump the daemon runs for a client is cancelled when that client goes away: `cedana dump job`
//! interrupted with SIGINT while the archive is being written leaves the job running (unfrozen, with its
//! memory), no checkpoint and no partial file, and the daemon says why in its log.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cedana_integration::daemon::{printed_pid, Daemon};
use cedana_integration::{alive, entries, wait_for, wait_for_partial_checkpoint, workload_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(30);

/// The `sum ...` lines the memory workload wrote into its log.
fn sums(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with("sum ")).map(str::to_string).collect()
}

#[test]
fn an_interrupted_dump_job_is_cancelled_in_the_daemon_and_the_job_runs_on() {
    let d = Daemon::start();
    let log = d.dir().join("memory.log");
    let memory = workload_bin("memory");
    let out = d.ok(&["run", "process", "--jid", "big", "--out", log.to_str().unwrap(), "--", memory.to_str().unwrap(), "512"]);
    let pid: i32 = printed_pid(&out);
    let before = wait_for("the memory checksum", Duration::from_secs(60), || sums(&log).first().cloned());

    let client = d
        .command(&["dump", "job", "big", "--compression", "gzip"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the archive is written (gzip is slow): the daemon holds the job frozen, the partial file grows.
    wait_for_partial_checkpoint(&d.checkpoints(), 4 << 20);
    let interrupted = Instant::now();
    kill(Pid::from_raw(client.id() as i32), Signal::SIGINT).unwrap();
    let result = client.wait_with_output().unwrap();
    assert!(!result.status.success(), "the interrupted client fails: {result:?}");

    // The daemon notices that its client went away, stops the dump and gives the job back.
    wait_for("the daemon to cancel the dump", T, || {
        (d.log().contains("the client went away") && d.log().contains("dump cancelled")).then_some(())
    });
    let row = wait_for("the job to run again", T, || {
        let row = d.row("big");
        (row[3] != "halted").then_some(row)
    });
    eprintln!("the job ran again {:?} after the interrupt", interrupted.elapsed());
    assert!(["sleep", "running"].contains(&row[3].as_str()), "{row:?}");
    assert_eq!(row[2], pid.to_string(), "the same process, not a restored one: {row:?}");
    assert!(alive(pid), "the job's process survives a cancelled dump");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(!stat.contains(") T ") && !stat.contains(") t "), "the process must not be left stopped: {stat}");
    wait_for("the staging folder to go", T, || entries(&d.checkpoints()).is_empty().then_some(()));
    let out = d.ok(&["job", "checkpoints", "big"]);
    assert_eq!(out.lines().count(), 1, "no checkpoint recorded (header only): {out}");

    // It kept its memory and works on.
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    let again = wait_for("the checksum after the cancelled dump", Duration::from_secs(60), || sums(&log).get(1).cloned());
    assert_eq!(again, before);
    // And it can still be dumped.
    d.ok(&["dump", "job", "big", "--compression", "lz4"]);
    assert_eq!(d.row("big")[3], "halted");
    d.ok(&["job", "delete", "big"]);
}
