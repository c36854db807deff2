//! The traits the core needs from its environment, and nothing about who provides them.
//!
//! A backend implements [`TableMemory`], [`HostTranslate`], [`TlbFlush`], [`MmuYield`] and
//! [`MmuEvents`]; [`Host`] is their sum, implemented automatically. `tdp-mock` implements them in
//! software, a bare-metal hypervisor over its frame allocator and INVEPT, like `x86_64`'s `Mapper`
//! implemented by `OffsetPageTable`.
//!
//! Keeps (with the backend's help): I2, no table page read after it is freed: pages removed from a live
//! tree go to [`TableMemory::free_table_deferred`], and are reused only after every [`TableMemory::WalkGuard`]
//! that existed at that call has been dropped.

use crate::addr::{AsId, Gfn, Level, Pfn};
use crate::memslot::Memslot;
use crate::spte::Spte;
use crate::sync::AtomicU64;

/// One 4 KiB paging-structure page: 512 entries that hardware and lockless walkers read concurrently.
pub type Table = [AtomicU64; 512];

/// The backend could not provide a table page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no table page could be allocated")]
pub struct AllocError;

/// Memory for paging-structure pages.
pub trait TableMemory {
    /// Held by every walker of the tables for the duration of a walk (KVM's `rcu_read_lock`). Pages
    /// freed with [`TableMemory::free_table_deferred`] are not reused while a guard that existed at the
    /// time of the free is alive.
    type WalkGuard<'a>
    where
        Self: 'a;

    /// Allocates a table page with every entry set to `fill` (the format's non-present value).
    ///
    /// # Errors
    /// [`AllocError`] when no page is available; nothing was allocated.
    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError>;

    /// The entries of the table page in frame `pfn`. The core only passes frames it got from
    /// [`TableMemory::alloc_table`] and has not yet freed, or read from an SPTE under a walk guard, or
    /// kept from an earlier walk (a vCPU's walk hint) and checked under the current guard not to have
    /// been freed since.
    fn table(&self, pfn: Pfn) -> &Table;

    /// Frees a page that was reachable from a live tree: it must stay readable (its contents are
    /// frozen SPTEs) until every walk guard alive now has been dropped.
    fn free_table_deferred(&self, pfn: Pfn);

    /// Frees a page no walker has ever seen (an unused cache page). May be reused at once.
    fn free_table_now(&self, pfn: Pfn);

    /// Enters a walk: tables seen through this guard stay allocated until it drops.
    ///
    /// The guard's start must be ordered before the loads the walker makes under it, as a lock, a
    /// read-modify-write or a `SeqCst` fence orders it (RCU's `rcu_read_lock` with the grace period's
    /// barriers does): a [`TableMemory::free_table_deferred`] whose page the walker may still reach waits
    /// for the guard unless the guard's start is ordered after the free. Lockless walkers and the fault's
    /// walk hint both rely on this.
    fn begin_walk(&self) -> Self::WalkGuard<'_>;
}

/// What kind of memory backs a host frame: it decides the memory type of the leaf that maps it (KVM's
/// `kvm_is_mmio_pfn` and `vmx_get_mt_mask`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HostMemory {
    /// Ordinary, cache-coherent RAM: write-back (with EPT's IPAT set unless the VM has non-coherent
    /// DMA, see [`crate::mmu::ExclusiveMmu::set_noncoherent_dma`]).
    #[default]
    Ram,
    /// Device memory or other frames that are not RAM (a passed-through BAR): uncacheable.
    Device,
}

/// What the host knows about the page backing one guest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPage {
    /// The host frame backing the gfn asked about (not rounded to `level`).
    pub pfn: Pfn,
    /// The host maps it writable.
    pub writable: bool,
    /// The level at which the host itself maps it (L2 for a transparent huge page, ...). The core only
    /// maps a gfn huge when the host does.
    pub level: Level,
    /// RAM or device memory, for the leaf's memory type.
    pub memory: HostMemory,
}

