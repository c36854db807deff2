//! The root list: one tree per (address space, validity), shared by the vCPUs and reference counted.
//!
//! A root is created with two references, one for the list and one for the vCPU that asked; vCPUs of the
//! same address space share a valid root. Invalidation (under the write lock) marks roots invalid;
//! zapping an invalid root's tree drops the list's reference; the last reference frees the root page.
//! So a root page is never freed while a vCPU can still load it into its EPTP/nCR3 (I2).
//!
//! Mirror roots (private memslots) live in a list of their own: no operation on direct roots (logging,
//! aging, invalidation, recovery) ever sees them, and they are never invalidated, only torn down with
//! the MMU, as KVM's mirror roots for TDX.

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{AsId, Pfn};
use crate::host::AllocError;
use crate::sync::{AtomicBool, Ordering};

/// A vCPU's counted reference to a root. It is not `Clone`: every reference is returned exactly once
/// with [`super::Mmu::put_root`].
#[derive(Debug)]
pub struct RootRef {
    pfn: Pfn,
    as_id: AsId,
    /// Shared with the list entry, so a fault checks validity without taking the list's lock.
    valid: Arc<AtomicBool>,
}

impl RootRef {
    /// The root table's frame: what goes into the EPTP or nCR3.
    #[must_use]
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
    /// The address space the root maps.
    #[must_use]
    pub fn as_id(&self) -> AsId {
        self.as_id
    }
    /// Whether the root is still valid. Invalidation happens under the MMU write lock and faults read
    /// this under the read lock, so the lock orders them and a Relaxed load is enough.
    #[inline]
    pub(super) fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Relaxed)
    }
}

/// A root as the list sees it, for checkers and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootInfo {
    /// The root table's frame.
    pub pfn: Pfn,
    /// Its address space.
    pub as_id: AsId,
    /// False once invalidated.
    pub valid: bool,
    /// References held (the list's and vCPUs').
    pub refcount: u32,
    /// A mirror root (for private memslots, copied into the host's external tables), not a direct one.
    pub mirror: bool,
}

#[derive(Debug)]
struct Entry {
    info: RootInfo,
    valid: Arc<AtomicBool>,
    /// The list still holds its reference; cleared by whoever zaps the invalid root.
    list_ref: bool,
}

/// The roots, behind a spin lock (KVM's `tdp_mmu_pages_lock`); every critical section is short.
pub(super) struct RootList {
    entries: spin::Mutex<Vec<Entry>>,
    /// The list holds mirror roots ([`RootInfo::mirror`]).
    mirror: bool,
}

impl RootList {
    pub(super) const fn new(mirror: bool) -> Self {
        RootList { entries: spin::Mutex::new(Vec::new()), mirror }
    }

    pub(super) fn snapshot(&self) -> Vec<RootInfo> {
        self.entries.lock().iter().map(|e| e.info).collect()
    }

    /// A valid root for `as_id`, or a new one in the page `alloc` gives.
    pub(super) fn get_or_create(
        &self,
        as_id: AsId,
        alloc: impl FnOnce() -> Result<Pfn, AllocError>,
    ) -> Result<RootRef, AllocError> {
        let mut entries = self.entries.lock();
        if let Some(e) = entries.iter_mut().find(|e| e.info.valid && e.info.as_id == as_id) {
            e.info.refcount += 1;
            return Ok(RootRef { pfn: e.info.pfn, as_id, valid: e.valid.clone() });
        }
        entries.try_reserve(1).map_err(|_| AllocError)?;
        let pfn = alloc()?;
        let valid = Arc::new(AtomicBool::new(true));
        let info = RootInfo { pfn, as_id, valid: true, refcount: 2, mirror: self.mirror };
        entries.push(Entry { info, valid: valid.clone(), list_ref: true });
        Ok(RootRef { pfn, as_id, valid })
    }

    /// Drops one reference; returns the root's frame when it was the last.
    pub(super) fn put(&self, root: RootRef) -> Option<Pfn> {
        self.put_pfn(root.pfn)
    }

    fn put_pfn(&self, pfn: Pfn) -> Option<Pfn> {
        let mut entries = self.entries.lock();
        let at = entries.iter().position(|e| e.info.pfn == pfn)?;
        entries[at].info.refcount -= 1;
        if entries[at].info.refcount > 0 {
            return None;
        }
        entries.swap_remove(at);
        Some(pfn)
    }

    /// Marks the roots of `as_id` (or all) invalid; returns how many changed.
    pub(super) fn invalidate(&self, as_id: Option<AsId>) -> usize {
        let mut n = 0;
        for e in self.entries.lock().iter_mut().filter(|e| as_id.is_none_or(|a| a == e.info.as_id)) {
            n += usize::from(e.info.valid);
            e.info.valid = false;
            e.valid.store(false, Ordering::Relaxed);
        }
        n
    }

    /// Roots of `as_id` (or all), valid or not, each with a reference taken so it survives a yield.
    /// Every returned frame must be given back with [`RootList::release`].
    pub(super) fn acquire_all(&self, as_id: Option<AsId>) -> Vec<(Pfn, AsId)> {
        let mut entries = self.entries.lock();
        entries
            .iter_mut()
            .filter(|e| as_id.is_none_or(|a| a == e.info.as_id))
            .map(|e| {
                e.info.refcount += 1;
                (e.info.pfn, e.info.as_id)
            })
            .collect()
    }

    /// The valid roots of `as_id`, each with a reference taken, as [`RootList::acquire_all`].
    pub(super) fn acquire_valid(&self, as_id: AsId) -> Vec<(Pfn, AsId)> {
        let mut entries = self.entries.lock();
        entries
            .iter_mut()
            .filter(|e| e.info.as_id == as_id && e.info.valid)
            .map(|e| {
                e.info.refcount += 1;
                (e.info.pfn, e.info.as_id)
            })
            .collect()
    }

    /// One invalid root whose list reference is still held, with that reference handed to the caller,
    /// who zaps the tree and then calls [`RootList::release`].
    pub(super) fn take_invalid(&self) -> Option<(Pfn, AsId)> {
        let mut entries = self.entries.lock();
        let e = entries.iter_mut().find(|e| !e.info.valid && e.list_ref)?;
        e.list_ref = false;
        Some((e.info.pfn, e.info.as_id))
    }

    /// Gives back a reference from [`RootList::acquire_all`] or [`RootList::take_invalid`]; returns the
    /// frame when it was the last.
    pub(super) fn release(&self, pfn: Pfn) -> Option<Pfn> {
        self.put_pfn(pfn)
    }

    /// Empties the list at teardown and returns every root frame with its address space.
    pub(super) fn drain(&self) -> Vec<(Pfn, AsId)> {
        self.entries.lock().drain(..).map(|e| (e.info.pfn, e.info.as_id)).collect()
    }
}
