use super::*;
use rusqlite::TransactionBehavior;
use std::sync::Barrier;
use std::time::Instant;

fn full_job(jid: &str) -> Job {
    Job {
        jid: jid.to_owned(),
        kind: JobKind::Containerd,
        pid: 31337,
        state: JobState::Halted,
        exit_code: Some(-9),
        args: vec!["sh".into(), "-c".into(), "echo 'hi there' \"$x\" ü".into(), String::new()],
        cwd: Some("/srv/work dir".into()),
        // Not UTF-8: paths are stored as bytes.
        log: Some(PathBuf::from(OsString::from_vec(b"/var/log/job-\xff.log".to_vec()))),
        attachable: true,
        gpu: true,
        created_at: 1_764_000_000,
        container_id: Some("c0ffee".into()),
        runtime_root: Some("/run/containerd/runc/k8s.io".into()),
        restored_from: Some("/var/lib/cedana/checkpoints/x.tar.zst".into()),
        namespace: Some("k8s.io".into()),
        origin: Some(crate::jobs::model::Origin { node: "node-a".into(), job: Some("j1".into()), checkpoint: Some("c1".into()) }),
        owner: 4242,
    }
}

fn bare_job(jid: &str, created_at: i64) -> Job {
    Job { created_at, ..Job::new(jid, JobKind::Process, 100, vec![]) }
}

fn checkpoint(jid: &str, id: &str, time: i64) -> CheckpointRecord {
    CheckpointRecord {
        id: id.to_owned(),
        jid: jid.to_owned(),
        time,
        size: u64::from(u32::MAX) * 3,
        path: format!("/var/lib/cedana/{id}.tar.zst").into(),
        compression: "zstd".into(),
    }
}

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn every_field_round_trips() {
    let store = JobStore::open_in_memory().unwrap();
    assert_eq!(store.migrations_applied(), SCHEMA_VERSION);
    let full = full_job("famous_hopper7");
    let bare = Job::new("bold_curie3", JobKind::Runc, 7, vec![]);
    store.insert(&full).unwrap();
    store.insert(&bare).unwrap();
    assert_eq!(store.get("famous_hopper7").unwrap(), full);
    assert_eq!(store.get("bold_curie3").unwrap(), bare);
    assert!(matches!(store.get("nobody_knuth1"), Err(StoreError::JobNotFound { .. })));
    assert!(store.contains("bold_curie3").unwrap());

    // Update every field the other way round.
    let mut changed = bare.clone();
    changed.jid = full.jid.clone();
    store.update(&changed).unwrap();
    assert_eq!(store.get("famous_hopper7").unwrap(), changed);
    store.update(&full).unwrap();
    assert_eq!(store.get("famous_hopper7").unwrap(), full);

    let c = checkpoint("famous_hopper7", &crate::jobs::names::checkpoint_id(), 5);
    store.add_checkpoint(&c).unwrap();
    assert_eq!(store.checkpoints("famous_hopper7").unwrap(), vec![c.clone()]);
    assert_eq!(store.latest_checkpoint("famous_hopper7").unwrap(), Some(c));
    assert_eq!(store.latest_checkpoint("bold_curie3").unwrap(), None);
}

