//! [`Vcpu`]: a simulated virtual CPU running the hardware loop on a shared `Mmu<MockHost>`: TLB lookup,
//! page walk, exit, the core's fault handler, re-execution. It plays both the processor and the part of
//! the hypervisor that reacts to exits (root loads with a TLB flush of the new root, as KVM's
//! `kvm_mmu_load` does).
//!
//! With PML (`MmuConfig::pml`), the vCPU owns a [`Pml`] that its walks fill, and plays KVM's part in
//! draining it (`vmx_flush_pml_buffer`): on a log-full exit, on every exit before the fault handler
//! runs (KVM flushes the log in `vmx_handle_exit`), and on demand ([`Vcpu::flush_pml`], what KVM's kick
//! before a dirty-log read achieves). Drained GPAs become marks in the vCPU's [`DirtySink`].
//!
//! Checks: I2 at run time (a walk that reaches a freed table is an error, never a read of poison),
//! forward progress (an access that needs more than [`MAX_ROUNDS`] exits is reported as a livelock),
//! and I4's hardware half: a write retires from the TLB only through an entry marked dirty, and an
//! access that cannot be logged (log full) does not retire until the log is drained.

use std::sync::Arc;

use tdp_core::addr::{AsId, Gpa, Level, PAGE_SIZE, Pfn};
use tdp_core::fault::{AccessKind, DecodeError, Fault};
use tdp_core::host::AllocError;
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::mmu::{EmulateReason, FaultError, FaultOutcome, Mmu, PageCache, RootRef, VcpuMmu};
use tdp_core::spte::{Access, TdpKind};

use crate::host::MockHost;
use crate::pml::{DrainedGpa, Pml};
use crate::tlb::{Tlb, TlbEntry};
use crate::walker::{Hardware, WalkOutcome, access_right, npf_reserved_code, walk_access};

/// Exits one access may take before it is reported as [`VcpuError::Livelock`].
pub const MAX_ROUNDS: usize = 64;

/// How an access completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// The access retired through a translation.
    Done {
        /// The 4 KiB host frame accessed.
        pfn: Pfn,
        /// The rights of the translation used.
        rights: Access,
        /// The translation came from the TLB (no walk).
        from_tlb: bool,
    },
    /// The fault handler asked for emulation (MMIO, or a write to a read-only slot).
    Emulated(EmulateReason),
}

