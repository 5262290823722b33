//! Cutting an archive's bytes into the fixed-size parts of a multipart upload, and keeping back the parts
//! that hold a range still to be patched. Pure bookkeeping: no I/O (the sink uploads what this hands out).
//!
//! Parts grow with the upload (see [`PartLayout`]): the first thousand are `part_size` bytes, the next thousand
//! twice that, and so on, so that a small part size bounds memory without bounding the archive (S3 allows
//! 10,000 parts). Every part but the last is full. A hold at
//! offset `at` keeps back the parts holding `at .. at + MAX_PATCH` (one, or two when the range straddles
//! a boundary) until [`PartBuffer::patch`] at `at` releases it. `at` may lie beyond the bytes written so far:
//! the parts are kept back when they fill.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The longest patch a hold covers: a tar header slot (1024 bytes, see `codec::units::header_slot`).
pub const MAX_PATCH: usize = 1024;
/// The most parts a multipart upload may have (S3 and GCS).
pub const MAX_PARTS: u64 = 10_000;

/// Why a patch could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PatchError {
    /// Longer than [`MAX_PATCH`].
    TooLong(usize),
    /// Some of the bytes were not written yet.
    NotWritten { end: u64, written: u64 },
    /// Part `0` of the range was handed out for upload already (it was not held).
    Uploaded(usize),
}

impl std::fmt::Display for PatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PatchError::TooLong(n) => write!(f, "a patch of {n} bytes is longer than the {MAX_PATCH} bytes a hold keeps back"),
            PatchError::NotWritten { end, written } => {
                write!(f, "a patch up to offset {end} covers bytes not written yet (only {written} were)")
            }
            PatchError::Uploaded(part) => {
                write!(f, "a patch lands in part {part}, which was uploaded already: hold the range before writing past it")
            }
        }
    }
}

/// Parts of one size before the size doubles.
const PARTS_PER_SIZE: usize = 1000;

/// Where each part of an upload starts and how long it is: parts `0..1000` of the base size, `1000..2000` of
/// twice that, doubling every thousand parts while the size stays within S3's largest part.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartLayout {
    base: u64,
}

impl PartLayout {
    pub(crate) fn new(base: usize) -> Self {
        Self { base: base.max(1) as u64 }
    }

    /// The size of the parts of tier `tier` (parts `tier * 1000 ..`).
    fn tier_size(&self, tier: usize) -> u64 {
        let mut size = self.base;
        for _ in 0..tier {
            if size * 2 > super::MAX_PART_SIZE as u64 {
                break;
            }
            size *= 2;
        }
        size
    }

    /// The size of part `part`.
    pub(crate) fn size(&self, part: usize) -> usize {
        // At most MAX_PART_SIZE (5 GiB) once past the base, which is checked against it: fits in usize.
        self.tier_size(part / PARTS_PER_SIZE) as usize
    }

    /// The offset of the first byte of part `part`.
    pub(crate) fn start(&self, part: usize) -> u64 {
        let full_tiers = part / PARTS_PER_SIZE;
        let whole: u64 = (0..full_tiers).map(|t| PARTS_PER_SIZE as u64 * self.tier_size(t)).sum();
        whole + (part % PARTS_PER_SIZE) as u64 * self.tier_size(full_tiers)
    }

    /// The index of the part holding byte `offset`.
    pub(crate) fn part_of(&self, offset: u64) -> usize {
        let mut tier_start = 0u64;
        let mut tier = 0;
        loop {
            let size = self.tier_size(tier);
            let tier_len = PARTS_PER_SIZE as u64 * size;
            if offset < tier_start + tier_len {
                // Below PARTS_PER_SIZE: fits in usize.
                return tier * PARTS_PER_SIZE + ((offset - tier_start) / size) as usize;
            }
            tier_start += tier_len;
            tier += 1;
        }
    }

    /// The most bytes an upload of [`MAX_PARTS`] parts holds.
    pub(crate) fn capacity(&self) -> u64 {
        self.start(MAX_PARTS as usize)
    }
}

/// The bytes of an upload not handed out yet: the part being filled, full parts kept back by holds, and full
/// parts ready to upload.
pub(crate) struct PartBuffer {
    layout: PartLayout,
    /// Bytes written in all.
    written: u64,
    /// The part being filled: the one holding offset `written` (its bytes up to `written`).
    current: Vec<u8>,
    /// Full parts kept back by a hold.
    kept: BTreeMap<usize, Vec<u8>>,
    /// Full parts free to upload, in order.
    ready: VecDeque<(usize, Vec<u8>)>,
    /// Offsets held and not patched yet.
    holds: BTreeSet<u64>,
}

