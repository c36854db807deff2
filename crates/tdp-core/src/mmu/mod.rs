//! The TDP MMU: roots, the page-fault handler, zapping, and the bookkeeping behind every SPTE change.
//!
//! [`Mmu`] owns the host backend, the memslots and the root list. Its reader/writer lock is a
//! `lock_api` lock the host chooses (`spin` by default, so it works in `no_std`). The lock mode is in the
//! types: [`Mmu::read`] gives a [`SharedMmu`] whose operations (faults, zapping invalid roots) change SPTEs
//! only with compare-exchange and retry, [`Mmu::write`] an [`ExclusiveMmu`] for memslot changes, zaps
//! and teardown.
//!
//! Keeps: I1 (a leaf never allows more than its memslot: [`Mmu::handle_fault`]), I2 (tables removed
//! from a tree are frozen entry by entry and freed deferred: `spte_ops`), I3 (every operation that can
//! leave a stale translation flushes or returns a [`Flush`]).

mod age;
mod cache;
mod dirty_log;
mod fast_path;
mod fault;
mod invalidate;
mod memtype;
mod mirror;
mod nx;
mod prefault;
// The one `unsafe` of the core: a fault's shared view of the memslots through its vCPU group.
#[allow(unsafe_code)]
mod groups;
mod root;
mod spte_ops;
mod stats;
mod track;
mod vcpu;
mod walk;
mod zap;

pub use cache::{FaultCounters, PAGE_CACHE_CAPACITY, PageCache};
pub use fault::{EmulateReason, FaultError, FaultOutcome};
pub use invalidate::{InvalidateError, Invalidation};
pub use nx::NxRecovery;
pub use prefault::PreFaultError;
pub use root::{RootInfo, RootRef};
pub use stats::MmuStats;
pub use vcpu::VcpuMmu;

use alloc::vec::Vec;
use core::num::NonZeroU16;

use lock_api::{RawRwLock, RwLock, RwLockWriteGuard};

use crate::addr::SlotId;
use crate::addr::{AsId, Gfn, Level, PAGE_SHIFT};
use crate::flush::Flush;
use crate::host::{AllocError, Host};
use crate::memslot::{Memslot, MemslotSet, SlotError, SlotFlags};
use crate::spte::SpteFormat;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

use groups::SlotsRead;
use root::RootList;
use stats::Stats;

/// How the MMU builds its tables.
///
/// Start from one of the constants and change what differs, with the `with_*` builders or struct update
/// syntax (`MmuConfig { pml: true, ..MmuConfig::EPT }`), so that a field added later keeps its default:
///
/// ```
/// use core::num::NonZeroU16;
/// use tdp_core::addr::{AsId, Gfn, SlotId};
/// use tdp_core::memslot::{KVM_USER_MEM_SLOTS, Memslot, SlotError, SlotFlags};
/// use tdp_core::mmu::{Mmu, MmuConfig};
/// use tdp_mock::{HostConfig, MockHost};
///
/// assert_eq!(MmuConfig::EPT.slot_limit, KVM_USER_MEM_SLOTS); // 32764, KVM's on x86
/// // For a kernel with fewer memslots (KVM_CAP_NR_MEMSLOTS answered 509 before Linux 5.15); the
/// // builders are const, like the constants:
/// const LIMIT: NonZeroU16 = NonZeroU16::new(509).unwrap();
/// const OLD_KERNEL: MmuConfig = MmuConfig::EPT.with_slot_limit(LIMIT);
/// let limit = LIMIT;
/// let host = MockHost::new(HostConfig::default());
/// let ram = host.guest_ram_base();
/// let mmu: Mmu<MockHost> = Mmu::new(host, OLD_KERNEL).unwrap();
/// assert_eq!(mmu.read().memslots().slot_limit(), limit);
/// let top = Memslot::new(AsId(0), SlotId(508), Gfn(0), 16, ram, SlotFlags::empty());
/// mmu.write().insert_memslot(top)?;
/// let above = Memslot::new(AsId(0), SlotId(509), Gfn(0x100), 16, ram, SlotFlags::empty());
/// let err = mmu.write().insert_memslot(above).unwrap_err();
/// assert!(matches!(err, SlotError::IdOutOfRange { limit: l, .. } if l == limit));
/// # Ok::<(), SlotError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuConfig {
    /// The SPTE format (EPT or NPT and their options).
    pub format: SpteFormat,
    /// The root level: L4 for 4-level walks, L5 for 5-level.
    pub root_level: Level,
    /// Hardware logs written GPAs (Intel Page-Modification Logging) and the backend drains the log into
    /// the dirty sink. Dirty logging then clears D bits instead of W bits (KVM's
    /// `cpu_dirty_log_size != 0`). Needs a format with A/D bits. AMD has no PML: NPT logs by
    /// write protection even though it has A/D bits.
    pub pml: bool,
    /// How many memslot ids each address space may use (ids `0..slot_limit`): the MMU's
    /// [`MemslotSet`] refuses a higher id with [`SlotError::IdOutOfRange`]. The constants use KVM's
    /// [`KVM_USER_MEM_SLOTS`](crate::memslot::KVM_USER_MEM_SLOTS) (32764 on x86); a VMM on a kernel with
    /// fewer sets what `KVM_CAP_NR_MEMSLOTS` reports (`tdp_kvm::fd::max_memslots`).
    pub slot_limit: NonZeroU16,
}

