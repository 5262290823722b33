//! Compression of checkpoint archives: `none | tar | gzip | lz4 | zlib | zstd`.
//!
//! Every compressed format wraps a tar stream. The format of an existing checkpoint is always detected from
//! its content (magic bytes), never from its file name.

pub(crate) mod lz4_units;
pub mod parallel;
pub mod pipeline;
pub mod pool;
pub mod units;
pub mod zlib_units;

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

pub use parallel::Window;

/// Errors of the codec layer.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown compression {0:?}: use one of none, tar, gzip, lz4, zlib, zstd")]
    Unknown(String),
    #[error("{path}: not a checkpoint archive (no tar, gzip, lz4, zlib or zstd signature found)")]
    Unrecognized { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("setting up the {codec} codec: {source}")]
    Setup {
        codec: Compression,
        #[source]
        source: io::Error,
    },
}

impl CodecError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            CodecError::Unknown(_) => K::InvalidArgument,
            CodecError::Unrecognized { .. } => K::FailedPrecondition,
            CodecError::Io { source, .. } => K::of_io(source),
            CodecError::Setup { .. } => K::Internal,
        }
    }
}

/// How a checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A plain folder of CRIU images plus our manifest.
    None,
    /// One uncompressed tar file.
    Tar,
    Gzip,
    Lz4,
    Zlib,
    Zstd,
}

/// Every supported value, in the order the CLI lists them.
pub const ALL: [Compression; 6] =
    [Compression::None, Compression::Tar, Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd];

impl Compression {
    /// The name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Tar => "tar",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }

    /// File name suffix of a checkpoint in this format (`None` for a folder).
    pub fn extension(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Tar => Some("tar"),
            Compression::Gzip => Some("tar.gz"),
            Compression::Lz4 => Some("tar.lz4"),
            Compression::Zlib => Some("tar.zlib"),
            Compression::Zstd => Some("tar.zst"),
        }
    }

    /// Whether the checkpoint is a single archive file (everything but `none`).
    pub fn is_archive(self) -> bool {
        self != Compression::None
    }

    /// Detect the format from the first bytes of a file (at least 512 bytes read, when the file has them).
    pub fn detect_bytes(head: &[u8]) -> Option<Compression> {
        if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
            return Some(Compression::Zstd);
        }
        if head.starts_with(&[0x1F, 0x8B]) {
            return Some(Compression::Gzip);
        }
        if head.starts_with(&[0x04, 0x22, 0x4D, 0x18]) {
            return Some(Compression::Lz4);
        }
        if head.len() >= 2 {
            let (cmf, flg) = (head[0], head[1]);
            let deflate_with_small_window = cmf & 0x0F == 8 && cmf >> 4 <= 7;
            if deflate_with_small_window && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0 {
                return Some(Compression::Zlib);
            }
        }
        if head.len() >= 262 && &head[257..262] == b"ustar" {
            return Some(Compression::Tar);
        }
        None
    }

    /// Detect the format of a checkpoint at `path`: a folder is `none`, a file is detected by content.
    pub fn detect_path(path: &Path) -> Result<Compression, CodecError> {
        let io_err = |source| CodecError::Io { path: path.display().to_string(), source };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.is_dir() {
            return Ok(Compression::None);
        }
        let mut file = std::fs::File::open(path).map_err(io_err)?;
        let mut head = Vec::with_capacity(512);
        (&mut file).take(512).read_to_end(&mut head).map_err(io_err)?;
        Compression::detect_bytes(&head).ok_or_else(|| CodecError::Unrecognized { path: path.display().to_string() })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.iter().copied().find(|c| c.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| CodecError::Unknown(s.to_string()))
    }
}

/// A compressing writer that must be finished to flush its trailer; `finish` hands back the inner writer.
pub trait Encoder<W: Write>: Write + Send {
    /// Flush all buffered data and the format's trailer, and return the inner writer.
    fn finish(self: Box<Self>) -> io::Result<W>;

    /// For encoders that write self-contained units of [`UNIT_BLOCK`] input bytes each (the last one
    /// shorter): the compressed size of every unit written so far, filled in as they are written. `None`
    /// for the others.
    fn unit_sizes(&self) -> Option<UnitSizes> {
        None
    }

