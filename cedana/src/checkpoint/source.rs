//! Where a checkpoint archive's bytes are read from, by range: a local file, or an object in a store.
//!
//! A streamed restore reads an archive out of order (the small images at its end first, then each page
//! image where its index says it starts), so a source answers ranged reads rather than one front-to-back
//! stream.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An archive's bytes, readable at any offset, from any thread.
pub trait ArchiveSource: Send + Sync {
    /// Where it is, for messages (a path, or a URL without credentials).
    fn location(&self) -> &str;

    /// Its size in bytes.
    fn len(&self) -> u64;

    /// Whether it holds no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` with the bytes at `offset` (an error if the archive ends before).
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The bytes from `offset` to the end, as a stream (read ahead in large pieces where that pays).
    fn read_from(&self, offset: u64) -> io::Result<Box<dyn Read + Send>>;

    /// Hand the `len` bytes at `offset` to `each`, in order, in the pieces they arrive in: for a source whose
    /// bytes come over time (a network), so that the caller works on the first while the rest are under way
    /// and holds no buffer of its own for them. The first error (of the source or of `each`) ends it. `None`
    /// where the source does not read this way (a local file: [`Self::read_exact_at`] is as quick).
    fn read_in_pieces(&self, _offset: u64, _len: u64, _each: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Option<io::Result<()>> {
        None
    }
}

/// Whether `e`, met reading a source, is the source's own failure (an object store that could not be
/// reached, or answered only errors) rather than a sign of what the archive holds: such a failure says
/// nothing of the checkpoint, and is reported as it is, never as damage.
pub(crate) fn is_source_failure(e: &io::Error) -> bool {
    #[cfg(feature = "storage")]
    {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as &(dyn std::error::Error + 'static));
        while let Some(err) = cur {
            if err.is::<crate::storage::StorageError>() {
                return true;
            }
            cur = match err.downcast_ref::<io::Error>() {
                Some(io) => io.get_ref().map(|i| i as &(dyn std::error::Error + 'static)),
                None => err.source(),
            };
        }
    }
    #[cfg(not(feature = "storage"))]
    let _ = e;
    false
}

/// An archive in a local file.
pub struct LocalSource {
    file: File,
    len: u64,
    location: String,
    path: PathBuf,
}

impl LocalSource {
    /// Open the archive at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self { file, len, location: path.display().to_string(), path: path.to_path_buf() })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ArchiveSource for LocalSource {
    fn location(&self) -> &str {
        &self.location
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_from(&self, offset: u64) -> io::Result<Box<dyn Read + Send>> {
        // A descriptor of its own, so that streams from several offsets can be read at once.
        let mut file = File::open(&self.path)?;
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset))?;
        Ok(Box::new(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_read_at_offsets_and_as_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, b"0123456789").unwrap();
        let src = LocalSource::open(&path).unwrap();
        assert_eq!(src.len(), 10);
        let mut buf = [0u8; 3];
        src.read_exact_at(4, &mut buf).unwrap();
        assert_eq!(&buf, b"456");
        assert!(src.read_exact_at(9, &mut buf).is_err(), "past the end");
        let (mut a, mut b) = (src.read_from(2).unwrap(), src.read_from(7).unwrap());
        let (mut sa, mut sb) = (String::new(), String::new());
        a.read_to_string(&mut sa).unwrap();
        b.read_to_string(&mut sb).unwrap();
        assert_eq!((sa.as_str(), sb.as_str()), ("23456789", "789"));
    }
}
