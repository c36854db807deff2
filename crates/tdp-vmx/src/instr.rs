//! The instruction layer: the few privileged instructions the backend needs, behind one small trait so
//! that everything above it runs on the host against [`crate::fake::FakeVmx`].
//!
//! [`VmxInstructions`] is implemented for real by [`crate::raw::X86Vmx`] (inline assembly, bare metal
//! only) and in software by [`crate::fake::FakeVmx`] (a VMCS in a map and recorded MSR values). VMX
//! instructions report failure in RFLAGS (Intel SDM Vol. 3C, section "Conventions" of chapter "VMX
//! Instruction Reference": VMfailInvalid sets CF, VMfailValid sets ZF and stores an error number in the
//! VM-instruction error field); [`VmxError`] carries which instruction failed and how. The operands of
//! INVEPT and INVVPID ([`InveptKind`], [`InveptDescriptor`], [`InvvpidKind`], [`InvvpidDescriptor`]) are
//! defined here with the instructions; [`crate::inv`] chooses and issues them.

use core::fmt;

use static_assertions::const_assert_eq;

use crate::eptp::Eptp;
use crate::vmcs::{VmInstructionError, VmcsField};

/// The privileged instructions the backend uses. Every method may be called with only `&self`, because
/// a TLB flush ([`tdp_core::host::TlbFlush`]) gets only `&self`; an implementation that keeps state uses
/// interior mutability.
///
/// ```
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// use tdp_vmx::instr::VmxInstructions;
/// use tdp_vmx::msr::IA32_VMX_BASIC;
/// use tdp_vmx::vmcs::VmcsField;
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// assert_eq!(vmx.rdmsr(IA32_VMX_BASIC) & 0x7fff_ffff, 0x2b); // the VMCS revision id
/// vmx.vmwrite(VmcsField::GUEST_PML_INDEX, 511)?;
/// assert_eq!(vmx.vmread(VmcsField::GUEST_PML_INDEX)?, 511);
/// # Ok::<(), tdp_vmx::instr::VmxError>(())
/// ```
pub trait VmxInstructions {
    /// RDMSR. Only called for MSRs that exist on this CPU (the capability reader checks the bits that
    /// say so first): on hardware, reading an absent MSR raises #GP.
    fn rdmsr(&self, msr: u32) -> u64;

    /// VMREAD of `field` from the current VMCS.
    ///
    /// # Errors
    /// [`VmxError`] with the VM-instruction error (unsupported field) or VMfailInvalid (no current VMCS).
    fn vmread(&self, field: VmcsField) -> Result<u64, VmxError>;

    /// VMWRITE of `value` to `field` of the current VMCS.
    ///
    /// # Errors
    /// [`VmxError`]: unsupported or read-only field, or no current VMCS.
    fn vmwrite(&self, field: VmcsField, value: u64) -> Result<(), VmxError>;

    /// INVEPT of `kind` with `desc`.
    ///
    /// # Errors
    /// [`VmxError`]: an unsupported type or a bad descriptor (VM-instruction error 28).
    fn invept(&self, kind: InveptKind, desc: &InveptDescriptor) -> Result<(), VmxError>;

    /// INVVPID of `kind` with `desc`.
    ///
    /// # Errors
    /// [`VmxError`]: an unsupported type, VPID 0 or a non-canonical address (error 28).
    fn invvpid(&self, kind: InvvpidKind, desc: &InvvpidDescriptor) -> Result<(), VmxError>;
}

impl<T: VmxInstructions + ?Sized> VmxInstructions for &T {
    fn rdmsr(&self, msr: u32) -> u64 {
        (**self).rdmsr(msr)
    }
    fn vmread(&self, field: VmcsField) -> Result<u64, VmxError> {
        (**self).vmread(field)
    }
    fn vmwrite(&self, field: VmcsField, value: u64) -> Result<(), VmxError> {
        (**self).vmwrite(field, value)
    }
    fn invept(&self, kind: InveptKind, desc: &InveptDescriptor) -> Result<(), VmxError> {
        (**self).invept(kind, desc)
    }
    fn invvpid(&self, kind: InvvpidKind, desc: &InvvpidDescriptor) -> Result<(), VmxError> {
        (**self).invvpid(kind, desc)
    }
}

/// Which instruction failed, with its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VmxOp {
    /// VMXON with the VMXON region's physical address.
    Vmxon {
        /// Physical address of the VMXON region.
        region: u64,
    },
    /// VMXOFF.
    Vmxoff,
    /// VMCLEAR of a VMCS.
    Vmclear {
        /// Physical address of the VMCS.
        vmcs: u64,
    },
    /// VMPTRLD of a VMCS.
    Vmptrld {
        /// Physical address of the VMCS.
        vmcs: u64,
    },
    /// VMREAD of a field.
    Vmread {
        /// The field.
        field: VmcsField,
    },
    /// VMWRITE of a field.
    Vmwrite {
        /// The field.
        field: VmcsField,
        /// The value written.
        value: u64,
    },
    /// INVEPT.
    Invept {
        /// The invalidation type.
        kind: InveptKind,
        /// The EPTP in the descriptor.
        eptp: u64,
    },
    /// INVVPID.
    Invvpid {
        /// The invalidation type.
        kind: InvvpidKind,
        /// The VPID in the descriptor.
        vpid: u16,
    },
}

