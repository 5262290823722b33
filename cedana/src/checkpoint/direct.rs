//! Local checkpoint archives written past the page cache (`O_DIRECT`), when `checkpoint.direct_writes` asks.
//!
//! The bytes go from an aligned staging buffer straight to the disk: a checkpoint of many GiB does not push
//! other programs' cached files out of memory, does not wait for the kernel to find page-cache pages for it
//! (on this VM, whose idle memory is handed back to the host, a fresh page costs a fault in the host: buffered
//! writes of 512 MiB took 0.48-2.33 s, direct ones 0.44-0.45 s), and is on disk when the dump returns
//! ([`DirectWriter::complete`]). The price: a dump then runs at the disk's speed, the workload frozen
//! meanwhile, where the page cache would have absorbed it (a cloud volume of 125-250 MB/s makes that seconds
//! per GiB), and a restore right after reads the archive from the disk. Hence off by default, as CRIU writes.
//! Only whole aligned blocks go direct; the last partial block, and bytes overwritten later (tar headers
//! patched in), go through a second, buffered descriptor of the same file, which the kernel keeps coherent
//! with the direct writes. Where the filesystem refuses direct writes (some FUSE or network filesystems),
//! every write goes through the page cache.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Alignment of direct writes: offset, length and buffer address (enough for 512-byte and 4 KiB sectors).
const ALIGN: usize = 4096;

/// Bytes staged before a direct write (a multiple of [`ALIGN`]).
const STAGE: usize = 1 << 20;

/// A file written sequentially, staged and written with `O_DIRECT` where the filesystem allows it.
pub(crate) struct DirectWriter {
    /// The file as created (buffered): patches, the last partial block, and every write once direct ones fail.
    file: File,
    /// The same file opened again with `O_DIRECT`, while direct writes work.
    direct: Option<File>,
    /// `STAGE + ALIGN` bytes, of which `STAGE` from `start` on are aligned: the bytes from `base` on.
    stage: Vec<u8>,
    start: usize,
    filled: usize,
    /// Bytes in the file before the staged ones (a multiple of [`ALIGN`] while writes go direct). Once
    /// writes go buffered nothing is staged: every byte is in the file.
    base: u64,
}

impl DirectWriter {
    /// Write `file` (empty, just created) from its start, directly where `direct` is asked for and the
    /// filesystem takes it, else through the page cache.
    pub(crate) fn new(file: File, direct: bool) -> Self {
        let direct = if direct { reopen_direct(&file) } else { None };
        let stage = if direct.is_some() { vec![0u8; STAGE + ALIGN] } else { Vec::new() };
        let start = stage.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self { file, direct, stage, start, filled: 0, base: 0 }
    }

    /// As [`DirectWriter::new`] with direct writes, but staged one byte off the alignment: the first direct
    /// write is refused as a filesystem that does not take them would.
    #[cfg(test)]
    fn misaligned(file: File) -> Self {
        let mut w = Self::new(file, true);
        w.start += 1;
        w
    }

    /// Whether writes still go past the page cache (through the staging buffer).
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Bytes written so far (staged or in the file).
    pub(crate) fn len(&self) -> u64 {
        self.base + self.filled as u64
    }

    /// Append `buf`.
    pub(crate) fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            // Buffered (from the start, or since a direct write was refused): nothing is staged.
            if self.direct.is_none() {
                self.file.write_all_at(buf, self.base)?;
                self.base += buf.len() as u64;
                return Ok(());
            }
            let n = buf.len().min(STAGE - self.filled);
            let at = self.start + self.filled;
            self.stage[at..at + n].copy_from_slice(&buf[..n]);
            self.filled += n;
            buf = &buf[n..];
            if self.filled == STAGE {
                self.write_stage(STAGE)?;
            }
        }
        Ok(())
    }

    /// Overwrite `bytes` at `at`, within what was written already.
    pub(crate) fn patch(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        let end = at + bytes.len() as u64;
        if end > self.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a patch past the end of what was written"));
        }
        // The part in the file (a buffered write into blocks written directly: the kernel reads them back first).
        let in_file = (self.base.saturating_sub(at) as usize).min(bytes.len());
        if in_file > 0 {
            self.file.write_all_at(&bytes[..in_file], at)?;
        }
        // The part still staged.
        if in_file < bytes.len() {
            let from = self.start + (at + in_file as u64 - self.base) as usize;
            self.stage[from..from + bytes.len() - in_file].copy_from_slice(&bytes[in_file..]);
        }
        Ok(())
    }

    /// Put every staged byte into the file; written directly, make it durable as well (`fdatasync`: only
    /// the last block, the patches and the metadata are left to write). Buffered, the page cache keeps it
    /// and writes it back in its own time, as for CRIU's images. Whether the data is durable.
    pub(crate) fn complete(&mut self) -> io::Result<bool> {
        let direct = self.direct.is_some();
        self.drain()?;
        if direct {
            self.file.sync_data()?;
        }
        Ok(direct)
    }

    /// Put every staged byte into the file (whole blocks directly, the last partial one buffered), without
    /// waiting for the disk: what an unfinished archive kept for the user must hold. Writes after a drain
    /// that left a partial block go through the page cache.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        let whole = self.filled / ALIGN * ALIGN;
        if whole > 0 {
            self.write_stage(whole)?;
        }
        if self.filled > 0 {
            let tail = &self.stage[self.start..self.start + self.filled];
            self.file.write_all_at(tail, self.base)?;
            self.base += self.filled as u64;
            self.filled = 0;
            // The next byte is not at a block boundary: no more direct writes.
            self.direct = None;
        }
        Ok(())
    }

    /// Write the first `n` staged bytes (a multiple of [`ALIGN`]) directly and keep the rest staged; if the
    /// direct write is refused, write every staged byte buffered, and go buffered from here on.
    fn write_stage(&mut self, n: usize) -> io::Result<()> {
        let staged = &self.stage[self.start..self.start + self.filled];
        let Some(direct) = &self.direct else {
            return Err(io::Error::other("direct writes were already given up with bytes staged"));
        };
        match direct.write_all_at(&staged[..n], self.base) {
            Ok(()) => {
                self.base += n as u64;
                self.stage.copy_within(self.start + n..self.start + self.filled, self.start);
                self.filled -= n;
            }
            // The filesystem (or this device's alignment) refuses direct writes.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "direct writes refused: writing the checkpoint through the page cache");
                self.file.write_all_at(staged, self.base)?;
                self.base += self.filled as u64;
                self.filled = 0;
                self.direct = None;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// `file` opened again with `O_DIRECT` for writing (through `/proc/self/fd`, so the same file whatever its path
/// meanwhile), or `None` where that is refused.
fn reopen_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(error = %e, "no direct I/O on this filesystem");
            None
        }
    }
}

