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

mod batch;
mod chunked;
mod dirty_set;
mod external;
mod harvest;
mod pending;
mod radix;
mod stats;
mod types;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Instant;

use tdp_core::addr::{PAGE_SHIFT, RingSlot};

pub use dirty_set::{DirtySets, MAX_SLOT_PAGES, SlotDirty};
pub use stats::{DirtyRate, TrackerStats, VcpuRate, VcpuStats};
pub use types::{SlotSpec, TrackingMode, VcpuHandle, X86_PAGE_SIZE};

pub(crate) use batch::Batch;

use crate::bitmap::DirtyLogBuffer;
use crate::error::{Error, Result};
use crate::ring::DirtyRing;
use crate::vmm_bitmap::VmmBitmap;
use stats::{Counters, VcpuCounters, add, get};

pub(crate) struct SlotState {
    spec: SlotSpec,
    /// The reusable `KVM_GET_DIRTY_LOG` buffer (bitmap modes only).
    buf: Option<Mutex<DirtyLogBuffer>>,
    /// The VMM's own writes into the slot ([`DirtyTracker::attach_vmm_bitmap`]).
    vmm: Option<VmmBitmap>,
}

/// What a collect reuses from one call to the next.
#[derive(Default)]
struct Scratch {
    /// The pages taken from KVM by this collect, before they are published.
    fresh: DirtySets,
    /// Validated ring entries, bucketed by slot, before they enter `fresh`.
    entries: Batch,
    /// Offsets taken from VMM bitmaps, before they enter `fresh`.
    offsets: Vec<u64>,
    /// The vCPUs a collect harvests, copied out of the vCPU list (emptied after each harvest).
    vcpus: Vec<Arc<VcpuState>>,
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
    pending: pending::Pending,
    /// Serialises collects; holds the scratch a collect fills before it publishes.
    collect: Mutex<Scratch>,
    counters: Counters,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker").field("vm", &self.vm).field("mode", &self.mode).finish_non_exhaustive()
    }
}

/// Refuses a slot KVM cannot log for this tracker: an id KVM cannot have (as the get-log and clear-log
/// ioctls would, [`check_slot`](crate::fd::check_slot) with KVM's [`KVM_USER_MEM_SLOTS`]), guest_memfd, or
/// a page size other than the host's logging granule (4 KiB on x86-64).
///
/// [`KVM_USER_MEM_SLOTS`]: tdp_core::memslot::KVM_USER_MEM_SLOTS
fn check_loggable(spec: &SlotSpec) -> Result<()> {
    crate::fd::check_slot(
        "DirtyTracker::register_slot",
        spec.key().raw(),
        tdp_core::memslot::KVM_USER_MEM_SLOTS,
    )?;
    if spec.is_guest_memfd() {
        return Err(Error::GuestMemfdSlot { slot: spec.key() });
    }
    let supported =
        if cfg!(target_arch = "x86_64") { types::X86_PAGE_SIZE } else { crate::sys::page_size() as u64 };
    if spec.page_size != supported {
        return Err(Error::UnsupportedPageSize { slot: spec.key(), page_size: spec.page_size, supported });
    }
    Ok(())
}

pub(crate) fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>> {
    m.lock().map_err(|_| Error::Poisoned { what })
}

fn read<'a, T>(m: &'a RwLock<T>, what: &'static str) -> Result<RwLockReadGuard<'a, T>> {
    m.read().map_err(|_| Error::Poisoned { what })
}

impl DirtyTracker {
    /// A tracker for the VM whose fd is `vm`, with dirty tracking already set up as `mode` says (ring
    /// enabled with [`fd::enable_dirty_ring`](crate::fd::enable_dirty_ring), or manual protection with
    /// [`fd::enable_manual_protect`](crate::fd::enable_manual_protect), by the caller). The tracker keeps
    /// a duplicate of the fd, so it issues VM ioctls from any thread without borrowing the caller's.
    ///
    /// # Errors
    /// [`Error::Os`] if the VM fd cannot be duplicated.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::{DirtyTracker, TrackingMode, fd};
    /// let kvm = match fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
    /// let vm = fd::create_vm(&kvm)?;
    /// let tracker = DirtyTracker::from_fd(&vm, TrackingMode::GetAndClear)?;
    /// assert_eq!(tracker.mode(), TrackingMode::GetAndClear);
    /// # Ok(()) }
    /// ```
    pub fn from_fd(vm: impl AsFd, mode: TrackingMode) -> Result<Self> {
        let vm = vm.as_fd().try_clone_to_owned().map_err(|e| Error::Os {
            op: "fcntl(F_DUPFD_CLOEXEC) of the vm fd",
            errno: crate::Errno(e.raw_os_error().unwrap_or(0)),
        })?;
        Ok(DirtyTracker {
            vm,
            mode,
            slots: RwLock::new(BTreeMap::new()),
            vcpus: RwLock::new(Vec::new()),
            pending: pending::Pending::default(),
            collect: Mutex::new(Scratch::default()),
            counters: Counters::default(),
        })
    }

