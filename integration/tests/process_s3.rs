//! Process checkpoints in an S3-compatible store (moto, started on 127.0.0.1 by the test): a dump streams
//! from CRIU straight into a multipart upload, a restore streams from the object by ranged reads (or
//! downloads it with --no-stream), and a store that dies mid-upload leaves the process running and no object.

use std::process::Output;

use cedana_integration::moto::MotoServer;
use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::Signal;

fn cedana_s3(moto: &MotoServer, args: &[&str]) -> Output {
    cedana_cmd(args).envs(moto.env()).output().expect("run cedana")
}

fn ok(moto: &MotoServer, args: &[&str]) -> String {
    success_stdout(&format!("cedana {args:?}"), &cedana_s3(moto, args))
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn a_process_checkpoint_goes_to_s3_and_restores_from_it_through_userfaultfd_streamed_or_downloaded() {
    require_root();
    let moto = MotoServer::start();
    let work = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("memory"), &["32"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let pid = w.pid.to_string();
    let prefix = moto.url("ckpts");
    let out = json(&ok(
        &moto,
        &["dump", "process", &pid, "--dir", &prefix, "--name", "m", "--compression", "zstd", "--output", "json"],
    ));
    let url = moto.url("ckpts/m.tar.zst");
    assert_eq!(out["path"], url.as_str(), "{out}");
    assert_eq!(out["streamed"], true, "{out}");
    assert!(out["size"].as_u64().unwrap() > 1 << 20, "the object's size: {out}");
    assert!(moto.has_object("ckpts/m.tar.zst"));
    assert!(moto.pending_uploads().is_empty(), "{:?}", moto.pending_uploads());
    w.reap();

    // By default the memory comes by ranged reads through userfaultfd; `--stream` streams the images to
    // CRIU; `--no-stream` downloads the archive first.
    for (flags, through_uffd) in [(&[][..], true), (&["--stream"][..], false), (&["--no-stream"][..], false)] {
        wait_for("the dumped PID to be free", std::time::Duration::from_secs(10), || (!alive(w.pid)).then_some(()));
        std::fs::OpenOptions::new().write(true).open(&w.log).unwrap().set_len(sum.len() as u64 + 1).unwrap();
        let out = json(&ok(&moto, &[&["restore", "process", "--path", &url, "--output", "json"][..], flags].concat()));
        let timings = out["timings_ms"].as_object().unwrap_or_else(|| panic!("{out}"));
        assert_eq!(timings.contains_key("memory through userfaultfd"), through_uffd, "{flags:?}: {out}");
        assert!(alive(w.pid), "restored {flags:?}");
        w.signal(Signal::SIGUSR1);
        assert_eq!(w.wait_lines(2)[1], sum, "{flags:?}: the restored process has its memory");
        w.signal(Signal::SIGKILL);
    }
}

#[test]
fn a_store_that_dies_mid_upload_leaves_the_process_running_and_no_object() {
    require_root();
    let mut moto = MotoServer::start();
    let work = tempfile::tempdir().unwrap();
    let w = Workload::start(&workload_bin("memory"), &["256"], work.path());
    let sum = w.wait_lines(1)[0].clone();
    let child = cedana_cmd(&["dump", "process", &w.pid.to_string(), "--dir", &moto.url("dead"), "--compression", "lz4"])
        .envs(moto.env())
        .env("CEDANA_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the store once the upload has begun.
    wait_for("the upload to begin", std::time::Duration::from_secs(30), || moto.log().contains("uploadId").then_some(()));
    moto.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the dump must fail: {stderr}");
    assert!(!stderr.contains(moto_secret()), "no credential in errors: {stderr}");
    assert!(alive(w.pid), "the process keeps running: {stderr}");
    let state = std::fs::read_to_string(format!("/proc/{}/stat", w.pid)).unwrap();
    assert!(!state.contains(") T "), "not left stopped: {state}");
    w.signal(Signal::SIGUSR1);
    assert_eq!(w.wait_lines(2)[1], sum, "the process still has its memory");
}

fn moto_secret() -> &'static str {
    cedana_integration::moto::SECRET_ACCESS_KEY
}

#[test]
fn a_managed_job_is_checkpointed_to_s3_by_the_daemon_and_restored_from_it() {
    require_root();
    let moto = MotoServer::start();
    let env: Vec<(&str, String)> = moto.env();
    let vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = cedana_integration::daemon::Daemon::start_with_env(&vars);
    let log = d.dir().join("counter.log");
    let counter = workload_bin("counter");
    let out = d.ok(&["run", "process", "--jid", "s3job", "--out", log.to_str().unwrap(), "--", counter.to_str().unwrap()]);
    let pid = cedana_integration::daemon::printed_pid(&out);
    cedana_integration::daemon::wait_for_count(&log, 5, std::time::Duration::from_secs(20));
    let dumped = d.ok(&["dump", "job", "s3job", "--dir", &moto.url("jobs"), "--compression", "zstd"]);
    assert!(dumped.contains("s3://cedana-test/jobs/dump-process-s3job-"), "{dumped}");
    let checkpoints = d.ok(&["job", "checkpoints", "s3job"]);
    assert!(checkpoints.contains("s3://cedana-test/jobs/dump-process-s3job-"), "the remote path: {checkpoints}");
    assert!(checkpoints.contains("KiB") || checkpoints.contains("MiB"), "the object's size: {checkpoints}");
    wait_for("the dumped job to be gone", std::time::Duration::from_secs(10), || (!alive(pid)).then_some(()));
    let before = cedana_integration::daemon::numbers_in(&log).len();
    let restored = d.ok(&["restore", "job", "s3job"]);
    assert!(restored.contains(&format!("as PID {pid}")), "{restored}");
    let after = cedana_integration::daemon::wait_for_count(&log, before + 5, std::time::Duration::from_secs(20));
    assert!(cedana_integration::daemon::consecutive(&after), "the count goes on where it stopped: {after:?}");
    d.ok(&["job", "kill", "s3job"]);
}
