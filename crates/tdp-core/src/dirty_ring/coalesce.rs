//! Reset batching: consecutive harvested pages of one memslot become one `(offset, 64-bit mask)` batch,
//! as KVM's `kvm_dirty_ring_reset` builds them, so the re-protect callback runs once per batch. The reset
//! loop extends the pending batch through a [`Window`] held in registers (two compares validate and place
//! a page of the batch's slot and window) and takes the checked path, a memslot lookup and
//! [`Coalescer::add`], only for the other entries.
//!
//! Keeps: I5 at the point of use: a batch is built only from entries already checked against their
//! memslot, so no bit of a batch names a page outside the slot. Unlike KVM, which checks a whole batch
//! and drops all of it when its last page is out of range, the producer checks each entry before it
//! joins a batch: a bad entry is skipped alone and cannot cost its valid neighbours their re-protection.

use crate::addr::{Gfn, RingSlot};
use crate::memslot::Memslot;

/// Pages of one memslot to re-protect after a reset: page `offset + i` of the slot for every bit `i`
/// set in `mask`. Bit 0 is always set, and every page named lies inside the slot.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
/// use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
/// use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};
///
/// let mut slots = MemslotSet::new(Gfn(1 << 36));
/// slots.insert(Memslot::new(AsId(0), SlotId(0), Gfn(0x100), 256, 0, SlotFlags::LOG_DIRTY))?;
/// let cfg = RingConfig::new(256, 0)?;
/// let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
/// let mut producer = DirtyRingProducer::new(&ring, cfg)?;
/// let mut consumer = DirtyRingConsumer::new(&ring, cfg)?;
/// for offset in [7, 5] {
///     let _ = producer.push(RingSlot::new(AsId(0), SlotId(0)), offset)?;
/// }
/// consumer.harvest(usize::MAX, |_| {});
/// let mut gfns = Vec::new();
/// producer.reset_with(&slots, |batch| {
///     assert_eq!((batch.offset(), batch.mask(), batch.pages()), (5, 0b101, 2));
///     gfns.extend(batch.gfns());
/// });
/// assert_eq!(gfns, [Gfn(0x105), Gfn(0x107)]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReprotectBatch {
    memslot: Memslot,
    offset: u64,
    mask: u64,
}

impl ReprotectBatch {
    /// The memslot the pages belong to.
    #[must_use]
    #[inline]
    pub const fn memslot(&self) -> &Memslot {
        &self.memslot
    }
    /// The memslot as the ring names it.
    #[must_use]
    #[inline]
    pub const fn slot(&self) -> RingSlot {
        RingSlot::new(self.memslot.as_id, self.memslot.id)
    }
    /// The page index, within the slot, of bit 0 of [`ReprotectBatch::mask`].
    #[must_use]
    #[inline]
    pub const fn offset(&self) -> u64 {
        self.offset
    }
    /// Which pages from [`ReprotectBatch::offset`] on are in the batch; never 0, bit 0 always set.
    #[must_use]
    #[inline]
    pub const fn mask(&self) -> u64 {
        self.mask
    }
    /// How many distinct pages the batch names.
    #[must_use]
    #[inline]
    pub const fn pages(&self) -> u32 {
        self.mask.count_ones()
    }
    /// The guest frames of the batch, in increasing order.
    pub fn gfns(&self) -> impl Iterator<Item = Gfn> + use<> {
        let base = self.memslot.base_gfn.add(self.offset);
        let mut bits = self.mask;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let bit = bits.trailing_zeros();
            bits &= bits - 1;
            Some(base.add(u64::from(bit)))
        })
    }
}

/// The batch being built: KVM's `(cur_slot, cur_offset, mask)`.
#[derive(Debug)]
pub(super) struct Coalescer {
    pending: Option<ReprotectBatch>,
}

/// The pending batch as the reset loop's fast path sees it, small enough to live in registers: the raw
/// ring slot, the batch's first page, how many pages from there the batch may still name, and the mask.
///
/// `span` is `min(64, pages - base)`: a page `offset` of `slot` joins the batch in place exactly when
/// `offset - base` (wrapping) is below it, which is both KVM's 64-page window and the memslot bound
/// (`offset < pages`) in one compare. With no pending batch `span` is 0 and nothing joins, so the
/// first entry of a reset always takes the checked path. The loop owns the mask while it runs and
/// hands it back with [`Coalescer::absorb`] before the [`Coalescer`] is used again.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    slot: u32,
    base: u64,
    span: u64,
    mask: u64,
}

impl Window {
    /// No pending batch: nothing joins.
    pub(super) const EMPTY: Window = Window { slot: 0, base: 0, span: 0, mask: 0 };

    /// Sets the bit of page `offset` of the ring slot `slot` (raw) if the page is in the batch's
    /// memslot and window; the common case of a reset, without a lookup or a copy of the memslot.
    #[inline(always)]
    pub(super) fn try_add(&mut self, slot: u32, offset: u64) -> bool {
        let delta = offset.wrapping_sub(self.base);
        if slot == self.slot && delta < self.span {
            // `delta < span <= 64`: the shift is in range.
            self.mask |= 1 << delta;
            return true;
        }
        false
    }
}

impl Coalescer {
    pub(super) const fn new() -> Self {
        Coalescer { pending: None }
    }

