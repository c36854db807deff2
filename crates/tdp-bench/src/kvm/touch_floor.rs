//! A memory-hierarchy floor for re-protecting dirty pages scattered over a memslot.
//!
//! Whatever re-protects a dirty page has to reach that page's metadata. KVM's reset does it through the
//! slot's rmap array (one 8-byte head per page, in 4 KiB-mapped `vmalloc` memory) and the page's leaf
//! entry (8 bytes, in a page-table page). [`TouchFloor`] does only that: for each of 1000 pseudo-random
//! pages of the same spread as the guest's writes, it reads the page's word in one array of 8 bytes per
//! slot page and clears a bit in its word of a second one, in user space, with no kernel and no locks.
//! Both arrays are ordinary heap memory; this host backs them with 4 KiB pages (transparent huge pages
//! only on `madvise`), as the kernel's rmap is.
//!
//! Its growth from a 1 GiB spread to a 16 GiB one is what the caches and the TLB charge for the spread
//! alone, whoever does the work; the harvest rows compare the kernel's growth with it.

use std::time::Instant;

/// One floor contender: the two per-page arrays of a slot and the pages' spread.
pub struct TouchFloor {
    /// Stands for the rmap: read at each dirty page.
    heads: Vec<u64>,
    /// Stands for the leaf entries: bit 1 (writable) cleared at each dirty page.
    leaves: Vec<u64>,
    /// Pages are drawn among the first `spread` of the slot.
    spread: u64,
    /// Pages per round.
    dirty: u64,
    /// xorshift64 state.
    state: u64,
    /// Microseconds per round.
    pub samples: Vec<f64>,
}

impl TouchFloor {
    /// Arrays for a slot of `slot_pages` pages (filled, so every page of them is resident), touched at
    /// `dirty` pages per round drawn among the first `spread`.
    ///
    /// # Panics
    /// If `spread` is 0 or larger than `slot_pages`, or the arrays do not fit the address space.
    #[must_use]
    pub fn new(slot_pages: u64, spread: u64, dirty: u64) -> TouchFloor {
        assert!((1..=slot_pages).contains(&spread), "spread within the slot");
        let len = usize::try_from(slot_pages).expect("slot pages fit usize");
        TouchFloor {
            heads: vec![1; len],
            leaves: vec![0b11; len],
            spread,
            dirty,
            state: 0x9E37_79B9_7F4A_7C15,
            samples: Vec::new(),
        }
    }

    fn next_page(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        // Below `spread`, which fits usize (checked in `new`).
        (self.state % self.spread) as usize
    }

    /// One timed round: draws the pages first (untimed), then touches their metadata. Between rounds the
    /// caller runs guests, which disturb the caches as they do between the kernel's resets.
    pub fn round(&mut self) {
        let pages: Vec<usize> = (0..self.dirty).map(|_| self.next_page()).collect();
        let start = Instant::now();
        let mut seen = 0u64;
        for &p in &pages {
            seen = seen.wrapping_add(self.heads[p]);
            self.leaves[p] &= !0b10;
        }
        std::hint::black_box(seen);
        self.samples.push(start.elapsed().as_secs_f64() * 1e6);
        // Make the pages writable again, as the guest's next writes would (untimed).
        for &p in &pages {
            self.leaves[p] |= 0b10;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TouchFloor;

    #[test]
    fn pages_are_drawn_within_the_spread_and_a_round_leaves_every_leaf_writable() {
        let mut floor = TouchFloor::new(1 << 12, 100, 1000);
        floor.round();
        assert_eq!(floor.samples.len(), 1);
        assert!(floor.leaves.iter().all(|&w| w == 0b11), "every leaf writable again");
        let drawn: Vec<usize> = (0..1000).map(|_| floor.next_page()).collect();
        assert!(drawn.iter().all(|&p| p < 100), "pages drawn within the spread");
        assert!(drawn.iter().any(|&p| p >= 50), "the whole spread is used");
    }
}
