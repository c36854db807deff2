//! #VMEXIT decoding: exit codes, and nested page faults (EXITCODE 400h) as `tdp-core`
//! [`Fault`]s.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (publication 24593, revision 3.41), appendix C
//! "SVM Intercept Exit Codes", and section 15.25.6 "Nested versus Guest Page Faults, Fault Ordering":
//! a #NPF stores a page-fault error code in EXITINFO1 (bit 0 present, 1 write, 2 user, 3 reserved bit,
//! 4 fetch; bit 32 the fault was on the final guest-physical address, bit 33 on a guest page-table
//! access) and the faulting guest-physical address in EXITINFO2. Cross-checked against Linux's
//! `arch/x86/include/uapi/asm/svm.h` (`SVM_EXIT_*`) and `npf_interception`.

use tdp_core::addr::{AsId, Gpa};
use tdp_core::fault::{DecodeError, Fault, npf_code};

use crate::vmcb::Vmcb;

/// Exit codes (EXITCODE, VMCB offset 0x070).
pub mod code {
    /// Exception vector n intercepted: `EXCP_BASE + n`.
    pub const EXCP_BASE: u64 = 0x40;
    /// Physical INTR.
    pub const INTR: u64 = 0x60;
    /// Physical NMI.
    pub const NMI: u64 = 0x61;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// IN/OUT.
    pub const IOIO: u64 = 0x7b;
    /// RDMSR/WRMSR.
    pub const MSR: u64 = 0x7c;
    /// Shutdown (a guest triple fault).
    pub const SHUTDOWN: u64 = 0x7f;
    /// VMRUN by the guest.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN found invalid guest state (or the VMRUN intercept clear, or ASID 0): the guest never ran.
    pub const INVALID: u64 = u64::MAX;
}

/// A decoded nested page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NpfExit {
    /// The fault for [`tdp_core::mmu::Mmu::handle_fault`].
    pub fault: Fault,
    /// EXITINFO1: the error code.
    pub error_code: u64,
    /// The fault happened while the CPU walked the guest's own page tables (bit 33), not on the final
    /// access.
    pub guest_walk: bool,
}

impl NpfExit {
    /// Decodes a #NPF from EXITINFO1 and EXITINFO2.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gpa};
    /// use tdp_core::fault::{AccessKind, FaultKind};
    /// use tdp_svm::exit::NpfExit;
    /// // What Bochs reports for a guest write to a GPA with no nested entry (docs/recipes/bochs-svm.md).
    /// let npf = NpfExit::decode(AsId(0), 0x1_0000_0006, 0x30_1008)?;
    /// assert_eq!((npf.fault.gpa, npf.fault.access), (Gpa(0x30_1008), AccessKind::Write));
    /// assert_eq!((npf.fault.kind, npf.guest_walk), (FaultKind::Violation { present: false }, false));
    /// # Ok::<(), tdp_svm::exit::ExitError>(())
    /// ```
    ///
    /// # Errors
    /// [`ExitError::NotNested`] when the error code has neither bit 32 nor bit 33.
    pub fn decode(as_id: AsId, exit_info1: u64, exit_info2: u64) -> Result<NpfExit, ExitError> {
        let fault = Fault::from_npf(as_id, Gpa(exit_info2), exit_info1)
            .map_err(|source| ExitError::NotNested { source })?;
        Ok(NpfExit { fault, error_code: exit_info1, guest_walk: exit_info1 & npf_code::GUEST_WALK != 0 })
    }
}

/// A #VMEXIT, decoded as far as the MMU needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SvmExit {
    /// EXITCODE 400h: hand the fault to the MMU.
    Npf(NpfExit),
    /// `VMEXIT_INVALID`: VMRUN refused the VMCB's state; the guest never ran.
    Invalid,
    /// Any other exit: the hypervisor reads what it needs from the VMCB.
    Other(u64),
}

/// An exit could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExitError {
    /// A #NPF whose error code says neither final translation nor guest walk.
    #[error("nested page fault: {source}")]
    NotNested {
        /// What tdp-core's decoder said.
        source: DecodeError,
    },
}

/// Decodes the exit in `vmcb` for address space `as_id`.
///
/// ```
/// use tdp_core::addr::{AsId, Gpa};
/// use tdp_svm::exit::{code, read_exit, SvmExit};
/// use tdp_svm::vmcb::Vmcb;
/// let mut vmcb = Vmcb::new();
/// vmcb.control.exit_code = code::NPF;
/// vmcb.control.exit_info1 = 0x1_0000_0004; // a read of an unmapped GPA
/// vmcb.control.exit_info2 = 0x5008;
/// let SvmExit::Npf(npf) = read_exit(&vmcb, AsId(0))? else { panic!("not a #NPF") };
/// assert_eq!(npf.fault.gpa, Gpa(0x5008));
/// vmcb.control.exit_code = code::HLT;
/// assert_eq!(read_exit(&vmcb, AsId(0))?, SvmExit::Other(code::HLT));
/// # Ok::<(), tdp_svm::exit::ExitError>(())
/// ```
///
/// # Errors
/// [`ExitError::NotNested`] for a malformed #NPF error code.
pub fn read_exit(vmcb: &Vmcb, as_id: AsId) -> Result<SvmExit, ExitError> {
    let c = &vmcb.control;
    Ok(match c.exit_code {
        code::NPF => SvmExit::Npf(NpfExit::decode(as_id, c.exit_info1, c.exit_info2)?),
        code::INVALID => SvmExit::Invalid,
        other => SvmExit::Other(other),
    })
}
