//! Attaching to managed jobs through the daemon: `run process --attach` (stdin in, stdout and stderr out,
//! the exit code back), `job attach JID` and `attach PID` (Ctrl+C detaches, the job keeps running, a new
//! client gets the recent output and then live output; several clients at once), and the quick start with
//! attach: run attached, detach, dump, `restore job --attach`, and the output goes on without a gap or a
//! repeat. Each test runs its own daemon on a private socket, database and checkpoint folder.

use std::io::Write;
use std::process::Stdio;

use cedana_integration::attach::{client, KillOnDrop, WAIT};
use cedana_integration::daemon::{consecutive, numbers_in, printed_pid, Daemon};
use cedana_integration::lines::{numbers, Lines};
use cedana_integration::{alive, wait_for, workload_bin};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A daemon for these tests: its clients log warnings only (an attached client's stderr is the job's).
fn start() -> Daemon {
    Daemon::start().with_log_level("warn")
}

#[test]
fn run_attached_passes_stdin_in_and_output_and_exit_code_out() {
    let d = start();
    let mut child = d
        .command(&[
            "run",
            "process",
            "--attach",
            "--jid",
            "reader",
            "--",
            "sh",
            "-c",
            "read x; echo got:$x; echo err >&2; exit 3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let stdout = Lines::read(child.stdout.take().unwrap());
    let stderr = Lines::read(child.stderr.take().unwrap());
    let status = wait_for("the attached run to end", WAIT, || child.try_wait().unwrap());
    let (out, err) = (stdout.wait_closed(WAIT), stderr.wait_closed(WAIT));
    assert_eq!(status.code(), Some(3), "the job's exit code is ours; stdout {out:?}, stderr {err:?}\n{}", d.log());
    assert_eq!(out, ["got:hello"], "stdin went in, stdout came out");
    assert_eq!(err, ["err"], "stderr came out on our stderr");
    wait_for("the job to be recorded as exited", WAIT, || (d.row("reader")[3] == "exited").then_some(()));
    // Attaching to the exited job gives its recent output and exit code again.
    let out = d.cedana(&["job", "attach", "reader"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:hello\n");
}

#[test]
fn clients_attach_detach_and_attach_again_while_the_job_runs() {
    let d = start();
    let script = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done";
    let out = d.ok(&["run", "process", "--attachable", "--jid", "loop", "--", "sh", "-c", script]);
    assert!(out.starts_with("loop "), "{out}");
    let pid = printed_pid(&out);
    assert_eq!(d.row("loop").last().unwrap(), "[Attachable]");

    let mut first = client(&d, &["job", "attach", "loop"]);
    let seen = first.stdout.wait_numbers(10, WAIT);
    assert!(consecutive(&seen) && seen[0] == 0, "the output from the start (replay), in order: {seen:?}");
    first.detach("loop");
    let last_seen = *numbers(&first.stdout.snapshot()).last().unwrap();
    assert!(alive(pid), "detaching leaves the job running");
    assert_ne!(d.row("loop")[3], "exited");

    // Again, and by PID at the same time: both get the recent output, then live output.
    let mut again = client(&d, &["job", "attach", "loop"]);
    let mut by_pid = client(&d, &["attach", &pid.to_string()]);
    for client in [&again, &by_pid] {
        let v = wait_for("live output after the replay", WAIT, || {
            let v = numbers(&client.stdout.snapshot());
            (v.last().is_some_and(|&n| n > last_seen + 5)).then_some(v)
        });
        assert_eq!(v[0], 0, "the replay holds the output from the start: {:?}", &v[..5]);
        assert!(consecutive(&v), "replay then live output, without a gap or a repeat: {v:?}");
    }
    again.detach("loop");
    by_pid.detach("loop");
    assert!(alive(pid), "the job runs on after its clients detached");
    wait_for("the daemon to notice the three detaches", WAIT, || (d.log().matches("client detached").count() >= 3).then_some(()));

    // The job ending ends a client attached to it, with its exit code (128 + SIGTERM).
    let mut attached = client(&d, &["attach", &pid.to_string()]);
    attached.stdout.wait_numbers(1, WAIT);
    d.ok(&["job", "kill", "loop", "--signal", "15"]);
    assert_eq!(attached.wait().code(), Some(128 + 15));
    wait_for("the job to be recorded as exited", WAIT, || (d.row("loop")[3] == "exited").then_some(()));
}

#[test]
fn two_clients_share_the_jobs_stdin_and_output() {
    let d = start();
    let out = d.ok(&["run", "process", "--attachable", "--jid", "cat", "--", "cat"]);
    let pid = printed_pid(&out);
    let mut a = client(&d, &["job", "attach", "cat"]);
    let mut b = client(&d, &["attach", &pid.to_string()]);
    a.type_in("from a\n");
    b.type_in("from b\n");
    for client in [&a, &b] {
        client.stdout.wait_for(2, WAIT);
    }
    assert_eq!(a.stdout.snapshot(), b.stdout.snapshot(), "both see all the output");
    let mut lines = a.stdout.snapshot();
    lines.sort();
    assert_eq!(lines, ["from a", "from b"]);
    // End of file on one client's stdin closes the job's stdin: cat ends, and both clients with it.
    a.close_stdin();
    assert_eq!(a.wait().code(), Some(0));
    assert_eq!(b.wait().code(), Some(0));
    wait_for("the job to be recorded as exited", WAIT, || (d.row("cat")[3] == "exited").then_some(()));
}

#[test]
fn a_stopping_daemon_ends_its_attached_clients() {
    let mut d = start();
    let pid = printed_pid(&d.ok(&["run", "process", "--attachable", "--jid", "quiet", "--", "sleep", "60"]));
    let mut client = client(&d, &["job", "attach", "quiet"]);
    wait_for("the client to be attached", WAIT, || d.log().contains("client attached").then_some(()));
    // An open attach call does not hold up the daemon's shutdown.
    d.stop();
    let status = client.wait();
    let said = client.stderr.wait_closed(WAIT).join("\n");
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("lost the connection to the daemon") && said.contains("shutting down"), "{said}");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

#[test]
fn attaching_to_what_cannot_be_attached_to_says_why() {
    let d = start();
    let err = d.err(&["job", "attach", "nope"]);
    assert!(err.contains("there is no job nope") && err.contains("cedana ps"), "{err}");
    let log = d.dir().join("plain.log");
    let out = d.ok(&["run", "process", "--jid", "plain", "--out", log.to_str().unwrap(), "--", "sleep", "60"]);
    let pid = printed_pid(&out);
    let err = d.err(&["job", "attach", "plain"]);
    assert!(err.contains("not attachable") && err.contains(log.to_str().unwrap()) && err.contains("--attach"), "{err}");
    let err = d.err(&["attach", &pid.to_string()]);
    assert!(err.contains("job plain") && err.contains("not attachable"), "{err}");
    let err = d.err(&["attach", "999999999"]);
    assert!(err.contains("no managed job has PID 999999999"), "{err}");
    d.ok(&["job", "kill", "plain"]);
    wait_for("the job to end", WAIT, || (!alive(pid)).then_some(()));
}

#[test]
fn quick_start_attached_detach_dump_and_restore_attached_goes_on() {
    let d = start();
    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let mut run = client(
        &d,
        &["run", "process", "--attach", "--jid", "counter1", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()],
    );
    let seen = run.stdout.wait_numbers(10, WAIT);
    assert!(consecutive(&seen) && seen[0] == 1, "{seen:?}");
    run.detach("counter1");
    let pid: i32 = d.row("counter1")[2].parse().unwrap();
    assert!(alive(pid));

    // A client still attached when the job is checkpointed is told how to go on.
    let mut watcher = client(&d, &["job", "attach", "counter1"]);
    watcher.stdout.wait_numbers(seen.len() + 5, WAIT);
    let dumped = d.ok(&["dump", "job", "counter1"]);
    assert!(dumped.contains("dump-process-counter1-"), "{dumped}");
    let status = watcher.wait();
    let said = watcher.stderr.wait_closed(WAIT).join("\n");
    assert!(status.success(), "{status}: {said}");
    assert!(said.contains("was checkpointed") && said.contains("cedana restore job counter1 --attach"), "{said}");
    assert_eq!(d.row("counter1")[3], "halted");
    wait_for("the dumped job to be gone", WAIT, || (!alive(pid)).then_some(()));
    let err = d.err(&["job", "attach", "counter1"]);
    assert!(err.contains("halted") && err.contains("restore job counter1 --attach"), "{err}");
    let logged = numbers_in(&log);
    assert!(consecutive(&logged) && logged[0] == 1, "the log holds the output until the dump: {logged:?}");
    let before = *logged.last().unwrap();

    let mut restored = client(&d, &["restore", "job", "counter1", "--attach"]);
    let after = wait_for("output of the restored job", WAIT, || {
        let v = numbers(&restored.stdout.snapshot());
        (v.len() >= 10).then_some(v)
    });
    assert_eq!(
        after[0],
        before + 1,
        "the restored job goes on where the checkpoint stopped ({before}): {after:?}\nstderr: {:?}\ndaemon log:\n{}",
        restored.stderr.snapshot(),
        d.log()
    );
    assert!(consecutive(&after), "{after:?}");
    let all = numbers_in(&log);
    assert!(consecutive(&all), "the log goes on without a gap or a repeat: {all:?}");
    let row = d.row("counter1");
    assert!(row[3] == "sleep" || row[3] == "running", "the restored job runs: {row:?}");
    let new_pid: i32 = row[2].parse().unwrap();
    restored.detach("counter1");
    assert!(alive(new_pid), "detaching from the restored job leaves it running");

    // It can be attached to again, by PID too.
    let mut by_pid = client(&d, &["attach", &new_pid.to_string()]);
    let last = *after.last().unwrap();
    let v = wait_for("live output of the restored job", WAIT, || {
        let v = numbers(&by_pid.stdout.snapshot());
        (v.last().is_some_and(|&n| n > last + 5)).then_some(v)
    });
    assert!(consecutive(&v), "{v:?}");
    by_pid.detach("counter1");
    d.ok(&["job", "kill", "counter1"]);
    wait_for("the job's exit to be recorded", WAIT, || (d.row("counter1")[3] == "exited").then_some(()));
}

/// The stdio holders' sockets of a daemon (one per attachable job whose holder runs).
fn holder_sockets(d: &Daemon) -> Vec<String> {
    match std::fs::read_dir(d.dir().join("stdio")) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn attachable_jobs_outlive_a_stopped_or_killed_daemon_and_clients_attach_again_after_its_restart() {
    let mut d = start();
    let log = d.dir().join("loop.log");
    let script = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.01; done";
    let out =
        d.ok(&["run", "process", "--attachable", "--jid", "loop", "--out", log.to_str().unwrap(), "--", "sh", "-c", script]);
    let pid = printed_pid(&out);
    let cat = printed_pid(&d.ok(&["run", "process", "--attachable", "--jid", "cat", "--", "cat"]));
    let mut jobs = KillOnDrop(vec![pid, cat]);
    wait_for("a stdio holder per attachable job", WAIT, || (holder_sockets(&d).len() == 2).then_some(()));

    for (round, crash) in [(1, false), (2, true)] {
        let before = numbers_in(&log).len();
        if crash {
            d.kill_hard();
        } else {
            d.stop();
        }
        // Without the daemon the jobs go on: the output keeps flowing into the log (it would have died of
        // SIGPIPE at its next write with nobody holding its pipes), and cat's stdin stays open.
        wait_for("the log to grow while the daemon is away", WAIT, || (numbers_in(&log).len() > before + 50).then_some(()));
        assert!(alive(pid) && alive(cat), "round {round}: the jobs run without their daemon");
        d.spawn();
        // After the restart: attach, see live output continuing the count, type into cat.
        let mut watching = client(&d, &["job", "attach", "loop"]);
        let seen = watching.stdout.wait_numbers(20, WAIT);
        assert!(consecutive(&seen), "round {round}: live output in order: {seen:?}");
        watching.detach("loop");
        let mut typing = client(&d, &["job", "attach", "cat"]);
        typing.type_in(&format!("round {round}\n"));
        typing.stdout.wait_for(1, WAIT);
        assert_eq!(typing.stdout.snapshot(), [format!("round {round}")], "round {round}: stdin reaches the job again");
        typing.detach("cat");
        assert!(d.log().contains("re-adopted a running job"), "{}", d.log());
    }
    // Every line once, in order, across the daemon's two absences: the holder wrote while the daemon was away.
    let logged = numbers_in(&log);
    assert!(logged.len() > 150 && consecutive(&logged) && logged[0] == 0, "the log has no gap or repeat: {} lines", logged.len());

    // Closing stdin after a restart closes the holder's copy too: cat reads end of file and exits. (Its exit
    // status went to init with the old daemon's death: the client reports it unknown, 255.)
    let mut closing = client(&d, &["job", "attach", "cat"]);
    closing.close_stdin();
    assert_eq!(closing.wait().code(), Some(255));
    wait_for("cat to end", WAIT, || (!alive(cat)).then_some(()));
    d.ok(&["job", "kill", "loop"]);
    wait_for("the loop to end", WAIT, || (!alive(pid)).then_some(()));
    jobs.0.clear(); // both ended: their PIDs are no longer theirs
    wait_for("the holders to exit and remove their sockets", WAIT, || holder_sockets(&d).is_empty().then_some(()));
}
