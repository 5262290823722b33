//! Containers checkpointed into an S3-compatible store (moto, started on 127.0.0.1 by the test) and restored
//! from it: `cedana dump runc --dir s3://...` and `cedana restore runc --path s3://...`; cedana-runc restoring
//! at create from `io.cedana.restore=s3://...` and `CEDANA_RESTORE=s3://...`; `cedana dump containerd --dir
//! s3://...` and `cedana restore containerd --path s3://... --lazy` through our shim, whose cedana-runc reads
//! the object with the credentials containerd passed down, the pages as the container needs them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cedana_integration::engines::{piped, put_shim_on_path, Containerd, RuncRoot};
use cedana_integration::images::{busybox_rootfs, Bundle};
use cedana_integration::lines::numbers;
use cedana_integration::moto::MotoServer;
use cedana_integration::{bin, cedana_cmd, require_root, success_stdout, wait_for};

const T: Duration = Duration::from_secs(30);

/// `cedana dump runc` of the counter `cid` into `s3://BUCKET/PREFIX/NAME.tar.zst`; returns its URL and the
/// last number counted before the dump.
fn dump_to_s3(
    moto: &MotoServer,
    runc: &RuncRoot,
    cid: &str,
    prefix: &str,
    out: &mut cedana_integration::lines::Lines,
) -> (String, u64) {
    let dump = runc
        .cedana_dump(cid, Path::new(&moto.url(prefix)), &["--name", "c", "--compression", "zstd", "--output", "json"])
        .envs(moto.env())
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(success_stdout("cedana dump runc --dir s3://", &dump).trim()).expect("json");
    let url = moto.url(&format!("{prefix}/c.tar.zst"));
    assert_eq!(report["path"], url.as_str(), "{report}");
    assert!(moto.has_object(&format!("{prefix}/c.tar.zst")) && moto.pending_uploads().is_empty());
    let last = *numbers(&out.wait_closed(T)).last().expect("output before the checkpoint");
    assert_eq!(runc.status(cid), None, "the dumped container is gone");
    (url, last)
}

#[test]
fn a_runc_container_goes_to_s3_and_comes_back_through_cedana_and_cedana_runc() {
    require_root();
    let moto = MotoServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let cid = format!("ced-s3-{}", std::process::id());
    let (bundle, mut out) = runc.run_counter(tmp.path(), &cid, 3, T);
    let (url, last) = dump_to_s3(&moto, &runc, &cid, "runc", &mut out);

    // cedana restore runc --path s3://...
    let restored = format!("{cid}-r");
    runc.track(&restored);
    let mut cmd = Command::new(bin("cedana"));
    cmd.args(["restore", "runc", "--detach", "--id", &restored, "--path", &url, "--root"])
        .arg(&runc.root)
        .arg("--bundle")
        .arg(&bundle.dir)
        .envs(moto.env());
    out = piped(&mut cmd);
    let status = cmd.status().unwrap();
    drop(cmd); // it holds the pipe's write end
    assert!(status.success(), "cedana restore runc --path s3://: {:?}", out.snapshot());
    let got = out.wait_numbers(3, T);
    assert_eq!(got[0], last + 1, "continues from {last}: {got:?}");

    // Again into the store, then cedana-runc restores at `run` from the annotation, then from the env.
    let (url, last) = dump_to_s3(&moto, &runc, &restored, "again", &mut out);
    let wrapped = RuncRoot::new(&tmp.path().join("wrapped"), bin("cedana-runc"));
    for by in ["annotation", "env"] {
        let b = Bundle::counter(&tmp.path().join(format!("bundle-{by}")));
        match by {
            "annotation" => b.annotate("io.cedana.restore", &url),
            _ => b.edit_config(|c| c["process"]["env"].as_array_mut().unwrap().push(format!("CEDANA_RESTORE={url}").into())),
        }
        let id = format!("{cid}-{by}");
        wrapped.track(&id);
        let mut cmd = wrapped.cmd(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
        cmd.envs(moto.env());
        let lines = piped(&mut cmd);
        let status = cmd.status().unwrap();
        drop(cmd); // it holds the pipe's write end
        assert!(status.success(), "cedana-runc run ({by}): {:?}", lines.snapshot());
        let got = lines.wait_numbers(3, T);
        assert_eq!(got[0], last + 1, "restored by {by}: continues from {last}: {got:?}");
        // Both restore the same checkpoint: end this copy first.
        wrapped.ok(&["kill", &id, "KILL"]);
        lines.wait_closed(T);
    }
}

#[test]
fn a_containerd_container_goes_to_s3_and_comes_back_on_our_shim() {
    require_root();
    bin("containerd-shim-cedana-v2");
    put_shim_on_path();
    let moto = MotoServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let d = Containerd::start_with_env(&tmp.path().join("containerd"), &moto.env());
    let image = "docker.io/cedana/counter-s3:latest";
    d.import(&busybox_rootfs(&tmp.path().join("rootfs")), image);
    let id = "ctrd-s3";
    let counter = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.1; done";
    let run = d
        .ctr_cmd(&["run", "--runtime", "io.containerd.cedana.v2", "--detach", "--null-io", image, id, "/bin/sh", "-c", counter])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(run.status.success(), "ctr run: {}", String::from_utf8_lossy(&run.stderr));
    let counts = |pid: i32| -> Vec<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/root/count")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    };
    let pid = wait_for("the task to run", T, || (d.task_status(id).as_deref() == Some("RUNNING")).then(|| d.task_pid(id)));
    wait_for("the counter to count", T, || (counts(pid).len() >= 5).then_some(()));
    let ns = ["--address", d.socket.to_str().unwrap(), "--namespace", &d.namespace];

    let prefix = moto.url("ctrd");
    let dump =
        cedana_cmd(&[&["dump", "containerd", id, "--dir", &prefix, "--compression", "zstd", "--rootfs"][..], &ns[..]].concat())
            .envs(moto.env())
            .output()
            .unwrap();
    let stdout = success_stdout("cedana dump containerd --dir s3://", &dump);
    let url = stdout.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_default().to_string();
    assert!(url.starts_with(&prefix) && url.ends_with(".tar.zst"), "the last field is the object's URL: {stdout}");
    assert!(moto.pending_uploads().is_empty());
    wait_for("the checkpointed task to stop", T, || (d.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
    let seen = *counts(pid).last().unwrap_or(&0);

    let new_id = "ctrd-s3-restored";
    // Lazily: the shim's cedana-runc reads the pages from the store as the container needs them.
    let restore =
        cedana_cmd(&[&["restore", "containerd", "--path", &url, "--id", new_id, "--detach", "--lazy"][..], &ns[..]].concat())
            .envs(moto.env())
            .output()
            .unwrap();
    success_stdout(
        &format!("cedana restore containerd --path s3:// (log: {})", d.dir.join("containerd.log").display()),
        &restore,
    );
    assert_eq!(d.task_status(new_id).as_deref(), Some("RUNNING"));
    let restored = d.task_pid(new_id);
    wait_for("the restored counter to count", T, || (counts(restored).len() > seen as usize + 3).then_some(()));
    let after = counts(restored);
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "with --rootfs the file came along and goes on: {after:?}");
    assert!(after.last().unwrap() > &seen, "{seen} then {after:?}");
    let log = d.dir.join("state/io.containerd.runtime.v2.task").join(&d.namespace).join(new_id).join("runtime.log");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("then its memory lazily"), "cedana-runc restored it lazily: {logged}");
}
