//! The shapes a VMM consumes a slot's dirty pages in, besides page offsets: runs of contiguous pages as
//! `(guest-physical address, length in bytes)` ranges (one `copy`/`send` per run), KVM's raw word bitmap,
//! and 64-page chunks with their masks (what `KVM_CLEAR_DIRTY_LOG` takes, for a clear right before each
//! chunk is copied: [`DirtyTracker::clear_chunk`](crate::DirtyTracker::clear_chunk)).
//!
//! Dense sets are walked word by word: a run of all-ones or all-zero words costs one comparison a word.
//!
//! Keeps: I4 (each shape holds exactly the set's pages: tested against the offsets).

use tdp_core::addr::{Gpa, PAGE_SHIFT, RingSlot};
use tdp_core::dirty_bitmap::{PAGES_PER_WORD, words_for};

use super::{Pages, SlotDirty};
use crate::error::{Error, Result};

/// KVM's largest memslot in pages (`KVM_MEM_MAX_NR_PAGES`, `(1 << 31) - 1` on 64-bit hosts): the bound on
/// a slot rebuilt from untrusted data, which keeps its bitmap under 256 MiB.
pub const MAX_SLOT_PAGES: u64 = (1 << 31) - 1;

impl SlotDirty {
    /// The dirty pages as maximal runs of contiguous pages: `(first page's guest-physical address, bytes)`,
    /// ascending.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
    /// let mut s = tdp_kvm::SlotDirty::new(RingSlot::new(AsId(0), SlotId(0)), Gpa(0x10_0000), 200);
    /// for p in [3, 4, 5, 9, 63, 64, 65, 199] { s.insert(p); }
    /// let runs: Vec<_> = s.ranges().collect();
    /// assert_eq!(runs, [(Gpa(0x10_3000), 3 * 4096), (Gpa(0x10_9000), 4096), (Gpa(0x13_f000), 3 * 4096), (Gpa(0x1c_7000), 4096)]);
    /// ```
    pub fn ranges(&self) -> impl Iterator<Item = (Gpa, u64)> + '_ {
        let base = self.guest_base.0;
        self.page_runs().map(move |(first, n)| (Gpa(base + (first << PAGE_SHIFT)), n << PAGE_SHIFT))
    }

    /// Rebuilds a set from runs `(first page, pages)` (as [`page_runs`](SlotDirty::page_runs) gives them):
    /// ascending, non-overlapping, non-empty, inside a slot of at most [`MAX_SLOT_PAGES`] pages. The work
    /// and memory are bounded by the slot's bitmap, whatever the runs claim.
    ///
    /// # Errors
    /// [`Error::BadDirtyRuns`] naming the first run that breaks a rule (or the slot size).
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
    /// use tdp_kvm::SlotDirty;
    /// let slot = RingSlot::new(AsId(0), SlotId(0));
    /// let s = SlotDirty::from_runs(slot, Gpa(0), 100, &[(3, 2), (10, 1)])?;
    /// assert_eq!(s.offsets().collect::<Vec<_>>(), [3, 4, 10]);
    /// assert!(SlotDirty::from_runs(slot, Gpa(0), 100, &[(99, 2)]).is_err(), "past the slot");
    /// assert!(SlotDirty::from_runs(slot, Gpa(0), 100, &[(10, 1), (3, 1)]).is_err(), "not ascending");
    /// # Ok::<(), tdp_kvm::Error>(())
    /// ```
    pub fn from_runs(slot: RingSlot, guest_base: Gpa, pages: u64, runs: &[(u64, u64)]) -> Result<Self> {
        let bad = |first, len, why| Err(Error::BadDirtyRuns { slot, first, len, why });
        if pages > MAX_SLOT_PAGES {
            return bad(0, pages, "the slot is larger than KVM's largest memslot");
        }
        let mut total = 0u64;
        let mut next_free = 0u64;
        for &(first, len) in runs {
            if len == 0 {
                return bad(first, len, "an empty run");
            }
            if first < next_free {
                return bad(first, len, "runs not ascending or overlapping");
            }
            match first.checked_add(len) {
                Some(end) if end <= pages => next_free = end,
                _ => return bad(first, len, "a run past the slot's end"),
            }
            total += len;
        }
        let mut s = SlotDirty::new(slot, guest_base, pages);
        if total > words_for(pages) {
            let mut words = vec![0u64; usize::try_from(words_for(pages)).unwrap_or(0)];
            for &(first, len) in runs {
                for p in first..first + len {
                    if let Some(w) = words.get_mut((p / PAGES_PER_WORD) as usize) {
                        *w |= 1 << (p % PAGES_PER_WORD);
                    }
                }
            }
            s.set = Pages::Dense { words, count: total };
        } else {
            // Always `Ok`: inside a slot of at most `MAX_SLOT_PAGES` pages, checked above.
            let list: Vec<u32> =
                runs.iter().flat_map(|&(f, n)| f..f + n).filter_map(|p| u32::try_from(p).ok()).collect();
            s.set = Pages::Sparse(list);
        }
        Ok(s)
    }

    /// The dirty pages as maximal runs `(first page offset, pages)`, ascending.
    pub fn page_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut sparse_at = 0usize;
        let mut dense_at = 0u64;
        std::iter::from_fn(move || match &self.set {
            Pages::Sparse(list) => {
                let first = u64::from(*list.get(sparse_at)?);
                let mut n = 1;
                while list.get(sparse_at + n as usize).map(|&p| u64::from(p)) == Some(first + n) {
                    n += 1;
                }
                sparse_at += n as usize;
                Some((first, n))
            }
            Pages::Dense { words, .. } => {
                let first = next_with(words, dense_at, self.pages, false)?;
                let end = next_with(words, first, self.pages, true).unwrap_or(self.pages);
                dense_at = end;
                Some((first, end - first))
            }
        })
    }

    /// KVM's layout of the set: bit `i % 64` of word `i / 64` is page `i`; `ceil(pages / 64)` words.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
    /// let mut s = tdp_kvm::SlotDirty::new(RingSlot::new(AsId(0), SlotId(0)), Gpa(0), 70);
    /// s.insert(1);
    /// s.insert(69);
    /// assert_eq!(s.to_words(), [0b10, 1 << 5]);
    /// ```
    #[must_use]
    pub fn to_words(&self) -> Vec<u64> {
        match &self.set {
            Pages::Dense { words, .. } => words.clone(),
            Pages::Sparse(list) => super::sparse_words(list, self.pages),
        }
    }

    /// The non-empty 64-page chunks: `(first page, mask)`, bit `i` of the mask being page `first + i`,
    /// ascending. A chunk is what one `KVM_CLEAR_DIRTY_LOG` of 64 pages clears.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
    /// let mut s = tdp_kvm::SlotDirty::new(RingSlot::new(AsId(0), SlotId(0)), Gpa(0), 300);
    /// for p in [0, 2, 130, 299] { s.insert(p); }
    /// assert_eq!(s.chunks().collect::<Vec<_>>(), [(0, 0b101), (128, 0b100), (256, 1 << 43)]);
    /// ```
    pub fn chunks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut at = 0usize;
        std::iter::from_fn(move || match &self.set {
            Pages::Sparse(list) => {
                let first = u64::from(*list.get(at)?) / PAGES_PER_WORD * PAGES_PER_WORD;
                let mut mask = 0;
                while let Some(p) =
                    list.get(at).map(|&p| u64::from(p)).filter(|&p| p < first + PAGES_PER_WORD)
                {
                    mask |= 1 << (p - first);
                    at += 1;
                }
                Some((first, mask))
            }
            Pages::Dense { words, .. } => {
                let skip = words.get(at..)?.iter().position(|&w| w != 0)?;
                let i = at + skip;
                at = i + 1;
                Some((i as u64 * PAGES_PER_WORD, words[i]))
            }
        })
    }
}