/// Why the host could not translate a gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostFaultError {
    /// The host has no page behind this gfn of the memslot (KVM's `KVM_PFN_ERR_FAULT`).
    #[error("the host has no page behind {gfn:?}")]
    NoPage {
        /// The gfn asked about.
        gfn: Gfn,
    },
    /// A write was asked for and the host page cannot be made writable.
    #[error("the host page behind {gfn:?} cannot be written")]
    ReadOnly {
        /// The gfn asked about.
        gfn: Gfn,
    },
}

/// Translation from guest frames to host frames (KVM's `__kvm_faultin_pfn` and host mapping level).
///
/// **Contract.** [`HostTranslate::translate`] is called *without* the MMU lock, so it may block: swap a
/// page in, break copy-on-write, wait for a migration. In exchange, a host that changes its mapping of
/// guest memory must bracket the change with [`crate::mmu::ExclusiveMmu::invalidate_range_start`] and
/// [`crate::mmu::ExclusiveMmu::invalidate_range_end`] (KVM's MMU notifiers); it may call them from inside
/// `translate` (a copy-on-write break does), since no MMU lock is held there. A fault reads the
/// invalidation sequence count before calling `translate` and retries if an invalidation covering its
/// gfn ran or is running by the time it holds the lock, so what `translate` returned before or during a
/// change is never installed.
pub trait HostTranslate {
    /// The host page behind `gfn`, which lies in `slot` (a copy, current when the fault read the
    /// sequence count). `write` says the guest access is a write, so the host should make the page
    /// writable if it can (break copy-on-write).
    ///
    /// # Errors
    /// [`HostFaultError`] when there is no page, or no writable page for a write.
    fn translate(&self, slot: &Memslot, gfn: Gfn, write: bool) -> Result<HostPage, HostFaultError>;

    /// The level at which the host maps `gfn` of `slot` now, without faulting anything in and without
    /// blocking (KVM's `host_pfn_mapping_level`); `None` when it is not mapped. The MMU asks it under its
    /// lock (the read side, concurrently with faults) when it decides whether a huge leaf could replace a
    /// table (stopping dirty logging: `SharedMmu::recover_huge_pages`).
    /// The default asks [`HostTranslate::translate`] for a read, which is right for a host whose
    /// translation never blocks; a host whose translation may block must override it.
    fn mapping_level(&self, slot: &Memslot, gfn: Gfn) -> Option<Level> {
        self.translate(slot, gfn, false).ok().map(|page| page.level)
    }
}

/// TLB invalidation on every vCPU of the VM (KVM's `kvm_flush_remote_tlbs*`). A flush must be complete
/// when the call returns: no vCPU uses a translation cached before it.
pub trait TlbFlush {
    /// Flushes every cached translation.
    fn flush_all(&self);
    /// Flushes translations of `pages` frames from `start` in `as_id`. The default flushes everything.
    fn flush_range(&self, as_id: AsId, start: Gfn, pages: u64) {
        let _ = (as_id, start, pages);
        self.flush_all();
    }
}

/// The "should I yield now?" hint for long walks. Yielding follows KVM's forward-progress rule: a walk
/// never yields twice at the same gfn.
pub trait MmuYield {
    /// Whether a long walk should drop the lock now. The default never yields.
    fn should_yield(&self) -> bool {
        false
    }
    /// Called with the MMU lock and the walk guard dropped, when a walk yields.
    fn yield_now(&self) {}
}

