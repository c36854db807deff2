//! One dirty tracker over KVM's three ways of reporting dirty pages, usable from several threads.
//!
//! - [`TrackingMode::GetAndClear`]: classic `KVM_GET_DIRTY_LOG`, which copies and clears each slot's log
//!   and re-protects its pages in one ioctl.
//! - [`TrackingMode::ClearLog`]: manual protection; `KVM_GET_DIRTY_LOG` only copies, then
//!   `KVM_CLEAR_DIRTY_LOG` clears and re-protects exactly the pages that were reported.
//! - [`TrackingMode::Ring`]: per-vCPU dirty rings; a collect harvests every ring, then issues
//!   `KVM_RESET_DIRTY_RINGS`, so the pages are re-protected before the caller reads their contents.
//!
//! # Threads
//! A migration thread calls [`DirtyTracker::collect`] while vCPU threads run their vCPUs through
//! [`VcpuRunner`](crate::VcpuRunner), which harvests a vCPU's own ring at a `KVM_EXIT_DIRTY_RING_FULL`
//! exit. Each ring has its own lock, held across harvest, reset and publishing the entries into the
//! tracker's *pending* set, which the next collect returns. So a collect that locks a ring either sees the
//! entries a ring-full exit took (already reset and pending) or takes them itself; the pending set is
//! taken last. Lock order: ring, then slots (read), then pending; a collect also holds its own lock
//! first, so collects run one at a time.
//!
//! Keeps: I4 (every harvested entry ends in a collect's result, in the pending set, or, after an error,
//! back in the pending set: nothing is dropped; [`DirtyTracker::restore`] gives a failed round's pages
//! back) and I5 (ring entries naming an unknown slot or an offset beyond their slot are counted in
//! [`TrackerStats`] and skipped; nothing is indexed with them).

mod dirty_set;
mod stats;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Instant;

use kvm_ioctls::{VcpuFd, VmFd};
use tdp_core::addr::{AsId, Gpa, PAGE_SHIFT, RingSlot, SlotId};
use tdp_core::dirty_ring::{DirtyEntry, RingConfig};

pub use dirty_set::{DirtySets, SlotDirty};
pub use stats::{DirtyRate, TrackerStats, VcpuRate, VcpuStats};

use crate::bitmap::{DirtyLogBuffer, clear_whole_slot, get_dirty_log_fd};
use crate::error::{Error, Result};
use crate::ring::{DirtyRing, reset_fd};
use crate::sys;
use stats::{Counters, VcpuCounters, add, get};

/// How the tracker learns which pages were dirtied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackingMode {
    /// `KVM_GET_DIRTY_LOG` without manual protection: get-and-clear per slot.
    GetAndClear,
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled.
    ClearLog,
    /// Per-vCPU dirty rings of this geometry, enabled before any vCPU was created.
    Ring(RingConfig),
}

/// A memslot the VMM registered with `KVM_MEM_LOG_DIRTY_PAGES` and wants tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

impl SlotSpec {
    /// A slot of address space 0.
    #[must_use]
    pub const fn new(id: u16, guest_base: u64, pages: u64) -> Self {
        SlotSpec { id: SlotId(id), as_id: AsId(0), guest_base: Gpa(guest_base), pages }
    }

    /// The slot as KVM's `kvm_userspace_memory_region` names it: `slot = as_id << 16 | id`,
    /// `guest_phys_addr`, `memory_size` (bytes).
    #[must_use]
    pub const fn from_region(slot: u32, guest_phys_addr: u64, memory_size: u64) -> Self {
        let key = RingSlot::from_raw(slot);
        SlotSpec {
            id: key.id(),
            as_id: key.as_id(),
            guest_base: Gpa(guest_phys_addr),
            pages: memory_size >> PAGE_SHIFT,
        }
    }

