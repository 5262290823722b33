//! One lz4 frame per unit, coded straight between the caller's buffers with lz4_flex's block codec.
//!
//! lz4_flex's frame encoder and decoder copy every byte through buffers of their own (twice on the way in,
//! once on the way out) and allocate them anew for every frame; for the units of a page image, at 1 GiB a
//! second, those copies and page faults cost more than the compression itself. The frame around the blocks
//! is a few bytes (magic, descriptor, one size word per block, an end mark: the format of `lz4 -d`), written
//! and read here; the blocks are lz4_flex's.

use std::io;

use lz4_flex::block::{compress_into_with_table, decompress_into, get_maximum_output_size, CompressTable};

use super::units::{lz4_descriptor, LZ4_MAGIC};

/// Input bytes per block: the descriptor's 4 MiB block size.
const BLOCK: usize = 4 << 20;
/// The size word's high bit: the block is stored as is.
const STORED: u32 = 0x8000_0000;

/// The most bytes [`encode`] writes for `len` input bytes.
pub fn bound(len: usize) -> usize {
    let blocks = len.div_ceil(BLOCK).max(1);
    4 + 3 + 4 + blocks * (4 + get_maximum_output_size(BLOCK.min(len)))
}

/// Compress `data` as one frame into the start of `out` (its length is raised to [`bound`] if shorter and
/// otherwise left as it is: a buffer reused is not zeroed again); the frame's length. A block that does not
/// shrink is stored as is, as the reference encoder does.
pub fn encode(data: &[u8], out: &mut Vec<u8>, table: &mut CompressTable) -> io::Result<usize> {
    let need = bound(data.len());
    if out.len() < need {
        out.resize(need, 0);
    }
    fn put(out: &mut [u8], at: &mut usize, bytes: &[u8]) {
        out[*at..*at + bytes.len()].copy_from_slice(bytes);
        *at += bytes.len();
    }
    let mut at = 0;
    put(out, &mut at, &LZ4_MAGIC.to_le_bytes());
    put(out, &mut at, &lz4_descriptor(false));
    for block in data.chunks(BLOCK) {
        let body = at + 4;
        let packed = compress_into_with_table(block, &mut out[body..], table).map_err(io::Error::other)?;
        if packed < block.len() {
            out[at..body].copy_from_slice(&(packed as u32).to_le_bytes());
            at = body + packed;
        } else {
            put(out, &mut at, &(STORED | block.len() as u32).to_le_bytes());
            put(out, &mut at, block);
        }
    }
    put(out, &mut at, &0u32.to_le_bytes());
    Ok(at)
}

/// Decode the lz4 frames of `packed` straight into `out`, which they must fill exactly. `None` when a frame
/// uses what this path does not read (linked blocks, block checksums, a dictionary, another version): the
/// caller then reads it with a full frame decoder. Checksums in a frame are not verified here: the caller
/// verifies the content against the manifest's.
pub fn decode_into(packed: &[u8], out: &mut [u8]) -> Option<io::Result<()>> {
    let damaged = |what: &str| Some(Err(io::Error::new(io::ErrorKind::InvalidData, what.to_string())));
    let mut rest = packed;
    let mut filled = 0;
    while !rest.is_empty() {
        let Some((magic, after)) = take_u32(rest) else { return damaged("a frame is cut short") };
        if magic != LZ4_MAGIC {
            return damaged("not an lz4 frame");
        }
        let Some((&flg, after)) = after.split_first() else { return damaged("a frame header is cut short") };
        // Version 01, independent blocks, no block checksums, no dictionary.
        if flg & 0xF0 != 0x60 || flg & 0x11 != 0 {
            return None;
        }
        let header = 2 + if flg & 0x08 != 0 { 8 } else { 0 } + 1;
        let Some(mut body) = after.get(header - 1..) else { return damaged("a frame header is cut short") };
        loop {
            let Some((word, after)) = take_u32(body) else { return damaged("a block is cut short") };
            if word == 0 {
                body = after;
                break;
            }
            let size = (word & !STORED) as usize;
            let Some(block) = after.get(..size) else { return damaged("a block is cut short") };
            let room = &mut out[filled..];
            let n = if word & STORED != 0 {
                let Some(dest) = room.get_mut(..size) else { return damaged("decodes to more than its chunk") };
                dest.copy_from_slice(block);
                size
            } else {
                match decompress_into(block, room) {
                    Ok(n) => n,
                    Err(e) => return Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
                }
            };
            filled += n;
            body = &after[size..];
        }
        // The content checksum, when the frame has one.
        rest = match flg & 0x04 != 0 {
            true => match body.get(4..) {
                Some(rest) => rest,
                None => return damaged("a content checksum is cut short"),
            },
            false => body,
        };
    }
    if filled != out.len() {
        return damaged("decodes to less than its chunk");
    }
    Some(Ok(()))
}

