//! The tracker's harvest paths: a collect over every source, one ring at its vCPU's ring-full exit, and
//! the validation of each ring entry against the registered slots.
//!
//! Keeps: I4 (a ring-full harvest is reset, then published to the pending set, under the ring's lock, so
//! a collect never returns a page KVM has not re-protected and never misses one it took) and I5 (entries
//! naming an unknown slot or an offset beyond their slot are counted and skipped).

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::Ordering;

use tdp_core::dirty_ring::{DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_MASK};

use super::batch::{Batch, Entries, publish};
use super::external::take_vmm_bitmap;
use super::stats::{add, get};
use super::{DirtySets, DirtyTracker, SlotState, TrackingMode, VcpuState, lock, read};
use crate::bitmap::{clear_whole_slot, get_dirty_log};
use crate::error::{Error, Result};
use crate::ring::{DirtyRing, reset_dirty_rings};

impl DirtyTracker {
    /// Harvests every source into `fresh` and re-protects: first each slot's set, with the writes its VMM
    /// bitmap recorded, then KVM's. `entries` is scratch for ring entries, `vcpus` for the list of vCPUs
    /// (left empty), `offsets` for a VMM bitmap's pages.
    pub(super) fn harvest_all(
        &self,
        fresh: &mut DirtySets,
        entries: &mut Batch,
        vcpus: &mut Vec<Arc<VcpuState>>,
        offsets: &mut Vec<u64>,
    ) -> Result<()> {
        let plan = Plan::of(self.mode);
        {
            let slots = read(&self.slots, "slots")?;
            for s in slots.values() {
                let set = fresh.add_slot(s.spec.key(), s.spec.guest_base, s.spec.pages);
                if let Some(bitmap) = &s.vmm {
                    take_vmm_bitmap(bitmap, set, offsets);
                }
            }
        }
        if plan.rings {
            entries.prefetch();
            // Copied out (into reused memory), so the vCPU list is not read-locked while a ring is locked.
            vcpus.clear();
            vcpus.extend(read(&self.vcpus, "vcpus")?.iter().cloned());
            let taken = self.take_rings(entries, vcpus);
            vcpus.clear();
            // Every ring, then one sort per slot of all the rings' entries (published ring by ring, a
            // slot's set would be sorted and merged once per vCPU), while they are still in the near caches
            // (after KVM's reset they are not: about 2 us more per 1000 entries, measured). Published even
            // if a ring failed: what was taken goes to `fresh`, which the caller moves to the pending set
            // on error. The reset comes before the caller sees `fresh`.
            publish(&*read(&self.slots, "slots")?, fresh, entries);
            taken?;
            self.reset_rings()?;
        }
        if plan.bitmap {
            let slots = read(&self.slots, "slots")?;
            for s in slots.values() {
                let Some(buf) = &s.buf else { continue };
                let mut buf = lock(buf, "bitmap buffer")?;
                let key = s.spec.key().raw();
                get_dirty_log(self.vm.as_fd(), key, &mut buf)?;
                let n =
                    fresh.add_slot(s.spec.key(), s.spec.guest_base, s.spec.pages).merge_words(buf.words());
                add(&self.counters.harvested, n);
                if plan.clear {
                    clear_whole_slot(self.vm.as_fd(), key, s.spec.pages, buf.words())?;
                }
            }
        }
        Ok(())
    }

    /// Takes every ring's entries in `vcpus` into `batch`.
    fn take_rings(&self, batch: &mut Batch, vcpus: &[Arc<VcpuState>]) -> Result<()> {
        for v in vcpus {
            let Some(ring) = &v.ring else { continue };
            self.take_ring(v, &mut *lock(ring, "ring")?, batch)?;
        }
        Ok(())
    }

