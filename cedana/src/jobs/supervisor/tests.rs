use super::sweep::{parse_stat, zombie_children};
use super::*;
use crate::jobs::attach::{Chunk, RecvError, REPLAY_BYTES, SUBSCRIBER_BACKLOG};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// Tests that make their process a subreaper, sweep every zombie child of it, or open descriptors
/// without close-on-exec run in a helper process of their own (this test binary, re-run with one test
/// selected): other tests of the binary wait for children of their own.
const HELPER_ENV: &str = "CEDANA_SUPERVISOR_TEST_HELPER";

fn run_in_helper(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([&format!("jobs::supervisor::tests::{name}"), "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, name)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("1 passed"), "helper {name} failed:\n{stdout}\n{stderr}");
}

fn in_helper(name: &str) -> bool {
    std::env::var(HELPER_ENV).as_deref() == Ok(name)
}

/// A supervisor without the periodic sweep (safe beside the other tests of this binary).
fn quiet() -> (Supervisor, Receiver<JobEvent>) {
    let (tx, rx) = channel();
    (Supervisor::with_config(tx, SupervisorConfig { sweep_interval: None, holder: None }).unwrap(), rx)
}

fn sh(script: &str, output: Output) -> SpawnSpec {
    SpawnSpec::new(["sh", "-c", script], output)
}

fn exit_of(rx: &Receiver<JobEvent>, pid: i32, serial: u64) -> Option<ExitInfo> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(JobEvent::Exited { pid: p, serial: s, status }) if s == serial => {
                assert_eq!(p, pid);
                return status;
            }
            Ok(_) => {}
            Err(e) => panic!("no exit event for {pid}: {e}"),
        }
    }
}

/// Everything a subscription yields until it ends: (stdout, stderr, exit chunk, how it ended).
fn drain(sub: &mut Subscription) -> (Vec<u8>, Vec<u8>, Option<Option<ExitInfo>>, RecvError) {
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
    loop {
        match sub.recv_timeout(Duration::from_secs(20)) {
            Ok(Chunk::Stdout(d)) => out.extend(d),
            Ok(Chunk::Stderr(d)) => err.extend(d),
            Ok(Chunk::Exit(s)) => {
                assert!(exit.is_none(), "two exits");
                exit = Some(s);
            }
            Err(RecvError::Timeout) => panic!("subscription stalled"),
            Err(end) => return (out, err, exit, end),
        }
    }
}

/// Read stdout chunks until `want` has been seen.
fn read_until(sub: &mut Subscription, want: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !out.windows(want.len()).any(|w| w == want) {
        match sub.recv_timeout(Duration::from_secs(20)) {
            Ok(Chunk::Stdout(d)) => out.extend(d),
            Ok(_) => {}
            Err(e) => panic!("waiting for {:?}: {e}; got {:?}", String::from_utf8_lossy(want), String::from_utf8_lossy(&out)),
        }
    }
    out
}

fn proc_state(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|(state, ppid, _)| (state, ppid))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn me() -> i32 {
    std::process::id() as i32
}

#[test]
fn log_job_gets_both_streams_and_its_exit_code() {
    let (sup, rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    let job = sup.spawn(&sh("echo out; echo err >&2; exit 7", Output::Log(log.clone()))).unwrap();
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(7)));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!sup.is_supervised(job.pid));
    // Appended, with the environment and working directory asked for.
    let mut spec = sh("echo \"$GREETING from $(pwd)\"", Output::Log(log.clone()));
    spec.env.push(("GREETING".into(), "hello".into()));
    spec.cwd = Some(dir.path().to_path_buf());
    let job = sup.spawn(&spec).unwrap();
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text, format!("out\nerr\nhello from {}\n", dir.path().canonicalize().unwrap().display()));
}

