//! The exit path of one vCPU, wired the way KVM's `vmx_handle_exit` does it: drain the PML log first
//! (every exit), decode the exit, hand EPT violations and misconfigurations to the MMU, and tell the
//! hypervisor what to do next ([`ExitAction`]); plus loading a root's EPTP into the VMCS.
//!
//! These are conveniences over the pieces in [`crate::pml`], [`crate::exit`] and [`crate::eptp`]; a
//! hypervisor with its own exit loop can call those directly.

use lock_api::RawRwLock;
use tdp_core::addr::Gpa;
use tdp_core::fault::AccessKind;
use tdp_core::host::{DirtySink, Host};
use tdp_core::mmu::{EmulateReason, FaultError, FaultOutcome, Mmu, MmuConfig, RootRef, VcpuMmu};

use crate::caps::EptFeatures;
use crate::eptp::{Eptp, EptpError};
use crate::exit::{ExitError, ExitReason, VmExit, read_exit};
use crate::host::InveptFlush;
use crate::instr::{VmxError, VmxInstructions};
use crate::pml::{Pml, PmlDrain, PmlError};
use crate::vmcs::VmcsField;

/// What the hypervisor does after [`handle_exit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitAction {
    /// Re-enter the guest (VMRESUME): the fault was fixed, was spurious, lost a race, or the exit was
    /// a PML-full exit whose log is now drained.
    Resume,
    /// The vCPU's root was invalidated: put it, load a new one ([`install_root`]), then re-enter.
    ReloadRoot,
    /// The access cannot be mapped: emulate it (MMIO, or a write to a read-only slot).
    Emulate {
        /// The guest-physical address accessed.
        gpa: Gpa,
        /// What the guest tried (a misconfiguration exit does not say, and reports a read).
        access: AccessKind,
        /// Why.
        reason: EmulateReason,
    },
    /// VM entry failed: the guest never ran.
    EntryFailed {
        /// The exit reason (bit 31 set).
        reason: ExitReason,
        /// The exit qualification.
        qualification: u64,
    },
    /// Not an MMU exit: the hypervisor handles it (HLT, CPUID, I/O, ...).
    Unhandled(ExitReason),
}

/// What [`handle_exit`] saw and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitReport {
    /// The decoded exit.
    pub exit: VmExit,
    /// What to do next.
    pub action: ExitAction,
    /// The PML drain done first, when the vCPU has a log.
    pub pml: Option<PmlDrain>,
}

