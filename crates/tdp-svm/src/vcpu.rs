//! One vCPU's SVM state and exit path: its ASID and the flush it owes ([`SvmVcpu`]), VMRUN with
//! TLB_CONTROL set from the VM's flush requests, #NPF exits handed to `tdp-core`'s fault handler
//! ([`handle_exit`]), a loop that keeps the guest running while the exits are the MMU's ([`run`]), and
//! loading a root's nCR3 into the VMCB ([`install_root`]).
//!
//! Dirty logging: AMD has no page-modification log, so the MMU runs with `pml: false` and logs by write
//! protection: a logged slot's leaves lose W, the guest's first write to each page takes a #NPF with
//! the present and write bits, and the fault path marks the page into the vCPU's [`tdp_core::host::DirtySink`]
//! (a dirty ring through [`crate::host::RingSink`]) as it gives W back. The nested A/D bits the CPU sets
//! serve aging (`tdp-core`'s age operations), not dirty logging.

use lock_api::RawRwLock;
use tdp_core::addr::Gpa;
use tdp_core::fault::AccessKind;
use tdp_core::host::{AllocError, DirtySink, Host};
use tdp_core::mmu::{EmulateReason, FaultError, FaultOutcome, Mmu, MmuConfig, RootRef, VcpuMmu};

use crate::asid::{Asid, TlbControl};
use crate::caps::NptFeatures;
use crate::exit::{ExitError, SvmExit, read_exit};
use crate::flush::AsidFlush;
use crate::instr::{GuestRegs, SvmInstructions};
use crate::ncr3::{NestedCr3, NestedCr3Error};
use crate::vmcb::{NP_ENABLE, Vmcb};

/// A vCPU's TLB state: its ASID, the flush generation its last VMRUN flushed at, and whether it owes
/// itself a flush (a new nested root).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvmVcpu {
    asid: Asid,
    seen: u64,
    local_flush: bool,
}

impl SvmVcpu {
    /// A vCPU tagged with `asid`, current with `flush`'s requests so far (a new ASID holds no
    /// translations).
    #[must_use]
    pub fn new(asid: Asid, flush: &AsidFlush) -> SvmVcpu {
        SvmVcpu { asid, seen: flush.generation(), local_flush: false }
    }

    /// The vCPU's ASID.
    #[must_use]
    pub const fn asid(&self) -> Asid {
        self.asid
    }

    /// The flush generation ([`AsidFlush::generation`]) this vCPU's last flushing VMRUN honoured: every
    /// flush the MMU asked for up to it reached this vCPU's TLB.
    #[must_use]
    pub const fn flushed_generation(&self) -> u64 {
        self.seen
    }

    /// Asks for a flush of this vCPU's ASID at its next VMRUN (after loading a new root, as KVM's
    /// `kvm_mmu_load` flushes the current context).
    pub fn request_flush(&mut self) {
        self.local_flush = true;
    }

    /// Writes the ASID and TLB_CONTROL for the next VMRUN: the flush value of `flush` when a flush was
    /// requested since this vCPU's last flush (or locally), else no flush. Returns what it wrote.
    pub fn prepare_entry(&mut self, vmcb: &mut Vmcb, flush: &AsidFlush) -> TlbControl {
        let now = flush.generation();
        let control = if now != self.seen || self.local_flush {
            self.seen = now;
            self.local_flush = false;
            flush.count_entry_flush();
            flush.flush_one()
        } else {
            TlbControl::DoNothing
        };
        vmcb.control.guest_asid = self.asid.raw();
        vmcb.control.tlb_control = control.raw();
        control
    }

    /// Resets TLB_CONTROL after a #VMEXIT, so the next VMRUN flushes only if asked again (the CPU
    /// leaves the field as it was; Linux resets it in `svm_vcpu_run`).
    pub fn after_exit(&mut self, vmcb: &mut Vmcb) {
        vmcb.control.tlb_control = TlbControl::DoNothing.raw();
    }