#[cfg(test)]
/// How many of the file's pages are in the page cache (`mincore` of a mapping).
pub(crate) fn cached_pages(path: &std::path::Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of a file we opened, unmapped before returning.
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    vec.iter().filter(|b| *b & 1 == 1).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Writes of every size around the stage and the alignment, with patches behind and inside the stage,
    /// give the same file as plain writes would, directly or not.
    #[test]
    fn writes_and_patches_land_as_written() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [true, false] {
            let sizes = [1, 511, ALIGN - 1, ALIGN, ALIGN + 1, 100_000, STAGE - 3, STAGE, STAGE + 7, 3 * STAGE + 12_345];
            let path = dir.path().join(format!("f-{direct}"));
            let mut w = DirectWriter::new(File::create(&path).unwrap(), direct);
            assert_eq!(w.is_direct(), direct, "ext4 and tmpfs take direct writes");
            let mut want = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let bytes = pattern(*size, i as u8);
                w.write_all(&bytes).unwrap();
                want.extend_from_slice(&bytes);
                // A header-sized patch at a few places already written: the very start, just behind the
                // stage, straddling it, and at the last byte.
                let len = want.len() as u64;
                let places = [0, w.base.saturating_sub(100), w.base.saturating_sub(1), len.saturating_sub(700), len - 1];
                for (k, at) in places.into_iter().enumerate() {
                    let n = (len - at).min(512) as usize;
                    let patch = pattern(n, 200 + k as u8);
                    w.patch(at, &patch).unwrap();
                    want[at as usize..at as usize + n].copy_from_slice(&patch);
                }
                assert_eq!(w.len(), want.len() as u64);
            }
            assert!(w.patch(w.len() - 1, &[1, 2]).is_err(), "a patch past the end is refused");
            w.complete().unwrap();
            drop(w);
            assert_eq!(std::fs::read(&path).unwrap(), want, "direct: {direct}");
        }
    }

    /// A refused direct write (here: a misaligned buffer, as a filesystem without direct I/O refuses it) is
    /// written through the page cache, and so is everything after it: the rest of the same write and the
    /// writes that follow, in order.
    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = DirectWriter::misaligned(File::create(&path).unwrap());
        let (a, b) = (pattern(2 * STAGE + 100, 3), pattern(ALIGN + 7, 5));
        w.write_all(&a).unwrap();
        assert!(!w.is_direct());
        w.write_all(&b).unwrap();
        w.patch(10, b"patched").unwrap();
        assert!(!w.complete().unwrap(), "buffered: not synced");
        let mut want = [a, b].concat();
        want[10..17].copy_from_slice(b"patched");
        assert!(std::fs::read(&path).unwrap() == want, "every byte in order");
    }

    /// Written directly, a file of many MiB leaves only its last partial block and its patched pages in the
    /// page cache; written buffered, it is all there.
    #[test]
    fn a_directly_written_file_stays_out_of_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [true, false] {
            let path = dir.path().join(format!("f-{direct}"));
            let mut w = DirectWriter::new(File::create(&path).unwrap(), direct);
            w.write_all(&pattern(8 * STAGE + 1000, 4)).unwrap();
            w.patch(0, &[7; 512]).unwrap();
            w.complete().unwrap();
            drop(w);
            let cached = cached_pages(&path);
            let pages = (8 * STAGE + 1000).div_ceil(4096);
            if direct {
                assert!(cached <= 2, "{cached} of {pages} pages cached");
            } else {
                assert!(cached > pages / 2, "{cached} of {pages} pages cached");
            }
        }
    }

    /// What `drain` leaves in the file is every byte written, the last partial block included, and writing
    /// goes on after it.
    #[test]
    fn drain_leaves_every_byte_in_the_file_and_writing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = DirectWriter::new(File::create(&path).unwrap(), true);
        let a = pattern(ALIGN * 3 + 5, 1);
        w.write_all(&a).unwrap();
        w.drain().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), a);
        let b = pattern(STAGE + 9, 2);
        w.write_all(&b).unwrap();
        w.complete().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [a, b].concat());
    }
}