fn take_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (word, rest) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*word), rest))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9u32;
        (0..len)
            .map(|i| {
                if i % (1 << 20) < (1 << 19) {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                } else {
                    (i % 97) as u8
                }
            })
            .collect()
    }

    #[test]
    fn frames_round_trip_and_read_as_lz4_with_the_frame_decoder() {
        let mut table = CompressTable::large();
        let mut out = Vec::new();
        for len in [0, 1, 4096, BLOCK, BLOCK + 1, 2 * BLOCK] {
            let data = sample(len);
            let n = encode(&data, &mut out, &mut table).unwrap();
            assert!(n <= bound(len));
            let mut back = Vec::new();
            lz4_flex::frame::FrameDecoder::new(&out[..n]).read_to_end(&mut back).unwrap();
            assert!(back == data, "frame decoder, {len} bytes");
            let mut direct = vec![0xAA; len];
            decode_into(&out[..n], &mut direct).unwrap().unwrap();
            assert!(direct == data, "direct decode, {len} bytes");
        }
    }

    #[test]
    fn random_blocks_are_stored_and_frames_of_other_encoders_decode_or_are_left_to_the_full_decoder() {
        let mut x = 1u64;
        let random: Vec<u8> = (0..BLOCK)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect();
        let mut out = Vec::new();
        let n = encode(&random, &mut out, &mut CompressTable::large()).unwrap();
        assert_eq!(n, BLOCK + 15, "stored: header, one size word, the block, the end mark");
        // lz4_flex's own frames, with content size and checksums: decoded when independent...
        let data = sample(BLOCK + 100);
        let info = lz4_flex::frame::FrameInfo::new().content_checksum(true).content_size(Some(data.len() as u64));
        let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(&data).unwrap();
        let mut frames = enc.finish().unwrap();
        frames.extend_from_slice(&frames.clone());
        let mut twice = vec![0; 2 * data.len()];
        decode_into(&frames, &mut twice).unwrap().unwrap();
        assert!(twice[..data.len()] == data[..] && twice[data.len()..] == data[..]);
        // ...and left to the full decoder when linked.
        let info = lz4_flex::frame::FrameInfo::new().block_mode(lz4_flex::frame::BlockMode::Linked);
        let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(&data).unwrap();
        assert!(decode_into(&enc.finish().unwrap(), &mut vec![0; data.len()]).is_none());
    }

    #[test]
    fn damaged_frames_are_invalid_data_never_a_panic() {
        let data = sample(BLOCK + 5000);
        let mut out = Vec::new();
        let n = encode(&data, &mut out, &mut CompressTable::large()).unwrap();
        let frame = &out[..n];
        let mut dest = vec![0; data.len()];
        for cut in [0, 3, 6, 7, 9, 100, n / 2, n - 4, n - 1] {
            let r = decode_into(&frame[..cut], &mut dest);
            assert!(matches!(&r, Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData), "cut at {cut}");
        }
        assert!(decode_into(frame, &mut vec![0; data.len() - 1]).unwrap().is_err(), "more than the chunk");
        assert!(decode_into(frame, &mut vec![0; data.len() + 1]).unwrap().is_err(), "less than the chunk");
        let mut flipped = frame.to_vec();
        for i in (11..n).step_by(997) {
            flipped[i] ^= 0x5A;
        }
        if let Some(Ok(())) = decode_into(&flipped, &mut dest) {
            assert!(dest != data, "damage shows in the content at least (the caller's checksum catches it)");
        }
    }
}