    /// The `as_id << 16 | id` name KVM uses for the slot.
    #[must_use]
    pub const fn key(&self) -> RingSlot {
        RingSlot::new(self.as_id, self.id)
    }
}

/// An attached vCPU's index in the tracker, for [`VcpuRunner`](crate::VcpuRunner) and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuHandle(pub(crate) usize);

impl VcpuHandle {
    /// The index (attach order, from 0).
    #[must_use]
    pub const fn index(self) -> usize {
        self.0
    }
}

struct SlotState {
    spec: SlotSpec,
    /// The reusable `KVM_GET_DIRTY_LOG` buffer (bitmap modes only).
    buf: Option<Mutex<DirtyLogBuffer>>,
}

pub(crate) struct VcpuState {
    pub(crate) ring: Option<Mutex<DirtyRing>>,
    pub(crate) counters: VcpuCounters,
}

/// Dirty-page tracking for one VM, shared by its vCPU threads and a migration thread (`Send + Sync`; wrap
/// it in an `Arc` or use scoped threads).
///
/// See the [crate documentation](crate) for a complete VMM wiring.
pub struct DirtyTracker {
    /// A private duplicate of the VM fd: the tracker issues VM ioctls from any thread without borrowing the
    /// caller's `VmFd`.
    vm: OwnedFd,
    mode: TrackingMode,
    slots: RwLock<BTreeMap<u32, SlotState>>,
    vcpus: RwLock<Vec<Arc<VcpuState>>>,
    pending: Mutex<DirtySets>,
    /// Serialises collects; holds the scratch set a collect fills before it publishes.
    collect: Mutex<DirtySets>,
    counters: Counters,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker").field("vm", &self.vm).field("mode", &self.mode).finish_non_exhaustive()
    }
}

pub(crate) fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>> {
    m.lock().map_err(|_| Error::Poisoned { what })
}

fn read<'a, T>(m: &'a RwLock<T>, what: &'static str) -> Result<RwLockReadGuard<'a, T>> {
    m.read().map_err(|_| Error::Poisoned { what })
}

impl DirtyTracker {
    /// A tracker for a VM whose dirty tracking is already set up as `mode` says (ring enabled, or manual
    /// protection enabled, by the caller).
    ///
    /// # Errors
    /// [`Error::Os`] if the VM fd cannot be duplicated.
    pub fn new(vm: &VmFd, mode: TrackingMode) -> Result<Self> {
        Ok(DirtyTracker {
            vm: sys::dup_fd(vm.as_raw_fd())?,
            mode,
            slots: RwLock::new(BTreeMap::new()),
            vcpus: RwLock::new(Vec::new()),
            pending: Mutex::new(DirtySets::default()),
            collect: Mutex::new(DirtySets::default()),
            counters: Counters::default(),
        })
    }

    /// Enables a dirty ring of `entries` entries per vCPU (before any vCPU exists) and returns a ring tracker.
    ///
    /// # Errors
    /// As [`enable_dirty_ring`](crate::enable_dirty_ring).
    pub fn with_ring(vm: &VmFd, entries: u32) -> Result<Self> {
        let (_, cfg) = crate::enable_dirty_ring(vm, entries)?;
        DirtyTracker::new(vm, TrackingMode::Ring(cfg))
    }

    /// A get-and-clear bitmap tracker (nothing to enable).
    ///
    /// # Errors
    /// [`Error::Os`] if the VM fd cannot be duplicated.
    pub fn with_bitmap(vm: &VmFd) -> Result<Self> {
        DirtyTracker::new(vm, TrackingMode::GetAndClear)
    }

    /// Enables manual dirty-log protection (optionally `INITIALLY_SET`) and returns a clear-log tracker.
    /// Enable it before slots get `KVM_MEM_LOG_DIRTY_PAGES`.
    ///
    /// # Errors
    /// As [`enable_manual_protect`](crate::enable_manual_protect).
    pub fn with_clear_log(vm: &VmFd, initially_set: bool) -> Result<Self> {
        crate::enable_manual_protect(vm, initially_set)?;
        DirtyTracker::new(vm, TrackingMode::ClearLog)
    }

