//! Memslots: the guest-physical ranges backed by host memory, their validation and lookup by gfn.
//!
//! A [`Memslot`] is KVM's `kvm_memory_slot` reduced to what the MMU reads: where it starts, how many
//! pages it has, where the host keeps them, and its flags. [`MemslotSet`] holds every slot of every
//! address space sorted by base gfn, rejects overlapping or malformed slots with errors that carry the
//! values, and counts a generation that MMIO SPTEs are tagged with. Slot ids are limited per set
//! ([`MemslotSet::slot_limit`]): by default to KVM's [`KVM_USER_MEM_SLOTS`], configurable with
//! [`MemslotSet::with_slot_limit`] (an [`Mmu`](crate::mmu::Mmu)'s with
//! [`MmuConfig::slot_limit`](crate::mmu::MmuConfig::slot_limit)).
//!
//! Keeps: I1's reference side: the slot a gfn falls in (or none: MMIO) is what every mapping must agree
//! with, and the generation changes on every update so that no cached MMIO SPTE outlives a slot change.

mod track;

pub use track::{TrackError, WriteTrack};

use alloc::vec::Vec;
use core::num::NonZeroU16;

use bitflags::bitflags;

use crate::addr::{AsId, Gfn, Level, PAGE_SIZE, SlotId};

bitflags! {
    /// Memslot flags, with KVM's values (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_MEM_READONLY`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct SlotFlags: u32 {
        /// Dirty logging is enabled for the slot.
        const LOG_DIRTY = 1 << 0;
        /// The guest may not write the slot; writes exit to the VMM as MMIO.
        const READONLY = 1 << 1;
        /// Private memory (KVM's `KVM_MEM_GUEST_MEMFD`, for confidential VMs): mapped only through the
        /// vCPUs' mirror roots, whose every change the host copies into its external tables
        /// ([`crate::host::ExternalTables`]). Mapped at 4 KiB, always writable; never read-only or
        /// dirty-logged (KVM refuses both with guest_memfd), and fixed for the slot's life.
        const PRIVATE = 1 << 2;
        /// With [`SlotFlags::LOG_DIRTY`]: the slot's dirty log starts with every page dirty (KVM's
        /// `KVM_DIRTY_LOG_INITIALLY_SET`, a VM-wide capability in KVM, here given per slot: see
        /// [`crate::dirty_bitmap::DirtyTrackingMode::initially_set`]). Turning logging on then skips
        /// the write-protect pass, and each range is split and protected when it is first cleared
        /// (`ExclusiveMmu::reprotect_dirty`, KVM cb00a70b). Not a KVM memslot flag (bit 31 is no
        /// `KVM_MEM_*` value); it may change only together with `LOG_DIRTY` or while logging is off.
        const LOG_INITIALLY_SET = 1 << 31;
    }
}

impl SlotFlags {
    /// The flags that turn dirty logging on in `mode`: [`SlotFlags::LOG_DIRTY`], with
    /// [`SlotFlags::LOG_INITIALLY_SET`] when the mode's bitmaps start all-set.
    ///
    /// ```
    /// use tdp_core::dirty_bitmap::DirtyTrackingMode;
    /// use tdp_core::memslot::SlotFlags;
    /// let mode = DirtyTrackingMode::ManualProtect { initially_set: true };
    /// assert_eq!(SlotFlags::logging(mode), SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET);
    /// ```
    #[must_use]
    pub const fn logging(mode: crate::dirty_bitmap::DirtyTrackingMode) -> SlotFlags {
        if mode.initially_set() {
            SlotFlags::LOG_DIRTY.union(SlotFlags::LOG_INITIALLY_SET)
        } else {
            SlotFlags::LOG_DIRTY
        }
    }
}

