//! A page image stored as a run of independent units (one checksum chunk of 8 MiB each, see
//! [`super::Placed::units`]) read back on every core: workers fetch and decode units and hash each chunk
//! while the caller writes them in order, holding at most a few units at once. The image's digest is the
//! combination of the chunks' hashes, so it is checked with no pass of its own.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Condvar, Mutex};

use super::digest::{combine, xxh3_128, CHUNK};
use super::reader::corrupt;
use super::source::ArchiveSource;
use super::{CheckpointError, FileDigest};
use crate::codec::Compression;

/// A decoded unit by its index: its bytes and their hash.
type Decoded = (usize, Result<(Vec<u8>, u128), CheckpointError>);

/// Units decoded ahead of the one being written, per worker.
const AHEAD_PER_WORKER: usize = 2;

/// Where the units of one image are.
pub(crate) struct Units<'a> {
    pub source: &'a dyn ArchiveSource,
    pub compression: Compression,
    /// Where the first unit starts.
    pub base: u64,
    /// Each unit's compressed size.
    pub sizes: &'a [u64],
    pub expected: &'a FileDigest,
    pub location: &'a Path,
}

/// Where a page image's decoded units go: any writer (each unit written from its buffer), or one that takes
/// each unit's buffer whole (CRIU's pipe filled by `vmsplice`, which must hold the buffer until it was read).
pub trait UnitOut: Write {
    /// Write a decoded unit, whole.
    fn write_unit(&mut self, data: Vec<u8>) -> io::Result<()> {
        self.write_all(&data)
    }
}

/// A plain writer as a [`UnitOut`].
pub(crate) struct PlainOut<'a>(pub &'a mut dyn Write);

impl Write for PlainOut<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl UnitOut for PlainOut<'_> {}

/// What [`Units::copy_to`] did: the bytes delivered, and why writing to `out` stopped, if it did.
pub(crate) struct Copied {
    pub bytes: u64,
    pub out_error: Option<io::Error>,
}

struct Window {
    /// The next unit a worker takes.
    next: usize,
    /// Units written so far.
    written: usize,
    failed: bool,
}

impl Units<'_> {
    /// Decode every unit on `workers` threads and write them to `out` in order; an error once a unit does
    /// not decode to its chunk or the image does not match the manifest (every unit is read, even after
    /// `out` failed, for the verdict).
    pub(crate) fn copy_to(&self, out: &mut dyn UnitOut, workers: usize) -> Result<Copied, CheckpointError> {
        let total = self.expected.size;
        let chunks = total.div_ceil(CHUNK as u64).max(1) as usize;
        if self.sizes.len() != chunks {
            let detail = format!("{} has {} units for {chunks} chunks", self.expected.name, self.sizes.len());
            return Err(corrupt(self.location, detail));
        }
        let starts: Vec<u64> =
            self.sizes.iter().scan(self.base, |at, len| Some(std::mem::replace(at, at.saturating_add(*len)))).collect();
        let workers = workers.max(1);
        let window = Mutex::new(Window { next: 0, written: 0, failed: false });
        let turn = Condvar::new();
        let (tx, rx) = std::sync::mpsc::channel::<Decoded>();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (tx, window, turn, starts) = (tx.clone(), &window, &turn, &starts);
                scope.spawn(move || loop {
                    let i = {
                        let Ok(mut w) = window.lock() else { return };
                        while !w.failed && w.next < chunks && w.next >= w.written + workers * AHEAD_PER_WORKER {
                            w = match turn.wait(w) {
                                Ok(w) => w,
                                Err(_) => return,
                            };
                        }
                        if w.failed || w.next >= chunks {
                            return;
                        }
                        w.next += 1;
                        w.next - 1
                    };
                    let unit = self.decode(i, starts[i], total);
                    if tx.send((i, unit)).is_err() {
                        return;
                    }
                });
            }
            drop(tx);
            let result = self.write_in_order(&rx, chunks, out, &window, &turn);
            if result.is_err() {
                if let Ok(mut w) = window.lock() {
                    w.failed = true;
                }
                turn.notify_all();
            }
            result
        })
    }

    fn write_in_order(
        &self,
        rx: &std::sync::mpsc::Receiver<Decoded>,
        chunks: usize,
        out: &mut dyn UnitOut,
        window: &Mutex<Window>,
        turn: &Condvar,
    ) -> Result<Copied, CheckpointError> {
        let mut pending = BTreeMap::new();
        let mut hashes = Vec::with_capacity(chunks);
        let mut out_error = None;
        let mut bytes = 0u64;
        while hashes.len() < chunks {
            let Ok((i, unit)) = rx.recv() else {
                return Err(corrupt(self.location, format!("reading {} stopped early", self.expected.name)));
            };
            pending.insert(i, unit?);
            while let Some((data, hash)) = pending.remove(&hashes.len()) {
                bytes += data.len() as u64;
                if out_error.is_none() {
                    out_error = out.write_unit(data).err();
                }
                hashes.push(hash);
                if let Ok(mut w) = window.lock() {
                    w.written += 1;
                }
                turn.notify_all();
            }
        }
        if combine(self.expected.name.clone(), bytes, &hashes) != *self.expected {
            return Err(corrupt(self.location, format!("checksum mismatch in {}", self.expected.name)));
        }
        Ok(Copied { bytes, out_error })
    }

    /// Unit `i` (starting at `start`) decoded, checked to be its chunk's length, and that chunk's hash.
    fn decode(&self, i: usize, start: u64, total: u64) -> Result<(Vec<u8>, u128), CheckpointError> {
        let len = (total - i as u64 * CHUNK as u64).min(CHUNK as u64) as usize;
        let data = decode_unit(self.source, self.compression, start, self.sizes[i], len).map_err(|e| match e.kind() {
            _ if super::source::is_source_failure(&e) => CheckpointError::Source { path: self.location.to_path_buf(), source: e },
            io::ErrorKind::InvalidData => corrupt(self.location, format!("{}: unit {i} {e}", self.expected.name)),
            _ => CheckpointError::Io { path: self.location.to_path_buf(), source: e },
        })?;
        let hash = xxh3_128(&data);
        Ok((data, hash))
    }
}

/// The `size` bytes of a unit at `start` in `source`, decoded: they must decode to exactly `len` bytes (a
/// unit that does not is InvalidData, saying how it is damaged).
pub(crate) fn decode_unit(
    source: &dyn ArchiveSource,
    compression: Compression,
    start: u64,
    size: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    let damaged = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}; it is truncated or damaged"));
    // A manifest may claim any size: nothing larger than a unit can be is read, nor past the archive's end.
    if size > max_unit(len) || start.checked_add(size).is_none_or(|end| end > source.len()) {
        return Err(damaged(format!("is placed at {start} with {size} bytes, which the archive cannot hold")));
    }
    let mut packed = vec![0u8; size as usize];
    source.read_exact_at(start, &mut packed)?;
    let mut data = Vec::with_capacity(len);
    // One byte more than expected is enough to tell a unit that decodes to more (a bomb) from a good one.
    crate::codec::decoder(compression, io::Cursor::new(packed))
        .map_err(io::Error::other)?
        .take(len as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| damaged(format!("does not decode ({e})")))?;
    if data.len() != len {
        return Err(damaged(format!("holds {} bytes, not {len}", data.len())));
    }
    Ok(data)
}

/// The most bytes a unit holding `len` bytes compresses to in any of our formats (each stays within a small
/// fraction over its input when it cannot compress it).
pub(crate) fn max_unit(len: usize) -> u64 {
    len as u64 + len as u64 / 64 + (64 << 10)
}