    /// The tracking mode.
    #[must_use]
    pub const fn mode(&self) -> TrackingMode {
        self.mode
    }

    /// Starts tracking a memslot. The VMM registers it with KVM (with `KVM_MEM_LOG_DIRTY_PAGES`) itself.
    ///
    /// # Errors
    /// [`Error::BadSlot`] for zero pages or a range that overflows; [`Error::SlotConflict`] if the id is
    /// taken or the guest range overlaps a registered slot of the same address space; [`Error::Mmap`] if the
    /// bitmap buffer cannot be allocated. Nothing is registered on error.
    pub fn register_slot(&self, spec: SlotSpec) -> Result<()> {
        let key = spec.key();
        let end = spec.pages.checked_shl(PAGE_SHIFT).and_then(|b| b.checked_add(spec.guest_base.0));
        let Some(end) = end.filter(|_| spec.pages > 0 && spec.pages >> (64 - PAGE_SHIFT) == 0) else {
            return Err(Error::BadSlot { slot: key, pages: spec.pages, guest_base: spec.guest_base.0 });
        };
        let buf = match self.mode {
            TrackingMode::Ring(_) => None,
            TrackingMode::GetAndClear | TrackingMode::ClearLog => {
                Some(Mutex::new(DirtyLogBuffer::new(spec.pages)?))
            }
        };
        let mut slots = self.slots.write().map_err(|_| Error::Poisoned { what: "slots" })?;
        for s in slots.values() {
            let other = s.spec;
            let conflict = if other.key() == key {
                Some("the same slot id")
            } else if other.as_id == spec.as_id
                && spec.guest_base.0 < other.guest_base.0 + (other.pages << PAGE_SHIFT)
                && other.guest_base.0 < end
            {
                Some("overlapping guest-physical ranges")
            } else {
                None
            };
            if let Some(why) = conflict {
                return Err(Error::SlotConflict { slot: key, existing: other.key(), why });
            }
        }
        lock(&self.pending, "pending")?.add_slot(key, spec.guest_base, spec.pages);
        slots.insert(key.raw(), SlotState { spec, buf });
        Ok(())
    }

    /// Stops tracking a memslot and returns its pending pages (harvested at ring-full exits or restored,
    /// not collected yet), so the caller decides what they mean now that the slot is gone.
    ///
    /// # Errors
    /// [`Error::SlotNotRegistered`].
    pub fn unregister_slot(&self, slot: RingSlot) -> Result<Option<SlotDirty>> {
        let mut slots = self.slots.write().map_err(|_| Error::Poisoned { what: "slots" })?;
        if slots.remove(&slot.raw()).is_none() {
            return Err(Error::SlotNotRegistered { slot });
        }
        Ok(lock(&self.pending, "pending")?.remove_slot(slot))
    }

