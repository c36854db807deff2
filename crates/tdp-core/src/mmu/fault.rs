//! The page-fault handler (KVM's `kvm_tdp_mmu_page_fault` / `kvm_tdp_mmu_map`): the host translation
//! without the MMU lock, then the walk and the install under its read side.
//!
//! A fault maps the gfn at the largest level that the memslot's alignment, the host's own mapping level
//! and the format allow (4 KiB in dirty-logged slots). On the way down it links missing tables and
//! splits huge leaves that are too big, each with one compare-exchange; losing a race returns
//! [`FaultOutcome::Retry`] and the vCPU re-executes, exactly as hardware and KVM do.
//!
//! Keeps: I1: a leaf is writable only when the memslot is writable and the host page is; a gfn without a
//! memslot gets an MMIO SPTE (or nothing), never a frame.

use crate::addr::{AsId, BITS_PER_LEVEL, Gfn, Level, Pfn};
use crate::fault::{AccessKind, Fault, FaultKind};
use crate::flush::Flush;
use crate::host::{AllocError, DirtySink, DirtySource, Host, HostFaultError, HostPage};
use crate::memslot::{Memslot, SlotFlags};
use crate::spte::{LeafAttrs, LeafWrite, MMU_PRESENT, MemType, PFN_MASK, Spte, SpteCheckError, SpteFormat};
use crate::sync::{AtomicU64, Ordering};

use super::cache::PageCache;
use super::root::RootRef;
use super::stats::Stats;
use super::vcpu::VcpuMmu;
use super::walk::{GfnWalk, WalkHint};
use super::{Mmu, SharedMmu};

/// What a handled fault asks the vCPU to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A mapping was installed; re-execute the access.
    Fixed,
    /// The mapping was already there (another vCPU won, or the TLB was stale); re-execute.
    Spurious,
    /// A race was lost; nothing this fault did is visible; re-execute.
    Retry,
    /// The vCPU's root was invalidated: put it, load a new one, re-execute.
    ReloadRoot,
    /// The access cannot be satisfied by a mapping; the VMM emulates it.
    Emulate(EmulateReason),
}

/// Why a fault is handed back for emulation. More reasons may come (KVM has several), so matches need a
/// catch-all arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmulateReason {
    /// No memslot covers the gfn: an MMIO access.
    Mmio,
    /// A write to a read-only memslot (KVM exits to the VMM as MMIO).
    ReadOnlySlot,
    /// A write to a write-tracked gfn (KVM's page-track, `RET_PF_WRITE_PROTECTED`): whoever tracks it
    /// emulates the write (and, shadowing a nested hypervisor's tables, mirrors it).
    WriteTracked,
}

/// A fault that could not be handled. The tables are consistent after every one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// Topping up the page cache failed; nothing changed.
    #[error("no table page for the fault: {0}")]
    Alloc(#[from] AllocError),
    /// The host could not provide the page.
    #[error("host translation failed: {0}")]
    Host(#[from] HostFaultError),
    /// The host's external tables refused a private mapping for good; the mirror is unchanged.
    #[error("the external tables refused the mapping: {0}")]
    External(crate::host::ExternalError),
    /// A misconfiguration exit on an SPTE the MMU did not make: a bug, reported with the entry.
    #[error("EPT misconfiguration / reserved-bit fault at {gfn:?} on {spte:?}: {cause}")]
    Misconfig {
        /// The faulting gfn.
        gfn: Gfn,
        /// The entry that hardware rejected.
        spte: Spte,
        /// What is wrong with it.
        cause: SpteCheckError,
    },
}

/// The attribute bits of every leaf a fault can install, computed once per MMU from its format, so that
/// building the leaf on the fault path is one OR of the frame into a precomputed value (instead of
/// reading a dozen masks from the format and branching on the attributes for every fault).
///
/// A fault's leaves differ only in the frame, whether they are huge (the PS bit), their [`LeafWrite`]
/// and their memory type; everything else is fixed: executable, accessed. The templates hold no memory
/// type bits; the fault ORs in those of [`Mmu::memtype_bits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LeafTemplates {
    /// `bits[huge][write_index(write)]`: [`SpteFormat::leaf`] of frame 0.
    bits: [[u64; 5]; 2],
}

/// Every [`LeafWrite`], in the order of [`write_index`].
const LEAF_WRITES: [LeafWrite; 5] = [
    LeafWrite::ReadOnly { host_writable: false },
    LeafWrite::ReadOnly { host_writable: true },
    LeafWrite::WriteProtected,
    LeafWrite::Writable,
    LeafWrite::WritableClean,
];

