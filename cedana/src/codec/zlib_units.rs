//! zlib as a series of independent units. A zlib stream (RFC 1950) is a 2-byte header, one raw deflate
//! stream (RFC 1951) and the adler32 of the whole content; deflate itself has no self-contained frames. A
//! deflate stream can be cut into pieces all the same: each unit is compressed on its own (no match reaches
//! back into an earlier unit) and ends with a sync flush (an empty stored block that leaves the stream
//! byte-aligned and not final). Such units follow one another into one deflate stream; the archive closes it
//! with a final stored block and the adler32, combined from the adler32 of every piece's content
//! ([`Adler::append`]), so any zlib decoder (ours, `zlib.decompress`, `pigz -dz`) reads one stream.
//!
//! A unit alone is read by a raw inflater started at its first byte ([`decode_into`]).

use std::cell::RefCell;
use std::io;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// The zlib header our archives start with: deflate, 32 KiB window, level "fastest", no dictionary.
pub(crate) const HEADER: [u8; 2] = [0x78, 0x01];

/// Largest content of one stored block.
const STORED_MAX: usize = 0xFFFF;

/// The adler32 of a zlib stream's content, built up piece by piece in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adler(u32);

impl Default for Adler {
    fn default() -> Self {
        Adler(1)
    }
}

impl Adler {
    /// Add `data`, which follows what was added so far.
    pub fn update(&mut self, data: &[u8]) {
        self.0 = zlib_rs::adler32::adler32(self.0, data);
    }

    /// Add a piece of `len` bytes whose own adler32 is `check`.
    pub fn append(&mut self, check: u32, len: u64) {
        self.0 = zlib_rs::adler32::adler32_combine(self.0, check, len);
    }

    /// Add the pieces an encoder's units hold, in order (see [`super::Encoder::unit_checks`]).
    pub fn append_units(&mut self, checks: &super::UnitChecks) {
        for &(check, len) in checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            self.append(check, len);
        }
    }

    /// The checksum, as the zlib stream's last four bytes hold it (big-endian).
    pub fn value(self) -> u32 {
        self.0
    }
}

/// The adler32 of `data` alone.
pub fn adler32(data: &[u8]) -> u32 {
    zlib_rs::adler32::adler32(1, data)
}

