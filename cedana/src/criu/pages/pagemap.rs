//! CRIU's `pagemap-<PID>.img`: which of a process's pages the checkpoint holds, and where their bytes are in
//! `pages-<ID>.img`. The image is the common magic, the pagemap magic, then entries (a u32 length and a
//! protobuf message each): a `pagemap_head` naming the pages image, then one `pagemap_entry` per run of
//! pages. The bytes of the entries with `PE_PRESENT` follow one another in the pages image, in order.

use prost::Message;

/// A pagemap image that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("pagemap image: {0}")]
pub struct PagemapError(String);

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Pages whose data is in the parent checkpoint (incremental dumps).
pub const PE_PARENT: u32 = 1 << 0;
/// Pages a lazy restore leaves for the lazy-pages handler to fill.
pub const PE_LAZY: u32 = 1 << 1;
/// Pages whose bytes are in the pages image.
pub const PE_PRESENT: u32 = 1 << 2;

/// Page size of the processes CRIU checkpoints here.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Clone, PartialEq, Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// A run of pages with their bytes in the pages image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub vaddr: u64,
    pub nr_pages: u64,
    /// Where its bytes start in the pages image.
    pub offset: u64,
    /// Left to the lazy-pages handler by a lazy restore (`PE_LAZY`); the restore itself reads the others.
    pub lazy: bool,
}

impl Extent {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }

    fn end(&self) -> u64 {
        self.vaddr + self.len()
    }
}

/// One process's pagemap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// The pages image holding the bytes: `pages-<pages_id>.img`.
    pub pages_id: u32,
    /// The runs with bytes in that image, by address.
    pub extents: Vec<Extent>,
}

impl Pagemap {
    /// Decode a pagemap image.
    pub fn decode(bytes: &[u8]) -> Result<Pagemap, PagemapError> {
        let bad = PagemapError;
        let word = |at: usize| -> Result<u32, PagemapError> {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad(format!("truncated at byte {at}")))
        };
        if word(0)? != IMG_COMMON_MAGIC || word(4)? != PAGEMAP_MAGIC {
            return Err(bad("bad magic (not a CRIU pagemap image)".into()));
        }
        let mut at = 8;
        let mut next = || -> Result<Option<&[u8]>, PagemapError> {
            if at == bytes.len() {
                return Ok(None);
            }
            let len = word(at)? as usize;
            let body = bytes.get(at + 4..at + 4 + len).ok_or_else(|| bad(format!("entry at byte {at} is truncated")))?;
            at += 4 + len;
            Ok(Some(body))
        };
        let head = next()?.ok_or_else(|| bad("no head".into()))?;
        let head = PagemapHead::decode(head).map_err(|e| bad(format!("head: {e}")))?;
        let mut extents = Vec::new();
        let mut offset = 0u64;
        while let Some(body) = next()? {
            let e = PagemapEntry::decode(body).map_err(|e| bad(format!("entry: {e}")))?;
            let flags = e.flags.unwrap_or(if e.in_parent == Some(true) { PE_PARENT } else { PE_PRESENT });
            let nr_pages = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
            if flags & PE_PRESENT == 0 {
                continue;
            }
            let extent = Extent { vaddr: e.vaddr, nr_pages, offset, lazy: flags & PE_LAZY != 0 };
            offset += extent.len();
            extents.push(extent);
        }
        extents.sort_by_key(|e| e.vaddr);
        Ok(Pagemap { pages_id: head.pages_id, extents })
    }

    /// The run holding the page at `vaddr`, and the number of its pages from there to its end.
    pub fn find(&self, vaddr: u64) -> Option<(&Extent, u64)> {
        let i = self.extents.partition_point(|e| e.end() <= vaddr);
        let e = self.extents.get(i).filter(|e| e.vaddr <= vaddr)?;
        Some((e, (e.end() - vaddr) / PAGE_SIZE))
    }
}

#[cfg(test)]
pub(crate) fn encode_for_tests(pages_id: u32, entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(IMG_COMMON_MAGIC.to_le_bytes());
    out.extend(PAGEMAP_MAGIC.to_le_bytes());
    let mut push = |m: Vec<u8>| {
        out.extend((m.len() as u32).to_le_bytes());
        out.extend(m);
    };
    push(PagemapHead { pages_id }.encode_to_vec());
    for &(vaddr, nr, flags) in entries {
        push(PagemapEntry { vaddr, compat_nr_pages: 0, in_parent: None, flags: Some(flags), nr_pages: Some(nr) }.encode_to_vec());
    }
    out
}
