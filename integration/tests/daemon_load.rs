//! The daemon under concurrent load, against the real CRIU: 20 jobs started, dumped and restored at once
//! through one daemon, twice, without a lost job, a mixed-up checkpoint, a leaked file descriptor or a
//! deadlock. Every CLI call runs under a watchdog: one that takes more than a minute fails the test as a
//! suspected deadlock, with the daemon's threads and log in the message.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cedana_integration::daemon::{check_sequence, numbers_in, rows, Daemon};
use cedana_integration::{alive, wait_for, workload_bin};

/// Jobs run at once.
const JOBS: usize = 20;
/// Longest a single CLI call may take before the test calls it a deadlock.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Descriptors the daemon may hold after the load beyond what it held before (see [`fd_slack_reasons`]).
const FD_SLACK: usize = 4;

/// `cedana ARGS` against `d` under the watchdog: its output and how long it took, or "deadlock?" with the
/// daemon's state when it takes longer than [`CALL_TIMEOUT`] (it is then killed).
fn timed(d: &Daemon, args: &[String]) -> Result<(Output, Duration), String> {
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = d.command(&strs);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("starting cedana {args:?}: {e}"))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > CALL_TIMEOUT {
            let threads = threads(d);
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "deadlock? `cedana {}` did not finish within {CALL_TIMEOUT:?}\nthe daemon's threads (name: wait channel):\n{threads}\ndaemon log:\n{}",
                args.join(" "),
                d.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() };
    Ok((out, start.elapsed()))
}