impl MmuConfig {
    /// 4-level EPT with A/D bits and 1 GiB pages.
    pub const EPT: MmuConfig = MmuConfig {
        format: SpteFormat::EPT_AD,
        root_level: Level::L4,
        pml: false,
        slot_limit: crate::memslot::KVM_USER_MEM_SLOTS,
    };
    /// 4-level EPT with A/D bits, 1 GiB pages and PML.
    pub const EPT_PML: MmuConfig = MmuConfig { pml: true, ..MmuConfig::EPT };
    /// 4-level NPT with 1 GiB pages.
    pub const NPT: MmuConfig = MmuConfig { format: SpteFormat::NPT, ..MmuConfig::EPT };

    /// The same configuration with another SPTE format.
    #[must_use]
    pub const fn with_format(self, format: SpteFormat) -> Self {
        MmuConfig { format, ..self }
    }

    /// The same configuration with another root level (L4 or L5; [`Mmu::new`] refuses others).
    #[must_use]
    pub const fn with_root_level(self, root_level: Level) -> Self {
        MmuConfig { root_level, ..self }
    }

    /// The same configuration with PML on or off.
    #[must_use]
    pub const fn with_pml(self, pml: bool) -> Self {
        MmuConfig { pml, ..self }
    }

    /// The same configuration with memslot ids `0..limit` in each address space ([`MmuConfig::slot_limit`]).
    #[must_use]
    pub const fn with_slot_limit(self, limit: NonZeroU16) -> Self {
        MmuConfig { slot_limit: limit, ..self }
    }

    /// One past the largest gfn the tables can map: the tree's reach, capped at 52 physical address bits.
    #[must_use]
    pub const fn max_gfn(&self) -> Gfn {
        let tree_bits = self.root_level.shift_in_frames() + 9;
        let phys_bits = 52 - PAGE_SHIFT;
        Gfn(1 << if tree_bits < phys_bits { tree_bits } else { phys_bits })
    }
}

/// An invalid [`MmuConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Only 4- and 5-level trees exist.
    #[error("root level {0:?} is not L4 or L5")]
    RootLevel(Level),
    /// PML sets dirty state through D bits, which the format does not have.
    #[error("PML needs a format with accessed/dirty bits")]
    PmlWithoutAccessedDirty,
    /// Page-Modification Logging is an Intel feature; AMD's nested paging has no such log.
    #[error("PML exists only with EPT")]
    PmlNeedsEpt,
}