    /// For the encoders of [`unit_encoder`]: the XXH3-128 of every unit's input, filled in as they are
    /// written (hashed by the workers beside the compression, as the checksum's chunks: see
    /// [`crate::checkpoint::digest`]). `None` for the others.
    fn unit_hashes(&self) -> Option<UnitHashes> {
        None
    }

    /// For the encoders of formats that keep a check over their whole content (zlib's adler32), written
    /// as units: each unit's check and input length, filled in as they are written, for the archive that
    /// closes the stream to combine. `None` for the others.
    fn unit_checks(&self) -> Option<UnitChecks> {
        None
    }

    /// Read `r` to its end and encode all of it; the bytes read. Encoders that can read straight into their
    /// own buffers do.
    fn copy_from(&mut self, r: &mut dyn Read) -> io::Result<u64> {
        copy_in_pieces(r, &mut |piece| self.write_all(piece))
    }
}

/// Read `r` to its end through a 1 MiB buffer (std's 8 KiB one costs a lot of syscalls on gigabytes of
/// pages), handing each piece read to `take`; the bytes read.
pub(crate) fn copy_in_pieces(r: &mut dyn Read, take: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        take(&buf[..n])?;
        total += n as u64;
    }
}

/// The compressed sizes of an encoder's units, in order (see [`Encoder::unit_sizes`]).
pub type UnitSizes = std::sync::Arc<std::sync::Mutex<Vec<u64>>>;

/// The XXH3-128 hashes of the input of an encoder's units, in order (see [`Encoder::unit_hashes`]).
pub type UnitHashes = std::sync::Arc<std::sync::Mutex<Vec<u128>>>;

/// The format's check and the input length of an encoder's units, in order (see [`Encoder::unit_checks`]).
pub type UnitChecks = std::sync::Arc<std::sync::Mutex<Vec<(u32, u64)>>>;

/// The input bytes of one unit of a block-parallel encoder: the same as the checksum's chunk, so that a unit
/// decodes to exactly one chunk of the entry and can be verified on its own.
pub const UNIT_BLOCK: usize = crate::checkpoint::digest::CHUNK;

struct Plain<W>(W);

impl<W: Write + Send> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl<W: Write + Send> Encoder<W> for Plain<W> {
    fn finish(mut self: Box<Self>) -> io::Result<W> {
        self.0.flush()?;
        Ok(self.0)
    }
}

impl<W: Write + Send> Encoder<W> for flate2::write::ZlibEncoder<W> {
    fn finish(self: Box<Self>) -> io::Result<W> {
        flate2::write::ZlibEncoder::finish(*self)
    }
}
impl<W: Write + Send> Encoder<W> for zstd::stream::write::Encoder<'static, W> {
    fn finish(self: Box<Self>) -> io::Result<W> {
        zstd::stream::write::Encoder::finish(*self)
    }
}

/// Compression levels: chosen for speed, since a checkpoint sits on the critical path of a migration.
const ZSTD_LEVEL: i32 = 1;
const DEFLATE_LEVEL: u32 = 1;

/// Wrap `w` in the encoder of `c` (`none` and `tar` pass bytes through). The encoder works off the caller's
/// thread: zstd, gzip and lz4 compress on all cores, and the others (and zstd's input side) run behind a
/// [`pipeline::WriteBehind`] thread, so the caller (tar, hashing, file reads) overlaps the codec.
pub fn encoder<W: Write + Send + 'static>(c: Compression, w: W) -> Result<Box<dyn Encoder<W>>, CodecError> {
    let setup = |source| CodecError::Setup { codec: c, source };
    let threads = worker_threads() as usize;
    let behind = |enc: Box<dyn Encoder<W>>| -> Result<Box<dyn Encoder<W>>, CodecError> {
        Ok(Box::new(pipeline::WriteBehind::new(enc).map_err(setup)?))
    };
    match c {
        Compression::None | Compression::Tar => behind(Box::new(Plain(w))),
        Compression::Gzip => {
            Ok(Box::new(parallel::ParallelBlocks::new(w, parallel::GZIP, threads, Window::Full, false).map_err(setup)?))
        }
        Compression::Lz4 => {
            Ok(Box::new(parallel::ParallelBlocks::new(w, parallel::LZ4, threads, Window::Full, false).map_err(setup)?))
        }
        Compression::Zlib => behind(Box::new(flate2::write::ZlibEncoder::new(w, flate2::Compression::new(DEFLATE_LEVEL)))),
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL).map_err(setup)?;
            enc.include_checksum(true).map_err(setup)?;
            enc.multithread(worker_threads()).map_err(setup)?;
            behind(Box::new(enc))
        }
    }
}

