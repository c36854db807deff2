//! A harvest's valid ring entries, bucketed by slot, on their way into a [`DirtySets`]: taken entry by
//! entry while the ring is read ([`Batch::take`]), then sorted into the slots' sets ([`publish`]).
//!
//! Keeps: I5 (an entry naming an unknown slot, or an offset at or past its slot's end, is counted and
//! skipped; nothing is indexed with it).

use std::collections::BTreeMap;

use tdp_core::dirty_ring::DirtyEntry;

use super::{DirtySets, SlotState, radix};
use crate::ring::DirtyRing;

/// Validated ring entries, bucketed by slot. Reused across harvests: the buckets and the sort's scratch
/// keep their memory.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Per slot (`as_id << 16 | id`), its valid offsets, in ring order with repeats. 32 bits: a
    /// registered slot has at most [`MAX_SLOT_PAGES`](super::MAX_SLOT_PAGES) pages, and the sort moves
    /// half the bytes of `u64` offsets.
    buckets: Vec<(u32, Vec<u32>)>,
    /// Scratch for sorting a bucket.
    sort: radix::Scratch,
}

/// What [`Batch::take`] skipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// Entries naming a slot that is not registered.
    pub(crate) slot: u64,
    /// Entries whose offset lies at or past their slot's end.
    pub(crate) offset: u64,
}

impl Batch {
    /// Takes one harvest's entries, checked against `slots` (one guard for the whole harvest): each valid
    /// one goes to its slot's bucket, a bad one is counted. Returns how many entries `entries` gave, and
    /// what was skipped.
    ///
    /// Consecutive entries mostly name the same slot, so the slot of the previous entry (the *hot* one)
    /// and its size stay at hand, and a slot is looked up only when an entry names another one. That
    /// state, and the count of entries not yet in their bucket, are locals: the ring's flags are atomics,
    /// and state that other code can see (a field, or a `Vec` whose growth path gets a reference to it)
    /// is written back to memory and read again at every entry, a dependent store and load per entry.
    /// Entries gather in a small array on the stack and join their bucket [`CHUNK`] at a time.
    #[inline]
    pub(crate) fn take(
        &mut self,
        slots: &BTreeMap<u32, SlotState>,
        entries: impl Entries,
    ) -> (usize, Invalid) {
        let mut hot: Option<Hot> = None;
        let mut list = Vec::new();
        let mut chunk = [0u32; CHUNK];
        let mut filled = 0;
        let mut invalid = Invalid::default();
        let n = entries.each(|e| {
            let key = e.slot.raw();
            let pages = match hot {
                Some(h) if h.key == key => h.pages,
                _ => {
                    hot = self.select(slots, hot, key, &mut list, chunk.get(..filled).unwrap_or_default());
                    filled = 0;
                    match hot {
                        Some(h) => h.pages,
                        None => {
                            invalid.slot += 1;
                            return;
                        }
                    }
                }
            };
            match (u32::try_from(e.offset), chunk.get_mut(filled)) {
                (Ok(offset), Some(c)) if e.offset < pages => {
                    *c = offset;
                    filled += 1;
                    if filled == CHUNK {
                        list.extend_from_slice(&chunk);
                        filled = 0;
                    }
                }
                _ => invalid.offset += 1,
            }
        });
        self.put_back(hot, &mut list, chunk.get(..filled).unwrap_or_default());
        (n, invalid)
    }

    /// Ends the hot slot's run (its `pending` entries join `list`, which goes back to its bucket) and
    /// makes `key`'s bucket (added if missing) the hot one, its list moved into `list`; `None` if no slot
    /// `key` is registered.
    #[cold]
    #[inline(never)]
    fn select(
        &mut self,
        slots: &BTreeMap<u32, SlotState>,
        hot: Option<Hot>,
        key: u32,
        list: &mut Vec<u32>,
        pending: &[u32],
    ) -> Option<Hot> {
        self.put_back(hot, list, pending);
        let slot = slots.get(&key)?;
        let bucket = match self.buckets.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.buckets.push((key, Vec::new()));
                self.buckets.len() - 1
            }
        };
        let (_, taken) = self.buckets.get_mut(bucket)?;
        std::mem::swap(taken, list);
        Some(Hot { key, pages: slot.spec.pages, bucket })
    }

    /// Moves the hot slot's `pending` entries into `list`, and `list` back into its bucket.
    fn put_back(&mut self, hot: Option<Hot>, list: &mut Vec<u32>, pending: &[u32]) {
        if let Some(h) = hot
            && let Some((_, taken)) = self.buckets.get_mut(h.bucket)
        {
            list.extend_from_slice(pending);
            std::mem::swap(taken, list);
        }
    }

    /// Starts bringing the memory a harvest and its sort will write into the caches (the buckets' lists
    /// and the sort's scratch), so that a collect waits for it once, early, instead of line by line: a
    /// collect follows the guest's run, which pushed it out.
    pub(crate) fn prefetch(&self) {
        for (_, list) in &self.buckets {
            crate::sys::prefetch(list.as_ptr().cast(), list.capacity() * size_of::<u32>());
        }
        self.sort.prefetch();
    }

    /// Empties every bucket, keeping their memory.
    pub(crate) fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|(_, l)| l.clear());
    }

    /// The waiting entries per slot, in ring order.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> Vec<(u32, Vec<u32>)> {
        self.buckets.iter().filter(|(_, l)| !l.is_empty()).cloned().collect()
    }
}

