//! CRIU's own fault injection (`CRIU_FAULT=<code>`, criu/include/fault-injection.h of CRIU 4.2) at dump and
//! restore, through both ways we drive CRIU (swrk for folders and files, the command line for streamed
//! images). A dump that fails leaves the workload running unfrozen with its memory, no CRIU process, no
//! temporary and no checkpoint; a restore that fails leaves nothing running and says CRIU failed; the same
//! checkpoint then restores without the fault.

use std::time::Duration;

use cedana_integration::invariants::*;
use cedana_integration::workload::Workload;
use cedana_integration::*;

/// Faults of a dump: 1 FI_DUMP_EARLY (CRIU kills itself once the tree is seized), 3 FI_DUMP_PAGES (writing
/// pages fails), 5 FI_PARASITE_CONNECT (the parasite's socket fails), 136 FI_DUMP_CRASH (CRIU crashes
/// after the dump).
const DUMP_FAULTS: &[(&str, &str)] =
    &[("1", "FI_DUMP_EARLY"), ("3", "FI_DUMP_PAGES"), ("5", "FI_PARASITE_CONNECT"), ("136", "FI_DUMP_CRASH")];

/// Faults of a restore: 2 FI_RESTORE_ROOT_ONLY (the root task fails), 6 FI_POST_RESTORE (the restore fails
/// once the tree is restored).
const RESTORE_FAULTS: &[(&str, &str)] = &[("2", "FI_RESTORE_ROOT_ONLY"), ("6", "FI_POST_RESTORE")];

#[test]
fn criu_faults_at_dump_leave_the_workload_running_and_nothing_behind() {
    require_root();
    for compression in ["none", "zstd"] {
        for (code, name) in DUMP_FAULTS {
            let scene = Scene::new();
            let mut w = Workload::start(&workload_bin("memory"), &["32"], &scene.work());
            let sum = w.wait_lines(1)[0].clone();
            let dest = scene.dest();
            let out = scene.dump(w.pid, dest.to_str().unwrap(), "f", compression).env("CRIU_FAULT", code).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                // CRIU ended the tree and the checkpoint is complete: it must restore, memory and all.
                eprintln!("{compression} {name}: the dump succeeded");
                w.reap();
                scene.assert_no_criu();
                scene.assert_no_temporaries();
                wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
                std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
                let path = entries(&dest).into_iter().next().expect("the checkpoint");
                let out = scene.cedana(&["restore", "process", "--path", dest.join(path).to_str().unwrap()]).output().unwrap();
                assert!(out.status.success(), "{compression} {name}: {}", String::from_utf8_lossy(&out.stderr));
                assert_memory_intact(w.pid, &w.log, &sum);
            } else {
                eprintln!("{compression} {name}: {}", stderr.lines().find(|l| l.contains("failed")).unwrap_or_default());
                assert!(
                    stderr.contains("criu") || stderr.contains("CRIU"),
                    "{compression} {name}: the error names CRIU: {stderr}"
                );
                scene.assert_dump_rolled_back(w.pid);
                assert_memory_intact(w.pid, &w.log, &sum);
                // CRIU's log is kept for the user, and the error says where.
                let kept = kept(&scene.tmp());
                assert!(kept.len() <= 1, "{kept:?}");
            }
        }
    }
}

#[test]
fn criu_faults_at_restore_leave_nothing_running_and_name_criu() {
    require_root();
    for flags in [&[][..], &["--no-stream"][..]] {
        let scene = Scene::new();
        let mut w = Workload::start(&workload_bin("memory"), &["32"], &scene.work());
        let sum = w.wait_lines(1)[0].clone();
        let dest = scene.dest();
        let out = scene.dump(w.pid, dest.to_str().unwrap(), "f", "zstd").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        w.reap();
        let path = dest.join("f.tar.zst");
        let rewind = || std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
        for (code, name) in RESTORE_FAULTS {
            wait_for("the PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
            rewind();
            let out = scene
                .cedana(&[&["restore", "process", "--path", path.to_str().unwrap()][..], flags].concat())
                .env("CRIU_FAULT", code)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            scene.assert_no_criu();
            if out.status.success() {
                eprintln!("{flags:?} {name}: the restore succeeded");
                assert_memory_intact(w.pid, &w.log, &sum);
                w.signal(nix::sys::signal::Signal::SIGKILL);
            } else {
                eprintln!("{flags:?} {name}: {}", stderr.lines().find(|l| l.contains("failed")).unwrap_or_default());
                assert!(stderr.contains("criu restore failed") || stderr.contains("CRIU"), "{flags:?} {name}: {stderr}");
                // Nothing is left running, not even for a moment longer than CRIU.
                wait_for("the half-restored tree to go", SETTLE, || (!alive(w.pid)).then_some(()));
            }
            scene.assert_no_temporaries();
            scene.assert_no_mounts();
        }
        // The same checkpoint restores without the fault.
        wait_for("the PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
        rewind();
        let out =
            scene.cedana(&[&["restore", "process", "--path", path.to_str().unwrap()][..], flags].concat()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_memory_intact(w.pid, &w.log, &sum);
        w.signal(nix::sys::signal::Signal::SIGKILL);
    }
}
