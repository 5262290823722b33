//! Object-store sinks and sources against a real S3-compatible server (moto, installed by scripts/setup.sh),
//! one server per test, and a proxy in front of it that answers errors on demand.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cedana::checkpoint::index::IndexedArchive;
use cedana::checkpoint::{ArchiveSink, ArchiveSource, CheckpointWriter, Existing, Manifest, FORMAT_VERSION};
use cedana::codec::Compression;
use cedana::error::ErrorKind;
use cedana::storage::{self, ObjectUrl, RetrySettings, StorageConfig, StorageError, MIN_PART_SIZE};
use cedana_integration::moto::{Fault, FaultProxy, MotoServer, ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};

const PS: usize = MIN_PART_SIZE;

/// Settings to reach `endpoint` with the test keys, with short retries so that failures come quickly.
fn config(endpoint: &str) -> StorageConfig {
    StorageConfig {
        part_size: PS,
        max_in_flight: 4,
        read_piece: 3 << 20,
        read_ahead: 2,
        read_segment: 7_000_003,
        retry: RetrySettings {
            max_retries: 2,
            retry_timeout: Duration::from_secs(3),
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(10),
        },
        ..MotoServer::storage_config(endpoint)
    }
}

fn url(moto: &MotoServer, key: &str) -> ObjectUrl {
    ObjectUrl::parse(&moto.url(key)).unwrap()
}

/// Deterministic bytes that do not repeat with any small period.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The storage error inside an io error from a sink or source.
fn storage_error(e: &std::io::Error) -> &StorageError {
    e.get_ref().and_then(|e| e.downcast_ref::<StorageError>()).unwrap_or_else(|| panic!("not a storage error: {e}"))
}

fn assert_no_credentials(msg: &str) {
    assert!(!msg.contains(SECRET_ACCESS_KEY), "the secret key leaked: {msg}");
    assert!(!msg.contains(ACCESS_KEY_ID), "the access key id leaked: {msg}");
}

/// Write `bytes` in odd sizes (1 byte up to about 3 MiB), announcing a hold at `hold_at` before the bytes
/// there arrive, as the checkpoint writer does for a tar header written before its entry's size is known.
fn write_odd(sink: &mut dyn ArchiveSink, bytes: &[u8], hold_at: Option<u64>) {
    let (mut pos, mut step) = (0usize, 1usize);
    let mut pending = hold_at;
    while pos < bytes.len() {
        if let Some(at) = pending.filter(|&at| pos as u64 + (4 << 20) >= at) {
            assert!(pos as u64 <= at);
            sink.hold(at);
            pending = None;
        }
        let n = step.min(bytes.len() - pos);
        sink.write_all(&bytes[pos..pos + n]).unwrap();
        pos += n;
        step = step * 7 % 3_000_017 + 1;
    }
}

