//! The sink and source against object_store's in-memory store, with a multipart wrapper that records calls
//! and fails parts on demand.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStoreExt, PutPayload, PutResult};

use super::config::Store;
use super::*;
use crate::checkpoint::{ArchiveSink, ArchiveSource, Existing};

const PS: usize = MIN_PART_SIZE;

/// InMemory's multipart calls, recorded (`put 3`, `complete 5`, `abort`), failing the parts listed in
/// `fail` and refusing to complete while `fail_complete`.
#[derive(Debug, Clone, Default)]
struct Recorder {
    inner: InMemory,
    log: Arc<Mutex<Vec<String>>>,
    fail: Arc<Mutex<Vec<usize>>>,
    fail_complete: Arc<Mutex<bool>>,
    /// Part uploads running now, the most seen at once, and how long each one takes.
    active: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicUsize>,
}

impl Recorder {
    fn note(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn store(&self) -> Store {
        let mut store = Store::of(self.inner.clone());
        store.multipart = Arc::new(self.clone());
        store.secrets.add("TOPSECRETVALUE");
        store
    }
}

#[async_trait::async_trait]
impl MultipartStore for Recorder {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.note("create".into());
        self.inner.create_multipart(path).await
    }
    async fn put_part(&self, path: &Path, id: &MultipartId, part_idx: usize, data: PutPayload) -> object_store::Result<PartId> {
        if self.fail.lock().unwrap().contains(&part_idx) {
            self.note(format!("fail {part_idx}"));
            let source = "Server returned non-2xx status code: 500 Internal Server Error: key TOPSECRETVALUE".into();
            return Err(object_store::Error::Generic { store: "test", source });
        }
        self.note(format!("put {part_idx} {}", data.content_length()));
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(self.delay_ms.load(Ordering::SeqCst) as u64)).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.inner.put_part(path, id, part_idx, data).await
    }
    async fn complete_multipart(&self, path: &Path, id: &MultipartId, parts: Vec<PartId>) -> object_store::Result<PutResult> {
        if *self.fail_complete.lock().unwrap() {
            return Err(object_store::Error::Generic {
                store: "test",
                source: "Server returned error response: slow down".into(),
            });
        }
        self.note(format!("complete {}", parts.len()));
        self.inner.complete_multipart(path, id, parts).await
    }
    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.note("abort".into());
        self.inner.abort_multipart(path, id).await
    }
}

fn config() -> StorageConfig {
    StorageConfig {
        part_size: PS,
        max_in_flight: 2,
        read_piece: 1 << 20,
        read_ahead: 2,
        read_segment: 3_000_001,
        ..Default::default()
    }
}

fn url(key: &str) -> ObjectUrl {
    ObjectUrl::parse(&format!("s3://bucket/{key}")).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()
}

