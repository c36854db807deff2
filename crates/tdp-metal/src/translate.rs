//! [`IdentityTranslate`]: `tdp-core`'s [`HostTranslate`] for a hypervisor whose memslots name physical
//! RAM directly (`Memslot::host_base` is a physical address) and whose RAM is identity-mapped.
//!
//! The host frame of a gfn is `host_base + offset` in the slot. It is reported only when it lies in RAM
//! the hypervisor declared for guests ([`PhysRange`]s), so a slot pointing at the hypervisor's own
//! memory or at device space gets [`HostFaultError::NoPage`] instead of a mapping. The "host mapping
//! level" is the largest level (up to the configured maximum) whose aligned block around the frame lies
//! inside one declared range: the core maps a gfn huge only when the slot also allows it.
//!
//! A hypervisor that moves guest pages between frames (migration, compaction) records each move in a
//! [`MovedPage`] table ([`IdentityTranslate::with_moved_pages`], [`IdentityTranslate::move_page`]): the
//! moved page is then found in its new frame, at 4 KiB, and no huge mapping covers it any more (the
//! block it was in is no longer contiguous). The move itself must be bracketed by the MMU's
//! `invalidate_range_start` / `invalidate_range_end`, as a host's MMU notifier would.

use tdp_core::addr::{Gfn, Level, PAGE_SHIFT, PAGE_SIZE, Pfn};
use tdp_core::host::{HostFaultError, HostPage, HostTranslate};
use tdp_core::memslot::Memslot;
use tdp_core::sync::{AtomicU64, Ordering};

/// A range of physical RAM given to guests, `start..end` in bytes, page-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PhysRange {
    /// The first byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Host translation over identity-mapped guest RAM.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
/// use tdp_core::host::{HostFaultError, HostTranslate};
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// use tdp_metal::translate::{IdentityTranslate, PhysRange};
/// // Guest RAM: 8 MiB at 16 MiB.
/// let ram = [PhysRange { start: 0x100_0000, end: 0x180_0000 }];
/// let host = IdentityTranslate::new(&ram, Level::L3);
/// let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 0x1000, 0x100_0000, SlotFlags::empty());
/// let page = host.translate(&slot, Gfn(0x203), true)?;
/// assert_eq!((page.pfn, page.writable, page.level), (Pfn(0x1203), true, Level::L2));
/// // The slot is 16 MiB but only 8 MiB are guest RAM.
/// assert_eq!(host.translate(&slot, Gfn(0x900), false), Err(HostFaultError::NoPage { gfn: Gfn(0x900) }));
/// # Ok::<(), HostFaultError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct IdentityTranslate<'r> {
    ram: &'r [PhysRange],
    max_level: Level,
    moved: &'r [MovedPage],
}

/// One entry of the table of moved pages: a host page (by its original physical address) and the frame
/// it lives in now; both 0 while the entry is free.
#[derive(Debug, Default)]
pub struct MovedPage {
    from: AtomicU64,
    to: AtomicU64,
}

impl MovedPage {
    /// A free entry.
    #[must_use]
    pub const fn new() -> MovedPage {
        MovedPage { from: AtomicU64::new(0), to: AtomicU64::new(0) }
    }
}

/// Why [`IdentityTranslate::move_page`] could not record a move (nothing was recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    /// An address is not page-aligned or not in declared guest RAM.
    #[error("cannot move host page {from:#x} to {to:#x}: not page-aligned guest RAM")]
    NotGuestRam {
        /// The page's original address.
        from: u64,
        /// Where it was to go.
        to: u64,
    },
    /// Every entry of the table is in use.
    #[error("the table of moved pages is full")]
    TableFull,
}