/// The first page at or after `from` (below `pages`) whose bit is set (`clear == false`) or clear
/// (`clear == true`), scanning word by word.
fn next_with(words: &[u64], from: u64, pages: u64, clear: bool) -> Option<u64> {
    let mut i = (from / PAGES_PER_WORD) as usize;
    let mut mask = u64::MAX << (from % PAGES_PER_WORD);
    while let Some(&w) = words.get(i) {
        let w = if clear { !w } else { w } & mask;
        if w != 0 {
            let page = i as u64 * PAGES_PER_WORD + u64::from(w.trailing_zeros());
            return (page < pages).then_some(page);
        }
        mask = u64::MAX;
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};

    use super::super::SlotDirty;

    /// Every shape, sparse and dense, against the offsets of random sets (including full words, runs
    /// across word boundaries and the slot's last, partial word).
    #[test]
    fn i4_ranges_words_and_chunks_hold_exactly_the_sets_pages() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..60u64 {
            let pages = 1 + round * 37 % 900;
            let mut s = SlotDirty::new(RingSlot::new(AsId(0), SlotId(1)), Gpa(0x1000_0000), pages);
            let mut model = BTreeSet::new();
            let n = if round % 2 == 0 { 10 } else { pages };
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = x % pages;
                for p in first..(first + x % 70).min(pages) {
                    s.insert(p);
                    model.insert(p);
                }
            }
            let from_runs: BTreeSet<u64> = s.page_runs().flat_map(|(f, n)| f..f + n).collect();
            assert_eq!(from_runs, model, "round {round}: runs");
            let runs: Vec<_> = s.page_runs().collect();
            assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "round {round}: runs are maximal");
            assert!(
                s.ranges().zip(&runs).all(|((g, b), &(f, n))| g.0 == 0x1000_0000 + f * 4096 && b == n * 4096)
            );
            let words = s.to_words();
            assert_eq!(words.len() as u64, pages.div_ceil(64));
            let from_words: BTreeSet<u64> = tdp_core::dirty_bitmap::dirty_offsets(&words).collect();
            assert_eq!(from_words, model, "round {round}: words");
            let from_chunks: BTreeSet<u64> = s
                .chunks()
                .flat_map(|(f, m)| (0..64).filter(move |b| m & (1 << b) != 0).map(move |b| f + b))
                .collect();
            assert_eq!(from_chunks, model, "round {round}: chunks");
            assert!(s.chunks().all(|(f, m)| f % 64 == 0 && m != 0));
        }
    }
}
