//! Newtypes for the units the MMU works in: guest frames, host frames, paging levels and table indices.
//!
//! A raw `u64` never crosses a `pub` signature as an address; each unit has its own type with named
//! conversions, so a gfn cannot be passed where a host frame is meant.

use core::fmt;

/// log2 of the base page size (4 KiB), the same for EPT and NPT.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Entries in one paging-structure page (4 KiB / 8 bytes), for every level of EPT and of long-mode NPT.
pub const ENTRIES_PER_TABLE: usize = 512;
/// Bits of the address that one level of the walk consumes.
pub const BITS_PER_LEVEL: u32 = 9;

macro_rules! frame_newtype {
    ($(#[$doc:meta])* $name:ident, $fmt:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The frame `n` pages after this one.
            #[must_use]
            #[inline]
            pub const fn add(self, n: u64) -> Self {
                Self(self.0 + n)
            }
            /// The raw frame number.
            #[must_use]
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

frame_newtype!(
    /// A guest frame number: a guest-physical address shifted right by [`PAGE_SHIFT`].
    ///
    /// ```
    /// use tdp_core::addr::{Gfn, Gpa};
    /// assert_eq!(Gfn(3).gpa(), Gpa(0x3000));
    /// assert_eq!(Gpa(0x3fff).gfn(), Gfn(3));
    /// ```
    Gfn,
    "gfn {:#x}"
);
frame_newtype!(
    /// A host frame number: a host-physical address shifted right by [`PAGE_SHIFT`]. The frames that hold
    /// guest memory and the frames that hold paging-structure pages are both named by `Pfn`.
    Pfn,
    "pfn {:#x}"
);

impl Gfn {
    /// The guest-physical address of the frame's first byte.
    #[must_use]
    #[inline]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
    /// This gfn rounded down to the first gfn mapped by one entry at `level`.
    #[must_use]
    #[inline]
    pub const fn align_down(self, level: Level) -> Gfn {
        Gfn(self.0 & !(level.pages() - 1))
    }
    /// Whether this gfn is the first of an entry at `level`.
    #[must_use]
    #[inline]
    pub const fn is_aligned(self, level: Level) -> bool {
        self.0 & (level.pages() - 1) == 0
    }
    /// The index of the entry that maps this gfn in a table at `level`.
    #[must_use]
    #[inline]
    pub const fn index_at(self, level: Level) -> PtIndex {
        PtIndex(((self.0 >> level.shift_in_frames()) & 0x1ff) as u16)
    }
}

impl Pfn {
    /// The host-physical address of the frame's first byte.
    #[must_use]
    #[inline]
    pub const fn hpa(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
}

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The frame that holds this address.
    #[must_use]
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
    /// The byte offset within the frame.
    #[must_use]
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
}

impl fmt::Debug for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpa {:#x}", self.0)
    }
}

/// A paging level, counted as KVM and the SDM count them: level 1 holds 4 KiB leaves, level 2 can hold
/// 2 MiB leaves, level 3 1 GiB leaves; levels 4 and 5 only point to tables.
///
/// ```
/// use tdp_core::addr::Level;
/// assert_eq!(Level::L2.page_size(), 2 << 20);
/// assert_eq!(Level::new(6), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[repr(u8)]
pub enum Level {
    /// 4 KiB leaves (PTE level).
    L1 = 1,
    /// 2 MiB leaves or tables (PDE level).
    L2 = 2,
    /// 1 GiB leaves or tables (PDPTE level).
    L3 = 3,
    /// Tables only (PML4E level).
    L4 = 4,
    /// Tables only (PML5E level), with 5-level paging.
    L5 = 5,
}

impl Level {
    /// Every level from the 4 KiB level upwards.
    pub const ALL: [Level; 5] = [Level::L1, Level::L2, Level::L3, Level::L4, Level::L5];

    /// The level with number `n` (1..=5), or `None`.
    #[must_use]
    pub const fn new(n: u8) -> Option<Level> {
        match n {
            1 => Some(Level::L1),
            2 => Some(Level::L2),
            3 => Some(Level::L3),
            4 => Some(Level::L4),
            5 => Some(Level::L5),
            _ => None,
        }
    }
    /// The level's number, 1..=5.
    #[must_use]
    #[inline]
    pub const fn number(self) -> u8 {
        self as u8
    }
    /// 0-based position (level 1 is 0), for per-level arrays.
    #[must_use]
    #[inline]
    pub const fn idx(self) -> usize {
        self as usize - 1
    }
    /// The next level down, or `None` at level 1.
    #[must_use]
    #[inline]
    pub const fn lower(self) -> Option<Level> {
        Level::new(self as u8 - 1)
    }
    /// The next level up, or `None` at level 5.
    #[must_use]
    #[inline]
    pub const fn higher(self) -> Option<Level> {
        Level::new(self as u8 + 1)
    }
    /// How far to shift a gfn right to reach this level's index bits.
    #[must_use]
    #[inline]
    pub const fn shift_in_frames(self) -> u32 {
        (self as u32 - 1) * BITS_PER_LEVEL
    }
    /// 4 KiB frames mapped by one entry at this level.
    #[must_use]
    #[inline]
    pub const fn pages(self) -> u64 {
        1 << self.shift_in_frames()
    }
    /// Bytes mapped by one entry at this level.
    #[must_use]
    #[inline]
    pub const fn page_size(self) -> u64 {
        self.pages() << PAGE_SHIFT
    }
}

/// An index into a 512-entry table; it can only hold 0..512.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PtIndex(u16);

impl PtIndex {
    /// `Some` when `i < 512`.
    #[must_use]
    pub const fn new(i: usize) -> Option<PtIndex> {
        if i < ENTRIES_PER_TABLE { Some(PtIndex(i as u16)) } else { None }
    }
    /// The index as a `usize`, always below 512.
    #[must_use]
    #[inline]
    pub const fn get(self) -> usize {
        self.0 as usize
    }
}

/// An address-space id: KVM uses 0 for normal memory and 1 for SMM. At most [`AsId::MAX_COUNT`] exist.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct AsId(pub u16);

impl AsId {
    /// How many address spaces the MMU keeps apart (KVM_ADDRESS_SPACE_NUM on x86).
    pub const MAX_COUNT: u16 = 2;
}

/// A memslot id within its address space (KVM's 16-bit `id`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct SlotId(pub u16);

/// The memslot name the dirty ring uses: `as_id << 16 | id`, as in KVM's `kvm_dirty_gfn.slot`.
///
/// ```
/// use tdp_core::addr::{AsId, RingSlot, SlotId};
/// let s = RingSlot::new(AsId(1), SlotId(7));
/// assert_eq!(s.raw(), 0x0001_0007);
/// assert_eq!((s.as_id(), s.id()), (AsId(1), SlotId(7)));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct RingSlot(u32);

impl RingSlot {
    /// Packs an address space and a slot id.
    #[must_use]
    pub const fn new(as_id: AsId, id: SlotId) -> RingSlot {
        RingSlot(((as_id.0 as u32) << 16) | id.0 as u32)
    }
    /// Wraps a raw value read from ring memory (any value; validation happens at use).
    #[must_use]
    #[inline]
    pub const fn from_raw(raw: u32) -> RingSlot {
        RingSlot(raw)
    }
    /// The raw ABI value.
    #[must_use]
    #[inline]
    pub const fn raw(self) -> u32 {
        self.0
    }
    /// The address-space half.
    #[must_use]
    #[inline]
    pub const fn as_id(self) -> AsId {
        AsId((self.0 >> 16) as u16)
    }
    /// The slot-id half.
    #[must_use]
    #[inline]
    pub const fn id(self) -> SlotId {
        SlotId(self.0 as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_geometry_matches_the_sdm() {
        assert_eq!(Level::L1.page_size(), 4096);
        assert_eq!(Level::L2.page_size(), 2 << 20);
        assert_eq!(Level::L3.page_size(), 1 << 30);
        assert_eq!(Level::L4.page_size(), 512 << 30);
        assert_eq!(Gfn(0x12345).index_at(Level::L1).get(), 0x145);
        assert_eq!(Gfn(0x12345).index_at(Level::L2).get(), 0x91);
        assert_eq!(Gfn(0x12345).align_down(Level::L2), Gfn(0x12200));
        assert!(PtIndex::new(512).is_none());
    }
}
