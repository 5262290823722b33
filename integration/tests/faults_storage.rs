//! Storage faults: an object store that stops answering (SIGSTOP of moto) and comes back or dies, one that
//! dies or answers errors mid-download, a read-only destination, a destination folder removed mid-dump.
//! After each: the workload runs unfrozen with its memory (or, for a restore, nothing runs), no CRIU
//! process, temporary or incomplete checkpoint is left, locally or in the store.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::invariants::*;
use cedana_integration::moto::{Fault, FaultProxy, MotoServer};
use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn signal_moto(moto: &MotoServer, sig: Signal) {
    kill(Pid::from_raw(moto.pid().expect("moto runs") as i32), sig).expect("signal moto");
}

/// Requests moto has logged so far whose line contains `what`.
fn requests(moto: &MotoServer, what: &str) -> usize {
    moto.log().lines().filter(|l| l.contains(what)).count()
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run cedana")
}

/// Start a dump of `w` to moto's `prefix` (gzip: the upload lasts), and wait until parts are uploaded.
fn dump_to_moto(scene: &Scene, moto: &MotoServer, w: &Workload, prefix: &str) -> Child {
    let mut cmd = scene.dump(w.pid, &moto.url(prefix), "s", "gzip");
    let child = spawn(cmd.envs(moto.env()));
    wait_for("a part upload", Duration::from_secs(60), || moto.log().contains("partNumber=").then_some(()));
    child
}

