//! Two-stage pipelines, so that a codec on one core overlaps reading, hashing and writing on another.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::Encoder;

const BLOCK: usize = 4 << 20;
const DEPTH: usize = 4;

/// Reads `inner` on a thread of its own, up to [`DEPTH`] blocks ahead of the consumer.
pub struct ReadAhead {
    blocks: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ReadAhead {
    pub fn new<R: Read + Send + 'static>(mut inner: R) -> io::Result<Self> {
        let (tx, blocks) = sync_channel(DEPTH);
        std::thread::Builder::new().name("read-ahead".into()).spawn(move || loop {
            let mut buf = vec![0u8; BLOCK];
            let mut filled = 0;
            let res = loop {
                match inner.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == BLOCK {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(filled);
            let last = filled == 0 || res.is_err();
            let msg = match res {
                Ok(()) => Ok(buf),
                Err(e) => Err(e),
            };
            if tx.send(msg).is_err() || last {
                return;
            }
        })?;
        Ok(Self { blocks, current: Vec::new(), pos: 0, done: false })
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.blocks.recv() {
                Ok(Ok(block)) if block.is_empty() => self.done = true,
                Ok(Ok(block)) => {
                    self.current = block;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => self.done = true,
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Hands written blocks to a thread that feeds `inner` (the encoder), so compression overlaps the
/// producer's own work.
pub struct WriteBehind<W: Write + Send + 'static> {
    tx: Option<SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    worker: Option<JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> WriteBehind<W> {
    pub fn new(inner: Box<dyn Encoder<W>>) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(DEPTH);
        let worker = std::thread::Builder::new().name("write-behind".into()).spawn(move || {
            let mut inner = inner;
            for block in rx {
                inner.write_all(&block)?;
            }
            inner.finish()
        })?;
        Ok(Self { tx: Some(tx), buf: Vec::with_capacity(BLOCK), worker: Some(worker) })
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let block = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
        let sent = self.tx.as_ref().map(|tx| tx.send(block).is_ok()).unwrap_or(false);
        if sent {
            Ok(())
        } else {
            // The worker stopped: its error is the one to report.
            Err(self.join().err().unwrap_or_else(|| io::Error::other("the compression thread stopped")))
        }
    }

    fn join(&mut self) -> io::Result<W> {
        self.tx = None;
        match self.worker.take().map(JoinHandle::join) {
            Some(Ok(res)) => res,
            Some(Err(_)) => Err(io::Error::other("the compression thread panicked")),
            None => Err(io::Error::other("the compression thread already finished")),
        }
    }
}

impl<W: Write + Send + 'static> Write for WriteBehind<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BLOCK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl<W: Write + Send + 'static> Encoder<W> for WriteBehind<W> {
    fn finish(mut self: Box<Self>) -> io::Result<W> {
        self.send()?;
        self.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decoder, encoder, Compression};

    #[test]
    fn pipelines_round_trip() {
        let data: Vec<u8> = (0..(3 * BLOCK + 12345)).map(|i| (i * 31 % 251) as u8).collect();
        // A bare codec behind the pipeline (`encoder` already puts zlib behind one).
        let zlib: Box<dyn Encoder<Vec<u8>>> = Box::new(flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut w = Box::new(WriteBehind::new(zlib).unwrap());
        for piece in data.chunks(100_000) {
            w.write_all(piece).unwrap();
        }
        let out = Encoder::finish(w).unwrap();
        let mut r = ReadAhead::new(decoder(Compression::Zlib, io::Cursor::new(out)).unwrap()).unwrap();
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn read_errors_reach_the_consumer() {
        let mut out = encoder(Compression::Zstd, Vec::new()).unwrap();
        out.write_all(&[7u8; 100_000]).unwrap();
        let mut bytes = out.finish().unwrap();
        bytes.truncate(bytes.len() / 2);
        let mut r = ReadAhead::new(decoder(Compression::Zstd, io::Cursor::new(bytes)).unwrap()).unwrap();
        let mut back = Vec::new();
        assert!(r.read_to_end(&mut back).is_err());
    }
}
