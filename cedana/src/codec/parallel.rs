//! Block-parallel compression on every core: the input is cut into blocks, each compressed on a worker into a
//! self-contained unit, and the units are written in order. For gzip a unit is a member (concatenated members
//! are one gzip stream, RFC 1952); for lz4 and zstd a frame (concatenated frames are one stream). Any reader
//! of the format reads the result back (ours: `MultiGzDecoder`, lz4_flex's `FrameDecoder`, zstd's decoder).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Encoder, UnitSizes};

const BLOCK: usize = super::UNIT_BLOCK;

type Job = (u64, Vec<u8>);

/// Blocks handed to the workers and not yet written, at most, beyond the workers' count: the input and output
/// buffers of about `threads + WINDOW_EXTRA` blocks is all the encoder holds, however slowly its output drains.
const WINDOW_EXTRA: u64 = 2;

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

/// Compresses one block into a self-contained unit of the format.
pub type CompressBlock = fn(&[u8]) -> io::Result<Vec<u8>>;

/// An encoder that compresses blocks in parallel.
pub struct ParallelBlocks<W: Write + Send + 'static> {
    buf: Vec<u8>,
    seq: u64,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<W>>>,
    name: &'static str,
    sizes: UnitSizes,
    written: Arc<Written>,
    window: u64,
}

impl<W: Write + Send + 'static> ParallelBlocks<W> {
    /// Compress into `out` with `compress` on `threads` workers; `name` names the threads and errors.
    pub fn new(out: W, name: &'static str, compress: CompressBlock, threads: usize) -> io::Result<Self> {
        let threads = threads.max(1);
        let (jobs, job_rx) = sync_channel::<Job>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<io::Result<Job>>();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, tx) = (Arc::clone(&job_rx), done_tx.clone());
            workers.push(std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || work(&rx, &tx, compress))?);
        }
        drop(done_tx);
        let sizes = UnitSizes::default();
        let written = Arc::new(Written::default());
        let (recorded, progress) = (sizes.clone(), Arc::clone(&written));
        let writer = std::thread::Builder::new().name(format!("{name}-out")).spawn(move || {
            let _ended = Ended(Arc::clone(&progress));
            write_in_order(out, done_rx, &recorded, &progress)
        })?;
        let window = threads as u64 + WINDOW_EXTRA;
        let buf = Vec::with_capacity(BLOCK);
        Ok(Self { buf, seq: 0, jobs: Some(jobs), workers, writer: Some(writer), name, sizes, written, window })
    }

    fn dispatch(&mut self) -> io::Result<()> {
        self.written.wait_for_room(self.seq, self.window);
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        let job = (self.seq, block);
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

fn work(jobs: &Mutex<Receiver<Job>>, done: &std::sync::mpsc::Sender<io::Result<Job>>, compress: CompressBlock) {
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, block)) = next else { return };
        if done.send(compress(&block).map(|out| (seq, out))).is_err() {
            return;
        }
    }
}

/// A gzip member at the codec's deflate level.
pub fn gzip_member(block: &[u8]) -> io::Result<Vec<u8>> {
    let level = flate2::Compression::new(super::DEFLATE_LEVEL);
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(block.len() / 2), level);
    enc.write_all(block)?;
    enc.finish()
}

/// A zstd frame at the codec's level, with its content checksum.
pub fn zstd_frame(block: &[u8]) -> io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(super::ZSTD_LEVEL)?;
    c.include_checksum(true)?;
    c.compress(block)
}

/// An lz4 frame (4 MiB blocks, content checksum).
pub fn lz4_frame(block: &[u8]) -> io::Result<Vec<u8>> {
    // No content checksum: every byte is covered by the manifest's checksums already, and lz4's own (XXH32
    // over the content) cost a pass at each end. Standard tools read frames without one as well.
    let info = lz4_flex::frame::FrameInfo::new().block_size(lz4_flex::frame::BlockSize::Max4MB).content_checksum(false);
    // Room for the worst case (incompressible data grows by under 1/255, plus headers): the buffer is never
    // regrown, so every block's allocations have the same sizes, which the allocator reuses instead of
    // leaving fragments in the worker threads' arenas (a 4 GiB dump's peak memory grew with the size).
    let bound = block.len() + block.len() / 255 + 1024;
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::with_capacity(bound));
    enc.write_all(block)?;
    enc.finish().map_err(io::Error::other)
}

fn write_in_order<W: Write>(mut out: W, done: Receiver<io::Result<Job>>, sizes: &UnitSizes, written: &Written) -> io::Result<W> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for result in done {
        let (seq, bytes) = result?;
        pending.insert(seq, bytes);
        while let Some(bytes) = pending.remove(&next) {
            out.write_all(&bytes)?;
            if let Ok(mut s) = sizes.lock() {
                s.push(bytes.len() as u64);
            }
            written.advance();
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
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BLOCK {
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
        if !self.buf.is_empty() || self.seq == 0 {
            self.dispatch()?;
        }
        tracing::trace!(blocks = self.seq, codec = self.name, "parallel encoder finished");
        self.stop()
    }

    fn unit_sizes(&self) -> Option<UnitSizes> {
        Some(self.sizes.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn compress(data: &[u8], name: &'static str, f: CompressBlock) -> Vec<u8> {
        let mut enc = Box::new(ParallelBlocks::new(Vec::new(), name, f, 3).unwrap());
        for piece in data.chunks(1 << 20) {
            enc.write_all(piece).unwrap();
        }
        Encoder::finish(enc).unwrap()
    }

    #[test]
    fn units_decode_as_one_stream_in_order() {
        let data: Vec<u8> = (0..(2 * BLOCK + 777)).map(|i| ((i / 3) % 251) as u8).collect();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&compress(&data, "gzip", gzip_member)[..]).read_to_end(&mut back).unwrap();
        assert!(back == data, "gzip members read back as {} bytes of {}", back.len(), data.len());
        let mut back = Vec::new();
        let lz4 = compress(&data, "lz4", lz4_frame);
        super::super::decoder(super::super::Compression::Lz4, io::Cursor::new(lz4)).unwrap().read_to_end(&mut back).unwrap();
        assert!(back == data, "lz4 frames read back as {} bytes of {}", back.len(), data.len());
    }

    #[test]
    fn empty_input_is_valid_in_both_formats() {
        let out = compress(&[], "gzip", gzip_member);
        assert_eq!(&out[..2], &[0x1F, 0x8B]);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
        let out = compress(&[], "lz4", lz4_frame);
        assert_eq!(&out[..4], &[0x04, 0x22, 0x4D, 0x18]);
        lz4_flex::frame::FrameDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }
}