/// The position of `write` in [`LEAF_WRITES`].
#[inline]
const fn write_index(write: LeafWrite) -> usize {
    match write {
        LeafWrite::ReadOnly { host_writable: false } => 0,
        LeafWrite::ReadOnly { host_writable: true } => 1,
        LeafWrite::WriteProtected => 2,
        LeafWrite::Writable => 3,
        LeafWrite::WritableClean => 4,
    }
}

/// The attributes of a leaf installed by a fault with writability `write`.
#[inline]
const fn fault_attrs(write: LeafWrite) -> LeafAttrs {
    LeafAttrs { write, exec: true, memtype: MemType::WriteBack, accessed: true }
}

impl LeafTemplates {
    /// The templates for `fmt`.
    pub(super) fn new(fmt: &SpteFormat) -> Self {
        // Every huge level carries the same bits (PS set); a format without huge pages never asks for
        // the huge row, which then repeats the 4 KiB one.
        let huge = fmt.max_leaf_level().min(Level::L2);
        let no_memtype = !fmt.memtype_mask();
        LeafTemplates {
            bits: [Level::L1, huge]
                .map(|level| LEAF_WRITES.map(|w| fmt.leaf(Pfn(0), level, fault_attrs(w)).0 & no_memtype)),
        }
    }

    /// `fmt.leaf(pfn, level, fault_attrs(write))` for the format the templates were made for, with the
    /// memory type bits `memtype` (from [`SpteFormat::memtype_bits`]) in place of write-back with IPAT:
    /// [`SpteFormat::leaf`] puts the frame in with `pfn.hpa() & PFN_MASK` and nothing else depends on it.
    ///
    /// Every template already holds [`MMU_PRESENT`] (a leaf is present); OR-ing it in again changes no
    /// bit but lets the compiler see that the leaf is present, so the install drops that test.
    #[inline]
    pub(super) fn leaf(&self, pfn: Pfn, level: Level, write: LeafWrite, memtype: u64) -> Spte {
        let bits = self.bits[usize::from(level > Level::L1)][write_index(write)];
        debug_assert!(bits & MMU_PRESENT != 0, "a leaf template is present");
        Spte(bits | memtype | MMU_PRESENT | (pfn.hpa() & PFN_MASK))
    }
}

/// A fault once the host has translated it: its memslot (the vCPU's copy), gfn, host page and whether
/// it is a write.
#[derive(Clone, Copy, Debug)]
struct Translated<'s> {
    slot: &'s Memslot,
    gfn: Gfn,
    host: HostPage,
    write: bool,
    /// The gfn is write-tracked (and the access is not a write): a read-only leaf.
    tracked: bool,
    /// Some gfn of the VM is write-tracked: huge leaves must avoid them.
    tracking: bool,
    /// The access is an instruction fetch (the NX huge-page mitigation maps it small).
    exec: bool,
}

/// A fault in a read-only or private memslot, for [`Mmu::special_slot_fault`]: the vCPU's copy of the
/// slot and the state the fault read before its translation.
#[derive(Clone, Copy)]
struct SlotFault {
    slot: Memslot,
    gfn: Gfn,
    write: bool,
    /// The invalidation sequence count read before the translation.
    seq: u64,
    /// The memslot generation the slot copy is current at.
    generation: u64,
}

/// What linking a table on a fault's path needs to know of the fault.
#[derive(Clone, Copy)]
struct Links {
    as_id: AsId,
    gfn: Gfn,
    nx_track: u8,
}

