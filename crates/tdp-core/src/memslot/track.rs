//! Write tracking (KVM's page-track, `gfn_write_track`): per gfn, how many users want every guest write
//! to it to exit to them instead of reaching memory. A hypervisor that shadows a nested hypervisor's EPT
//! tracks the pages holding those tables, so that each change to them can be caught and mirrored.
//!
//! The counts live beside the memslots, under the MMU lock: a fault reads them under the read side
//! (a tracked gfn gets a read-only 4 KiB leaf, a write to it is emulated, and no huge leaf covers it),
//! tracking and untracking change them under the write side (`ExclusiveMmu::track_write`). A VM that
//! tracks nothing pays one emptiness test per fault.

use alloc::collections::BTreeMap;

use crate::addr::{AsId, Gfn};

/// Write-tracked gfns with their counts, read through [`super::MemslotSet::write_track`] and changed
/// through the MMU (`ExclusiveMmu::track_write`, which has the example).
///
/// ```
/// use tdp_core::addr::{AsId, Gfn};
/// use tdp_core::memslot::MemslotSet;
/// let set = MemslotSet::new(Gfn(1 << 36));
/// assert!(set.write_track().is_empty() && !set.write_track().is_tracked(AsId(0), Gfn(5)));
/// ```
#[derive(Clone, Debug, Default)]
pub struct WriteTrack {
    counts: BTreeMap<(AsId, Gfn), u16>,
}

/// Why a write-tracking change was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// No memslot covers the gfn (KVM tracks only memslot pages).
    #[error("gfn {gfn:?} in {as_id:?} is in no memslot")]
    NoSlot {
        /// The address space.
        as_id: AsId,
        /// The gfn.
        gfn: Gfn,
    },
    /// The gfn is private memory ([`super::SlotFlags::PRIVATE`]): its leaves live in the mirror root,
    /// which is never write-protected (KVM's page-track serves shadow paging, never private memory).
    #[error("gfn {gfn:?} in {as_id:?} is private memory, which cannot be write-tracked")]
    Private {
        /// The address space.
        as_id: AsId,
        /// The gfn.
        gfn: Gfn,
    },
    /// The count would pass `u16::MAX` (KVM's limit: `USHRT_MAX`).
    #[error("gfn {gfn:?} in {as_id:?} is already write-tracked {max} times")]
    TooMany {
        /// The address space.
        as_id: AsId,
        /// The gfn.
        gfn: Gfn,
        /// The largest count.
        max: u16,
    },
    /// Untracking a gfn that is not tracked.
    #[error("gfn {gfn:?} in {as_id:?} is not write-tracked")]
    NotTracked {
        /// The address space.
        as_id: AsId,
        /// The gfn.
        gfn: Gfn,
    },
}

impl WriteTrack {
    /// Nothing tracked.
    #[must_use]
    pub const fn new() -> Self {
        WriteTrack { counts: BTreeMap::new() }
    }

    /// Whether no gfn is tracked: the test a fault makes before any lookup.
    #[must_use]
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// How many times `gfn` is tracked (0: not at all).
    #[must_use]
    pub fn count(&self, as_id: AsId, gfn: Gfn) -> u16 {
        if self.is_empty() { 0 } else { self.counts.get(&(as_id, gfn)).copied().unwrap_or(0) }
    }

    /// Whether writes to `gfn` must exit.
    #[must_use]
    #[inline]
    pub fn is_tracked(&self, as_id: AsId, gfn: Gfn) -> bool {
        !self.is_empty() && self.counts.contains_key(&(as_id, gfn))
    }

    /// Whether any gfn of `[start, start + pages)` is tracked: a huge leaf over that range would make
    /// it writable (KVM's `lpage_info` disallow count, raised by tracking).
    #[must_use]
    #[inline]
    pub fn any_in(&self, as_id: AsId, start: Gfn, pages: u64) -> bool {
        !self.is_empty()
            && self.counts.range((as_id, start)..(as_id, Gfn(start.0.saturating_add(pages)))).next().is_some()
    }

    /// Every tracked gfn with its count, in order.
    pub fn iter(&self) -> impl Iterator<Item = (AsId, Gfn, u16)> + '_ {
        self.counts.iter().map(|(&(as_id, gfn), &n)| (as_id, gfn, n))
    }

    /// Adds one to `gfn`'s count; returns the new count.
    pub(crate) fn add(&mut self, as_id: AsId, gfn: Gfn) -> Result<u16, TrackError> {
        let count = self.counts.entry((as_id, gfn)).or_insert(0);
        *count = count.checked_add(1).ok_or(TrackError::TooMany { as_id, gfn, max: u16::MAX })?;
        Ok(*count)
    }

    /// Takes one from `gfn`'s count; returns the new count (0: no longer tracked).
    pub(crate) fn remove(&mut self, as_id: AsId, gfn: Gfn) -> Result<u16, TrackError> {
        let count = self.counts.get_mut(&(as_id, gfn)).ok_or(TrackError::NotTracked { as_id, gfn })?;
        *count -= 1;
        let left = *count;
        if left == 0 {
            self.counts.remove(&(as_id, gfn));
        }
        Ok(left)
    }

    /// Forgets every gfn of `[start, end)` (their memslot went away, as KVM frees its arrays).
    pub(crate) fn forget_range(&mut self, as_id: AsId, start: Gfn, end: Gfn) {
        if !self.is_empty() {
            self.counts.retain(|&(a, g), _| a != as_id || g < start || g >= end);
        }
    }
}