/// An exit could not be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// Draining the PML log failed (the log is unchanged).
    #[error("draining the PML log: {0}")]
    Pml(#[from] PmlError),
    /// The exit could not be decoded.
    #[error("decoding the exit: {0}")]
    Exit(#[from] ExitError),
    /// The MMU could not handle the fault (the tables are consistent).
    #[error("handling the EPT fault: {0}")]
    Fault(#[from] FaultError),
    /// The vCPU has no root loaded ([`tdp_core::mmu::Mmu::load_root`] first).
    #[error("the vCPU has no root loaded")]
    NoRoot,
}

/// Handles one VM exit of the vCPU whose current VMCS `vmx` reads, running on `vcpu`'s root.
///
/// 1. Drains `pml` (when the vCPU has one) into `sink`, before anything else, as KVM does on every exit:
///    the marks of writes that happened before this exit go to the ring before the fault's own.
/// 2. Decodes the exit ([`read_exit`]) for the root's address space.
/// 3. EPT violation or misconfiguration: [`Mmu::handle_fault`] with `vcpu` and `sink`.
///
/// The caller then checks its sink (e.g. [`crate::ring_sink::RingSink::must_exit`]) before re-entering.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::{Memslot, SlotFlags};
/// use tdp_core::mmu::{EmulateReason, Mmu, MmuConfig, VcpuMmu};
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// use tdp_vmx::host::{BareMetalHost, IdentityTranslate, InveptFlush, PhysRange, TableFrames};
/// use tdp_vmx::raw::{IdentityRegion, TablePage};
/// use tdp_vmx::vcpu::{handle_exit, ExitAction};
///
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// let mut pages: Vec<TablePage> = (0..16).map(|_| TablePage::new()).collect();
/// let ram = [PhysRange { start: 0x100_0000, end: 0x120_0000 }];
/// let host = BareMetalHost {
///     frames: TableFrames::new(IdentityRegion::from_pages(&mut pages))?,
///     translate: IdentityTranslate::new(&ram, Level::L2),
///     tlb: InveptFlush::new(&vmx, ept.invept),
/// };
/// let mmu: Mmu<_> = Mmu::new(host, MmuConfig::EPT)?;
/// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, 0x100_0000, SlotFlags::empty()))?;
/// let mut vcpu = VcpuMmu::new();
/// mmu.load_root(&mut vcpu, AsId(0))?;
///
/// vmx.set_exit_ept_violation(0x182, 0x1000, 0x1000); // a write to RAM: mapped
/// assert_eq!(handle_exit(&vmx, &mmu, &mut vcpu, None, &mut ())?.action, ExitAction::Resume);
/// vmx.set_exit_ept_violation(0x181, 0xfee0_0030, 0); // a read of the local APIC: no slot
/// let mmio = ExitAction::Emulate { gpa: Gpa(0xfee0_0030), access: AccessKind::Read, reason: EmulateReason::Mmio };
/// assert_eq!(handle_exit(&vmx, &mmu, &mut vcpu, None, &mut ())?.action, mmio);
/// mmu.release_vcpu(&mut vcpu);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`HandleError`]; after any of them the MMU's tables and the PML log are consistent.
pub fn handle_exit<H: Host, R: RawRwLock, V: VmxInstructions>(
    vmx: &V,
    mmu: &Mmu<H, R>,
    vcpu: &mut VcpuMmu,
    pml: Option<&mut Pml<'_>>,
    sink: &mut dyn DirtySink,
) -> Result<ExitReport, HandleError> {
    let as_id = vcpu.root().ok_or(HandleError::NoRoot)?.as_id();
    let drained = match pml {
        // The read lock keeps the memslots stable for the drain; it is released before the fault
        // handler takes it again.
        Some(pml) => Some(pml.drain(vmx, mmu.read().memslots(), as_id, sink)?),
        None => None,
    };
    let exit = read_exit(vmx, as_id)?;
    let fault = match exit {
        VmExit::EptViolation(v) => v.fault,
        VmExit::EptMisconfig(fault) => fault,
        VmExit::PmlFull => return Ok(ExitReport { exit, action: ExitAction::Resume, pml: drained }),
        VmExit::EntryFailure { reason, qualification } => {
            let action = ExitAction::EntryFailed { reason, qualification };
            return Ok(ExitReport { exit, action, pml: drained });
        }
        VmExit::Other(reason) => {
            return Ok(ExitReport { exit, action: ExitAction::Unhandled(reason), pml: drained });
        }
    };
    let action = match mmu.handle_fault(vcpu, fault, sink)? {
        FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry => ExitAction::Resume,
        FaultOutcome::ReloadRoot => ExitAction::ReloadRoot,
        FaultOutcome::Emulate(reason) => ExitAction::Emulate { gpa: fault.gpa, access: fault.access, reason },
    };
    Ok(ExitReport { exit, action, pml: drained })
}

/// Loading a root's EPTP failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// The EPTP cannot be built for this CPU.
    #[error("building the EPTP: {0}")]
    Eptp(#[from] EptpError),
    /// Writing it to the VMCS failed.
    #[error("writing the EPTP: {0}")]
    Vmx(#[from] VmxError),
}

/// Makes `root` the vCPU's EPT root: builds its EPTP for `config` (checked against `features`),
/// registers it with the flusher so VM-wide flushes reach it, and writes it to the current VMCS.
/// When the vCPU had another root, retire that one's EPTP with [`InveptFlush::retire_eptp`].
///
/// ```
/// use tdp_core::addr::{AsId, Level};
/// use tdp_core::mmu::{Mmu, MmuConfig, VcpuMmu};
/// use tdp_vmx::caps::VmxCapabilities;
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// use tdp_vmx::host::{BareMetalHost, IdentityTranslate, InveptFlush, TableFrames};
/// use tdp_vmx::raw::{IdentityRegion, TablePage};
/// use tdp_vmx::vcpu::install_root;
/// use tdp_vmx::vmcs::VmcsField;
///
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let ept = VmxCapabilities::read(&vmx).ept_features()?;
/// let mut pages: Vec<TablePage> = (0..8).map(|_| TablePage::new()).collect();
/// let host = BareMetalHost {
///     frames: TableFrames::new(IdentityRegion::from_pages(&mut pages))?,
///     translate: IdentityTranslate::new(&[], Level::L1),
///     tlb: InveptFlush::new(&vmx, ept.invept),
/// };
/// let config = MmuConfig::EPT_PML;
/// let mmu: Mmu<_> = Mmu::new(host, config)?;
/// let mut vcpu = VcpuMmu::new();
/// let root = mmu.load_root(&mut vcpu, AsId(0))?;
/// let eptp = install_root(&vmx, &mmu.host().tlb, &ept, &config, vcpu.root().ok_or("no root")?)?;
/// assert_eq!((eptp.root(), vmx.field(VmcsField::EPT_POINTER)), (root, Some(eptp.raw())));
/// mmu.release_vcpu(&mut vcpu);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`RootError`]; the VMCS is unchanged when the EPTP cannot be built.
pub fn install_root<V: VmxInstructions, W: VmxInstructions>(
    vmx: &V,
    tlb: &InveptFlush<W>,
    features: &EptFeatures,
    config: &MmuConfig,
    root: &RootRef,
) -> Result<Eptp, RootError> {
    let eptp = Eptp::new(features, config, root.pfn())?;
    tlb.load_eptp(eptp);
    vmx.vmwrite(VmcsField::EPT_POINTER, eptp.raw())?;
    Ok(eptp)
}

#[cfg(test)]
mod tests;