/// What a fault installs: `spte` at `level` on `gfn`'s path in `as_id`.
#[derive(Clone, Copy, Debug)]
struct Target {
    as_id: AsId,
    gfn: Gfn,
    level: Level,
    spte: Spte,
    /// A fetch under the NX huge-page mitigation that could have mapped at this level (as a number; 0
    /// otherwise): the tables it links at that level or below are tracked for recovery.
    nx_track: u8,
}

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// The fault handler proper, for [`Mmu::handle_fault`] once the cache is topped up.
    ///
    /// Order, as in KVM's `kvm_tdp_mmu_page_fault`: the paths that need no host translation run first
    /// under the read lock (an MMIO exit on a cached MMIO SPTE; the fast path on a write-protected or
    /// access-tracked leaf). Then the memslot (from the vCPU's copy while the memslot generation is
    /// unchanged, else looked up under the lock), the sequence count read, and the host translation
    /// **without** the lock, so the host may block. Then the lock again: a memslot change or an
    /// invalidation since the read sends the vCPU back ([`FaultOutcome::Retry`]); otherwise the walk
    /// installs the leaf.
    #[inline]
    pub(super) fn fault(
        &self,
        vcpu: &mut VcpuMmu,
        fault: Fault,
        dirty: &mut dyn DirtySink,
    ) -> Result<FaultOutcome, FaultError> {
        // The root's validity is checked under the lock below (an invalid root only costs this fault a
        // translation), and by each path that takes the lock earlier.
        let Some(root) = vcpu.root.as_ref() else {
            return Ok(FaultOutcome::ReloadRoot);
        };
        let as_id = root.as_id();
        let gfn = fault.gpa.gfn();
        // Beyond what the tables can map (`max_gfn`) a gfn has no memslot (every slot ends at or below
        // it), and nothing may be cached for it: the access is emulated every time.
        if gfn >= self.max_gfn {
            return Ok(FaultOutcome::Emulate(EmulateReason::Mmio));
        }
        let write = fault.access == AccessKind::Write;
        // One test for the common case (a violation on a non-present entry, with A/D bits).
        if fault.kind != (FaultKind::Violation { present: false }) || self.fast_on_any_violation {
            let shared = self.read_for_fault(vcpu.group);
            if let Some(outcome) =
                shared.fault_before_translation(root, &mut vcpu.slot.index, fault, dirty)?
            {
                // Fixed before any translation: by the fast path.
                vcpu.counters.fast += u64::from(outcome == FaultOutcome::Fixed);
                return Ok(outcome);
            }
        }
        let seq = self.invalidation.snapshot();
        let mut generation = self.slots_generation.load(Ordering::Acquire);
        if !vcpu.slot.covers(as_id, gfn, generation) {
            let shared = self.read_for_fault(vcpu.group);
            let Some(slot) = shared.slots.find_hinted(as_id, gfn, &mut vcpu.slot.index).copied() else {
                return Ok(shared.no_slot_fault(&mut vcpu.cache, root, gfn));
            };
            generation = shared.slots.generation();
            vcpu.slot.set(slot, generation);
        }
        let slot = &vcpu.slot.slot;
        // One test for both kinds of slot the common case is not: read-only and private.
        if slot.flags.intersects(SlotFlags::READONLY.union(SlotFlags::PRIVATE))
            && let Some(outcome) = self.special_slot_fault(
                root,
                &mut vcpu.cache,
                vcpu.mirror.as_ref(),
                vcpu.group,
                SlotFault { slot: *slot, gfn, write, seq, generation },
            )?
        {
            return Ok(outcome);
        }
        let slot = &vcpu.slot.slot;
        // Without the MMU lock: the host may block here (swap-in, copy-on-write). Invalidations that
        // overlap this translation are caught below.
        let host = self.host.translate(slot, gfn, write)?;
        if write && !host.writable {
            return Err(HostFaultError::ReadOnly { gfn }.into());
        }
        let shared = match self.read_if_current(vcpu.group, root, generation, seq, gfn) {
            Ok(shared) => shared,
            Err(outcome) => return Ok(outcome),
        };
        let track = shared.slots.write_track();
        let tracking = !track.is_empty();
        let tracked = tracking && track.is_tracked(as_id, gfn);
        if tracked && write {
            return Ok(FaultOutcome::Emulate(EmulateReason::WriteTracked));
        }
        let exec = fault.access == AccessKind::Exec;
        let translated = Translated { slot, gfn, host, write, tracked, tracking, exec };
        Ok(shared.map_translated(&mut vcpu.cache, &mut vcpu.walk, root, translated, dirty))
    }
}

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// [`Mmu::fault`] in a read-only or private memslot (the vCPU's memslot copy, current at
    /// `generation`). A write to a read-only slot is emulated; a read continues as any fault (`None`).
    /// A private slot's fault is handled here whole, through the vCPU's mirror root: the translation
    /// without the lock and the checks under it as in [`Mmu::fault`], then
    /// [`SharedMmu::private_fault`]. Out of line, so that the common fault tests one flag word for both.
    #[cold]
    #[inline(never)]
    fn special_slot_fault(
        &self,
        root: &RootRef,
        cache: &mut PageCache,
        mirror: Option<&RootRef>,
        group: u8,
        fault: SlotFault,
    ) -> Result<Option<FaultOutcome>, FaultError> {
        let SlotFault { slot, gfn, write, seq, generation } = fault;
        if !slot.is_private() {
            return Ok(write.then_some(FaultOutcome::Emulate(EmulateReason::ReadOnlySlot)));
        }
        // Private memory is always mapped writable (a guest_memfd page is the guest's alone), so the
        // host is asked for a writable page whatever the access: no later write needs to upgrade it.
        let host = self.host.translate(&slot, gfn, true)?;
        if !host.writable {
            return Err(HostFaultError::ReadOnly { gfn }.into());
        }
        match self.read_if_current(group, root, generation, seq, gfn) {
            Ok(shared) => shared.private_fault(cache, mirror, gfn, host).map(Some),
            Err(outcome) => Ok(Some(outcome)),
        }
    }

    /// Takes the fault's read side (through vCPU group `group`) and checks again what its translation
    /// without the lock relied on: the root still valid (`ReloadRoot` if not), no memslot change since
    /// `generation` and no invalidation covering `gfn` since the sequence count read `seq` (`Retry`).
    /// Invalidation happens under the write lock, so a root valid now stays valid (and untouched by the
    /// zap of invalid roots) until the fault drops the read side.
    #[inline(always)]
    fn read_if_current(
        &self,
        group: u8,
        root: &RootRef,
        generation: u64,
        seq: u64,
        gfn: Gfn,
    ) -> Result<SharedMmu<'_, H, R>, FaultOutcome> {
        let shared = self.read_for_fault(group);
        if !root.is_valid() {
            return Err(FaultOutcome::ReloadRoot);
        }
        if shared.slots.generation() != generation || self.invalidation.must_retry(seq, gfn) {
            return Err(FaultOutcome::Retry);
        }
        Ok(shared)
    }
}