/// The MMU of one VM. `R` is the raw reader/writer lock behind the MMU lock.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
/// use tdp_core::fault::{AccessKind, Fault, FaultKind};
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, VcpuMmu};
/// use tdp_mock::{HostConfig, MockHost};
///
/// let host = MockHost::new(HostConfig::default());
/// let ram = host.guest_ram_base();
/// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
/// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, ram, SlotFlags::empty()))?;
///
/// let mut vcpu = VcpuMmu::new();
/// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
/// let fault = Fault { as_id: AsId(0), gpa: Gpa(0x3000), access: AccessKind::Write,
///                     kind: FaultKind::Violation { present: false } };
/// assert_eq!(mmu.handle_fault(&mut vcpu, fault, &mut ()), Ok(FaultOutcome::Fixed));
/// assert_eq!(mmu.handle_fault(&mut vcpu, fault, &mut ()), Ok(FaultOutcome::Spurious));
/// assert_eq!(mmu.stats().leaves[1], 1, "one 2 MiB leaf: the slot is 2 MiB-aligned and the host maps it so");
/// mmu.release_vcpu(&mut vcpu);
/// # Ok::<(), tdp_core::memslot::SlotError>(())
/// ```
pub struct Mmu<H: Host, R: RawRwLock = spin::RwLock<()>> {
    host: H,
    config: MmuConfig,
    lock: RwLock<R, MemslotSet>,
    roots: RootList,
    /// The mirror roots, one per address space once a vCPU loads it (only when the host has external
    /// tables): private memslots are mapped there.
    mirror_roots: RootList,
    stats: Stats,
    /// The fault path's leaf values, precomputed from `config.format`.
    leaf_templates: fault::LeafTemplates,
    /// MMU-notifier invalidations: sequence count, depth and range.
    invalidation: Invalidation,
    /// The memslot generation, mirrored outside the lock so that a fault can tell whether its vCPU's
    /// copy of a memslot is current without taking the lock (checked again under it). Written under
    /// the write lock after every memslot change.
    slots_generation: AtomicU64,
    /// Tables removed from any tree so far, counted before each is freed: a vCPU's walk hint is used only
    /// while the count is what it was when the hint was taken (`walk::WalkHint`).
    table_removals: AtomicU64,
    /// The VM has a device doing non-coherent DMA: leaves then honour the guest's PAT (no EPT IPAT).
    noncoherent_dma: AtomicBool,
    /// The memory-type bits of a RAM leaf now (they change with `noncoherent_dma`), and of a device leaf.
    ram_memtype: AtomicU64,
    device_memtype: u64,
    /// `config.max_gfn()`, computed once for the fault path.
    max_gfn: Gfn,
    /// The format has 2 MiB leaves (every format but one without huge pages).
    huge_2m: bool,
    /// Without A/D bits any violation may hit an access-tracked leaf, which the fast path restores.
    fast_on_any_violation: bool,
    /// Per vCPU group, on its own line: the faults' read side of the lock and the leaf counters.
    groups: groups::VcpuGroups,
    /// The NX huge-page mitigation: its switch and the possible-NX-huge-page list.
    nx: nx::NxHugePages,
}

impl<H: Host, R: RawRwLock> Mmu<H, R> {
    /// An MMU with no memslots and no roots.
    ///
    /// # Errors
    /// [`ConfigError`] for a root level other than L4 or L5.
    pub fn new(host: H, config: MmuConfig) -> Result<Self, ConfigError> {
        if !matches!(config.root_level, Level::L4 | Level::L5) {
            return Err(ConfigError::RootLevel(config.root_level));
        }
        if config.pml && config.format.kind() != crate::spte::TdpKind::Ept {
            return Err(ConfigError::PmlNeedsEpt);
        }
        if config.pml && !config.format.has_accessed_dirty() {
            return Err(ConfigError::PmlWithoutAccessedDirty);
        }
        Ok(Mmu {
            host,
            config,
            lock: RwLock::new(MemslotSet::with_slot_limit(config.max_gfn(), config.slot_limit)),
            roots: RootList::new(false),
            mirror_roots: RootList::new(true),
            stats: Stats::new(),
            leaf_templates: fault::LeafTemplates::new(&config.format),
            invalidation: Invalidation::new(),
            slots_generation: AtomicU64::new(0),
            table_removals: AtomicU64::new(0),
            noncoherent_dma: AtomicBool::new(false),
            ram_memtype: AtomicU64::new(memtype::ram_bits(&config.format, false)),
            device_memtype: memtype::device_bits(&config.format),
            max_gfn: config.max_gfn(),
            huge_2m: config.format.max_leaf_level() >= Level::L2,
            fast_on_any_violation: !config.format.has_accessed_dirty(),
            groups: groups::VcpuGroups::new(),
            nx: nx::NxHugePages::new(),
        })
    }

