//! A runc container whose stdout and stderr are a file on the host (`runc run -d ID > out.log 2>&1`):
//! `cedana dump runc` records the file as external, and the restore reconnects it, to the same file by
//! default (the output goes on in it), or to another path given to the engine.
//! Run as root: `cargo test -p cedana-integration --test runc_external_files`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cedana::checkpoint::{CheckpointKind, FileRedirect, FileSelector};
use cedana::codec::Compression;
use cedana::config::Config;
use cedana::engine::{
    ContainerRestore, Destination, DumpRequest, Engine, OpContext, RestoreRequest, RuncSpec, Source, TargetSpec,
};
use cedana::runc::RestoreFlags;
use cedana_integration::engines::RuncRoot;
use cedana_integration::images::Bundle;
use cedana_integration::{bin, require_root, wait_for};

const T: Duration = Duration::from_secs(20);

fn id(name: &str) -> String {
    format!("ced-ext-{name}-{}", std::process::id())
}

/// The counter's numbers in a file, skipping the zeros a restore onto a new file leaves in front.
fn numbers_in(file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap_or_default();
    String::from_utf8_lossy(&bytes).split(['\n', '\0']).filter_map(|l| l.trim().parse().ok()).collect()
}

/// Wait until `file` holds more than `n` numbers; return them.
fn wait_numbers(file: &Path, n: usize) -> Vec<u64> {
    wait_for(&format!("more than {n} numbers in {}", file.display()), T, || {
        let got = numbers_in(file);
        (got.len() > n).then_some(got)
    })
}

/// `run -d` the counter as `cid` with stdout and stderr on the host file `log` (opened as a shell's `>` does).
fn run_into_file(runc: &RuncRoot, bundle: &Bundle, cid: &str, log: &Path) {
    let file = std::fs::File::create(log).unwrap();
    runc.track(cid);
    let status = runc
        .cmd(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), cid])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    assert!(status.success());
    wait_numbers(log, 3);
}

fn assert_consecutive(numbers: &[u64], what: &str) {
    assert!(numbers.windows(2).all(|p| p[1] == p[0] + 1), "{what}: {numbers:?}");
}

