//! The tracker's vocabulary: its mode, the slots it tracks, and the handles of attached vCPUs.

use tdp_core::addr::{AsId, Gpa, PAGE_SHIFT, RingSlot, SlotId};
use tdp_core::dirty_ring::RingConfig;

use crate::abi::{KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES};

/// x86-64's page size, the only one KVM logs there.
pub const X86_PAGE_SIZE: u64 = 4096;

/// How the tracker learns which pages were dirtied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackingMode {
    /// `KVM_GET_DIRTY_LOG` without manual protection: get-and-clear per slot.
    GetAndClear,
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled.
    ClearLog,
    /// Manual protection, cleared chunk by chunk by the caller: a collect only copies KVM's log; the
    /// caller clears each 64-page chunk ([`DirtyTracker::clear_chunk`](crate::DirtyTracker::clear_chunk))
    /// right before copying its pages, so no page is re-protected long before it is read, and a page
    /// written after its chunk's clear is reported by the next collect. A chunk never cleared stays dirty
    /// in KVM's log and is reported again: nothing is lost.
    ClearLogChunked,
    /// Per-vCPU dirty rings of this geometry, enabled before any vCPU was created.
    Ring(RingConfig),
    /// Rings plus each slot's bitmap (`KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`, what arm64 needs: KVM logs
    /// writes made without a running vCPU, such as the ITS tables, in the bitmap). A collect harvests the
    /// rings, resets, then gets (and clears) each slot's bitmap. Enable with
    /// [`fd::enable_ring_with_bitmap`](crate::fd::enable_ring_with_bitmap).
    RingWithBitmap(RingConfig),
}

/// A memslot the VMM registered with `KVM_MEM_LOG_DIRTY_PAGES` and wants tracked.
///
/// ```
/// use tdp_core::addr::{AsId, RingSlot, SlotId};
/// use tdp_kvm::SlotSpec;
/// // The same slot, named the tracker's way or from the region given to KVM_SET_USER_MEMORY_REGION.
/// let a = SlotSpec::new(2, 0x1_0000_0000, 262_144);
/// let b = SlotSpec::from_region(2, 0x1_0000_0000, 1 << 30);
/// assert_eq!(a, b);
/// assert_eq!(SlotSpec::from_region(1 << 16 | 2, 0, 4096).key(), RingSlot::new(AsId(1), SlotId(2)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(into = "SlotSpecRepr", from = "SlotSpecRepr")
)]
pub struct SlotSpec {
    /// KVM's slot id (the low 16 bits of `kvm_userspace_memory_region.slot`).
    pub id: SlotId,
    /// The address space (the high 16 bits; 0 unless SMM).
    pub as_id: AsId,
    /// The slot's first guest-physical address.
    pub guest_base: Gpa,
    /// The slot's size in 4 KiB pages (`memory_size >> 12`). It must match KVM's: the bitmap modes detect a
    /// larger KVM slot, the ring mode counts entries beyond it as invalid.
    pub pages: u64,
    /// The page size KVM logs this slot in, in bytes: 4096 on x86-64 (the only size `register_slot`
    /// accepts there); other architectures log in their host page size (arm64: 4, 16 or 64 KiB).
    pub page_size: u64,
    /// The memslot's KVM flags (`kvm_userspace_memory_region.flags`); by default
    /// `KVM_MEM_LOG_DIRTY_PAGES`. A guest_memfd slot (`KVM_MEM_GUEST_MEMFD`) is refused: KVM cannot log it.
    pub flags: u32,
}

impl SlotSpec {
    /// A slot of address space 0.
    #[must_use]
    pub const fn new(id: u16, guest_base: u64, pages: u64) -> Self {
        SlotSpec {
            id: SlotId(id),
            as_id: AsId(0),
            guest_base: Gpa(guest_base),
            pages,
            page_size: X86_PAGE_SIZE,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        }
    }

    /// The same slot in address space `as_id` (1: SMM on x86).
    #[must_use]
    pub const fn with_as_id(mut self, as_id: AsId) -> Self {
        self.as_id = as_id;
        self
    }

    /// The same slot logged in pages of `page_size` bytes.
    #[must_use]
    pub const fn with_page_size(mut self, page_size: u64) -> Self {
        self.page_size = page_size;
        self
    }

    /// The same slot with KVM memslot flags `flags` (as given to `KVM_SET_USER_MEMORY_REGION(2)`).
    ///
    /// ```
    /// use tdp_kvm::{SlotSpec, abi};
    /// let s = SlotSpec::new(1, 0, 16).with_flags(abi::KVM_MEM_LOG_DIRTY_PAGES | abi::KVM_MEM_GUEST_MEMFD);
    /// assert!(s.is_guest_memfd());
    /// ```
    #[must_use]
    pub const fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    /// Whether the slot is backed by guest_memfd (`KVM_MEM_GUEST_MEMFD`).
    #[must_use]
    pub const fn is_guest_memfd(&self) -> bool {
        self.flags & KVM_MEM_GUEST_MEMFD != 0
    }

    /// The slot as KVM's `kvm_userspace_memory_region` names it: `slot = as_id << 16 | id`,
    /// `guest_phys_addr`, `memory_size` (bytes).
    #[must_use]
    pub const fn from_region(slot: u32, guest_phys_addr: u64, memory_size: u64) -> Self {
        let key = RingSlot::from_raw(slot);
        SlotSpec::new(key.id().0, guest_phys_addr, memory_size >> PAGE_SHIFT).with_as_id(key.as_id())
    }

    /// The `as_id << 16 | id` name KVM uses for the slot.
    #[must_use]
    pub const fn key(&self) -> RingSlot {
        RingSlot::new(self.as_id, self.id)
    }
}

/// An attached vCPU's index in the tracker, for [`RingFullHandler`](crate::RingFullHandler) (or `VcpuRunner`) and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuHandle(pub(crate) usize);

impl VcpuHandle {
    /// The index (attach order, from 0).
    #[must_use]
    pub const fn index(self) -> usize {
        self.0
    }
}

/// `SlotSpec` as plain numbers, for `serde` (`tdp-core`'s newtypes have no `serde`).
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
struct SlotSpecRepr {
    slot: u32,
    guest_base: u64,
    pages: u64,
    page_size: u64,
    flags: u32,
}

#[cfg(feature = "serde")]
impl From<SlotSpec> for SlotSpecRepr {
    fn from(s: SlotSpec) -> Self {
        SlotSpecRepr {
            slot: s.key().raw(),
            guest_base: s.guest_base.0,
            pages: s.pages,
            page_size: s.page_size,
            flags: s.flags,
        }
    }
}

#[cfg(feature = "serde")]
impl From<SlotSpecRepr> for SlotSpec {
    fn from(r: SlotSpecRepr) -> Self {
        // Any values are representable; `register_slot` validates them.
        let key = RingSlot::from_raw(r.slot);
        SlotSpec::new(key.id().0, r.guest_base, r.pages)
            .with_as_id(key.as_id())
            .with_page_size(r.page_size)
            .with_flags(r.flags)
    }
}