#[test]
fn duplicates_and_missing_jobs_are_classified() {
    let store = JobStore::open_in_memory().unwrap();
    store.insert(&bare_job("a", 1)).unwrap();
    let e = store.insert(&bare_job("a", 2)).unwrap_err();
    assert!(matches!(e, StoreError::JobExists { ref jid } if jid == "a"), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);

    for e in [
        store.get("missing").unwrap_err(),
        store.update(&bare_job("missing", 1)).unwrap_err(),
        store.delete("missing").unwrap_err(),
        store.set_state("missing", JobState::Lost, None).unwrap_err(),
        store.add_checkpoint(&checkpoint("missing", "c1", 1)).unwrap_err(),
        store.checkpoints("missing").unwrap_err(),
        store.latest_checkpoint("missing").unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::JobNotFound { ref jid } if jid == "missing"), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "job missing not found");
    }

    store.add_checkpoint(&checkpoint("a", "c1", 1)).unwrap();
    let e = store.add_checkpoint(&checkpoint("a", "c1", 2)).unwrap_err();
    assert!(matches!(e, StoreError::CheckpointExists { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
}

#[test]
fn set_state_and_find_by_pid() {
    let store = JobStore::open_in_memory().unwrap();
    let mut old = bare_job("old", 1);
    old.pid = 500;
    let mut new = bare_job("new", 2);
    new.pid = 500;
    store.insert(&old).unwrap();
    store.insert(&new).unwrap();
    assert_eq!(store.find_by_pid(500).unwrap().unwrap().jid, "new");
    store.set_state("new", JobState::Exited, Some(3)).unwrap();
    let got = store.get("new").unwrap();
    assert_eq!((got.state, got.exit_code), (JobState::Exited, Some(3)));
    assert_eq!(store.find_by_pid(500).unwrap().unwrap().jid, "old");
    store.set_state("old", JobState::Halted, None).unwrap();
    assert_eq!(store.find_by_pid(500).unwrap(), None);
    assert_eq!(store.find_by_pid(501).unwrap(), None);
}

#[test]
fn list_is_ordered_by_creation_then_jid() {
    let store = JobStore::open_in_memory().unwrap();
    for (jid, t) in [("c", 5), ("b", 5), ("z", 1), ("a", 9)] {
        store.insert(&bare_job(jid, t)).unwrap();
    }
    let order: Vec<String> = store.list().unwrap().into_iter().map(|j| j.jid).collect();
    assert_eq!(order, ["z", "b", "c", "a"]);
}

#[test]
fn checkpoints_newest_first_and_cascade_on_delete() {
    let store = JobStore::open_in_memory().unwrap();
    store.insert(&bare_job("a", 1)).unwrap();
    store.insert(&bare_job("b", 2)).unwrap();
    for (id, t) in [("a1", 10), ("a3", 30), ("a2", 20), ("a3bis", 30)] {
        store.add_checkpoint(&checkpoint("a", id, t)).unwrap();
    }
    store.add_checkpoint(&checkpoint("b", "b1", 99)).unwrap();
    let ids: Vec<String> = store.checkpoints("a").unwrap().into_iter().map(|c| c.id).collect();
    // Same time: the one recorded later first.
    assert_eq!(ids, ["a3bis", "a3", "a2", "a1"]);
    assert_eq!(store.latest_checkpoint("a").unwrap().unwrap().id, "a3bis");
    let listed = store.list_with_latest_checkpoint().unwrap();
    let summary: Vec<(&str, Option<&str>)> =
        listed.iter().map(|(j, c)| (j.jid.as_str(), c.as_ref().map(|c| c.id.as_str()))).collect();
    assert_eq!(summary, [("a", Some("a3bis")), ("b", Some("b1"))]);
    store.insert(&bare_job("none", 3)).unwrap();
    let latest = store.latest_checkpoints().unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!((latest["a"].id.as_str(), latest["b"].id.as_str()), ("a3bis", "b1"));
    store.delete("none").unwrap();

    store.delete("a").unwrap();
    assert!(!store.contains("a").unwrap());
    let orphans: i64 = store.conn().query_row("SELECT count(*) FROM checkpoints WHERE jid = 'a'", [], |r| r.get(0)).unwrap();
    assert_eq!(orphans, 0);
    assert_eq!(store.checkpoints("b").unwrap().len(), 1);
    assert_eq!(store.list_with_latest_checkpoint().unwrap().len(), 1);
    assert!(store.checkpoints("a").is_err());
}

#[test]
fn a_file_of_the_first_version_is_migrated_and_keeps_its_jobs() {
    let dir = temp();
    let path = dir.path().join("jobs.db");
    {
        // What a build of schema version 1 wrote.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO jobs (jid, kind, pid, state, args, attachable, gpu, created_at) \
             VALUES ('old_job1', 'process', 42, 'running', '[\"sleep\"]', 0, 0, 7)",
            [],
        )
        .unwrap();
    }
    let store = JobStore::open(&path).unwrap();
    assert_eq!(store.migrations_applied(), SCHEMA_VERSION - 1);
    assert_eq!(store.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
    let old = store.get("old_job1").unwrap();
    assert_eq!((old.pid, old.args.clone(), old.namespace.clone()), (42, vec!["sleep".to_string()], None));
    let mut moved = old.clone();
    moved.namespace = Some("default".into());
    store.update(&moved).unwrap();
    assert_eq!(store.get("old_job1").unwrap(), moved);
}

#[test]
fn reopen_keeps_jobs_and_migrates_nothing() {
    let dir = temp();
    let path = dir.path().join("state/deeper/jobs.db");
    let job = full_job("famous_hopper7");
    {
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.migrations_applied(), SCHEMA_VERSION);
        assert_eq!(store.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
        store.insert(&job).unwrap();
        store.add_checkpoint(&checkpoint(&job.jid, "c1", 1)).unwrap();
    }
    let mode = fs::metadata(&path).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    let store = JobStore::open(&path).unwrap();
    assert_eq!(store.migrations_applied(), 0);
    assert_eq!(store.schema_version().unwrap(), i64::from(SCHEMA_VERSION));
    assert_eq!(store.list().unwrap(), vec![job]);
    assert_eq!(store.checkpoints("famous_hopper7").unwrap().len(), 1);
    let mode: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn newer_version_is_refused_and_left_alone() {
    let dir = temp();
    let path = dir.path().join("jobs.db");
    {
        let store = JobStore::open(&path).unwrap();
        store.insert(&bare_job("a", 1)).unwrap();
        store.conn().pragma_update(None, "user_version", 7).unwrap();
    }
    check_newer_refused(&path);
    // The same for a file in rollback-journal mode (whose header the journal mode would change).
    let path = dir.path().join("rollback.db");
    Connection::open(&path).unwrap().execute_batch("CREATE TABLE x (y); PRAGMA user_version = 7;").unwrap();
    check_newer_refused(&path);
}

fn check_newer_refused(path: &Path) {
    let before = fs::read(path).unwrap();
    let e = JobStore::open(path).unwrap_err();
    assert!(matches!(e, StoreError::NewerVersion { found: 7, supported: SCHEMA_VERSION, .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    let text = e.to_string();
    assert!(text.contains("version is 7") && text.contains(&format!("version {SCHEMA_VERSION}")), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    println!("{text}");
    assert!(fs::read(path).unwrap() == before, "the file was modified");
}

#[test]
fn garbage_file_is_refused_with_its_name_and_left_alone() {
    let dir = temp();
    for (name, content) in
        [("short.db", b"not a database".to_vec()), ("long.db", (0..8192_u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())]
    {
        let path = dir.path().join(name);
        fs::write(&path, &content).unwrap();
        let e = JobStore::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("move it aside"), "{text}");
        println!("{text}");
        assert!(fs::read(&path).unwrap() == content, "the file was modified");
    }
}

#[test]
fn foreign_sqlite_database_is_refused() {
    let dir = temp();
    let path = dir.path().join("other.db");
    Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
    let before = fs::read(&path).unwrap();
    let e = JobStore::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::NotAJobStore { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(fs::read(&path).unwrap() == before, "the file was modified");
}

#[test]
fn busy_after_the_timeout_is_unavailable() {
    let dir = temp();
    let path = dir.path().join("jobs.db");
    let store = JobStore::open_with_timeout(&path, Duration::from_millis(100)).unwrap();
    let mut other = Connection::open(&path).unwrap();
    let tx = other.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
    let started = Instant::now();
    let e = store.insert(&bare_job("a", 1)).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(90), "{:?}", started.elapsed());
    assert!(matches!(e, StoreError::Busy { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    // Readers are not blocked by a writer.
    assert_eq!(store.list().unwrap(), vec![]);
    drop(tx);
    store.insert(&bare_job("a", 1)).unwrap();
}

#[test]
fn threads_write_concurrently_through_one_store() {
    let dir = temp();
    let store = JobStore::open(dir.path().join("jobs.db")).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let mut job = bare_job(&format!("t{t}_{i}"), i);
                    store.insert(&job).unwrap();
                    job.pid = t * 1000 + i as i32;
                    store.update(&job).unwrap();
                    store.set_state(&job.jid, JobState::Exited, Some(t)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let jobs = store.list().unwrap();
    assert_eq!(jobs.len(), 400);
    for job in jobs {
        let (t, i) = job.jid[1..].split_once('_').unwrap();
        let (t, i): (i32, i32) = (t.parse().unwrap(), i.parse().unwrap());
        assert_eq!((job.pid, job.state, job.exit_code), (t * 1000 + i, JobState::Exited, Some(t)));
    }
}

#[test]
fn two_stores_on_one_file_write_at_once() {
    let dir = temp();
    let path = dir.path().join("jobs.db");
    let barrier = Arc::new(Barrier::new(2));
    // Both open the fresh file at the same moment (one migrates, the other waits and finds it done),
    // then write at the same time.
    let threads: Vec<_> = (0..2)
        .map(|s| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let store = JobStore::open(&path);
                // Past the barrier before unwrapping: a failed open must fail the test, not strand the other thread.
                barrier.wait();
                let store = store.unwrap();
                write_jobs(&store, &format!("s{s}"), 200);
                store.migrations_applied()
            })
        })
        .collect();
    let applied: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(applied, SCHEMA_VERSION, "the schema was applied exactly once");
    let store = JobStore::open(&path).unwrap();
    let jobs = store.list_with_latest_checkpoint().unwrap();
    assert_eq!(jobs.len(), 400);
    assert!(jobs.iter().all(|(j, c)| j.state == JobState::Halted && c.is_some()));
}

/// Where [`two_processes_write_one_file_at_once`] tells its child process the file is.
const CHILD_DB_ENV: &str = "CEDANA_JOBS_TEST_CHILD_DB";

/// The child's half of [`two_processes_write_one_file_at_once`]; does nothing when run on its own.
#[test]
fn child_process_writer() {
    let Some(path) = std::env::var_os(CHILD_DB_ENV) else { return };
    write_jobs(&JobStore::open(path).unwrap(), "child", 300);
}

fn write_jobs(store: &JobStore, prefix: &str, n: i64) {
    for i in 0..n {
        let jid = format!("{prefix}_{i}");
        store.insert(&bare_job(&jid, i)).unwrap();
        store.add_checkpoint(&checkpoint(&jid, &format!("{jid}_c"), i)).unwrap();
        store.set_state(&jid, JobState::Halted, None).unwrap();
    }
}

#[test]
fn two_processes_write_one_file_at_once() {
    let dir = temp();
    let path = dir.path().join("jobs.db");
    let store = JobStore::open(&path).unwrap();
    // This test binary again, running only the child's test, with the file's path in the environment.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "jobs::store::tests::child_process_writer", "--test-threads", "1"])
        .env(CHILD_DB_ENV, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    write_jobs(&store, "parent", 300);
    assert!(child.wait().unwrap().success(), "the child process failed");
    let jobs = store.list_with_latest_checkpoint().unwrap();
    assert_eq!(jobs.len(), 600);
    assert!(jobs.iter().all(|(j, c)| j.state == JobState::Halted && c.is_some()));
    assert_eq!(jobs.iter().filter(|(j, _)| j.jid.starts_with("child_")).count(), 300);
}

#[test]
fn listing_a_thousand_jobs_is_fast() {
    let dir = temp();
    let store = JobStore::open(dir.path().join("jobs.db")).unwrap();
    for i in 0..1000 {
        let mut job = full_job(&format!("job{i:04}"));
        job.created_at = i;
        store.insert(&job).unwrap();
        for c in 0..2 {
            store.add_checkpoint(&checkpoint(&job.jid, &format!("{i}_{c}"), i + c)).unwrap();
        }
    }
    // Warm up once (page cache, statement cache), then take the best of a few.
    assert_eq!(store.list().unwrap().len(), 1000);
    let time = |f: &dyn Fn() -> usize| {
        (0..5)
            .map(|_| {
                let started = Instant::now();
                assert_eq!(f(), 1000);
                started.elapsed()
            })
            .min()
            .unwrap()
    };
    let list = time(&|| store.list().unwrap().len());
    let list_and_latest = time(&|| {
        let (jobs, latest) = (store.list().unwrap(), store.latest_checkpoints().unwrap());
        assert_eq!(latest.len(), jobs.len());
        jobs.len()
    });
    let with_latest = time(&|| store.list_with_latest_checkpoint().unwrap().len());
    // A fresh store on the file, as `cedana ps` would do it: open + one query.
    let cold = {
        let started = Instant::now();
        let fresh = JobStore::open(store.path()).unwrap();
        assert_eq!(fresh.list_with_latest_checkpoint().unwrap().len(), 1000);
        started.elapsed()
    };
    println!(
        "1,000 jobs x 2 checkpoints: list() {list:?}, list() + latest_checkpoints() {list_and_latest:?}, \
         list_with_latest_checkpoint() {with_latest:?}, open + list_with_latest_checkpoint() {cold:?}"
    );
    let bound = Duration::from_millis(200);
    assert!(list < bound && list_and_latest < bound && with_latest < bound && cold < bound, "too slow");
}

#[test]
fn the_column_count_matches_the_column_list() {
    assert_eq!(JOB_COLUMNS.split(", ").count(), JOB_COLUMN_COUNT);
}

#[test]
fn sealed_checkpoints_are_found_by_inode_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = JobStore::open(dir.path().join("db")).unwrap();
    assert_eq!(store.sealed_checkpoint_owner(1, 2).unwrap(), None);
    store.seal_checkpoint(1, 2, 1000, Path::new("/home/u/a.tar")).unwrap();
    // Inode numbers use all 64 bits.
    store.seal_checkpoint(u64::MAX, u64::MAX - 1, 1001, Path::new("/home/v/b.tar")).unwrap();
    assert_eq!(store.sealed_checkpoint_owner(1, 2).unwrap(), Some(1000));
    assert_eq!(store.sealed_checkpoint_owner(u64::MAX, u64::MAX - 1).unwrap(), Some(1001));
    assert_eq!(store.sealed_checkpoint_owner(2, 1).unwrap(), None);
    // An inode reused for another user's checkpoint is theirs now.
    store.seal_checkpoint(1, 2, 1002, Path::new("/home/w/c.tar")).unwrap();
    assert_eq!(store.sealed_checkpoint_owner(1, 2).unwrap(), Some(1002));
}
