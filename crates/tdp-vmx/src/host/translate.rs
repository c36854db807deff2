//! [`IdentityTranslate`]: `tdp-core`'s [`HostTranslate`] for a hypervisor whose memslots name physical
//! RAM directly (`Memslot::host_base` is a physical address) and whose RAM is identity-mapped.
//!
//! The host frame of a gfn is `host_base + offset` in the slot. It is reported only when it lies in RAM
//! the hypervisor declared for guests ([`PhysRange`]s), so a slot pointing at the hypervisor's own
//! memory or at device space gets [`HostFaultError::NoPage`] instead of a mapping. The "host mapping
//! level" is the largest level (up to the configured maximum) whose aligned block around the frame lies
//! inside one declared range: the core maps a gfn huge only when the slot also allows it.

use tdp_core::addr::{Gfn, Level, PAGE_SHIFT, Pfn};
use tdp_core::host::{HostFaultError, HostPage, HostTranslate};
use tdp_core::memslot::Memslot;

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
/// use tdp_vmx::host::{IdentityTranslate, PhysRange};
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
}

impl<'r> IdentityTranslate<'r> {
    /// Translation into `ram`, reporting host mappings up to `max_level` (L1, L2 or L3).
    #[must_use]
    pub const fn new(ram: &'r [PhysRange], max_level: Level) -> IdentityTranslate<'r> {
        IdentityTranslate { ram, max_level }
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
            if block >= range.start && block.checked_add(size).is_some_and(|end| end <= range.end) {
                level = candidate;
            }
        }
        Ok(HostPage {
            pfn: Pfn(hpa >> PAGE_SHIFT),
            writable: true,
            level,
            memory: tdp_core::host::HostMemory::Ram,
        })
    }
}
