//! VM-exit decoding: the exit-reason field, and EPT-violation / EPT-misconfiguration exits turned into
//! `tdp-core`'s fault input ([`tdp_core::fault::Fault`]), whose qualification decoder this builds on.
//!
//! Source: Intel SDM Vol. 3C, sections "Basic VM-Exit Information" (exit-reason format, "Exit
//! Qualification for EPT Violations") and Vol. 3D appendix "VMX Basic Exit Reasons" (edition
//! 325462-080, June 2023).
//!
//! Keeps: I5 for exit data: every exit reason and qualification decodes to a value or an [`ExitError`].

use tdp_core::addr::{AsId, Gpa};
use tdp_core::fault::{DecodeError, Fault, ept_qual};

use crate::instr::{VmxError, VmxInstructions};
use crate::vmcs::VmcsField;

/// Basic exit reasons (bits 15:0 of the exit-reason field) the backend handles or names.
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u16 = 0;
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    /// Triple fault.
    pub const TRIPLE_FAULT: u16 = 2;
    /// CPUID.
    pub const CPUID: u16 = 10;
    /// HLT (with "HLT exiting").
    pub const HLT: u16 = 12;
    /// VMCALL.
    pub const VMCALL: u16 = 18;
    /// Control-register access.
    pub const CR_ACCESS: u16 = 28;
    /// I/O instruction.
    pub const IO_INSTRUCTION: u16 = 30;
    /// RDMSR.
    pub const RDMSR: u16 = 31;
    /// WRMSR.
    pub const WRMSR: u16 = 32;
    /// VM-entry failure due to invalid guest state.
    pub const INVALID_GUEST_STATE: u16 = 33;
    /// VM-entry failure due to MSR loading.
    pub const MSR_LOADING: u16 = 34;
    /// VM-entry failure due to machine-check event.
    pub const MACHINE_CHECK: u16 = 41;
    /// EPT violation.
    pub const EPT_VIOLATION: u16 = 48;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u16 = 49;
    /// INVEPT executed by the guest.
    pub const INVEPT: u16 = 50;
    /// VMX-preemption timer expired.
    pub const PREEMPTION_TIMER: u16 = 52;
    /// XSETBV.
    pub const XSETBV: u16 = 55;
    /// Page-modification log full.
    pub const PML_FULL: u16 = 62;
}

/// The 32-bit exit-reason field.
///
/// ```
/// use tdp_vmx::exit::{reason, ExitReason};
/// let r = ExitReason(0x8000_0021);
/// assert_eq!(r.basic(), reason::INVALID_GUEST_STATE);
/// assert!(r.is_entry_failure());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExitReason(pub u32);

impl ExitReason {
    /// Bits 15:0: the basic exit reason.
    #[must_use]
    pub const fn basic(self) -> u16 {
        self.0 as u16
    }
    /// Bit 31: the exit is a VM-entry failure.
    #[must_use]
    pub const fn is_entry_failure(self) -> bool {
        self.0 & (1 << 31) != 0
    }
    /// Bit 29: the exit came from VMX root operation (SMM monitor).
    #[must_use]
    pub const fn from_vmx_root(self) -> bool {
        self.0 & (1 << 29) != 0
    }
    /// Bit 28: a monitor trap flag exit was pending.
    #[must_use]
    pub const fn pending_mtf(self) -> bool {
        self.0 & (1 << 28) != 0
    }
}

/// Qualification bit 12: NMI unblocking due to IRET (the hypervisor must re-block NMIs before resuming
/// when it uses virtual NMIs).
pub const EPT_QUAL_NMI_UNBLOCKING: u64 = 1 << 12;

/// A decoded EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EptViolation {
    /// The fault for [`tdp_core::mmu::Mmu::handle_fault`].
    pub fault: Fault,
    /// The raw exit qualification.
    pub qualification: u64,
    /// The guest-linear address, when qualification bit 7 says it is valid.
    pub guest_linear: Option<u64>,
    /// The access was to the translated address (bit 8 with bit 7); `false` means a guest page-table
    /// access.
    pub translated_access: bool,
    /// NMI unblocking due to IRET (bit 12).
    pub nmi_unblocking: bool,
}