    /// Takes back the mask the reset loop built in `window`, which [`Coalescer::window`] made from the
    /// pending batch (bits only set within the slot, so the batch still names only pages inside it).
    #[inline]
    pub(super) fn absorb(&mut self, window: Window) {
        if let Some(batch) = &mut self.pending {
            batch.mask = window.mask;
        }
    }

    /// The pending batch's [`Window`], for the reset loop to extend in place.
    #[inline]
    pub(super) fn window(&self) -> Window {
        match &self.pending {
            // `batch.offset < pages`: every batch starts at a page that was checked to be in its slot.
            Some(batch) => Window {
                slot: batch.slot().raw(),
                base: batch.offset,
                span: batch.memslot.pages.saturating_sub(batch.offset).min(u64::from(u64::BITS)),
                mask: batch.mask,
            },
            None => Window::EMPTY,
        }
    }

    /// The memslot of the pending batch if it is `slot`: lets the caller validate the next entry without
    /// looking the slot up again.
    #[inline]
    pub(super) fn pending_memslot(&self, slot: RingSlot) -> Option<&Memslot> {
        self.pending.as_ref().filter(|b| b.slot() == slot).map(|b| &b.memslot)
    }

    /// Adds page `offset` of `memslot`, which the caller checked is inside the slot. Returns the
    /// previous batch when the page cannot join it.
    ///
    /// The rules are KVM's: a page of the same slot at most 63 pages above the batch's first page sets
    /// its bit; one at most 63 pages below rebases the batch downwards if no set bit is shifted out of
    /// the mask; anything else closes the batch and starts a new one.
    #[inline]
    pub(super) fn add(&mut self, memslot: &Memslot, offset: u64) -> Option<ReprotectBatch> {
        if let Some(batch) = &mut self.pending
            && batch.slot() == RingSlot::new(memslot.as_id, memslot.id)
        {
            if let Some(delta) = offset.checked_sub(batch.offset)
                && delta < u64::from(u64::BITS)
            {
                batch.mask |= 1 << delta;
                return None;
            }
            // Backwards: KVM's `(mask << -delta >> -delta) == mask`, i.e. no set bit is shifted out.
            if let Some(delta) = batch.offset.checked_sub(offset)
                && delta < u64::from(u64::BITS)
                && u64::from(batch.mask.leading_zeros()) >= delta
            {
                batch.offset = offset;
                batch.mask = (batch.mask << delta) | 1;
                return None;
            }
        }
        self.pending.replace(ReprotectBatch { memslot: *memslot, offset, mask: 1 })
    }

    /// The last batch, if any page was added since the last one was returned.
    pub(super) const fn finish(self) -> Option<ReprotectBatch> {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{AsId, SlotId};
    use crate::memslot::SlotFlags;
    use alloc::vec::Vec;

    fn batches(adds: &[(&Memslot, u64)]) -> Vec<(SlotId, u64, u64)> {
        let mut c = Coalescer::new();
        let mut out: Vec<ReprotectBatch> = adds.iter().filter_map(|&(m, o)| c.add(m, o)).collect();
        out.extend(c.finish());
        out.iter().map(|b| (b.memslot().id, b.offset(), b.mask())).collect()
    }

    #[test]
    fn coalescing_follows_kvm_rules() {
        let a = Memslot::new(AsId(0), SlotId(1), Gfn(0), 1 << 20, 0, SlotFlags::LOG_DIRTY);
        let b = Memslot::new(AsId(1), SlotId(1), Gfn(0), 1 << 20, 0, SlotFlags::LOG_DIRTY);
        // Forward within 64 pages, then a jump.
        assert_eq!(batches(&[(&a, 5), (&a, 6), (&a, 70)]), [(SlotId(1), 5, 0b11), (SlotId(1), 70, 1)]);
        // Exactly 63 above joins; 64 above does not.
        assert_eq!(batches(&[(&a, 0), (&a, 63)]), [(SlotId(1), 0, 1 | 1 << 63)]);
        assert_eq!(batches(&[(&a, 0), (&a, 64)]), [(SlotId(1), 0, 1), (SlotId(1), 64, 1)]);
        // Descending rebases; a duplicate sets the same bit again.
        assert_eq!(batches(&[(&a, 10), (&a, 9), (&a, 8), (&a, 9)]), [(SlotId(1), 8, 0b111)]);
        // A rebase that would shift bit 63 out closes the batch instead.
        assert_eq!(
            batches(&[(&a, 100), (&a, 163), (&a, 99)]),
            [(SlotId(1), 100, 1 | 1 << 63), (SlotId(1), 99, 1)]
        );
        // Another slot (here: the same id in another address space) breaks the batch.
        assert_eq!(
            batches(&[(&a, 1), (&b, 2), (&a, 3)]),
            [(SlotId(1), 1, 1), (SlotId(1), 2, 1), (SlotId(1), 3, 1)]
        );
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn batch_gfns_are_the_set_bits_above_the_slot_base() {
        let s = Memslot::new(AsId(0), SlotId(0), Gfn(0x1000), 128, 0, SlotFlags::LOG_DIRTY);
        let batch = ReprotectBatch { memslot: s, offset: 4, mask: 0b1001 | 1 << 63 };
        let gfns: Vec<Gfn> = batch.gfns().collect();
        assert_eq!(gfns, [Gfn(0x1004), Gfn(0x1007), Gfn(0x1004 + 63)]);
        assert_eq!(batch.pages(), 3);
        assert_eq!(batch.slot(), RingSlot::new(AsId(0), SlotId(0)));
    }
}
