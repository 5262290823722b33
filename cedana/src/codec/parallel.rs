//! Block-parallel compression on every core: the input is cut into blocks, each compressed on a worker into a
//! self-contained unit, and the units are written in order. For gzip a unit is a member (concatenated members
//! are one gzip stream, RFC 1952); for lz4 and zstd a frame (concatenated frames are one stream). Any reader
//! of the format reads the result back (ours: `MultiGzDecoder`, lz4_flex's `FrameDecoder`, zstd's decoder).
//! For zlib a unit is a piece of raw deflate ending byte-aligned (see [`super::zlib_units`]): the archive
//! around the units supplies the stream's header and closing, with the adler32 each unit's check adds up to.
//! Input blocks and output units live in buffers that go round (see [`super::pool`]), and each worker keeps
//! its codec's context from block to block.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::pool::BufPool;
use super::{Encoder, UnitChecks, UnitHashes, UnitSizes};

const BLOCK: usize = super::UNIT_BLOCK;

/// A block (or unit) by its sequence number: its buffer and how many bytes of it count.
type Job = (u64, Vec<u8>, usize);
/// A unit made, the hash of its block's content (when asked for) and the format's check over it, with the
/// block's length (for formats with one).
type Done = (Job, Option<u128>, Option<(u32, u64)>);

/// How many workers the encoder runs and how many blocks it hands out ahead of its output: the input and
/// output buffers of that many blocks (plus the one being filled) is all it holds, however slowly its output
/// drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// A worker per core and one spare block, so that no worker waits while a finished unit is written (an
    /// output as fast as the codec: a local file).
    Full,
    /// For an output slower than the codec (an upload, whose requests need a core of their own): a worker
    /// fewer (at least one) and no spare block, which would only wait, holding memory. On two cores: one
    /// worker, 32 MiB less.
    Lean,
}

impl Window {
    /// The workers to run on `cores`.
    fn workers(self, cores: usize) -> usize {
        match self {
            Window::Full => cores.max(1),
            Window::Lean => cores.saturating_sub(1).max(1),
        }
    }

    /// The blocks handed out ahead of the output, for `workers` workers.
    fn blocks(self, workers: usize) -> u64 {
        match self {
            Window::Full => workers as u64 + 1,
            Window::Lean => workers as u64,
        }
    }
}

/// How far the writer thread got: blocks written, and whether it has ended (then nobody waits for it).
#[derive(Default)]
struct Written {
    state: Mutex<(u64, bool)>,
    moved: std::sync::Condvar,
}

impl Written {
    fn advance(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.0 += 1;
        }
        self.moved.notify_all();
    }

    /// Wait until block `seq` may be handed out: fewer than `window` blocks ahead of the writer.
    fn wait_for_room(&self, seq: u64, window: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        while !s.1 && seq >= s.0 + window {
            s = match self.moved.wait(s) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    }
}

/// Marks the writer ended when its thread returns, however it returns.
struct Ended(Arc<Written>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.1 = true;
        }
        self.0.moved.notify_all();
    }
}

/// Compresses one block into a self-contained unit of the format at the start of `out` (a reused buffer:
/// whatever it held is overwritten, and it may stay longer than the unit); the unit's length.
pub type CompressBlock = fn(&[u8], &mut Vec<u8>) -> io::Result<usize>;

/// A format of units the parallel encoder writes.
#[derive(Clone, Copy)]
pub struct Format {
    /// Names the threads and errors.
    pub name: &'static str,
    pub compress: CompressBlock,
    /// The check the format keeps over its content (zlib's adler32), computed per block by the workers
    /// (see [`Encoder::unit_checks`]).
    pub check: Option<fn(&[u8]) -> u32>,
}

/// gzip members.
pub const GZIP: Format = Format { name: "gzip", compress: gzip_member, check: None };
/// lz4 frames.
pub const LZ4: Format = Format { name: "lz4", compress: lz4_frame, check: None };
/// zstd frames.
pub const ZSTD: Format = Format { name: "zstd", compress: zstd_frame, check: None };
/// Raw deflate units of one zlib stream.
pub const ZLIB: Format =
    Format { name: "zlib", compress: super::zlib_units::compress_unit, check: Some(super::zlib_units::adler32) };

/// An encoder that compresses blocks in parallel.
pub struct ParallelBlocks<W: Write + Send + 'static> {
    /// The block being filled (always [`BLOCK`] bytes long; `filled` of them hold input).
    buf: Vec<u8>,
    filled: usize,
    blocks: Arc<BufPool>,
    seq: u64,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<W>>>,
    name: &'static str,
    sizes: UnitSizes,
    hashes: Option<UnitHashes>,
    checks: Option<UnitChecks>,
    written: Arc<Written>,
    window: u64,
}