impl fmt::Display for VmxOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmxOp::Vmxon { region } => write!(f, "VMXON of region {region:#x}"),
            VmxOp::Vmxoff => f.write_str("VMXOFF"),
            VmxOp::Vmclear { vmcs } => write!(f, "VMCLEAR of VMCS {vmcs:#x}"),
            VmxOp::Vmptrld { vmcs } => write!(f, "VMPTRLD of VMCS {vmcs:#x}"),
            VmxOp::Vmread { field } => write!(f, "VMREAD of {field}"),
            VmxOp::Vmwrite { field, value } => write!(f, "VMWRITE of {value:#x} to {field}"),
            VmxOp::Invept { kind, eptp } => write!(f, "INVEPT {kind:?} of EPTP {eptp:#x}"),
            VmxOp::Invvpid { kind, vpid } => write!(f, "INVVPID {kind:?} of VPID {vpid}"),
        }
    }
}

/// How a VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmFail {
    /// VMfailInvalid (CF set): there is no current VMCS to hold an error number.
    Invalid,
    /// VMfailValid (ZF set), with the number read from the VM-instruction error field.
    Valid(VmInstructionError),
}

impl fmt::Display for VmFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmFail::Invalid => f.write_str("VMfailInvalid (no current VMCS)"),
            VmFail::Valid(e) => write!(f, "VMfailValid: {e}"),
        }
    }
}

/// A VMX instruction failed.
///
/// ```
/// use tdp_vmx::instr::{VmFail, VmxError, VmxOp};
/// use tdp_vmx::vmcs::{VmInstructionError, VmcsField};
/// let e = VmxError {
///     op: VmxOp::Vmwrite { field: VmcsField::EXIT_REASON, value: 0 },
///     fail: VmFail::Valid(VmInstructionError::from_raw(13)),
/// };
/// assert_eq!(
///     e.to_string(),
///     "VMWRITE of 0x0 to exit reason (0x4402) failed: VMfailValid: \
///      VM-instruction error 13: VMWRITE to read-only VMCS component"
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{op} failed: {fail}")]
pub struct VmxError {
    /// The instruction and its operands.
    pub op: VmxOp,
    /// How it failed.
    pub fail: VmFail,
}

/// The INVEPT type (register operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum InveptKind {
    /// Type 1: translations derived from the descriptor's EPTP.
    SingleContext = 1,
    /// Type 2: translations derived from every EPTP (the descriptor is ignored).
    AllContext = 2,
}

/// The INVVPID type (register operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum InvvpidKind {
    /// Type 0: one linear address of one VPID.
    IndividualAddress = 0,
    /// Type 1: everything of one VPID.
    SingleContext = 1,
    /// Type 2: every VPID except 0.
    AllContext = 2,
    /// Type 3: one VPID, keeping global translations.
    SingleContextRetainingGlobals = 3,
}

/// The 128-bit INVEPT descriptor: the EPTP in bits 63:0, bits 127:64 reserved (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C, align(16))]
pub struct InveptDescriptor {
    /// The EPTP whose translations go (single-context).
    pub eptp: u64,
    /// Reserved, must be 0.
    pub reserved: u64,
}

/// The 128-bit INVVPID descriptor: VPID in bits 15:0, bits 63:16 reserved (0), the linear address in
/// bits 127:64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C, align(16))]
pub struct InvvpidDescriptor {
    /// The VPID in bits 15:0; bits 63:16 must be 0.
    pub vpid: u64,
    /// The linear address (individual-address type).
    pub linear_address: u64,
}

const_assert_eq!(core::mem::size_of::<InveptDescriptor>(), 16);
const_assert_eq!(core::mem::size_of::<InvvpidDescriptor>(), 16);
const_assert_eq!(core::mem::offset_of!(InvvpidDescriptor, linear_address), 8);

impl InveptDescriptor {
    /// The descriptor for `eptp`.
    #[must_use]
    pub const fn new(eptp: Eptp) -> InveptDescriptor {
        InveptDescriptor { eptp: eptp.raw(), reserved: 0 }
    }
}

impl InvvpidDescriptor {
    /// The descriptor for `vpid` and `linear_address`.
    #[must_use]
    pub const fn new(vpid: u16, linear_address: u64) -> InvvpidDescriptor {
        InvvpidDescriptor { vpid: vpid as u64, linear_address }
    }
}
