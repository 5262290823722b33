//! The order in which a restored program first touched its memory: the blocks it faulted on during a lazy
//! restore, in the order it did, recorded by the lazy-pages handler and kept for the next lazy restores of
//! the same checkpoint. A program restored from one checkpoint does the same things again (a cold start
//! restores one checkpoint many times), so the next restore's background transfer brings those blocks
//! first, before the program asks for them.
//!
//! Kept as text, one block a line (`<PID at the dump> <address in hex>`), at most [`MAX_BLOCKS`] lines. It is
//! only a hint: a file that does not parse is ignored, and a block that is not missing (any more) is
//! passed over.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;

/// The most blocks recorded (at 64 KiB a block, 4 GiB of memory touched).
pub const MAX_BLOCKS: usize = 1 << 16;

/// Blocks of restored memory, in the order they were first touched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PageOrder {
    /// Each block: the process's PID at the dump and the block's start.
    pub blocks: VecDeque<(i32, u64)>,
}

impl PageOrder {
    /// Note that `pid` first touched the block at `addr` (beyond [`MAX_BLOCKS`], nothing).
    pub fn push(&mut self, pid: i32, addr: u64) {
        if self.blocks.len() < MAX_BLOCKS {
            self.blocks.push_back((pid, addr));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The order in `text`, or `None` when any line is not a block.
    pub fn parse(text: &str) -> Option<Self> {
        let mut order = Self::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()).take(MAX_BLOCKS) {
            let (pid, addr) = line.trim().split_once(' ')?;
            let addr = addr.trim().strip_prefix("0x").unwrap_or(addr.trim());
            order.blocks.push_back((pid.parse().ok()?, u64::from_str_radix(addr, 16).ok()?));
        }
        Some(order)
    }

    /// The order kept at `path`; `None` when there is none, or it does not parse (logged: it is a hint only).
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let order = Self::parse(&text);
        if order.is_none() {
            tracing::warn!(path = %path.display(), "ignoring a recorded page order that does not parse");
        }
        order
    }

    /// Keep this order at `path`, whole or not at all (written aside, then renamed into place).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        let mut out = std::io::BufWriter::new(file.as_file_mut());
        for (pid, addr) in &self.blocks {
            writeln!(out, "{pid} {addr:#x}")?;
        }
        out.flush()?;
        drop(out);
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_kept_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.order");
        let mut order = PageOrder::default();
        for (pid, addr) in [(7, 0x7f00_0000_0000u64), (7, 0x1000), (9, 0x20_0000)] {
            order.push(pid, addr);
        }
        order.save(&path).unwrap();
        assert_eq!(PageOrder::load(&path), Some(order));
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn a_damaged_order_is_no_order() {
        assert_eq!(PageOrder::parse("7 0x1000\nseven 0x2000\n"), None);
        assert_eq!(PageOrder::parse("7 0xzz\n"), None);
        assert_eq!(PageOrder::parse("7\n"), None);
        assert_eq!(PageOrder::parse("").map(|o| o.is_empty()), Some(true));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(PageOrder::load(&dir.path().join("none")), None);
    }

    #[test]
    fn recording_stops_at_its_limit() {
        let mut order = PageOrder::default();
        for i in 0..MAX_BLOCKS as u64 + 10 {
            order.push(1, i << 16);
        }
        assert_eq!(order.blocks.len(), MAX_BLOCKS);
    }
}
