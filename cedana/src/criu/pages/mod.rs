//! Where a lazy restore's pages come from: each process's pagemap ([`pagemap`]: which pages the checkpoint
//! holds and where in `pages-<ID>.img`) and a [`PageStore`] reading the page images' bytes (a page image in a
//! folder, in place in an uncompressed archive, or by chunks of a compressed one or an object in a store).

pub mod pagemap;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

/// Where the bytes of the page images are.
pub trait PageStore: Send + Sync {
    /// Fill `buf` with the bytes of `pages-<pages_id>.img` from `offset` on.
    fn read_at(&self, pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// Hand `len` bytes of `pages-<pages_id>.img` from `offset` on to `each`, in order, piece by piece (a
    /// store holding them in memory lends its own bytes, so they are not copied on the way); `each` returns
    /// `false` to stop. By default one piece, read into `buf`.
    fn each_piece(
        &self,
        pages_id: u32,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
        each: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        buf.resize(len, 0);
        self.read_at(pages_id, offset, buf)?;
        each(buf);
        Ok(())
    }
}

/// Page images in files: each at an offset of a file (a folder's `pages-N.img` at 0, or the entry's data in
/// an uncompressed archive).
pub struct FilePages {
    files: HashMap<u32, (Arc<std::fs::File>, u64)>,
}

impl FilePages {
    /// No page images yet.
    pub fn new() -> Self {
        Self { files: HashMap::new() }
    }

    /// `pages-<pages_id>.img` starts at `base` in `file`.
    pub fn insert(&mut self, pages_id: u32, file: Arc<std::fs::File>, base: u64) {
        self.files.insert(pages_id, (file, base));
    }
}

impl Default for FilePages {
    fn default() -> Self {
        Self::new()
    }
}

impl FilePages {
    fn file(&self, pages_id: u32) -> std::io::Result<&(Arc<std::fs::File>, u64)> {
        self.files
            .get(&pages_id)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no pages-{pages_id}.img")))
    }
}

impl PageStore for FilePages {
    fn read_at(&self, pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (file, base) = self.file(pages_id)?;
        file.read_exact_at(buf, base + offset)
    }
}