    /// The host backend.
    pub fn host(&self) -> &H {
        &self.host
    }
    /// The configuration.
    pub fn config(&self) -> &MmuConfig {
        &self.config
    }
    /// The SPTE format.
    pub fn format(&self) -> &SpteFormat {
        &self.config.format
    }
    /// Counters: leaves per level, linked tables, splits, MMIO SPTEs. Fault outcomes are counted per vCPU
    /// in [`VcpuMmu::counters`].
    pub fn stats(&self) -> MmuStats {
        let (nx_huge_splits, nx_recovered) = self.nx.counts();
        MmuStats { leaves: self.groups.leaves(), nx_huge_splits, nx_recovered, ..self.stats.snapshot() }
    }
    /// Every root, valid or not, with its reference count: the direct roots, then the mirror roots
    /// ([`RootInfo::mirror`]).
    pub fn roots(&self) -> Vec<RootInfo> {
        let mut roots = self.roots.snapshot();
        roots.extend(self.mirror_roots.snapshot());
        roots
    }

    /// Takes the MMU lock for read: faults and other compare-exchange paths.
    pub fn read(&self) -> SharedMmu<'_, H, R> {
        SharedMmu { mmu: self, slots: SlotsRead::Locked(self.lock.read()) }
    }
    /// The read side for a fault of a vCPU in reader group `group`: its group's count, which no other
    /// group writes, unless a writer is there.
    #[inline]
    fn read_for_fault(&self, group: u8) -> SharedMmu<'_, H, R> {
        SharedMmu { mmu: self, slots: SlotsRead::for_fault(&self.lock, self.groups.line(group)) }
    }
    /// Takes the MMU lock for write: memslot changes, zaps, root invalidation.
    pub fn write(&self) -> ExclusiveMmu<'_, H, R> {
        let slots = self.lock.write();
        // Faults in their reader groups leave before the write side touches anything.
        self.groups.block();
        ExclusiveMmu { mmu: self, slots }
    }

    /// Fills `cache` so that one fault can complete without allocating under the lock (KVM's
    /// `mmu_topup_memory_caches`).
    ///
    /// # Errors
    /// [`AllocError`] when the host has no pages; the cache keeps what it had.
    pub fn topup(&self, cache: &mut PageCache) -> Result<(), AllocError> {
        cache.topup(&self.host, self.config.format.nonpresent(), self.pages_per_fault())
    }

    /// Gives `vcpu` a root for `as_id`: an existing valid root, or a new one built from its page cache
    /// (topped up first). A root the vCPU held before is put first. Returns the root's frame, for the
    /// EPTP / nCR3. The vCPU keeps a reference until [`Mmu::put_root`] or [`Mmu::release_vcpu`].
    ///
    /// # Errors
    /// [`AllocError`] when a new root is needed and no page can be had; the vCPU then has no root.
    pub fn load_root(&self, vcpu: &mut VcpuMmu, as_id: AsId) -> Result<crate::addr::Pfn, AllocError> {
        self.put_root(vcpu);
        if !vcpu.group_assigned {
            vcpu.group = self.groups.assign();
            vcpu.group_assigned = true;
        }
        self.topup(&mut vcpu.cache)?;
        let _shared = self.lock.read();
        let cache = &mut vcpu.cache;
        let root = self.roots.get_or_create(as_id, || cache.take().ok_or(AllocError))?;
        let pfn = root.pfn();
        vcpu.root = Some(root);
        if self.host.has_external_tables() {
            // The private memslots' tree, shared by the vCPUs of the address space and never invalidated.
            let mirror = self.mirror_roots.get_or_create(as_id, || cache.take().ok_or(AllocError))?;
            vcpu.mirror = Some(mirror);
        }
        Ok(pfn)
    }

    /// Drops `vcpu`'s reference to its root, if it has one. The last reference to an invalidated,
    /// zapped root frees it.
    pub fn put_root(&self, vcpu: &mut VcpuMmu) {
        if let Some(mirror) = vcpu.mirror.take() {
            // The list keeps its reference until teardown: never the last.
            let _ = self.mirror_roots.put(mirror);
        }
        // The hint belongs to the root's tree.
        vcpu.walk = walk::WalkHint::EMPTY;
        let Some(root) = vcpu.root.take() else {
            return;
        };
        if let Some(pfn) = self.roots.put(root) {
            // No vCPU uses the root any more and its tree was zapped when it was invalidated; hardware
            // may still walk it until the vCPUs' next flush, which the deferral covers.
            self.free_removed_table(pfn);
        }
    }

    /// Gives back everything `vcpu` holds: its root reference and the pages of its cache. The vCPU may
    /// load a root and fault again afterwards.
    pub fn release_vcpu(&self, vcpu: &mut VcpuMmu) {
        self.put_root(vcpu);
        vcpu.cache.release(&self.host);
    }

    /// Whether `root` is still valid; an invalid root must be put and reloaded.
    pub fn root_is_valid(&self, root: &RootRef) -> bool {
        root.is_valid()
    }

    /// Handles a TDP fault (EPT violation or misconfiguration, AMD #NPF) taken by `vcpu`: the one fault
    /// entry point. Tops up the vCPU's page cache, translates the gfn through the host **without** the
    /// MMU lock (the host may block), then takes the lock for read and maps it, or retries when a
    /// memslot change or an MMU-notifier invalidation overlapped the translation (see
    /// [`ExclusiveMmu::invalidate_range_start`]). The outcome is counted in [`VcpuMmu::counters`].
    ///
    /// Flushes the TLBs itself when it replaces a table with a huge leaf; otherwise it only adds
    /// permissions, which needs no flush.
    ///
    /// # Errors
    /// [`FaultError`]: the top-up failed ([`FaultError::Alloc`], nothing changed), the host could not
    /// provide the page, or a misconfiguration on an SPTE the MMU did not make. No SPTE is left
    /// half-changed by any of them.
    // Inlined into the caller's exit loop: as a call, every fault paid a frame of six saved registers, the
    // `Result` written through memory and read back, and spills around the call (~25 of ~220 instructions
    // of a 4 KiB fault). The rare paths stay out of line, so the copy in each caller is one short body.
    #[inline]
    pub fn handle_fault(
        &self,
        vcpu: &mut VcpuMmu,
        fault: crate::fault::Fault,
        dirty: &mut dyn crate::host::DirtySink,
    ) -> Result<FaultOutcome, FaultError> {
        self.topup(&mut vcpu.cache)?;
        // The top-up left at least `pages_per_fault` pages, more than a fault may take.
        let outcome = self.fault(vcpu, fault, dirty)?;
        vcpu.counters.count(outcome);
        self.host.fault_handled(&fault, outcome);
        Ok(outcome)
    }

    /// Table pages one fault may need: a table per level below the root, plus a root.
    #[inline]
    fn pages_per_fault(&self) -> usize {
        self.config.root_level.number() as usize
    }
}

