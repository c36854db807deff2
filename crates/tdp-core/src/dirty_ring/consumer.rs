//! The consumer half (VMM side): harvest in order without skipping, acquire-load the flags before the
//! slot and offset, release-store RESET. Works over any memory holding [`DirtyGfn`]s: a slice in tests,
//! KVM's mmap'd per-vCPU ring in a VMM.
//!
//! Keeps: I4 on the consumer side (every published entry is reported once, in push order, with the slot
//! and offset written before it was published). It trusts the producer: in a VMM that is the kernel.

use core::marker::PhantomData;

use crate::addr::RingSlot;
use crate::sync::Ordering;

use super::{DIRTY_GFN_F_RESET, DirtyGfn, RingConfig, RingError, RingMemory, is_dirty};

/// One harvested entry: page `offset` of memslot `slot` was dirtied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyEntry {
    /// The memslot, `as_id << 16 | id`.
    pub slot: RingSlot,
    /// The page's index within the memslot.
    pub offset: u64,
}

/// The consumer half of a dirty ring, with its own free-running `fetch_index` (KVM keeps none for
/// userspace: the VMM tracks its position itself).
///
/// After a harvest the VMM must have the producer reset the ring (`KVM_RESET_DIRTY_RINGS`, or
/// [`DirtyRingProducer::reset`](super::DirtyRingProducer::reset)) *before* it reads the contents of the
/// harvested pages: until the pages are re-protected, a guest write can land without a new entry. With
/// Intel PML the producer may also hold dirtied pages in the CPU's log until the vCPU exits: kick the vCPUs
/// first to flush them into the rings.
///
/// ```
/// use tdp_core::addr::{AsId, RingSlot, SlotId};
/// use tdp_core::dirty_ring::{DirtyEntry, DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
///
/// let cfg = RingConfig::new(256, 0)?;
/// let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
/// let mut producer = DirtyRingProducer::new(&ring, cfg)?;
/// let mut consumer = DirtyRingConsumer::new(&ring, cfg)?;
/// let slot = RingSlot::new(AsId(0), SlotId(1));
/// for offset in [9, 4, 9] {
///     let _ = producer.push(slot, offset)?;
/// }
/// let mut seen = Vec::new();
/// assert_eq!(consumer.harvest(2, |e| seen.push(e.offset)), 2); // at most 2 this time
/// assert_eq!(consumer.pop(), Some(DirtyEntry { slot, offset: 9 }));
/// assert_eq!(consumer.pop(), None); // nothing more was published
/// assert_eq!((seen, consumer.fetch_index()), (vec![9, 4], 3));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// The entries live in `M` ([`RingMemory`]), as for the producer: a slice borrowed for `'a` by default,
/// or a `Box` / `Arc` the consumer holds ([`with_memory`](DirtyRingConsumer::with_memory)).
///
/// Aligned to 128 bytes, as [`DirtyRingProducer`](super::DirtyRingProducer) is and for the same reason:
/// `fetch_index` is written at every harvested entry and must not share a cache line with the producer's
/// indices or another consumer's.
#[derive(Debug)]
#[repr(align(128))]
pub struct DirtyRingConsumer<'a, M: RingMemory = &'a [DirtyGfn]> {
    ring: M,
    cfg: RingConfig,
    fetch_index: u32,
    borrow: PhantomData<&'a [DirtyGfn]>,
}

impl<'a> DirtyRingConsumer<'a> {
    /// A consumer of a fresh ring, starting at index 0.
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless `ring` has `cfg.entries()` entries.
    pub const fn new(ring: &'a [DirtyGfn], cfg: RingConfig) -> Result<Self, RingError> {
        DirtyRingConsumer::resume(ring, cfg, 0)
    }

    /// A consumer that continues at `fetch_index` (the value [`DirtyRingConsumer::fetch_index`] returned
    /// to an earlier consumer of the same ring).
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless `ring` has `cfg.entries()` entries.
    pub const fn resume(ring: &'a [DirtyGfn], cfg: RingConfig, fetch_index: u32) -> Result<Self, RingError> {
        match cfg.check_len(ring) {
            Ok(()) => Ok(DirtyRingConsumer { ring, cfg, fetch_index, borrow: PhantomData }),
            Err(e) => Err(e),
        }
    }
}

impl<'a, M: RingMemory> DirtyRingConsumer<'a, M> {
    /// [`DirtyRingConsumer::new`] over memory the consumer holds (see [`RingMemory`]).
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless the memory has `cfg.entries()` entries.
    pub fn with_memory(ring: M, cfg: RingConfig) -> Result<Self, RingError> {
        DirtyRingConsumer::resume_with_memory(ring, cfg, 0)
    }

    /// [`DirtyRingConsumer::resume`] over memory the consumer holds.
    ///
    /// # Errors
    /// [`RingError::LengthMismatch`] unless the memory has `cfg.entries()` entries.
    pub fn resume_with_memory(ring: M, cfg: RingConfig, fetch_index: u32) -> Result<Self, RingError> {
        cfg.check_len(ring.entries())?;
        Ok(DirtyRingConsumer { ring, cfg, fetch_index, borrow: PhantomData })
    }

    /// Harvests the entry at `fetch_index` if the producer published it: reads its slot and offset,
    /// marks it [`DIRTY_GFN_F_RESET`] and moves on. `None` when that entry is not dirty (the ring is
    /// drained for now); the consumer never skips ahead to a later entry.
    #[inline]
    pub fn pop(&mut self) -> Option<DirtyEntry> {
        // In bounds: `position` masks the index below `entries`, and the memory has exactly `entries`
        // (checked by the constructors; its length cannot change: `RingMemory` is sealed).
        let entry = &self.ring.entries()[self.cfg.position(self.fetch_index)];
        // Acquire: pairs with the producer's Release store of DIRTY in `DirtyRingProducer::push`, so the
        // slot and offset read below are the ones written before the entry was published.
        if !is_dirty(entry.flags.load(Ordering::Acquire)) {
            return None;
        }
        // Relaxed: ordered after the Acquire load above; trusted (the producer wrote them).
        let slot = RingSlot::from_raw(entry.slot.load(Ordering::Relaxed));
        let offset = entry.offset.load(Ordering::Relaxed);
        // Release: pairs with the producer's Acquire load of `flags` in `DirtyRingProducer::reset`, so the
        // two reads above happen before the producer frees the entry and pushes into it again.
        entry.flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
        self.fetch_index = self.fetch_index.wrapping_add(1);
        Some(DirtyEntry { slot, offset })
    }

    /// Harvests up to `max` entries in order, calling `f` for each, and returns how many. Stops early at
    /// the first entry that is not dirty. A producer pushing at the same time may supply more than one
    /// ring's worth, so `max` is the only bound on the work of one call.
    #[inline]
    pub fn harvest(&mut self, max: usize, mut f: impl FnMut(DirtyEntry)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(entry) = self.pop() else { break };
            f(entry);
            n += 1;
        }
        n
    }

    /// The free-running index of the next entry to harvest.
    #[must_use]
    #[inline]
    pub const fn fetch_index(&self) -> u32 {
        self.fetch_index
    }

    /// The ring's geometry.
    #[must_use]
    #[inline]
    pub const fn config(&self) -> RingConfig {
        self.cfg
    }
}
