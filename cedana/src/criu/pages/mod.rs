//! Where a lazy restore's pages come from: each process's pagemap ([`pagemap`]: which pages the checkpoint
//! holds and where in `pages-<ID>.img`) and a [`PageStore`] reading the page images' bytes (the checkpoint's
//! [`crate::checkpoint::lazy_store::ChunkedPages`], each chunk checked before it is served).

pub mod pagemap;
#[cfg(test)]
mod tests;

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

    /// A hint: the bytes of `pages-<pages_id>.img` at `offset` will be asked for soon (a store that reads
    /// and decodes in chunks may start on that one now, on a thread of its own). By default nothing.
    fn prefetch(&self, _pages_id: u32, _offset: u64) {}
}
