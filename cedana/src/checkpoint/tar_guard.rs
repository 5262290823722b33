//! A guard in front of the tar reader. The `tar` crate reads an extension entry (a GNU long name or link,
//! PAX attributes) whole into memory before the entry it describes, whatever size its header declares: a
//! few compressed bytes could make it allocate gigabytes. This reader follows the stream's headers as the
//! bytes go by and refuses such an entry beyond a small size, and the kinds our writer never makes whose
//! layout the guard could not follow (PAX attributes, which may change an entry's size; GNU sparse files).

use std::io::{self, Read};

/// Largest extension entry accepted (a GNU long name: a path).
pub(crate) const MAX_EXTENSION: u64 = 64 << 10;

/// A tar stream from `inner`, refused (InvalidData) at the first header the guard does not accept.
pub(crate) struct TarGuard<R> {
    inner: R,
    /// Bytes of the stream so far.
    pos: u64,
    /// Where the next header starts.
    next_header: u64,
    block: [u8; 512],
    filled: usize,
    /// Past the end of the archive (or a header the tar reader itself refuses): nothing more to follow.
    done: bool,
}

impl<R: Read> TarGuard<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner, pos: 0, next_header: 0, block: [0; 512], filled: 0, done: false }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    fn inspect(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() && !self.done {
            if self.pos < self.next_header {
                let skip = usize::try_from(self.next_header - self.pos).unwrap_or(usize::MAX).min(data.len());
                self.pos += skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (512 - self.filled).min(data.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            self.pos += take as u64;
            data = &data[take..];
            if self.filled == 512 {
                self.filled = 0;
                self.check_header()?;
            }
        }
        Ok(())
    }

    fn check_header(&mut self) -> io::Result<()> {
        if self.block.iter().all(|b| *b == 0) {
            self.done = true;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let Ok(size) = header.entry_size() else {
            // The tar reader refuses this header itself.
            self.done = true;
            return Ok(());
        };
        let kind = header.entry_type();
        let refuse = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, what));
        if kind.is_pax_local_extensions() || kind.is_pax_global_extensions() {
            return refuse("a PAX extended header, which checkpoints do not hold".into());
        }
        if kind.is_gnu_sparse() {
            return refuse("a GNU sparse entry, which checkpoints do not hold".into());
        }
        if (kind.is_gnu_longname() || kind.is_gnu_longlink()) && size > MAX_EXTENSION {
            return refuse(format!("a long name of {size} bytes"));
        }
        let padded = size.div_ceil(512).saturating_mul(512);
        self.next_header = self.pos.saturating_add(padded);
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.inspect(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_path("x").unwrap();
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn read_all(bytes: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let mut guard = TarGuard::new(bytes);
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = guard.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn ordinary_entries_pass_through_whatever_the_read_sizes() {
        let mut tar = header(tar::EntryType::Regular, 700);
        tar.extend(vec![7u8; 1024]);
        tar.extend(header(tar::EntryType::GNULongName, 600));
        tar.extend(vec![b'a'; 1024]);
        tar.extend(header(tar::EntryType::Regular, 0));
        tar.extend([0u8; 1024]);
        tar.extend(b"trailer after the end");
        for chunk in [1, 7, 512, 4096] {
            assert_eq!(read_all(&tar, chunk).unwrap(), tar, "reads of {chunk}");
        }
    }

    #[test]
    fn large_extensions_pax_and_sparse_entries_are_refused() {
        // A regular entry whose data looks like a PAX header, then a huge long name: the data is skipped, the
        // header after it found.
        let mut tar = header(tar::EntryType::Regular, 5);
        tar.extend(header(tar::EntryType::XHeader, 10));
        tar.extend(header(tar::EntryType::GNULongName, 1 << 40));
        let err = read_all(&tar, 100).unwrap_err();
        assert!(err.to_string().contains("a long name of 1099511627776 bytes"), "{err}");
        for (kind, what) in
            [(tar::EntryType::XHeader, "PAX"), (tar::EntryType::XGlobalHeader, "PAX"), (tar::EntryType::GNUSparse, "sparse")]
        {
            let err = read_all(&header(kind, 10), 512).unwrap_err();
            assert!(err.to_string().contains(what), "{kind:?}: {err}");
        }
    }
}
