//! A page image stored as a run of independent units (one checksum chunk of 8 MiB each, see
//! [`super::Placed::units`]) read back on every core: workers fetch and decode units and hash each chunk
//! while the caller writes them in order, holding at most a few units at once. The image's digest is the
//! combination of the chunks' hashes, so it is checked with no pass of its own.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use super::digest::{combine, xxh3_128, CHUNK};
use super::reader::corrupt;
use super::source::ArchiveSource;
use super::{CheckpointError, FileDigest};
use crate::codec::pool::{BufPool, Pooled};
use crate::codec::Compression;

/// A decoded unit by its index: its bytes and their hash.
type Decoded = (usize, Result<(Pooled, u128), CheckpointError>);

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
/// A unit's buffer goes back to its pool for the next unit when dropped.
pub trait UnitOut: Write {
    /// Write a decoded unit, whole.
    fn write_unit(&mut self, data: Pooled) -> io::Result<()> {
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
        // Decoded units go round: those decoded ahead, the one being written, and those the output still
        // holds (CRIU's pipe refers to up to two).
        let pool = BufPool::new(workers * AHEAD_PER_WORKER + 4);
        let window = Mutex::new(Window { next: 0, written: 0, failed: false });
        let turn = Condvar::new();
        let (tx, rx) = std::sync::mpsc::channel::<Decoded>();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (tx, window, turn, starts, pool) = (tx.clone(), &window, &turn, &starts, &pool);
                scope.spawn(move || {
                    let mut packed = Vec::new();
                    loop {
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
                        let unit = self.decode(i, starts[i], total, pool, &mut packed);
                        if tx.send((i, unit)).is_err() {
                            return;
                        }
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
        if !combine(self.expected.name.clone(), bytes, &hashes).same(self.expected) {
            return Err(corrupt(self.location, format!("checksum mismatch in {}", self.expected.name)));
        }
        Ok(Copied { bytes, out_error })
    }

    /// Unit `i` (starting at `start`) decoded into a buffer of `pool`, checked to be its chunk's length, and
    /// that chunk's hash. `packed` is the worker's buffer for the compressed bytes.
    fn decode(
        &self,
        i: usize,
        start: u64,
        total: u64,
        pool: &Arc<BufPool>,
        packed: &mut Vec<u8>,
    ) -> Result<(Pooled, u128), CheckpointError> {
        let len = (total - i as u64 * CHUNK as u64).min(CHUNK as u64) as usize;
        let mut data = pool.lend(pool.take_len(len));
        decode_unit_into(self.source, self.compression, start, self.sizes[i], &mut data, packed).map_err(|e| match e.kind() {
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
#[cfg(test)]
pub(crate) fn decode_unit(
    source: &dyn ArchiveSource,
    compression: Compression,
    start: u64,
    size: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    decode_unit_into(source, compression, start, size, &mut data, &mut Vec::new())?;
    Ok(data)
}

thread_local! {
    /// A decoding thread's zstd context, kept from unit to unit.
    static ZSTD: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Like [`decode_unit`], into `out` (which the unit must fill exactly), with `packed` as the buffer for the
/// compressed bytes (kept long between calls: nothing is zeroed again). zstd and lz4 units are decoded
/// straight into `out`, never past its end; other formats through their stream decoder.
pub(crate) fn decode_unit_into(
    source: &dyn ArchiveSource,
    compression: Compression,
    start: u64,
    size: u64,
    out: &mut [u8],
    packed: &mut Vec<u8>,
) -> io::Result<()> {
    let len = out.len();
    let damaged = |what: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}; it is truncated or damaged"));
    // A manifest may claim any size: nothing larger than a unit can be is read, nor past the archive's end.
    if size > max_unit(len) || start.checked_add(size).is_none_or(|end| end > source.len()) {
        return Err(damaged(format!("is placed at {start} with {size} bytes, which the archive cannot hold")));
    }
    let size = size as usize;
    if matches!(compression, Compression::Tar | Compression::None) {
        // Stored as it is.
        if size != len {
            return Err(damaged(format!("holds {size} bytes, not {len}")));
        }
        return source.read_exact_at(start, out);
    }
    if compression == Compression::Zstd {
        if let Some(result) = zstd_pieces_into(source, start, size as u64, out) {
            return result;
        }
    }
    if packed.len() < size {
        packed.resize(size, 0);
    }
    let packed = &mut packed[..size];
    source.read_exact_at(start, packed)?;
    let undecodable = |e: io::Error| damaged(format!("does not decode to its {len} bytes ({e})"));
    let direct = match compression {
        Compression::Zstd => Some(zstd_into(packed, out)),
        Compression::Lz4 => crate::codec::lz4_units::decode_into(packed, out),
        Compression::Zlib => Some(crate::codec::zlib_units::decode_into(packed, out)),
        Compression::Gzip => Some(crate::codec::zlib_units::gzip_member_into(packed, out)),
        _ => None,
    };
    if let Some(result) = direct {
        return result.map_err(undecodable);
    }
    let mut dec = crate::codec::decoder(compression, &packed[..]).map_err(io::Error::other)?;
    dec.read_exact(out).map_err(undecodable)?;
    // One byte more than expected is enough to tell a unit that decodes to more (a bomb) from a good one.
    match dec.read(&mut [0u8]) {
        Ok(0) => Ok(()),
        Ok(_) => Err(damaged(format!("decodes to more than its {len} bytes"))),
        Err(e) => Err(damaged(format!("does not decode ({e})"))),
    }
}

thread_local! {
    /// A decoding thread's zstd stream context for sources read in pieces (writing straight into the
    /// caller's buffer: no window of its own), kept from unit to unit.
    static ZSTD_STREAM: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// The zstd frames of the `size` bytes at `start` decoded into exactly `out` as the source hands them over
/// ([`ArchiveSource::read_in_pieces`]): no buffer for the compressed unit, and decoding goes on while the rest
/// of it is under way. `None` when the source does not read in pieces, or a frame declares a window no stream
/// context takes (the caller then reads the unit whole).
fn zstd_pieces_into(source: &dyn ArchiveSource, start: u64, size: u64, out: &mut [u8]) -> Option<io::Result<()>> {
    use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
    use zstd::zstd_safe::{get_error_name, is_error_kind, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};
    let len = out.len();
    // As the whole-unit path says it (the source's own failures pass as they are).
    let undecodable = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("does not decode to its {len} bytes ({what}); it is truncated or damaged"),
        )
    };
    let failed = |code: usize| undecodable(get_error_name(code));
    ZSTD_STREAM.with_borrow_mut(|ctx| {
        let dctx = match ctx {
            Some(d) => d,
            None => {
                let mut d = DCtx::try_create()?;
                // The whole unit's room is given at every call, so the context writes into it directly and
                // allocates no window, whatever size a frame declares: accept every size, as the whole-unit
                // decoder does (it too writes into the unit's buffer only).
                d.set_parameter(DParameter::StableOutBuffer(true)).ok()?;
                d.set_parameter(DParameter::WindowLogMax(31)).ok()?;
                ctx.insert(d)
            }
        };
        if let Err(code) = dctx.reset(ResetDirective::SessionOnly) {
            return Some(Err(failed(code)));
        }
        let (mut filled, mut frame_open, mut too_wide) = (0usize, false, false);
        let read = source.read_in_pieces(start, size, &mut |piece| {
            let mut input = InBuffer::around(piece);
            while input.pos() < piece.len() {
                let before = (input.pos(), filled);
                let mut output = OutBuffer::around_pos(&mut *out, filled);
                let hint = dctx.decompress_stream(&mut output, &mut input).map_err(|code| {
                    too_wide = is_error_kind(code, ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge);
                    failed(code)
                })?;
                filled = output.pos();
                frame_open = hint != 0;
                if (input.pos(), filled) == before {
                    // Nothing taken and nothing given: the room is full and the frame wants more.
                    return Err(undecodable("it decodes to more"));
                }
            }
            Ok(())
        })?;
        if too_wide {
            // A frame declaring a window over 2 GiB, which a stream context refuses even when it writes into
            // the caller's buffer: such a unit (none of ours) is read whole instead, for the same verdict.
            return None;
        }
        Some(read.and_then(|()| match (frame_open, filled == len) {
            (true, _) => Err(undecodable("its last frame is cut short")),
            (false, false) => Err(undecodable(&format!("it holds {filled}"))),
            (false, true) => Ok(()),
        }))
    })
}

/// zstd frames decoded into exactly `out`.
fn zstd_into(packed: &[u8], out: &mut [u8]) -> io::Result<()> {
    let n = ZSTD.with_borrow_mut(|ctx| {
        let d = match ctx {
            Some(d) => d,
            None => ctx.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress_to_buffer(packed, out)
    })?;
    if n != out.len() {
        return Err(io::Error::other(format!("it holds {n}")));
    }
    Ok(())
}

/// The most bytes a unit holding `len` bytes may take in any of our formats: ours stay within a small
/// fraction over their input when they cannot compress it, but gzip members of earlier versions were deflated
/// whole at the fastest level, which codes random bytes as fixed-code literals (up to 9 bits for 8).
pub(crate) fn max_unit(len: usize) -> u64 {
    len as u64 + len as u64 / 8 + (64 << 10)
}

#[cfg(test)]
#[path = "units_read_tests.rs"]
mod tests;