/// Like [`encoder`], but every format with units writes self-contained units of [`UNIT_BLOCK`] input bytes
/// each and reports their sizes ([`Encoder::unit_sizes`]) and their input's hashes ([`Encoder::unit_hashes`]):
/// zstd too, as independent frames (one stream of frames to any zstd decoder), and zlib as raw deflate
/// units with their adler32 ([`Encoder::unit_checks`]), inside a zlib stream the archive opens and closes
/// (see [`zlib_units`]). For entries read piece by piece later (page images). `window`: how far the codec
/// may run ahead of `w` (lean for outputs slower than the codec).
pub fn unit_encoder<W: Write + Send + 'static>(c: Compression, w: W, window: Window) -> Result<Box<dyn Encoder<W>>, CodecError> {
    let setup = |source| CodecError::Setup { codec: c, source };
    let threads = worker_threads() as usize;
    let format = match c {
        Compression::Zstd => parallel::ZSTD,
        Compression::Lz4 => parallel::LZ4,
        Compression::Gzip => parallel::GZIP,
        Compression::Zlib => parallel::ZLIB,
        _ => return encoder(c, w),
    };
    Ok(Box::new(parallel::ParallelBlocks::new(w, format, threads, window, true).map_err(setup)?))
}

/// The encoder of the tar stream that follows an archive's units: [`encoder`]'s, but for zlib (which has no
/// frames to start anew) raw deflate units that go on with the archive's stream, their adler32 in
/// [`Encoder::unit_checks`], for the archive to close it (see [`zlib_units`]).
pub fn tail_encoder<W: Write + Send + 'static>(c: Compression, w: W) -> Result<Box<dyn Encoder<W>>, CodecError> {
    if c != Compression::Zlib {
        return encoder(c, w);
    }
    let setup = |source| CodecError::Setup { codec: c, source };
    Ok(Box::new(parallel::ParallelBlocks::new(w, parallel::ZLIB, worker_threads() as usize, Window::Full, false).map_err(setup)?))
}

/// A decoder of `c` for a stream that starts at a unit of an archive rather than at its start: [`decoder`]'s,
/// but raw deflate for zlib (whose header is at the archive's start only).
pub fn unit_decoder<'a, R: Read + Send + 'a>(c: Compression, r: R) -> Result<Box<dyn Read + Send + 'a>, CodecError> {
    match c {
        Compression::Zlib => Ok(Box::new(flate2::read::DeflateDecoder::new(io::BufReader::with_capacity(1 << 20, r)))),
        _ => decoder(c, r),
    }
}

/// Wrap `r` in the decoder of `c`. Concatenated frames/members are read through.
pub fn decoder<'a, R: Read + Send + 'a>(c: Compression, r: R) -> Result<Box<dyn Read + Send + 'a>, CodecError> {
    let setup = |source| CodecError::Setup { codec: c, source };
    Ok(match c {
        Compression::None | Compression::Tar => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(1 << 20, r))),
        Compression::Zlib => Box::new(flate2::read::ZlibDecoder::new(io::BufReader::with_capacity(1 << 20, r))),
        Compression::Lz4 => Box::new(Lz4Frames(lz4_flex::frame::FrameDecoder::new(io::BufReader::with_capacity(1 << 20, r)))),
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::new(r).map_err(setup)?;
            dec.window_log_max(31).map_err(setup)?;
            Box::new(dec)
        }
    })
}

/// lz4 frames one after another (lz4_flex's decoder reports end of file at the end of each frame).
struct Lz4Frames<R: io::BufRead>(lz4_flex::frame::FrameDecoder<R>);

impl<R: io::BufRead> Read for Lz4Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.0.read(buf)?;
            // A frame ended: go on with the next one, if there is more input.
            if n > 0 || buf.is_empty() || self.0.get_mut().fill_buf()?.is_empty() {
                return Ok(n);
            }
        }
    }
}

/// Number of worker threads for parallel work (compression, hashing): every core the process may run on.
pub fn worker_threads() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

#[cfg(test)]
mod tests;
