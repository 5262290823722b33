//! Per-file checksums: XXH3-128 of each 8 MiB chunk, combined by XXH3-128 over the chunk digests and the
//! length. Chunking lets a file already on disk be hashed on every core at once, while a stream (an
//! archive being written or extracted) computes the same digest sequentially.

use std::io::{self, Read, Write};
use std::path::Path;

use twox_hash::XxHash3_128 as Xxh3;

use super::digest_job::DigestJob;

/// XXH3-128 of `data` in one go (AVX2 when the CPU has it, chosen at run time).
pub(crate) fn xxh3_128(data: &[u8]) -> u128 {
    Xxh3::oneshot(data)
}

/// Name of the checksum algorithm, as recorded in manifests.
pub const ALGORITHM: &str = "xxh3-128/8MiB-chunks";

/// Size of the independently hashed chunks.
pub const CHUNK: usize = 8 << 20;

/// Size and checksum of one file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Path relative to the checkpoint root, `/`-separated.
    pub name: String,
    pub size: u64,
    /// Lower-case hex of the XXH3-128 digest.
    pub xxh3: String,
    /// For a file of more than one chunk: the lower-case hex XXH3-128 of each chunk, in order, so that a
    /// reader can check a chunk on its own before using it (a lazy restore serving pages). Absent from
    /// checkpoints of earlier versions, which are checked whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

impl FileDigest {
    /// Whether `other` says the same of the same file (the chunks' list aside: one side may lack it).
    pub fn same(&self, other: &FileDigest) -> bool {
        self.name == other.name && self.size == other.size && self.xxh3 == other.xxh3
    }

    /// Whether chunk `i`, hashed `hash`, is what this digest says; `None` when it cannot tell (a digest of
    /// an earlier version, with no chunks listed, of a file of more than one chunk).
    pub fn chunk_matches(&self, i: usize, hash: u128) -> Option<bool> {
        if self.size <= CHUNK as u64 {
            return Some(i == 0 && combine(self.name.clone(), self.size, &[hash]).xxh3 == self.xxh3);
        }
        let listed = self.chunks.get(i)?;
        Some(u128::from_str_radix(listed, 16).is_ok_and(|h| h == hash))
    }
}

/// Streaming hasher that also counts bytes.
#[derive(Default)]
pub struct Hasher {
    chunk: Xxh3,
    in_chunk: usize,
    chunks: Vec<u128>,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, mut buf: &[u8]) {
        self.len += buf.len() as u64;
        while !buf.is_empty() {
            let take = (CHUNK - self.in_chunk).min(buf.len());
            self.chunk.write(&buf[..take]);
            self.in_chunk += take;
            buf = &buf[take..];
            if self.in_chunk == CHUNK {
                self.chunks.push(self.chunk.finish_128());
                self.chunk = Xxh3::new();
                self.in_chunk = 0;
            }
        }
    }
    /// Finish into a digest for `name`.
    pub fn finish(&self, name: impl Into<String>) -> FileDigest {
        let mut chunks = self.chunks.clone();
        if self.in_chunk > 0 || chunks.is_empty() {
            chunks.push(self.chunk.finish_128());
        }
        combine(name.into(), self.len, &chunks)
    }
}

/// The digest of a file of `len` bytes from the hashes of its chunks, in order.
pub(crate) fn combine(name: String, len: u64, chunks: &[u128]) -> FileDigest {
    let mut all = Xxh3::new();
    for c in chunks {
        all.write(&c.to_le_bytes());
    }
    all.write(&len.to_le_bytes());
    let listed = if chunks.len() > 1 { chunks.iter().map(|c| format!("{c:032x}")).collect() } else { Vec::new() };
    FileDigest { name, size: len, xxh3: format!("{:032x}", all.finish_128()), chunks: listed }
}

/// A reader that hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Hasher::new() }
    }
    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that hashes everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Hasher::new() }
    }
    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hash a whole file in place, on every core (the chunks are independent).