/// One memslot.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, SlotId};
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// let slot = Memslot::new(AsId(0), SlotId(1), Gfn(0x100), 0x200, 0x7f00_0000_0000, SlotFlags::empty());
/// assert!(slot.contains(Gfn(0x2ff)) && !slot.contains(Gfn(0x300)));
/// assert_eq!(slot.host_addr(Gfn(0x101)), 0x7f00_0000_1000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Memslot {
    /// The address space the slot belongs to.
    pub as_id: AsId,
    /// The slot's id within its address space.
    pub id: SlotId,
    /// The first guest frame.
    pub base_gfn: Gfn,
    /// How many 4 KiB pages the slot spans.
    pub pages: u64,
    /// Where the host keeps the first page: a user virtual address for a VMM, a physical address on bare
    /// metal. Only the backend's [`crate::host::HostTranslate`] interprets it; it must be page-aligned.
    pub host_base: u64,
    /// Flags.
    pub flags: SlotFlags,
}

impl Memslot {
    /// A slot; [`MemslotSet::insert`] validates it.
    #[must_use]
    pub const fn new(
        as_id: AsId,
        id: SlotId,
        base_gfn: Gfn,
        pages: u64,
        host_base: u64,
        flags: SlotFlags,
    ) -> Self {
        Memslot { as_id, id, base_gfn, pages, host_base, flags }
    }
    /// One past the last gfn.
    #[must_use]
    #[inline]
    pub const fn end_gfn(&self) -> Gfn {
        Gfn(self.base_gfn.0.saturating_add(self.pages))
    }
    /// Whether `gfn` lies in the slot.
    #[must_use]
    #[inline]
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.base_gfn.0 && gfn.0 - self.base_gfn.0 < self.pages
    }
    /// The host address of `gfn`'s page. Meaningful only for a gfn in the slot.
    #[must_use]
    #[inline]
    pub const fn host_addr(&self, gfn: Gfn) -> u64 {
        self.host_base + (gfn.0 - self.base_gfn.0) * PAGE_SIZE
    }
    /// The page index of `gfn` within the slot (the dirty ring's `offset`).
    #[must_use]
    #[inline]
    pub const fn offset_of(&self, gfn: Gfn) -> u64 {
        gfn.0 - self.base_gfn.0
    }
    /// Whether the slot is dirty-logged with a log that started all-set
    /// ([`SlotFlags::LOG_INITIALLY_SET`]): its huge pages are split, and its pages protected, range by
    /// range as the log is cleared.
    #[must_use]
    #[inline]
    pub const fn is_log_initially_set(&self) -> bool {
        self.flags.contains(SlotFlags::LOG_DIRTY.union(SlotFlags::LOG_INITIALLY_SET))
    }
    /// Whether the guest may write the slot.
    #[must_use]
    #[inline]
    pub const fn is_writable(&self) -> bool {
        !self.flags.contains(SlotFlags::READONLY)
    }
    /// Whether the slot is private memory, mapped through the mirror roots ([`SlotFlags::PRIVATE`]).
    #[must_use]
    #[inline]
    pub const fn is_private(&self) -> bool {
        self.flags.contains(SlotFlags::PRIVATE)
    }
    /// Whether dirty logging is on.
    #[must_use]
    #[inline]
    pub const fn is_dirty_logged(&self) -> bool {
        self.flags.contains(SlotFlags::LOG_DIRTY)
    }
    /// Whether the slot allows one leaf at `level` to map `gfn`: the whole huge page lies inside the slot
    /// and the host address is aligned like the gfn (KVM's `lpage_info` disallow rules).
    #[must_use]
    #[inline]
    pub const fn allows_huge(&self, gfn: Gfn, level: Level) -> bool {
        let pages = level.pages();
        let start = gfn.0 & !(pages - 1);
        let host_page = self.host_base / PAGE_SIZE;
        start >= self.base_gfn.0
            && start + pages <= self.base_gfn.0 + self.pages
            && (self.base_gfn.0 ^ host_page) & (pages - 1) == 0
    }
}

/// How many memslots KVM lets userspace create per address space on x86: its `KVM_USER_MEM_SLOTS`,
/// `KVM_MEM_SLOTS_NUM` (`SHRT_MAX`, 32767) less the 3 `KVM_INTERNAL_MEM_SLOTS` x86 keeps for itself, so
/// ids 0 to 32763 (`include/linux/kvm_host.h`, `arch/x86/include/asm/kvm_host.h`). KVM refuses a higher id
/// with `EINVAL`; [`MemslotSet`] refuses it by default with [`SlotError::IdOutOfRange`].
pub const KVM_USER_MEM_SLOTS: NonZeroU16 = match NonZeroU16::new(32764) {
    Some(n) => n,
    None => panic!("32764 is not zero"),
};