#[test]
fn a_40_mib_archive_round_trips_with_a_patch_across_a_part_boundary() {
    let moto = MotoServer::start();
    let cfg = config(&moto.endpoint());
    let u = url(&moto, "ckpt/big.tar.zst");
    let mut bytes = data(40 * 1024 * 1024 + 54_321);
    let at = (3 * PS - 300) as u64;
    let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&u, &cfg).unwrap());
    assert!(sink.patchable());
    assert_eq!(sink.location().to_str(), Some("s3://cedana-test/ckpt/big.tar.zst"));
    write_odd(sink.as_mut(), &bytes, Some(at));
    assert!(!moto.has_object("ckpt/big.tar.zst"), "nothing visible before finish");
    assert_eq!(moto.pending_uploads(), ["ckpt/big.tar.zst"]);
    let header: Vec<u8> = (0..1024u32).map(|i| (i * 31) as u8).collect();
    sink.patch(at, &header).unwrap();
    bytes[at as usize..at as usize + 1024].copy_from_slice(&header);
    assert!(!moto.has_object("ckpt/big.tar.zst"), "still nothing visible after the patch");
    assert_eq!(sink.finish().unwrap().to_str(), Some("s3://cedana-test/ckpt/big.tar.zst"));
    assert!(moto.has_object("ckpt/big.tar.zst"));
    assert!(moto.pending_uploads().is_empty());
    assert_eq!(storage::size(&u, &cfg).unwrap(), bytes.len() as u64);

    let src = storage::open_source(&u, &cfg).unwrap();
    assert_eq!((src.len(), src.location()), (bytes.len() as u64, "s3://cedana-test/ckpt/big.tar.zst"));
    let n = bytes.len();
    for (off, len) in [(0, 512), (at as usize - 10, 1100), (PS - 1, 2), (5 * PS + 3, 9 << 20), (n - 1, 1), (n - 70_000, 70_000)] {
        let mut buf = vec![0u8; len];
        src.read_exact_at(off as u64, &mut buf).unwrap();
        assert!(buf == bytes[off..off + len], "read_exact_at({off}, {len})");
    }
    let mut buf = [0u8; 2];
    let e = src.read_exact_at(n as u64 - 1, &mut buf).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    for off in [0, 1, at as usize, 5 * PS + 77, n - 3, n] {
        let mut out = Vec::new();
        src.read_from(off as u64).unwrap().read_to_end(&mut out).unwrap();
        assert!(out == bytes[off..], "read_from({off}): {} bytes", out.len());
    }
    // Two streams at once, read in small pieces.
    let (mut a, mut b) = (src.read_from(100).unwrap(), src.read_from(PS as u64 * 2).unwrap());
    let (mut x, mut y) = ([0u8; 4096], [0u8; 4096]);
    a.read_exact(&mut x).unwrap();
    b.read_exact(&mut y).unwrap();
    assert!(x[..] == bytes[100..4196] && y[..] == bytes[2 * PS..2 * PS + 4096]);
}

/// A manifest for a test checkpoint (the writer fills in the files and the compression).
fn manifest() -> Manifest {
    serde_json::from_value(serde_json::json!({
        "format_version": FORMAT_VERSION,
        "kind": "process",
        "created_at": "2026-01-01T00:00:00Z",
        "hostname": "test",
        "cedana_version": "0",
        "criu_version": "4.2.1",
        "compression": "none",
        "process": { "pid": 1, "pids": [1], "cmdline": ["x"], "comm": "x", "exe": "/x", "cwd": "/" },
        "criu_options": {},
        "checksum": "xxh3-128/8MiB-chunks",
        "files": [],
    }))
    .expect("a manifest of this format version (update this test's JSON if the format changed)")
}

#[test]
fn a_checkpoint_written_by_the_checkpoint_writer_reads_back_through_its_index() {
    let moto = MotoServer::start();
    let cfg = config(&moto.endpoint());
    let u = url(&moto, "ckpt/written.tar.zst");
    let sink = storage::open_sink(&u, &cfg).unwrap();
    let mut w = CheckpointWriter::to_sink(Box::new(sink), Compression::Zstd).unwrap();
    assert!(w.accepts_unsized(), "an object sink can patch headers in");
    // Page images of unknown size first (their headers held and patched), then small files.
    let (pages1, pages2) = (data(13 << 20), data(7 << 20 | 12_345));
    w.add_unsized("pages-1.img", &mut &pages1[..]).unwrap();
    w.add_unsized("pages-2.img", &mut &pages2[..]).unwrap();
    w.add_bytes("core-1.img", b"core").unwrap();
    w.add_bytes("inventory.img", b"inv").unwrap();
    assert!(!moto.has_object("ckpt/written.tar.zst"));
    let location = w.commit(&mut manifest()).unwrap();
    assert_eq!(location.to_str(), Some("s3://cedana-test/ckpt/written.tar.zst"));
    assert!(moto.pending_uploads().is_empty());

    let src: Arc<dyn ArchiveSource> = Arc::new(storage::open_source(&u, &cfg).unwrap());
    let archive = IndexedArchive::open(src, 64 << 20).unwrap().expect("the archive has an index");
    assert_eq!(archive.manifest().files.len(), 4);
    for (name, want) in
        [("pages-1.img", &pages1[..]), ("pages-2.img", &pages2[..]), ("core-1.img", b"core"), ("inventory.img", b"inv")]
    {
        let mut out = Vec::new();
        let delivered = archive.copy_to(name, &mut out).unwrap();
        assert!(delivered.out_error.is_none());
        assert!(out == want, "{name}: {} bytes back", out.len());
    }
}

