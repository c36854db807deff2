//! [`PendingSet`]: the pages the source still owes the destination. A harvest adds pages; a page leaves
//! the set only after the frame that carries it was written whole, so a round whose sending fails leaves
//! every page it had not delivered in the set, to be sent again (dirty state is never lost).
//!
//! Keeps: I4 at the migration level (a harvested page is sent, or stays pending).

/// A set of page indices below a fixed bound, as a bitmap with a population count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSet {
    pages: u64,
    words: Vec<u64>,
    count: u64,
}

impl PendingSet {
    /// An empty set for pages `0..pages`.
    ///
    /// ```
    /// use tdp_cli::pending::PendingSet;
    /// let mut p = PendingSet::new(100);
    /// assert!(p.insert(3) && !p.insert(3));
    /// p.insert(4);
    /// p.insert(70);
    /// assert_eq!(p.runs(64).collect::<Vec<_>>(), [(3, 2), (70, 1)]);
    /// p.remove_run(3, 2);
    /// assert_eq!(p.len(), 1);
    /// ```
    #[must_use]
    pub fn new(pages: u64) -> PendingSet {
        PendingSet { pages, words: vec![0; pages.div_ceil(64) as usize], count: 0 }
    }

    /// A set holding every page (the bulk copy of round 0).
    #[must_use]
    pub fn full(pages: u64) -> PendingSet {
        let mut p = PendingSet::new(pages);
        p.insert_run(0, pages);
        p
    }

    /// The bound: pages are `0..capacity()`.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.pages
    }
    /// Pages in the set.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.count
    }
    /// Whether no page is pending.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `page`; returns whether it was new. Pages at or past the bound are ignored (false): a
    /// tracker never reports one, and a bad one must not grow the set.
    pub fn insert(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        let new = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.count += u64::from(new);
        new
    }

    /// Adds `count` pages from `first` (clipped to the bound); returns how many were new.
    pub fn insert_run(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.pages);
        (first..end).map(|p| u64::from(self.insert(p))).sum()
    }

    /// Adds every page of `other` (same bound assumed; extra words are ignored); returns how many were
    /// new.
    pub fn merge(&mut self, other: &PendingSet) -> u64 {
        let before = self.count;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.recount();
        self.count - before
    }

    /// Whether `page` is pending.
    #[must_use]
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Removes `count` pages from `first`: called once they were delivered.
    pub fn remove_run(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.pages);
        for p in first..end {
            let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            if self.words[w] & bit != 0 {
                self.words[w] &= !bit;
                self.count -= 1;
            }
        }
    }

    /// Empties the set, returning what it held.
    pub fn take(&mut self) -> PendingSet {
        let empty = PendingSet::new(self.pages);
        std::mem::replace(self, empty)
    }

    /// The pending pages as runs of consecutive pages `(first, count)`, each at most `max_run` long, in
    /// ascending order.
    pub fn runs(&self, max_run: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let max_run = max_run.max(1);
        let mut page = 0u64;
        std::iter::from_fn(move || {
            let first = self.next_set(page)?;
            let mut end = first + 1;
            while end < self.pages && end - first < max_run && self.contains(end) {
                end += 1;
            }
            page = end;
            Some((first, end - first))
        })
    }

    /// Every pending page, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs(u64::MAX).flat_map(|(first, n)| first..first + n)
    }

    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let p = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (p < self.pages).then_some(p);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    fn recount(&mut self) {
        self.count = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps_and_max_run() {
        let mut p = PendingSet::new(300);
        p.insert_run(10, 150);
        p.insert(299);
        assert_eq!(p.runs(64).collect::<Vec<_>>(), [(10, 64), (74, 64), (138, 22), (299, 1)]);
        assert_eq!(p.iter().count() as u64, p.len());
    }

    #[test]
    fn out_of_bound_pages_are_ignored() {
        let mut p = PendingSet::new(65);
        assert!(!p.insert(65));
        assert_eq!(p.insert_run(60, 100), 5);
        assert_eq!(p.len(), 5);
        assert_eq!(PendingSet::full(65).len(), 65);
    }

    #[test]
    fn merge_counts_only_new_pages() {
        let mut a = PendingSet::new(200);
        a.insert_run(0, 10);
        let mut b = PendingSet::new(200);
        b.insert_run(5, 10);
        assert_eq!(a.merge(&b), 5);
        assert_eq!(a.len(), 15);
        let taken = a.take();
        assert!(a.is_empty());
        assert_eq!(taken.len(), 15);
    }

    #[test]
    fn remove_run_only_clears_delivered_pages() {
        let mut p = PendingSet::full(128);
        p.remove_run(0, 64);
        assert_eq!(p.len(), 64);
        assert!(!p.contains(63) && p.contains(64));
        p.remove_run(64, 1000);
        assert!(p.is_empty());
    }
}