impl<W: Write + Send + 'static> ParallelBlocks<W> {
    /// Compress into `out` in `format` on `threads` cores, as `window` says. With `hash`, the workers also
    /// hash each block (XXH3-128, see [`Encoder::unit_hashes`]).
    pub fn new(out: W, format: Format, threads: usize, window: Window, hash: bool) -> io::Result<Self> {
        let name = format.name;
        let threads = window.workers(threads);
        let (jobs, job_rx) = sync_channel::<Job>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<io::Result<Done>>();
        let window = window.blocks(threads);
        // Every buffer in flight can come back to its pool.
        let (blocks, units) = (BufPool::new(2 * window as usize), BufPool::new(2 * window as usize));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, tx) = (Arc::clone(&job_rx), done_tx.clone());
            let pools = (Arc::clone(&blocks), Arc::clone(&units));
            workers.push(
                std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || work(&rx, &tx, format, hash, &pools))?,
            );
        }
        drop(done_tx);
        let sizes = UnitSizes::default();
        let written = Arc::new(Written::default());
        let hashes = hash.then(UnitHashes::default);
        let checks = format.check.map(|_| UnitChecks::default());
        let record =
            Record { sizes: sizes.clone(), hashes: hashes.clone(), checks: checks.clone(), written: Arc::clone(&written) };
        let writer = std::thread::Builder::new().name(format!("{name}-out")).spawn(move || {
            let _ended = Ended(Arc::clone(&record.written));
            write_in_order(out, done_rx, &record, &units)
        })?;
        let buf = blocks.take_len(BLOCK);
        let jobs = Some(jobs);
        Ok(Self {
            buf,
            filled: 0,
            blocks,
            seq: 0,
            jobs,
            workers,
            writer: Some(writer),
            name,
            sizes,
            hashes,
            checks,
            written,
            window,
        })
    }

    fn dispatch(&mut self) -> io::Result<()> {
        self.written.wait_for_room(self.seq, self.window);
        let block = std::mem::replace(&mut self.buf, self.blocks.take_len(BLOCK));
        let job = (self.seq, block, std::mem::take(&mut self.filled));
        self.seq += 1;
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stop().err().unwrap_or_else(|| io::Error::other(format!("the {} workers stopped", self.name)))),
        }
    }

    fn stop(&mut self) -> io::Result<W> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(res)) => res,
            Some(Err(_)) => Err(io::Error::other(format!("the {} writer thread panicked", self.name))),
            None => Err(io::Error::other(format!("the {} encoder was already finished", self.name))),
        }
    }
}

fn work(
    jobs: &Mutex<Receiver<Job>>,
    done: &std::sync::mpsc::Sender<io::Result<Done>>,
    format: Format,
    hash: bool,
    (blocks, units): &(Arc<BufPool>, Arc<BufPool>),
) {
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, block, filled)) = next else { return };
        let mut unit = units.take();
        let content = &block[..filled];
        let hash = hash.then(|| crate::checkpoint::digest::xxh3_128(content));
        let check = format.check.map(|f| (f(content), filled as u64));
        let result = (format.compress)(content, &mut unit).map(|used| ((seq, unit, used), hash, check));
        blocks.give(block);
        if done.send(result).is_err() {
            return;
        }
    }
}

/// A gzip member at the codec's deflate level: its header, the block as raw deflate in pieces (see
/// [`super::zlib_units::deflate_pieces`]: incompressible pieces stored at once), an empty final block, and
/// the CRC-32 and length of the block.
pub fn gzip_member(block: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
    // Magic, deflate, no flags, no time, "fastest" (XFL 4), unknown OS.
    const HEADER: [u8; 10] = [0x1F, 0x8B, 0x08, 0x00, 0, 0, 0, 0, 0x04, 0xFF];
    if out.len() < HEADER.len() {
        out.resize(HEADER.len(), 0);
    }
    out[..HEADER.len()].copy_from_slice(&HEADER);
    let end = super::zlib_units::deflate_pieces(block, out, HEADER.len())?;
    let mut crc = flate2::Crc::new();
    crc.update(block);
    // The buffer goes round: written in place, never shortened (see `super::pool`).
    if out.len() < end + 13 {
        out.resize(end + 13, 0);
    }
    // An empty final block closes the deflate stream.
    super::zlib_units::put_stored(&[], true, &mut out[end..end + 5]);
    out[end + 5..end + 9].copy_from_slice(&crc.sum().to_le_bytes());
    out[end + 9..end + 13].copy_from_slice(&(block.len() as u32).to_le_bytes());
    Ok(end + 13)
}