#[test]
fn abort_and_drop_leave_no_object_and_no_pending_upload() {
    let moto = MotoServer::start();
    let cfg = config(&moto.endpoint());
    let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&url(&moto, "aborted"), &cfg).unwrap());
    sink.write_all(&data(2 * PS + 100)).unwrap();
    assert_eq!(moto.pending_uploads(), ["aborted"]);
    sink.abort(true); // `keep` cannot be honoured remotely: aborted all the same
    {
        let mut dropped = storage::open_sink(&url(&moto, "dropped"), &cfg).unwrap();
        dropped.write_all(&data(PS + 1)).unwrap();
    }
    assert!(!moto.has_object("aborted") && !moto.has_object("dropped"));
    assert!(moto.pending_uploads().is_empty(), "{:?}", moto.pending_uploads());
    assert!(!storage::exists(&url(&moto, "aborted"), &cfg).unwrap());
}

#[test]
fn a_server_killed_mid_upload_fails_writes_and_finish_quickly() {
    let mut moto = MotoServer::start();
    let cfg = config(&moto.endpoint());
    let secret_key_url = url(&moto, "killed");
    let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&secret_key_url, &cfg).unwrap());
    let chunk = data(1 << 20);
    for _ in 0..12 {
        sink.write_all(&chunk).unwrap();
    }
    moto.kill();
    let start = Instant::now();
    let mut failure = None;
    for _ in 0..64 {
        if let Err(e) = sink.write_all(&chunk) {
            failure = Some(e);
            break;
        }
    }
    let e = failure.expect("writes fail once the server is gone");
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?} to notice");
    let msg = e.to_string();
    assert_eq!(storage_error(&e).kind(), ErrorKind::Unavailable, "{msg}");
    // A server that is gone refuses connections: the store is unreachable (not merely answering errors).
    assert!(msg.contains("s3://cedana-test/killed") && msg.contains("unreachable"), "{msg}");
    assert_no_credentials(&msg);
    // The same error again, at once.
    assert_eq!(sink.write_all(b"x").unwrap_err().to_string(), msg);
    let unfinished = sink.finish().unwrap_err();
    assert!(unfinished.error.to_string().contains("unreachable"), "{}", unfinished.error);
    let start = Instant::now();
    unfinished.sink.abort(false); // cannot reach the server either: logs a warning, bounded by the retries
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn server_errors_on_parts_fail_the_upload_and_leave_nothing() {
    let moto = MotoServer::start();
    let proxy = FaultProxy::start(moto.port());
    let cfg = config(&proxy.endpoint());
    let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&url(&moto, "faulty"), &cfg).unwrap());
    proxy.set(Fault::FailParts);
    let chunk = data(1 << 20);
    let start = Instant::now();
    let e = (0..64).find_map(|_| sink.write_all(&chunk).err()).expect("a write fails once parts fail");
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(proxy.faulted() >= 3, "a part is tried 1 + max_retries times: {}", proxy.faulted());
    let msg = e.to_string();
    assert_eq!(storage_error(&e).kind(), ErrorKind::Unavailable, "{msg}");
    assert!(msg.contains("500"), "{msg}");
    assert_no_credentials(&msg);
    let unfinished = sink.finish().unwrap_err();
    assert_no_credentials(&unfinished.error.to_string());
    proxy.set(Fault::None);
    unfinished.sink.abort(false);
    assert!(!moto.has_object("faulty"));
    assert!(moto.pending_uploads().is_empty(), "{:?}", moto.pending_uploads());
}