impl<H: Host, R: RawRwLock> Drop for Mmu<H, R> {
    fn drop(&mut self) {
        let mut exclusive = self.write();
        exclusive.zap_all(); // It flushes itself before the freed tables can be reused.
        drop(exclusive);
        for (pfn, _) in self.roots.drain() {
            self.free_removed_table(pfn);
        }
        self.tear_down_mirror_roots();
    }
}

/// The MMU with its lock held for read.
pub struct SharedMmu<'a, H: Host, R: RawRwLock> {
    mmu: &'a Mmu<H, R>,
    slots: SlotsRead<'a, R>,
}

impl<'a, H: Host, R: RawRwLock> SharedMmu<'a, H, R> {
    /// The line of the vCPU group whose fault holds this (group 0's for other readers): where the leaves
    /// it installs are counted.
    #[inline]
    fn line(&self) -> &'a groups::GroupLine {
        self.slots.group_line().unwrap_or_else(|| self.mmu.groups.line(0))
    }
}

/// The MMU with its lock held for write.
pub struct ExclusiveMmu<'a, H: Host, R: RawRwLock> {
    mmu: &'a Mmu<H, R>,
    slots: RwLockWriteGuard<'a, R, MemslotSet>,
}

impl<H: Host, R: RawRwLock> Drop for ExclusiveMmu<'_, H, R> {
    fn drop(&mut self) {
        // Before the write guard (a field) drops: faults may use their groups again.
        self.mmu.groups.unblock();
    }
}

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// Runs `f` with the write lock dropped (and faults let back into their groups), then takes it
    /// again: a yield of a long walk.
    fn unlocked<U>(
        mmu: &Mmu<H, R>,
        slots: &mut RwLockWriteGuard<'_, R, MemslotSet>,
        f: impl FnOnce() -> U,
    ) -> U {
        mmu.groups.unblock();
        let result = RwLockWriteGuard::unlocked(slots, f);
        mmu.groups.block();
        result
    }
}

impl<H: Host, R: RawRwLock> SharedMmu<'_, H, R> {
    /// The memslots.
    pub fn memslots(&self) -> &MemslotSet {
        &self.slots
    }
}

