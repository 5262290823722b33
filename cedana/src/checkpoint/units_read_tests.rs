//! zstd units decoded as a source hands their bytes over in pieces (an object store's GET bodies).

use std::io;

use super::*;

/// An archive in memory that reads in pieces of `piece` bytes, failing with `ConnectionReset` once
/// `fail_after` bytes were handed over.
struct Pieces {
    bytes: Vec<u8>,
    piece: usize,
    fail_after: Option<usize>,
}

impl ArchiveSource for Pieces {
    fn location(&self) -> &str {
        "pieces"
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_exact_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        panic!("a source that reads in pieces is read in pieces")
    }
    fn read_from(&self, _: u64) -> io::Result<Box<dyn io::Read + Send>> {
        panic!("not streamed")
    }
    fn read_in_pieces(&self, offset: u64, len: u64, each: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Option<io::Result<()>> {
        let range = &self.bytes[offset as usize..(offset + len) as usize];
        let mut handed = 0;
        for piece in range.chunks(self.piece) {
            if self.fail_after.is_some_and(|n| handed + piece.len() > n) {
                return Some(Err(io::Error::new(io::ErrorKind::ConnectionReset, "the store went away")));
            }
            handed += piece.len();
            if let Err(e) = each(piece) {
                return Some(Err(e));
            }
        }
        Some(Ok(()))
    }
}

fn content(len: usize) -> Vec<u8> {
    // Half text that compresses, half bytes that do not.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|i| {
            if i < len / 2 {
                b"the same paragraph again and again "[i % 35]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// `data` as zstd frames: one per `frame` bytes.
fn frames(data: &[u8], frame: usize) -> Vec<u8> {
    data.chunks(frame).flat_map(|f| zstd::bulk::compress(f, 1).unwrap()).collect()
}

fn decode(source: &Pieces, start: u64, size: u64, len: usize) -> io::Result<Vec<u8>> {
    let (mut out, mut packed) = (vec![0u8; len], Vec::new());
    decode_unit_into(source, Compression::Zstd, start, size, &mut out, &mut packed)?;
    assert!(packed.is_empty(), "no buffer for the compressed unit");
    Ok(out)
}

#[test]
fn a_zstd_unit_read_in_pieces_decodes_to_its_bytes_whatever_the_pieces() {
    let data = content(CHUNK);
    for (frame, pieces) in [(CHUNK, vec![1 << 20, 65_537, 4096]), (CHUNK / 3, vec![100_003]), (1000, vec![7])] {
        let data = if pieces == [7] { &data[..20_000] } else { &data[..] };
        let packed = frames(data, frame);
        // Behind other bytes, as a unit sits in an archive.
        let bytes: Vec<u8> = [&[9u8; 513][..], &packed, &[9u8; 100]].concat();
        for piece in pieces {
            let source = Pieces { bytes: bytes.clone(), piece, fail_after: None };
            let got = decode(&source, 513, packed.len() as u64, data.len()).unwrap();
            assert!(got == data, "frames of {frame}, pieces of {piece}");
        }
    }
}

#[test]
fn a_zstd_unit_read_in_pieces_that_is_cut_short_or_decodes_to_more_or_less_is_refused() {
    let data = content(1 << 20);
    let packed = frames(&data, 300_000);
    let source = Pieces { bytes: packed.clone(), piece: 10_000, fail_after: None };
    let cases = [
        (packed.len() - 10, data.len(), "cut short"),
        (packed.len(), data.len() - 1, "Destination buffer is too small"),
        (packed.len(), data.len() + 1, "it holds"),
    ];
    for (size, len, what) in cases {
        let err = decode(&source, 0, size as u64, len).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let text = err.to_string();
        assert!(text.contains("does not decode to its") && text.contains("damaged"), "{text}");
        assert!(text.contains(what), "{what}: {text}");
    }
    let mut damaged = packed.clone();
    damaged[packed.len() / 2] ^= 0x55;
    damaged[packed.len() / 2 + 1] ^= 0x55;
    let source = Pieces { bytes: damaged, piece: 10_000, fail_after: None };
    let verdict = decode(&source, 0, packed.len() as u64, data.len());
    // A flipped byte in a literal run may still decode: the chunk's hash catches that. Else it is refused.
    assert!(verdict.as_ref().map_or_else(|e| e.kind() == io::ErrorKind::InvalidData, |got| *got != data), "{verdict:?}");
}

#[test]
fn a_source_failing_midway_is_reported_as_it_is_and_the_next_unit_decodes() {
    let data = content(2 << 20);
    let packed = frames(&data, 1 << 20);
    let source = Pieces { bytes: packed.clone(), piece: 50_000, fail_after: Some(packed.len() / 2) };
    let err = decode(&source, 0, packed.len() as u64, data.len()).unwrap_err();
    assert_eq!((err.kind(), err.to_string().as_str()), (io::ErrorKind::ConnectionReset, "the store went away"));
    // The thread's context starts afresh.
    let source = Pieces { bytes: packed.clone(), piece: 50_000, fail_after: None };
    assert!(decode(&source, 0, packed.len() as u64, data.len()).unwrap() == data);
}