#[test]
fn transient_server_errors_are_retried_and_the_upload_completes() {
    let moto = MotoServer::start();
    let proxy = FaultProxy::start(moto.port());
    let mut cfg = config(&proxy.endpoint());
    cfg.retry.max_retries = 20;
    cfg.retry.retry_timeout = Duration::from_secs(30);
    let u = url(&moto, "flaky");
    let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&u, &cfg).unwrap());
    let bytes = data(3 * PS + 5);
    proxy.set(Fault::FailParts);
    sink.write_all(&bytes[..2 * PS]).unwrap(); // parts go out in the background, failing for now
    std::thread::sleep(Duration::from_millis(800));
    assert!(proxy.faulted() > 0, "the fault was hit");
    proxy.set(Fault::None);
    sink.write_all(&bytes[2 * PS..]).unwrap();
    sink.finish().unwrap();
    let mut back = Vec::new();
    storage::open_source(&u, &cfg).unwrap().read_from(0).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == bytes);
}

#[test]
fn no_error_message_shows_a_credential() {
    let moto = MotoServer::start();
    let proxy = FaultProxy::start(moto.port());
    let cfg = config(&proxy.endpoint());
    let mut messages = Vec::new();
    // A missing bucket, a missing object, an object that exists.
    let missing_bucket = ObjectUrl::parse("s3://no-such-bucket/x").unwrap();
    let e = storage::open_sink(&missing_bucket, &cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    messages.push(e.to_string());
    let e = storage::open_source(&url(&moto, "missing"), &cfg).unwrap_err();
    assert_eq!(e.to_string(), "s3://cedana-test/missing not found: check the bucket and key");
    messages.push(e.to_string());
    // Every request answered 500 with the Authorization header (naming the key id) echoed back.
    proxy.set(Fault::FailAll);
    for e in [storage::open_sink(&url(&moto, "x"), &cfg).unwrap_err(), storage::list(&url(&moto, ""), &cfg).unwrap_err()] {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        messages.push(e.to_string());
    }
    // Connections cut.
    proxy.set(Fault::Cut);
    messages.push(storage::size(&url(&moto, "x"), &cfg).unwrap_err().to_string());
    // Settings shown in a log.
    messages.push(format!("{cfg:?}"));
    for m in &messages {
        assert_no_credentials(m);
    }
    assert!(messages.iter().any(|m| m.contains("<redacted>")), "the echoed key id was redacted: {messages:#?}");
}

#[test]
fn listing_sizes_existence_and_deleting() {
    let moto = MotoServer::start();
    let cfg = config(&moto.endpoint());
    for (key, len) in [("ckpts/b.tar.zst", 10usize), ("ckpts/a.tar.zst", PS + 3), ("ckpts-old/c", 1), ("ckpts/sub/d", 0)] {
        let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&url(&moto, key), &cfg).unwrap());
        sink.write_all(&data(len)).unwrap();
        sink.finish().unwrap();
    }
    let listed: Vec<(String, u64)> =
        storage::list(&url(&moto, "ckpts/"), &cfg).unwrap().into_iter().map(|(u, n)| (u.to_string(), n)).collect();
    let want = [
        ("s3://cedana-test/ckpts/a.tar.zst".to_string(), PS as u64 + 3),
        ("s3://cedana-test/ckpts/b.tar.zst".into(), 10),
        ("s3://cedana-test/ckpts/sub/d".into(), 0),
    ];
    assert_eq!(listed, want);
    assert_eq!(storage::list(&url(&moto, "ckpts"), &cfg).unwrap().len(), 3, "a prefix is a folder: not ckpts-old");
    assert_eq!(storage::list(&url(&moto, ""), &cfg).unwrap().len(), 4);
    let a = url(&moto, "ckpts/a.tar.zst");
    assert!(storage::exists(&a, &cfg).unwrap());
    assert_eq!(storage::size(&a, &cfg).unwrap(), PS as u64 + 3);
    // A key that is taken is refused, unless replaced; the old object stays until the new one is complete.
    assert_eq!(storage::open_sink(&a, &cfg).unwrap_err().kind(), ErrorKind::AlreadyExists);
    let reading = storage::open_source(&a, &cfg).unwrap();
    let mut replacing: Box<dyn ArchiveSink> = Box::new(storage::open_sink_with(&a, &cfg, Existing::Replace).unwrap());
    replacing.write_all(b"new").unwrap();
    assert_eq!(storage::size(&a, &cfg).unwrap(), PS as u64 + 3);
    replacing.finish().unwrap();
    assert_eq!(storage::size(&a, &cfg).unwrap(), 3);
    // A source opened before reads the version it opened, or fails: never a mix of two archives.
    let e = reading.read_exact_at(0, &mut [0u8; 2]).unwrap_err();
    assert_eq!(storage_error(&e).kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("changed while it was being read"), "{e}");
    storage::delete(&a, &cfg).unwrap();
    assert!(!storage::exists(&a, &cfg).unwrap());
    assert_eq!(storage::delete(&a, &cfg).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(storage::list(&url(&moto, "ckpts/"), &cfg).unwrap().len(), 2);
}

