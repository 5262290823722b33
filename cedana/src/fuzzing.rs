//! The decoders of untrusted input, for the fuzz targets in `fuzz/` (not a stable API).

use std::path::Path;

use crate::checkpoint::{CheckpointError, Manifest};

/// Parse `bytes` as a checkpoint's manifest, with every check a reader makes before trusting it.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, CheckpointError> {
    let path = Path::new("<fuzz>");
    let manifest = crate::checkpoint::reader::parse_manifest(path, bytes)?;
    crate::checkpoint::reader::check_version(path, &manifest)?;
    Ok(manifest)
}

/// A zstd unit decoded into `len` bytes the two ways a restore decodes one: whole, as read from a local file,
/// and as an object store hands it over, in pieces of `piece` bytes. Both verdicts, for a target to compare.
pub fn zstd_unit_both_ways(unit: &[u8], len: usize, piece: usize) -> (std::io::Result<Vec<u8>>, std::io::Result<Vec<u8>>) {
    let decode = |source: &Memory| {
        let (mut out, mut packed) = (vec![0u8; len], Vec::new());
        crate::checkpoint::units_read::decode_unit_into(
            source,
            crate::codec::Compression::Zstd,
            0,
            unit.len() as u64,
            &mut out,
            &mut packed,
        )
        .map(|()| out)
    };
    let whole = decode(&Memory { bytes: unit, piece: None });
    let pieces = decode(&Memory { bytes: unit, piece: Some(piece.max(1)) });
    (whole, pieces)
}

/// Bytes in memory as an archive source, read whole or in pieces.
struct Memory<'a> {
    bytes: &'a [u8],
    piece: Option<usize>,
}

impl Memory<'_> {
    fn range(&self, offset: u64, len: u64) -> std::io::Result<&[u8]> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = start.checked_add(usize::try_from(len).map_err(std::io::Error::other)?);
        end.and_then(|end| self.bytes.get(start..end)).ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }
}

impl crate::checkpoint::ArchiveSource for Memory<'_> {
    fn location(&self) -> &str {
        "<fuzz>"
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.copy_from_slice(self.range(offset, buf.len() as u64)?);
        Ok(())
    }
    fn read_from(&self, offset: u64) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        let rest = self.range(offset, self.len().saturating_sub(offset))?;
        Ok(Box::new(std::io::Cursor::new(rest.to_vec())))
    }
    fn read_in_pieces(
        &self,
        offset: u64,
        len: u64,
        each: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Option<std::io::Result<()>> {
        let piece = self.piece?;
        Some(self.range(offset, len).and_then(|range| range.chunks(piece).try_for_each(each)))
    }
}