    /// The tracking mode.
    #[must_use]
    pub const fn mode(&self) -> TrackingMode {
        self.mode
    }

    /// Starts tracking a memslot. The VMM registers it with KVM (with `KVM_MEM_LOG_DIRTY_PAGES`) itself,
    /// after this call or at least before any vCPU runs with logging on: a ring entry for a slot the tracker
    /// does not know is counted as invalid ([`TrackerStats::invalid_slot`]) and dropped.
    ///
    /// # Errors
    /// [`Error::SlotOutOfRange`] for an id at or above KVM's user memslot limit
    /// ([`KVM_USER_MEM_SLOTS`](tdp_core::memslot::KVM_USER_MEM_SLOTS), 32764 on x86) or an address space
    /// KVM does not keep, as [`fd::check_slot`](crate::fd::check_slot) says; [`Error::GuestMemfdSlot`] and
    /// [`Error::UnsupportedPageSize`] for a slot KVM cannot log;
    /// [`Error::BadSlot`] for zero pages, more than KVM's largest memslot ([`MAX_SLOT_PAGES`]), or a range
    /// that overflows; [`Error::SlotConflict`] if the id is
    /// taken or the guest range overlaps a registered slot of the same address space; [`Error::Mmap`] if the
    /// bitmap buffer cannot be allocated. Nothing is registered on error.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// assert!(tracker.register_slot(SlotSpec::new(1, 0x20_0000, 16)).is_err(), "id taken");
    /// assert_eq!(tracker.slots()?.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn register_slot(&self, spec: SlotSpec) -> Result<()> {
        let key = spec.key();
        check_loggable(&spec)?;
        let end = spec.pages.checked_shl(PAGE_SHIFT).and_then(|b| b.checked_add(spec.guest_base.0));
        let Some(end) = end.filter(|_| (1..=MAX_SLOT_PAGES).contains(&spec.pages)) else {
            return Err(Error::BadSlot { slot: key, pages: spec.pages, guest_base: spec.guest_base.0 });
        };
        let buf = match self.mode {
            TrackingMode::Ring(_) => None,
            TrackingMode::GetAndClear
            | TrackingMode::ClearLog
            | TrackingMode::ClearLogChunked
            | TrackingMode::RingWithBitmap(_) => Some(Mutex::new(DirtyLogBuffer::new(spec.pages)?)),
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
        self.pending.lock()?.add_slot(key, spec.guest_base, spec.pages);
        slots.insert(key.raw(), SlotState { spec, buf, vmm: None });
        Ok(())
    }