thread_local! {
    /// A worker's raw deflate context, reset from unit to unit.
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
    /// A reader's raw inflate context.
    static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Input compressed between two sync flushes: where a piece does not shrink, it is stored instead.
const PIECE: usize = 256 << 10;

/// Room for compressing `len` bytes at once: deflate's fast level codes incompressible bytes as fixed-code
/// literals (up to 9 bits for 8) before the piece is found not to shrink.
fn room_for(len: usize) -> usize {
    len + len / 8 + 64
}

/// The bytes of `len` bytes of content as stored blocks.
fn stored_len(len: usize) -> usize {
    len + 5 * len.div_ceil(STORED_MAX).max(1)
}

/// Compress `block` into one unit at the start of `out` (a reused buffer, grown as needed and never shrunk);
/// the unit's length.
pub(crate) fn compress_unit(block: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
    deflate_pieces(block, out, 0)
}

/// Compress `block` as raw deflate ending byte-aligned and not final, into `out` from `at` on (grown as
/// needed); where it ends. The block goes in pieces of [`PIECE`] bytes, each ended by a sync flush. A piece
/// that would not shrink is stored instead: found so beforehand ([`not_worth_deflating`]: then the compressor
/// starts afresh after it, so that nothing refers back across bytes it never saw), or afterwards (the
/// compressor saw its bytes, so what follows is unchanged). A unit is thus never more than a few bytes per
/// 64 KiB over its input, and incompressible memory costs a scan instead of deflate's slowest case.
pub(crate) fn deflate_pieces(block: &[u8], out: &mut Vec<u8>, at: usize) -> io::Result<usize> {
    DEFLATE.with_borrow_mut(|ctx| {
        let c = ctx.get_or_insert_with(|| Compress::new(flate2::Compression::new(super::DEFLATE_LEVEL), false));
        c.reset();
        let mut made = at;
        if block.is_empty() {
            if out.len() < made + 5 {
                out.resize(made + 5, 0);
            }
            return Ok(made + put_stored(&[], false, &mut out[made..]));
        }
        for piece in block.chunks(PIECE) {
            let room = made + room_for(piece.len());
            if out.len() < room {
                out.resize(room, 0);
            }
            if not_worth_deflating(piece) {
                made += put_stored(piece, false, &mut out[made..]);
                c.reset();
                continue;
            }
            let (in_before, out_before) = (c.total_in(), c.total_out());
            let status = c.compress(piece, &mut out[made..room], FlushCompress::Sync).map_err(io::Error::other)?;
            let (read, wrote) = ((c.total_in() - in_before) as usize, (c.total_out() - out_before) as usize);
            if status != Status::Ok || read != piece.len() || made + wrote >= room {
                let len = piece.len();
                return Err(io::Error::other(format!("deflate took {read} of {len} bytes into {wrote} ({status:?})")));
            }
            if wrote > stored_len(piece.len()) {
                made += put_stored(piece, false, &mut out[made..]);
            } else {
                made += wrote;
            }
        }
        Ok(made)
    })
}

thread_local! {
    /// A worker's lz4 match table and output for [`not_worth_deflating`].
    static PROBE: RefCell<Option<(lz4_flex::block::CompressTable, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Whether deflate would gain next to nothing on `piece`: lz4 (which skips through incompressible data at
/// gigabytes per second) finds almost no repeats in it, and its bytes are spread so evenly that Huffman
/// codes could not shorten them either (at least 7.9 bits of entropy per byte). Random and already
/// compressed memory is stored at once rather than deflated at a few tens of MB/s.
fn not_worth_deflating(piece: &[u8]) -> bool {
    if piece.len() < 4096 {
        return false;
    }
    let repeats = PROBE.with_borrow_mut(|probe| {
        let (table, out) = probe.get_or_insert_with(|| (lz4_flex::block::CompressTable::large(), Vec::new()));
        out.resize(lz4_flex::block::get_maximum_output_size(piece.len()), 0);
        lz4_flex::block::compress_into_with_table(piece, out, table).map(|n| n < piece.len() - piece.len() / 50)
    });
    if repeats.unwrap_or(true) {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in piece {
        counts[b as usize] += 1;
    }
    let n = piece.len() as f64;
    let entropy: f64 = counts.iter().filter(|&&k| k > 0).map(|&k| -(f64::from(k) / n) * (f64::from(k) / n).log2()).sum();
    entropy >= 7.9
}

/// Write `content` as stored (uncompressed) deflate blocks at the start of `out` (room for [`stored_len`]
/// bytes), the last one final when `last`; the bytes written. The stream must be at a byte boundary (after a
/// unit or a stored block it is).
pub(crate) fn put_stored(content: &[u8], last: bool, out: &mut [u8]) -> usize {
    let pieces: Vec<&[u8]> = if content.is_empty() { vec![&[]] } else { content.chunks(STORED_MAX).collect() };
    let count = pieces.len();
    let mut at = 0;
    for (i, piece) in pieces.into_iter().enumerate() {
        // BFINAL in the lowest bit, BTYPE 00 (stored), the rest of the byte padding; then LEN and NLEN.
        let len = piece.len() as u16;
        out[at] = u8::from(last && i + 1 == count);
        out[at + 1..at + 3].copy_from_slice(&len.to_le_bytes());
        out[at + 3..at + 5].copy_from_slice(&(!len).to_le_bytes());
        out[at + 5..at + 5 + piece.len()].copy_from_slice(piece);
        at += 5 + piece.len();
    }
    at
}

/// Decode the unit `packed` into exactly `out`: every byte of the unit used, `out` filled, no final block;
/// anything else is `InvalidData` (the caller says which unit is damaged).
pub(crate) fn decode_into(packed: &[u8], out: &mut [u8]) -> io::Result<()> {
    INFLATE.with_borrow_mut(|ctx| {
        let d = ctx.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let status =
            d.decompress(packed, out, FlushDecompress::Sync).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let (read, made) = (d.total_in() as usize, d.total_out() as usize);
        if made != out.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("it holds {made} bytes")));
        }
        if read != packed.len() || status == Status::StreamEnd {
            // More input than the content: the unit decodes to more, or it closes the stream where it must not.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "it holds more than its content"));
        }
        Ok(())
    })
}

/// Decode the gzip member `packed` (a unit of a gzip archive) into exactly `out`, with the same raw
/// inflater: its header skipped, its deflate data filling `out` to the end of the stream, its CRC-32 and
/// length checked, nothing after it; anything else is `InvalidData`.
pub(crate) fn gzip_member_into(packed: &[u8], out: &mut [u8]) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let body = gzip_header_len(packed).ok_or_else(|| bad("its gzip header is damaged"))?;
    let used = INFLATE.with_borrow_mut(|ctx| -> io::Result<usize> {
        let d = ctx.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let status = d
            .decompress(&packed[body..], out, FlushDecompress::Finish)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if status != Status::StreamEnd || d.total_out() as usize != out.len() {
            return Err(bad(&format!("it holds {} bytes", d.total_out())));
        }
        Ok(body + d.total_in() as usize)
    })?;
    let trailer = packed.get(used..).filter(|t| t.len() == 8).ok_or_else(|| bad("its end is not a gzip trailer"))?;
    let mut crc = flate2::Crc::new();
    crc.update(out);
    if trailer[..4] != crc.sum().to_le_bytes() || trailer[4..] != (out.len() as u32).to_le_bytes() {
        return Err(bad("its CRC-32 or length does not match its content"));
    }
    Ok(())
}

/// The length of the gzip header at the start of `packed` (RFC 1952: the fixed ten bytes, then the extra
/// field, name, comment and header CRC its flags announce).
fn gzip_header_len(packed: &[u8]) -> Option<usize> {
    let fixed = packed.get(..10)?;
    if fixed[..3] != [0x1F, 0x8B, 0x08] || fixed[3] & 0xE0 != 0 {
        return None;
    }
    let flags = fixed[3];
    let mut at = 10;
    if flags & 0x04 != 0 {
        let len = u16::from_le_bytes([*packed.get(at)?, *packed.get(at + 1)?]) as usize;
        at += 2 + len;
    }
    for bit in [0x08, 0x10] {
        if flags & bit != 0 {
            at += packed.get(at..)?.iter().position(|&b| b == 0)? + 1;
        }
    }
    if flags & 0x02 != 0 {
        at += 2;
    }
    (at <= packed.len()).then_some(at)
}

/// `content` as stored deflate blocks (see [`put_stored`]).
pub(crate) fn stored_blocks(content: &[u8], last: bool) -> Vec<u8> {
    let mut out = vec![0u8; stored_len(content.len())];
    let n = put_stored(content, last, &mut out);
    out.truncate(n);
    out
}

/// Exactly `n` bytes of deflate blocks without content, ending byte-aligned: empty stored blocks (5 bytes)
/// and empty fixed-code blocks each followed by an empty stored block (6 bytes), which add up to any length
/// from 20 on (and to 0, 5, 6, 10, 11, 12, 15, 16, 17, 18). `None` for the lengths they cannot make.
pub(crate) fn padding(n: usize) -> Option<Vec<u8>> {
    const EMPTY_STORED: [u8; 5] = [0x00, 0x00, 0x00, 0xFF, 0xFF];
    // A fixed-code block (BFINAL 0, BTYPE 01) holding only its end code (seven zero bits): ten bits, then a
    // stored block's three header bits and the padding to the byte.
    const EMPTY_FIXED_THEN_STORED: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0xFF, 0xFF];
    let sixes = (0..5).find(|k| k * 6 <= n && (n - k * 6).is_multiple_of(5))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..sixes {
        out.extend_from_slice(&EMPTY_FIXED_THEN_STORED);
    }
    for _ in 0..(n - sixes * 6) / 5 {
        out.extend_from_slice(&EMPTY_STORED);
    }
    Some(out)
}