    /// One VMRUN: [`SvmVcpu::prepare_entry`], [`SvmInstructions::vmrun`], [`SvmVcpu::after_exit`].
    pub fn enter(
        &mut self,
        svm: &impl SvmInstructions,
        vmcb: &mut Vmcb,
        regs: &mut GuestRegs,
        flush: &AsidFlush,
    ) {
        self.prepare_entry(vmcb, flush);
        svm.vmrun(vmcb, regs);
        self.after_exit(vmcb);
    }
}

/// What the hypervisor does after [`handle_exit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitAction {
    /// VMRUN again: the fault was fixed, was spurious or lost a race.
    Resume,
    /// The vCPU's root was invalidated: load a new one ([`install_root`]), then VMRUN.
    ReloadRoot,
    /// The access cannot be mapped: emulate it (MMIO, or a write to a read-only slot).
    Emulate {
        /// The guest-physical address accessed.
        gpa: Gpa,
        /// What the guest tried.
        access: AccessKind,
        /// Why.
        reason: EmulateReason,
    },
    /// VMRUN refused the VMCB (`VMEXIT_INVALID`): the guest never ran.
    EntryFailed,
    /// Not an MMU exit: the hypervisor handles it (HLT, VMMCALL, I/O, ...), by its EXITCODE.
    Unhandled(u64),
}

/// What [`handle_exit`] saw and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitReport {
    /// The decoded exit.
    pub exit: SvmExit,
    /// What to do next.
    pub action: ExitAction,
}

