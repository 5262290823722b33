//! Page images served for a lazy restore from an archive read by ranges (an object in a store) or
//! compressed: fetched in the checksum's chunks (8 MiB; in a compressed archive each chunk is one unit of
//! its own, decoded alone), the last few kept, each chunk hashed as it arrives and checked against the
//! manifest's hash of that chunk before any byte of it is served (manifests of earlier versions list no
//! chunk hashes: their images are checked whole only), so the page images are verified with no second
//! read: [`ChunkedPages::verify`], once the transfer is over, fetches the chunks never asked for and
//! compares every image's digest.
//!
//! Reading ahead: once an image is read chunk after chunk (the lazy-pages handler's background transfer goes
//! front to back, and so do programs walking their memory), the next [`READ_AHEAD`] chunks are fetched and
//! decoded on threads of their own while the current one is served, so the serving thread seldom waits for
//! a decode or a ranged read. Chunks asked for out of order fetch nothing ahead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::digest::{combine, xxh3_128, CHUNK};
use super::lazy::LazyPage;
use super::reader::corrupt;
use super::units_read::decode_unit_into;
use super::CheckpointError;
use crate::codec::pool::{BufPool, Pooled};
use crate::criu::pages::PageStore;

/// A chunk's bytes, shared by the readers serving from it; its buffer goes back to the pool after the last.
type Chunk = Arc<Pooled>;

/// Chunks fetched ahead of one read in sequence.
pub const READ_AHEAD: usize = 2;

/// Chunks fetched ahead of the one being copied when the memory is filled front to back
/// ([`ChunkedPages::read_in_sequence`]) from a local archive: one decoding while one is copied keeps both
/// cores of the reference machine busy, and a second ahead was no faster.
pub const AHEAD_FROM_FILE: usize = 1;

/// The same from an object store: a chunk waits on the network as well, so with one ahead a fifth of the
/// CPU sat idle; two ahead fill it (medians 0.99 -> 0.95 s from a store on the same 2 cores, 8 MiB more).
pub const AHEAD_FROM_STORE: usize = 2;

/// Chunks kept per image (the background transfer reads in sequence; faults jump about), besides
/// those fetched ahead.
const CACHED_CHUNKS: usize = 4 + READ_AHEAD;

struct Image {
    page: LazyPage,
    /// Buffers for chunks (decoded, or read as they are) and for the units read before decoding: reused, so
    /// that a chunk costs no fresh memory to fault in and zero.
    chunks: Arc<BufPool>,
    packed: Arc<BufPool>,
    /// In a compressed archive: where each unit starts, from the page image's base.
    unit_starts: Vec<u64>,
    /// How many chunks `state` keeps (those fetched ahead included), and how many are fetched ahead.
    keep: AtomicUsize,
    ahead: AtomicUsize,
    /// Read front to back ([`ChunkedPages::read_in_sequence`]): a chunk is dropped once reading moves on
    /// to the next.
    sequential: AtomicBool,
    state: Mutex<State>,
    /// Signalled when a chunk fetched ahead arrives (or failed).
    arrived: Condvar,
}

#[derive(Default)]
struct State {
    /// The hash of each chunk fetched so far.
    hashes: Vec<Option<u128>>,
    cache: VecDeque<(usize, Chunk)>,
    /// Chunks being fetched ahead, on threads of their own.
    ahead: HashSet<usize>,
    /// The chunk the last read asked for.
    last_read: Option<usize>,
}

impl State {
    fn cached(&self, i: usize) -> Option<Chunk> {
        self.cache.iter().find(|(n, _)| *n == i).map(|(_, c)| Arc::clone(c))
    }

    /// Keep chunk `i` (and its hash, hashed by the fetching thread, the first time), dropping the oldest
    /// beyond the cache's size, but not the chunk last read while another is there to drop (a chunk fetched
    /// ahead may land before the one being read was kept, or while it is still being read).
    fn keep(&mut self, i: usize, (bytes, hash): &(Chunk, u128), limit: usize) {
        if self.hashes[i].is_none() {
            self.hashes[i] = Some(*hash);
        }
        if self.cached(i).is_some() {
            return;
        }
        while self.cache.len() >= limit.max(1) {
            let oldest_other = self.cache.iter().position(|(n, _)| Some(*n) != self.last_read).unwrap_or(0);
            self.cache.remove(oldest_other);
        }
        self.cache.push_back((i, Arc::clone(bytes)));
    }
}

