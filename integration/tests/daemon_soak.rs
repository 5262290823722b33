//! The daemon under load, through its gRPC API against the real CRIU: 1,000 jobs in the store, 50 dumps and
//! then 50 restores at once, and a soak of repeated dumps and restores bounded in time. Nothing may be lost
//! (every job and checkpoint accounted for, every counter going on from where it was), and nothing may leak:
//! the daemon's descriptors, threads, child processes, mounts and scratch files are counted before and after,
//! and its memory stays flat once warm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cedana_integration::daemon::{check_sequence, numbers_in, wait_for_count, Daemon};
use cedana_integration::{wait_for, workload_bin};
use cedana_protos::v1 as pb;
use pb::daemon_client::DaemonClient;
use tonic::transport::Channel;

/// Jobs dumped and restored at once.
const CONCURRENT: usize = 50;
/// Jobs in the store.
const STORED: usize = 1000;
/// How long the soak runs.
const SOAK: Duration = Duration::from_secs(15);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn client(rt: &tokio::runtime::Runtime, socket: &Path) -> DaemonClient<Channel> {
    DaemonClient::new(rt.block_on(cedana_protos::connect_uds(socket)).unwrap())
}

/// What the daemon holds: descriptors, threads, child processes, mounts in its namespace, and the files in
/// its scratch folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    threads: usize,
    children: usize,
    mounts: usize,
    scratch: usize,
}

fn count(dir: impl AsRef<Path>) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn footprint(d: &Daemon, scratch: &Path) -> Footprint {
    let pid = d.pid();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    Footprint {
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        children: children.split_whitespace().count(),
        mounts: mounts.lines().count(),
        scratch: count(scratch),
    }
}

/// How much the floor of the daemon's RSS may rise over the soak. Alone, the floor stays flat (97 -> 89,
/// 87 -> 77, 80 -> 85 MB in three runs); in one run of the whole suite it rose from 77 to 98 MB over 29
/// rounds; over 200 rounds alone it rises to 73-83 MB by round 20 and then stays there (malloc's arenas warming
/// up, see the README's Load paragraph), so the bound catches a leak a few times that.
const FLOOR_GROWTH_KIB: u64 = 32 * 1024;

/// The daemon's resident memory, in KiB.
fn rss_kib(d: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// Wait until the daemon's footprint is back within `base` (threads of tokio's blocking pool linger up to
/// ten seconds after their last task, and a closed connection is noticed asynchronously).
fn settle(d: &Daemon, scratch: &Path, base: Footprint, children: usize) -> Footprint {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = footprint(d, scratch);
        let within = now.fds <= base.fds
            && now.threads <= base.threads
            && now.children == children
            && now.mounts == base.mounts
            && now.scratch == base.scratch;
        if within || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Run `f(i)` for every i in 0..n at once; every call must succeed.
fn all_at_once<T: Send + 'static, F>(rt: &tokio::runtime::Runtime, n: usize, f: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
{
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let fut = f(i);
            set.spawn(async move { (i, fut.await) });
        }
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.unwrap();
            out[i] = Some(r.unwrap_or_else(|s| panic!("call {i}: {:?} {}", s.code(), s.message())));
        }
        out.into_iter().map(Option::unwrap).collect()
    })
}

struct Counter {
    jid: String,
    log: PathBuf,
}

/// Dump every counter at once, then restore them all at once; each goes on from where it was.
fn dump_and_restore(rt: &tokio::runtime::Runtime, c: &DaemonClient<Channel>, counters: &[Counter], dir: &Path) {
    let dumped = all_at_once(rt, counters.len(), |i| {
        let mut c = c.clone();
        let req = pb::DumpRequest {
            target: Some(pb::dump_request::Target::Jid(counters[i].jid.clone())),
            dir: dir.display().to_string(),
            compression: "lz4".into(),
            ..Default::default()
        };
        async move { c.dump(req).await.map(|r| r.into_inner()) }
    });
    let mut paths: Vec<&str> = dumped.iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), counters.len(), "one checkpoint per job");
    let before: Vec<Vec<u64>> = counters.iter().map(|c| numbers_in(&c.log)).collect();
    for r in &dumped {
        wait_for("a dumped counter's PID to be free", Duration::from_secs(10), || {
            (!Path::new(&format!("/proc/{}", r.pid)).exists()).then_some(())
        });
    }
    all_at_once(rt, counters.len(), |i| {
        let mut c = c.clone();
        let req =
            pb::RestoreRequest { source: Some(pb::restore_request::Source::Jid(counters[i].jid.clone())), ..Default::default() };
        async move { c.restore(req).await.map(|r| r.into_inner()) }
    });
    for (counter, before) in counters.iter().zip(&before) {
        assert!(!before.is_empty(), "{}: no output before the dump", counter.jid);
        let after = wait_for_count(&counter.log, before.len() + 3, Duration::from_secs(30));
        check_sequence(&after, &counter.jid);
        assert_eq!(&after[..before.len()], &before[..], "{}: what it wrote before the dump is kept", counter.jid);
    }
}