/// Trace events (KVM's `kvm_tdp_mmu_spte_changed` and friends). Every method defaults to nothing, so a
/// backend that does not trace pays nothing.
pub trait MmuEvents {
    /// An SPTE changed from `old` to `new`.
    fn spte_changed(&self, as_id: AsId, gfn: Gfn, level: Level, old: Spte, new: Spte) {
        let _ = (as_id, gfn, level, old, new);
    }
    /// A table page was linked into a tree or removed from it.
    fn table_linked(&self, pfn: Pfn, level: Level, linked: bool) {
        let _ = (pfn, level, linked);
    }
    /// A fault on `gfn` was handled with `outcome` (KVM's `kvm_mmu_page_fault` trace points; the
    /// vCPU's own counts are in `VcpuMmu::counters`).
    fn fault_handled(&self, fault: &crate::fault::Fault, outcome: crate::mmu::FaultOutcome) {
        let _ = (fault, outcome);
    }
    /// An MMIO SPTE was installed for `gfn` (KVM's `mark_mmio_spte`).
    fn mmio_spte_installed(&self, as_id: AsId, gfn: Gfn) {
        let _ = (as_id, gfn);
    }
    /// A huge leaf at `level` mapping from `gfn` was split into a table (KVM's
    /// `kvm_mmu_split_huge_page`).
    fn huge_split(&self, as_id: AsId, gfn: Gfn, level: Level) {
        let _ = (as_id, gfn, level);
    }
    /// NX huge-page recovery unlinked the table linked at `level` for the range from `gfn`.
    fn nx_recovered(&self, as_id: AsId, gfn: Gfn, level: Level) {
        let _ = (as_id, gfn, level);
    }
}

/// Where `mark_page_dirty` goes (KVM's `mark_page_dirty_in_slot`): the faulting vCPU's dirty ring, or
/// the memslot's dirty bitmap. It is passed to each fault, because a ring belongs to one vCPU.
///
/// The MMU calls it only for dirty-logged slots: when a fault installs a writable SPTE, and when the
/// fast path makes a write-protected one writable again. A VM that never logs passes `&mut ()`.
///
/// With PML ([`crate::mmu::MmuConfig::pml`]) hardware records the other writes; the backend drains each
/// vCPU's log into the same sink, keeping only gfns of slots that are logged now, on every exit and
/// before every harvest (KVM's `kvm_flush_pml_buffers`). A sink backed by a dirty ring records a
/// soft-full push itself and makes the vCPU exit before it next enters the guest (KVM's
/// `KVM_REQ_DIRTY_RING_SOFT_FULL`); the ring's reserve covers the marks one exit can produce.
pub trait DirtySink {
    /// `gfn` of `slot` is being written; `source` says which path saw it.
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, source: DirtySource);
}

/// No dirty logging: marks go nowhere.
impl DirtySink for () {
    fn mark_dirty(&mut self, _slot: &Memslot, _gfn: Gfn, _source: DirtySource) {}
}

/// Which path produced a dirty mark. Every write in a logged slot reaches the sink through exactly one
/// of them; the sink may count them (per-path dirty rates) but must record all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DirtySource {
    /// A fault installed a writable 4 KiB leaf.
    Fault,
    /// The fast path made a write-protected leaf writable again.
    FastPath,
    /// The backend drained a hardware log (Intel PML) of writes that set D bits.
    HardwareLog,
}

