//! The chunked clear of [`TrackingMode::ClearLogChunked`]: the caller clears each 64-page chunk of a
//! collect's result right before copying it (cloud-hypervisor's lazy per-chunk clear: enabling logging
//! then costs no write-protect pass, and a page is re-protected just before it is read, not a whole
//! round earlier).
//!
//! Keeps: I4 (the clear covers exactly the chunk's reported pages: a page written after `collect` but
//! not reported keeps its bit in KVM's log for the next collect; a chunk never cleared is reported again)
//! and I5 (the chunk is checked against the registered slot before the ioctl).

use std::os::fd::AsFd;

use tdp_core::addr::RingSlot;
use tdp_core::dirty_bitmap::{BitmapError, PAGES_PER_WORD};

use super::{DirtyTracker, TrackingMode, read};
use crate::bitmap::{ClearRange, clear_dirty_log};
use crate::error::{Error, Result};

impl DirtyTracker {
    /// `KVM_CLEAR_DIRTY_LOG` of one 64-page chunk of slot `slot`: clears and re-protects the pages
    /// `first_page + i` whose bit `i` is set in `mask` (as [`SlotDirty::chunks`](crate::SlotDirty::chunks)
    /// yields them). Copy the chunk's pages after this call: a write that lands after the clear is reported
    /// by the next collect.
    ///
    /// # Errors
    /// [`Error::WrongMode`] unless the tracker is [`TrackingMode::ClearLogChunked`];
    /// [`Error::SlotNotRegistered`]; [`Error::BadLogRange`] if `first_page` is not a multiple of 64 or lies
    /// past the slot; the ioctl's errors. Nothing was cleared on error.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::from_fd(t.vm_fd(), TrackingMode::ClearLogChunked)?;
    /// let spec = SlotSpec::new(1, 0x10_0000, 256);
    /// tracker.register_slot(spec)?;
    /// let round = tracker.collect()?; // INITIALLY_SET: all 256 pages, none cleared yet
    /// let set = round.get(spec.key()).ok_or("slot")?;
    /// let (first, mask) = set.chunks().next().ok_or("chunk")?;
    /// tracker.clear_chunk(spec.key(), first, mask)?; // ... then copy pages 0..64
    /// // Only the cleared chunk is clean; the 192 pages not cleared are reported again.
    /// assert_eq!(tracker.collect()?.total(), 192);
    /// # Ok(()) }
    /// ```
    pub fn clear_chunk(&self, slot: RingSlot, first_page: u64, mask: u64) -> Result<()> {
        if self.mode != TrackingMode::ClearLogChunked {
            return Err(Error::WrongMode { op: "clear_chunk", mode: self.mode });
        }
        let slots = read(&self.slots, "slots")?;
        let s = slots.get(&slot.raw()).ok_or(Error::SlotNotRegistered { slot })?;
        let pages = s.spec.pages;
        if first_page >= pages {
            let source = BitmapError::OutOfRange { first_page, num_pages: PAGES_PER_WORD as u32, pages };
            return Err(Error::BadLogRange { slot: slot.raw(), source });
        }
        // The last chunk of a slot whose size is not a multiple of 64 is shorter (KVM's rule).
        let num_pages = (pages - first_page).min(PAGES_PER_WORD) as u32;
        let mask = if num_pages == 64 { mask } else { mask & ((1 << num_pages) - 1) };
        if mask == 0 {
            return Ok(());
        }
        let range = ClearRange { slot: slot.raw(), slot_pages: pages, first_page, num_pages, mask: &[mask] };
        clear_dirty_log(self.vm.as_fd(), &range)
    }
}
