//! Self-contained units of a compressed stream, for archives written out of order.
//!
//! Every archive format but zlib is a sequence of independent units (zstd and lz4 frames, gzip members) that
//! decode as the concatenation of their contents. That lets an archive entry whose size is unknown while it
//! is written (a page image CRIU is still writing) go in without buffering: reserve a fixed-size slot for its
//! tar header, compress the data as units of its own after the slot, and once the size is known, fill the
//! slot with a unit holding the header uncompressed, padded to exactly the slot's size with content-free
//! bytes (a zstd skippable frame, empty lz4 frames, a gzip header's extra field, empty deflate blocks). Any
//! decoder of the format (ours, `zstd -d`, `gzip -d`, `lz4 -d`, zlib's) reads the result as one tar stream.
//!
//! zlib has no frames: its units are pieces of one deflate stream (see [`super::zlib_units`]), which the
//! archive opens with zlib's header and ends with a closing unit ([`closing_unit`]) carrying the adler32.

use super::zlib_units::{self, Adler};
use super::Compression;

/// Size of the slot reserved for one tar header.
pub fn header_slot(c: Compression) -> usize {
    match c {
        Compression::Tar => 512,
        _ => 1024,
    }
}

/// Whether `c` can hold an entry written before its size is known.
pub fn supports_late_headers(c: Compression) -> bool {
    c.is_archive()
}

/// A unit of format `c` holding `content` uncompressed, padded to exactly `size` bytes when given.
/// `None` when `c` has no units, or the content does not fit in `size`.
pub fn stored_unit(c: Compression, content: &[u8], size: Option<usize>) -> Option<Vec<u8>> {
    let unit = match c {
        Compression::Tar => content.to_vec(),
        Compression::Zstd => zstd_raw_frame(content),
        Compression::Lz4 => lz4_uncompressed_frame(content),
        Compression::Gzip => return gzip_stored_member(content, size),
        Compression::Zlib => {
            let mut out = zlib_units::stored_blocks(content, false);
            if let Some(size) = size {
                out.extend(zlib_units::padding(size.checked_sub(out.len())?)?);
            }
            return Some(out);
        }
        Compression::None => return None,
    };
    let Some(size) = size else { return Some(unit) };
    let mut padding = size.checked_sub(unit.len())?;
    let mut out = unit;
    match c {
        Compression::Tar if padding > 0 => return None,
        Compression::Zstd if padding > 0 => {
            // A skippable frame: magic, length, then bytes every decoder skips.
            padding = padding.checked_sub(8)?;
            out.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
            out.extend_from_slice(&u32::try_from(padding).ok()?.to_le_bytes());
            out.resize(out.len() + padding, 0);
        }
        Compression::Lz4 => {
            // Empty frames of 11 and 19 bytes (without or with a content size of 0) add up to any length
            // above 179.
            while padding % 11 != 0 {
                out.extend(lz4_empty_frame(true));
                padding = padding.checked_sub(19)?;
            }
            for _ in 0..padding / 11 {
                out.extend(lz4_empty_frame(false));
            }
        }
        _ => {}
    }
    Some(out)
}

/// The unit that ends an archive of format `c`, holding `content` (its index's trailer): a unit as
/// [`stored_unit`] makes, but for zlib the stream's final block and its adler32, `check` (which counts
/// `content` already). `None` when `c` has no units.
pub fn closing_unit(c: Compression, content: &[u8], check: Option<Adler>) -> Option<Vec<u8>> {
    match (c, check) {
        (Compression::Zlib, Some(check)) => Some(zlib_units::closing(content, check)),
        (Compression::Zlib, None) => None,
        _ => stored_unit(c, content, None),
    }
}

/// Whether `end`, the last bytes of an archive of format `c`, is the closing unit of `content` (whatever
/// the checksum it carries).
pub fn ends_with_closing(c: Compression, end: &[u8], content: &[u8]) -> bool {
    match c {
        Compression::Zlib => zlib_units::ends_with_closing(end, content),
        _ => stored_unit(c, content, None).is_some_and(|u| end.ends_with(&u)),
    }
}

/// A zstd frame with one raw (uncompressed) block; a 1 KiB window is enough for a header.
fn zstd_raw_frame(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16);
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Frame header descriptor: no content size, not single-segment, no checksum, no dictionary; then the
    // window descriptor (exponent and mantissa 0: 1 KiB).
    out.extend_from_slice(&[0x00, 0x00]);
    for (i, block) in content.chunks(1024).enumerate() {
        let last = (i + 1) * 1024 >= content.len();
        let header = u32::from(last) | (block.len() as u32) << 3;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
    if content.is_empty() {
        // One empty last block.
        out.extend_from_slice(&[0x01, 0x00, 0x00]);
    }
    out
}

pub(crate) const LZ4_MAGIC: u32 = 0x184D_2204;

/// FLG (version 01, independent blocks, optionally a content size of 0) and BD (4 MiB blocks, as our
/// encoder's frames: lz4_flex's decoder expects one block size throughout), with their checksum.
pub(crate) fn lz4_descriptor(content_size: bool) -> Vec<u8> {
    let flg = 0x60 | if content_size { 0x08 } else { 0x00 };
    let mut d = vec![flg, 0x70];
    if content_size {
        d.extend_from_slice(&0u64.to_le_bytes());
    }
    let hc = (twox_hash::XxHash32::oneshot(0, &d) >> 8) as u8;
    d.push(hc);
    d
}