/// The external page tables that mirror roots are copied into (KVM's TDX hooks `link_external_spt`,
/// `set_external_spte`, `remove_external_spte` and `free_external_spt`): a confidential-VM host whose
/// real tables belong to someone else (the TDX module's Secure EPT) keeps the MMU's mirror of them and
/// is told every change, in order, while the mirror's entry is frozen, so no other change of that entry
/// can overtake it.
///
/// Memslots with [`crate::memslot::SlotFlags::PRIVATE`] are mapped through a vCPU's mirror root
/// ([`crate::mmu::VcpuMmu::mirror_root`]); a host without external tables keeps the defaults, and the
/// MMU refuses private memslots on it. The calls come in the order a tree is built and torn down: a
/// table is linked before anything below it is set, and everything below a table is removed before
/// the table is freed.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
/// use tdp_core::fault::{AccessKind, Fault, FaultKind};
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, VcpuMmu};
/// use tdp_mock::{ExternalEntry, HostConfig, MockHost};
///
/// // The mock keeps its external tables as a map (a TDX host would call the TDX module).
/// let host = MockHost::new(HostConfig::default());
/// host.enable_external_tables(Level::L4);
/// let ram = host.guest_ram_base();
/// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
/// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, ram, SlotFlags::PRIVATE))?;
/// let mut vcpu = VcpuMmu::new();
/// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
/// let fault = Fault { as_id: AsId(0), gpa: Gpa(0x5000), access: AccessKind::Write,
///                     kind: FaultKind::Violation { present: false } };
/// assert_eq!(mmu.handle_fault(&mut vcpu, fault, &mut ()), Ok(FaultOutcome::Fixed));
/// // The leaf is in the mirror root, not the direct one, and the host was told of it.
/// let mirror = vcpu.mirror_root().unwrap();
/// let (leaf, level) = mmu.lookup(mirror, Gfn(5)).unwrap();
/// assert_eq!(level, Level::L1);
/// assert!(mmu.lookup(vcpu.root().unwrap(), Gfn(5)).is_none());
/// let external = mmu.host().external_entries();
/// assert_eq!(external.last(), Some(&(AsId(0), Gfn(5), Level::L1, ExternalEntry::Leaf(leaf.pfn()))));
/// mmu.release_vcpu(&mut vcpu);
/// # Ok::<(), tdp_core::memslot::SlotError>(())
/// ```
pub trait ExternalTables {
    /// Whether the host has external tables; mirror roots and private memslots need them.
    fn has_external_tables(&self) -> bool {
        false
    }
    /// Links the table page `table` (the mirror's, which the host may use to find its own) below the
    /// entry at `level` that maps from `gfn`. On an error the mirror's entry goes back to what it was.
    ///
    /// # Errors
    /// [`ExternalError::Busy`] makes the fault retry; any other error fails the fault.
    fn link_external_table(
        &self,
        as_id: AsId,
        gfn: Gfn,
        level: Level,
        table: Pfn,
    ) -> Result<(), ExternalError> {
        let _ = (as_id, gfn, level, table);
        Err(ExternalError::Unsupported)
    }
    /// Maps `gfn` (aligned to `level`) to frame `pfn` in the external tables.
    ///
    /// # Errors
    /// As [`ExternalTables::link_external_table`].
    fn set_external_leaf(&self, as_id: AsId, gfn: Gfn, level: Level, pfn: Pfn) -> Result<(), ExternalError> {
        let _ = (as_id, gfn, level, pfn);
        Err(ExternalError::Unsupported)
    }
    /// Unmaps `gfn` (mapped at `level` to `pfn`), including from every TLB that may cache it (the TDX
    /// module's block, track and remove). It cannot fail: the mirror's leaf is already gone.
    fn remove_external_leaf(&self, as_id: AsId, gfn: Gfn, level: Level, pfn: Pfn) {
        let _ = (as_id, gfn, level, pfn);
    }
    /// Frees the external table linked below the entry at `level` mapping from `gfn`, once everything
    /// below it has been removed.
    fn free_external_table(&self, as_id: AsId, gfn: Gfn, level: Level, table: Pfn) {
        let _ = (as_id, gfn, level, table);
    }
}

/// Why the external tables refused a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExternalError {
    /// The external tables are busy (a TDX module call returned `TDX_OPERAND_BUSY`): retry the fault.
    #[error("the external page tables are busy")]
    Busy,
    /// The host has no external tables.
    #[error("the host has no external page tables")]
    Unsupported,
    /// The external tables refused the change for good.
    #[error("the external page tables refused the change")]
    Refused,
}

/// Everything the MMU needs from its environment.
pub trait Host: TableMemory + HostTranslate + TlbFlush + MmuYield + MmuEvents + ExternalTables {}

impl<T: TableMemory + HostTranslate + TlbFlush + MmuYield + MmuEvents + ExternalTables> Host for T {}