impl<'a, H: Host, R: lock_api::RawRwLock> SharedMmu<'a, H, R> {
    /// The parts of a fault that need no host translation: an MMIO exit that hit a current MMIO SPTE,
    /// and the fast path. `None` continues with the translation.
    #[cold]
    #[inline(never)]
    fn fault_before_translation(
        &self,
        root: &RootRef,
        slot_hint: &mut usize,
        fault: Fault,
        dirty: &mut dyn DirtySink,
    ) -> Result<Option<FaultOutcome>, FaultError> {
        if !root.is_valid() {
            return Ok(Some(FaultOutcome::ReloadRoot));
        }
        let gfn = fault.gpa.gfn();
        if fault.kind == FaultKind::Misconfig {
            return self.mmio_fault(root, gfn);
        }
        let Some(slot) = self.slots.find_hinted(root.as_id(), gfn, slot_hint) else {
            return Ok(None);
        };
        if fault.access == AccessKind::Write && !slot.is_writable() {
            return Ok(Some(FaultOutcome::Emulate(EmulateReason::ReadOnlySlot)));
        }
        Ok(self.fast_fault(root, slot, gfn, fault.access, dirty))
    }

    /// Installs the leaf for a translated fault: the common case (a writable 4 KiB leaf) straight
    /// through, the rest out of line.
    #[inline(always)]
    fn map_translated(
        &self,
        cache: &mut PageCache,
        hint: &mut WalkHint,
        root: &RootRef,
        translated: Translated<'_>,
        dirty: &mut dyn DirtySink,
    ) -> FaultOutcome {
        let Translated { slot, gfn, host, write, tracked, tracking, exec } = translated;
        let mmu = self.mmu;
        // Keeps every table the walk below can reach allocated until the fault returns.
        let _walk = mmu.host.begin_walk();
        let walk = mmu.walk_gfn_hinted(root.pfn(), gfn, hint);
        let logged = slot.is_dirty_logged();
        // A writable leaf needs a writable slot and host page and no tracking; in a logged slot, a write
        // too. It is 4 KiB in a logged slot or where the host maps 4 KiB.
        let may_write = slot.is_writable() && host.writable && !tracked;
        let small = if logged { write } else { host.level == Level::L1 };
        let memtype = mmu.memtype_bits(host.memory);
        let (outcome, leaf_write) = if may_write && small {
            // The common case, written out for the compiler: a writable 4 KiB leaf (the goal level is
            // L1 in a logged slot or when the host maps 4 KiB; see `goal_level`).
            let leaf = mmu.leaf_templates.leaf(host.pfn, Level::L1, LeafWrite::Writable, memtype);
            debug_assert_eq!(self.goal_level(slot, gfn, host.pfn, host.level), Level::L1);
            debug_assert_eq!(leaf, self.expected_leaf(host.pfn, Level::L1, LeafWrite::Writable, memtype));
            let target = Target { as_id: root.as_id(), gfn, level: Level::L1, spte: leaf, nx_track: 0 };
            (self.map_from(cache, walk, target), LeafWrite::Writable)
        } else if may_write && !logged {
            // A writable leaf where the host maps huge in an unlogged slot: the 2 MiB (or 1 GiB) fault.
            let nx = mmu.nx.enabled();
            if host.level == Level::L2
                && mmu.huge_2m
                && !nx
                && !tracking
                && walk.shift == Level::L2.shift_in_frames()
                && huge_fits(slot, gfn, host.pfn, Level::L2.pages() - 1)
            {
                // Its common case, written out for the compiler as the 4 KiB one is: a 2 MiB leaf in the
                // level-2 table the walk stopped at (from the vCPU's walk hint, for a run of them).
                let pfn = Pfn(host.pfn.0 & !(Level::L2.pages() - 1));
                let leaf = mmu.leaf_templates.leaf(pfn, Level::L2, LeafWrite::Writable, memtype);
                debug_assert_eq!(leaf, self.expected_leaf(pfn, Level::L2, LeafWrite::Writable, memtype));
                let target = Target { as_id: root.as_id(), gfn, level: Level::L2, spte: leaf, nx_track: 0 };
                debug_assert_eq!(self.goal_level(slot, gfn, host.pfn, host.level), Level::L2);
                // Not logged: nothing to mark dirty.
                return self.map_from(cache, walk, target);
            }
            let level = self.huge_goal_level(slot, gfn, host.pfn, host.level, tracking);
            debug_assert_eq!(level, self.goal_level(slot, gfn, host.pfn, host.level));
            let (level, nx_track) = if nx { self.nx_goal(root, gfn, level, exec) } else { (level, 0) };
            let pfn = Pfn(host.pfn.0 & !(level.pages() - 1));
            let mut leaf = mmu.leaf_templates.leaf(pfn, level, LeafWrite::Writable, memtype);
            debug_assert_eq!(leaf, self.expected_leaf(pfn, level, LeafWrite::Writable, memtype));
            if nx && level > Level::L1 {
                leaf = mmu.format().non_executable(leaf);
            }
            let target = Target { as_id: root.as_id(), gfn, level, spte: leaf, nx_track };
            let outcome = if level.shift_in_frames() <= walk.shift {
                self.map_from(cache, walk, target)
            } else {
                self.map_other(cache, root, walk, target)
            };
            (outcome, LeafWrite::Writable)
        } else {
            let level = self.goal_level(slot, gfn, host.pfn, host.level);
            let nx = mmu.nx.enabled();
            let (level, nx_track) = if nx { self.nx_goal(root, gfn, level, exec) } else { (level, 0) };
            let leaf_write = self.leaf_write_otherwise(slot, host.writable, tracked);
            let pfn = Pfn(host.pfn.0 & !(level.pages() - 1));
            let mut leaf = mmu.leaf_templates.leaf(pfn, level, leaf_write, memtype);
            debug_assert_eq!(leaf, self.expected_leaf(pfn, level, leaf_write, memtype));
            if nx && level > Level::L1 {
                leaf = mmu.format().non_executable(leaf);
            }
            let target = Target { as_id: root.as_id(), gfn, level, spte: leaf, nx_track };
            (self.map_other(cache, root, walk, target), leaf_write)
        };
        if logged && leaf_write == LeafWrite::Writable && outcome == FaultOutcome::Fixed {
            dirty.mark_dirty(slot, gfn, DirtySource::Fault);
        }
        outcome
    }

