//! Byte buffers used over and over by the block-parallel codecs, instead of one fresh allocation per block.
//!
//! A fresh multi-MiB buffer costs a page fault and a zeroed page for every 4 KiB of it (the allocator hands
//! such sizes back to the kernel when freed): on a 1 GiB checkpoint that was a fifth of the codec threads'
//! time. A pool keeps a few buffers, as they were: their length stays what it was (the bytes in them are
//! initialized), so reusing one zeroes nothing.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// A few buffers kept for reuse.
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` buffers (more given back are freed).
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(Self { free: Mutex::new(Vec::with_capacity(keep)), keep })
    }

    /// A buffer as it was given back (any length), or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        self.free.lock().ok().and_then(|mut f| f.pop()).unwrap_or_default()
    }

    /// A buffer of exactly `len` initialized bytes (a reused one, truncated or zero-extended; else a new one).
    pub fn take_len(&self, len: usize) -> Vec<u8> {
        let mut buf = self.take();
        buf.resize(len, 0);
        buf
    }

    /// Keep `buf` for a later `take` (or free it, when the pool is full).
    pub fn give(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.lock() {
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }

    /// Wrap `buf` so that it comes back to this pool when dropped.
    pub fn lend(self: &Arc<Self>, buf: Vec<u8>) -> Pooled {
        Pooled { buf, pool: Some(Arc::clone(self)) }
    }
}

/// Give allocations of 4 MiB and more (the pools' 8 MiB blocks and units, the writers' buffers) mappings of
/// their own, which go back to the system when freed, whichever thread frees them. For long-lived front ends
/// (the daemon): a pool lives for one operation, so mapping its buffers costs a page fault per page once per
/// operation; left to glibc's moving threshold, they land in the arenas of the threads that freed them, and a
/// daemon running operation after operation on many threads kept a growing share of them resident.
pub fn map_large_allocations() {
    // SAFETY: mallopt only sets an allocator parameter.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) } != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused: large buffers stay in the arenas");
    }
}

/// A buffer that goes back to its pool when dropped (or is simply freed, when it has none).
pub struct Pooled {
    buf: Vec<u8>,
    pool: Option<Arc<BufPool>>,
}

impl Pooled {
    /// A buffer of no pool.
    #[cfg(test)]
    pub fn unpooled(buf: Vec<u8>) -> Self {
        Self { buf, pool: None }
    }
}

impl Deref for Pooled {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_as_they_were_and_the_pool_keeps_only_so_many() {
        let pool = BufPool::new(1);
        let mut a = pool.take_len(8);
        a.copy_from_slice(b"abcdefgh");
        let ptr = a.as_ptr();
        pool.give(a);
        pool.give(vec![1, 2, 3]); // beyond `keep`: freed
        let b = pool.take_len(4);
        assert_eq!((b.as_ptr(), &b[..]), (ptr, &b"abcd"[..]), "the same buffer, truncated, not zeroed");
        drop(pool.lend(b));
        let back = pool.take();
        assert_eq!(back.as_ptr(), ptr, "a lent buffer comes back when dropped");
        assert!(pool.take_len(2) == [0, 0], "an empty pool makes a new, zeroed buffer");
        drop(Pooled::unpooled(vec![5; 3]));
        assert!(pool.free.lock().unwrap().is_empty(), "a buffer of no pool goes to none");
    }
}