#[test]
fn attachable_cat_echoes_stdin_and_exits_zero() {
    let (sup, rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cat.log");
    let job = sup.spawn(&SpawnSpec::new(["cat"], Output::Attachable { log: Some(log.clone()) })).unwrap();
    let mut sub = sup.subscribe(job.pid).unwrap();
    sup.write_stdin(job.pid, b"hello\n").unwrap();
    assert_eq!(read_until(&mut sub, b"hello\n"), b"hello\n");
    sup.write_stdin(job.pid, b"again\n").unwrap();
    assert_eq!(read_until(&mut sub, b"again\n"), b"again\n");
    sup.close_stdin(job.pid).unwrap();
    let (out, err, exit, end) = drain(&mut sub);
    assert!(out.is_empty() && err.is_empty());
    assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
    assert_eq!(end, RecvError::Ended);
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\nagain\n");
    let e = sup.write_stdin(job.pid, b"late").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
}

#[test]
fn late_subscribers_get_the_replay() {
    let (sup, rx) = quiet();
    let script = "echo early; echo early-err >&2; read line; echo \"late $line\"";
    let job = sup.spawn(&sh(script, Output::Attachable { log: None })).unwrap();
    // Nobody subscribed while the first lines were written: a subscriber sees them from the replay.
    let mut sub = loop {
        let mut sub = sup.subscribe(job.pid).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Ok(chunk) = sub.recv_timeout(Duration::from_millis(50)) {
            match chunk {
                Chunk::Stdout(d) => out.extend(d),
                Chunk::Stderr(d) => err.extend(d),
                Chunk::Exit(s) => panic!("exited early: {s:?}"),
            }
        }
        if out == b"early\n" && err == b"early-err\n" {
            break sub;
        }
    };
    sup.write_stdin(job.pid, b"x\n").unwrap();
    let (out, err, exit, _) = drain(&mut sub);
    assert_eq!((out.as_slice(), err.as_slice()), (&b"late x\n"[..], &b""[..]));
    assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    // After the exit: the whole replay, then the exit.
    let (out, err, exit, end) = drain(&mut sup.subscribe(job.pid).unwrap());
    assert_eq!(out, b"early\nlate x\n");
    assert_eq!(err, b"early-err\n");
    assert_eq!((exit, end), (Some(Some(ExitInfo::Exited(0))), RecvError::Ended));

    // The replay holds the last 64 KiB only.
    let job = sup.spawn(&sh("head -c 200000 /dev/zero | tr '\\0' a; echo END", Output::Attachable { log: None })).unwrap();
    // The exit event can come before the pump has read everything: wait for the hub's exit chunk.
    let (all, _, _, _) = drain(&mut sup.subscribe(job.pid).unwrap());
    assert!(all.len() <= 200_004 && all.ends_with(b"END\n"), "{}", all.len());
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    let (out, _, exit, _) = drain(&mut sup.subscribe(job.pid).unwrap());
    assert_eq!(out.len(), REPLAY_BYTES);
    assert!(out.ends_with(b"aaaaEND\n") && out[..REPLAY_BYTES - 4].iter().all(|b| *b == b'a'));
    assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
    sup.release(job.pid);
    assert_eq!(sup.subscribe(job.pid).unwrap_err().kind(), ErrorKind::FailedPrecondition);
}

#[test]
fn slow_subscriber_is_disconnected_without_blocking_the_job() {
    let (sup, rx) = quiet();
    // 6.4 MiB, paced so that a reading subscriber keeps up even on a loaded machine, while one that
    // never reads passes the 4 MiB limit.
    const TOTAL: usize = 100 * 65536;
    let script = "i=0; while [ $i -lt 100 ]; do head -c 65536 /dev/zero; sleep 0.01; i=$((i+1)); done";
    let job = sup.spawn(&sh(script, Output::Attachable { log: None })).unwrap();
    let mut idle = sup.subscribe(job.pid).unwrap();
    let mut active = sup.subscribe(job.pid).unwrap();
    let reader = std::thread::spawn(move || {
        let (out, _, exit, end) = drain(&mut active);
        (out.len(), exit, end)
    });
    // The idle subscriber never reads while the job runs, and the job finishes all the same.
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    assert_eq!(reader.join().unwrap(), (TOTAL, Some(Some(ExitInfo::Exited(0))), RecvError::Ended));
    let (out, _, exit, end) = drain(&mut idle);
    // What it gets: the replay of when it subscribed (held apart, at most REPLAY_BYTES), then at most the
    // backlog's worth of queued chunks.
    assert!(out.len() <= REPLAY_BYTES + SUBSCRIBER_BACKLOG && !out.is_empty(), "{}", out.len());
    assert_eq!((exit, end), (None, RecvError::Lagged));
    assert!(idle.lagged());
}

#[test]
fn watch_reports_the_exit_of_a_non_child_without_status() {
    let (sup, rx) = quiet();
    let out = Command::new("sh").args(["-c", "sleep 1 >/dev/null 2>&1 & echo $!"]).output().unwrap();
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let started = Instant::now();
    let serial = sup.watch(pid).unwrap();
    assert!(sup.is_supervised(pid));
    assert_eq!(sup.watch(pid).unwrap_err().kind(), ErrorKind::AlreadyExists);
    assert_eq!(exit_of(&rx, pid, serial), None);
    assert!(started.elapsed() >= Duration::from_millis(300), "reported too early: {:?}", started.elapsed());
    assert!(!sup.is_supervised(pid));
    let missing = sup.watch(i32::MAX).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
}

#[test]
fn adopt_child_reports_the_real_status() {
    let (sup, rx) = quiet();
    let (pid, serial) = {
        let _scope = sup.fork_scope();
        // Reaped by the supervisor.
        let pid = Command::new("sh").args(["-c", "sleep 0.2; exit 3"]).spawn().unwrap().id() as i32;
        (pid, sup.adopt_child(pid).unwrap())
    };
    assert_eq!(exit_of(&rx, pid, serial), Some(ExitInfo::Exited(3)));
    assert!(proc_state(pid).is_none(), "not reaped");
    // Already exited (a zombie) when adopted.
    let (pid, serial) = {
        let _scope = sup.fork_scope();
        // Reaped by the supervisor.
        let pid = Command::new("sh").args(["-c", "kill -9 $$"]).spawn().unwrap().id() as i32;
        wait_for("the child to die", || proc_state(pid).is_some_and(|(s, _)| s == 'Z'));
        (pid, sup.adopt_child(pid).unwrap())
    };
    assert_eq!(exit_of(&rx, pid, serial), Some(ExitInfo::Signaled(libc::SIGKILL)));
    let e = sup.adopt_child(1).unwrap_err();
    assert!(matches!(e, SupervisorError::NotAChild(1)) && e.kind() == ErrorKind::FailedPrecondition, "{e}");
    assert!(lock(&sup.core().state).exclusions.is_empty());
}

#[test]
fn signals_reach_supervised_processes_only() {
    let (sup, rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    let job = sup.spawn(&SpawnSpec::new(["sleep", "30"], Output::Log(dir.path().join("l")))).unwrap();
    sup.signal(job.pid, libc::SIGTERM).unwrap();
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Signaled(libc::SIGTERM)));
    let e = sup.signal(job.pid, libc::SIGTERM).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // The group: the job and what it started.
    let log = dir.path().join("group");
    let job = sup.spawn(&sh("sleep 30 & echo $!; wait", Output::Log(log.clone()))).unwrap();
    wait_for("the background pid", || std::fs::read_to_string(&log).is_ok_and(|t| t.ends_with('\n')));
    let bg: i32 = std::fs::read_to_string(&log).unwrap().trim().parse().unwrap();
    let e = sup.signal(job.pid, 1000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    sup.signal_group(job.pid, libc::SIGKILL).unwrap();
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Signaled(libc::SIGKILL)));
    wait_for("the background sleep to die", || proc_state(bg).is_none_or(|(s, _)| s == 'Z'));
}