/// Why a memslot change was refused. The set is unchanged after any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// A slot with no pages.
    #[error("slot {id:?} has no pages")]
    Empty {
        /// The slot.
        id: SlotId,
    },
    /// The slot ends above the highest gfn the tables can map.
    #[error("slot {id:?} ends at {end:?}, above the largest mappable gfn {max:?}")]
    TooHigh {
        /// The slot.
        id: SlotId,
        /// One past its last gfn (saturated).
        end: Gfn,
        /// One past the last mappable gfn.
        max: Gfn,
    },
    /// The host address is not page-aligned.
    #[error("slot {id:?} has host address {host_base:#x}, which is not page-aligned")]
    Misaligned {
        /// The slot.
        id: SlotId,
        /// The bad address.
        host_base: u64,
    },
    /// The slot id is at or above the set's limit ([`MemslotSet::slot_limit`]).
    #[error(
        "slot id {} in {as_id:?} is out of range: ids run from 0 to {} (at most {limit} memslots per address \
         space; KVM allows {} on x86)",
        id.0,
        limit.get() - 1,
        KVM_USER_MEM_SLOTS
    )]
    IdOutOfRange {
        /// The address space.
        as_id: AsId,
        /// The id.
        id: SlotId,
        /// How many ids the set allows (ids `0..limit`).
        limit: NonZeroU16,
    },
    /// The address space id is out of range.
    #[error("address space {as_id:?} does not exist (at most {} address spaces)", AsId::MAX_COUNT)]
    BadAddressSpace {
        /// The bad id.
        as_id: AsId,
    },
    /// [`SlotFlags::LOG_INITIALLY_SET`] would change while the slot stays dirty-logged: pages left
    /// writable because the log started all-set would never be protected.
    #[error("slot {id:?} in {as_id:?} is dirty-logged: LOG_INITIALLY_SET can change only with LOG_DIRTY")]
    InitiallySetChange {
        /// The address space.
        as_id: AsId,
        /// The slot.
        id: SlotId,
    },
    /// A private slot ([`SlotFlags::PRIVATE`]) with flags it cannot have (read-only, dirty-logged), or
    /// a change of its privacy: KVM refuses the same with guest_memfd.
    #[error(
        "slot {id:?} in {as_id:?}: private memory cannot be read-only or dirty-logged, nor change privacy"
    )]
    PrivateFlags {
        /// The address space.
        as_id: AsId,
        /// The slot.
        id: SlotId,
    },
    /// A private slot on a host without external tables: nothing could map it.
    #[error("slot {id:?} in {as_id:?} is private, but the host has no external tables for mirror roots")]
    NoExternalTables {
        /// The address space.
        as_id: AsId,
        /// The slot.
        id: SlotId,
    },
    /// The new slot overlaps an existing one in the same address space.
    #[error("slot {new:?} overlaps slot {existing:?} in {as_id:?}")]
    Overlap {
        /// The address space.
        as_id: AsId,
        /// The slot being added.
        new: SlotId,
        /// The slot it overlaps.
        existing: SlotId,
    },
    /// The id is already used in this address space.
    #[error("slot {id:?} already exists in {as_id:?}")]
    DuplicateId {
        /// The address space.
        as_id: AsId,
        /// The id.
        id: SlotId,
    },
    /// No slot with this id.
    #[error("slot {id:?} does not exist in {as_id:?}")]
    NotFound {
        /// The address space.
        as_id: AsId,
        /// The id.
        id: SlotId,
    },
    /// The read-only flag of an existing slot cannot change.
    #[error("the read-only flag of slot {id:?} in {as_id:?} cannot change")]
    ReadOnlyChange {
        /// The address space.
        as_id: AsId,
        /// The id.
        id: SlotId,
    },
    /// Memory for the slot list could not be allocated.
    #[error("no memory to store another slot")]
    NoMemory,
}