/// Page images read by ranges, verified as they go.
pub struct ChunkedPages {
    images: HashMap<u32, Arc<Image>>,
    location: PathBuf,
}

impl ChunkedPages {
    /// The page images of a checkpoint at `location`.
    pub fn new(pages: &[LazyPage], location: &Path) -> Self {
        let images = pages
            .iter()
            .filter_map(|p| {
                let chunks = p.digest.size.div_ceil(CHUNK as u64).max(1) as usize;
                let state = State { hashes: vec![None; chunks], ..State::default() };
                let unit_starts =
                    p.units.iter().scan(0u64, |at, len| Some(std::mem::replace(at, at.saturating_add(*len)))).collect();
                // Those cached and fetched ahead, those being served, and one being fetched on demand.
                let chunks = BufPool::new(CACHED_CHUNKS + READ_AHEAD + 2);
                let packed = BufPool::new(READ_AHEAD + 1);
                let (state, arrived) = (Mutex::new(state), Condvar::new());
                let (keep, ahead) = (AtomicUsize::new(CACHED_CHUNKS), AtomicUsize::new(READ_AHEAD));
                let sequential = AtomicBool::new(false);
                let image = Image { page: p.clone(), chunks, packed, unit_starts, keep, ahead, sequential, state, arrived };
                Some((p.pages_id()?, Arc::new(image)))
            })
            .collect();
        Self { images, location: location.to_path_buf() }
    }

    /// For a reader that goes through the images front to back: keep only the chunk being read and the
    /// `ahead` fetched ahead of it (each fetched on a thread of its own), and drop a chunk as soon as reading
    /// moves on to the next, so that `ahead` fetches under way cost `ahead + 1` chunks of memory. (A chunk
    /// fetched ahead never displaces the one being read: that one would be fetched again.)
    pub fn read_in_sequence(&self, ahead: usize) {
        let ahead = ahead.max(1);
        for image in self.images.values() {
            image.keep.store(1 + ahead, Ordering::Relaxed);
            image.ahead.store(ahead, Ordering::Relaxed);
            image.sequential.store(true, Ordering::Relaxed);
        }
    }

    /// Fetch every chunk not fetched yet and compare each image with the manifest.
    pub fn verify(&self) -> Result<(), CheckpointError> {
        for image in self.images.values() {
            let chunks = {
                let state =
                    image.state.lock().map_err(|_| corrupt(&self.location, "a lazy-pages reader thread panicked".into()))?;
                state.hashes.len()
            };
            let mut hashes = Vec::with_capacity(chunks);
            for i in 0..chunks {
                let known = image.state.lock().ok().and_then(|s| s.hashes[i]);
                let hash = match known {
                    Some(h) => h,
                    None => image.fetch(i).map_err(|e| read_failed(&self.location, e))?.1,
                };
                hashes.push(hash);
            }
            let digest = combine(image.page.name.clone(), image.page.digest.size, &hashes);
            if !digest.same(&image.page.digest) {
                return Err(corrupt(&self.location, format!("checksum mismatch in {}", image.page.name)));
            }
        }
        Ok(())
    }
}

/// A failed read of the page images of the checkpoint at `location`: a chunk that does not match its hash,
/// a unit that does not decode or a chunk that is not there is damage; anything else, the source's failure.
pub(crate) fn read_failed(location: &Path, e: std::io::Error) -> CheckpointError {
    match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => corrupt(location, e.to_string()),
        _ => CheckpointError::io(location)(e),
    }
}

fn poisoned<T>(_: T) -> std::io::Error {
    std::io::Error::other("a lazy-pages reader thread panicked")
}

impl Image {
    /// Chunk `i`, from the cache, from a fetch ahead under way, or fetched now (and hashed, the first time);
    /// a read in sequence starts fetching the next chunks.
    fn chunk(self: &Arc<Self>, i: usize) -> std::io::Result<Chunk> {
        let mut state = self.state.lock().map_err(poisoned)?;
        if state.last_read != Some(i) {
            let in_sequence = state.last_read.is_some_and(|last| last + 1 == i);
            state.last_read = Some(i);
            if in_sequence {
                if self.sequential.load(Ordering::Relaxed) {
                    // Its buffer goes back to the pool for the next fetch (once the last reader of it is done).
                    state.cache.retain(|(n, _)| *n >= i);
                }
                self.read_ahead(&mut state, i);
            }
        }
        while state.ahead.contains(&i) {
            state = self.arrived.wait(state).map_err(poisoned)?;
        }
        if let Some(c) = state.cached(i) {
            return Ok(c);
        }
        drop(state);
        let fetched = self.fetch(i)?;
        let limit = self.keep.load(Ordering::Relaxed);
        self.state.lock().map_err(poisoned)?.keep(i, &fetched, limit);
        Ok(fetched.0)
    }

