//! Per-file checksums (XXH3-128): fast enough to hash every image byte on the dump path.

use std::io::{self, Read, Write};
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

/// Name of the checksum algorithm, as recorded in manifests.
pub const ALGORITHM: &str = "xxh3-128";

/// Size and checksum of one file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    /// Path relative to the checkpoint root, `/`-separated.
    pub name: String,
    pub size: u64,
    /// Lower-case hex of the XXH3-128 digest.
    pub xxh3: String,
}

/// Streaming hasher that also counts bytes.
#[derive(Default)]
pub struct Hasher {
    state: Xxh3,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, buf: &[u8]) {
        self.state.update(buf);
        self.len += buf.len() as u64;
    }
    /// Finish into a digest for `name`.
    pub fn finish(&self, name: impl Into<String>) -> FileDigest {
        FileDigest { name: name.into(), size: self.len, xxh3: format!("{:032x}", self.state.digest128()) }
    }
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

/// Hash a whole file in place.
pub fn digest_file(path: &Path, name: &str) -> io::Result<FileDigest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish(name))
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
    fn one_flipped_bit_changes_the_digest() {
        let mut data = vec![0u8; 4096];
        let a = { let mut h = Hasher::new(); h.update(&data); h.finish("x") };
        data[4000] ^= 1;
        let b = { let mut h = Hasher::new(); h.update(&data); h.finish("x") };
        assert_ne!(a.xxh3, b.xxh3);
    }
}
