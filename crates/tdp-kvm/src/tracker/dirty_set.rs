//! Per-slot dirty sets: what a collect returns and what the tracker keeps pending between collects.
//!
//! A slot's set is *sparse* (a sorted list of page offsets) while it is small, and *dense* (a bitmap) once
//! the list would outgrow the bitmap (more than one page in 64 dirty). So the cost of a ring collect
//! follows the number of pages dirtied, not the size of guest memory (a 16 GiB slot's bitmap is 512 KiB,
//! which a sparse set never allocates, clears or copies), while a heavy round stays at one bit per page.
//! Either way a page appears once however many sources reported it, and merging a set back (`restore`) is
//! a union that cannot lose a page.
//!
//! Keeps: I4 (merging never drops a page) and I5 (a page outside its slot is refused, never indexed).

#[cfg(feature = "serde")]
mod serde;
mod shapes;

pub use shapes::MAX_SLOT_PAGES;

use std::collections::BTreeMap;

use tdp_core::addr::{Gpa, PAGE_SHIFT, RingSlot};
use tdp_core::dirty_bitmap::{PAGES_PER_WORD, dirty_offsets, words_for};

#[derive(Clone, Debug)]
enum Pages {
    /// Sorted, without duplicates, every offset below the slot's `pages`. 32 bits: a set's `pages` is at
    /// most [`MAX_SLOT_PAGES`], below 2^31 (half the memory of `u64` offsets, and a ring collect hands its
    /// sorted harvest over as it is).
    Sparse(Vec<u32>),
    /// Bit `i % 64` of word `i / 64` is page `i`; `count` bits set; no bit at or past `pages`.
    Dense { words: Vec<u64>, count: u64 },
}

/// The dirty pages of one memslot.
#[derive(Clone, Debug)]
pub struct SlotDirty {
    slot: RingSlot,
    guest_base: Gpa,
    pages: u64,
    set: Pages,
}

impl PartialEq for SlotDirty {
    /// Same slot and same pages, whatever the representation.
    fn eq(&self, other: &Self) -> bool {
        (self.slot, self.guest_base, self.pages) == (other.slot, other.guest_base, other.pages)
            && self.count() == other.count()
            && self.offsets().eq(other.offsets())
    }
}
impl Eq for SlotDirty {}