/// Every memslot of every address space, sorted by (address space, base gfn).
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, SlotId};
/// use tdp_core::memslot::{Memslot, MemslotSet, SlotError, SlotFlags};
/// let mut set = MemslotSet::new(Gfn(1 << 36));
/// set.insert(Memslot::new(AsId(0), SlotId(0), Gfn(0), 256, 0x10_0000, SlotFlags::empty()))?;
/// let clash = Memslot::new(AsId(0), SlotId(1), Gfn(255), 2, 0x20_0000, SlotFlags::empty());
/// assert!(matches!(set.insert(clash), Err(SlotError::Overlap { .. })));
/// assert_eq!(set.find(AsId(0), Gfn(17)).map(|s| s.id), Some(SlotId(0)));
/// assert_eq!(set.generation(), 1);
/// // Ids run up to KVM's limit on x86 (32764 user memslots).
/// let too_high = Memslot::new(AsId(0), SlotId(32764), Gfn(0x1000), 1, 0x30_0000, SlotFlags::empty());
/// assert!(matches!(set.insert(too_high), Err(SlotError::IdOutOfRange { .. })));
/// # Ok::<(), SlotError>(())
/// ```
#[derive(Clone, Debug)]
pub struct MemslotSet {
    slots: Vec<Memslot>,
    generation: u64,
    max_gfn: Gfn,
    slot_limit: NonZeroU16,
    track: WriteTrack,
}

impl MemslotSet {
    /// An empty set for tables that map gfns below `max_gfn`, taking slot ids below
    /// [`KVM_USER_MEM_SLOTS`].
    #[must_use]
    pub const fn new(max_gfn: Gfn) -> Self {
        Self::with_slot_limit(max_gfn, KVM_USER_MEM_SLOTS)
    }

    /// An empty set taking slot ids below `limit` in each address space (a VMM whose KVM reports fewer
    /// memslots with `KVM_CAP_NR_MEMSLOTS`, or that wants fewer, passes its number).
    ///
    /// ```
    /// use core::num::NonZeroU16;
    /// use tdp_core::addr::{AsId, Gfn, SlotId};
    /// use tdp_core::memslot::{Memslot, MemslotSet, SlotError, SlotFlags};
    /// let limit = NonZeroU16::new(509).unwrap(); // KVM_USER_MEM_SLOTS on x86 before Linux 5.15
    /// let mut set = MemslotSet::with_slot_limit(Gfn(1 << 36), limit);
    /// assert!(set.insert(Memslot::new(AsId(0), SlotId(508), Gfn(0), 1, 0x1000, SlotFlags::empty())).is_ok());
    /// let err = set.insert(Memslot::new(AsId(0), SlotId(509), Gfn(1), 1, 0x2000, SlotFlags::empty()));
    /// assert_eq!(err, Err(SlotError::IdOutOfRange { as_id: AsId(0), id: SlotId(509), limit }));
    /// ```
    #[must_use]
    pub const fn with_slot_limit(max_gfn: Gfn, limit: NonZeroU16) -> Self {
        MemslotSet { slots: Vec::new(), generation: 0, max_gfn, slot_limit: limit, track: WriteTrack::new() }
    }

    /// How many slot ids each address space may use: ids `0..slot_limit()`.
    #[must_use]
    #[inline]
    pub const fn slot_limit(&self) -> NonZeroU16 {
        self.slot_limit
    }

    /// The write-tracked gfns ([`WriteTrack`]).
    #[must_use]
    #[inline]
    pub fn write_track(&self) -> &WriteTrack {
        &self.track
    }

    /// The write-tracked gfns, to change (the MMU does, under its write lock, with the protection
    /// that goes with it).
    pub(crate) fn write_track_mut(&mut self) -> &mut WriteTrack {
        &mut self.track
    }

    /// Counts updates; MMIO SPTEs are tagged with its low bits.
    #[must_use]
    #[inline]
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    /// One past the largest gfn a slot may reach.
    #[must_use]
    #[inline]
    pub const fn max_gfn(&self) -> Gfn {
        self.max_gfn
    }