    /// Start fetching the [`READ_AHEAD`] chunks after `i` that are neither cached nor under way. A chunk
    /// that fails to arrive is only dropped: whoever asks for it fetches it again and sees the error.
    fn read_ahead(self: &Arc<Self>, state: &mut State, i: usize) {
        let chunks = state.hashes.len();
        for j in (i + 1..=i + self.ahead.load(Ordering::Relaxed)).filter(|j| *j < chunks) {
            self.fetch_ahead(state, j);
        }
    }

    /// Start fetching chunk `j` on a thread of its own, unless it is cached or under way already.
    fn fetch_ahead(self: &Arc<Self>, state: &mut State, j: usize) {
        if j >= state.hashes.len() || state.ahead.contains(&j) || state.cached(j).is_some() {
            return;
        }
        let image = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("cedana-read-ahead".into()).spawn(move || {
            let fetched = image.fetch(j);
            if let Ok(mut state) = image.state.lock() {
                state.ahead.remove(&j);
                match fetched {
                    Ok(bytes) => state.keep(j, &bytes, image.keep.load(Ordering::Relaxed)),
                    Err(e) => tracing::debug!(image = %image.page.name, chunk = j, error = %e, "reading ahead failed"),
                }
            }
            image.arrived.notify_all();
        });
        if spawned.is_ok() {
            state.ahead.insert(j);
        }
    }

    /// Chunk `i` read (and decoded), with its hash.
    fn fetch(&self, i: usize) -> std::io::Result<(Chunk, u128)> {
        let page = &self.page;
        let start = i as u64 * CHUNK as u64;
        let len = (page.digest.size - start).min(CHUNK as u64) as usize;
        let mut buf = self.chunks.lend(self.chunks.take_len(len));
        if page.units.is_empty() {
            page.source.read_exact_at(page.base + start, &mut buf)?;
        } else {
            let (Some(&at), Some(&size)) = (self.unit_starts.get(i), page.units.get(i)) else {
                let what = format!("{}: the manifest places no unit for chunk {i}", page.name);
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
            };
            let mut packed = self.packed.lend(self.packed.take());
            decode_unit_into(&*page.source, page.compression, page.base + at, size, &mut buf, &mut packed)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: unit {i} {e}", page.name)))?;
        }
        let hash = xxh3_128(&buf);
        // Checked before any of it is served, where the manifest lists the chunks (or the image is one chunk).
        if page.digest.chunk_matches(i, hash) == Some(false) {
            let what = format!("checksum mismatch in {} (chunk {i}, bytes {start}..{})", page.name, start + len as u64);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
        }
        Ok((Arc::new(buf), hash))
    }
}

impl ChunkedPages {
    /// The chunks that hold `len` bytes of `pages-<pages_id>.img` from `offset` on, each with the range of
    /// it that does.
    fn pieces(&self, pages_id: u32, offset: u64, len: usize) -> std::io::Result<Vec<(Chunk, std::ops::Range<usize>)>> {
        let image = self
            .images
            .get(&pages_id)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no pages-{pages_id}.img")))?;
        let end = offset + len as u64;
        if end > image.page.digest.size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut pieces = Vec::with_capacity(2);
        let mut at = offset;
        while at < end {
            let i = (at / CHUNK as u64) as usize;
            let chunk = image.chunk(i)?;
            let from = (at - i as u64 * CHUNK as u64) as usize;
            let n = (chunk.len() - from).min((end - at) as usize);
            pieces.push((chunk, from..from + n));
            at += n as u64;
        }
        Ok(pieces)
    }
}

impl PageStore for ChunkedPages {
    fn read_at(&self, pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut dst = 0;
        for (chunk, range) in self.pieces(pages_id, offset, buf.len())? {
            buf[dst..dst + range.len()].copy_from_slice(&chunk[range.clone()]);
            dst += range.len();
        }
        Ok(())
    }