/// An exit could not be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The exit could not be decoded.
    #[error("decoding the exit: {0}")]
    Exit(#[from] ExitError),
    /// The MMU could not handle the fault (the tables are consistent).
    #[error("handling the nested page fault: {0}")]
    Fault(#[from] FaultError),
    /// The vCPU has no root loaded ([`tdp_core::mmu::Mmu::load_root`] first).
    #[error("the vCPU has no root loaded")]
    NoRoot,
}

/// Handles the #VMEXIT in `vmcb` of the vCPU running on `vcpu`'s root: a #NPF goes to
/// [`Mmu::handle_fault`] with `sink` (write-protection dirty logging marks pages there), anything else
/// is reported for the hypervisor.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// use tdp_core::mmu::{EmulateReason, Mmu, VcpuMmu};
/// use tdp_svm::caps::SvmCapabilities;
/// use tdp_svm::exit::code;
/// use tdp_svm::fake::{bochs, FakeSvm};
/// use tdp_svm::host::{IdentityRegion, IdentityTranslate, PhysRange, SvmHost, TableFrames, TablePage};
/// use tdp_svm::vcpu::{handle_exit, ExitAction};
/// use tdp_svm::vmcb::Vmcb;
///
/// let npt = SvmCapabilities::read(&FakeSvm::new(bochs::RYZEN)).npt_features()?;
/// let mut pages: Vec<TablePage> = (0..16).map(|_| TablePage::new()).collect();
/// let ram = [PhysRange { start: 0x100_0000, end: 0x120_0000 }];
/// let host = SvmHost::new(TableFrames::new(IdentityRegion::from_pages(&mut pages))?,
///                         IdentityTranslate::new(&ram, Level::L2), &npt);
/// let mmu: Mmu<_> = Mmu::new(host, npt.mmu_config())?;
/// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, 0x100_0000, SlotFlags::empty()))?;
/// let mut vcpu = VcpuMmu::new();
/// mmu.load_root(&mut vcpu, AsId(0))?;
///
/// let mut vmcb = Vmcb::new();
/// vmcb.control.exit_code = code::NPF;
/// (vmcb.control.exit_info1, vmcb.control.exit_info2) = (0x1_0000_0006, 0x1000); // write to RAM: mapped
/// assert_eq!(handle_exit(&vmcb, &mmu, &mut vcpu, &mut ())?.action, ExitAction::Resume);
/// (vmcb.control.exit_info1, vmcb.control.exit_info2) = (0x1_0000_0004, 0xfee0_0030); // the APIC: no slot
/// let mmio = ExitAction::Emulate { gpa: Gpa(0xfee0_0030), access: AccessKind::Read, reason: EmulateReason::Mmio };
/// assert_eq!(handle_exit(&vmcb, &mmu, &mut vcpu, &mut ())?.action, mmio);
/// mmu.release_vcpu(&mut vcpu);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`HandleError`]; after any of them the MMU's tables are consistent.
pub fn handle_exit<H: Host, R: RawRwLock>(
    vmcb: &Vmcb,
    mmu: &Mmu<H, R>,
    vcpu: &mut VcpuMmu,
    sink: &mut dyn DirtySink,
) -> Result<ExitReport, HandleError> {
    let as_id = vcpu.root().ok_or(HandleError::NoRoot)?.as_id();
    let exit = read_exit(vmcb, as_id)?;
    let fault = match exit {
        SvmExit::Npf(npf) => npf.fault,
        SvmExit::Invalid => return Ok(ExitReport { exit, action: ExitAction::EntryFailed }),
        SvmExit::Other(code) => return Ok(ExitReport { exit, action: ExitAction::Unhandled(code) }),
    };
    let action = match mmu.handle_fault(vcpu, fault, sink)? {
        FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry => ExitAction::Resume,
        FaultOutcome::ReloadRoot => ExitAction::ReloadRoot,
        FaultOutcome::Emulate(reason) => ExitAction::Emulate { gpa: fault.gpa, access: fault.access, reason },
    };
    Ok(ExitReport { exit, action })
}

/// Why [`run`] stopped without a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// An exit could not be handled.
    #[error(transparent)]
    Handle(#[from] HandleError),
    /// No table page for a new root.
    #[error("reloading the root: {0}")]
    LoadRoot(#[from] AllocError),
    /// A new root could not be installed.
    #[error("installing the new root: {0}")]
    Root(#[from] RootError),
    /// The guest kept taking MMU exits for `max_exits` VMRUNs.
    #[error("no exit for the hypervisor after {max_exits} VMRUNs")]
    TooManyExits {
        /// The limit given.
        max_exits: u64,
    },
}

/// Everything [`run`] works on besides the MMU and the VMCB.
pub struct RunContext<'a> {
    /// The vCPU's MMU state.
    pub mmu_vcpu: &'a mut VcpuMmu,
    /// The vCPU's TLB state.
    pub svm_vcpu: &'a mut SvmVcpu,
    /// The guest's registers.
    pub regs: &'a mut GuestRegs,
    /// The nested-paging features (for root reloads).
    pub features: &'a NptFeatures,
    /// Called with every exit and what [`handle_exit`] made of it (tracing, counters).
    pub observe: &'a mut dyn FnMut(&Vmcb, &ExitReport),
}

impl core::fmt::Debug for RunContext<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RunContext")
            .field("mmu_vcpu", &self.mmu_vcpu)
            .field("svm_vcpu", &self.svm_vcpu)
            .field("regs", &self.regs)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// The exit loop: VMRUN, decode, let the MMU fix #NPFs and reload invalidated roots, and VMRUN again,
/// until an exit the hypervisor must handle (returned), a dirty sink that asks the vCPU to exit
/// (`must_exit`, checked after every exit: e.g. [`crate::host::RingSink::must_exit`]), or `max_exits`
/// VMRUNs. `flush` is the MMU host's [`AsidFlush`].
///
/// # Errors
/// [`RunError`]; the MMU's tables are consistent after any of them.
#[allow(clippy::too_many_arguments)]
pub fn run<H: Host, R: RawRwLock, S: DirtySink>(
    svm: &impl SvmInstructions,
    mmu: &Mmu<H, R>,
    flush: &AsidFlush,
    vmcb: &mut Vmcb,
    cx: &mut RunContext<'_>,
    sink: &mut S,
    must_exit: impl Fn(&S) -> bool,
    max_exits: u64,
) -> Result<ExitReport, RunError> {
    for _ in 0..max_exits {
        cx.svm_vcpu.enter(svm, vmcb, cx.regs, flush);
        let report = handle_exit(vmcb, mmu, cx.mmu_vcpu, sink)?;
        (cx.observe)(vmcb, &report);
        match report.action {
            ExitAction::Resume if !must_exit(sink) => {}
            ExitAction::ReloadRoot => {
                let as_id = cx.mmu_vcpu.root().ok_or(HandleError::NoRoot)?.as_id();
                mmu.load_root(cx.mmu_vcpu, as_id)?;
                let root = cx.mmu_vcpu.root().ok_or(HandleError::NoRoot)?;
                install_root(vmcb, cx.svm_vcpu, cx.features, mmu.config(), root)?;
                if must_exit(sink) {
                    return Ok(report);
                }
            }
            _ => return Ok(report),
        }
    }
    Err(RunError::TooManyExits { max_exits })
}

/// Loading a root failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// The nCR3 cannot be built for this CPU.
    #[error("building nCR3: {0}")]
    NestedCr3(#[from] NestedCr3Error),
}

/// Makes `root` the vCPU's nested root: writes its nCR3 and NP_ENABLE into the VMCB, and asks for a
/// flush of the vCPU's ASID at the next VMRUN (translations cached under the old root must go).
///
/// ```
/// use tdp_core::addr::{AsId, Level};
/// use tdp_core::mmu::{Mmu, VcpuMmu};
/// use tdp_svm::asid::{AsidAllocator, TlbControl};
/// use tdp_svm::caps::SvmCapabilities;
/// use tdp_svm::fake::{bochs, FakeSvm};
/// use tdp_svm::host::{IdentityRegion, IdentityTranslate, SvmHost, TableFrames, TablePage};
/// use tdp_svm::vcpu::{install_root, SvmVcpu};
/// use tdp_svm::vmcb::Vmcb;
///
/// let npt = SvmCapabilities::read(&FakeSvm::new(bochs::PHENOM_8650_TOLIMAN)).npt_features()?;
/// # // This example's "physical" memory is the test process's heap, above Bochs's 40-bit limit.
/// # let npt = tdp_svm::caps::NptFeatures { phys_bits: 48, ..npt };
/// let mut pages: Vec<TablePage> = (0..8).map(|_| TablePage::new()).collect();
/// let host = SvmHost::new(TableFrames::new(IdentityRegion::from_pages(&mut pages))?,
///                         IdentityTranslate::new(&[], Level::L1), &npt);
/// let mmu: Mmu<_> = Mmu::new(host, npt.mmu_config())?;
/// let mut vcpu = VcpuMmu::new();
/// let root = mmu.load_root(&mut vcpu, AsId(0))?;
/// let mut svm_vcpu = SvmVcpu::new(AsidAllocator::new(npt.asids).alloc()?, &mmu.host().tlb);
/// let mut vmcb = Vmcb::new();
/// let ncr3 = install_root(&mut vmcb, &mut svm_vcpu, &npt, mmu.config(), vcpu.root().ok_or("no root")?)?;
/// assert_eq!((ncr3.root(), vmcb.control.n_cr3, vmcb.nested_paging()), (root, ncr3.raw(), true));
/// // Phenom has no flush-by-ASID: the new root's first VMRUN flushes everything.
/// assert_eq!(svm_vcpu.prepare_entry(&mut vmcb, &mmu.host().tlb), TlbControl::FlushAll);
/// mmu.release_vcpu(&mut vcpu);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`RootError`]; the VMCB is unchanged then.
pub fn install_root(
    vmcb: &mut Vmcb,
    vcpu: &mut SvmVcpu,
    features: &NptFeatures,
    config: &MmuConfig,
    root: &RootRef,
) -> Result<NestedCr3, RootError> {
    let ncr3 = NestedCr3::new(features, config, root.pfn())?;
    vmcb.control.n_cr3 = ncr3.raw();
    vmcb.control.np_control |= NP_ENABLE;
    vcpu.request_flush();
    Ok(ncr3)
}

#[cfg(test)]
mod tests;