pub fn digest_file(path: &Path, name: &str) -> io::Result<FileDigest> {
    let job = DigestJob::open([(name.to_string(), path.to_path_buf())]).map_err(|(_, e)| e)?;
    job.run(crate::codec::worker_threads() as usize, &|_| {});
    job.digests().pop().ok_or_else(|| io::Error::other("no digest for a file that was hashed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_writer_and_file_digests_agree() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = HashingReader::new(&data[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, &data).unwrap();
        let d = digest_file(&p, "f").unwrap();
        assert_eq!(r.hasher().finish("f"), d);
        assert_eq!(w.hasher().finish("f"), d);
        assert_eq!(d.size, 100_000);
        assert_eq!(d.xxh3.len(), 32);
    }

    #[test]
    fn parallel_file_digest_matches_the_stream_at_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let p = dir.path().join("f");
            std::fs::write(&p, &data).unwrap();
            let mut h = Hasher::new();
            for piece in data.chunks(1_000_003) {
                h.update(piece);
            }
            assert_eq!(digest_file(&p, "f").unwrap(), h.finish("f"), "length {len}");
        }
    }

    #[test]
    fn one_flipped_bit_changes_the_digest() {
        let mut data = vec![0u8; 4096];
        let a = {
            let mut h = Hasher::new();
            h.update(&data);
            h.finish("x")
        };
        data[4000] ^= 1;
        let b = {
            let mut h = Hasher::new();
            h.update(&data);
            h.finish("x")
        };
        assert_ne!(a.xxh3, b.xxh3);
    }

    /// Digests recorded by earlier checkpoints must not change when the hash implementation does.
    #[test]
    fn digests_match_recorded_values() {
        let data: Vec<u8> = (0..(2 * CHUNK + 12345) as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let mut h = Hasher::new();
        for piece in data.chunks(1_000_003) {
            h.update(piece);
        }
        let got = [h.finish("x").xxh3, Hasher::new().finish("x").xxh3, {
            let mut small = Hasher::new();
            small.update(b"cedana");
            small.finish("x").xxh3
        }];
        assert_eq!(got, EXPECTED);
    }

    #[test]
    fn each_chunk_can_be_checked_alone_and_digests_of_earlier_versions_still_compare() {
        let data: Vec<u8> = (0..(2 * CHUNK + 100) as u32).map(|i| (i % 241) as u8).collect();
        let mut h = Hasher::new();
        h.update(&data);
        let d = h.finish("pages-1.img");
        assert_eq!(d.chunks.len(), 3);
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            assert_eq!(d.chunk_matches(i, xxh3_128(chunk)), Some(true), "chunk {i}");
        }
        let mut damaged = data[CHUNK..2 * CHUNK].to_vec();
        damaged[77] ^= 1;
        assert_eq!(d.chunk_matches(1, xxh3_128(&damaged)), Some(false));
        assert_eq!(d.chunk_matches(3, 0), None, "no such chunk");

        // A digest of an earlier version lists no chunks: the same file still, checked whole only.
        let earlier: FileDigest =
            serde_json::from_str(&format!(r#"{{"name":"pages-1.img","size":{},"xxh3":"{}"}}"#, d.size, d.xxh3)).unwrap();
        assert!(earlier.same(&d) && d.same(&earlier));
        assert_eq!(earlier.chunk_matches(0, xxh3_128(&data[..CHUNK])), None);
        let json = serde_json::to_string(&earlier).unwrap();
        assert!(!json.contains("chunks"), "nothing new written for it: {json}");

        // A file of one chunk is checked by its digest alone.
        let mut small = Hasher::new();
        small.update(b"cedana");
        let s = small.finish("x");
        assert!(s.chunks.is_empty());
        assert_eq!(s.chunk_matches(0, xxh3_128(b"cedana")), Some(true));
        assert_eq!(s.chunk_matches(0, xxh3_128(b"cedanA")), Some(false));
    }

    /// Computed by the xxhash-rust implementation cedana used before (same algorithm, XXH3-128).
    const EXPECTED: [&str; 3] =
        ["511467c9294b7b8eb918a3b710417b0e", "aa98a17a0701da464c261ea3c3cac2d9", "8bacf1942152e9043f9f2c08cd929bd8"];
}
