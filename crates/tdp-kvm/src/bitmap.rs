//! The dirty bitmap: `KVM_GET_DIRTY_LOG` into a reusable buffer, and `KVM_CLEAR_DIRTY_LOG` with KVM's
//! argument rules checked first.
//!
//! `KVM_GET_DIRTY_LOG` writes `ALIGN(npages, 64) / 8` bytes, where `npages` is the slot's size as KVM
//! knows it: a process cannot ask KVM for it, and `kvm-ioctls`' `get_dirty_log` trusts the caller's size
//! (a wrong one lets the kernel write past the vector). [`DirtyLogBuffer`] places its words so that they
//! end exactly at an inaccessible guard page: a slot larger than the caller said makes the kernel's copy
//! fault (`EFAULT`, reported as [`Error::SlotLargerThanRegistered`]) instead of overwriting the heap. The
//! buffer is allocated once and reused, so a harvest allocates nothing.
//!
//! Keeps: I5 (every range and buffer is checked before the ioctl; the kernel can never write outside
//! memory we own).

use std::num::NonZeroU16;
use std::os::fd::{AsFd, BorrowedFd};

use tdp_core::addr::AsId;
use tdp_core::dirty_bitmap::{BitmapError, PAGES_PER_WORD, dirty_offsets, words_for};
use tdp_core::memslot::KVM_USER_MEM_SLOTS;

use crate::error::{Errno, Error, Result};
use crate::mapping::Mapping;
use crate::sys;

/// A slot's dirty bitmap, filled by [`get_dirty_log`]: bit `i % 64` of word `i / 64` is page `i` of the slot.
///
/// ```
/// let mut buf = tdp_kvm::DirtyLogBuffer::new(1000)?;
/// assert_eq!((buf.pages(), buf.words().len()), (1000, 16));
/// buf.words_mut()[0] = 0b101;
/// assert_eq!(buf.count(), 2);
/// assert_eq!(buf.iter_dirty().collect::<Vec<_>>(), [0, 2]);
/// # Ok::<(), tdp_kvm::Error>(())
/// ```
#[derive(Debug)]
pub struct DirtyLogBuffer {
    map: Mapping,
    /// Byte offset of the first word in the mapping: the words end at the guard page.
    start: usize,
    pages: u64,
    words: usize,
}

impl DirtyLogBuffer {
    /// A zeroed buffer for a slot of `pages` pages.
    ///
    /// # Errors
    /// [`Error::Mmap`] if the memory cannot be mapped (or `pages` is absurdly large).
    pub fn new(pages: u64) -> Result<Self> {
        let too_big = Error::Mmap { what: "a dirty-log buffer", errno: Errno(libc::ENOMEM) };
        let words = usize::try_from(words_for(pages)).map_err(|_| too_big)?;
        let bytes = words
            .checked_mul(8)
            .ok_or(Error::Mmap { what: "a dirty-log buffer", errno: Errno(libc::ENOMEM) })?;
        let page = sys::page_size();
        // At least one page, so the mapping is never empty.
        let rounded = bytes.max(1).div_ceil(page) * page;
        let map = Mapping::with_guard(rounded, "a dirty-log buffer")?;
        Ok(DirtyLogBuffer { map, start: rounded - bytes, pages, words })
    }

    /// The slot size this buffer was made for.
    #[must_use]
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap's words.
    #[must_use]
    pub fn words(&self) -> &[u64] {
        // SAFETY: `start..start + words * 8` lies inside the read-write part of the mapping (it ends where
        // the guard page starts), is 8-aligned (`start` = page multiple - multiple of 8), zero-initialised
        // by mmap, and borrowed from `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.start).cast::<u64>(), self.words) }
    }