/// Entries gathered on the stack before they join their bucket.
const CHUNK: usize = 64;

/// The slot of the previous entry: its key, its size in pages under this harvest's guard, and its
/// bucket's index.
#[derive(Clone, Copy, Debug)]
struct Hot {
    key: u32,
    pages: u64,
    bucket: usize,
}

/// Where a harvest's entries come from: a vCPU's ring, or (in tests) a list.
pub(crate) trait Entries {
    /// Hands every entry to `f`, in order; returns how many.
    fn each(self, f: impl FnMut(DirtyEntry)) -> usize;
}

impl Entries for &mut DirtyRing {
    #[inline]
    fn each(self, f: impl FnMut(DirtyEntry)) -> usize {
        self.harvest(usize::MAX, f)
    }
}

#[cfg(test)]
impl Entries for &[DirtyEntry] {
    #[inline]
    fn each(self, mut f: impl FnMut(DirtyEntry)) -> usize {
        self.iter().for_each(|&e| f(e));
        self.len()
    }
}

/// Moves the batch into `set`: each slot's offsets sorted, each once, into the slot's set. Entries of a
/// slot unregistered since they were validated are dropped, with the slot; offsets past the end of a slot
/// registered again, smaller, under the same id since then are dropped too. Leaves the batch empty.
pub(crate) fn publish(slots: &BTreeMap<u32, SlotState>, set: &mut DirtySets, batch: &mut Batch) {
    let Batch { buckets, sort } = batch;
    for (key, offsets) in buckets {
        if offsets.is_empty() {
            continue;
        }
        if let Some(s) = slots.get(key) {
            radix::sort(offsets, s.spec.pages, sort);
            set.add_slot(s.spec.key(), s.spec.guest_base, s.spec.pages).take_ascending(offsets);
        }
        offsets.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tdp_core::addr::RingSlot;
    use tdp_core::dirty_ring::DirtyEntry;

    use super::{Batch, Invalid, publish};
    use crate::tracker::{DirtySets, SlotSpec, SlotState};

    fn slots(specs: &[SlotSpec]) -> BTreeMap<u32, SlotState> {
        specs.iter().map(|&spec| (spec.key().raw(), SlotState { spec, buf: None, vmm: None })).collect()
    }

    fn entry(slot: u32, offset: u64) -> DirtyEntry {
        DirtyEntry { slot: RingSlot::from_raw(slot), offset }
    }

    #[test]
    fn i5_entries_of_interleaved_slots_land_in_their_buckets_and_bad_ones_are_only_counted() {
        let slots = slots(&[SlotSpec::new(1, 0x10_0000, 100), SlotSpec::new(2, 0x100_0000, 1 << 20)]);
        let mut batch = Batch::default();
        // Slots switch back and forth; bad entries come right after good ones of the hot slot, and good
        // ones right after bad ones, so that the hot slot cannot let a bad one through.
        let entries: Vec<DirtyEntry> = [
            (1, 5),
            (1, 99),
            (1, 100),
            (1, u64::MAX),
            (2, 0),
            (3, 0),
            (1, 5),
            (0x0001_0001, 5),
            (2, (1 << 20) - 1),
            (2, 1 << 20),
            (2, 1 << 32),
            (1, 7),
        ]
        .into_iter()
        .map(|(slot, offset)| entry(slot, offset))
        .collect();
        assert_eq!(batch.take(&slots, entries.as_slice()), (entries.len(), Invalid { slot: 2, offset: 4 }));
        assert_eq!(batch.pending(), [(1, vec![5, 99, 5, 7]), (2, vec![0, (1 << 20) - 1])]);
        let mut sets = DirtySets::default();
        publish(&slots, &mut sets, &mut batch);
        assert!(batch.pending().is_empty());
        let got =
            |slot: u16| sets.get(SlotSpec::new(slot, 0, 1).key()).map(|s| s.offsets().collect::<Vec<_>>());
        assert_eq!(got(1), Some(vec![5, 7, 99]));
        assert_eq!(got(2), Some(vec![0, (1 << 20) - 1]));
        assert_eq!(sets.iter().count(), 2, "no set invented for an unknown slot");
    }

    #[test]
    fn i4_a_harvest_sorted_into_a_set_with_pages_already_is_a_union() {
        let spec = SlotSpec::new(1, 0, 1 << 18);
        let slots = slots(&[spec]);
        let mut sets = DirtySets::default();
        sets.add_slot(spec.key(), spec.guest_base, spec.pages);
        for p in [3, 500, 1 << 17] {
            sets.insert(spec.key(), p);
        }
        let mut batch = Batch::default();
        // Enough entries for the radix sort and for several chunks, with repeats, and pages the set has
        // already.
        let harvested: Vec<u64> = (0..1000u64).map(|i| (i * 7919) % (1 << 18)).chain([3, 500, 3]).collect();
        let entries: Vec<DirtyEntry> = harvested.iter().map(|&p| entry(spec.key().raw(), p)).collect();
        assert_eq!(batch.take(&slots, entries.as_slice()), (entries.len(), Invalid::default()));
        publish(&slots, &mut sets, &mut batch);
        let mut want: Vec<u64> = harvested.iter().copied().chain([1 << 17]).collect();
        want.sort_unstable();
        want.dedup();
        let got: Vec<u64> = sets.get(spec.key()).map(|s| s.offsets().collect()).unwrap_or_default();
        assert_eq!(got, want);
    }

    /// One slot of a generated case: its id, its size, and pages its set holds before the harvest.
    type SlotCase = (u16, u64, Vec<u64>);

    fn slot_cases() -> impl proptest::strategy::Strategy<Value = Vec<SlotCase>> {
        use proptest::prelude::*;
        let size = prop_oneof![1u64..100, 100u64..5000, Just(1 << 18), Just(crate::MAX_SLOT_PAGES)];
        proptest::collection::vec(
            (1u16..5, size).prop_flat_map(|(id, pages)| {
                (Just(id), Just(pages), proptest::collection::vec(0..pages, 0..20))
            }),
            1..4,
        )
    }

    proptest::proptest! {
        /// Whatever the rings hold (several slots, interleaved; unknown slots; offsets past their slot;
        /// repeats; more entries than a chunk), taking them all (one to three rings, as a collect does)
        /// then one publish leave each slot's set equal to its pages before plus the valid entries, and
        /// count every bad entry once.
        #[test]
        fn i4_i5_take_and_publish_match_a_reference_set(
            slots_case in slot_cases(),
            raw in proptest::collection::vec((0usize..5, proptest::num::u64::ANY, 0u8..4), 0..600),
            rings in 1usize..4,
        ) {
            use std::collections::{BTreeMap as Map, BTreeSet};
            // Later duplicates of an id are dropped, as `register_slot` would refuse them.
            let mut specs: Map<u16, (SlotSpec, Vec<u64>)> = Map::new();
            for (id, pages, before) in slots_case {
                specs.entry(id).or_insert((SlotSpec::new(id, 0, pages), before));
            }
            let registered: Vec<SlotSpec> = specs.values().map(|(spec, _)| *spec).collect();
            let slots = slots(&registered);
            let mut sets = DirtySets::default();
            let mut want: Map<u32, BTreeSet<u64>> = Map::new();
            for (spec, before) in specs.values() {
                sets.add_slot(spec.key(), spec.guest_base, spec.pages);
                for &p in before {
                    sets.insert(spec.key(), p);
                }
                want.insert(spec.key().raw(), before.iter().copied().collect());
            }
            // An entry names slot id 0-4 (some not registered); its offset is inside its slot (kind 0-1),
            // just past it (2), or anything (3).
            let mut invalid = Invalid::default();
            let entries: Vec<DirtyEntry> = raw
                .iter()
                .map(|&(id, any, kind)| {
                    let id = id as u16;
                    let spec = specs.get(&id).map(|(spec, _)| *spec);
                    let offset = match (spec, kind) {
                        (Some(s), 0 | 1) => any % s.pages,
                        (Some(s), 2) => s.pages + any % 3,
                        _ => any,
                    };
                    match spec {
                        None => invalid.slot += 1,
                        Some(s) if offset >= s.pages => invalid.offset += 1,
                        Some(s) => {
                            want.entry(s.key().raw()).or_default().insert(offset);
                        }
                    }
                    entry(u32::from(id), offset)
                })
                .collect();
            let mut batch = Batch::default();
            let (mut taken, mut skipped) = (0, Invalid::default());
            for ring in entries.chunks(entries.len().div_ceil(rings).max(1)) {
                let (n, bad) = batch.take(&slots, ring);
                taken += n;
                skipped.slot += bad.slot;
                skipped.offset += bad.offset;
            }
            proptest::prop_assert_eq!((taken, skipped), (entries.len(), invalid));
            publish(&slots, &mut sets, &mut batch);
            proptest::prop_assert!(batch.pending().is_empty());
            for (key, pages) in want {
                let got: Vec<u64> =
                    sets.get(RingSlot::from_raw(key)).map(|s| s.offsets().collect()).unwrap_or_default();
                proptest::prop_assert_eq!(got, pages.into_iter().collect::<Vec<_>>());
            }
        }
    }
}