fn lz4_empty_frame(content_size: bool) -> Vec<u8> {
    let mut out = LZ4_MAGIC.to_le_bytes().to_vec();
    out.extend(lz4_descriptor(content_size));
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// An lz4 frame of uncompressed blocks (the size word's high bit marks a block stored as is).
fn lz4_uncompressed_frame(content: &[u8]) -> Vec<u8> {
    let mut out = LZ4_MAGIC.to_le_bytes().to_vec();
    out.extend(lz4_descriptor(false));
    for block in content.chunks(4 << 20) {
        out.extend_from_slice(&(0x8000_0000u32 | block.len() as u32).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// A gzip member with one stored deflate block, padded through the header's extra field (a subfield "CP").
fn gzip_stored_member(content: &[u8], size: Option<usize>) -> Option<Vec<u8>> {
    let len = u16::try_from(content.len()).ok()?;
    let bare = 10 + 5 + content.len() + 8;
    let extra = match size {
        Some(size) if size == bare => None,
        Some(size) => Some(size.checked_sub(bare + 2 + 4)?),
        None => None,
    };
    let mut out = vec![0x1F, 0x8B, 0x08, if extra.is_some() { 0x04 } else { 0x00 }, 0, 0, 0, 0, 0x00, 0xFF];
    if let Some(n) = extra {
        let n16 = u16::try_from(n).ok()?;
        out.extend_from_slice(&(n16 + 4).to_le_bytes());
        out.extend_from_slice(b"CP");
        out.extend_from_slice(&n16.to_le_bytes());
        out.resize(out.len() + n, 0);
    }
    out.push(0x01); // final block, stored
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(content);
    let mut crc = flate2::Crc::new();
    crc.update(content);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(content.len() as u32).to_le_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn decode(c: Compression, bytes: Vec<u8>) -> Vec<u8> {
        let mut back = Vec::new();
        super::super::decoder(c, std::io::Cursor::new(bytes)).unwrap().read_to_end(&mut back).unwrap();
        back
    }

    #[test]
    fn padded_units_have_the_exact_size_and_decode_to_their_content() {
        let header = [7u8; 512];
        for c in [Compression::Gzip, Compression::Lz4, Compression::Zstd, Compression::Tar] {
            let slot = header_slot(c);
            let unit = stored_unit(c, &header, Some(slot)).unwrap();
            assert_eq!(unit.len(), slot, "{c}");
            assert_eq!(Compression::detect_bytes(&unit), Some(c).filter(|c| *c != Compression::Tar), "{c}");
            assert_eq!(decode(c, unit), header, "{c}");
            // Every padding length a slot may need.
            for size in 710..=1100 {
                if c == Compression::Tar {
                    break;
                }
                let unit = stored_unit(c, &header, Some(size)).unwrap();
                assert_eq!(unit.len(), size, "{c} padded to {size}");
                assert_eq!(decode(c, unit), header, "{c} padded to {size}");
            }
        }
        assert!(stored_unit(Compression::None, &header, None).is_none());
        assert!(stored_unit(Compression::Zstd, &header, Some(100)).is_none(), "does not fit");
    }

    #[test]
    fn units_and_encoder_output_decode_as_one_stream() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Compression::Gzip, Compression::Lz4, Compression::Zstd, Compression::Tar] {
            let mut out = stored_unit(c, b"head", None).unwrap();
            out.extend(stored_unit(c, b"", None).unwrap());
            let mut enc = super::super::encoder(c, Vec::new()).unwrap();
            enc.write_all(&data).unwrap();
            out.extend(enc.finish().unwrap());
            // A padded unit after the encoder's output (plain tar has no padding: the bytes themselves).
            let padded = if c == Compression::Tar { None } else { Some(header_slot(c)) };
            out.extend(stored_unit(c, b"tail", padded).unwrap());
            let mut want = b"head".to_vec();
            want.extend(&data);
            want.extend(b"tail");
            assert!(decode(c, out) == want, "{c}");
        }
    }

    #[test]
    fn zlib_slots_units_and_the_tail_read_as_one_zlib_stream() {
        let header = [7u8; 512];
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut adler = Adler::default();
        let mut out = zlib_units::HEADER.to_vec();
        // Every padding length a slot may need, each decoding to its header alone.
        for size in 537..=1100 {
            let unit = stored_unit(Compression::Zlib, &header, Some(size)).unwrap();
            assert_eq!(unit.len(), size);
            out.extend(unit);
            adler.update(&header);
        }
        assert!(stored_unit(Compression::Zlib, &header, Some(520)).is_none(), "does not fit");
        let mut enc = super::super::tail_encoder(Compression::Zlib, Vec::new()).unwrap();
        let checks = enc.unit_checks().unwrap();
        enc.write_all(&data).unwrap();
        out.extend(enc.finish().unwrap());
        adler.append_units(&checks);
        adler.update(b"tail");
        let closing = closing_unit(Compression::Zlib, b"tail", Some(adler)).unwrap();
        out.extend(&closing);
        assert!(ends_with_closing(Compression::Zlib, &out, b"tail"));
        assert!(!ends_with_closing(Compression::Zlib, &out, b"tall"));
        assert!(closing_unit(Compression::Zlib, b"tail", None).is_none(), "zlib's closing needs the checksum");
        assert_eq!(Compression::detect_bytes(&out), Some(Compression::Zlib));
        let mut want = header.repeat(1100 - 537 + 1);
        want.extend(&data);
        want.extend(b"tail");
        assert!(decode(Compression::Zlib, out) == want);
    }
}