    /// [`SharedMmu::map_from`] for the leaves of the less common faults (huge, read-only, write-protected,
    /// clean), from the table the walk reached or, when the goal lies above it (a huge leaf is to replace
    /// a table the walk went through), from the root.
    #[inline(never)]
    fn map_other(
        &self,
        cache: &mut PageCache,
        root: &RootRef,
        walk: GfnWalk<'a>,
        target: Target,
    ) -> FaultOutcome {
        if target.level.shift_in_frames() <= walk.shift {
            self.map_from(cache, walk, target)
        } else {
            let root_walk =
                GfnWalk { table: self.mmu.host.table(root.pfn()), shift: self.root_shift(), pfn: root.pfn() };
            self.map_from(cache, root_walk, target)
        }
    }

    /// The writability of a fault's leaf when it is not simply [`LeafWrite::Writable`] (a read in a
    /// logged slot, a read-only slot or host page, a write-tracked gfn).
    #[cold]
    #[inline(never)]
    fn leaf_write_otherwise(&self, slot: &Memslot, host_writable: bool, tracked: bool) -> LeafWrite {
        if tracked {
            // Write-tracked: not MMU-writable, so that the fast path cannot make it writable.
            return LeafWrite::ReadOnly { host_writable };
        }
        match (slot.is_writable(), host_writable) {
            // A read in a logged slot must leave the first write visible: to the fast path
            // (write-protected) or, with PML, to hardware's D bit and log (clean).
            (true, true) if self.mmu.config.pml => LeafWrite::WritableClean,
            (true, true) => LeafWrite::WriteProtected,
            (_, host_writable) => LeafWrite::ReadOnly { host_writable },
        }
    }