    /// The bitmap's words, writable (e.g. to build a clear mask in place).
    #[must_use]
    pub fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `words`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(self.start).cast::<u64>(), self.words) }
    }

    /// How many pages are marked.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.words().iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The marked pages' offsets within the slot, ascending.
    pub fn iter_dirty(&self) -> impl Iterator<Item = u64> + '_ {
        dirty_offsets(self.words())
    }

    /// Zeroes every word.
    pub fn clear(&mut self) {
        self.words_mut().fill(0);
    }

    fn as_mut_ptr(&mut self) -> *mut u64 {
        self.words_mut().as_mut_ptr()
    }
}

/// Checks a memslot name (`as_id << 16 | id`) against KVM's rules before `op` passes it to an ioctl:
/// the address space below [`AsId::MAX_COUNT`], the id below `limit` (KVM's own limit is
/// [`KVM_USER_MEM_SLOTS`], 32764 on x86; [`max_memslots`](crate::fd::max_memslots) asks the kernel).
///
/// # Errors
/// [`Error::SlotOutOfRange`] naming the operation, the slot and the limit.
///
/// ```
/// use tdp_core::memslot::KVM_USER_MEM_SLOTS;
/// use tdp_kvm::{Error, fd::check_slot};
/// assert!(check_slot("KVM_GET_DIRTY_LOG", 32763, KVM_USER_MEM_SLOTS).is_ok());
/// assert!(check_slot("KVM_GET_DIRTY_LOG", 1 << 16 | 32763, KVM_USER_MEM_SLOTS).is_ok()); // SMM
/// let err = check_slot("KVM_GET_DIRTY_LOG", 32764, KVM_USER_MEM_SLOTS).unwrap_err();
/// assert!(matches!(err, Error::SlotOutOfRange { slot: 32764, .. }));
/// assert!(err.to_string().contains("ids 0 to 32763"), "{err}");
/// assert!(check_slot("KVM_GET_DIRTY_LOG", 2 << 16, KVM_USER_MEM_SLOTS).is_err()); // no address space 2
/// ```
pub fn check_slot(op: &'static str, slot: u32, limit: NonZeroU16) -> Result<()> {
    let (as_id, id) = (slot >> 16, slot & 0xffff);
    if as_id >= u32::from(AsId::MAX_COUNT) || id >= u32::from(limit.get()) {
        return Err(Error::SlotOutOfRange { op, slot, limit });
    }
    Ok(())
}

/// `KVM_GET_DIRTY_LOG` of memslot `slot` (`as_id << 16 | id`) into `buf` (read it with
/// [`DirtyLogBuffer::iter_dirty`], [`DirtyLogBuffer::words`] or [`DirtyLogBuffer::count`]). It allocates
/// nothing and scans nothing: the cost is the ioctl's. Without manual protection, KVM also clears the log and re-protects the pages (get-and-clear);
/// with it, KVM only copies, and [`clear_dirty_log`] re-protects.
///
/// # Errors
/// [`Error::SlotOutOfRange`] (an id KVM cannot have, before the ioctl),
/// [`Error::SlotNotLogged`] (no such slot, or no `KVM_MEM_LOG_DIRTY_PAGES`), [`Error::BitmapDisabledByRing`],
/// [`Error::SlotLargerThanRegistered`] (the buffer is for fewer pages than KVM's slot; `buf` may hold a
/// partial copy), [`Error::Ioctl`].
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::testing::TestVm;
/// let Some(t) = TestVm::new_or_skip(&[(0, 0x10_0000, 256)], tdp_kvm::testing::LogSetup::ManualInitiallySet)? else { return Ok(()) };
/// let mut buf = tdp_kvm::DirtyLogBuffer::new(256)?;
/// // INITIALLY_SET: every page of a freshly logged slot is reported dirty.
/// tdp_kvm::fd::get_dirty_log(&t.vm_fd(), 0, &mut buf)?;
/// assert_eq!(buf.count(), 256);
/// # Ok(()) }
/// ```
pub fn get_dirty_log(vm: impl AsFd, slot: u32, buf: &mut DirtyLogBuffer) -> Result<()> {
    check_slot("KVM_GET_DIRTY_LOG", slot, KVM_USER_MEM_SLOTS)?;
    let vm = vm.as_fd();
    let pages = buf.pages;
    let out = buf.as_mut_ptr();
    // SAFETY: `out` points at `buf.words` writable words owned by `buf` (borrowed mutably for the call),
    // and the guard page follows the last word, so the kernel's copy of a larger bitmap faults there.
    match unsafe { sys::get_dirty_log(vm, slot, out) } {
        Ok(()) => Ok(()),
        Err(Errno(libc::ENOENT)) => Err(Error::SlotNotLogged { op: "KVM_GET_DIRTY_LOG", slot }),
        Err(Errno(libc::ENXIO)) => Err(Error::BitmapDisabledByRing { op: "KVM_GET_DIRTY_LOG" }),
        Err(Errno(libc::EFAULT)) => Err(Error::SlotLargerThanRegistered { slot, pages }),
        Err(errno) => Err(Error::Ioctl { ioctl: "KVM_GET_DIRTY_LOG", errno }),
    }
}

