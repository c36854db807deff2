//! [`PendingSet`]: the pages the source still owes the destination, memslot by memslot. A harvest adds
//! pages, each under the slot the tracker reported it in; a page leaves the set only after the frame
//! that carries it was written whole, so a round whose sending fails leaves every page it had not
//! delivered in the set, to be sent again (dirty state is never lost).
//!
//! Keeps: I4 at the migration level (a harvested page is sent, or stays pending) and I5 for the tracker's
//! reports (a page of a slot the set was not built for, or past its slot's end, is refused, never
//! indexed).

use crate::proto::SlotInfo;

/// The pages of one slot, as a bitmap with a population count.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotPages {
    info: SlotInfo,
    words: Vec<u64>,
    count: u64,
}

impl SlotPages {
    fn new(info: SlotInfo) -> SlotPages {
        SlotPages { info, words: vec![0; info.pages.div_ceil(64) as usize], count: 0 }
    }

    fn insert(&mut self, page: u64) -> bool {
        if page >= self.info.pages {
            return false;
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.count += u64::from(new);
        new
    }

    fn contains(&self, page: u64) -> bool {
        page < self.info.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.info.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let p = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (p < self.info.pages).then_some(p);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    fn runs(&self, max_run: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut page = 0u64;
        std::iter::from_fn(move || {
            let first = self.next_set(page)?;
            let mut end = first + 1;
            while end < self.info.pages && end - first < max_run && self.contains(end) {
                end += 1;
            }
            page = end;
            Some((first, end - first))
        })
    }
}

/// A set of pages of a fixed list of memslots (the guest's layout), each slot a bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSet {
    slots: Vec<SlotPages>,
}

impl PendingSet {
    /// An empty set over the memslots `layout` (in the order given; a slot listed twice keeps its first
    /// entry).
    ///
    /// ```
    /// use tdp_cli::pending::PendingSet;
    /// use tdp_cli::proto::SlotInfo;
    /// let mut p = PendingSet::new(&[SlotInfo::new(0, 0, 16), SlotInfo::new(1, 1 << 32, 100)]);
    /// assert!(p.insert(1, 3) && !p.insert(1, 3));
    /// p.insert(1, 4);
    /// p.insert(1, 70);
    /// p.insert(0, 15);
    /// assert!(!p.insert(0, 16) && !p.insert(7, 0), "past the slot's end, or no such slot");
    /// assert_eq!(p.runs(64).collect::<Vec<_>>(), [(0, 15, 1), (1, 3, 2), (1, 70, 1)]);
    /// p.remove_run(1, 3, 2);
    /// assert_eq!(p.len(), 2);
    /// ```
    #[must_use]
    pub fn new(layout: &[SlotInfo]) -> PendingSet {
        let mut slots: Vec<SlotPages> = Vec::with_capacity(layout.len());
        for info in layout {
            if !slots.iter().any(|s| s.info.slot == info.slot) {
                slots.push(SlotPages::new(*info));
            }
        }
        PendingSet { slots }
    }

    /// A set holding every page of every slot (the bulk copy of round 0).
    #[must_use]
    pub fn full(layout: &[SlotInfo]) -> PendingSet {
        let mut p = PendingSet::new(layout);
        p.fill();
        p
    }

    /// Adds every page of every slot.
    pub fn fill(&mut self) {
        for s in &mut self.slots {
            s.words.fill(!0);
            if let Some(last) = s.words.last_mut()
                && !s.info.pages.is_multiple_of(64)
            {
                *last = (1u64 << (s.info.pages % 64)) - 1;
            }
            s.count = s.info.pages;
        }
    }

    /// The memslots the set covers, in its order.
    pub fn layout(&self) -> impl Iterator<Item = SlotInfo> + '_ {
        self.slots.iter().map(|s| s.info)
    }