    /// Takes vCPU `v`'s ring (locked by the caller) into `batch` and counts what it took; returns how many
    /// entries the ring gave.
    fn take_ring(&self, v: &VcpuState, ring: &mut DirtyRing, batch: &mut Batch) -> Result<usize> {
        let n = self.take(&*read(&self.slots, "slots")?, batch, &mut *ring);
        add(&v.counters.harvested, n as u64);
        self.note_full(ring, n);
        add(&self.counters.harvested, n as u64);
        Ok(n)
    }

    /// Takes one harvest's entries into `batch`, under one `slots` guard, and returns how many `entries`
    /// gave. Entries naming an unknown slot or an offset past their slot are counted in the statistics
    /// and skipped (I5).
    pub(super) fn take(
        &self,
        slots: &BTreeMap<u32, SlotState>,
        batch: &mut Batch,
        entries: impl Entries,
    ) -> usize {
        let (n, invalid) = batch.take(slots, entries);
        if invalid.slot > 0 {
            add(&self.counters.invalid_slot, invalid.slot);
        }
        if invalid.offset > 0 {
            add(&self.counters.invalid_offset, invalid.offset);
        }
        n
    }

    /// Harvests one vCPU's ring at its ring-full exit: harvest, reset, then publish into the pending set,
    /// all under the ring's lock. Returns (entries harvested, entries KVM reset, entries harvested from this
    /// ring by anyone before this call). `scratch` is the runner's reusable buffer.
    pub(crate) fn harvest_ring_full(&self, v: &VcpuState, scratch: &mut Batch) -> Result<(usize, u32, u64)> {
        let Some(ring) = &v.ring else { return Err(Error::RingNotEnabled { op: "ring-full harvest" }) };
        let mut ring = lock(ring, "ring")?;
        let before = get(&v.counters.harvested);
        scratch.clear();
        let n = self.take_ring(v, &mut ring, scratch)?;
        add(&v.counters.ring_full_exits, 1);
        // Reset before publishing: a collect that takes these pages from the pending set must find them
        // re-protected. If the reset fails, publish anyway (they were harvested) and report the error.
        let reset = self.reset_rings();
        {
            let slots = read(&self.slots, "slots")?;
            self.pending.add(|pending| publish(&slots, pending, scratch))?;
        }
        Ok((n, reset?, before))
    }