    /// All slots, sorted by (address space, base gfn).
    #[inline]
    pub fn iter(&self) -> core::slice::Iter<'_, Memslot> {
        self.slots.iter()
    }

    /// The slot containing `gfn` in `as_id`.
    #[must_use]
    #[inline]
    pub fn find(&self, as_id: AsId, gfn: Gfn) -> Option<&Memslot> {
        self.find_index(as_id, gfn).map(|i| &self.slots[i])
    }

    /// The index in `slots` of the slot containing `gfn` in `as_id`.
    #[inline]
    fn find_index(&self, as_id: AsId, gfn: Gfn) -> Option<usize> {
        // The first slot that sorts after (as_id, gfn); the candidate is the one before it.
        let after = self.slots.partition_point(|s| (s.as_id, s.base_gfn) <= (as_id, gfn));
        let at = after.checked_sub(1)?;
        let candidate = self.slots.get(at)?;
        (candidate.as_id == as_id && candidate.contains(gfn)).then_some(at)
    }

    /// [`MemslotSet::find`] trying the slot at index `*hint` first, and leaving the index of the slot
    /// found in `*hint` (KVM's per-vCPU `last_used_slot`). A vCPU faults mostly in the slot it faulted in
    /// last, so the search is usually one comparison. The hint needs no generation: it is only an index,
    /// checked every time (slots of one address space never overlap, so a slot of `as_id` containing
    /// `gfn` is the answer wherever it sits), and a stale or out-of-range one just costs the search.
    #[must_use]
    #[inline]
    pub(crate) fn find_hinted(&self, as_id: AsId, gfn: Gfn, hint: &mut usize) -> Option<&Memslot> {
        if let Some(slot) = self.slots.get(*hint)
            && slot.as_id == as_id
            && slot.contains(gfn)
        {
            return Some(slot);
        }
        self.find_and_hint(as_id, gfn, hint)
    }

    /// The miss path of [`MemslotSet::find_hinted`].
    #[inline(never)]
    fn find_and_hint(&self, as_id: AsId, gfn: Gfn, hint: &mut usize) -> Option<&Memslot> {
        let at = self.find_index(as_id, gfn)?;
        *hint = at;
        self.slots.get(at)
    }

    /// The slot with `id` in `as_id`.
    #[must_use]
    #[inline]
    pub fn get(&self, as_id: AsId, id: SlotId) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.as_id == as_id && s.id == id)
    }

    /// Checks `slot` against the set as if it were inserted (ignoring a slot with the same id when
    /// `replacing`).
    ///
    /// # Errors
    /// The first rule the slot breaks; see [`SlotError`].
    #[inline]
    pub fn validate(&self, slot: &Memslot, replacing: bool) -> Result<(), SlotError> {
        let id = slot.id;
        if slot.as_id.0 >= AsId::MAX_COUNT {
            return Err(SlotError::BadAddressSpace { as_id: slot.as_id });
        }
        if id.0 >= self.slot_limit.get() {
            return Err(SlotError::IdOutOfRange { as_id: slot.as_id, id, limit: self.slot_limit });
        }
        if slot.pages == 0 {
            return Err(SlotError::Empty { id });
        }
        let not_private = SlotFlags::READONLY.union(SlotFlags::LOG_DIRTY).union(SlotFlags::LOG_INITIALLY_SET);
        if slot.is_private() && slot.flags.intersects(not_private) {
            return Err(SlotError::PrivateFlags { as_id: slot.as_id, id });
        }
        let end = slot.base_gfn.0.checked_add(slot.pages);
        if end.is_none_or(|end| end > self.max_gfn.0) {
            return Err(SlotError::TooHigh { id, end: Gfn(end.unwrap_or(u64::MAX)), max: self.max_gfn });
        }
        if !slot.host_base.is_multiple_of(PAGE_SIZE)
            || slot.host_base.checked_add(slot.pages * PAGE_SIZE).is_none()
        {
            return Err(SlotError::Misaligned { id, host_base: slot.host_base });
        }
        for other in self.slots.iter().filter(|s| s.as_id == slot.as_id) {
            if other.id == id {
                if replacing {
                    continue;
                }
                return Err(SlotError::DuplicateId { as_id: slot.as_id, id });
            }
            if other.base_gfn < slot.end_gfn() && slot.base_gfn < other.end_gfn() {
                return Err(SlotError::Overlap { as_id: slot.as_id, new: id, existing: other.id });
            }
        }
        Ok(())
    }

    /// Adds a slot and bumps the generation.
    ///
    /// # Errors
    /// See [`MemslotSet::validate`]; [`SlotError::NoMemory`] if the list cannot grow. The set is unchanged.
    #[inline]
    pub fn insert(&mut self, slot: Memslot) -> Result<(), SlotError> {
        self.validate(&slot, false)?;
        self.slots.try_reserve(1).map_err(|_| SlotError::NoMemory)?;
        let at = self.slots.partition_point(|s| (s.as_id, s.base_gfn) < (slot.as_id, slot.base_gfn));
        self.slots.insert(at, slot);
        self.generation += 1;
        Ok(())
    }

    /// Removes the slot `id` of `as_id`, bumps the generation and returns the slot.
    ///
    /// # Errors
    /// [`SlotError::NotFound`]; the set is unchanged.
    #[inline]
    pub fn remove(&mut self, as_id: AsId, id: SlotId) -> Result<Memslot, SlotError> {
        let at = self
            .slots
            .iter()
            .position(|s| s.as_id == as_id && s.id == id)
            .ok_or(SlotError::NotFound { as_id, id })?;
        self.generation += 1;
        let slot = self.slots.remove(at);
        self.track.forget_range(slot.as_id, slot.base_gfn, slot.end_gfn());
        Ok(slot)
    }

    /// Changes the flags of slot `id` (KVM allows only the dirty-logging flag to change) and returns the
    /// slot as it was.
    ///
    /// # Errors
    /// [`SlotError::NotFound`]; the set is unchanged.
    #[inline]
    pub fn set_flags(&mut self, as_id: AsId, id: SlotId, flags: SlotFlags) -> Result<Memslot, SlotError> {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.as_id == as_id && s.id == id)
            .ok_or(SlotError::NotFound { as_id, id })?;
        let old = *slot;
        if old.is_private() || flags.contains(SlotFlags::PRIVATE) {
            return Err(SlotError::PrivateFlags { as_id, id });
        }
        slot.flags = flags;
        self.generation += 1;
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn slot(id: u16, base: u64, pages: u64) -> Memslot {
        Memslot::new(AsId(0), SlotId(id), Gfn(base), pages, base.wrapping_mul(PAGE_SIZE), SlotFlags::empty())
    }

    #[test]
    fn i1_find_returns_only_the_containing_slot() {
        let mut set = MemslotSet::new(Gfn(1 << 36));
        set.insert(slot(1, 0x1000, 0x10)).unwrap();
        set.insert(slot(0, 0, 0x10)).unwrap();
        set.insert(Memslot { as_id: AsId(1), ..slot(0, 0x1008, 1) }).unwrap();
        assert_eq!(set.find(AsId(0), Gfn(0xf)).map(|s| s.id), Some(SlotId(0)));
        assert_eq!(set.find(AsId(0), Gfn(0x10)), None);
        assert_eq!(set.find(AsId(0), Gfn(0x1008)).map(|s| s.id), Some(SlotId(1)));
        assert_eq!(set.find(AsId(1), Gfn(0x1008)).map(|s| s.id), Some(SlotId(0)));
        assert_eq!(set.find(AsId(1), Gfn(0x1009)), None);
        assert_eq!(set.generation(), 3);
    }

    #[test]
    fn i5_bad_slots_are_refused_with_their_values() {
        let mut set = MemslotSet::new(Gfn(1 << 20));
        set.insert(slot(0, 0x100, 0x100)).unwrap();
        assert_eq!(
            set.insert(slot(1, 0x1ff, 1)),
            Err(SlotError::Overlap { as_id: AsId(0), new: SlotId(1), existing: SlotId(0) })
        );
        assert_eq!(
            set.insert(slot(0, 0x1000, 1)),
            Err(SlotError::DuplicateId { as_id: AsId(0), id: SlotId(0) })
        );
        assert_eq!(set.insert(slot(2, 0x1000, 0)), Err(SlotError::Empty { id: SlotId(2) }));
        assert!(matches!(set.insert(slot(2, (1 << 20) - 1, 2)), Err(SlotError::TooHigh { .. })));
        assert!(matches!(set.insert(slot(2, u64::MAX, 2)), Err(SlotError::TooHigh { .. })));
        let bad_host = Memslot { host_base: 0x1001, ..slot(2, 0x1000, 1) };
        assert_eq!(set.insert(bad_host), Err(SlotError::Misaligned { id: SlotId(2), host_base: 0x1001 }));
        let bad_as = Memslot { as_id: AsId(2), ..slot(2, 0x1000, 1) };
        assert_eq!(set.insert(bad_as), Err(SlotError::BadAddressSpace { as_id: AsId(2) }));
        assert_eq!(
            set.remove(AsId(0), SlotId(9)),
            Err(SlotError::NotFound { as_id: AsId(0), id: SlotId(9) })
        );
        assert_eq!(set.generation(), 1, "refused changes do not bump the generation");
        assert_eq!(set.iter().count(), 1);
    }

    #[test]
    fn slot_ids_stop_at_the_limit_kvm_or_configured() {
        assert_eq!(KVM_USER_MEM_SLOTS.get(), 32764, "KVM_MEM_SLOTS_NUM (32767) - 3 internal slots on x86");
        let mut set = MemslotSet::new(Gfn(1 << 36));
        assert_eq!(set.slot_limit(), KVM_USER_MEM_SLOTS);
        set.insert(slot(32763, 0x1000, 1)).unwrap();
        for id in [32764, 32767, u16::MAX] {
            let err = set.insert(slot(id, 0x2000, 1)).unwrap_err();
            assert_eq!(
                err,
                SlotError::IdOutOfRange { as_id: AsId(0), id: SlotId(id), limit: KVM_USER_MEM_SLOTS }
            );
            let text = err.to_string();
            assert!(
                text.contains(&id.to_string()) && text.contains("0 to 32763") && text.contains("32764"),
                "{text}"
            );
        }
        // The same limit in the second address space, and when validating a replacement.
        let smm = Memslot { as_id: AsId(1), ..slot(32764, 0x1000, 1) };
        assert!(matches!(set.validate(&smm, true), Err(SlotError::IdOutOfRange { as_id: AsId(1), .. })));
        assert_eq!(set.generation(), 1, "refused ids leave the set unchanged");

        let eight = NonZeroU16::new(8).unwrap();
        let mut small = MemslotSet::with_slot_limit(Gfn(1 << 36), eight);
        small.insert(slot(7, 0, 1)).unwrap();
        let err = small.insert(slot(8, 1, 1)).unwrap_err();
        assert_eq!(err, SlotError::IdOutOfRange { as_id: AsId(0), id: SlotId(8), limit: eight });
        assert!(err.to_string().contains("0 to 7"), "{err}");
        let one = MemslotSet::with_slot_limit(Gfn(1 << 36), NonZeroU16::MIN);
        assert!(one.validate(&slot(0, 0, 1), false).is_ok());
        assert!(one.validate(&slot(1, 0, 1), false).is_err());
    }

    #[test]
    fn huge_pages_need_a_whole_aligned_range_inside_the_slot() {
        let s = slot(0, 0x200, 0x400);
        assert!(s.allows_huge(Gfn(0x3ff), Level::L2));
        assert!(!s.allows_huge(Gfn(0x1ff), Level::L2));
        assert!(!s.allows_huge(Gfn(0x300), Level::L3));
        let shifted = Memslot { host_base: 0x1000, ..s };
        assert!(!shifted.allows_huge(Gfn(0x200), Level::L2), "host address misaligned with the gfn");
    }
}