/// Like [`timed`], but the call must succeed: its stdout and time.
fn timed_ok(d: &Daemon, args: &[String]) -> Result<(String, Duration), String> {
    let (out, took) = timed(d, args)?;
    if !out.status.success() {
        return Err(format!(
            "cedana {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            d.log()
        ));
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

/// Like [`timed_ok`], panicking on failure: the stdout.
fn ok_now(d: &Daemon, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    timed_ok(d, &args).unwrap_or_else(|e| panic!("{e}")).0
}

/// `ps` under the watchdog, as rows of fields.
fn ps(d: &Daemon) -> Vec<Vec<String>> {
    rows(&ok_now(d, &["ps"]))
}

/// Each of the daemon's threads with what it waits in, for a deadlock report.
fn threads(d: &Daemon) -> String {
    let task = format!("/proc/{}/task", d.pid());
    let mut out = String::new();
    for t in std::fs::read_dir(&task).into_iter().flatten().flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
        out += &format!("  {} {}: {}\n", t.file_name().to_string_lossy(), name.trim(), wchan.trim());
    }
    out
}

/// The daemon's open descriptors, each as what it points to.
fn fds(d: &Daemon) -> Vec<String> {
    let dir = format!("/proc/{}/fd", d.pid());
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
            format!("{} -> {target}", e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

/// Why the descriptor count may differ by a few after the load (the bound is [`FD_SLACK`]).
fn fd_slack_reasons() -> &'static str {
    "connections of CLI calls that have exited but whose end the daemon has not yet seen (tonic notices an EOF \
     asynchronously), and descriptors opened once on first use and then kept (tokio's blocking pool and SQLite \
     open nothing per call, but a first use may open a descriptor that stays for the daemon's lifetime)"
}

fn wait_for_count(log: &Path, n: usize) -> Vec<u64> {
    cedana_integration::daemon::wait_for_count(log, n, Duration::from_secs(30))
}

/// One job of the test.
struct Job {
    jid: String,
    log: PathBuf,
    pid: i32,
}

/// Run `args(i)` for every job from its own thread, all released at once; every call must succeed within
/// the watchdog's limit. Returns each job's stdout and the wall time of the whole batch, and prints the
/// slowest call.
fn all_at_once(d: &Daemon, what: &str, args: impl Fn(usize) -> Vec<String> + Sync) -> (Vec<String>, Duration) {
    let barrier = Barrier::new(JOBS);
    let start = Instant::now();
    let results: Vec<Result<(String, Duration), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..JOBS)
            .map(|i| {
                let (barrier, args) = (&barrier, &args);
                s.spawn(move || {
                    let a = args(i);
                    barrier.wait();
                    timed_ok(d, &a)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the calling thread panicked".into()))).collect()
    });
    let wall = start.elapsed();
    let mut outs = Vec::new();
    let mut slowest = Duration::ZERO;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok((out, took)) => {
                slowest = slowest.max(took);
                outs.push(out);
            }
            Err(e) => panic!("{what} of job {i}: {e}"),
        }
    }
    eprintln!("{what}: {JOBS} calls at once took {wall:.2?} (slowest call {slowest:.2?})");
    (outs, wall)
}

/// The checkpoints of a job, newest first: (id, path).
fn checkpoints(d: &Daemon, jid: &str) -> Vec<String> {
    ok_now(d, &["job", "checkpoints", jid]).lines().skip(1).map(|l| l.split_whitespace().last().unwrap().to_string()).collect()
}

/// The manifest of a checkpoint, through `cedana checkpoint inspect --json`.
fn manifest(d: &Daemon, path: &str) -> serde_json::Value {
    serde_json::from_str(&ok_now(d, &["checkpoint", "inspect", path, "--json"])).expect("the manifest is JSON")
}

/// Dump every job at once, check each checkpoint is its own, wait for the PIDs to be free, restore every
/// job at once, and check each continues its own count. `round` counts from 1.
fn dump_and_restore_all(d: &Daemon, jobs: &[Job], round: usize) {
    let (dumped, _) =
        all_at_once(d, &format!("round {round}: dump job"), |i| vec!["dump".into(), "job".into(), jobs[i].jid.clone()]);
    let mut paths = BTreeSet::new();
    for (job, out) in jobs.iter().zip(&dumped) {
        assert!(out.contains(&format!("Dumped job {} (PID {}, counter)", job.jid, job.pid)), "{out}");
        let rows = ps(d);
        let row = rows.iter().find(|r| r[0] == job.jid).unwrap_or_else(|| panic!("job {} lost: {rows:?}", job.jid));
        assert_eq!((row[2].as_str(), row[3].as_str()), (job.pid.to_string().as_str(), "halted"), "{row:?}");
        let cps = checkpoints(d, &job.jid);
        assert_eq!(cps.len(), round, "job {}: one checkpoint per round: {cps:?}", job.jid);
        let newest = &cps[0];
        assert!(out.trim_end().ends_with(newest.as_str()), "the dump's path is the recorded one: {out} / {newest}");
        assert!(newest.contains(&format!("dump-process-{}-", job.jid)), "named after its job: {newest}");
        assert!(paths.insert(newest.clone()), "two jobs share the checkpoint {newest}");
        let m = manifest(d, newest);
        assert_eq!(m["process"]["pid"], job.pid, "{}: the manifest names another PID: {m}", job.jid);
        assert_eq!(m["process"]["pids"], serde_json::json!([job.pid]), "{}: {m}", job.jid);
    }
    for job in jobs {
        wait_for(&format!("PID {} to be free", job.pid), Duration::from_secs(10), || {
            (!Path::new(&format!("/proc/{}", job.pid)).exists()).then_some(())
        });
    }
    let at_dump: Vec<Vec<u64>> = jobs.iter().map(|j| numbers_in(&j.log)).collect();
    let (restored, _) =
        all_at_once(d, &format!("round {round}: restore job"), |i| vec!["restore".into(), "job".into(), jobs[i].jid.clone()]);
    for (job, out) in jobs.iter().zip(&restored) {
        assert!(out.contains(&format!("Restored job {} as PID {}", job.jid, job.pid)), "{out}");
    }
    for (job, before) in jobs.iter().zip(&at_dump) {
        assert!(!before.is_empty(), "{}: no output before the dump", job.jid);
        let after = wait_for_count(&job.log, before.len() + 10);
        check_sequence(&after, &format!("round {round}, job {}", job.jid));
        assert_eq!(&after[..before.len()], &before[..], "{}: the output before the dump is kept", job.jid);
    }
    let rows = ps(d);
    for job in jobs {
        let row = rows.iter().find(|r| r[0] == job.jid).unwrap_or_else(|| panic!("job {} lost: {rows:?}", job.jid));
        assert!(
            row[2] == job.pid.to_string() && (row[3] == "sleep" || row[3] == "running"),
            "round {round}: job {} runs again as PID {}: {row:?}",
            job.jid,
            job.pid
        );
    }
}

/// Wait until the daemon holds at most `limit` descriptors (closing connections is asynchronous); the
/// count then.
fn settled_fds(d: &Daemon, limit: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fds = fds(d);
        if fds.len() <= limit || Instant::now() > deadline {
            return fds;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's descriptors at their fewest over half a second (the harness's own probe of the socket may
/// not have been closed yet).
fn fewest_fds(d: &Daemon) -> Vec<String> {
    let mut best = fds(d);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let now = fds(d);
        if now.len() < best.len() {
            best = now;
        }
    }
    best
}

/// Two descriptor lists compared by what the descriptors are (numbers and inode numbers aside).
fn fd_report(before: &[String], after: &[String]) -> String {
    use std::collections::BTreeMap;
    let kinds = |fds: &[String]| {
        let mut m: BTreeMap<String, i64> = BTreeMap::new();
        for fd in fds {
            let target = fd.split_once(" -> ").map_or(fd.as_str(), |(_, t)| t);
            let kind = match target.split_once(":[") {
                Some((k, _)) if k == "socket" || k == "pipe" => k.to_string(),
                _ => target.to_string(),
            };
            *m.entry(kind).or_default() += 1;
        }
        m
    };
    let (b, a) = (kinds(before), kinds(after));
    let mut changed = Vec::new();
    for k in b.keys().chain(a.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (b.get(k).copied().unwrap_or(0), a.get(k).copied().unwrap_or(0));
        if x != y {
            changed.push(format!("{k}: {x} -> {y}"));
        }
    }
    format!("{} before, {} after; by kind: {b:?}; changed: {changed:?}", before.len(), after.len())
}

#[test]
fn twenty_jobs_started_dumped_and_restored_at_once_twice() {
    let d = Daemon::start();
    let counter = workload_bin("counter");
    let t0 = Instant::now();
    let fds_idle = fewest_fds(&d);

    // Started from 20 threads at once.
    let (started, _) = all_at_once(&d, "run process", |i| {
        let log = d.dir().join(format!("load-{i:02}.log"));
        ["run", "process", "--jid", &format!("load-{i:02}"), "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let jobs: Vec<Job> = started
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let mut f = out.split_whitespace();
            let jid = f.next().unwrap().to_string();
            assert_eq!(jid, format!("load-{i:02}"), "{out}");
            let pid = f.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("a PID: {out}"));
            Job { jid, log: d.dir().join(format!("load-{i:02}.log")), pid }
        })
        .collect();
    let pids: BTreeSet<i32> = jobs.iter().map(|j| j.pid).collect();
    assert_eq!(pids.len(), JOBS, "every job has a PID of its own");
    assert_eq!(ps(&d).len(), JOBS, "every job is in the store");
    for job in &jobs {
        wait_for_count(&job.log, 5);
    }
    let fds_running = fewest_fds(&d);

    dump_and_restore_all(&d, &jobs, 1);
    dump_and_restore_all(&d, &jobs, 2);

    // The same 20 jobs run as before the first dump: the same descriptors (each job's pidfd) are held.
    let fds_after = settled_fds(&d, fds_running.len() + FD_SLACK);
    eprintln!("daemon fds with the {JOBS} jobs running: {}", fd_report(&fds_running, &fds_after));
    assert!(
        fds_after.len() <= fds_running.len() + FD_SLACK,
        "the daemon leaks descriptors: {}\n(slack {FD_SLACK}: {})",
        fd_report(&fds_running, &fds_after),
        fd_slack_reasons()
    );

    // Every job ended and forgotten: back to what the idle daemon held.
    for job in &jobs {
        ok_now(&d, &["job", "kill", &job.jid]);
    }
    wait_for("every job's exit to be recorded", Duration::from_secs(20), || {
        ps(&d).iter().all(|r| r[3] == "exited").then_some(())
    });
    for job in &jobs {
        assert!(!alive(job.pid), "{} was killed", job.jid);
        ok_now(&d, &["job", "delete", &job.jid]);
    }
    assert!(ps(&d).is_empty());
    let fds_end = settled_fds(&d, fds_idle.len() + FD_SLACK);
    eprintln!("daemon fds idle, before the first call and at the end: {}", fd_report(&fds_idle, &fds_end));
    assert!(
        fds_end.len() <= fds_idle.len() + FD_SLACK,
        "the daemon leaks descriptors: {}\n(slack {FD_SLACK}: {})",
        fd_report(&fds_idle, &fds_end),
        fd_slack_reasons()
    );
    eprintln!("the whole test took {:.2?}", t0.elapsed());
}