impl<H: Host, R: RawRwLock> ExclusiveMmu<'_, H, R> {
    /// The memslots.
    pub fn memslots(&self) -> &MemslotSet {
        &self.slots
    }

    /// Adds a memslot. Cached MMIO SPTEs for its gfns go stale with the generation bump, so no flush is
    /// owed (hardware never caches a misconfigured or non-present translation).
    ///
    /// # Errors
    /// [`SlotError`]; nothing changed.
    pub fn insert_memslot(&mut self, slot: Memslot) -> Result<(), SlotError> {
        if slot.is_private() && !self.mmu.host.has_external_tables() {
            return Err(SlotError::NoExternalTables { as_id: slot.as_id, id: slot.id });
        }
        self.slots.insert(slot)?;
        self.after_generation_bump();
        Ok(())
    }

    /// Removes a memslot and zaps its gfns in every root of its address space.
    ///
    /// # Errors
    /// [`SlotError::NotFound`]; nothing changed.
    pub fn delete_memslot(&mut self, as_id: AsId, id: SlotId) -> Result<Flush, SlotError> {
        let slot = self.slots.remove(as_id, id)?;
        let flush = self.zap_gfn_range(as_id, slot.base_gfn, slot.end_gfn());
        self.after_generation_bump();
        Ok(flush)
    }

    /// Changes a slot's flags. Only [`SlotFlags::LOG_DIRTY`] may change, as in KVM, and with it
    /// [`SlotFlags::LOG_INITIALLY_SET`]. Turning logging on write-protects the slot's leaves (or, with
    /// PML, cleans its 4 KiB leaves and write-protects its huge ones), unless the log starts all-set
    /// (`LOG_INITIALLY_SET`): then nothing changes now, and each range is split and protected when it is
    /// first cleared ([`ExclusiveMmu::reprotect_dirty`]). Turning logging off recovers huge pages in
    /// place ([`SharedMmu::recover_huge_pages`], KVM 6.13): the write lock is dropped and the read lock
    /// taken for that pass, which flushes itself. The caller owes the returned flush; for logging it
    /// must run before the first harvest.
    ///
    /// # Errors
    /// [`SlotError::NotFound`]; [`SlotError::ReadOnlyChange`] when the read-only flag would change;
    /// [`SlotError::InitiallySetChange`] when `LOG_INITIALLY_SET` would change while logging stays on.
    pub fn set_memslot_flags(
        &mut self,
        as_id: AsId,
        id: SlotId,
        flags: SlotFlags,
    ) -> Result<Flush, SlotError> {
        let old = *self.slots.get(as_id, id).ok_or(SlotError::NotFound { as_id, id })?;
        if old.flags.contains(SlotFlags::READONLY) != flags.contains(SlotFlags::READONLY) {
            return Err(SlotError::ReadOnlyChange { as_id, id });
        }
        let initially_set = SlotFlags::LOG_INITIALLY_SET;
        if old.is_dirty_logged()
            && flags.contains(SlotFlags::LOG_DIRTY)
            && old.flags.contains(initially_set) != flags.contains(initially_set)
        {
            return Err(SlotError::InitiallySetChange { as_id, id });
        }
        self.slots.set_flags(as_id, id, flags)?;
        self.after_generation_bump();
        let new = Memslot { flags, ..old };
        Ok(match (old.is_dirty_logged(), new.is_dirty_logged()) {
            // Every page already counts as dirty: nothing to protect until a range is cleared.
            (false, true) if new.is_log_initially_set() => Flush::none(),
            (false, true) => self.start_dirty_logging(&new),
            (true, false) => self.stop_dirty_logging(&new),
            _ => Flush::none(),
        })
    }

    /// KVM zaps every MMIO SPTE when the generation's low bits wrap, since an old SPTE could match
    /// again; here every root is invalidated and the TLBs flushed. The old trees are freed by the next
    /// [`SharedMmu::zap_invalidated_roots`], which the caller runs (see [`ExclusiveMmu::invalidate_roots`]).
    fn after_generation_bump(&mut self) {
        // Release: a fault that reads the new generation outside the lock drops its memslot copy.
        self.mmu.slots_generation.store(self.slots.generation(), Ordering::Release);
        let mask = (1u64 << crate::spte::MMIO_GEN_BITS) - 1;
        if self.slots.generation() & mask == 0 {
            self.invalidate_roots(None).run(&self.mmu.host);
        }
    }
}