    /// The chunk holding `offset`, fetched ahead (unless cached or under way).
    fn prefetch(&self, pages_id: u32, offset: u64) {
        let Some(image) = self.images.get(&pages_id) else { return };
        if let Ok(mut state) = image.state.lock() {
            image.fetch_ahead(&mut state, (offset / CHUNK as u64) as usize);
        }
    }

    /// Straight from the decoded chunks (every chunk fetched before the first piece is handed on).
    fn each_piece(
        &self,
        pages_id: u32,
        offset: u64,
        len: usize,
        _buf: &mut Vec<u8>,
        each: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        for (chunk, range) in self.pieces(pages_id, offset, len)? {
            if !each(&chunk[range]) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::ArchiveSource;
    use crate::codec::Compression;
    use std::io::Read;
    use std::time::{Duration, Instant};

    /// Bytes in memory that record which offsets were read, and may hold each read back for a while.
    struct Recorded {
        bytes: Vec<u8>,
        reads: Mutex<Vec<u64>>,
        delay: Duration,
    }

    impl ArchiveSource for Recorded {
        fn location(&self) -> &str {
            "memory"
        }
        fn len(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            std::thread::sleep(self.delay);
            self.reads.lock().unwrap().push(offset);
            buf.copy_from_slice(&self.bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn read_from(&self, offset: u64) -> std::io::Result<Box<dyn Read + Send>> {
            Ok(Box::new(std::io::Cursor::new(self.bytes[offset as usize..].to_vec())))
        }
    }

    fn store(chunks: usize, delay: Duration) -> (ChunkedPages, Arc<Recorded>) {
        store_damaged(chunks, delay, None, true)
    }

    /// A store whose byte `damaged` (if any) was flipped after the dump; `listed`: its manifest lists the
    /// chunks' hashes (else: of an earlier version).
    fn store_damaged(chunks: usize, delay: Duration, damaged: Option<usize>, listed: bool) -> (ChunkedPages, Arc<Recorded>) {
        let mut bytes: Vec<u8> = (0..chunks * CHUNK).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
        let hashes: Vec<u128> = bytes.chunks(CHUNK).map(xxh3_128).collect();
        let mut digest = combine("pages-1.img".into(), bytes.len() as u64, &hashes);
        if !listed {
            digest.chunks.clear();
        }
        if let Some(at) = damaged {
            bytes[at] ^= 0x40;
        }
        let source = Arc::new(Recorded { bytes, reads: Mutex::new(Vec::new()), delay });
        let page = LazyPage {
            name: "pages-1.img".into(),
            source: source.clone(),
            base: 0,
            digest,
            units: Vec::new(),
            compression: Compression::None,
        };
        (ChunkedPages::new(&[page], Path::new("memory")), source)
    }

    fn read(s: &ChunkedPages, chunk: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        s.read_at(1, (chunk * CHUNK + 8192) as u64, &mut buf).unwrap();
        buf
    }

    fn chunks_read(source: &Recorded) -> Vec<usize> {
        let mut v: Vec<usize> = source.reads.lock().unwrap().iter().map(|o| *o as usize / CHUNK).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn reads_in_sequence_fetch_the_next_chunks_ahead_and_out_of_order_reads_do_not() {
        let (s, source) = store(8, Duration::ZERO);
        read(&s, 5);
        read(&s, 2);
        assert_eq!(chunks_read(&source), [2, 5], "reads out of order fetch only what they ask for");
        let image = s.images.get(&1).unwrap();
        // Once the reads wanted were made and every fetch ahead has ended (a loaded machine may take a while),
        // and a little more for any read that should not happen: the chunks read.
        let settled = |want: &[usize]| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while (chunks_read(&source) != want || !image.state.lock().unwrap().ahead.is_empty()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            chunks_read(&source)
        };
        read(&s, 3);
        // Chunk 3 follows 2: chunks 4 and 5 come ahead (5 was cached already, so only 4 is read).
        assert_eq!(settled(&[2, 3, 4, 5]), [2, 3, 4, 5]);
        assert!(image.state.lock().unwrap().ahead.is_empty(), "the fetches ahead have ended");
        // A chunk fetched ahead is served from memory, with the right bytes; reading it in sequence fetches
        // 6 ahead (5 is cached), and 4 is not read again.
        assert_eq!(read(&s, 4), source.bytes[4 * CHUNK + 8192..4 * CHUNK + 8192 + 4096]);
        assert_eq!(settled(&[2, 3, 4, 5, 6]), [2, 3, 4, 5, 6]);
        s.verify().unwrap();
    }

    #[test]
    fn a_reader_in_sequence_fetches_every_chunk_once() {
        for ahead in [1, 2] {
            let (s, source) = store(4, Duration::from_millis(5));
            s.read_in_sequence(ahead);
            // Front to back in small reads, as the filler goes (a range of pages at a time), slowly enough
            // that the chunks fetched ahead arrive while the current one is still being read.
            let mut got = vec![0u8; 4 * CHUNK];
            let image = s.images.get(&1).unwrap();
            for (i, piece) in got.chunks_mut(CHUNK / 8).enumerate() {
                s.read_at(1, (i * CHUNK / 8) as u64, piece).unwrap();
                let held: Vec<usize> = image.state.lock().unwrap().cache.iter().map(|(n, _)| *n).collect();
                assert!(held.iter().all(|n| *n >= i / 8 && *n <= i / 8 + ahead), "chunks held in chunk {}: {held:?}", i / 8);
                std::thread::sleep(Duration::from_millis(25));
            }
            assert!(got == source.bytes, "the bytes read in sequence are the image's");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !image.state.lock().unwrap().ahead.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(chunks_read(&source), [0, 1, 2, 3], "every chunk fetched once ({ahead} ahead)");
            assert!(image.state.lock().unwrap().cache.len() <= 1 + ahead, "the chunk read and those ahead kept");
            s.verify().unwrap();
        }
    }

    #[test]
    fn a_damaged_chunk_is_refused_before_any_of_it_is_served() {
        let (s, _) = store_damaged(4, Duration::ZERO, Some(2 * CHUNK + 100_000), true);
        assert_eq!(read(&s, 1).len(), 4096, "a sound chunk is served");
        let mut buf = vec![0u8; 4096];
        // The page read lies in chunk 2, away from the damaged byte: refused all the same.
        let e = s.read_at(1, (2 * CHUNK + 8192) as u64, &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("checksum mismatch in pages-1.img (chunk 2"), "{e}");
        assert!(buf.iter().all(|&b| b == 0), "nothing of it was handed out");
        let mut seen = 0;
        let e = s.each_piece(1, (2 * CHUNK) as u64, 4096, &mut Vec::new(), &mut |_| {
            seen += 1;
            true
        });
        assert!(e.is_err() && seen == 0, "no piece of it is lent");
        assert!(s.verify().is_err());

        // A manifest of an earlier version lists no chunk hashes: the damage is found by the whole check.
        let (s, _) = store_damaged(4, Duration::ZERO, Some(2 * CHUNK + 100_000), false);
        read(&s, 2);
        let e = s.verify().unwrap_err().to_string();
        assert!(e.contains("checksum mismatch in pages-1.img"), "{e}");
    }

    #[test]
    fn a_prefetched_chunk_comes_on_a_thread_of_its_own_and_is_served_from_memory() {
        let (s, source) = store(4, Duration::from_millis(300));
        let started = Instant::now();
        s.prefetch(1, (3 * CHUNK + 5) as u64);
        s.prefetch(1, (3 * CHUNK + 9) as u64); // under way already: not fetched twice
        s.prefetch(9, 0); // no such image: nothing
        assert!(started.elapsed() < Duration::from_millis(200), "the hint does not wait: {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(400));
        let started = Instant::now();
        assert_eq!(read(&s, 3), source.bytes[3 * CHUNK + 8192..3 * CHUNK + 8192 + 4096]);
        assert!(started.elapsed() < Duration::from_millis(200), "served from memory: {:?}", started.elapsed());
        assert_eq!(chunks_read(&source), [3], "read once");
    }

    #[test]
    fn a_read_of_a_chunk_under_way_waits_for_it_instead_of_fetching_it_twice() {
        let (s, source) = store(4, Duration::from_millis(300));
        read(&s, 0);
        read(&s, 1); // in sequence: 2 and 3 start coming, each taking 300 ms
        let started = Instant::now();
        assert_eq!(read(&s, 2), source.bytes[2 * CHUNK + 8192..2 * CHUNK + 8192 + 4096]);
        assert!(started.elapsed() < Duration::from_millis(290), "chunk 2 was under way: {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(400));
        let reads = chunks_read(&source);
        assert_eq!(reads, [0, 1, 2, 3], "every chunk read once");
        s.verify().unwrap();
    }
}
