//! gzip on every core: the input is cut into blocks, each compressed on a worker into a complete gzip
//! member, and the members are written in order. Concatenated members are a valid gzip stream (RFC 1952),
//! read back by any gzip reader (ours uses `MultiGzDecoder`).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::Encoder;

const BLOCK: usize = 8 << 20;

type Job = (u64, Vec<u8>);

/// A gzip encoder that compresses blocks in parallel.
pub struct ParallelGzip<W: Write + Send + 'static> {
    buf: Vec<u8>,
    seq: u64,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<W>>>,
    level: u32,
}

impl<W: Write + Send + 'static> ParallelGzip<W> {
    /// Compress into `out` at `level` with `threads` workers.
    pub fn new(out: W, level: u32, threads: usize) -> io::Result<Self> {
        let threads = threads.max(1);
        let (jobs, job_rx) = sync_channel::<Job>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = channel::<io::Result<Job>>();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, tx) = (Arc::clone(&job_rx), done_tx.clone());
            workers.push(std::thread::Builder::new().name(format!("gzip-{i}")).spawn(move || work(&rx, &tx, level))?);
        }
        drop(done_tx);
        let writer = std::thread::Builder::new().name("gzip-out".into()).spawn(move || write_in_order(out, done_rx))?;
        Ok(Self { buf: Vec::with_capacity(BLOCK), seq: 0, jobs: Some(jobs), workers, writer: Some(writer), level })
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        let job = (self.seq, block);
        self.seq += 1;
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stop().err().unwrap_or_else(|| io::Error::other("the gzip workers stopped"))),
        }
    }

    fn stop(&mut self) -> io::Result<W> {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(res)) => res,
            Some(Err(_)) => Err(io::Error::other("the gzip writer thread panicked")),
            None => Err(io::Error::other("the gzip encoder was already finished")),
        }
    }
}

fn work(jobs: &Mutex<Receiver<Job>>, done: &std::sync::mpsc::Sender<io::Result<Job>>, level: u32) {
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, block)) = next else { return };
        if done.send(member(&block, level).map(|out| (seq, out))).is_err() {
            return;
        }
    }
}

fn member(block: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(block.len() / 2), flate2::Compression::new(level));
    enc.write_all(block)?;
    enc.finish()
}

fn write_in_order<W: Write>(mut out: W, done: Receiver<io::Result<Job>>) -> io::Result<W> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for result in done {
        let (seq, bytes) = result?;
        pending.insert(seq, bytes);
        while let Some(bytes) = pending.remove(&next) {
            out.write_all(&bytes)?;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("a gzip block went missing"));
    }
    out.flush()?;
    Ok(out)
}

impl<W: Write + Send + 'static> Write for ParallelGzip<W> {
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

impl<W: Write + Send + 'static> Encoder<W> for ParallelGzip<W> {
    fn finish(mut self: Box<Self>) -> io::Result<W> {
        // An empty stream still gets one (empty) member, so it is valid gzip.
        if !self.buf.is_empty() || self.seq == 0 {
            self.dispatch()?;
        }
        let level = self.level;
        tracing::trace!(blocks = self.seq, level, "gzip finished");
        self.stop()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn members_decode_as_one_stream_in_order() {
        let data: Vec<u8> = (0..(2 * BLOCK + 777)).map(|i| ((i / 3) % 251) as u8).collect();
        let mut enc = Box::new(ParallelGzip::new(Vec::new(), 1, 3).unwrap());
        for piece in data.chunks(1 << 20) {
            enc.write_all(piece).unwrap();
        }
        let out = Encoder::finish(enc).unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn empty_input_is_valid_gzip() {
        let out = Encoder::finish(Box::new(ParallelGzip::new(Vec::new(), 1, 2).unwrap())).unwrap();
        assert_eq!(&out[..2], &[0x1F, 0x8B]);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }
}
