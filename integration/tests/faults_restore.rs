//! Restores that cannot be carried out: the dumped PID taken by another process, a file the program had
//! open removed. Nothing may be left running half-restored, the error must say what failed, no CRIU
//! process or temporary is left, and once the cause is gone the same checkpoint restores.
//! (A corrupted page image is refused by its checksum: process_failures.rs and process_stream.rs; a failed
//! GPU restore: gpu_fakes.rs.)

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use cedana_integration::invariants::*;
use cedana_integration::workload::Workload;
use cedana_integration::*;

/// Held by each test for its whole run. Taking a PID moves the kernel's next-PID cursor back, so the
/// processes started after it walk through the PIDs just above: a dumped PID of the other test waiting
/// for its restore would be taken.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Dump the memory workload of `scene` (it exits); its workload, checksum and checkpoint.
fn dumped(scene: &Scene) -> (Workload, String, std::path::PathBuf) {
    let mut w = Workload::start(&workload_bin("memory"), &["32"], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let dest = scene.dest();
    let out = scene.dump(w.pid, dest.to_str().unwrap(), "r", "zstd").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.reap();
    wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    (w, sum, dest.join("r.tar.zst"))
}

/// Start `sleep` under PID `pid` (through ns_last_pid; other processes may win the race: tried again).
fn take_pid(pid: i32) -> Option<std::process::Child> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let mut child = Command::new("sleep").arg("60").stdin(Stdio::null()).stdout(Stdio::null()).spawn().ok()?;
        if child.id() as i32 == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

#[test]
fn a_taken_pid_fails_the_restore_naming_the_holder_and_nothing_runs() {
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scene = Scene::new();
    let (w, sum, path) = dumped(&scene);
    let mut holder = take_pid(w.pid).expect("a process under the dumped PID");
    for flags in [&[][..], &["--no-stream"][..]] {
        let out =
            scene.cedana(&[&["restore", "process", "--path", path.to_str().unwrap()][..], flags].concat()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(&w.pid.to_string()) && stderr.contains("sleep"),
            "{flags:?}: the error names the PID and its holder: {stderr}"
        );
        scene.assert_no_criu();
        scene.assert_no_temporaries();
        assert_eq!(std::fs::read_to_string(format!("/proc/{}/comm", w.pid)).unwrap().trim(), "sleep", "the holder is untouched");
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
    std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
    let out = scene.cedana(&["restore", "process", "--path", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_memory_intact(w.pid, &w.log, &sum);
}

#[test]
fn a_missing_file_fails_the_restore_naming_it_and_nothing_runs() {
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scene = Scene::new();
    let (w, sum, path) = dumped(&scene);
    // The program's output file (its stdout and stderr) is gone.
    let saved = std::fs::read(&w.log).unwrap();
    std::fs::remove_file(&w.log).unwrap();
    for flags in [&[][..], &["--no-stream"][..]] {
        let out =
            scene.cedana(&[&["restore", "process", "--path", path.to_str().unwrap()][..], flags].concat()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: {stderr}");
        assert!(stderr.contains("memory.log"), "{flags:?}: the error names the missing file: {stderr}");
        scene.assert_no_criu();
        wait_for("nothing half-restored", SETTLE, || (!alive(w.pid)).then_some(()));
        scene.assert_no_temporaries();
        scene.assert_no_mounts();
    }
    // Put it back: the same checkpoint restores.
    std::fs::write(&w.log, &saved).unwrap();
    let out = scene.cedana(&["restore", "process", "--path", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_memory_intact(w.pid, &w.log, &sum);
}
