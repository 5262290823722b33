//! The lazy memory of one restored process that has not arrived yet: runs of pages by their address in
//! the process now, each with the address its bytes had at the dump (where the pagemap finds them; the two
//! differ once the program moved the memory with `mremap`).

use std::collections::BTreeMap;

use crate::criu::pages::pagemap::PAGE_SIZE;

/// A run of missing pages: `[start, end)` in the process, its first page at `image` in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub end: u64,
    pub image: u64,
}

impl Run {
    /// The same run cut to `[from, to)` (inside it).
    pub fn slice(&self, from: u64, to: u64) -> Run {
        Run { start: from, end: to, image: self.image + (from - self.start) }
    }
}

/// The missing runs of a process, by start, never overlapping.
#[derive(Debug, Clone, Default)]
pub struct Missing {
    runs: BTreeMap<u64, Run>,
    pages: u64,
}

impl Missing {
    /// Add `[start, end)`, at the same addresses in the checkpoint (empty or overlapping runs are not added).
    pub fn add(&mut self, start: u64, end: u64) {
        if end <= start || self.overlapping(start, end).next().is_some() {
            return;
        }
        self.insert(Run { start, end, image: start });
    }

    fn insert(&mut self, run: Run) {
        self.pages += (run.end - run.start) / PAGE_SIZE;
        self.runs.insert(run.start, run);
    }

    /// Whether every page arrived.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Pages still missing.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The run holding `addr`.
    pub fn find(&self, addr: u64) -> Option<Run> {
        self.runs.range(..=addr).next_back().map(|(_, r)| *r).filter(|r| addr < r.end)
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = Run> + '_ {
        let first = self.find(start).map(|r| r.start).unwrap_or(start);
        self.runs.range(first..end).map(|(_, r)| *r).filter(move |r| r.end > start)
    }

    /// Remove `[start, end)` (arrived, or no longer mapped), splitting runs it cuts; the parts removed.
    pub fn take(&mut self, start: u64, end: u64) -> Vec<Run> {
        let hit: Vec<Run> = self.overlapping(start, end).collect();
        let mut taken = Vec::with_capacity(hit.len());
        for run in hit {
            self.runs.remove(&run.start);
            self.pages -= (run.end - run.start) / PAGE_SIZE;
            let (from, to) = (run.start.max(start), run.end.min(end));
            if run.start < from {
                self.insert(run.slice(run.start, from));
            }
            if to < run.end {
                self.insert(run.slice(to, run.end));
            }
            taken.push(run.slice(from, to));
        }
        taken
    }

    /// The program moved `[from, from + len)` to `to` (`mremap`): its missing pages move with it.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        // Whatever was mapped at the destination is gone.
        self.take(to, to + len);
        for run in self.take(from, from + len) {
            let shift = |a: u64| a - from + to;
            self.insert(Run { start: shift(run.start), end: shift(run.end), image: run.image });
        }
    }

    /// The next pages to fetch in the background: at most `max` bytes from the first missing page at or
    /// after `cursor`, or from the lowest missing page when none is after it.
    pub fn next_after(&self, cursor: u64, max: u64) -> Option<Run> {
        let run = self.find(cursor).or_else(|| self.runs.range(cursor..).next().map(|(_, r)| *r)).or_else(|| self.first())?;
        let from = if (run.start..run.end).contains(&cursor) { cursor & !(PAGE_SIZE - 1) } else { run.start };
        Some(run.slice(from, run.end.min(from + max.max(PAGE_SIZE))))
    }

    fn first(&self) -> Option<Run> {
        self.runs.values().next().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn runs(m: &Missing) -> Vec<(u64, u64, u64)> {
        m.runs.values().map(|r| (r.start / P, r.end / P, r.image / P)).collect()
    }

    #[test]
    fn taking_splits_runs_and_counts_pages() {
        let mut m = Missing::default();
        m.add(10 * P, 20 * P);
        m.add(30 * P, 40 * P);
        m.add(15 * P, 35 * P); // overlaps: ignored
        assert_eq!(m.pages(), 20);
        let taken = m.take(12 * P, 32 * P);
        assert_eq!(taken.iter().map(|r| (r.start / P, r.end / P)).collect::<Vec<_>>(), vec![(12, 20), (30, 32)]);
        assert_eq!(runs(&m), vec![(10, 12, 10), (32, 40, 32)]);
        assert_eq!(m.pages(), 10);
        assert_eq!(m.find(11 * P).map(|r| r.start), Some(10 * P));
        assert_eq!(m.find(12 * P), None);
        assert!(m.take(0, 5 * P).is_empty());
        m.take(0, 100 * P);
        assert!(m.is_empty());
        assert_eq!(m.pages(), 0);
    }

    #[test]
    fn remapped_pages_keep_their_place_in_the_checkpoint() {
        let mut m = Missing::default();
        m.add(10 * P, 20 * P);
        m.add(100 * P, 102 * P);
        m.remap(14 * P, 100 * P, 4 * P);
        // The old destination's pages are gone; the moved ones read from where they were dumped.
        assert_eq!(runs(&m), vec![(10, 14, 10), (18, 20, 18), (100, 104, 14)]);
        assert_eq!(m.pages(), 10);
    }

    #[test]
    fn the_background_goes_on_after_the_cursor_and_wraps_around() {
        let mut m = Missing::default();
        m.add(10 * P, 20 * P);
        m.add(30 * P, 40 * P);
        let next = |m: &Missing, c: u64, max: u64| m.next_after(c * P, max * P).map(|r| (r.start / P, r.end / P));
        assert_eq!(next(&m, 0, 4), Some((10, 14)));
        assert_eq!(next(&m, 12, 4), Some((12, 16)));
        assert_eq!(next(&m, 18, 4), Some((18, 20)));
        assert_eq!(next(&m, 25, 100), Some((30, 40)));
        assert_eq!(next(&m, 50, 4), Some((10, 14)));
        m.take(0, 100 * P);
        assert_eq!(next(&m, 0, 4), None);
    }
}