    /// What [`SpteFormat::leaf`] makes of a fault's leaf with memory-type bits `memtype`, to check the
    /// templates against in debug builds.
    fn expected_leaf(&self, pfn: Pfn, level: Level, write: LeafWrite, memtype: u64) -> Spte {
        let fmt = self.mmu.format();
        Spte((fmt.leaf(pfn, level, fault_attrs(write)).0 & !fmt.memtype_mask()) | memtype)
    }

    /// The root level's index shift.
    #[inline]
    fn root_shift(&self) -> u32 {
        self.mmu.config.root_level.shift_in_frames()
    }

    /// A fault on a gfn no memslot covers: install an MMIO SPTE tagged with the memslot generation (if
    /// the format caches MMIO) and hand the access to the VMM.
    #[cold]
    #[inline(never)]
    fn no_slot_fault(&self, cache: &mut PageCache, root: &RootRef, gfn: Gfn) -> FaultOutcome {
        let mmu = self.mmu;
        if !root.is_valid() {
            return FaultOutcome::ReloadRoot;
        }
        let Some(mmio) = mmu.format().mmio(gfn, self.slots.generation()) else {
            return FaultOutcome::Emulate(EmulateReason::Mmio);
        };
        match self.map(
            cache,
            root,
            Target { as_id: root.as_id(), gfn, level: Level::L1, spte: mmio, nx_track: 0 },
        ) {
            FaultOutcome::Fixed => {
                Stats::bump(&mmu.stats.mmio_sptes_created);
                mmu.host.mmio_spte_installed(root.as_id(), gfn);
                FaultOutcome::Emulate(EmulateReason::Mmio)
            }
            FaultOutcome::Spurious => FaultOutcome::Emulate(EmulateReason::Mmio),
            other => other,
        }
    }

    /// The largest level at which `gfn` may be mapped (KVM's `kvm_mmu_hugepage_adjust`).
    #[inline]
    fn goal_level(&self, slot: &Memslot, gfn: Gfn, pfn: Pfn, host_level: Level) -> Level {
        if slot.is_dirty_logged() || host_level == Level::L1 {
            return Level::L1;
        }
        let tracking = !self.slots.write_track().is_empty();
        self.huge_goal_level(slot, gfn, pfn, host_level, tracking)
    }

    /// The NX huge-page mitigation, when it is on, on a goal `level` (KVM's `kvm_mmu_hugepage_adjust`
    /// with `huge_page_disallowed`, and `disallowed_hugepage_adjust`): a fetch maps 4 KiB, and the
    /// tables it links up to `level` are tracked (the returned number); any other access maps huge, but
    /// below a table a fetch linked. The caller makes a huge leaf non-executable.
    #[cold]
    #[inline(never)]
    fn nx_goal(&self, root: &RootRef, gfn: Gfn, level: Level, exec: bool) -> (Level, u8) {
        if level == Level::L1 {
            return (level, 0);
        }
        if exec {
            return (Level::L1, level as u8);
        }
        (self.mmu.nx_disallowed_adjust(root.pfn(), gfn, level), 0)
    }

    /// Whether a write-tracked gfn lies in `[start, start + pages)` of `as_id`: no huge leaf may cover
    /// it. Out of line: only a VM that tracks something asks.
    #[cold]
    #[inline(never)]
    fn any_tracked_in(&self, as_id: AsId, start: Gfn, pages: u64) -> bool {
        self.slots.write_track().any_in(as_id, start, pages)
    }

    /// [`SharedMmu::goal_level`] when the host maps the page huge and the slot is not logged: the
    /// largest level, from the smaller of the host's and the format's, whose aligned block around `gfn`
    /// lies in the slot ([`Memslot::allows_huge`]) and maps frames aligned like the gfns. Written on
    /// index shifts (one mask per level), as it runs on every huge fault.
    #[inline]
    fn huge_goal_level(
        &self,
        slot: &Memslot,
        gfn: Gfn,
        pfn: Pfn,
        host_level: Level,
        tracking: bool,
    ) -> Level {
        let mut level = host_level.min(self.mmu.format().max_leaf_level());
        while let Some(lower) = level.lower() {
            let mask = level.pages() - 1;
            // No write-tracked gfn below a huge leaf.
            if huge_fits(slot, gfn, pfn, mask)
                && !(tracking && self.any_tracked_in(slot.as_id, Gfn(gfn.0 & !mask), mask + 1))
            {
                debug_assert!(slot.allows_huge(gfn, level));
                return level;
            }
            level = lower;
        }
        Level::L1
    }