#[test]
fn restored_pipes_feed_a_new_hub() {
    let (sup, rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("restored.log");
    let pipes = sup.prepare_restore_pipes(Some(&log)).unwrap();
    // Stands in for CRIU: a process whose fds 0-2 are the child's ends.
    let scope = sup.fork_scope();
    let pid = {
        let mut cmd = Command::new("cat");
        cmd.stdin(Stdio::from(pipes.stdin)).stdout(Stdio::from(pipes.stdout)).stderr(Stdio::from(pipes.stderr));
        cmd.spawn().unwrap().id() as i32
    };
    let serial = sup.attach_restored(pipes.handle, pid, true).unwrap();
    drop(scope);
    let mut sub = sup.subscribe(pid).unwrap();
    sup.write_stdin(pid, b"restored\n").unwrap();
    assert_eq!(read_until(&mut sub, b"restored\n"), b"restored\n");
    sup.close_stdin(pid).unwrap();
    let (_, _, exit, _) = drain(&mut sub);
    assert_eq!(exit, Some(Some(ExitInfo::Exited(0))));
    assert_eq!(exit_of(&rx, pid, serial), Some(ExitInfo::Exited(0)));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "restored\n");
}

#[test]
fn errors_have_kinds() {
    let (sup, _rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    let log = Output::Log(dir.path().join("l"));
    let e = sup.spawn(&SpawnSpec::new(Vec::<String>::new(), log.clone())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = sup.spawn(&SpawnSpec::new(["/nonexistent/program"], log.clone())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = sup.spawn(&SpawnSpec::new(["true"], Output::Log(dir.path().join("no/such/dir/l")))).unwrap_err();
    assert!(matches!(e, SupervisorError::Log { .. }) && e.kind() == ErrorKind::NotFound, "{e}");
    let job = sup.spawn(&SpawnSpec::new(["sleep", "10"], log)).unwrap();
    let e = sup.write_stdin(job.pid, b"x").unwrap_err();
    assert!(matches!(e, SupervisorError::NotAttachable(_)) && e.kind() == ErrorKind::FailedPrecondition, "{e}");
    sup.signal(job.pid, libc::SIGKILL).unwrap();
    assert!(lock(&sup.core().state).exclusions.len() <= 1);
}

#[test]
fn spawned_jobs_have_only_stdio_open() {
    run_in_helper("helper_only_stdio");
}

#[test]
#[ignore = "runs in a helper process (spawned_jobs_have_only_stdio_open)"]
fn helper_only_stdio() {
    if !in_helper("helper_only_stdio") {
        return;
    }
    // A descriptor this process leaks (not close-on-exec) must not reach the job either.
    // SAFETY: open with a NUL-terminated path; the descriptor stays open for the test's lifetime.
    let leaked = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    assert!(leaked > 2);
    let (sup, rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    for output in [Output::Log(dir.path().join("l")), Output::Attachable { log: Some(dir.path().join("a")) }] {
        let job = sup.spawn(&SpawnSpec::new(["sleep", "30"], output)).unwrap();
        // Right after exec the dynamic loader briefly holds its cache and libraries open (as fd 3), so
        // wait for the set to settle: a leaked descriptor never goes away and still fails the test.
        let open_fds = || {
            let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", job.pid))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            fds.sort();
            fds
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut fds = open_fds();
        while fds != ["0", "1", "2"] && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            fds = open_fds();
        }
        assert_eq!(fds, ["0", "1", "2"]);
        let st = crate::procfs::stat(job.pid).unwrap();
        assert_eq!((st.sid, st.pgid), (job.pid, job.pid), "not in a session of its own");
        sup.signal(job.pid, libc::SIGKILL).unwrap();
        assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Signaled(libc::SIGKILL)));
    }
}

#[test]
fn sweeper_reaps_orphans_but_not_children_waited_for() {
    run_in_helper("helper_sweeper");
}

#[test]
#[ignore = "runs in a helper process (sweeper_reaps_orphans_but_not_children_waited_for)"]
fn helper_sweeper() {
    if !in_helper("helper_sweeper") {
        return;
    }
    become_subreaper().unwrap();
    let (tx, rx) = channel();
    let sup =
        Supervisor::with_config(tx, SupervisorConfig { sweep_interval: Some(Duration::from_millis(20)), holder: None }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    // A child that this thread waits for itself, made while sweeps run: it exits at once.
    let waiter = {
        let sup = sup.clone();
        std::thread::spawn(move || {
            let (mut child, _exclusion) = {
                let scope = sup.fork_scope();
                let child = Command::new("sh").args(["-c", "exit 5"]).spawn().unwrap();
                // A zombie for many sweeps while only the scope protects it...
                std::thread::sleep(Duration::from_millis(300));
                let exclusion = scope.exclude(child.id() as i32);
                (child, exclusion)
            };
            // ... then for many more under the exclusion alone.
            std::thread::sleep(Duration::from_millis(300));
            child.wait().unwrap().code()
        })
    };
    // A job that leaves a grandchild behind, re-parented to us when the job exits.
    let job = sup.spawn(&sh("sleep 0.4 >/dev/null 2>&1 & echo $!", Output::Log(log.clone()))).unwrap();
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    let grandchild: i32 = std::fs::read_to_string(&log).unwrap().trim().parse().unwrap();
    assert_eq!(proc_state(grandchild).map(|(_, ppid)| ppid), Some(me()), "not re-parented to us");
    wait_for("the orphan to be reaped", || proc_state(grandchild).is_none());
    assert_eq!(waiter.join().unwrap(), Some(5));
    std::thread::sleep(Duration::from_millis(100));
    assert!(zombie_children(me()).is_empty(), "zombies left: {:?}", zombie_children(me()));
    assert!(lock(&sup.core().state).exclusions.is_empty());
}

#[test]
fn sweep_on_demand_respects_scopes_and_exclusions() {
    run_in_helper("helper_sweep_on_demand");
}

#[test]
#[ignore = "runs in a helper process (sweep_on_demand_respects_scopes_and_exclusions)"]
fn helper_sweep_on_demand() {
    if !in_helper("helper_sweep_on_demand") {
        return;
    }
    become_subreaper().unwrap();
    let (sup, rx) = quiet();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    assert_eq!(sup.sweep(), 0);
    let job = sup.spawn(&sh("sleep 0.2 >/dev/null 2>&1 & echo $!", Output::Log(log.clone()))).unwrap();
    assert_eq!(exit_of(&rx, job.pid, job.serial), Some(ExitInfo::Exited(0)));
    let orphan: i32 = std::fs::read_to_string(&log).unwrap().trim().parse().unwrap();
    wait_for("the orphan to die", || proc_state(orphan) == Some(('Z', me())));

    // A scope opened before the orphan was first seen protects it (it might be the scope's child)...
    let scope = sup.fork_scope();
    let mut in_scope = Command::new("true").spawn().unwrap();
    let in_scope_pid = in_scope.id() as i32;
    wait_for("the scope's child to exit", || proc_state(in_scope_pid) == Some(('Z', me())));
    assert_eq!(sup.sweep(), 0);
    // ... and a scope opened after the sighting does not.
    drop(scope);
    let late_scope = sup.fork_scope();
    let _exclusion = sup.exclude(in_scope_pid);
    assert_eq!(sup.sweep(), 1);
    assert!(proc_state(orphan).is_none());
    assert_eq!(proc_state(in_scope_pid), Some(('Z', me())), "an excluded child was reaped");
    assert_eq!(in_scope.wait().unwrap().code(), Some(0));
    drop(late_scope);
    assert_eq!(sup.sweep(), 0);
    assert!(zombie_children(me()).is_empty());
}

#[test]
fn fifty_jobs_from_five_threads() {
    run_in_helper("helper_fifty_jobs");
}

#[test]
#[ignore = "runs in a helper process (fifty_jobs_from_five_threads)"]
fn helper_fifty_jobs() {
    if !in_helper("helper_fifty_jobs") {
        return;
    }
    become_subreaper().unwrap();
    let (tx, rx) = channel();
    let sup =
        Supervisor::with_config(tx, SupervisorConfig { sweep_interval: Some(Duration::from_millis(20)), holder: None }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let threads: Vec<_> = (0..5)
        .map(|t| {
            let sup = sup.clone();
            let log = dir.path().join(format!("t{t}.log"));
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        let code = t * 10 + i;
                        let attach = i % 3 == 0;
                        let output = if attach { Output::Attachable { log: None } } else { Output::Log(log.clone()) };
                        let job = sup.spawn(&sh(&format!("echo {code}; exit {code}"), output)).unwrap();
                        (job.serial, (job.pid, code))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut expected: HashMap<u64, (i32, i32)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(expected.len(), 50);
    for _ in 0..50 {
        match rx.recv_timeout(Duration::from_secs(20)).unwrap() {
            JobEvent::Exited { pid, serial, status } => {
                let (want_pid, code) = expected.remove(&serial).expect("an unexpected or repeated event");
                assert_eq!((pid, status), (want_pid, Some(ExitInfo::Exited(code))));
            }
        }
    }
    assert!(expected.is_empty());
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "more than 50 events");
    assert!(zombie_children(me()).is_empty(), "zombies left: {:?}", zombie_children(me()));
    assert!(sup.supervised().is_empty());
}