impl PartBuffer {
    /// An empty upload in parts of `part_size` bytes (growing as [`PartLayout`] says).
    pub(crate) fn new(part_size: usize) -> Self {
        Self {
            layout: PartLayout::new(part_size),
            written: 0,
            current: Vec::new(),
            kept: BTreeMap::new(),
            ready: VecDeque::new(),
            holds: BTreeSet::new(),
        }
    }

    /// Bytes written in all.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Full parts kept back by holds.
    pub(crate) fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Offsets held and not patched yet.
    pub(crate) fn open_holds(&self) -> usize {
        self.holds.len()
    }

    /// The index of the part holding byte `offset`.
    pub(crate) fn part_of(&self, offset: u64) -> usize {
        self.layout.part_of(offset)
    }

    /// The parts a hold at `at` keeps back.
    fn held_by(&self, at: u64) -> std::ops::RangeInclusive<usize> {
        self.part_of(at)..=self.part_of(at + MAX_PATCH as u64 - 1)
    }

    fn is_held(&self, part: usize) -> bool {
        // Holds start at most MAX_PATCH before the part's end: only those near it can cover it.
        let start = self.layout.start(part).saturating_sub(MAX_PATCH as u64);
        self.holds.range(start..).take_while(|&&at| self.part_of(at) <= part).any(|&at| self.held_by(at).contains(&part))
    }

    /// How many of `len` more bytes fit before the upload would exceed [`MAX_PARTS`].
    pub(crate) fn room(&self, len: usize) -> usize {
        self.layout.capacity().saturating_sub(self.written).min(len as u64) as usize
    }

    /// Append bytes, up to the end of the current part; returns how many were taken. A part that fills
    /// becomes ready (or kept, when held).
    pub(crate) fn write(&mut self, buf: &[u8]) -> usize {
        let size = self.layout.size(self.part_of(self.written));
        let n = buf.len().min(size - self.current.len());
        if self.current.capacity() == 0 {
            self.current.reserve_exact(size);
        }
        self.current.extend_from_slice(&buf[..n]);
        self.written += n as u64;
        if self.current.len() == size {
            let part = self.part_of(self.written - 1);
            let data = std::mem::take(&mut self.current);
            if self.is_held(part) {
                self.kept.insert(part, data);
            } else {
                self.ready.push_back((part, data));
            }
        }
        n
    }

    /// The bytes from `at` on (up to [`MAX_PATCH`] of them) will be patched: keep their parts back.
    pub(crate) fn hold(&mut self, at: u64) {
        self.holds.insert(at);
        // Full parts of the range that are ready but not handed out go back to being kept.
        let range = self.held_by(at);
        let (back, stay): (Vec<_>, Vec<_>) = self.ready.drain(..).partition(|(p, _)| range.contains(p));
        self.ready = stay.into();
        self.kept.extend(back);
    }

    /// Overwrite `bytes` at `at` (all written already, in parts not handed out), and release the hold at
    /// `at`: parts no other hold keeps become ready.
    pub(crate) fn patch(&mut self, at: u64, bytes: &[u8]) -> Result<(), PatchError> {
        if bytes.len() > MAX_PATCH {
            return Err(PatchError::TooLong(bytes.len()));
        }
        let end = at + bytes.len() as u64;
        if end > self.written {
            return Err(PatchError::NotWritten { end, written: self.written });
        }
        let current_part = self.part_of(self.written);
        let mut pos = at;
        // Check every part first, so that a refused patch changes nothing.
        while pos < end {
            let part = self.part_of(pos);
            if part != current_part && !self.kept.contains_key(&part) && !self.ready.iter().any(|(p, _)| *p == part) {
                return Err(PatchError::Uploaded(part));
            }
            pos = self.layout.start(part + 1);
        }
        let mut pos = at;
        while pos < end {
            let part = self.part_of(pos);
            let start = self.layout.start(part);
            let take = (self.layout.start(part + 1).min(end) - pos) as usize;
            let src = &bytes[(pos - at) as usize..][..take];
            let within = (pos - start) as usize;
            let data = if part == current_part {
                &mut self.current
            } else if let Some(d) = self.kept.get_mut(&part) {
                d
            } else {
                // Checked above: it is ready.
                match self.ready.iter_mut().find(|(p, _)| *p == part) {
                    Some((_, d)) => d,
                    None => return Err(PatchError::Uploaded(part)),
                }
            };
            data[within..within + take].copy_from_slice(src);
            pos += take as u64;
        }
        if self.holds.remove(&at) {
            let released: Vec<usize> = self.kept.keys().copied().filter(|&p| !self.is_held(p)).collect();
            for part in released {
                if let Some(data) = self.kept.remove(&part) {
                    self.ready.push_back((part, data));
                }
            }
            self.ready.make_contiguous().sort_by_key(|(p, _)| *p);
        }
        Ok(())
    }

