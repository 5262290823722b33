//! Process checkpoints in Google Cloud Storage, tested against gcp-storage-emulator behind the adapter of
//! `cedana_integration::gcs` (both started on 127.0.0.1 by the test): a dump goes up as an XML multipart
//! upload, a restore reads it back by ranged reads, a missing object is named as such, and an upload that
//! fails part-way, or whose command is killed, leaves no object. The commands get only the adapter's address and a key that disables
//! OAuth: no request can go to a real cloud or a metadata server.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cedana_integration::gcs::GcsServer;
use cedana_integration::invariants::*;
use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn gcs_cmd(gcs: &GcsServer, args: &[&str]) -> Command {
    let mut cmd = cedana_cmd(args);
    gcs.configure(&mut cmd);
    cmd
}

fn run(gcs: &GcsServer, args: &[&str]) -> Output {
    gcs_cmd(gcs, args).output().expect("run cedana")
}

fn ok(gcs: &GcsServer, args: &[&str]) -> String {
    success_stdout(&format!("cedana {args:?}"), &run(gcs, args))
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Every request reached the adapter with no token: none was fetched from a metadata server or Google.
fn assert_no_credentials_used(gcs: &GcsServer) {
    let seen = gcs.adapter().authorizations();
    assert!(!seen.is_empty(), "the adapter saw no request");
    assert!(seen.iter().all(|a| a.trim().is_empty() || a.trim() == "Bearer"), "a token was sent: {seen:?}");
}

#[test]
fn a_process_checkpoint_goes_to_gcs_in_parts_and_restores_from_it_streamed_or_downloaded() {
    require_root();
    let gcs = GcsServer::start();
    let work = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["128"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let out = json(&ok(
        &gcs,
        &["dump", "process", &pid, "--dir", &gcs.url("ckpts"), "--name", "m", "--compression", "zstd", "--output", "json"],
    ));
    let url = gcs.url("ckpts/m.tar.zst");
    assert_eq!(out["path"], url.as_str(), "{out}");
    assert_eq!(out["streamed"], true, "{out}");
    let size = out["size"].as_u64().unwrap();
    assert!(size > 40 << 20, "128 MiB, half random, compress to more than 40 MiB: {out}");
    let (parts, failed) = gcs.adapter().part_counts();
    assert!(parts >= 5 && failed == 0, "a multipart upload of 8 MiB parts: {parts} parts, {failed} failed");
    assert_eq!(gcs.objects("ckpts/"), vec![("ckpts/m.tar.zst".to_string(), size)], "the emulator holds the object");
    assert!(gcs.adapter().pending_uploads().is_empty(), "{:?}", gcs.adapter().pending_uploads());
    w.reap();

    for flags in [&[][..], &["--no-stream"][..]] {
        wait_for("the dumped PID to be free", Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
        std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
        ok(&gcs, &[&["restore", "process", "--path", &url][..], flags].concat());
        assert!(alive(w.pid), "restored {flags:?}");
        w.signal(Signal::SIGUSR1);
        assert_eq!(w.wait_lines(2)[1], sum, "{flags:?}: the restored process has its memory");
        w.signal(Signal::SIGKILL);
    }
    let log = gcs.log();
    assert!(log.contains("alt=media") && log.contains("206"), "the restores read ranges: {log}");
    assert_no_credentials_used(&gcs);
}

#[test]
fn a_restore_from_a_gcs_object_that_does_not_exist_says_so() {
    require_root();
    let gcs = GcsServer::start();
    for url in [gcs.url("nowhere/x.tar.zst"), "gs://no-such-bucket/x.tar.zst".to_string()] {
        let out = run(&gcs, &["restore", "process", "--path", &url]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: the restore must fail: {stderr}");
        assert!(stderr.contains(&format!("{url} not found")), "{url}: a clear error: {stderr}");
    }
    assert_no_credentials_used(&gcs);
}

#[test]
fn a_gcs_upload_that_fails_part_way_leaves_no_object_and_the_process_running() {
    require_root();
    let gcs = GcsServer::start();
    let work = tempfile::tempdir().unwrap();
    let w = Workload::start(&workload_bin("memory"), &["128"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    // Two parts go through; every later one fails, as a store that breaks mid-upload.
    gcs.adapter().fail_parts_after(2);
    let started = std::time::Instant::now();
    let out = gcs_cmd(&gcs, &["dump", "process", &w.pid.to_string(), "--dir", &gcs.url("dead"), "--compression", "zstd"])
        .env("CEDANA_STORAGE_STALL_TIMEOUT_S", "5")
        .env("CEDANA_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the dump must fail: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "it failed within the stall limit: {:?}", started.elapsed());
    let (parts, failed) = gcs.adapter().part_counts();
    assert!(parts == 2 && failed > 0, "{parts} parts stored, {failed} refused");
    assert_eq!(gcs.objects(""), vec![], "no object, complete-looking or not");
    assert!(gcs.adapter().pending_uploads().is_empty(), "the upload was aborted: {:?}", gcs.adapter().pending_uploads());
    assert!(alive(w.pid), "the process keeps running: {stderr}");
    let state = std::fs::read_to_string(format!("/proc/{}/stat", w.pid)).unwrap();
    assert!(!state.contains(") T "), "not left stopped: {state}");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], sum, "the process still has its memory");
    w.signal(Signal::SIGKILL);
    assert_no_credentials_used(&gcs);
}

#[test]
fn a_gcs_dump_killed_mid_upload_leaves_no_object_and_the_next_start_aborts_its_upload() {
    require_root();
    let scene = Scene::new();
    let gcs = GcsServer::start();
    let w = Workload::start(&workload_bin("memory"), &["256"], &scene.work());
    let sum = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let mut cmd = scene.cedana(&["dump", "process", &pid, "--no-server", "--dir", &gcs.url("kill"), "--compression", "zstd"]);
    let child = gcs.configure(&mut cmd).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("a stored part", Duration::from_secs(60), || (gcs.adapter().part_counts().0 > 0).then_some(()));
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "killed");
    scene.assert_no_criu();
    assert_running_unfrozen(w.pid);
    assert_memory_intact(w.pid, &w.log, &sum);
    assert_eq!(gcs.objects(""), vec![], "no object may appear");
    assert_eq!(gcs.adapter().pending_uploads().len(), 1, "the killed dump's upload is left pending");
    // The next start aborts it (the killed command recorded it in the scene's temporary folder).
    let next = ["dump", "process", &pid, "--no-server", "--leave-running", "--compression", "lz4", "--dir"];
    let mut cmd = scene.cedana(&next);
    cmd.arg(gcs.url("next"));
    let out = gcs.configure(&mut cmd).output().unwrap();
    assert!(out.status.success(), "the next dump: {}", String::from_utf8_lossy(&out.stderr));
    assert!(gcs.adapter().pending_uploads().is_empty(), "{:?}", gcs.adapter().pending_uploads());
    let objects: Vec<String> = gcs.objects("").into_iter().map(|(name, _)| name).collect();
    assert!(objects.len() == 1 && objects[0].starts_with("next/"), "only the next dump's object: {objects:?}");
    scene.assert_no_temporaries();
    w.signal(Signal::SIGKILL);
    assert_no_credentials_used(&gcs);
}