thread_local! {
    /// A worker's zstd context, kept from block to block (a new one costs megabytes of fresh memory).
    static ZSTD_CONTEXT: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    /// A worker's lz4 match table.
    static LZ4_TABLE: RefCell<Option<lz4_flex::block::CompressTable>> = const { RefCell::new(None) };
}

/// A zstd frame at the codec's level, with its content checksum.
pub fn zstd_frame(block: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
    ZSTD_CONTEXT.with_borrow_mut(|ctx| {
        let c = match ctx {
            Some(c) => c,
            None => {
                let mut c = zstd::bulk::Compressor::new(super::ZSTD_LEVEL)?;
                c.include_checksum(true)?;
                ctx.insert(c)
            }
        };
        // zstd writes into the spare room from the start: nothing is zeroed first.
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(block.len()));
        c.compress_to_buffer(block, out)
    })
}

/// An lz4 frame of 4 MiB independent blocks, without a content checksum (every byte is covered by the
/// manifest's checksums already; standard tools read frames without one as well).
pub fn lz4_frame(block: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
    LZ4_TABLE.with_borrow_mut(|table| {
        super::lz4_units::encode(block, out, table.get_or_insert_with(lz4_flex::block::CompressTable::large))
    })
}

/// What the writer thread records of every unit written.
struct Record {
    sizes: UnitSizes,
    hashes: Option<UnitHashes>,
    checks: Option<UnitChecks>,
    written: Arc<Written>,
}

fn write_in_order<W: Write>(mut out: W, done: Receiver<io::Result<Done>>, record: &Record, units: &BufPool) -> io::Result<W> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for result in done {
        let ((seq, bytes, used), hash, check) = result?;
        pending.insert(seq, (bytes, used, hash, check));
        while let Some((bytes, used, hash, check)) = pending.remove(&next) {
            out.write_all(&bytes[..used])?;
            units.give(bytes);
            if let Ok(mut s) = record.sizes.lock() {
                s.push(used as u64);
            }
            if let (Some(hashes), Some(hash)) = (&record.hashes, hash) {
                if let Ok(mut h) = hashes.lock() {
                    h.push(hash);
                }
            }
            if let (Some(checks), Some(check)) = (&record.checks, check) {
                if let Ok(mut c) = checks.lock() {
                    c.push(check);
                }
            }
            record.written.advance();
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("a compressed block went missing"));
    }
    out.flush()?;
    Ok(out)
}

