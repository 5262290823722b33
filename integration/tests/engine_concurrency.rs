//! The engine as a library, against the real CRIU, as the daemon and the shim will use it: several
//! operations at once on one `Engine` in one process, and a checkpoint streamed into a pipe.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use cedana::checkpoint::sink::Stream;
use cedana::checkpoint::CheckpointKind;
use cedana::codec::Compression;
use cedana::config::{Config, CriuDriverKind};
use cedana::engine::{Destination, DumpOutcome, DumpRequest, Engine, OpContext, RestoreRequest, Source, TargetSpec};
use cedana_integration::workload::Workload;
use cedana_integration::{require_root, wait_for, workload_bin};

fn engine() -> Engine {
    let mut config = Config::default();
    config.criu.driver = Some(CriuDriverKind::Swrk);
    Engine::new(config).expect("an engine (CRIU installed by scripts/setup.sh)")
}

fn dump_request(pid: i32, destination: Destination, name: &str, compression: Compression) -> DumpRequest {
    DumpRequest {
        target: TargetSpec::Process { pid },
        destination,
        name: Some(name.to_string()),
        compression,
        leave_running: false,
        options: Default::default(),
        stream: None,
    }
}

fn restore_request(path: &Path) -> RestoreRequest {
    RestoreRequest { only: Some(CheckpointKind::Process), ..RestoreRequest::new(Source::Path(path.to_path_buf())) }
}

/// The counter's numbers go on from where they were, with no gap and no repeat.
fn assert_counts_on(w: &Workload, before: usize) {
    let lines = w.wait_lines(before + 10);
    let numbers: Vec<u64> = lines.iter().map(|l| l.parse().expect("a number")).collect();
    assert!(numbers.windows(2).all(|p| p[1] == p[0] + 1), "PID {}: {numbers:?}", w.pid);
}

#[test]
fn two_dumps_and_two_restores_run_at_once_on_one_engine() {
    require_root();
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let (wa, wb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&wa).unwrap();
    std::fs::create_dir_all(&wb).unwrap();
    let mut a = Workload::start(&workload_bin("counter"), &[], &wa);
    let mut b = Workload::start(&workload_bin("counter"), &[], &wb);
    a.wait_lines(3);
    b.wait_lines(3);
    let out = dir.path().join("out");
    let dump = |pid: i32, name: &str, c: Compression| -> DumpOutcome {
        engine.dump(dump_request(pid, Destination::dir(&out), name, c), &OpContext::new()).expect("dump")
    };
    let (da, db) = std::thread::scope(|s| {
        let ha = s.spawn(|| dump(a.pid, "a", Compression::Zstd));
        let hb = s.spawn(|| dump(b.pid, "b", Compression::None));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!((da.manifest.process.pid, db.manifest.process.pid), (a.pid, b.pid), "each checkpoint holds its own tree");
    assert_eq!(da.path, out.join("a.tar.zst"));
    assert_eq!(db.path, out.join("b"));
    a.reap();
    b.reap();
    let (na, nb) = (a.lines().len(), b.lines().len());
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| engine.restore(restore_request(&da.path), &OpContext::new()));
        let hb = s.spawn(|| engine.restore(restore_request(&db.path), &OpContext::new()));
        (ha.join().unwrap().expect("restore a"), hb.join().unwrap().expect("restore b"))
    });
    assert_eq!((ra.pid, rb.pid), (a.pid, b.pid), "CRIU restores trees under their own PIDs");
    assert_counts_on(&a, na);
    assert_counts_on(&b, nb);
}

#[test]
fn a_checkpoint_streams_into_a_pipe_and_restores_from_what_came_out() {
    require_root();
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Workload::start(&workload_bin("counter"), &[], dir.path());
    w.wait_lines(3);
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let saved = dir.path().join("streamed.tar.zst");
    let copy_to = saved.clone();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        std::fs::File::from(read_end).read_to_end(&mut bytes).unwrap();
        std::fs::write(&copy_to, &bytes).unwrap();
        bytes.len()
    });
    let sink = Stream::new(std::fs::File::from(write_end), "pipe:streamed");
    let req = dump_request(w.pid, Destination::sink(Box::new(sink)), "streamed", Compression::Zstd);
    let out = engine.dump(req, &OpContext::new()).expect("dump into a pipe");
    let written = reader.join().unwrap();
    assert!(written > 4096, "the pipe carried the checkpoint ({written} bytes)");
    assert_eq!(out.path, Path::new("pipe:streamed"));
    w.reap();
    let before = w.lines().len();
    let restored = engine.restore(restore_request(&saved), &OpContext::new()).expect("restore what came out of the pipe");
    assert_eq!(restored.pid, w.pid);
    assert_eq!(restored.manifest.files.len(), out.manifest.files.len());
    assert_counts_on(&w, before);
    wait_for("the restored counter", Duration::from_secs(5), || cedana_integration::alive(w.pid).then_some(()));
}