#[test]
fn a_thousand_jobs_fifty_dumps_and_restores_at_once_and_a_soak_lose_and_leak_nothing() {
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(&[("CEDANA_CHECKPOINT_SCRATCH_DIR", scratch.path().to_str().unwrap())]);
    let rt = runtime();
    let c = client(&rt, &d.socket());
    rt.block_on(c.clone().list(pb::ListRequest {})).unwrap();
    let idle = footprint(&d, scratch.path());

    // 1,000 short jobs, 16 calls at a time: every one recorded, and listed in one call.
    let t = Instant::now();
    for batch in 0..STORED / 16 + 1 {
        let n = (STORED - (batch * 16).min(STORED)).min(16);
        all_at_once(&rt, n, |i| {
            let mut c = c.clone();
            let req = pb::RunRequest {
                jid: format!("short-{:04}", batch * 16 + i),
                args: vec!["true".into()],
                log: d.dir().join("short.log").display().to_string(),
                ..Default::default()
            };
            async move { c.run(req).await.map(drop) }
        });
    }
    let run_time = t.elapsed();
    let t = Instant::now();
    let list = rt.block_on(c.clone().list(pb::ListRequest {})).unwrap().into_inner();
    let list_time = t.elapsed();
    assert_eq!(list.jobs.len(), STORED, "every job is in the store");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = rt.block_on(c.clone().list(pb::ListRequest {})).unwrap().into_inner();
        let odd: Vec<_> = list.jobs.iter().filter(|j| j.state != pb::JobState::Exited as i32 || j.exit_code != Some(0)).collect();
        if odd.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} short jobs not seen exiting with 0, e.g. {:?}",
            odd.len(),
            &odd[..odd.len().min(3)]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(list_time < Duration::from_secs(2), "listing {STORED} jobs took {list_time:?}");

    // 50 counters, dumped at once and restored at once.
    let counter = workload_bin("counter");
    let counters: Vec<Counter> =
        (0..CONCURRENT).map(|i| Counter { jid: format!("load-{i:02}"), log: d.dir().join(format!("load-{i:02}.log")) }).collect();
    all_at_once(&rt, CONCURRENT, |i| {
        let mut c = c.clone();
        let req = pb::RunRequest {
            jid: counters[i].jid.clone(),
            args: vec![counter.display().to_string()],
            log: counters[i].log.display().to_string(),
            ..Default::default()
        };
        async move { c.run(req).await.map(drop) }
    });
    for counter in &counters {
        wait_for_count(&counter.log, 2, Duration::from_secs(30));
    }
    let ckpts = d.dir().join("ckpts");
    std::fs::create_dir(&ckpts).unwrap();
    let t = Instant::now();
    dump_and_restore(&rt, &c, &counters, &ckpts);
    let concurrent_time = t.elapsed();

    // The soak: five of them, dumped and restored over and over.
    let few = &counters[..5];
    dump_and_restore(&rt, &c, few, &ckpts);
    let warm = rss_kib(&d);
    let soak_start = Instant::now();
    let mut rounds = 0;
    let mut samples = Vec::new();
    while soak_start.elapsed() < SOAK {
        dump_and_restore(&rt, &c, few, &ckpts);
        rounds += 1;
        samples.push(rss_kib(&d));
    }
    samples.push(rss_kib(&d));
    // One sample swings by 10-15 MiB with what the allocator holds at that instant; a leak raises the floor.
    // So: the lowest RSS of the soak's last third against the lowest of its first third (see FLOOR_GROWTH_KIB).
    let third = (samples.len() / 3).max(3).min(samples.len());
    let floor = |s: &[u64]| s.iter().copied().min().unwrap_or(0);
    let (early, late) = (floor(&samples[..third]), floor(&samples[samples.len() - third..]));

    // Nothing lost: every job is there, the counters run, each has all its checkpoints.
    let list = rt.block_on(c.clone().list(pb::ListRequest {})).unwrap().into_inner();
    assert_eq!(list.jobs.len(), STORED + CONCURRENT);
    for (i, counter) in counters.iter().enumerate() {
        let job = list.jobs.iter().find(|j| j.jid == counter.jid).unwrap();
        assert_eq!(job.state, pb::JobState::Running as i32, "{}", counter.jid);
        let cps = rt.block_on(c.clone().checkpoints(pb::JobRef { jid: counter.jid.clone() })).unwrap().into_inner();
        let wanted = if i < few.len() { 2 + rounds } else { 1 };
        assert_eq!(cps.checkpoints.len(), wanted, "{}", counter.jid);
    }
    // Nothing leaked, once the counters are gone: the daemon is back to its idle footprint.
    for counter in &counters {
        rt.block_on(c.clone().kill(pb::KillRequest { jid: counter.jid.clone(), signal: 0 })).unwrap();
    }
    drop(c);
    drop(rt);
    let end = settle(&d, scratch.path(), idle, 0);
    assert!(end.fds <= idle.fds + 2, "descriptors: {idle:?} -> {end:?}");
    assert!(end.threads <= idle.threads + 2, "threads: {idle:?} -> {end:?}");
    assert_eq!((end.children, end.mounts, end.scratch), (0, idle.mounts, idle.scratch), "{idle:?} -> {end:?}");
    assert!(
        late <= early + FLOOR_GROWTH_KIB,
        "the daemon's memory grows: its floor {early} KiB early in the soak, {late} KiB late, after {rounds} rounds \
         ({warm} KiB warm): {samples:?}"
    );
    eprintln!(
        "load: {STORED} runs in {run_time:?}, list of {STORED} in {list_time:?}; {CONCURRENT} dumps + restores at once in \
         {concurrent_time:?}; soak {rounds} rounds of 5 in {SOAK:?}, RSS {warm} KiB warm, floor {early} -> {late} KiB; footprint {idle:?} -> \
         {end:?}; total {:?}",
        started.elapsed()
    );
}