#[test]
fn the_restored_container_writes_on_into_the_same_host_file() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let bundle = Bundle::counter(&tmp.path().join("bundle"));
    let cid = id("same");
    let log = tmp.path().join("out.log");
    run_into_file(&runc, &bundle, &cid, &log);

    let dir = tmp.path().join("cp");
    runc.cedana_dump_ok(&cid, &dir, &["--name", "cp", "--compression", "zstd"]);
    assert_eq!(runc.status(&cid), None, "the dump ends the container");
    let before = numbers_in(&log);
    let cp = dir.join("cp.tar.zst");
    let m: serde_json::Value = serde_json::from_slice(
        &Command::new(bin("cedana")).args(["checkpoint", "inspect", "--json"]).arg(&cp).output().unwrap().stdout,
    )
    .unwrap();
    let ext = &m["container"]["external_files"];
    assert_eq!(ext.as_array().map(Vec::len), Some(1), "{m}");
    assert_eq!(ext[0]["path"], log.to_str().unwrap());
    assert_eq!(ext[0]["fds"], serde_json::json!([1, 2]));
    assert_eq!(ext[0]["size"], std::fs::metadata(&log).unwrap().len(), "the size when the container was frozen");

    let copy = id("same-restored");
    runc.track(&copy);
    let out = Command::new(bin("cedana"))
        .args(["restore", "runc", "--detach", "--id", &copy, "--root"])
        .arg(&runc.root)
        .arg("--bundle")
        .arg(&bundle.dir)
        .arg("--path")
        .arg(&cp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = wait_numbers(&log, before.len() + 3);
    assert_consecutive(&after, "the lines go on in the same file, with no gap and no repeat");
    assert_eq!(runc.status(&copy).as_deref(), Some("running"));

    // And again: the restored container holds the same file, still outside its mounts; this time the CLI
    // reconnects it to another file (`--external-file 1=PATH`: the file descriptor 1 referred to).
    let dir2 = tmp.path().join("cp2");
    runc.cedana_dump_ok(&copy, &dir2, &["--name", "cp", "--compression", "lz4"]);
    let before = numbers_in(&log);
    let moved = tmp.path().join("moved.log");
    let again = id("same-again");
    runc.track(&again);
    let status = Command::new(bin("cedana"))
        .args(["restore", "runc", "--detach", "--id", &again, "--root"])
        .arg(&runc.root)
        .arg("--bundle")
        .arg(&bundle.dir)
        .arg("--path")
        .arg(dir2.join("cp.tar.lz4"))
        .arg("--external-file")
        .arg(format!("1={}", moved.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let next = wait_numbers(&moved, 3);
    assert_consecutive(&next, "after a second dump, restored onto another file");
    assert_eq!(next[0], before.last().unwrap() + 1, "the new file goes on from the old one's last line");
    assert_eq!(numbers_in(&log), before, "the old file gets nothing more");
}

fn engine() -> Engine {
    Engine::new(Config::default()).expect("an engine (CRIU installed by scripts/setup.sh)")
}

fn container(runc: &RuncRoot, id: &str, bundle: &Path) -> ContainerRestore {
    runc.track(id);
    ContainerRestore {
        id: id.to_string(),
        runtime: None,
        root: Some(runc.root.clone()),
        flags: RestoreFlags { bundle: bundle.to_path_buf(), detach: true, ..Default::default() },
    }
}

#[test]
fn the_engine_reconnects_the_file_to_another_path_when_asked() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let runc = RuncRoot::new(tmp.path(), "runc");
    let bundle = Bundle::counter(&tmp.path().join("bundle"));
    let cid = id("moved");
    let log = tmp.path().join("out.log");
    run_into_file(&runc, &bundle, &cid, &log);

    let engine = engine();
    let spec =
        RuncSpec { id: cid.clone(), runtime: None, root: Some(runc.root.clone()), work_path: None, extra_flags: Vec::new() };
    let req = DumpRequest {
        target: TargetSpec::Runc(spec),
        destination: Destination::dir(tmp.path().join("cp")),
        name: Some("cp".into()),
        compression: Compression::Tar,
        leave_running: false,
        options: Default::default(),
        stream: None,
    };
    let dumped = engine.dump(req, &OpContext::new()).expect("dump");
    let before = numbers_in(&log);
    let last = *before.last().unwrap();
    let old_size = std::fs::metadata(&log).unwrap().len();

    // A new file that does not exist yet, by the descriptor of the container's stdout.
    let moved: PathBuf = tmp.path().join("elsewhere/moved.log");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    let copy = id("moved-restored");
    let req = RestoreRequest {
        only: Some(CheckpointKind::Runc),
        container: Some(container(&runc, &copy, &bundle.dir)),
        external_files: vec![FileRedirect { from: FileSelector::Fd(1), to: moved.clone() }],
        ..RestoreRequest::new(Source::Path(dumped.path.clone()))
    };
    engine.restore(req, &OpContext::new()).expect("restore onto another path");
    let got = wait_numbers(&moved, 3);
    assert_eq!(got[0], last + 1, "the counter goes on in the new file: {got:?}");
    assert_consecutive(&got, "in the new file");
    assert_eq!(numbers_in(&log), before, "the old file is left alone");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), old_size);
    runc.ok(&["delete", "--force", &copy]);

    // A file of another size is refused before anything is restored.
    let other = tmp.path().join("other.log");
    std::fs::write(&other, b"not empty\n").unwrap();
    let refused = id("refused");
    let req = RestoreRequest {
        only: Some(CheckpointKind::Runc),
        container: Some(container(&runc, &refused, &bundle.dir)),
        external_files: vec![FileRedirect { from: FileSelector::Path(log.clone()), to: other.clone() }],
        ..RestoreRequest::new(Source::Path(dumped.path.clone()))
    };
    let err = engine.restore(req, &OpContext::new()).expect_err("a file of another size");
    assert!(err.to_string().contains("holds 10 bytes"), "{err}");
    assert_eq!(runc.status(&refused), None, "nothing was restored");
    assert_eq!(std::fs::read(&other).unwrap(), b"not empty\n");
}