    /// An EPT misconfiguration / NPF-RSVD exit: emulate if it hit a current MMIO SPTE. `None` sends a
    /// stale MMIO SPTE down the normal path, which replaces it.
    #[cold]
    #[inline(never)]
    fn mmio_fault(&self, root: &RootRef, gfn: Gfn) -> Result<Option<FaultOutcome>, FaultError> {
        let mmu = self.mmu;
        let fmt = mmu.format();
        let _walk = mmu.host.begin_walk();
        let (_, level, spte) = mmu.walk_gfn(root.pfn(), gfn).leaf(gfn);
        if fmt.is_mmio(spte) {
            if fmt.mmio_generation_matches(spte, self.slots.generation()) && fmt.mmio_gfn(spte) == gfn {
                return Ok(Some(FaultOutcome::Emulate(EmulateReason::Mmio)));
            }
            return Ok(None);
        }
        if let Err(cause) = fmt.check(spte, level) {
            return Err(FaultError::Misconfig { gfn, spte, cause });
        }
        // The MMIO SPTE went away after the exit (zapped or replaced): just re-execute.
        Ok(Some(FaultOutcome::Retry))
    }

    /// Walks from `root` down to `target`'s level, linking or splitting tables, and installs its SPTE
    /// there (KVM's `kvm_tdp_mmu_map`). See [`SharedMmu::map_from`].
    fn map(&self, cache: &mut PageCache, root: &RootRef, target: Target) -> FaultOutcome {
        let mmu = self.mmu;
        // Keeps every table this walk can reach allocated until it returns.
        let _walk = mmu.host.begin_walk();
        let from_root =
            GfnWalk { table: mmu.host.table(root.pfn()), shift: self.root_shift(), pfn: root.pfn() };
        self.map_from(cache, from_root, target)
    }

    /// Walks from `walk`'s table (on the target gfn's path, at or above the target level) down to the
    /// target level, linking or splitting tables, and installs the target SPTE there. The caller holds
    /// a walk guard.
    ///
    /// It continues the single-gfn walk of [`Mmu::walk_gfn`] (one load per level, one compare-exchange
    /// per change); linking and splitting are out of line, since a fault needs them for at most a few
    /// of its levels and most faults for none.
    #[inline(always)]
    fn map_from(&self, cache: &mut PageCache, walk: GfnWalk<'a>, target: Target) -> FaultOutcome {
        let mmu = self.mmu;
        let Target { as_id, gfn, level: goal, nx_track, .. } = target;
        let goal_shift = goal.shift_in_frames();
        let (mut table, mut shift) = (walk.table, walk.shift);
        debug_assert!(goal_shift <= shift, "the walk starts at or above its goal");
        loop {
            let entry = &table[((gfn.0 >> shift) & 0x1ff) as usize];
            // Acquire pairs with the Release of the compare-exchange that linked a child table here.
            let old = Spte(entry.load(Ordering::Acquire));
            if shift == goal_shift {
                return self.install(entry, old, &target);
            }
            // Above the goal (so at level 2 or more) a present entry is a table unless PS says leaf.
            let child = if old.is_present() && !old.is_large() {
                old.pfn()
            } else {
                match self.link_table(cache, entry, old, Links { as_id, gfn, nx_track }, shift) {
                    Ok(child) => child,
                    Err(outcome) => return outcome,
                }
            };
            table = mmu.host.table(child);
            shift -= BITS_PER_LEVEL;
        }
    }