impl SlotDirty {
    /// An empty set for a slot of `pages` pages at `guest_base`. A set covers at most KVM's largest
    /// memslot, [`MAX_SLOT_PAGES`] pages: a larger `pages` is taken as that many (and [`pages`] says so),
    /// so pages past it are refused as pages past the slot are.
    ///
    /// [`pages`]: SlotDirty::pages
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};
    /// use tdp_kvm::{MAX_SLOT_PAGES, SlotDirty};
    /// let slot = RingSlot::new(AsId(0), SlotId(0));
    /// assert_eq!(SlotDirty::new(slot, Gpa(0), 100).pages(), 100);
    /// let mut huge = SlotDirty::new(slot, Gpa(0), u64::MAX);
    /// assert_eq!(huge.pages(), MAX_SLOT_PAGES);
    /// assert!(huge.insert(MAX_SLOT_PAGES - 1) && !huge.insert(MAX_SLOT_PAGES));
    /// ```
    #[must_use]
    pub const fn new(slot: RingSlot, guest_base: Gpa, pages: u64) -> Self {
        let pages = if pages < MAX_SLOT_PAGES { pages } else { MAX_SLOT_PAGES };
        SlotDirty { slot, guest_base, pages, set: Pages::Sparse(Vec::new()) }
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

    /// Marks page `offset` dirty; `false` (and nothing changes) if it lies outside the slot.
    pub fn insert(&mut self, offset: u64) -> bool {
        if offset >= self.pages {
            return false;
        }
        match &mut self.set {
            Pages::Sparse(list) => {
                // Always `Ok`: `offset < pages <= MAX_SLOT_PAGES`.
                let Ok(offset) = u32::try_from(offset) else { return false };
                if let Err(i) = list.binary_search(&offset) {
                    list.insert(i, offset);
                }
                self.densify_if_large();
            }
            Pages::Dense { words, count } => {
                if let Some(w) = words.get_mut((offset / PAGES_PER_WORD) as usize) {
                    let bit = 1 << (offset % PAGES_PER_WORD);
                    *count += u64::from(*w & bit == 0);
                    *w |= bit;
                }
            }
        }
        true
    }

    /// Whether page `offset` is in the set.
    #[must_use]
    pub fn contains(&self, offset: u64) -> bool {
        match &self.set {
            Pages::Sparse(list) => u32::try_from(offset).is_ok_and(|o| list.binary_search(&o).is_ok()),
            Pages::Dense { words, .. } => {
                offset < self.pages
                    && words
                        .get((offset / PAGES_PER_WORD) as usize)
                        .is_some_and(|w| w & (1 << (offset % PAGES_PER_WORD)) != 0)
            }
        }
    }

    /// ORs in a whole-slot bitmap (bit `i % 64` of word `i / 64` is page `i`; extra words, and bits past the
    /// slot's end, are ignored) and returns how many pages `words` had set within the slot, whether or not
    /// they were in the set already.
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
        let n_words = usize::try_from(words_for(self.pages)).unwrap_or(usize::MAX).min(words.len());
        let words = &words[..n_words];
        let tail_mask = self.tail_mask();
        let masked = |i: usize, w: u64| if i + 1 == n_words { w & tail_mask } else { w };
        // One pass over the bitmap: collect offsets while the set can stay sparse; past that, turn dense
        // and OR the remaining words in.
        let mut from = 0;
        let mut incoming = 0;
        if let Pages::Sparse(list) = &self.set {
            let room = words_for(self.pages).max(64).saturating_sub(list.len() as u64);
            let mut add = Vec::new();
            for (i, &w) in words.iter().enumerate() {
                let w = masked(i, w);
                if w == 0 {
                    continue;
                }
                let base = i as u64 * PAGES_PER_WORD;
                let mut rest = w;
                while rest != 0 {
                    add.push(base + u64::from(rest.trailing_zeros()));
                    rest &= rest - 1;
                }
                from = i + 1;
                if add.len() as u64 > room {
                    break;
                }
            }
            incoming = add.len() as u64;
            self.extend_sorted(&add);
            if from == 0 || add.len() as u64 <= room {
                return incoming;
            }
        }
        self.densify();
        if let Pages::Dense { words: dst, count } = &mut self.set {
            for (i, (d, &s)) in dst.iter_mut().zip(words).enumerate().skip(from) {
                let s = masked(i, s);
                incoming += u64::from(s.count_ones());
                *count += u64::from((s & !*d).count_ones());
                *d |= s;
            }
        }
        incoming
    }

    /// How many pages are in the set.
    #[must_use]
    pub fn count(&self) -> u64 {
        match &self.set {
            Pages::Sparse(list) => list.len() as u64,
            Pages::Dense { count, .. } => *count,
        }
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The dirty pages' offsets in the slot, ascending.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let (sparse, dense) = match &self.set {
            Pages::Sparse(list) => (Some(list.iter().map(|&p| u64::from(p))), None),
            Pages::Dense { words, .. } => (None, Some(dirty_offsets(words))),
        };
        sparse.into_iter().flatten().chain(dense.into_iter().flatten())
    }

    /// The dirty pages' guest-physical addresses, ascending.
    pub fn gpas(&self) -> impl Iterator<Item = Gpa> + '_ {
        let base = self.guest_base.0;
        self.offsets().map(move |o| Gpa(base + (o << PAGE_SHIFT)))
    }

    /// Adds `offsets`, strictly ascending (sorted, no repeats); those at or past the slot's end are
    /// skipped.
    pub(crate) fn extend_sorted<T: Copy + Into<u64>>(&mut self, offsets: &[T]) {
        debug_assert!(
            offsets.windows(2).all(|w| w[0].into() < w[1].into()),
            "extend_sorted takes strictly ascending offsets"
        );
        // Nothing to add: skip the merge sort and dedup (a collect merges every slot's pending set, most
        // often empty, into its result).
        if offsets.is_empty() {
            return;
        }
        let pages = self.pages;
        // Ascending: the offsets inside the slot are a prefix.
        let inside = &offsets[..offsets.partition_point(|&p| p.into() < pages)];
        match &mut self.set {
            Pages::Sparse(list) => {
                let was_empty = list.is_empty();
                // Always `Ok`: inside the slot, so below `MAX_SLOT_PAGES`.
                list.extend(inside.iter().filter_map(|&p| u32::try_from(p.into()).ok()));
                if !was_empty {
                    // Two sorted runs: the stable sort merges them in linear time. (Into an empty list
                    // the copy is already sorted without repeats.)
                    list.sort();
                    list.dedup();
                }
                self.densify_if_large();
            }
            Pages::Dense { words, count } => {
                for p in inside.iter().map(|&p| p.into()) {
                    if let Some(w) = words.get_mut((p / PAGES_PER_WORD) as usize) {
                        let bit = 1 << (p % PAGES_PER_WORD);
                        *count += u64::from(*w & bit == 0);
                        *w |= bit;
                    }
                }
            }
        }
    }

    /// Adds a harvest's `offsets`, sorted ascending with repeats, and leaves `offsets` empty; those at or
    /// past the slot's end are skipped. An empty sparse set (a collect's fresh one) takes `offsets`'
    /// memory as its list instead of copying it, and `offsets` gets new memory with room for as many
    /// entries, so the next harvest into it does not grow it step by step.
    pub(crate) fn take_ascending(&mut self, offsets: &mut Vec<u32>) {
        let pages = self.pages;
        offsets.dedup();
        offsets.truncate(offsets.partition_point(|&p| u64::from(p) < pages));
        match &mut self.set {
            Pages::Sparse(list) if list.is_empty() => {
                let capacity = offsets.capacity();
                std::mem::swap(list, offsets);
                offsets.reserve(capacity);
                self.densify_if_large();
            }
            Pages::Sparse(_) | Pages::Dense { .. } => {
                self.extend_sorted(offsets);
                offsets.clear();
            }
        }
    }

    /// Adds every page of `other` (same slot geometry assumed; pages past our end are skipped).
    pub(crate) fn merge(&mut self, other: &SlotDirty) {
        match &other.set {
            Pages::Sparse(list) => self.extend_sorted(list),
            Pages::Dense { words, .. } => {
                self.merge_words(words);
            }
        }
    }

    /// Empties the set, dropping a bitmap (a ring collect should not pay for clearing one).
    fn clear(&mut self) {
        match &mut self.set {
            Pages::Sparse(list) => list.clear(),
            Pages::Dense { .. } => self.set = Pages::Sparse(Vec::new()),
        }
    }

    /// Bits of the last word that are pages of the slot.
    const fn tail_mask(&self) -> u64 {
        match self.pages % PAGES_PER_WORD {
            0 => u64::MAX,
            tail => (1 << tail) - 1,
        }
    }

    /// Whether a sorted list of `len` offsets would take more memory than the slot's bitmap.
    const fn too_large_for_sparse(&self, len: u64) -> bool {
        len > words_for(self.pages) && len > 64
    }

    fn densify_if_large(&mut self) {
        if let Pages::Sparse(list) = &self.set
            && self.too_large_for_sparse(list.len() as u64)
        {
            self.densify();
        }
    }

    fn densify(&mut self) {
        if let Pages::Sparse(list) = &self.set {
            self.set = Pages::Dense { words: sparse_words(list, self.pages), count: list.len() as u64 };
        }
    }
}