/// Why an access could not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// No table page for the vCPU's root.
    #[error("no table page for a root: {0}")]
    Root(#[from] AllocError),
    /// The fault handler failed.
    #[error("the fault handler failed: {0}")]
    Fault(#[from] FaultError),
    /// The walker produced exit data the core cannot decode (a bug in the mock).
    #[error("exit data could not be decoded: {0}")]
    Decode(#[from] DecodeError),
    /// The walk reached a freed table page: an I2 violation.
    #[error("I2 violation: the walk reached freed table page {pfn:?}")]
    FreedTable {
        /// The freed frame.
        pfn: Pfn,
    },
    /// The access took more than [`MAX_ROUNDS`] exits.
    #[error("no forward progress at {gpa:?} after {MAX_ROUNDS} exits")]
    Livelock {
        /// The address.
        gpa: Gpa,
    },
    /// A data helper ([`Vcpu::read_u64`], [`Vcpu::write_u64`]) hit an access that needs emulation.
    #[error("the access at {gpa:?} needs emulation ({reason:?})")]
    Emulate {
        /// The address.
        gpa: Gpa,
        /// Why.
        reason: EmulateReason,
    },
    /// A data helper was given an address that is not 8-byte aligned.
    #[error("{gpa:?} is not 8-byte aligned")]
    Unaligned {
        /// The address.
        gpa: Gpa,
    },
}

/// A walk that did not translate: the exit it causes.
enum Exit {
    /// The root was invalidated: reload before walking (no exit; KVM's request at VM entry).
    Reload,
    Violation(u64),
    Misconfig,
    FreedTable(Pfn),
    /// A page-modification log-full exit: drain the log and re-execute.
    PmlFull,
}

/// A simulated vCPU. It is `Send`: tests run vCPUs on threads over an `Arc<Mmu<MockHost>>`.
///
/// Before it is dropped, [`Vcpu::release`] must return its root reference and page cache; a vCPU
/// dropped without it leaks pages, which `check_tables` reports.
pub struct Vcpu {
    id: u32,
    as_id: AsId,
    /// The MMU's per-vCPU state: root, page cache, fault counters, memslot hint.
    mmu: VcpuMmu,
    tlb: Arc<Tlb>,
    hw: Hardware,
    root_level: Level,
    /// Where the fault handler's dirty marks and the drained PML entries go (this vCPU's ring, or the
    /// VM's bitmaps); none by default.
    dirty: Box<dyn DirtySink + Send>,
    /// The page-modification log, when the MMU is configured for PML.
    pml: Option<Pml>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .field("as_id", &self.as_id)
            .field("mmu", &self.mmu)
            .field("hw", &self.hw)
            .field("pml", &self.pml)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// A vCPU of `mmu`'s VM in address space `as_id`, with its TLB registered with the host, and an
    /// empty page-modification log when `mmu` is configured for PML on EPT (AMD has none).
    pub fn new(id: u32, as_id: AsId, mmu: &Mmu<MockHost>) -> Vcpu {
        let tlb = Arc::new(Tlb::new());
        mmu.host().register_tlb(Arc::clone(&tlb));
        Vcpu {
            id,
            as_id,
            mmu: VcpuMmu::new(),
            tlb,
            hw: Hardware::for_config(mmu.config()),
            root_level: mmu.config().root_level,
            dirty: Box::new(()),
            // Only Intel logs: the AMD APM (rev. 3.41) has no page-modification log, so an NPT MMU
            // configured for PML gets none, and the writes it leaves to a log are lost (as on hardware).
            pml: (mmu.config().pml && mmu.config().format.kind() == TdpKind::Ept).then(Pml::new),
        }
    }

    /// Sends the dirty marks of this vCPU's faults and drained PML entries to `sink` (a dirty ring
    /// producer, a bitmap set). Drain the log first ([`Vcpu::flush_pml`]) if it should go to the old one.
    pub fn set_dirty_sink(&mut self, sink: Box<dyn DirtySink + Send>) {
        self.dirty = sink;
    }

    /// The vCPU's id.
    pub fn id(&self) -> u32 {
        self.id
    }
    /// The address space it runs in.
    pub fn as_id(&self) -> AsId {
        self.as_id
    }
    /// Its current root, once one is loaded.
    pub fn root(&self) -> Option<&RootRef> {
        self.mmu.root()
    }
    /// Its page cache.
    pub fn cache(&self) -> &PageCache {
        self.mmu.cache()
    }
    /// Its MMU state (fault counters among it).
    pub fn mmu_state(&self) -> &VcpuMmu {
        &self.mmu
    }
    /// Its TLB.
    pub fn tlb(&self) -> &Tlb {
        &self.tlb
    }
    /// The hardware it simulates.
    pub fn hardware(&self) -> Hardware {
        self.hw
    }
    /// Its page-modification log (`None` without PML).
    pub fn pml(&self) -> Option<&Pml> {
        self.pml.as_ref()
    }

    /// Drains the page-modification log into the dirty sink (KVM's `vmx_flush_pml_buffer`, which runs on
    /// every exit and, through a kick, before every dirty-log read): each GPA in a dirty-logged memslot
    /// of the vCPU's address space becomes a mark; GPAs without a slot, or in a slot that is no longer
    /// logged, are dropped and counted in [`Pml::stats`]. Returns the marks made. Without PML it does
    /// nothing.
    ///
    /// A harvest must follow this on every vCPU: writes whose GPAs still sit in a log are not in the
    /// sink yet. It takes the MMU lock for read, so the caller must not hold an MMU guard.
    pub fn flush_pml(&mut self, mmu: &Mmu<MockHost>) -> usize {
        let Some(pml) = self.pml.as_mut() else {
            return 0;
        };
        if pml.is_empty() {
            return 0;
        }
        let gpas = pml.drain();
        let shared = mmu.read();
        let mut marked = 0;
        for gpa in gpas {
            let gfn = gpa.gfn();
            let outcome = match shared.memslots().find(self.as_id, gfn) {
                Some(slot) if slot.is_dirty_logged() => {
                    self.dirty.mark_dirty(slot, gfn, DirtySource::HardwareLog);
                    marked += 1;
                    DrainedGpa::Marked
                }
                Some(_) => DrainedGpa::NotLogged,
                None => DrainedGpa::NoSlot,
            };
            pml.count_drained(outcome);
        }
        marked
    }

    /// Performs one guest access to `gpa`: TLB, walk, and as many exits and fault-handler calls as the
    /// access needs. A root is loaded first if the vCPU has none or its root was invalidated (KVM's
    /// `KVM_REQ_MMU_FREE_OBSOLETE_ROOTS` at VM entry).
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::fault::AccessKind;
    /// use tdp_core::memslot::SlotFlags;
    /// use tdp_core::mmu::{EmulateReason, MmuConfig};
    /// use tdp_mock::{AccessResult, HostConfig, Machine};
    ///
    /// let m = Machine::new(MmuConfig::EPT, HostConfig::default())?;
    /// m.mmu().write().insert_memslot(m.ram_slot(AsId(0), SlotId(0), Gfn(0), 1024, SlotFlags::empty()))?;
    /// let mut vcpu = m.new_vcpu(AsId(0));
    /// let first = vcpu.access(m.mmu(), Gpa(0x1008), AccessKind::Write)?;
    /// assert!(matches!(first, AccessResult::Done { from_tlb: false, .. }));
    /// let again = vcpu.access(m.mmu(), Gpa(0x1010), AccessKind::Read)?;
    /// assert!(matches!(again, AccessResult::Done { from_tlb: true, .. }));
    /// let mmio = vcpu.access(m.mmu(), Gpa(0x1000_0000), AccessKind::Read)?;
    /// assert_eq!(mmio, AccessResult::Emulated(EmulateReason::Mmio));
    /// vcpu.release(m.mmu());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`VcpuError`]: the fault handler's error, a root that cannot be allocated, a walk into a freed
    /// table, or no progress after [`MAX_ROUNDS`] exits. The tables are consistent after each.
    pub fn access(
        &mut self,
        mmu: &Mmu<MockHost>,
        gpa: Gpa,
        access: AccessKind,
    ) -> Result<AccessResult, VcpuError> {
        self.access_storing(mmu, gpa, access, None)
    }

    /// [`Vcpu::access`], and for `Some(value)` the store of `value` at `gpa` into the translated frame,
    /// done under the TLB lock with the translation, as an instruction's store retires before the
    /// processor answers a TLB shootdown: a flush that returns has no store in flight through what it
    /// flushed.
    fn access_storing(
        &mut self,
        mmu: &Mmu<MockHost>,
        gpa: Gpa,
        access: AccessKind,
        store: Option<u64>,
    ) -> Result<AccessResult, VcpuError> {
        let need = access_right(access);
        let host = mmu.host();
        let store_into = |pfn: Pfn| {
            if let Some(value) = store {
                host.write_u64(pfn, gpa.page_offset(), value);
            }
        };
        let gfn = gpa.gfn();
        self.entry_root(mmu)?;
        // A private memslot's gfn is translated through the mirror root (in a confidential VM the
        // processor walks the external tables, which `checker::check_mirror` holds equal to it).
        let private = tdp_core::host::ExternalTables::has_external_tables(host)
            && mmu.read().memslots().find(self.as_id, gfn).is_some_and(|s| s.is_private());
        for _ in 0..MAX_ROUNDS {
            let (hw, level) = (self.hw, self.root_level);
            let Some(current) = (if private { self.mmu.mirror_root() } else { self.mmu.root() }) else {
                // External tables enabled after the roots were loaded: load the mirror root too.
                self.reload_root(mmu)?;
                continue;
            };
            let root = current.pfn();
            let pml = &mut self.pml;
            let outcome = self.tlb.with_locked(|tlb| {
                // Checked under the TLB lock, which every flush takes: a flush that follows an
                // invalidation waits for this round, as KVM's kick waits for the vCPU to leave guest
                // mode, and a round after the flush sees the root invalid and reloads.
                if !mmu.root_is_valid(current) {
                    return Err(Exit::Reload);
                }
                if let Some((pfn, cached)) = tlb.lookup(root, gfn)
                    && cached.rights.contains(need)
                    && (access != AccessKind::Write || cached.dirty || !hw.sets_accessed_dirty())
                {
                    // A write through an entry not marked dirty walks again to set D, as hardware does.
                    store_into(pfn);
                    return Ok(AccessResult::Done { pfn, rights: cached.rights, from_tlb: true });
                }
                let walked = walk_access(mmu.host(), hw, root, level, gpa, access, pml.as_mut());
                match walked.outcome {
                    WalkOutcome::Translated { pfn, level, rights } => {
                        let first = Pfn(pfn.0 - (gfn.0 - gfn.align_down(level).0));
                        tlb.insert(root, gfn, TlbEntry { pfn: first, level, rights, dirty: walked.dirty });
                        store_into(pfn);
                        Ok(AccessResult::Done { pfn, rights, from_tlb: false })
                    }
                    WalkOutcome::Violation { exit } => Err(Exit::Violation(exit)),
                    WalkOutcome::Misconfig => Err(Exit::Misconfig),
                    WalkOutcome::PmlFull => Err(Exit::PmlFull),
                    WalkOutcome::FreedTable { pfn } => Err(Exit::FreedTable(pfn)),
                }
            });
            let fault = match outcome {
                Ok(done) => return Ok(done),
                Err(Exit::Reload) => {
                    self.reload_root(mmu)?;
                    continue;
                }
                Err(Exit::FreedTable(pfn)) => return Err(VcpuError::FreedTable { pfn }),
                Err(Exit::PmlFull) => {
                    // KVM's handle_pml_full does nothing itself: the flush in vmx_handle_exit emptied
                    // the log, and re-executing the access logs it.
                    if let Some(pml) = self.pml.as_mut() {
                        pml.count_full_exit();
                    }
                    self.flush_pml(mmu);
                    continue;
                }
                Err(Exit::Violation(exit)) => {
                    // Hardware drops the faulting address's translations when it reports the exit.
                    self.tlb.invalidate_gfn(gfn);
                    match self.hw.kind {
                        TdpKind::Ept => Fault::from_ept_violation(self.as_id, gpa, exit)?,
                        TdpKind::Npt => Fault::from_npf(self.as_id, gpa, exit)?,
                    }
                }
                Err(Exit::Misconfig) => match self.hw.kind {
                    TdpKind::Ept => Fault::from_ept_misconfig(self.as_id, gpa),
                    TdpKind::Npt => Fault::from_npf(self.as_id, gpa, npf_reserved_code(access))?,
                },
            };
            // Every exit drains the log before the exit is handled (KVM's vmx_handle_exit).
            self.flush_pml(mmu);
            match mmu.handle_fault(&mut self.mmu, fault, &mut *self.dirty)? {
                FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry => {}
                FaultOutcome::ReloadRoot => {
                    self.reload_root(mmu)?;
                }
                FaultOutcome::Emulate(reason) => return Ok(AccessResult::Emulated(reason)),
            }
        }
        Err(VcpuError::Livelock { gpa })
    }

    /// Writes `value` at `gpa` (8-byte aligned) through an access, returning the frame written.
    ///
    /// # Errors
    /// As [`Vcpu::access`]; [`VcpuError::Emulate`] when the access needs emulation (nothing written);
    /// [`VcpuError::Unaligned`].
    pub fn write_u64(&mut self, mmu: &Mmu<MockHost>, gpa: Gpa, value: u64) -> Result<Pfn, VcpuError> {
        self.data_access(mmu, gpa, AccessKind::Write, Some(value))
    }

    /// Reads the `u64` at `gpa` (8-byte aligned) through an access.
    ///
    /// # Errors
    /// As [`Vcpu::write_u64`].
    pub fn read_u64(&mut self, mmu: &Mmu<MockHost>, gpa: Gpa) -> Result<u64, VcpuError> {
        let pfn = self.data_access(mmu, gpa, AccessKind::Read, None)?;
        Ok(mmu.host().read_u64(pfn, gpa.page_offset()))
    }

    /// Returns the root reference and the page cache to the MMU. The vCPU may run again afterwards.
    pub fn release(&mut self, mmu: &Mmu<MockHost>) {
        mmu.release_vcpu(&mut self.mmu);
    }

    fn data_access(
        &mut self,
        mmu: &Mmu<MockHost>,
        gpa: Gpa,
        access: AccessKind,
        store: Option<u64>,
    ) -> Result<Pfn, VcpuError> {
        if !gpa.0.is_multiple_of(8) || gpa.page_offset() > PAGE_SIZE - 8 {
            return Err(VcpuError::Unaligned { gpa });
        }
        match self.access_storing(mmu, gpa, access, store)? {
            AccessResult::Done { pfn, .. } => Ok(pfn),
            AccessResult::Emulated(reason) => Err(VcpuError::Emulate { gpa, reason }),
        }
    }

    /// The root to run on at VM entry: the current one if still valid, else a fresh one.
    fn entry_root(&mut self, mmu: &Mmu<MockHost>) -> Result<Pfn, VcpuError> {
        match self.mmu.root() {
            Some(root) if mmu.root_is_valid(root) => Ok(root.pfn()),
            _ => self.reload_root(mmu),
        }
    }

    /// Puts the current root (if any) and loads one, flushing the TLB entries tagged with either: the
    /// old root's are unreachable once it is no longer loaded, and a root frame may be reused while
    /// hardware still holds translations from its previous life (KVM flushes on every root load).
    fn reload_root(&mut self, mmu: &Mmu<MockHost>) -> Result<Pfn, VcpuError> {
        if let Some(old) = self.mmu.root() {
            self.tlb.flush_root(old.pfn());
            mmu.put_root(&mut self.mmu);
        }
        let pfn = mmu.load_root(&mut self.mmu, self.as_id)?;
        self.tlb.flush_root(pfn);
        Ok(pfn)
    }
}