/// The child half of [`the_standard_aws_variables_reach_the_store`]: runs only in a process of its own with
/// the variables set (changing the environment of this multi-threaded process would race other tests).
#[test]
fn env_child() {
    let Ok(key) = std::env::var("CEDANA_STORAGE_TEST_KEY") else { return };
    let u = ObjectUrl::parse(&key).unwrap();
    // Only the part size and fast retries set here: endpoint, keys, region and plain HTTP come from AWS_*.
    let cfg = StorageConfig { part_size: PS, ..Default::default() };
    let mut sink: Box<dyn ArchiveSink> = Box::new(storage::open_sink(&u, &cfg).unwrap());
    sink.write_all(&data(PS + 9)).unwrap();
    sink.finish().unwrap();
    assert_eq!(storage::size(&u, &cfg).unwrap(), PS as u64 + 9);
    println!("env child done");
}

/// Run [`env_child`] in a process of its own with `vars`, writing to `key` on `moto`.
fn run_env_child(moto: &MotoServer, key: &str, vars: &[(&str, String)]) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_child", "--nocapture", "--test-threads=1"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        // Should the keys not be found, fail here rather than ask a real instance metadata service.
        .env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CEDANA_STORAGE_TEST_KEY", moto.url(key))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("env child done"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(moto.has_object(key));
}

#[test]
fn the_standard_aws_variables_reach_the_store() {
    let moto = MotoServer::start();
    run_env_child(&moto, "from-env", &moto.env());
}

#[test]
fn keys_and_region_come_from_an_aws_profile() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (creds, conf) = (dir.path().join("credentials"), dir.path().join("config"));
    let ini = format!("[default]\naws_access_key_id = WRONG\n[cedana]\naws_access_key_id = {ACCESS_KEY_ID}\naws_secret_access_key = {SECRET_ACCESS_KEY}\n");
    std::fs::write(&creds, ini).unwrap();
    std::fs::write(&conf, format!("[profile cedana]\nregion = {REGION}\n")).unwrap();
    let vars = [
        ("AWS_PROFILE", "cedana".to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        ("AWS_CONFIG_FILE", conf.display().to_string()),
        ("AWS_ENDPOINT_URL", moto.endpoint()),
        ("AWS_ALLOW_HTTP", "true".into()),
    ];
    run_env_child(&moto, "from-profile", &vars);
}