    /// The registered slots, by ascending `as_id << 16 | id`.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn slots(&self) -> Result<Vec<SlotSpec>> {
        Ok(read(&self.slots, "slots")?.values().map(|s| s.spec).collect())
    }

    /// Attaches a vCPU: maps its ring (ring mode) and gives it per-vCPU statistics. Call once per vCPU,
    /// after creating it and before running it.
    ///
    /// # Errors
    /// [`Error::Mmap`] if the ring cannot be mapped.
    pub fn attach_vcpu(&self, vcpu: &VcpuFd) -> Result<VcpuHandle> {
        let ring = match self.mode {
            TrackingMode::Ring(cfg) => Some(Mutex::new(DirtyRing::map(vcpu, cfg)?)),
            TrackingMode::GetAndClear | TrackingMode::ClearLog => None,
        };
        let mut vcpus = self.vcpus.write().map_err(|_| Error::Poisoned { what: "vcpus" })?;
        vcpus.push(Arc::new(VcpuState { ring, counters: VcpuCounters::default() }));
        Ok(VcpuHandle(vcpus.len() - 1))
    }

    pub(crate) fn vcpu(&self, handle: VcpuHandle) -> Result<Arc<VcpuState>> {
        read(&self.vcpus, "vcpus")?.get(handle.0).cloned().ok_or(Error::VcpuNotAttached { index: handle.0 })
    }

    /// Collects the pages dirtied since the last collect, one set per registered slot, including the pages
    /// harvested at ring-full exits since then. When it returns, KVM has re-protected every page in the
    /// result (ring: reset done; clear-log: cleared; get-and-clear: done by the get), so the caller may
    /// read their contents: a later write is reported again.
    ///
    /// # Errors
    /// An ioctl error ([`Error::SlotNotLogged`], [`Error::Ioctl`], ...). Whatever was harvested before the
    /// failure is kept in the pending set for the next collect: nothing is lost.
    pub fn collect(&self) -> Result<DirtySets> {
        let mut out = DirtySets::default();
        self.collect_into(&mut out)?;
        Ok(out)
    }

    /// As [`collect`](DirtyTracker::collect), but ORs the result into `out` (reusing its memory; pages
    /// already in `out` stay). Call `out.clear()` once the pages are handled. Returns how many pages were
    /// added to `out` by this call (counting pages already there again if reported again).
    ///
    /// # Errors
    /// As [`collect`](DirtyTracker::collect); `out` is unchanged on error.
    pub fn collect_into(&self, out: &mut DirtySets) -> Result<u64> {
        let mut fresh = lock(&self.collect, "collect")?;
        fresh.clear();
        let result = self.harvest_all(&mut fresh);
        if let Err(e) = result {
            // Nothing is lost: what was taken from KVM goes to the pending set for the next collect.
            lock(&self.pending, "pending")?.merge(&fresh);
            fresh.clear();
            return Err(e);
        }
        {
            let mut pending = lock(&self.pending, "pending")?;
            fresh.merge(&pending);
            pending.clear();
        }
        let n = fresh.total();
        out.merge(&fresh);
        add(&self.counters.collects, 1);
        Ok(n)
    }

    /// Harvests every source into `fresh` (slots added first) and re-protects.
    fn harvest_all(&self, fresh: &mut DirtySets) -> Result<()> {
        let slots = read(&self.slots, "slots")?;
        for s in slots.values() {
            fresh.add_slot(s.spec.key(), s.spec.guest_base, s.spec.pages);
        }
        match self.mode {
            TrackingMode::Ring(_) => {
                let vcpus: Vec<Arc<VcpuState>> = read(&self.vcpus, "vcpus")?.clone();
                drop(slots);
                for v in &vcpus {
                    let Some(ring) = &v.ring else { continue };
                    let mut ring = lock(ring, "ring")?;
                    let slots = read(&self.slots, "slots")?;
                    let n = ring.harvest(usize::MAX, |e| self.record(&slots, fresh, e));
                    add(&v.counters.harvested, n as u64);
                    add(&self.counters.harvested, n as u64);
                }
                let reset = reset_fd(self.vm.as_fd())?;
                add(&self.counters.reset_entries, u64::from(reset));
            }
            TrackingMode::GetAndClear | TrackingMode::ClearLog => {
                let clear = self.mode == TrackingMode::ClearLog;
                for s in slots.values() {
                    let Some(buf) = &s.buf else { continue };
                    let mut buf = lock(buf, "bitmap buffer")?;
                    let key = s.spec.key().raw();
                    get_dirty_log_fd(self.vm.as_fd(), key, &mut buf)?;
                    if let Some(set) = fresh.get_mut(s.spec.key()) {
                        set.merge_words(buf.words());
                    }
                    add(&self.counters.harvested, buf.count());
                    if clear {
                        clear_whole_slot(self.vm.as_fd(), key, s.spec.pages, buf.words())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records one ring entry into `set` after checking it against the slots (I5).
    fn record(&self, slots: &BTreeMap<u32, SlotState>, set: &mut DirtySets, e: DirtyEntry) {
        match slots.get(&e.slot.raw()) {
            None => add(&self.counters.invalid_slot, 1),
            Some(s) if e.offset >= s.spec.pages => add(&self.counters.invalid_offset, 1),
            Some(s) => {
                if !set.insert(e.slot, e.offset) {
                    set.add_slot(e.slot, s.spec.guest_base, s.spec.pages).insert(e.offset);
                }
            }
        }
    }

    /// Harvests one vCPU's ring at its ring-full exit: harvest, reset, then publish into the pending set,
    /// all under the ring's lock. Returns (entries harvested, entries KVM reset, entries harvested from this
    /// ring by anyone before this call).
    pub(crate) fn harvest_ring_full(
        &self,
        v: &VcpuState,
        scratch: &mut Vec<DirtyEntry>,
    ) -> Result<(usize, u32, u64)> {
        let Some(ring) = &v.ring else { return Err(Error::RingNotEnabled { op: "ring-full harvest" }) };
        let mut ring = lock(ring, "ring")?;
        let before = get(&v.counters.harvested);
        scratch.clear();
        let n = ring.harvest(usize::MAX, |e| scratch.push(e));
        add(&v.counters.harvested, n as u64);
        add(&self.counters.harvested, n as u64);
        add(&v.counters.ring_full_exits, 1);
        // Reset before publishing: a collect that takes these pages from the pending set must find them
        // re-protected. If the reset fails, publish anyway (they were harvested) and report the error.
        let reset = reset_fd(self.vm.as_fd());
        {
            let slots = read(&self.slots, "slots")?;
            let mut pending = lock(&self.pending, "pending")?;
            for e in scratch.drain(..) {
                self.record(&slots, &mut pending, e);
            }
        }
        let reset = reset?;
        add(&self.counters.reset_entries, u64::from(reset));
        Ok((n, reset, before))
    }

    /// Gives pages back: they are reported again by the next collect (merged with whatever is pending).
    /// Use it when a round that took them failed before the pages were sent. Pages of slots no longer
    /// registered are skipped; returns how many pages were requeued.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn restore(&self, sets: &DirtySets) -> Result<u64> {
        let slots = read(&self.slots, "slots")?;
        let mut pending = lock(&self.pending, "pending")?;
        let mut n = 0;
        for set in sets.iter() {
            if let Some(s) = slots.get(&set.slot().raw()) {
                let dst = pending.add_slot(set.slot(), s.spec.guest_base, s.spec.pages);
                dst.merge_words(set.words());
                n += set.count();
            }
        }
        Ok(n)
    }

    /// Pages waiting in the pending set (harvested at ring-full exits or restored, not collected yet).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn pending_pages(&self) -> Result<u64> {
        Ok(lock(&self.pending, "pending")?.total())
    }

    /// A snapshot of the counters; two snapshots give a [`DirtyRate`] ([`TrackerStats::rate_since`]).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn stats(&self) -> Result<TrackerStats> {
        let per_vcpu = read(&self.vcpus, "vcpus")?
            .iter()
            .map(|v| VcpuStats {
                harvested: get(&v.counters.harvested),
                ring_full_exits: get(&v.counters.ring_full_exits),
            })
            .collect();
        Ok(TrackerStats {
            at: Instant::now(),
            per_vcpu_exact: matches!(self.mode, TrackingMode::Ring(_)),
            per_vcpu,
            harvested: get(&self.counters.harvested),
            collects: get(&self.counters.collects),
            invalid_slot: get(&self.counters.invalid_slot),
            invalid_offset: get(&self.counters.invalid_offset),
            reset_entries: get(&self.counters.reset_entries),
        })
    }
}