/// One `KVM_CLEAR_DIRTY_LOG` request: clear and re-protect the pages `first_page + i` of memslot `slot`
/// whose bit `i` is set in `mask` (bit `i % 64` of word `i / 64`). `slot_pages` is the slot's size, so the
/// range is checked against KVM's rules before the ioctl ([`ClearRange::check`]).
///
/// The fields are exactly the ioctl's arguments plus the slot size, so the struct is complete and is built
/// with a literal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClearRange<'a> {
    /// The memslot (`as_id << 16 | id`).
    pub slot: u32,
    /// The slot's size in pages.
    pub slot_pages: u64,
    /// The first page of the range: a multiple of 64.
    pub first_page: u64,
    /// Pages in the range: a multiple of 64, unless the range reaches the slot's end.
    pub num_pages: u32,
    /// Which pages of the range to clear.
    pub mask: &'a [u64],
}

impl ClearRange<'_> {
    /// Checks the request against KVM's rules, in KVM's order: the slot's address space and id in range
    /// ([`check_slot`] with [`KVM_USER_MEM_SLOTS`]); `first_page` a multiple of 64; the range inside the
    /// slot; `num_pages` a multiple of 64 unless it reaches the slot's end; the mask long enough.
    ///
    /// # Errors
    /// [`Error::SlotOutOfRange`]; [`Error::BadLogRange`] carrying the rule and values.
    ///
    /// ```
    /// use tdp_kvm::{ClearRange, Error};
    /// let r = |first_page, num_pages| ClearRange { slot: 7, slot_pages: 1000, first_page, num_pages, mask: &[u64::MAX] };
    /// assert!(r(64, 64).check().is_ok());
    /// assert!(r(960, 40).check().is_ok()); // reaches the end: any length
    /// assert!(matches!(r(3, 64).check(), Err(Error::BadLogRange { slot: 7, .. })));
    /// assert!(r(0, 40).check().is_err()); // not a multiple of 64, not the end
    /// assert!(r(960, 64).check().is_err()); // past the end
    /// assert!(r(0, 128).check().is_err()); // the mask holds 64 pages only
    /// let high = ClearRange { slot: 40_000, ..r(0, 64) };
    /// assert!(matches!(high.check(), Err(Error::SlotOutOfRange { slot: 40_000, .. })));
    /// ```
    pub fn check(&self) -> Result<()> {
        let ClearRange { slot, slot_pages: pages, first_page, num_pages, mask } = *self;
        check_slot("KVM_CLEAR_DIRTY_LOG", slot, KVM_USER_MEM_SLOTS)?;
        let bad = |source| Err(Error::BadLogRange { slot, source });
        if !first_page.is_multiple_of(PAGES_PER_WORD) {
            return bad(BitmapError::Misaligned { first_page });
        }
        let n = u64::from(num_pages);
        if first_page > pages || n > pages - first_page {
            return bad(BitmapError::OutOfRange { first_page, num_pages, pages });
        }
        if !n.is_multiple_of(PAGES_PER_WORD) && first_page + n != pages {
            return bad(BitmapError::BadLength { first_page, num_pages, pages });
        }
        if (mask.len() as u64) < words_for(n) {
            return bad(BitmapError::ShortMask { have: mask.len(), need: words_for(n) });
        }
        Ok(())
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: clears and re-protects the pages of `range` set in its mask (and in KVM's log).
/// Needs manual protection ([`enable_manual_protect`](crate::fd::enable_manual_protect)) to be useful;
/// KVM accepts it in any bitmap mode.
///
/// # Errors
/// [`Error::SlotOutOfRange`] and [`Error::BadLogRange`] before the ioctl; [`Error::SlotNotLogged`], [`Error::BitmapDisabledByRing`],
/// [`Error::Ioctl`] from KVM. Nothing was cleared on error.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::testing::{LogSetup, TestVm};
/// use tdp_kvm::{ClearRange, fd};
/// let Some(t) = TestVm::new_or_skip(&[(0, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
/// let mut buf = tdp_kvm::DirtyLogBuffer::new(256)?;
/// // Clear pages 64..128 only; the other 192 stay dirty.
/// fd::clear_dirty_log(&t.vm_fd(), &ClearRange { slot: 0, slot_pages: 256, first_page: 64, num_pages: 64, mask: &[u64::MAX] })?;
/// fd::get_dirty_log(&t.vm_fd(), 0, &mut buf)?;
/// assert_eq!(buf.count(), 192);
/// assert!(buf.iter_dirty().all(|p| !(64..128).contains(&p)));
/// # Ok(()) }
/// ```
pub fn clear_dirty_log(vm: impl AsFd, range: &ClearRange<'_>) -> Result<()> {
    range.check()?;
    let ClearRange { slot, first_page, num_pages, mask, .. } = *range;
    match sys::clear_dirty_log(vm.as_fd(), slot, first_page, num_pages, mask) {
        Ok(()) => Ok(()),
        Err(Errno(libc::ENOENT)) => Err(Error::SlotNotLogged { op: "KVM_CLEAR_DIRTY_LOG", slot }),
        Err(Errno(libc::ENXIO)) => Err(Error::BitmapDisabledByRing { op: "KVM_CLEAR_DIRTY_LOG" }),
        Err(errno) => Err(Error::Ioctl { ioctl: "KVM_CLEAR_DIRTY_LOG", errno }),
    }
}

/// Clears, on KVM's side, exactly the pages set in `words` (a whole-slot bitmap of `pages` pages), in
/// chunks that fit `num_pages`' 32 bits. Used by the tracker's clear-log mode.
pub(crate) fn clear_whole_slot(vm: BorrowedFd<'_>, slot: u32, pages: u64, words: &[u64]) -> Result<()> {
    // A multiple of 64 well inside u32.
    const CHUNK: u64 = 1 << 31;
    let mut first = 0u64;
    while first < pages {
        let n = (pages - first).min(CHUNK);
        let w0 = (first / PAGES_PER_WORD) as usize;
        let w1 = w0 + words_for(n) as usize;
        let Some(mask) = words.get(w0..w1) else {
            return Err(Error::BadLogRange {
                slot,
                source: BitmapError::ShortMask { have: words.len(), need: words_for(pages) },
            });
        };
        // Skip all-clean chunks: nothing to clear there.
        if mask.iter().any(|&w| w != 0) {
            clear_dirty_log(
                vm,
                &ClearRange { slot, slot_pages: pages, first_page: first, num_pages: n as u32, mask },
            )?;
        }
        first += n;
    }
    Ok(())
}
