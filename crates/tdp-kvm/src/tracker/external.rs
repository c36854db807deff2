//! Dirty pages from sources other than KVM: the VMM's own writes ([`VmmBitmap`], e.g. through
//! vm-memory's `GuestMemoryMmap<VmmBitmap>`), taken by every collect, and any other log handed over as a
//! bitmap over a range (a VFIO device's DMA log, a vhost-user back-end's log), merged into the pending set.
//!
//! Keeps: I4 (VMM marks are taken only by a collect, after KVM's harvest succeeded, and from then on travel
//! with KVM's pages through results, the pending set and `restore`) and I5 (a bitmap whose size is not the
//! slot's, or a range outside the slot, is refused with the values and merges nothing).

use tdp_core::addr::RingSlot;
use tdp_core::dirty_bitmap::{BitmapError, PAGES_PER_WORD, dirty_offsets};

use super::{DirtyTracker, SlotDirty, read};
use crate::error::{Error, Result};
use crate::vmm_bitmap::VmmBitmap;

impl DirtyTracker {
    /// Makes every collect also report the pages marked in `bitmap` (a clone is kept; marks go on through
    /// the caller's copies), merged with KVM's pages of the registered slot `slot`. With vm-memory, pass
    /// the region's bitmap: `tracker.attach_vmm_bitmap(slot, region.bitmap())`.
    ///
    /// # Errors
    /// [`Error::SlotNotRegistered`]; [`Error::VmmBitmapSize`] if the bitmap does not cover exactly the
    /// slot's pages. Nothing changes on error. Attaching again replaces the previous bitmap (whose marks
    /// not collected yet are taken into the pending set first, so none is lost).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode, VmmBitmap};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::Manual)? else { return Ok(()) };
    /// let tracker = DirtyTracker::from_fd(t.vm_fd(), TrackingMode::ClearLog)?;
    /// let spec = SlotSpec::new(1, 0x10_0000, 256);
    /// tracker.register_slot(spec)?;
    /// let device_writes = VmmBitmap::new(256 * 4096);
    /// tracker.attach_vmm_bitmap(spec.key(), &device_writes)?;
    /// device_writes.mark(5 * 4096, 8); // a device wrote into page 5
    /// let round = tracker.collect()?;
    /// assert_eq!(round.get(spec.key()).map(|s| s.offsets().collect::<Vec<_>>()), Some(vec![5]));
    /// assert!(tracker.attach_vmm_bitmap(spec.key(), &VmmBitmap::new(4096)).is_err(), "one page, not 256");
    /// # Ok(()) }
    /// ```
    pub fn attach_vmm_bitmap(&self, slot: RingSlot, bitmap: &VmmBitmap) -> Result<()> {
        let mut slots = self.slots.write().map_err(|_| Error::Poisoned { what: "slots" })?;
        let s = slots.get_mut(&slot.raw()).ok_or(Error::SlotNotRegistered { slot })?;
        if bitmap.pages() != s.spec.pages {
            return Err(Error::VmmBitmapSize { slot, pages: s.spec.pages, bitmap_pages: bitmap.pages() });
        }
        if let Some(old) = s.vmm.replace(bitmap.clone())
            && !old.same_bits(bitmap)
        {
            let mut offsets = Vec::new();
            old.take(|w, bits| push_offsets(&mut offsets, w, bits));
            self.pending
                .add(|p| p.add_slot(slot, s.spec.guest_base, s.spec.pages).extend_sorted(&offsets))?;
        }
        Ok(())
    }

    /// Merges an external dirty log into the pending set (the next collect reports its pages with KVM's):
    /// bit `i % 64` of `words[i / 64]` is page `first_page + i` of the registered slot `slot`. Returns how
    /// many pages were marked in `words`.
    ///
    /// # Errors
    /// [`Error::SlotNotRegistered`]; [`Error::BadLogRange`] if `first_page` is not a multiple of 64 or a
    /// marked page lies past the slot's end. Nothing is merged on error.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::Manual)? else { return Ok(()) };
    /// let tracker = DirtyTracker::from_fd(t.vm_fd(), TrackingMode::ClearLog)?;
    /// let spec = SlotSpec::new(1, 0x10_0000, 256);
    /// tracker.register_slot(spec)?;
    /// // A VFIO device's DMA log over pages 128..256: it wrote pages 128 and 130.
    /// assert_eq!(tracker.merge_dirty_words(spec.key(), 128, &[0b101, 0])?, 2);
    /// assert!(tracker.merge_dirty_words(spec.key(), 192, &[0, 1]).is_err(), "page 256 is past the slot");
    /// let round = tracker.collect()?;
    /// assert_eq!(round.get(spec.key()).map(|s| s.offsets().collect::<Vec<_>>()), Some(vec![128, 130]));
    /// # Ok(()) }
    /// ```
    pub fn merge_dirty_words(&self, slot: RingSlot, first_page: u64, words: &[u64]) -> Result<u64> {
        let slots = read(&self.slots, "slots")?;
        let s = slots.get(&slot.raw()).ok_or(Error::SlotNotRegistered { slot })?;
        let pages = s.spec.pages;
        let bad = |source| Err(Error::BadLogRange { slot: slot.raw(), source });
        if !first_page.is_multiple_of(PAGES_PER_WORD) {
            return bad(BitmapError::Misaligned { first_page });
        }
        let mut offsets = Vec::new();
        for offset in dirty_offsets(words) {
            match first_page.checked_add(offset).filter(|&p| p < pages) {
                Some(p) => offsets.push(p),
                None => {
                    let num_pages = u32::try_from((words.len() as u64).saturating_mul(PAGES_PER_WORD))
                        .unwrap_or(u32::MAX);
                    return bad(BitmapError::OutOfRange { first_page, num_pages, pages });
                }
            }
        }
        let n = offsets.len() as u64;
        self.pending.add(|p| p.add_slot(slot, s.spec.guest_base, pages).extend_sorted(&offsets))?;
        Ok(n)
    }
}

/// Takes a slot's VMM bitmap into its set (a collect). `offsets` is scratch.
pub(super) fn take_vmm_bitmap(bitmap: &VmmBitmap, set: &mut SlotDirty, offsets: &mut Vec<u64>) {
    offsets.clear();
    bitmap.take(|w, bits| push_offsets(offsets, w, bits));
    if !offsets.is_empty() {
        set.extend_sorted(offsets);
    }
}

/// Appends the pages of word `w`'s set bits, ascending.
fn push_offsets(out: &mut Vec<u64>, w: usize, bits: u64) {
    let base = w as u64 * PAGES_PER_WORD;
    let mut rest = bits;
    while rest != 0 {
        out.push(base + u64::from(rest.trailing_zeros()));
        rest &= rest - 1;
    }
}
