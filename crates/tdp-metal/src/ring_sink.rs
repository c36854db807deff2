//! [`RingSink`]: a vCPU's dirty ring as a `tdp-core` [`DirtySink`], for the fault path and the PML drain.
//!
//! A push at or above the soft limit asks the vCPU to exit to the VMM before it enters the guest again
//! (KVM's `KVM_REQ_DIRTY_RING_SOFT_FULL`); [`RingSink::must_exit`] says so. The ring's reserve (see
//! [`tdp_core::dirty_ring::RingConfig::new`] with `PML_ENTRIES`) covers what one exit can still produce,
//! a full PML log included, so a hard-full ring should never be met. If it is (a reserve too small for
//! the hypervisor's exit path), the mark is kept in an overflow list, in order, and pushed after the next
//! reset ([`RingSink::reset`]): a mark is never dropped while memory for the list can be had, and one
//! that cannot be kept is counted in [`SinkStats::lost`], never hidden.
//!
//! Keeps: I4 through the ring (every mark reaches the ring, in order, exactly once).

use alloc::vec::Vec;

use tdp_core::addr::{Gfn, RingSlot};
use tdp_core::dirty_ring::{
    DirtyRingProducer, PML_ENTRIES, PushOutcome, ReprotectBatch, ResetStats, ResetTarget,
};
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, MemslotSet};

/// Counters of a [`RingSink`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SinkStats {
    /// Marks pushed into the ring.
    pub pushed: u64,
    /// Of those, marks from the PML drain.
    pub from_pml: u64,
    /// Pushes that found the ring at or above its soft limit.
    pub soft_full_pushes: u64,
    /// Marks that met a full ring and went to the overflow list.
    pub overflowed: u64,
    /// Marks that met a full ring when the overflow list could not grow: lost, an I4 violation.
    pub lost: u64,
}

/// A dirty-ring producer as the dirty sink of one vCPU.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, SlotId};
/// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingProducer, RingConfig};
/// use tdp_core::host::{DirtySink, DirtySource};
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// use tdp_metal::ring_sink::RingSink;
///
/// let cfg = RingConfig::new(1024, tdp_core::dirty_ring::PML_ENTRIES)?; // soft limit 1024 - 576 = 448
/// let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
/// let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg)?)?;
/// let slot = Memslot::new(AsId(0), SlotId(2), Gfn(0x100), 4096, 0x100_0000, SlotFlags::LOG_DIRTY);
/// for i in 0..448 {
///     sink.mark_dirty(&slot, Gfn(0x100 + i), DirtySource::HardwareLog);
/// }
/// assert!(sink.must_exit(), "the 448th push reached the soft limit");
/// assert_eq!((sink.stats().pushed, sink.stats().lost), (448, 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RingSink<'a> {
    producer: DirtyRingProducer<'a>,
    /// Marks that met a full ring, oldest first.
    overflow: Vec<(RingSlot, u64)>,
    stats: SinkStats,
}

/// The overflow list could not reserve its initial capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no memory for the dirty-ring overflow list ({entries} entries)")]
pub struct SinkAllocError {
    /// The capacity asked for.
    pub entries: usize,
}

impl<'a> RingSink<'a> {
    /// A sink over `producer`, with room reserved to keep one full PML log of overflow without
    /// allocating on the exit path.
    ///
    /// # Errors
    /// [`SinkAllocError`] when that room cannot be allocated.
    pub fn new(producer: DirtyRingProducer<'a>) -> Result<RingSink<'a>, SinkAllocError> {
        let entries = PML_ENTRIES as usize;
        let mut overflow = Vec::new();
        overflow.try_reserve(entries).map_err(|_| SinkAllocError { entries })?;
        Ok(RingSink { producer, overflow, stats: SinkStats::default() })
    }

    /// Whether the vCPU must exit to the VMM before entering the guest: the ring is at its soft limit,
    /// or marks wait in the overflow list.
    #[must_use]
    pub fn must_exit(&self) -> bool {
        self.producer.is_soft_full() || !self.overflow.is_empty()
    }

    /// Marks waiting for room in the ring.
    #[must_use]
    pub fn overflowed(&self) -> usize {
        self.overflow.len()
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> SinkStats {
        self.stats
    }

    /// The producer (indices, soft-full state).
    #[must_use]
    pub fn producer(&self) -> &DirtyRingProducer<'a> {
        &self.producer
    }

    /// Resets the harvested entries (KVM's `KVM_RESET_DIRTY_RINGS`, see
    /// [`DirtyRingProducer::reset`]), then pushes the overflow list into the room made. The caller owes
    /// the flush the target collected.
    pub fn reset(&mut self, target: &mut impl ResetTarget) -> ResetStats {
        let stats = self.producer.reset(target);
        self.push_overflow();
        stats
    }

    /// [`RingSink::reset`] against `slots`, handing each batch to `reprotect` (see
    /// [`DirtyRingProducer::reset_with`]).
    pub fn reset_with(&mut self, slots: &MemslotSet, reprotect: impl FnMut(ReprotectBatch)) -> ResetStats {
        let stats = self.producer.reset_with(slots, reprotect);
        self.push_overflow();
        stats
    }

    /// Runs a reset done by someone else on the producer (e.g. `tdp-core`'s
    /// `ExclusiveMmu::reset_dirty_ring`, which re-protects the pages itself), then pushes the overflow
    /// list into the room made. Returns what `reset` returned.
    pub fn reset_by<T>(&mut self, reset: impl FnOnce(&mut DirtyRingProducer<'a>) -> T) -> T {
        let out = reset(&mut self.producer);
        self.push_overflow();
        out
    }

    /// Pushes overflowed marks, oldest first, while the ring has room; returns how many went in.
    pub fn push_overflow(&mut self) -> usize {
        let mut pushed = 0;
        while let Some(&(slot, offset)) = self.overflow.get(pushed) {
            match self.producer.push(slot, offset) {
                Ok(outcome) => {
                    self.count_push(outcome, false);
                    pushed += 1;
                }
                Err(_) => break,
            }
        }
        self.overflow.drain(..pushed);
        pushed
    }

    fn count_push(&mut self, outcome: PushOutcome, from_pml: bool) {
        self.stats.pushed += 1;
        self.stats.from_pml += u64::from(from_pml);
        self.stats.soft_full_pushes += u64::from(outcome.is_soft_full());
    }

    fn keep(&mut self, slot: RingSlot, offset: u64) {
        if self.overflow.try_reserve(1).is_ok() {
            self.overflow.push((slot, offset));
            self.stats.overflowed += 1;
        } else {
            self.stats.lost += 1;
        }
    }
}

impl DirtySink for RingSink<'_> {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, source: DirtySource) {
        let ring_slot = RingSlot::new(slot.as_id, slot.id);
        let offset = slot.offset_of(gfn);
        // Once something overflowed, later marks queue behind it so the ring keeps the order.
        if !self.overflow.is_empty() {
            self.keep(ring_slot, offset);
            return;
        }
        match self.producer.push(ring_slot, offset) {
            Ok(outcome) => self.count_push(outcome, source == DirtySource::HardwareLog),
            Err(_) => self.keep(ring_slot, offset),
        }
    }
}