    /// The next part free to upload.
    pub(crate) fn take_ready(&mut self) -> Option<(usize, Vec<u8>)> {
        self.ready.pop_front()
    }

    /// Everything not handed out yet, in order, holds or not: the kept parts, then the last part (not full;
    /// left out when empty, unless it is the only part). Nothing can be written after this.
    pub(crate) fn finish(&mut self) -> Vec<(usize, Vec<u8>)> {
        let mut out: Vec<_> = self.ready.drain(..).collect();
        out.extend(std::mem::take(&mut self.kept));
        if !self.current.is_empty() {
            out.push((self.part_of(self.written), std::mem::take(&mut self.current)));
        }
        out.sort_by_key(|(p, _)| *p);
        self.holds.clear();
        out
    }

    /// The number of parts of the whole upload once finished (0 for an empty one).
    pub(crate) fn total_parts(&self) -> usize {
        match self.written {
            0 => 0,
            n => self.part_of(n - 1) + 1,
        }
    }

    /// The size of the parts now being filled.
    pub(crate) fn part_size_now(&self) -> usize {
        self.layout.size(self.part_of(self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 16 * 1024;

    fn write_all(b: &mut PartBuffer, mut buf: &[u8]) {
        while !buf.is_empty() {
            let n = b.write(buf);
            buf = &buf[n..];
        }
    }

    fn drain(b: &mut PartBuffer) -> Vec<usize> {
        std::iter::from_fn(|| b.take_ready())
            .map(|(p, d)| {
                assert_eq!(d.len(), PS, "handed-out parts are full");
                p
            })
            .collect()
    }

    #[test]
    fn full_parts_go_out_in_order_and_the_last_one_at_the_end() {
        let mut b = PartBuffer::new(PS);
        write_all(&mut b, &vec![1u8; PS * 2 + 100]);
        assert_eq!(drain(&mut b), [0, 1]);
        assert_eq!(b.written(), (PS * 2 + 100) as u64);
        let rest = b.finish();
        assert_eq!(rest.iter().map(|(p, d)| (*p, d.len())).collect::<Vec<_>>(), [(2, 100)]);
        assert_eq!(b.total_parts(), 3);
        let mut exact = PartBuffer::new(PS);
        write_all(&mut exact, &vec![1u8; PS]);
        assert_eq!(drain(&mut exact), [0]);
        assert!(exact.finish().is_empty(), "no empty last part");
        assert_eq!(PartBuffer::new(PS).finish().len(), 0);
    }

    #[test]
    fn a_hold_beyond_the_written_bytes_keeps_its_parts_until_patched() {
        let mut b = PartBuffer::new(PS);
        write_all(&mut b, &[0u8; 100]);
        // Straddles the boundary of parts 2 and 3; announced before any of it arrived.
        let at = (3 * PS - 300) as u64;
        b.hold(at);
        write_all(&mut b, &vec![0u8; 5 * PS]);
        assert_eq!(drain(&mut b), [0, 1, 4], "parts 2 and 3 kept back");
        assert_eq!(b.kept(), 2);
        let patch: Vec<u8> = (0..MAX_PATCH).map(|i| i as u8).collect();
        b.patch(at, &patch).unwrap();
        assert_eq!(b.kept(), 0);
        let released: Vec<_> = std::iter::from_fn(|| b.take_ready()).collect();
        assert_eq!(released.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(&released[0].1[PS - 300..], &patch[..300]);
        assert_eq!(&released[1].1[..MAX_PATCH - 300], &patch[300..]);
        assert_eq!(b.open_holds(), 0);
    }

    #[test]
    fn patches_in_the_current_part_and_overlapping_holds() {
        let mut b = PartBuffer::new(PS);
        write_all(&mut b, &[0u8; 10]);
        b.hold(10);
        b.hold((PS - 10) as u64);
        write_all(&mut b, &vec![0u8; PS + 10]);
        assert!(drain(&mut b).is_empty(), "part 0 is held twice");
        b.patch(10, b"xy").unwrap();
        assert!(drain(&mut b).is_empty(), "still held by the second hold");
        b.patch((PS - 10) as u64, &[7u8; 20]).unwrap();
        assert_eq!(drain(&mut b), [0]);
        // A patch of the part being filled needs no hold.
        b.patch((PS + 2) as u64, b"zz").unwrap();
        let rest = b.finish();
        assert_eq!(rest[0].0, 1);
        assert_eq!(&rest[0].1[..6], &[7, 7, b'z', b'z', 7, 7]);
    }

    #[test]
    fn bad_patches_are_refused_and_change_nothing() {
        let mut b = PartBuffer::new(PS);
        write_all(&mut b, &vec![0u8; 2 * PS + 5]);
        assert_eq!(drain(&mut b), [0, 1]);
        assert_eq!(b.patch(0, &[1; 4]), Err(PatchError::Uploaded(0)));
        assert_eq!(
            b.patch((2 * PS) as u64, &[1; 10]),
            Err(PatchError::NotWritten { end: (2 * PS + 10) as u64, written: (2 * PS + 5) as u64 })
        );
        assert_eq!(b.patch(0, &[1; MAX_PATCH + 1]), Err(PatchError::TooLong(MAX_PATCH + 1)));
        assert!(b.patch((2 * PS - 2) as u64, &[1; 4]).unwrap_err().to_string().contains("uploaded already"));
    }

    #[test]
    fn a_hold_pulls_back_a_ready_part_not_yet_handed_out() {
        let mut b = PartBuffer::new(PS);
        write_all(&mut b, &vec![0u8; PS + 1]);
        b.hold(5);
        assert!(b.take_ready().is_none());
        b.patch(5, b"abc").unwrap();
        let (p, d) = b.take_ready().unwrap();
        assert_eq!((p, &d[5..8]), (0, &b"abc"[..]));
    }

    #[test]
    fn finish_hands_out_kept_parts_even_when_never_patched() {
        let mut b = PartBuffer::new(PS);
        b.hold(0);
        write_all(&mut b, &vec![0u8; 3 * PS]);
        assert_eq!(drain(&mut b), [1, 2]);
        let rest = b.finish();
        assert_eq!(rest.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [0]);
        assert_eq!(b.open_holds(), 0);
    }

    #[test]
    fn room_stops_at_the_part_limit() {
        let b = PartBuffer::new(PS);
        assert_eq!(b.room(10), 10);
        let mut full = PartBuffer::new(PS);
        full.written = PartLayout::new(PS).capacity() - 3;
        assert_eq!(full.room(10), 3);
    }

    #[test]
    fn parts_double_every_thousand_and_tile_the_upload() {
        let l = PartLayout::new(5 << 20);
        assert_eq!(
            (l.size(0), l.size(999), l.size(1000), l.size(2999), l.size(3000)),
            (5 << 20, 5 << 20, 10 << 20, 20 << 20, 40 << 20)
        );
        for part in [0, 1, 998, 999, 1000, 1001, 4321, 9999] {
            assert_eq!(l.start(part + 1), l.start(part) + l.size(part) as u64, "part {part} ends where the next starts");
            assert_eq!(l.part_of(l.start(part)), part);
            assert_eq!(l.part_of(l.start(part + 1) - 1), part);
        }
        // 10,000 parts hold almost S3's largest object (5 TiB), not 10,000 of the first size (49 GiB); no
        // part is larger than S3 allows.
        assert!(l.capacity() > 4 << 40, "{}", l.capacity());
        assert!((0..MAX_PARTS as usize).step_by(500).all(|p| l.size(p) <= crate::storage::MAX_PART_SIZE));
        let big = PartLayout::new(crate::storage::MAX_PART_SIZE);
        assert_eq!(big.size(5000), crate::storage::MAX_PART_SIZE, "never beyond the largest part");
    }

    #[test]
    fn an_upload_past_the_first_thousand_parts_is_cut_in_larger_parts() {
        let mut b = PartBuffer::new(16);
        write_all(&mut b, &vec![3u8; 1000 * 16 + 32 + 5]);
        let parts: Vec<_> = std::iter::from_fn(|| b.take_ready()).collect();
        assert_eq!(parts.len(), 1001);
        assert_eq!((parts[999].1.len(), parts[1000].1.len()), (16, 32));
        assert_eq!(b.part_size_now(), 32);
        assert_eq!(b.finish().iter().map(|(p, d)| (*p, d.len())).collect::<Vec<_>>(), [(1001, 5)]);
        assert_eq!(b.total_parts(), 1002);
    }
}