    /// Installs the target's SPTE in `entry` (at the goal level, holding `old`), flushing if the old value
    /// was a table or a leaf with more rights, another frame or the Dirty bit.
    #[inline(always)]
    fn install(&self, entry: &AtomicU64, old: Spte, target: &Target) -> FaultOutcome {
        let Target { as_id, level, spte: new, .. } = *target;
        let gfn = target.gfn.align_down(level);
        let mmu = self.mmu;
        let fmt = mmu.format();
        if !old.is_present() && new.is_present() && new.is_leaf(level) {
            // The common case of a fault, kept short: a leaf appears where nothing was. The frozen value
            // is not present, so it is caught here; nothing is stale (nothing was mapped), so no flush.
            if fmt.is_frozen(old) {
                return FaultOutcome::Retry;
            }
            return match self.cmpxchg_new_leaf(as_id, entry, old, new, gfn, level) {
                Ok(()) => FaultOutcome::Fixed,
                Err(_) => FaultOutcome::Retry,
            };
        }
        if fmt.is_frozen(old) {
            return FaultOutcome::Retry;
        }
        // A leaf that already allows all the new one would: another vCPU's fault mapped the gfn after this
        // vCPU saw it unmapped, so the access is allowed (KVM's "spurious if the access is already
        // allowed"; the new leaf allows the access, so this is the same or stricter). Replacing it would
        // throw away what has happened since: a read fault's clean leaf over a writer's dirty one, with
        // no flush, leaves the writer's TLB entry dirty over a clean leaf, and its next writes unlogged.
        if old == new || (old.is_present() && old.is_leaf(level) && fmt.access(old).contains(fmt.access(new)))
        {
            return FaultOutcome::Spurious;
        }
        if mmu.cmpxchg_spte(as_id, entry, old, new, gfn, level).is_err() {
            return FaultOutcome::Retry;
        }
        // Replacing a table with a huge leaf freed the subtree: drop the paging-structure caches and
        // leaves that pointed into it. A leaf that changed frame or lost rights is likewise stale, and so
        // is one that loses its Dirty bit (a TLB entry may cache it dirty). A leaf that only gained
        // rights needs no flush: hardware re-walks on a permission fault.
        let stale = old.is_present()
            && (old.is_table(level)
                || old.pfn() != new.pfn()
                || !fmt.access(new).contains(fmt.access(old))
                || (fmt.is_dirty(old) && !fmt.is_dirty(new)));
        if stale {
            Flush::range(as_id, gfn, level.pages()).run(&mmu.host);
        }
        FaultOutcome::Fixed
    }

    /// Replaces `entry` (holding `old`: non-present, or a huge leaf bigger than wanted) with a new table
    /// from `cache` and returns the table. `Err` carries the outcome to return: [`FaultOutcome::Retry`]
    /// when the entry is frozen by another writer, the cache is empty or the compare-exchange lost.
    /// `gfn` is the faulting gfn and `shift` the entry's level as its index shift.
    #[inline(never)]
    fn link_table(
        &self,
        cache: &mut PageCache,
        entry: &AtomicU64,
        old: Spte,
        links: Links,
        shift: u32,
    ) -> Result<Pfn, FaultOutcome> {
        let Links { as_id, gfn, nx_track } = links;
        let mmu = self.mmu;
        let fmt = mmu.format();
        let level = Level::new((shift / BITS_PER_LEVEL + 1) as u8).expect("the walk stays within L1-L5");
        let gfn = gfn.align_down(level);
        if fmt.is_frozen(old) {
            return Err(FaultOutcome::Retry);
        }
        let Some(child) = cache.take() else {
            return Err(FaultOutcome::Retry);
        };
        let table = mmu.host.table(child);
        let splitting = old.is_present();
        if splitting {
            mmu.fill_split_children(child, old, level);
        }
        if mmu.cmpxchg_spte(as_id, entry, old, fmt.nonleaf(child), gfn, level).is_err() {
            // Never published: reset and keep it for the next fault.
            if splitting {
                for e in table {
                    e.store(fmt.nonpresent().0, Ordering::Relaxed);
                }
            }
            if let Err(pfn) = cache.put_back(child) {
                mmu.host.free_table_now(pfn);
            }
            return Err(FaultOutcome::Retry);
        }
        if splitting {
            mmu.count_split(as_id, gfn, level);
        }
        if level as u8 <= nx_track {
            mmu.nx.track(child, as_id, gfn, level);
        }
        Ok(child)
    }
}

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// The leaf currently mapping `gfn` in `root` and its level, if any (for checkers and tests).
    pub fn lookup(&self, root: &RootRef, gfn: Gfn) -> Option<(Spte, Level)> {
        self.lookup_in(root.pfn(), gfn)
    }
}

/// Whether a leaf covering the `mask + 1` pages around `gfn` (aligned) may map `gfn` to `pfn` in `slot`:
/// the block lies in the slot ([`Memslot::allows_huge`]), and the slot's gfns and host pages, and `gfn`
/// and `pfn`, are aligned alike within it.
#[inline(always)]
fn huge_fits(slot: &Memslot, gfn: Gfn, pfn: Pfn, mask: u64) -> bool {
    let start = gfn.0 & !mask;
    let misaligned = (slot.base_gfn.0 ^ (slot.host_base >> crate::addr::PAGE_SHIFT)) | (pfn.0 ^ gfn.0);
    start >= slot.base_gfn.0 && start + mask < slot.base_gfn.0 + slot.pages && misaligned & mask == 0
}
