//! 100 checkpoint/restore cycles of one workload, its state verified at each: a counter that writes 1, 2,
//! 3, ... must go on where it stopped every time (no gap, no repeat), with no CRIU process, temporary or
//! stray checkpoint left between cycles; as a process (`dump process` / `restore process`) and as a
//! daemon's job (`dump job` / `restore job`).

use std::time::{Duration, Instant};

use cedana_integration::daemon::{check_sequence, numbers_in, printed_pid, wait_for_count, Daemon};
use cedana_integration::invariants::*;
use cedana_integration::workload::Workload;
use cedana_integration::*;

const CYCLES: usize = 100;
/// New lines the counter must write between two dumps (it writes one every 20 ms).
const STEP: usize = 2;
const T: Duration = Duration::from_secs(20);

#[test]
fn a_process_survives_100_cycles_with_its_count_intact() {
    require_root();
    let scene = Scene::new();
    let mut w = Workload::start(&workload_bin("counter"), &[], &scene.work());
    let dest = scene.dest();
    let started = Instant::now();
    for cycle in 0..CYCLES {
        let before = wait_for_count(&w.log, numbers_in(&w.log).len() + STEP, T).len();
        let name = format!("c{cycle}");
        let out = scene.dump(w.pid, dest.to_str().unwrap(), &name, "lz4").output().unwrap();
        assert!(out.status.success(), "cycle {cycle}: dump: {}", String::from_utf8_lossy(&out.stderr));
        if cycle == 0 {
            w.reap();
        }
        wait_for("the dumped process to be gone", T, || (!alive(w.pid)).then_some(()));
        let path = dest.join(format!("{name}.tar.lz4"));
        let out = scene.cedana(&["restore", "process", "--path", path.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "cycle {cycle}: restore: {}", String::from_utf8_lossy(&out.stderr));
        assert!(alive(w.pid), "cycle {cycle}: restored under its PID");
        std::fs::remove_file(&path).unwrap();
        // It goes on where it stopped.
        let after = wait_for_count(&w.log, before + 1, T);
        check_sequence(&after, &format!("cycle {cycle}"));
        assert!(!frozen_or_traced(w.pid), "cycle {cycle}: left stopped");
        assert!(entries(&dest).is_empty(), "cycle {cycle}: {:?}", entries(&dest));
    }
    scene.assert_no_criu();
    scene.assert_no_temporaries();
    eprintln!("{CYCLES} process cycles in {:?}", started.elapsed());
}

#[test]
fn a_job_survives_100_cycles_with_its_count_intact() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_str().unwrap().to_string();
    let d = Daemon::start_with_env(&[("TMPDIR", &t), ("CEDANA_SCRATCH_DIR", &t)]);
    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let out = d.ok(&["run", "process", "--jid", "cyc", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let pid = printed_pid(&out);
    let started = Instant::now();
    for cycle in 0..CYCLES {
        let before = wait_for_count(&log, numbers_in(&log).len() + STEP, T).len();
        d.ok(&["dump", "job", "cyc", "--compression", "lz4"]);
        wait_for("the dumped job to be gone", T, || (!alive(pid)).then_some(()));
        let row = d.row("cyc");
        assert_eq!(row[3], "halted", "cycle {cycle}: {row:?}");
        let restored = d.ok(&["restore", "job", "cyc"]);
        assert!(restored.contains(&format!("as PID {pid}")), "cycle {cycle}: {restored}");
        let after = wait_for_count(&log, before + 1, T);
        check_sequence(&after, &format!("cycle {cycle}"));
        assert!(["sleep", "running"].contains(&d.row("cyc")[3].as_str()), "cycle {cycle}: {:?}", d.row("cyc"));
    }
    let checkpoints = d.ok(&["job", "checkpoints", "cyc"]);
    assert_eq!(checkpoints.lines().count(), CYCLES + 1, "one checkpoint recorded per cycle: {checkpoints}");
    let left: Vec<String> = temporaries(&d.checkpoints()).into_iter().chain(temporaries(tmp.path())).collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(criu_processes_under(d.dir()).is_empty() && criu_processes_under(tmp.path()).is_empty());
    d.ok(&["job", "kill", "cyc"]);
    eprintln!("{CYCLES} job cycles in {:?}", started.elapsed());
}