/// The end of a zlib stream of ours: `content` in final stored blocks, then the adler32 of the whole
/// content (`check`, which already counts `content`).
pub(crate) fn closing(content: &[u8], check: Adler) -> Vec<u8> {
    let mut out = stored_blocks(content, true);
    out.extend_from_slice(&check.value().to_be_bytes());
    out
}

/// Whether `end` (the last bytes of an archive) ends with the closing of [`closing`] around `content`,
/// whatever the checksum.
pub(crate) fn ends_with_closing(end: &[u8], content: &[u8]) -> bool {
    end.len() >= 4 && end[..end.len() - 4].ends_with(&stored_blocks(content, true))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Pseudo-random bytes (xorshift).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Half repetitive, half noise, by turns of 4 KiB, as page images are.
    fn sample(len: usize, seed: u64) -> Vec<u8> {
        noise(len, seed).into_iter().enumerate().map(|(i, b)| if (i / 4096) % 2 == 0 { (i / 64) as u8 } else { b }).collect()
    }

    /// Units, stored blocks and padding in one zlib stream, closed: what `zlib.decompress` sees.
    fn stream(pieces: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        let mut out = HEADER.to_vec();
        let mut adler = Adler::default();
        let mut content = Vec::new();
        let mut buf = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if i % 2 == 0 {
                let n = compress_unit(p, &mut buf).unwrap();
                out.extend_from_slice(&buf[..n]);
                adler.append(adler32(p), p.len() as u64);
            } else {
                out.extend(stored_blocks(p, false));
                out.extend(padding(20 + i).unwrap());
                adler.update(p);
            }
            content.extend_from_slice(p);
        }
        adler.update(b"closing words");
        content.extend_from_slice(b"closing words");
        out.extend(closing(b"closing words", adler));
        (out, content)
    }

    #[test]
    fn units_stored_blocks_and_padding_read_as_one_zlib_stream_with_its_checksum() {
        let pieces = vec![sample(3 << 20, 1), vec![7u8; 512], sample(100_000, 2), vec![], Vec::new(), sample(70_000, 3)];
        let (packed, content) = stream(&pieces);
        let mut back = Vec::new();
        flate2::read::ZlibDecoder::new(&packed[..]).read_to_end(&mut back).unwrap();
        assert!(back == content, "read back {} bytes of {}", back.len(), content.len());
        // A wrong checksum is refused by the standard decoder: the combination is what it checks.
        let mut bad = packed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(flate2::read::ZlibDecoder::new(&bad[..]).read_to_end(&mut Vec::new()).is_err());
        assert!(ends_with_closing(&packed, b"closing words"));
        assert!(!ends_with_closing(&packed, b"closing word"));
    }

    #[test]
    fn a_unit_decodes_alone_to_exactly_its_content_and_damage_is_refused() {
        let block = sample(1 << 20, 9);
        let mut buf = Vec::new();
        let n = compress_unit(&block, &mut buf).unwrap();
        let unit = &buf[..n];
        let mut out = vec![0u8; block.len()];
        decode_into(unit, &mut out).unwrap();
        assert!(out == block);
        // Too small or too large a place for it, cut short, or bytes flipped: an error, never a panic.
        assert!(decode_into(unit, &mut vec![0u8; block.len() - 1]).is_err());
        assert!(decode_into(unit, &mut vec![0u8; block.len() + 1]).is_err());
        // (Cut within its closing flush marker, a unit still yields its content: the marker holds none, and
        // every unit's content is checked against the manifest's chunk hash anyway.)
        for cut in [1, n / 3, 2 * n / 3] {
            assert!(decode_into(&unit[..cut], &mut out).is_err(), "cut at {cut}");
        }
        for at in [0, n / 2, n - 3] {
            let mut bad = unit.to_vec();
            bad[at] ^= 0x5A;
            let _ = decode_into(&bad, &mut out);
        }
        // A unit that closes the stream (a final block) is not one of ours.
        assert!(decode_into(&stored_blocks(&block[..1000], true), &mut out[..1000]).is_err());
        decode_into(&stored_blocks(&block[..1000], false), &mut out[..1000]).unwrap();
    }

    #[test]
    fn incompressible_units_stay_within_their_bound() {
        let noise = sample(8 << 20, 4).into_iter().enumerate().map(|(i, b)| b ^ (i as u8).wrapping_mul(151)).collect::<Vec<_>>();
        let mut buf = Vec::new();
        let n = compress_unit(&noise, &mut buf).unwrap();
        assert!(n <= stored_len(noise.len()) + 64, "{n} bytes for {}", noise.len());
        assert!((n as u64) <= crate::checkpoint::units_read::max_unit(noise.len()), "{n} bytes for {}", noise.len());
    }

    #[test]
    fn incompressible_pieces_are_stored_and_what_follows_them_still_decodes() {
        let random = noise(PIECE, 5);
        // Letters (compressible, with few repeats), a piece of random bytes (stored), then a piece that
        // repeats the ends of both: the compressor, started afresh after the stored piece, must refer to
        // neither (it never saw the random bytes, and the letters are further back than it knows).
        let letters: Vec<u8> = noise(PIECE, 6).iter().map(|b| b'a' + b % 16).collect();
        let mut block = letters.clone();
        block.extend_from_slice(&random);
        block.extend_from_slice(&letters[PIECE - 20_000..]);
        block.extend_from_slice(&random[PIECE - 20_000..]);
        block.extend(std::iter::repeat_n(b"memory pages ".as_slice(), 30_000).flatten());
        let mut out = Vec::new();
        let n = compress_unit(&block, &mut out).unwrap();
        let stored_at = out.windows(5).position(|w| w == [0x00, 0xFF, 0xFF, 0x00, 0x00]).expect("a stored block");
        assert!(out[stored_at + 5..].starts_with(&random[..1000]), "the random piece is stored as it is");
        assert!(stored_at > 0 && stored_at < PIECE, "the letters are deflated, not stored: {stored_at}");
        let mut back = vec![0u8; block.len()];
        decode_into(&out[..n], &mut back).unwrap();
        assert!(back == block);
        // Random bytes that repeat within deflate's window are not taken for noise: they are compressed.
        let pattern = noise(8192, 7);
        let repeated: Vec<u8> = pattern.iter().copied().cycle().take(PIECE).collect();
        assert!(!not_worth_deflating(&repeated) && not_worth_deflating(&random));
        let n = compress_unit(&repeated, &mut out).unwrap();
        assert!(n < PIECE / 10, "{n} bytes for {PIECE} bytes of a repeated pattern");
    }

    #[test]
    fn gzip_members_decode_straight_and_damage_is_refused() {
        let block = sample(3 << 20, 11);
        let mut buf = Vec::new();
        let n = crate::codec::parallel::gzip_member(&block, &mut buf).unwrap();
        let member = &buf[..n];
        let mut out = vec![0u8; block.len()];
        gzip_member_into(member, &mut out).unwrap();
        assert!(out == block);
        // flate2's own members (as earlier versions wrote them), and one with a name and a comment.
        for builder in [flate2::GzBuilder::new(), flate2::GzBuilder::new().filename("x").comment("y").extra(vec![1, 2, 3])] {
            let mut enc = builder.write(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut enc, &block).unwrap();
            gzip_member_into(&enc.finish().unwrap(), &mut out).unwrap();
            assert!(out == block);
        }
        assert!(gzip_member_into(member, &mut vec![0u8; block.len() - 1]).is_err());
        assert!(gzip_member_into(member, &mut vec![0u8; block.len() + 1]).is_err());
        let mut longer = member.to_vec();
        longer.push(0);
        assert!(gzip_member_into(&longer, &mut out).is_err(), "bytes after the member");
        for cut in [0, 5, 12, n / 2, n - 1] {
            assert!(gzip_member_into(&member[..cut], &mut out).is_err(), "cut at {cut}");
        }
        for at in [0, 3, n / 2, n - 6, n - 2] {
            let mut bad = member.to_vec();
            bad[at] ^= 0x10;
            assert!(gzip_member_into(&bad, &mut out).is_err(), "flipped at {at}");
        }
    }

    #[test]
    fn padding_makes_every_length_it_claims() {
        for n in 0..2000 {
            match padding(n) {
                Some(p) => {
                    assert_eq!(p.len(), n);
                    let mut framed = stored_blocks(b"x", false);
                    framed.extend(p);
                    framed.extend(stored_blocks(b"y", true));
                    let mut back = Vec::new();
                    flate2::read::DeflateDecoder::new(&framed[..]).read_to_end(&mut back).unwrap();
                    assert_eq!(back, b"xy", "padding of {n}");
                }
                None => assert!(n < 20, "no padding of {n}"),
            }
        }
    }
}