    /// Stops tracking a memslot and returns its pending pages (harvested at ring-full exits or restored,
    /// not collected yet), so the caller decides what they mean now that the slot is gone.
    ///
    /// # Errors
    /// [`Error::SlotNotRegistered`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// let spec = SlotSpec::new(1, 0x10_0000, 256);
    /// tracker.register_slot(spec)?;
    /// let round = tracker.collect()?;
    /// tracker.restore(&round)?; // 256 pages pending
    /// let pending = tracker.unregister_slot(spec.key())?;
    /// assert_eq!(pending.map(|p| p.count()), Some(256));
    /// assert!(tracker.slots()?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn unregister_slot(&self, slot: RingSlot) -> Result<Option<SlotDirty>> {
        let mut slots = self.slots.write().map_err(|_| Error::Poisoned { what: "slots" })?;
        if slots.remove(&slot.raw()).is_none() {
            return Err(Error::SlotNotRegistered { slot });
        }
        Ok(self.pending.lock()?.remove_slot(slot))
    }

    /// The registered slots, by ascending `as_id << 16 | id`.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// assert_eq!(tracker.slots()?, [SlotSpec::new(1, 0x10_0000, 256)]);
    /// # Ok(()) }
    /// ```
    pub fn slots(&self) -> Result<Vec<SlotSpec>> {
        Ok(read(&self.slots, "slots")?.values().map(|s| s.spec).collect())
    }

    /// Attaches the vCPU whose fd is `vcpu`: maps its ring (ring mode) and gives it per-vCPU
    /// statistics. Call once per vCPU, after creating it and before running it.
    ///
    /// # Errors
    /// [`Error::RingNotMapped`] / [`Error::Mmap`] if the ring cannot be mapped.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::{DirtyTracker, Error, TrackingMode, fd};
    /// let kvm = match fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
    /// let vm = fd::create_vm(&kvm)?;
    /// let cfg = match fd::enable_dirty_ring(&vm, 4096) {
    ///     Ok((_, cfg)) => cfg,
    ///     Err(Error::NoDirtyRing) => { println!("SKIPPED: no ring"); return Ok(()) }
    ///     Err(e) => return Err(e.into()),
    /// };
    /// let tracker = DirtyTracker::from_fd(&vm, TrackingMode::Ring(cfg))?;
    /// let vcpu = fd::create_vcpu(&vm, 0)?;
    /// assert_eq!(tracker.attach_vcpu_fd(&vcpu)?.index(), 0);
    /// assert_eq!(tracker.stats()?.per_vcpu.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn attach_vcpu_fd(&self, vcpu: impl AsFd) -> Result<VcpuHandle> {
        let ring = match self.mode {
            TrackingMode::Ring(cfg) | TrackingMode::RingWithBitmap(cfg) => {
                Some(Mutex::new(DirtyRing::map_fd(vcpu, cfg)?))
            }
            TrackingMode::GetAndClear | TrackingMode::ClearLog | TrackingMode::ClearLogChunked => None,
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
    /// A vCPU running in the guest keeps dirtying pages during and after the collect; those are reported by
    /// the next one. For a final round, stop the vCPUs first (out of `KVM_RUN`): on hosts whose CPUs log
    /// dirty pages in a buffer first (Intel PML), leaving `KVM_RUN` flushes that buffer into the ring.
    ///
    /// # Errors
    /// An ioctl error ([`Error::SlotNotLogged`], [`Error::Ioctl`], ...). Whatever was harvested before the
    /// failure is kept in the pending set for the next collect: nothing is lost.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// let spec = SlotSpec::new(1, 0x10_0000, 256);
    /// tracker.register_slot(spec)?;
    /// // INITIALLY_SET: the first round reports every page; KVM cleared them, so the second reports none.
    /// assert_eq!(tracker.collect()?.get(spec.key()).map(|s| s.count()), Some(256));
    /// assert!(tracker.collect()?.is_empty());
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// let mut out = tdp_kvm::DirtySets::default();
    /// assert_eq!(tracker.collect_into(&mut out)?, 256);
    /// assert_eq!(tracker.collect_into(&mut out)?, 0);
    /// assert_eq!(out.total(), 256, "kept until the caller clears it");
    /// out.clear();
    /// # Ok(()) }
    /// ```
    pub fn collect_into(&self, out: &mut DirtySets) -> Result<u64> {
        // The tracker's locks, the collect's scratch and the counters are one block: ask for all its lines
        // at once, rather than meet them one dependent miss at a time (a collect follows the guest's run,
        // which pushed them out).
        crate::sys::prefetch(std::ptr::from_ref(self).cast(), size_of::<Self>());
        let mut scratch = lock(&self.collect, "collect")?;
        let Scratch { fresh, entries, offsets, vcpus } = &mut *scratch;
        fresh.clear();
        entries.clear();
        if let Err(e) = self.harvest_all(fresh, entries, vcpus, offsets) {
            // Nothing is lost: what was taken from KVM goes to the pending set for the next collect.
            self.pending.add(|pending| pending.merge(fresh))?;
            fresh.clear();
            return Err(e);
        }
        self.pending.take_into(fresh)?;
        let n = fresh.total();
        if out.has_no_slots() {
            // The same result as merging into nothing, without copying every set (`collect`'s case).
            std::mem::swap(out, fresh);
        } else {
            out.merge(fresh);
        }
        add(&self.counters.collects, 1);
        Ok(n)
    }

    /// Gives pages back: they are reported again by the next collect (merged with whatever is pending).
    /// Use it when a round that took them failed before the pages were sent. Pages of slots no longer
    /// registered are skipped; returns how many pages were requeued.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// let round = tracker.collect()?;
    /// // Sending failed: give the pages back, and the next round reports them again.
    /// assert_eq!(tracker.restore(&round)?, 256);
    /// assert_eq!(tracker.collect()?, round);
    /// # Ok(()) }
    /// ```
    pub fn restore(&self, sets: &DirtySets) -> Result<u64> {
        let slots = read(&self.slots, "slots")?;
        self.pending.add(|pending| {
            let mut n = 0;
            for set in sets.iter() {
                if let Some(s) = slots.get(&set.slot().raw()) {
                    let dst = pending.add_slot(set.slot(), s.spec.guest_base, s.spec.pages);
                    dst.merge(set);
                    n += set.offsets().take_while(|&p| p < s.spec.pages).count() as u64;
                }
            }
            n
        })
    }

    /// Pages waiting in the pending set (harvested at ring-full exits or restored, not collected yet).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// assert_eq!(tracker.pending_pages()?, 0);
    /// tracker.restore(&tracker.collect()?)?;
    /// assert_eq!(tracker.pending_pages()?, 256);
    /// # Ok(()) }
    /// ```
    pub fn pending_pages(&self) -> Result<u64> {
        Ok(self.pending.lock()?.total())
    }

    /// A snapshot of the counters; two snapshots give a [`DirtyRate`] ([`TrackerStats::rate_since`]).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// let before = tracker.stats()?;
    /// tracker.collect()?;
    /// let rate = tracker.stats()?.rate_since(&before);
    /// assert_eq!(rate.pages, 256);
    /// assert!(rate.per_vcpu.is_none(), "bitmap: VM-wide figures only");
    /// assert!(tracker.stats()?.reset_time.is_zero(), "no ring to reset");
    /// # Ok(()) }
    /// ```
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
            reset_time: std::time::Duration::from_nanos(get(&self.counters.reset_nanos)),
            full_rings: get(&self.counters.full_rings),
        })
    }
}