    /// `KVM_RESET_DIRTY_RINGS`, counted: the entries KVM reports resetting, and the time the call took
    /// (see [`TrackerStats::reset_time`]).
    ///
    /// [`TrackerStats::reset_time`]: super::TrackerStats::reset_time
    fn reset_rings(&self) -> Result<u32> {
        let start = Instant::now();
        let reset = reset_dirty_rings(self.vm.as_fd());
        add(&self.counters.reset_nanos, u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        let reset = reset?;
        add(&self.counters.reset_entries, u64::from(reset));
        Ok(reset)
    }

    /// Counts a harvest that emptied a completely full ring (see [`TrackerStats::full_rings`]).
    ///
    /// [`TrackerStats::full_rings`]: super::TrackerStats::full_rings
    fn note_full(&self, ring: &DirtyRing, harvested: usize) {
        if harvested >= ring.config().entries() as usize {
            add(&self.counters.full_rings, 1);
        }
    }

    /// Entries of `v`'s ring flagged dirty (and not harvested) anywhere in the ring: a diagnostic for a ring
    /// whose producer left the consumer's position.
    pub(crate) fn count_published(&self, v: &VcpuState) -> Result<u32> {
        let Some(ring) = &v.ring else { return Ok(0) };
        let ring = lock(ring, "ring")?;
        let n = ring
            .entries()
            .iter()
            .filter(|e| e.flags.load(Ordering::Acquire) & DIRTY_GFN_F_MASK == DIRTY_GFN_F_DIRTY)
            .count();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// What a collect does in a mode: harvest the rings (then `KVM_RESET_DIRTY_RINGS`), get each slot's bitmap,
/// and clear what it got (`KVM_CLEAR_DIRTY_LOG`). Kept as data so every mode's plan is tested, including
/// ring-with-bitmap, which this project's hosts do not offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) rings: bool,
    pub(crate) bitmap: bool,
    pub(crate) clear: bool,
}

impl Plan {
    pub(crate) const fn of(mode: TrackingMode) -> Plan {
        let (rings, bitmap, clear) = match mode {
            TrackingMode::Ring(_) => (true, false, false),
            // Rings first: the bitmap holds only what no vCPU logged; without manual protection (which
            // KVM refuses alongside a ring) its get also clears and re-protects.
            TrackingMode::RingWithBitmap(_) => (true, true, false),
            TrackingMode::GetAndClear | TrackingMode::ClearLogChunked => (false, true, false),
            TrackingMode::ClearLog => (false, true, true),
        };
        Plan { rings, bitmap, clear }
    }
}

#[cfg(test)]
mod plan_tests {
    use tdp_core::dirty_ring::RingConfig;

    use super::{Plan, TrackingMode};

    #[test]
    fn i4_every_mode_harvests_every_source_it_has_and_clears_only_in_clear_log() {
        let cfg = RingConfig::new(4096, 0).unwrap();
        let p = |rings, bitmap, clear| Plan { rings, bitmap, clear };
        assert_eq!(Plan::of(TrackingMode::Ring(cfg)), p(true, false, false));
        assert_eq!(Plan::of(TrackingMode::RingWithBitmap(cfg)), p(true, true, false));
        assert_eq!(Plan::of(TrackingMode::GetAndClear), p(false, true, false));
        assert_eq!(Plan::of(TrackingMode::ClearLog), p(false, true, true));
        assert_eq!(Plan::of(TrackingMode::ClearLogChunked), p(false, true, false), "the caller clears");
    }
}

#[cfg(all(test, feature = "kvm-ioctls"))]
mod tests {
    use tdp_core::addr::RingSlot;
    use tdp_core::dirty_ring::DirtyEntry;

    use crate::testing::{LogSetup, TestVm};
    use crate::{DirtySets, DirtyTracker, SlotSpec, TrackingMode};

    #[test]
    fn i5_ring_entries_naming_unknown_slots_or_offsets_beyond_are_counted_and_skipped() {
        let Some(t) = TestVm::new_or_skip(&[], LogSetup::NotLogged).unwrap() else { return };
        let tracker = DirtyTracker::new(&t.vm, TrackingMode::GetAndClear).unwrap();
        tracker.register_slot(SlotSpec::new(1, 0x10_0000, 100)).unwrap();
        let slot = SlotSpec::new(1, 0x10_0000, 100).key();
        let mut set = DirtySets::default();
        {
            let slots = super::read(&tracker.slots, "slots").unwrap();
            let mut valid = super::Batch::default();
            // The bad entries come after valid ones of the registered slot, and valid ones after bad
            // ones, so that the cached slot cannot let a bad one through.
            let entries = [
                (1, 5),
                (1, 99),
                (1, 100),
                (1, u64::MAX),
                (2, 0),
                (0x0001_0001, 5),
                (1, 5),
                (2, 1),
                (1, 100),
            ];
            let entries: Vec<DirtyEntry> = entries
                .iter()
                .map(|&(raw, offset)| DirtyEntry { slot: RingSlot::from_raw(raw), offset })
                .collect();
            let n = tracker.take(&slots, &mut valid, entries.as_slice());
            assert_eq!(n, entries.len());
            assert_eq!(valid.pending(), [(1, vec![5, 99, 5])]);
            super::publish(&slots, &mut set, &mut valid);
            assert!(valid.pending().is_empty());
        }
        let got: Vec<u64> = set.get(slot).unwrap().offsets().collect();
        assert_eq!(got, [5, 99], "valid entries kept once, bad ones skipped");
        assert_eq!(set.iter().count(), 1, "no set invented for an unknown slot");
        let stats = tracker.stats().unwrap();
        assert_eq!((stats.invalid_offset, stats.invalid_slot), (3, 3));
    }
}