impl<'r> IdentityTranslate<'r> {
    /// Translation into `ram`, reporting host mappings up to `max_level` (L1, L2 or L3).
    #[must_use]
    pub const fn new(ram: &'r [PhysRange], max_level: Level) -> IdentityTranslate<'r> {
        IdentityTranslate { ram, max_level, moved: &[] }
    }

    /// The same translation, with `moved` as its table of moved pages (at most `moved.len()` moves).
    #[must_use]
    pub const fn with_moved_pages(self, moved: &'r [MovedPage]) -> IdentityTranslate<'r> {
        IdentityTranslate { moved, ..self }
    }

    /// Records that the host page at physical address `from` (as a memslot names it) now lives in the
    /// frame at `to`. The caller copies the bytes, and brackets the move with the MMU's
    /// `invalidate_range_start` / `invalidate_range_end` over the gfns that map the page's whole huge
    /// host block, so no leaf keeps the old frame and no huge leaf is rebuilt over the moved page.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
    /// use tdp_core::host::HostTranslate;
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_metal::translate::{IdentityTranslate, MovedPage, PhysRange};
    /// static RAM: [PhysRange; 1] = [PhysRange { start: 0x100_0000, end: 0x180_0000 }];
    /// static MOVED: [MovedPage; 2] = [MovedPage::new(), MovedPage::new()];
    /// let host = IdentityTranslate::new(&RAM, Level::L2).with_moved_pages(&MOVED);
    /// let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 0x400, 0x100_0000, SlotFlags::empty());
    /// assert_eq!(host.translate(&slot, Gfn(0x3), false)?.level, Level::L2);
    /// host.move_page(0x100_3000, 0x170_0000)?;
    /// let page = host.translate(&slot, Gfn(0x3), true)?;
    /// assert_eq!((page.pfn, page.level), (Pfn(0x1700), Level::L1));
    /// // Its neighbours stay where they were, but no 2 MiB mapping covers the block any more.
    /// let next = host.translate(&slot, Gfn(0x4), false)?;
    /// assert_eq!((next.pfn, next.level), (Pfn(0x1004), Level::L1));
    /// assert_eq!(host.current_address(0x100_3008), 0x170_0008);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`MoveError`]: an address that is not page-aligned guest RAM, or a full table.
    pub fn move_page(&self, from: u64, to: u64) -> Result<(), MoveError> {
        let aligned = |a: u64| a.is_multiple_of(PAGE_SIZE) && self.range_of(a).is_some();
        if !aligned(from) || !aligned(to) || from == 0 {
            return Err(MoveError::NotGuestRam { from, to });
        }
        let entry = self
            .moved
            .iter()
            .find(|m| m.from.load(Ordering::Acquire) == from)
            .or_else(|| self.moved.iter().find(|m| m.from.load(Ordering::Acquire) == 0))
            .ok_or(MoveError::TableFull)?;
        entry.to.store(to, Ordering::Release);
        entry.from.store(from, Ordering::Release);
        Ok(())
    }

    /// Where the byte at host physical address `hpa` (as a memslot names it) lives now.
    #[must_use]
    pub fn current_address(&self, hpa: u64) -> u64 {
        let page = hpa & !(PAGE_SIZE - 1);
        self.moved_to(page).map_or(hpa, |to| to + (hpa - page))
    }

    fn moved_to(&self, page: u64) -> Option<u64> {
        self.moved
            .iter()
            .find(|m| m.from.load(Ordering::Acquire) == page)
            .map(|m| m.to.load(Ordering::Acquire))
    }

    fn any_moved_in(&self, block: u64, size: u64) -> bool {
        self.moved.iter().any(|m| {
            let from = m.from.load(Ordering::Acquire);
            from != 0 && from >= block && from - block < size
        })
    }

    fn range_of(&self, hpa: u64) -> Option<&PhysRange> {
        self.ram.iter().find(|r| r.start <= hpa && hpa < r.end)
    }
}

impl HostTranslate for IdentityTranslate<'_> {
    fn translate(&self, slot: &Memslot, gfn: Gfn, write: bool) -> Result<HostPage, HostFaultError> {
        // RAM is writable by the hypervisor; read-only slots are the core's business.
        let _ = write;
        if !slot.contains(gfn) {
            return Err(HostFaultError::NoPage { gfn });
        }
        let hpa = slot
            .host_base
            .checked_add(slot.offset_of(gfn) << PAGE_SHIFT)
            .ok_or(HostFaultError::NoPage { gfn })?;
        let range = self.range_of(hpa).ok_or(HostFaultError::NoPage { gfn })?;
        let mut level = Level::L1;
        for candidate in [Level::L2, Level::L3] {
            if candidate > self.max_level {
                break;
            }
            let size = candidate.page_size();
            let block = hpa & !(size - 1);
            let inside = block >= range.start && block.checked_add(size).is_some_and(|end| end <= range.end);
            if !inside || self.any_moved_in(block, size) {
                break;
            }
            level = candidate;
        }
        Ok(HostPage {
            pfn: Pfn(self.moved_to(hpa).unwrap_or(hpa) >> PAGE_SHIFT),
            writable: true,
            level,
            memory: tdp_core::host::HostMemory::Ram,
        })
    }
}