impl EptViolation {
    /// Decodes an EPT violation from its qualification, GPA and (unread unless valid) linear address.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa};
    /// use tdp_core::fault::{AccessKind, FaultKind};
    /// use tdp_vmx::exit::EptViolation;
    /// // What Bochs reported for a guest write to a GPA with no EPT entry (recipes/bochs-vmx.md).
    /// let v = EptViolation::decode(AsId(0), 0x182, Gpa(0x30_1008), Some(0x40_1008))?;
    /// assert_eq!(v.fault.access, AccessKind::Write);
    /// assert_eq!(v.fault.kind, FaultKind::Violation { present: false });
    /// assert_eq!((v.fault.gpa, v.guest_linear, v.translated_access), (Gpa(0x30_1008), Some(0x40_1008), true));
    /// # Ok::<(), tdp_vmx::exit::ExitError>(())
    /// ```
    ///
    /// # Errors
    /// [`ExitError::Qualification`] when the qualification names no access.
    pub fn decode(
        as_id: AsId,
        qualification: u64,
        gpa: Gpa,
        linear: Option<u64>,
    ) -> Result<EptViolation, ExitError> {
        let fault = Fault::from_ept_violation(as_id, gpa, qualification)
            .map_err(|source| ExitError::Qualification { source })?;
        let linear_valid = qualification & ept_qual::LINEAR_VALID != 0;
        Ok(EptViolation {
            fault,
            qualification,
            guest_linear: if linear_valid { linear } else { None },
            translated_access: linear_valid && qualification & ept_qual::TRANSLATED != 0,
            nmi_unblocking: qualification & EPT_QUAL_NMI_UNBLOCKING != 0,
        })
    }
}

/// A VM exit, decoded as far as the MMU and PML need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VmExit {
    /// Reason 48: hand `fault` to the MMU.
    EptViolation(EptViolation),
    /// Reason 49: an MMIO SPTE (the MMU installs them misconfigured on purpose) or a broken table.
    EptMisconfig(Fault),
    /// Reason 62: the page-modification log is full; drain the log and resume.
    PmlFull,
    /// A VM-entry failure (bit 31): the guest never ran. `qualification` holds e.g. the failing MSR-load
    /// entry for reason 34.
    EntryFailure {
        /// The exit reason.
        reason: ExitReason,
        /// The exit qualification.
        qualification: u64,
    },
    /// Any other exit: the hypervisor reads what it needs.
    Other(ExitReason),
}

/// An exit could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExitError {
    /// A VMREAD of an exit field failed.
    #[error("reading the exit information: {0}")]
    Vmread(#[from] VmxError),
    /// The EPT-violation qualification is malformed.
    #[error("EPT-violation exit: {source}")]
    Qualification {
        /// What tdp-core's decoder said.
        source: DecodeError,
    },
}

/// Reads and decodes the current VMCS's exit for address space `as_id`: the exit reason, and for EPT
/// exits the qualification, guest-physical address and (when valid) guest-linear address.
///
/// ```
/// use tdp_core::addr::{AsId, Gpa};
/// use tdp_vmx::exit::{read_exit, VmExit};
/// use tdp_vmx::fake::FakeVmx;
/// use tdp_vmx::vmcs::VmcsField;
/// let vmx = FakeVmx::new();
/// vmx.set_exit_ept_violation(0x182, 0x5008, 0x7000_5008);
/// let VmExit::EptViolation(v) = read_exit(&vmx, AsId(0))? else { panic!("not an EPT violation") };
/// assert_eq!((v.fault.gpa, v.guest_linear), (Gpa(0x5008), Some(0x7000_5008)));
/// vmx.set_field(VmcsField::EXIT_REASON, 62);
/// assert_eq!(read_exit(&vmx, AsId(0))?, VmExit::PmlFull);
/// # Ok::<(), tdp_vmx::exit::ExitError>(())
/// ```
///
/// # Errors
/// [`ExitError::Vmread`] when a VMREAD fails, [`ExitError::Qualification`] for a malformed EPT-violation
/// qualification.
pub fn read_exit(vmx: &impl VmxInstructions, as_id: AsId) -> Result<VmExit, ExitError> {
    let reason = ExitReason(vmx.vmread(VmcsField::EXIT_REASON)? as u32);
    if reason.is_entry_failure() {
        let qualification = vmx.vmread(VmcsField::EXIT_QUALIFICATION)?;
        return Ok(VmExit::EntryFailure { reason, qualification });
    }
    Ok(match reason.basic() {
        reason::EPT_VIOLATION => {
            let qualification = vmx.vmread(VmcsField::EXIT_QUALIFICATION)?;
            let gpa = Gpa(vmx.vmread(VmcsField::GUEST_PHYSICAL_ADDRESS)?);
            // The guest-linear field is read only when valid: its contents are undefined otherwise.
            let linear = if qualification & ept_qual::LINEAR_VALID != 0 {
                Some(vmx.vmread(VmcsField::GUEST_LINEAR_ADDRESS)?)
            } else {
                None
            };
            VmExit::EptViolation(EptViolation::decode(as_id, qualification, gpa, linear)?)
        }
        reason::EPT_MISCONFIG => VmExit::EptMisconfig(Fault::from_ept_misconfig(
            as_id,
            Gpa(vmx.vmread(VmcsField::GUEST_PHYSICAL_ADDRESS)?),
        )),
        reason::PML_FULL => VmExit::PmlFull,
        _ => VmExit::Other(reason),
    })
}

#[cfg(test)]
mod tests;