#[test]
fn a_store_that_stops_answering_and_comes_back_gets_a_complete_checkpoint() {
    require_root();
    let scene = Scene::new();
    let moto = MotoServer::start();
    let mut w = Workload::start(&workload_bin("memory"), &["128"], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let mut child = dump_to_moto(&scene, &moto, &w, "stall");
    signal_moto(&moto, Signal::SIGSTOP);
    // The fault lasts two seconds: the dump waits (the workload stays frozen until the upload completes).
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the dump waits for the store");
    signal_moto(&moto, Signal::SIGCONT);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the dump completes once the store answers: {}", String::from_utf8_lossy(&out.stderr));
    assert!(moto.has_object("stall/s.tar.gz"));
    assert!(moto.pending_uploads().is_empty(), "{:?}", moto.pending_uploads());
    scene.assert_no_criu();
    scene.assert_no_temporaries();
    w.reap();
    wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
    let out = scene.cedana(&["restore", "process", "--path", &moto.url("stall/s.tar.gz")]).envs(moto.env()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_memory_intact(w.pid, &w.log, &sum);
    w.signal(Signal::SIGKILL);
}

#[test]
fn a_store_that_stops_answering_then_dies_gives_the_workload_back() {
    require_root();
    let scene = Scene::new();
    let mut moto = MotoServer::start();
    let w = Workload::start(&workload_bin("memory"), &["128"], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let child = dump_to_moto(&scene, &moto, &w, "dead");
    signal_moto(&moto, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    moto.kill();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!("the dump failed {:?} after the store died", started.elapsed());
    assert!(!out.status.success());
    scene.assert_dump_rolled_back(w.pid);
    assert_memory_intact(w.pid, &w.log, &sum);
}

/// A store that stops answering for good (SIGSTOPped, so it still accepts connections but never answers):
/// the dump gives up once no part has completed for the stall limit (`storage.stall_timeout_s`, 3 s here;
/// without it the retries kept the workload frozen for about 3 minutes), says the store stopped taking the
/// upload, and gives the workload back, unfrozen and intact. Once the store answers again, the next start
/// aborts the upload that could not be aborted then: nothing is left in the store.
#[test]
fn a_store_that_stops_answering_for_good_gives_the_frozen_workload_back_within_the_stall_limit() {
    require_root();
    let scene = Scene::new();
    let moto = MotoServer::start();
    let w = Workload::start(&workload_bin("memory"), &["128"], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let mut cmd = scene.dump(w.pid, &moto.url("frozen"), "s", "gzip");
    cmd.env("CEDANA_STORAGE_STALL_TIMEOUT_S", "3");
    let child = spawn(cmd.envs(moto.env()));
    wait_for("a part upload", Duration::from_secs(60), || moto.log().contains("partNumber=").then_some(()));
    signal_moto(&moto, Signal::SIGSTOP);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = started.elapsed();
    signal_moto(&moto, Signal::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("the dump gave up {took:?} after the store stopped answering");
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped taking the upload") && stderr.contains("3 s"), "{stderr}");
    assert!(took < Duration::from_secs(40), "the workload was held frozen for {took:?}");
    scene.assert_dump_rolled_back(w.pid);
    assert_memory_intact(w.pid, &w.log, &sum);
    assert!(!moto.has_object("frozen/s.tar.gz"));
    let pid = w.pid.to_string();
    let next = ["dump", "process", &pid, "--no-server", "--leave-running", "--compression", "lz4", "--dir"];
    let out = scene.cedana(&next).arg(moto.url("next")).envs(moto.env()).output().unwrap();
    assert!(out.status.success(), "the next dump: {}", String::from_utf8_lossy(&out.stderr));
    assert_store_clean(&moto, "frozen/");
    scene.assert_no_temporaries();
    w.signal(Signal::SIGKILL);
}

/// Dump the memory workload to moto (it exits), then restore it with `flags` (through a fault proxy when
/// `proxy`), and let `fault` strike once the restore has read (or downloaded) part of the checkpoint: nothing
/// may be left running. The restore's stderr, the store's endpoint it used and the checkpoint's URL.
fn faulty_restore(
    flags: &[&str],
    fault: impl FnOnce(&mut MotoServer, Option<&FaultProxy>),
    proxy: bool,
) -> (String, String, String) {
    require_root();
    let scene = Scene::new();
    let mut moto = MotoServer::start();
    let mut w = Workload::start(&workload_bin("memory"), &["256"], &scene.work());
    w.wait_lines(1);
    let out = scene.dump(w.pid, &moto.url("r"), "s", "lz4").envs(moto.env()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.reap();
    wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    let proxy = proxy.then(|| FaultProxy::start(moto.port()));
    let mut cmd = scene.cedana(&[&["restore", "process", "--path", &moto.url("r/s.tar.lz4")][..], flags].concat());
    cmd.envs(moto.env());
    let endpoint = proxy.as_ref().map(FaultProxy::endpoint).unwrap_or_else(|| moto.endpoint());
    cmd.env("AWS_ENDPOINT_URL", &endpoint);
    let gets = requests(&moto, "GET /cedana-test/r/s.tar.lz4");
    let child = spawn(&mut cmd);
    if flags.contains(&"--no-stream") {
        // Once the download has begun: a file grows in a download folder of the scratch folder.
        wait_for_fast("the download to begin", Duration::from_secs(60), || (downloaded(&scene.tmp()) > 1 << 20).then_some(()));
    } else {
        // Once the restore has read the archive's end and some pages (moto logs a request once answered).
        wait_for("the restore to read", Duration::from_secs(60), || {
            (requests(&moto, "GET /cedana-test/r/s.tar.lz4") > gets + 2).then_some(())
        });
    }
    fault(&mut moto, proxy.as_ref());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the restore must fail: {stderr}");
    assert!(!stderr.contains(cedana_integration::moto::SECRET_ACCESS_KEY), "{stderr}");
    eprintln!("{flags:?}: {}", stderr.lines().rev().find(|l| l.contains("rror")).unwrap_or_default());
    scene.assert_no_criu();
    wait_for("nothing restored to be left", SETTLE, || (!alive(w.pid)).then_some(()));
    scene.assert_no_temporaries();
    scene.assert_no_mounts();
    (stderr.into_owned(), endpoint, moto.url("r/s.tar.lz4"))
}

/// The error of a restore from a store that stopped answering names the store as unreachable (its URL,
/// its endpoint and what to do), and does not call the checkpoint corrupt.
fn assert_unreachable(stderr: &str, endpoint: &str, url: &str) {
    assert!(stderr.contains("unreachable"), "the error must say the store is unreachable: {stderr}");
    assert!(stderr.contains(endpoint), "the error must name the endpoint {endpoint}: {stderr}");
    assert!(stderr.contains(url), "the error must name {url}: {stderr}");
    assert!(stderr.contains("check that"), "the error must say what to do: {stderr}");
    assert!(!stderr.to_lowercase().contains("corrupt"), "an unreachable store says nothing of the checkpoint: {stderr}");
}

/// Bytes in download folders under `dir`.
fn downloaded(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            match e.file_type() {
                Ok(t) if t.is_dir() && name.contains(".cedana-download-") => cedana::engine::dump::disk_size(&e.path()),
                Ok(t) if t.is_dir() => downloaded(&e.path()),
                _ => 0,
            }
        })
        .sum()
}

#[test]
fn a_store_killed_mid_download_leaves_nothing_restored_and_is_named_unreachable() {
    // Streamed by ranged reads, and downloaded first.
    for flags in [&[][..], &["--no-stream"][..]] {
        let (stderr, endpoint, url) = faulty_restore(flags, |m, _| m.kill(), false);
        assert_unreachable(&stderr, &endpoint, &url);
    }
}

#[test]
fn a_restore_from_a_store_nobody_listens_on_is_named_unreachable() {
    require_root();
    let scene = Scene::new();
    let mut moto = MotoServer::start();
    let mut w = Workload::start(&workload_bin("memory"), &["32"], &scene.work());
    w.wait_lines(1);
    let out = scene.dump(w.pid, &moto.url("gone"), "s", "lz4").envs(moto.env()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    w.reap();
    wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
    moto.kill();
    let url = moto.url("gone/s.tar.lz4");
    for flags in [&[][..], &["--no-stream"][..], &["--lazy"][..]] {
        let started = Instant::now();
        let out = scene.cedana(&[&["restore", "process", "--path", &url][..], flags].concat()).envs(moto.env()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "{flags:?} after {:?}: {}",
            started.elapsed(),
            stderr.lines().rev().find(|l| l.contains("rror")).unwrap_or_default()
        );
        assert!(!out.status.success(), "{flags:?}: {stderr}");
        assert_unreachable(&stderr, &moto.endpoint(), &url);
        assert!(!alive(w.pid), "{flags:?}: nothing restored");
    }
    scene.assert_no_criu();
    scene.assert_no_temporaries();
}

#[test]
fn a_store_answering_errors_mid_download_leaves_nothing_restored() {
    let (stderr, ..) = faulty_restore(&[], |_, p| p.expect("a proxy").set(Fault::FailAll), true);
    // The store answered: it is unavailable, not unreachable, and the checkpoint is not called corrupt.
    assert!(stderr.contains("unavailable") && !stderr.contains("unreachable"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("corrupt"), "{stderr}");
}

#[test]
fn a_read_only_destination_fails_before_freezing() {
    require_root();
    let scene = Scene::new();
    let dest = scene.dest();
    let mount = |args: &[&str]| assert!(Command::new("mount").args(args).arg(&dest).arg(&dest).status().unwrap().success());
    mount(&["--bind"]);
    let ok = Command::new("mount").args(["-o", "remount,ro,bind"]).arg(&dest).status().unwrap().success();
    let w = Workload::start(&workload_bin("memory"), &["32"], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let out =
        scene.cedana(&["dump", "process", &w.pid.to_string(), "--no-server", "--dir", dest.to_str().unwrap()]).output().unwrap();
    let _ = Command::new("umount").arg(&dest).status();
    assert!(ok, "remounting read-only");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Read-only") || stderr.contains("read-only"), "the error says why: {stderr}");
    assert!(stderr.contains(dest.to_str().unwrap()), "the error names the folder: {stderr}");
    scene.assert_dump_rolled_back(w.pid);
    assert_memory_intact(w.pid, &w.log, &sum);
}

#[test]
fn a_destination_removed_mid_dump_gives_the_workload_back() {
    require_root();
    for compression in ["tar", "none", "zstd"] {
        let scene = Scene::new();
        let dest = scene.dest().join("sub");
        let w = Workload::start(&workload_bin("memory"), &["256"], &scene.work());
        let sum = w.wait_lines(1)[0].clone();
        let child = spawn(&mut scene.dump(w.pid, dest.to_str().unwrap(), "gone", compression));
        // While the images are written (CRIU holds the workload frozen): the hidden checkpoint grows.
        wait_for_fast("the hidden checkpoint to grow", Duration::from_secs(60), || {
            std::fs::read_dir(&dest).ok()?.flatten().find(|e| {
                e.file_name().to_string_lossy().contains(".partial-") && cedana::engine::dump::disk_size(&e.path()) > 16 << 20
            })
        });
        std::fs::remove_dir_all(&dest).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{compression}: {}", stderr.lines().rev().find(|l| l.contains("rror")).unwrap_or_default());
        scene.assert_no_criu();
        assert_running_unfrozen(w.pid);
        assert!(!out.status.success(), "{compression}: the dump cannot succeed without its folder: {stderr}");
        assert_memory_intact(w.pid, &w.log, &sum);
        assert!(!dest.exists() || entries(&dest).is_empty(), "{compression}: {:?}", entries(&dest));
        scene.assert_no_temporaries();
    }
}