/// The bitmap of a sparse list of a slot of `pages` pages: bit `p % 64` of word `p / 64` for each `p`.
fn sparse_words(list: &[u32], pages: u64) -> Vec<u64> {
    let mut words = vec![0u64; usize::try_from(words_for(pages)).unwrap_or(0)];
    for p in list.iter().map(|&p| u64::from(p)) {
        if let Some(w) = words.get_mut((p / PAGES_PER_WORD) as usize) {
            *w |= 1 << (p % PAGES_PER_WORD);
        }
    }
    words
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

    /// Adds every page of `other`. Slots `self` lacks are added.
    pub fn merge(&mut self, other: &DirtySets) {
        for (key, theirs) in &other.slots {
            match self.slots.get_mut(key) {
                Some(ours) => ours.merge(theirs),
                None => {
                    self.slots.insert(*key, theirs.clone());
                }
            }
        }
    }

    /// Whether there is no slot's set at all (not even an empty one).
    pub(crate) fn has_no_slots(&self) -> bool {
        self.slots.is_empty()
    }

    /// Empties every slot's set, keeping the slots.
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tdp_core::addr::{AsId, Gpa, RingSlot, SlotId};

    use super::SlotDirty;

    /// A reference model: every operation on a `SlotDirty` against a `BTreeSet`, across the switch from
    /// sparse to dense (a 1000-page slot turns dense above 64 pages).
    #[test]
    fn i4_slot_sets_match_a_reference_set_across_sparse_and_dense() {
        let slot = RingSlot::new(AsId(0), SlotId(3));
        let mut s = SlotDirty::new(slot, Gpa(0), 1000);
        let mut model = BTreeSet::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..400u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = x % 1100; // some past the end
            match round % 4 {
                0 | 1 => assert_eq!(s.insert(p), p < 1000),
                2 => {
                    let batch: Vec<u64> = (p..p + 5).collect();
                    s.extend_sorted(&batch);
                }
                _ => {
                    let mut words = vec![0u64; 16];
                    words[(p % 1000 / 64) as usize] = x;
                    assert_eq!(s.merge_words(&words), {
                        let w = (p % 1000 / 64) as usize;
                        (0..64).filter(|b| x & (1 << b) != 0 && (w as u64 * 64 + b) < 1000).count() as u64
                    });
                    for b in 0..64 {
                        let page = (p % 1000 / 64) * 64 + b;
                        if x & (1 << b) != 0 && page < 1000 {
                            model.insert(page);
                        }
                    }
                }
            }
            if round % 4 < 2 && p < 1000 {
                model.insert(p);
            }
            if round % 4 == 2 {
                model.extend((p..p + 5).filter(|&q| q < 1000));
            }
            assert_eq!(s.count(), model.len() as u64, "round {round}");
            assert!(s.offsets().eq(model.iter().copied()), "round {round}");
        }
        assert!(matches!(s.set, super::Pages::Dense { .. }), "the set grew past the sparse limit");
        let mut other = SlotDirty::new(slot, Gpa(0), 1000);
        other.insert(999);
        other.merge(&s);
        model.insert(999);
        assert!(other.offsets().eq(model.iter().copied()));
        assert_eq!(other, s.clone().tap_insert(999));
        s.clear();
        assert!(s.is_empty() && matches!(s.set, super::Pages::Sparse(_)));
    }

    #[test]
    fn i4_merge_words_turning_dense_midway_keeps_and_counts_every_page() {
        let slot = RingSlot::new(AsId(0), SlotId(0));
        // 10_000 pages: 157 words, so the sparse limit is 157 offsets; 3 bits a word overflows it midway.
        let mut s = SlotDirty::new(slot, Gpa(0), 10_000);
        let mut model: BTreeSet<u64> = (0..10).map(|i| i * 997).collect();
        for &p in &model {
            s.insert(p);
        }
        let words: Vec<u64> = (0..157u64).map(|i| 1 | 1 << (i % 60 + 1) | 1 << 63).collect();
        let mut incoming = 0;
        for (i, w) in words.iter().enumerate() {
            for b in 0..64 {
                let page = i as u64 * 64 + b;
                if w & (1 << b) != 0 && page < 10_000 {
                    model.insert(page);
                    incoming += 1;
                }
            }
        }
        assert_eq!(s.merge_words(&words), incoming, "every page of the bitmap counted once");
        assert!(matches!(s.set, super::Pages::Dense { .. }));
        assert_eq!(s.count(), model.len() as u64);
        assert!(s.offsets().eq(model.iter().copied()));
    }

    trait TapInsert {
        fn tap_insert(self, p: u64) -> Self;
    }
    impl TapInsert for SlotDirty {
        fn tap_insert(mut self, p: u64) -> Self {
            self.insert(p);
            self
        }
    }
}
