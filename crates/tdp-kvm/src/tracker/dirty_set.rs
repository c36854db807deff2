//! Per-slot dirty sets: what a collect returns and what the tracker keeps pending between collects.
//!
//! A set is a bitmap per memslot, so a page reported by several sources (two rings, a ring-full harvest
//! and a collect) appears once, and merging a set back (`restore`) is an OR that cannot lose a page.
//!
//! Keeps: I4 (merging never drops a bit) and I5 (a page outside its slot is refused, never indexed).

use std::collections::BTreeMap;

use tdp_core::addr::{Gpa, PAGE_SHIFT, RingSlot};
use tdp_core::dirty_bitmap::{PAGES_PER_WORD, words_for};

use crate::bitmap::iter_bits;

/// The dirty pages of one memslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotDirty {
    slot: RingSlot,
    guest_base: Gpa,
    pages: u64,
    words: Vec<u64>,
}

impl SlotDirty {
    /// An empty set for a slot of `pages` pages at `guest_base`.
    #[must_use]
    pub fn new(slot: RingSlot, guest_base: Gpa, pages: u64) -> Self {
        let words = usize::try_from(words_for(pages)).unwrap_or(usize::MAX);
        SlotDirty { slot, guest_base, pages, words: vec![0; words] }
    }

    /// The memslot (`as_id << 16 | id`).
    #[must_use]
    pub const fn slot(&self) -> RingSlot {
        self.slot
    }

    /// The slot's first guest-physical address.
    #[must_use]
    pub const fn guest_base(&self) -> Gpa {
        self.guest_base
    }

    /// The slot's size in pages.
    #[must_use]
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap: bit `i % 64` of word `i / 64` is page `i` of the slot.
    #[must_use]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks page `offset` dirty; `false` (and nothing changes) if it lies outside the slot.
    pub fn insert(&mut self, offset: u64) -> bool {
        if offset >= self.pages {
            return false;
        }
        match self.words.get_mut((offset / PAGES_PER_WORD) as usize) {
            Some(w) => {
                *w |= 1 << (offset % PAGES_PER_WORD);
                true
            }
            None => false,
        }
    }

    /// Whether page `offset` is in the set.
    #[must_use]
    pub fn contains(&self, offset: u64) -> bool {
        offset < self.pages
            && self
                .words
                .get((offset / PAGES_PER_WORD) as usize)
                .is_some_and(|w| w & (1 << (offset % 64)) != 0)
    }

    /// ORs a whole bitmap in (extra words, and bits past the slot's end, are ignored) and returns how many
    /// bits `words` had set within the slot (pages reported, whether or not already in the set).
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
    /// let mut s = tdp_kvm::SlotDirty::new(RingSlot::new(AsId(0), SlotId(0)), Gpa(0), 70);
    /// // Word 1 holds pages 64..128; the slot ends at 70, so bit 10 (page 74) is not a page.
    /// assert_eq!(s.merge_words(&[1, 0b11 | 1 << 10]), 3);
    /// assert!(s.contains(65) && !s.contains(74));
    /// assert_eq!(s.count(), 3);
    /// ```
    pub fn merge_words(&mut self, words: &[u64]) -> u64 {
        let mut n = 0;
        for (dst, src) in self.words.iter_mut().zip(words) {
            *dst |= *src;
            n += u64::from(src.count_ones());
        }
        // Bits past the slot's end: not pages; drop them and do not count them.
        let tail = self.pages % PAGES_PER_WORD;
        if tail != 0
            && let (Some(last), Some(src)) =
                (self.words.last_mut(), words.get((self.pages / PAGES_PER_WORD) as usize))
        {
            n -= u64::from((src & !((1u64 << tail) - 1)).count_ones());
            *last &= (1 << tail) - 1;
        }
        n
    }

    /// How many pages are in the set.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The dirty pages' offsets in the slot, ascending.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        iter_bits(&self.words)
    }

    /// The dirty pages' guest-physical addresses, ascending.
    pub fn gpas(&self) -> impl Iterator<Item = Gpa> + '_ {
        let base = self.guest_base.0;
        self.offsets().map(move |o| Gpa(base + (o << PAGE_SHIFT)))
    }

    fn clear(&mut self) {
        self.words.fill(0);
    }
}

/// Dirty pages per memslot, keyed by [`RingSlot`].
///
/// ```
/// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
/// use tdp_kvm::DirtySets;
///
/// let slot = RingSlot::new(AsId(0), SlotId(1));
/// let mut a = DirtySets::default();
/// a.add_slot(slot, Gpa(0x10_0000), 100);
/// assert!(a.insert(slot, 3) && a.insert(slot, 99));
/// assert!(!a.insert(slot, 100), "outside the slot: refused");
/// let mut b = DirtySets::default();
/// b.add_slot(slot, Gpa(0x10_0000), 100);
/// b.insert(slot, 3);
/// b.insert(slot, 7);
/// a.merge(&b);
/// assert_eq!(a.total(), 3);
/// assert_eq!(a.get(slot).unwrap().gpas().next(), Some(Gpa(0x10_3000)));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySets {
    slots: BTreeMap<u32, SlotDirty>,
}

impl DirtySets {
    /// Adds an empty set for a slot if there is none (an existing one is kept as it is).
    pub fn add_slot(&mut self, slot: RingSlot, guest_base: Gpa, pages: u64) -> &mut SlotDirty {
        self.slots.entry(slot.raw()).or_insert_with(|| SlotDirty::new(slot, guest_base, pages))
    }

    /// Removes a slot's set and returns it.
    pub fn remove_slot(&mut self, slot: RingSlot) -> Option<SlotDirty> {
        self.slots.remove(&slot.raw())
    }

    /// The set of one slot.
    #[must_use]
    pub fn get(&self, slot: RingSlot) -> Option<&SlotDirty> {
        self.slots.get(&slot.raw())
    }

    /// The set of one slot, writable.
    pub fn get_mut(&mut self, slot: RingSlot) -> Option<&mut SlotDirty> {
        self.slots.get_mut(&slot.raw())
    }

    /// Marks page `offset` of `slot` dirty; `false` if the slot is unknown or the page outside it.
    pub fn insert(&mut self, slot: RingSlot, offset: u64) -> bool {
        self.slots.get_mut(&slot.raw()).is_some_and(|s| s.insert(offset))
    }

    /// ORs `other` in. Slots `self` lacks are added.
    pub fn merge(&mut self, other: &DirtySets) {
        for (key, theirs) in &other.slots {
            match self.slots.get_mut(key) {
                Some(ours) => {
                    ours.merge_words(&theirs.words);
                }
                None => {
                    self.slots.insert(*key, theirs.clone());
                }
            }
        }
    }

    /// Empties every slot's set, keeping the slots (and their memory) for reuse.
    pub fn clear(&mut self) {
        self.slots.values_mut().for_each(SlotDirty::clear);
    }

    /// The slots' sets, by ascending slot.
    pub fn iter(&self) -> impl Iterator<Item = &SlotDirty> + '_ {
        self.slots.values()
    }

    /// Total dirty pages over all slots.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.slots.values().map(SlotDirty::count).sum()
    }

    /// Whether no page is dirty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.values().all(SlotDirty::is_empty)
    }
}