fn get(rec: &Recorder, key: &str) -> Option<Vec<u8>> {
    let (store, path) = (rec.inner.clone(), Path::from(key));
    runtime::run(async move {
        match store.get(&path).await {
            Ok(r) => Ok(Some(r.bytes().await.unwrap().to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => panic!("{e}"),
        }
    })
    .unwrap()
}

#[test]
fn an_archive_goes_up_in_parts_with_a_patch_across_a_boundary_and_reads_back() {
    let rec = Recorder::default();
    let mut data = pattern(3 * PS + 12345);
    let mut sink: Box<dyn ArchiveSink> =
        Box::new(ObjectSink::start(rec.store(), &url("c/a.tar"), &config(), Existing::Refuse).unwrap());
    assert!(sink.patchable());
    assert_eq!(sink.location().to_str(), Some("s3://bucket/c/a.tar"));
    let at = (2 * PS - 500) as u64;
    let (mut pos, mut step) = (0usize, 1usize);
    let mut held = false;
    while pos < data.len() {
        if !held && pos + 4 * 1024 * 1024 >= at as usize {
            sink.hold(at); // announced before the bytes arrive
            held = true;
        }
        let n = step.min(data.len() - pos);
        sink.write_all(&data[pos..pos + n]).unwrap();
        pos += n;
        step = step * 7 % 3_000_001 + 1;
    }
    assert!(get(&rec, "c/a.tar").is_none(), "nothing visible before finish");
    let patch = vec![0xAB; 1024];
    sink.patch(at, &patch).unwrap();
    data[at as usize..at as usize + 1024].copy_from_slice(&patch);
    assert_eq!(sink.finish().unwrap().to_str(), Some("s3://bucket/c/a.tar"));
    assert_eq!(get(&rec, "c/a.tar").as_deref(), Some(&data[..]));
    let log = rec.log();
    assert_eq!(log.first().map(String::as_str), Some("create"));
    assert_eq!(log.last().map(String::as_str), Some("complete 4"));
    for p in 0..3 {
        assert!(log.contains(&format!("put {p} {PS}")), "{log:?}");
    }
    assert!(log.contains(&"put 3 12345".to_string()), "{log:?}");

    let src = ObjectSource::open(rec.store(), &url("c/a.tar"), &config()).unwrap();
    assert_eq!(src.len(), data.len() as u64);
    for (off, len) in [(0usize, 10usize), (PS - 3, 7), (at as usize, 1024), (data.len() - 1, 1), (7, 3 << 20)] {
        let mut buf = vec![0u8; len];
        src.read_exact_at(off as u64, &mut buf).unwrap();
        assert_eq!(buf, &data[off..off + len], "at {off}");
    }
    let mut buf = [0u8; 2];
    assert_eq!(src.read_exact_at(data.len() as u64 - 1, &mut buf).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    for off in [0usize, 1, PS + 17, data.len() - 5, data.len(), data.len() + 9] {
        let mut out = Vec::new();
        src.read_from(off as u64).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, &data[off.min(data.len())..], "from {off}");
    }
}

#[test]
fn parts_in_flight_are_bounded_and_fewer_while_parts_are_held() {
    let rec = Recorder::default();
    rec.delay_ms.store(30, Ordering::SeqCst);
    let config = StorageConfig { max_in_flight: 3, ..config() };
    let mut sink = Box::new(ObjectSink::start(rec.store(), &url("m"), &config, Existing::Refuse).unwrap());
    sink.write_all(&pattern(8 * PS)).unwrap();
    assert_eq!(rec.peak.load(Ordering::SeqCst), 3, "max_in_flight parts upload at once, no more");
    // Two parts held (a range across a boundary): one slot is left, so memory stays at about
    // part_size * (1 + max(max_in_flight, held + 1)).
    let more = pattern(8 * PS);
    // Let the last uploads (30 ms each) end before counting again.
    std::thread::sleep(std::time::Duration::from_millis(300));
    rec.peak.store(0, Ordering::SeqCst);
    let at = (10 * PS - 100) as u64;
    sink.hold(at);
    sink.write_all(&more).unwrap();
    assert_eq!(rec.peak.load(Ordering::SeqCst), 1, "{:?}", rec.log());
    sink.patch(at, &[1; 1024]).unwrap();
    sink.finish().unwrap();
    assert_eq!(get(&rec, "m").unwrap().len(), 16 * PS);
}

#[test]
fn an_upload_whose_parts_stop_completing_fails_after_the_stall_limit_and_a_slow_one_does_not() {
    let stall = std::time::Duration::from_millis(400);
    let with_stall = |c: StorageConfig| StorageConfig { retry: RetrySettings { stall_timeout: stall, ..c.retry.clone() }, ..c };
    // Slow but moving: every part takes 150 ms, well within the limit between completions.
    let rec = Recorder::default();
    rec.delay_ms.store(150, Ordering::SeqCst);
    let mut sink = Box::new(ObjectSink::start(rec.store(), &url("slow"), &with_stall(config()), Existing::Refuse).unwrap());
    sink.write_all(&pattern(6 * PS)).unwrap();
    sink.finish().unwrap();
    assert_eq!(get(&rec, "slow").unwrap().len(), 6 * PS);
    // Stuck: parts that never end (a store that stopped answering) fail the write soon after the limit, with
    // an error that says so, and every later call with it; the upload is aborted, no object appears.
    let rec = Recorder::default();
    rec.delay_ms.store(600_000, Ordering::SeqCst);
    let mut sink = Box::new(ObjectSink::start(rec.store(), &url("stuck"), &with_stall(config()), Existing::Refuse).unwrap());
    let started = std::time::Instant::now();
    let err = sink.write_all(&pattern(6 * PS)).unwrap_err();
    let took = started.elapsed();
    assert!(took >= stall && took < stall * 5, "failed after {took:?}");
    assert!(err.to_string().contains("stopped taking the upload") && err.to_string().contains("s3://bucket/stuck"), "{err}");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(sink.write_all(b"more").is_err(), "the failure sticks");
    drop(sink);
    assert!(rec.log().contains(&"abort".to_string()), "{:?}", rec.log());
    assert_eq!(get(&rec, "stuck"), None);
}

#[test]
fn small_and_empty_archives_complete() {
    for len in [0usize, 1, PS] {
        let rec = Recorder::default();
        let key = format!("s{len}");
        let mut sink = Box::new(ObjectSink::start(rec.store(), &url(&key), &config(), Existing::Refuse).unwrap());
        sink.write_all(&pattern(len)).unwrap();
        sink.finish().unwrap();
        assert_eq!(get(&rec, &key).unwrap(), pattern(len));
    }
}

#[test]
fn abort_and_drop_abort_the_upload_and_leave_no_object() {
    let rec = Recorder::default();
    let mut sink = Box::new(ObjectSink::start(rec.store(), &url("a"), &config(), Existing::Refuse).unwrap());
    sink.write_all(&pattern(2 * PS + 1)).unwrap();
    ArchiveSink::abort(sink, true);
    assert_eq!(rec.log().last().map(String::as_str), Some("abort"));
    assert!(get(&rec, "a").is_none());

    let rec = Recorder::default();
    {
        let mut sink = ObjectSink::start(rec.store(), &url("d"), &config(), Existing::Refuse).unwrap();
        sink.write_all(&pattern(PS + 1)).unwrap();
    }
    assert_eq!(rec.log().last().map(String::as_str), Some("abort"));
    assert!(get(&rec, "d").is_none());
}

#[test]
fn a_failed_part_fails_every_later_call_with_the_same_scrubbed_error() {
    let rec = Recorder::default();
    rec.fail.lock().unwrap().push(1);
    let mut sink = Box::new(ObjectSink::start(rec.store(), &url("f"), &config(), Existing::Refuse).unwrap());
    let chunk = pattern(1 << 20);
    let mut first = None;
    for _ in 0..(6 * PS / chunk.len()) {
        if let Err(e) = sink.write_all(&chunk) {
            first = Some(e);
            break;
        }
    }
    let first = first.expect("a write fails once part 1 failed").to_string();
    assert!(first.contains("unavailable") && first.contains("s3://bucket/f"), "{first}");
    assert!(!first.contains("TOPSECRETVALUE"), "{first}");
    assert_eq!(sink.write_all(b"x").unwrap_err().to_string(), first);
    let unfinished = sink.finish().unwrap_err();
    assert!(unfinished.error.to_string().contains("unavailable"), "{}", unfinished.error);
    unfinished.sink.abort(false);
    assert!(get(&rec, "f").is_none());
    assert_eq!(rec.log().last().map(String::as_str), Some("abort"));
}

#[test]
fn a_failed_completion_can_be_retried() {
    let rec = Recorder::default();
    *rec.fail_complete.lock().unwrap() = true;
    let mut sink = Box::new(ObjectSink::start(rec.store(), &url("r"), &config(), Existing::Refuse).unwrap());
    sink.write_all(&pattern(PS + 3)).unwrap();
    let unfinished = sink.finish().unwrap_err();
    assert!(unfinished.error.to_string().contains("unavailable"), "{}", unfinished.error);
    *rec.fail_complete.lock().unwrap() = false;
    unfinished.sink.finish().unwrap();
    assert_eq!(get(&rec, "r").unwrap(), pattern(PS + 3));
}

#[test]
fn existing_objects_are_refused_unless_replaced() {
    let rec = Recorder::default();
    let mut first = Box::new(ObjectSink::start(rec.store(), &url("e"), &config(), Existing::Refuse).unwrap());
    first.write_all(b"old").unwrap();
    // Another writer finishes first: the commit refuses to overwrite it.
    let mut second = Box::new(ObjectSink::start(rec.store(), &url("e"), &config(), Existing::Refuse).unwrap());
    second.write_all(b"new").unwrap();
    first.finish().unwrap();
    let unfinished = second.finish().unwrap_err();
    assert!(matches!(unfinished.error, crate::checkpoint::CheckpointError::Exists { .. }), "{}", unfinished.error);
    unfinished.sink.abort(false);
    let e = ObjectSink::start(rec.store(), &url("e"), &config(), Existing::Refuse).unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::AlreadyExists);
    let mut replacing = Box::new(ObjectSink::start(rec.store(), &url("e"), &config(), Existing::Replace).unwrap());
    replacing.write_all(b"newer").unwrap();
    assert_eq!(get(&rec, "e").unwrap(), b"old", "the old object stays until the new one is complete");
    replacing.finish().unwrap();
    assert_eq!(get(&rec, "e").unwrap(), b"newer");
}

#[test]
fn a_patch_of_an_uploaded_part_is_refused() {
    let rec = Recorder::default();
    let mut sink = ObjectSink::start(rec.store(), &url("p"), &config(), Existing::Refuse).unwrap();
    sink.write_all(&pattern(2 * PS)).unwrap();
    let e = sink.patch(10, b"abc").unwrap_err().to_string();
    assert!(e.contains("uploaded already"), "{e}");
}

#[test]
fn prefixes_are_not_objects() {
    let rec = Recorder::default();
    let e = ObjectSink::start(rec.store(), &url("dir/"), &config(), Existing::Refuse).unwrap_err();
    assert!(e.to_string().contains("prefix"), "{e}");
}

#[test]
fn listing_sizes_and_deleting() {
    let rec = Recorder::default();
    for (key, len) in [("ck/b", 3usize), ("ck/a", 5), ("ck-old/x", 1), ("ck/sub/c", 2)] {
        let mut sink = Box::new(ObjectSink::start(rec.store(), &url(key), &config(), Existing::Refuse).unwrap());
        sink.write_all(&pattern(len)).unwrap();
        sink.finish().unwrap();
    }
    let listed: Vec<_> = list_in(rec.store(), &url("ck")).unwrap().into_iter().map(|(u, n)| (u.to_string(), n)).collect();
    assert_eq!(listed, [("s3://bucket/ck/a".to_string(), 5), ("s3://bucket/ck/b".into(), 3), ("s3://bucket/ck/sub/c".into(), 2)]);
    assert_eq!(list_in(rec.store(), &url("")).unwrap().len(), 4);
    assert_eq!(size_in(rec.store(), &url("ck/a")).unwrap(), 5);
    delete_in(rec.store(), &url("ck/a")).unwrap();
    assert_eq!(size_in(rec.store(), &url("ck/a")).unwrap_err().kind(), crate::error::ErrorKind::NotFound);
    assert_eq!(delete_in(rec.store(), &url("ck/a")).unwrap_err().kind(), crate::error::ErrorKind::NotFound);
    let e = ObjectSource::open(rec.store(), &url("ck/a"), &config()).unwrap_err();
    assert_eq!(e.to_string(), "s3://bucket/ck/a not found: check the bucket and key");
}

#[test]
fn a_range_read_in_pieces_arrives_whole_in_order_and_stops_at_the_readers_error() {
    let rec = Recorder::default();
    let data = pattern(3 * (1 << 20) + 777);
    let (store, payload) = (rec.inner.clone(), PutPayload::from(data.clone()));
    runtime::run(async move {
        store.put(&Path::from("c/p"), payload).await.unwrap();
        Ok(())
    })
    .unwrap();
    let src = ObjectSource::open(rec.store(), &url("c/p"), &config()).unwrap();
    // Within one GET, across GETs of `read_piece` bytes, to the last byte.
    for (off, len) in [(0usize, 10usize), (5, (1 << 20) * 2 + 3), (data.len() - 9, 9), (17, 0)] {
        let mut got = Vec::new();
        let mut calls = 0;
        let done = src.read_in_pieces(off as u64, len as u64, &mut |piece| {
            calls += 1;
            got.extend_from_slice(piece);
            Ok(())
        });
        done.expect("an object source reads in pieces").unwrap();
        assert_eq!(got, &data[off..off + len], "{len} at {off}");
        assert!(len == 0 || calls >= len.div_ceil(1 << 20), "one piece at least per GET: {calls}");
    }
    let past = src.read_in_pieces(data.len() as u64 - 3, 4, &mut |_| Ok(())).unwrap().unwrap_err();
    assert_eq!(past.kind(), std::io::ErrorKind::UnexpectedEof);
    // The reader's own error ends the read and comes back as it was.
    let mut calls = 0;
    let err = src
        .read_in_pieces(0, data.len() as u64, &mut |_| {
            calls += 1;
            Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not what was expected"))
        })
        .unwrap()
        .unwrap_err();
    assert_eq!((err.kind(), err.to_string().as_str(), calls), (std::io::ErrorKind::InvalidData, "not what was expected", 1));
}