impl<W: Write + Send + 'static> Write for ParallelBlocks<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.filled);
        self.buf[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        if self.filled == BLOCK {
            self.dispatch()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Encoder<W> for ParallelBlocks<W> {
    fn finish(mut self: Box<Self>) -> io::Result<W> {
        // An empty stream still gets one (empty) unit, so it is valid in its format.
        if self.filled > 0 || self.seq == 0 {
            self.dispatch()?;
        }
        tracing::trace!(blocks = self.seq, codec = self.name, "parallel encoder finished");
        self.stop()
    }

    fn unit_sizes(&self) -> Option<UnitSizes> {
        Some(self.sizes.clone())
    }

    fn unit_hashes(&self) -> Option<UnitHashes> {
        self.hashes.clone()
    }

    fn unit_checks(&self) -> Option<UnitChecks> {
        self.checks.clone()
    }

    /// Reads straight into the block being filled (no copy through a buffer of the caller's).
    fn copy_from(&mut self, r: &mut dyn Read) -> io::Result<u64> {
        let mut total = 0;
        loop {
            let n = match r.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.filled += n;
            total += n as u64;
            if self.filled == BLOCK {
                self.dispatch()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn compress(data: &[u8], format: Format) -> Vec<u8> {
        let mut enc = Box::new(ParallelBlocks::new(Vec::new(), format, 3, Window::Full, false).unwrap());
        for piece in data.chunks(1 << 20) {
            enc.write_all(piece).unwrap();
        }
        Encoder::finish(enc).unwrap()
    }

    /// An output that takes nothing until the gate opens.
    struct Gated(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Zeros, as many as its second field says, adding what was read to its first.
    struct Counted(Arc<std::sync::atomic::AtomicU64>, u64);

    impl Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1 as usize);
            buf[..n].fill(0);
            self.1 -= n as u64;
            self.0.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            Ok(n)
        }
    }

    /// How many bytes the encoder reads ahead of an output that takes nothing.
    fn read_ahead_of_a_stuck_output(window: Window) -> u64 {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut enc = Box::new(ParallelBlocks::new(Gated(Arc::clone(&gate)), ZSTD, 2, window, false).unwrap());
        let mut input = Counted(Arc::clone(&read), 12 * BLOCK as u64);
        let copy = std::thread::spawn(move || enc.copy_from(&mut input).map(|n| (n, enc)));
        let mut last = u64::MAX;
        while read.load(std::sync::atomic::Ordering::SeqCst) != last {
            last = read.load(std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let (n, enc) = copy.join().unwrap().unwrap();
        assert_eq!(n, 12 * BLOCK as u64);
        Encoder::finish(enc).unwrap();
        last
    }

    #[test]
    fn a_lean_window_reads_less_ahead_of_a_slow_output() {
        let (full, lean) = (read_ahead_of_a_stuck_output(Window::Full), read_ahead_of_a_stuck_output(Window::Lean));
        // Two cores: full, two workers' blocks, a spare one and the one filling; lean, one worker's block and
        // the one filling.
        assert_eq!((full, lean), (4 * BLOCK as u64, 2 * BLOCK as u64));
    }

    #[test]
    fn copy_from_a_reader_makes_the_same_units_as_writes() {
        let data: Vec<u8> = (0..(3 * BLOCK + 4321)).map(|i| ((i / 7) % 253) as u8).collect();
        for format in [LZ4, ZSTD, GZIP, ZLIB] {
            let name = format.name;
            let mut enc = Box::new(ParallelBlocks::new(Vec::new(), format, 2, Window::Full, true).unwrap());
            let sizes = enc.unit_sizes().unwrap();
            let hashes = enc.unit_hashes().unwrap();
            let checks = enc.unit_checks();
            // A reader handing out odd-sized pieces, as a pipe does.
            let mut reader = io::Read::chain(&data[..5000], &data[5000..]);
            assert_eq!(enc.copy_from(&mut reader).unwrap(), data.len() as u64);
            let out = Encoder::finish(enc).unwrap();
            assert!(out == compress(&data, format), "{name}");
            assert_eq!(sizes.lock().unwrap().len(), 4, "{name}: one unit per block");
            // The blocks' hashes make the digest a hasher makes of the whole.
            let mut hasher = crate::checkpoint::digest::Hasher::new();
            hasher.update(&data);
            let combined = crate::checkpoint::digest::combine("x".into(), data.len() as u64, &hashes.lock().unwrap());
            assert_eq!(combined, hasher.finish("x"), "{name}");
            // zlib's units carry the adler32 of their blocks, which add up to that of the whole.
            assert_eq!(checks.is_some(), name == "zlib");
            if let Some(checks) = checks {
                let mut adler = super::super::zlib_units::Adler::default();
                adler.append_units(&checks);
                assert_eq!(adler.value(), super::super::zlib_units::adler32(&data));
            }
        }
    }

    #[test]
    fn units_decode_as_one_stream_in_order() {
        let data: Vec<u8> = (0..(2 * BLOCK + 777)).map(|i| ((i / 3) % 251) as u8).collect();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&compress(&data, GZIP)[..]).read_to_end(&mut back).unwrap();
        assert!(back == data, "gzip members read back as {} bytes of {}", back.len(), data.len());
        let mut back = Vec::new();
        let lz4 = compress(&data, LZ4);
        super::super::decoder(super::super::Compression::Lz4, io::Cursor::new(lz4)).unwrap().read_to_end(&mut back).unwrap();
        assert!(back == data, "lz4 frames read back as {} bytes of {}", back.len(), data.len());
        // zlib's units, between the stream's header and a closing with the adler32 of the whole.
        use super::super::zlib_units as z;
        let mut stream = z::HEADER.to_vec();
        stream.extend(compress(&data, ZLIB));
        stream.extend(z::closing(&[], {
            let mut a = z::Adler::default();
            a.update(&data);
            a
        }));
        let mut back = Vec::new();
        flate2::read::ZlibDecoder::new(&stream[..]).read_to_end(&mut back).unwrap();
        assert!(back == data, "zlib units read back as {} bytes of {}", back.len(), data.len());
    }

    #[test]
    fn empty_input_is_valid_in_both_formats() {
        let out = compress(&[], GZIP);
        assert_eq!(&out[..2], &[0x1F, 0x8B]);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
        let out = compress(&[], LZ4);
        assert_eq!(&out[..4], &[0x04, 0x22, 0x4D, 0x18]);
        lz4_flex::frame::FrameDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }
}
