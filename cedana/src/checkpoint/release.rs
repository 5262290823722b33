//! Reading staged images and freeing them as they are read.
//!
//! Once a page image is in the archive, its staged copy is only in the way: punching it out of the file
//! (fallocate `PUNCH_HOLE`) frees its blocks and page cache at once, so the archive reuses that memory
//! instead of memory the system has not touched lately (on a VM, several times slower to fill).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Release (punch out) what has been read of a file every this many bytes.
const RELEASE_EVERY: u64 = 8 << 20;

/// A file reader that, when asked to, punches out of the file what it has read so far, freeing its blocks
/// and page cache. Filesystems without hole punching just keep the data.
pub struct ReleasingReader {
    pub file: File,
    release: bool,
    read_to: u64,
    released_to: u64,
}

impl ReleasingReader {
    /// Open `path` for reading (and, to release, writing: punching a hole needs it).
    pub fn open(path: &Path, release: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(release).open(path)?;
        Ok(Self { file, release, read_to: 0, released_to: 0 })
    }

    fn release_read(&mut self) {
        use nix::fcntl::{fallocate, FallocateFlags};
        let len = self.read_to - self.released_to;
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let (Ok(offset), Ok(len)) = (i64::try_from(self.released_to), i64::try_from(len)) else { return };
        match fallocate(&self.file, flags, offset, len) {
            Ok(()) => self.released_to = self.read_to,
            Err(errno) => {
                tracing::debug!(%errno, "cannot punch holes here; sources are kept until the end");
                self.release = false;
            }
        }
    }
}

impl Read for ReleasingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read_to += n as u64;
        if self.release && (self.read_to - self.released_to >= RELEASE_EVERY || (n == 0 && self.read_to > self.released_to)) {
            self.release_read();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn what_was_read_is_freed_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 249) as u8 + 1).collect();
        for release in [false, true] {
            let path = dir.path().join(format!("pages-{release}.img"));
            std::fs::write(&path, &data).unwrap();
            let mut r = ReleasingReader::open(&path, release).unwrap();
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert!(back == data, "the reader returns the file as it was");
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), data.len() as u64, "the size stays");
            let on_disk = std::fs::read(&path).unwrap();
            if release {
                assert!(on_disk.iter().all(|b| *b == 0), "punched out");
                assert!(meta.blocks() * 512 < 1 << 20, "blocks freed: {} bytes left", meta.blocks() * 512);
            } else {
                assert!(on_disk == data, "kept");
            }
        }
    }
}
