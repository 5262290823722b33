//! Faults of containers: 100 checkpoint/restore cycles of a runc container (`cedana dump runc` / `cedana
//! restore runc`) with its count verified at each, and SIGKILL of `cedana-runc` (the runtime wrapper
//! containerd and dockerd call) at each phase of a checkpoint and of a restore. After each: the container
//! runs unfrozen (or, for a restore, runs correctly or is absent), no CRIU process, temporary or mount is
//! left, and a later checkpoint works.
//! Run as root: `cargo test -p cedana-integration --test faults_containers -- --test-threads=1`.

use std::path::Path;
use std::time::{Duration, Instant};

use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::images::Bundle;
use cedana_integration::invariants::*;
use cedana_integration::lines::{numbers, Lines};
use cedana_integration::*;

const T: Duration = Duration::from_secs(20);
const CYCLES: usize = 100;

fn id(name: &str) -> String {
    format!("ced-f-{name}-{}", std::process::id())
}

/// `cedana restore runc --detach` of `checkpoint` as `cid` from `bundle` in `scene`; the restored container's
/// output (its stdio are the restore command's).
fn restore_runc(scene: &Scene, runc: &RuncRoot, checkpoint: &Path, cid: &str, bundle: &Path) -> Lines {
    runc.track(cid);
    let mut cmd = scene.cedana(&["restore", "runc", "--detach", "--id", cid, "--path"]);
    cmd.arg(checkpoint).arg("--bundle").arg(bundle).arg("--root").arg(&runc.root);
    let lines = piped(&mut cmd);
    let status = cmd.status().expect("cedana restore runc");
    assert!(status.success(), "cedana restore runc {cid}: {:?}", lines.snapshot());
    lines
}

/// The container is running, not paused, and its init neither stopped nor traced.
fn assert_container_runs(runc: &RuncRoot, cid: &str, what: &str) {
    let state = runc.state(cid).unwrap_or_else(|| panic!("{what}: container {cid} is gone"));
    assert_eq!(state["status"], "running", "{what}: {state}");
    let pid = state["pid"].as_i64().expect("a running container has a PID") as i32;
    assert!(!frozen_or_traced(pid), "{what}: its init is {:?}", status_field(pid, "State"));
}

#[test]
fn a_container_survives_100_cycles_with_its_count_intact() {
    require_root();
    let scene = Scene::new();
    let runc = RuncRoot::new(scene.root(), "runc");
    let cid = id("cycles");
    let bundle = Bundle::counter(&scene.root().join("bundle"));
    let mut out = runc.run_detached(&bundle.dir, &cid);
    out.wait_for(2, T);
    let dest = scene.dest();
    let started = Instant::now();
    let (mut dumps, mut restores) = (Duration::ZERO, Duration::ZERO);
    // The first number the running container printed (after a restore: the one after the dump's last).
    let mut first: u64 = 0;
    for cycle in 0..CYCLES {
        let name = format!("c{cycle}");
        let t = Instant::now();
        let mut cmd = scene.cedana(&["dump", "runc", &cid, "--root"]);
        cmd.arg(&runc.root).arg("--dir").arg(&dest).args(["--name", &name, "--compression", "lz4"]);
        let dumped = cmd.output().unwrap();
        dumps += t.elapsed();
        assert!(dumped.status.success(), "cycle {cycle}: dump: {}", String::from_utf8_lossy(&dumped.stderr));
        // The dump ends the container: its output closes, and runc forgets it.
        let before = numbers(&out.wait_closed(T));
        assert_eq!(runc.status(&cid), None, "cycle {cycle}: the dumped container must be gone");
        let at_dump = *before.last().expect("output before the dump");
        // Every number once, in order, from where this container began to the dump.
        assert_eq!(before, (first..=at_dump).collect::<Vec<_>>(), "cycle {cycle}: gap or repeat before the dump");
        let path = dest.join(format!("{name}.tar.lz4"));
        let t = Instant::now();
        out = restore_runc(&scene, &runc, &path, &cid, &bundle.dir);
        restores += t.elapsed();
        // It goes on where it stopped, and keeps counting.
        let after = out.wait_numbers(2, T);
        assert_eq!(after[..2], [at_dump + 1, at_dump + 2], "cycle {cycle}: the restored counter must continue from {at_dump}");
        first = at_dump + 1;
        assert_container_runs(&runc, &cid, &format!("cycle {cycle}"));
        std::fs::remove_file(&path).unwrap();
        assert!(entries(&dest).is_empty(), "cycle {cycle}: {:?}", entries(&dest));
        scene.assert_no_criu();
        scene.assert_no_temporaries();
        scene.assert_no_mounts();
    }
    eprintln!("{CYCLES} container cycles in {:?} (dumps {dumps:?}, restores {restores:?})", started.elapsed());
    runc.ok(&["delete", "--force", &cid]);
}