    /// The bound: the pages of all slots.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.slots.iter().map(|s| s.info.pages).sum()
    }
    /// Pages in the set.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.slots.iter().map(|s| s.count).sum()
    }
    /// Pages of slot `slot` in the set (0 for a slot it does not cover).
    #[must_use]
    pub fn len_of(&self, slot: u32) -> u64 {
        self.slot(slot).map_or(0, |s| s.count)
    }
    /// Whether no page is pending.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.count == 0)
    }

    fn slot(&self, slot: u32) -> Option<&SlotPages> {
        self.slots.iter().find(|s| s.info.slot == slot)
    }
    fn slot_mut(&mut self, slot: u32) -> Option<&mut SlotPages> {
        self.slots.iter_mut().find(|s| s.info.slot == slot)
    }

    /// Adds page `page` of slot `slot`; returns whether it was new. A slot the set does not cover, or a
    /// page at or past its slot's end, is refused (false): a tracker never reports one, and a bad one
    /// must not grow the set. Callers that must not lose a page check [`PendingSet::covers`] first.
    pub fn insert(&mut self, slot: u32, page: u64) -> bool {
        self.slot_mut(slot).is_some_and(|s| s.insert(page))
    }

    /// Whether page `page` of slot `slot` lies inside the set's layout (whether or not it is pending).
    #[must_use]
    pub fn covers(&self, slot: u32, page: u64) -> bool {
        self.slot(slot).is_some_and(|s| page < s.info.pages)
    }

    /// Adds `count` pages of slot `slot` from `first` (clipped to the slot's end); returns how many were
    /// new.
    pub fn insert_run(&mut self, slot: u32, first: u64, count: u64) -> u64 {
        let Some(s) = self.slot_mut(slot) else { return 0 };
        let end = first.saturating_add(count).min(s.info.pages);
        (first..end).map(|p| u64::from(s.insert(p))).sum()
    }

    /// Adds every page of `other` whose slot this set covers (slots are matched by number); returns how
    /// many were new.
    pub fn merge(&mut self, other: &PendingSet) -> u64 {
        let mut new = 0;
        for o in &other.slots {
            let Some(s) = self.slot_mut(o.info.slot) else { continue };
            let before = s.count;
            for (a, b) in s.words.iter_mut().zip(&o.words) {
                *a |= b;
            }
            // Bits past the slot's end cannot come in: `other`'s slot of the same number has a bitmap
            // with none set, and a shorter or longer one is clipped by `zip` and masked here.
            if let Some(last) = s.words.last_mut()
                && !s.info.pages.is_multiple_of(64)
            {
                *last &= (1u64 << (s.info.pages % 64)) - 1;
            }
            s.count = s.words.iter().map(|w| u64::from(w.count_ones())).sum();
            new += s.count - before;
        }
        new
    }

    /// Whether page `page` of slot `slot` is pending.
    #[must_use]
    pub fn contains(&self, slot: u32, page: u64) -> bool {
        self.slot(slot).is_some_and(|s| s.contains(page))
    }

    /// Removes `count` pages of slot `slot` from `first`: called once they were delivered.
    pub fn remove_run(&mut self, slot: u32, first: u64, count: u64) {
        let Some(s) = self.slot_mut(slot) else { return };
        let end = first.saturating_add(count).min(s.info.pages);
        for p in first..end {
            let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            if s.words[w] & bit != 0 {
                s.words[w] &= !bit;
                s.count -= 1;
            }
        }
    }

    /// Empties the set, returning what it held.
    pub fn take(&mut self) -> PendingSet {
        let empty = PendingSet { slots: self.slots.iter().map(|s| SlotPages::new(s.info)).collect() };
        std::mem::replace(self, empty)
    }

    /// The pending pages as runs of consecutive pages `(slot, first, count)`, each at most `max_run`
    /// long and inside one slot, slot by slot in the set's order, ascending within a slot.
    pub fn runs(&self, max_run: u64) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        let max_run = max_run.max(1);
        self.slots.iter().flat_map(move |s| s.runs(max_run).map(|(first, n)| (s.info.slot, first, n)))
    }

    /// Every pending page as `(slot, page)`, in the order of [`PendingSet::runs`].
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.runs(u64::MAX).flat_map(|(slot, first, n)| (first..first + n).map(move |p| (slot, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(pages: u64) -> [SlotInfo; 1] {
        [SlotInfo::new(1, 1 << 32, pages)]
    }

    #[test]
    fn runs_split_at_gaps_max_run_and_slots() {
        let mut p = PendingSet::new(&[SlotInfo::new(0, 0, 10), SlotInfo::new(1, 1 << 32, 300)]);
        p.insert_run(1, 10, 150);
        p.insert(1, 299);
        p.insert_run(0, 8, 2);
        assert_eq!(
            p.runs(64).collect::<Vec<_>>(),
            [(0, 8, 2), (1, 10, 64), (1, 74, 64), (1, 138, 22), (1, 299, 1)],
            "a run never crosses from one slot into the next"
        );
        assert_eq!(p.iter().count() as u64, p.len());
        assert_eq!((p.len_of(0), p.len_of(1), p.len_of(2)), (2, 151, 0));
    }

    #[test]
    fn i5_out_of_bound_pages_and_unknown_slots_are_refused() {
        let mut p = PendingSet::new(&one(65));
        assert!(!p.insert(1, 65));
        assert!(!p.insert(0, 0), "slot 0 is not in the layout");
        assert!(!p.covers(0, 0) && !p.covers(1, 65) && p.covers(1, 64));
        assert_eq!(p.insert_run(1, 60, 100), 5);
        assert_eq!(p.insert_run(9, 0, 100), 0);
        assert_eq!(p.len(), 5);
        let full = PendingSet::full(&[SlotInfo::new(0, 0, 3), SlotInfo::new(1, 1 << 32, 65)]);
        assert_eq!((full.len(), full.capacity()), (68, 68));
        assert!(!full.contains(1, 65));
    }

    #[test]
    fn merge_counts_only_new_pages_of_covered_slots() {
        let layout = [SlotInfo::new(0, 0, 10), SlotInfo::new(1, 1 << 32, 200)];
        let mut a = PendingSet::new(&layout);
        a.insert_run(1, 0, 10);
        let mut b = PendingSet::new(&layout);
        b.insert_run(1, 5, 10);
        b.insert(0, 9);
        assert_eq!(a.merge(&b), 6);
        assert_eq!(a.len(), 16);
        let mut other = PendingSet::new(&[SlotInfo::new(5, 0, 64)]);
        other.insert(5, 1);
        assert_eq!(a.merge(&other), 0, "a slot this set does not cover is not merged in");
        let taken = a.take();
        assert!(a.is_empty());
        assert_eq!(taken.len(), 16);
        assert_eq!(a.layout().collect::<Vec<_>>(), layout);
    }

    #[test]
    fn remove_run_only_clears_delivered_pages() {
        let mut p = PendingSet::full(&one(128));
        p.remove_run(1, 0, 64);
        assert_eq!(p.len(), 64);
        assert!(!p.contains(1, 63) && p.contains(1, 64));
        p.remove_run(0, 64, 64);
        assert_eq!(p.len(), 64, "another slot's run removes nothing here");
        p.remove_run(1, 64, 1000);
        assert!(p.is_empty());
    }
}
