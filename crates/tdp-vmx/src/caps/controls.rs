//! Allowed-0/allowed-1 control settings and CR0/CR4 fixed bits, with helpers that turn what a
//! hypervisor wants into what the CPU accepts, or say which bits it cannot have.
//!
//! Source: Intel SDM Vol. 3D, appendix "VMX Capability Reporting Facility", sections "VM-Execution
//! Controls", "VM-Exit Controls", "VM-Entry Controls", "VMX-Fixed Bits in CR0" and "VMX-Fixed Bits in
//! CR4" (edition 325462-080, June 2023): bits 31:0 of a control MSR are the allowed-0 settings (a 1 bit
//! must be 1), bits 63:32 the allowed-1 settings (a 0 bit must be 0).

/// Which control field an [`AllowedControls`] describes (named in errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ControlKind {
    /// Pin-based VM-execution controls.
    Pin,
    /// Primary processor-based VM-execution controls.
    Primary,
    /// Secondary processor-based VM-execution controls.
    Secondary,
    /// VM-exit controls.
    Exit,
    /// VM-entry controls.
    Entry,
}

/// A control the hypervisor asked for that the CPU does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{kind:?} controls {desired:#x}: the CPU does not allow bits {unsupported:#x} to be 1")]
pub struct ControlError {
    /// The control field.
    pub kind: ControlKind,
    /// What was asked for.
    pub desired: u32,
    /// The asked-for bits the CPU's allowed-1 settings forbid.
    pub unsupported: u32,
}

/// The allowed settings of one control field, from its capability MSR.
///
/// ```
/// use tdp_vmx::caps::{AllowedControls, ControlError, ControlKind};
/// use tdp_vmx::vmcs::{EntryControls, ExitControls};
/// // IA32_VMX_TRUE_EXIT_CTLS and TRUE_ENTRY_CTLS as Bochs' corei7_skylake_x reports them.
/// let exit = AllowedControls::from_msr(ControlKind::Exit, 0x007f_ffff_0003_6dfb);
/// let want = ExitControls::HOST_ADDRESS_SPACE_SIZE | ExitControls::LOAD_IA32_EFER;
/// assert_eq!(exit.adjust(want.bits()), Ok(0x23_6ffb)); // what ran under Bochs
/// let entry = AllowedControls::from_msr(ControlKind::Entry, 0x0000_ffff_0000_11fb);
/// assert_eq!(entry.adjust(1 << 20), Err(ControlError {
///     kind: ControlKind::Entry, desired: 1 << 20, unsupported: 1 << 20 }));
/// let want = EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER;
/// assert_eq!(entry.adjust(want.bits()), Ok(0x93fb));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowedControls {
    kind: ControlKind,
    allowed0: u32,
    allowed1: u32,
}

impl AllowedControls {
    /// Decodes a control capability MSR.
    #[must_use]
    pub const fn from_msr(kind: ControlKind, raw: u64) -> AllowedControls {
        AllowedControls { kind, allowed0: raw as u32, allowed1: (raw >> 32) as u32 }
    }
    /// A field that does not exist on this CPU: nothing may be 1.
    #[must_use]
    pub const fn none(kind: ControlKind) -> AllowedControls {
        AllowedControls { kind, allowed0: 0, allowed1: 0 }
    }
    /// The field.
    #[must_use]
    pub const fn kind(&self) -> ControlKind {
        self.kind
    }
    /// Bits that must be 1 (the MSR's low half).
    #[must_use]
    pub const fn allowed0(&self) -> u32 {
        self.allowed0
    }
    /// Bits that may be 1 (the MSR's high half).
    #[must_use]
    pub const fn allowed1(&self) -> u32 {
        self.allowed1
    }
    /// Whether every bit of `bits` may be 1.
    #[must_use]
    pub const fn allows(&self, bits: u32) -> bool {
        bits & !self.allowed1 == 0
    }
    /// The value to write: `desired` plus every bit that must be 1.
    ///
    /// # Errors
    /// [`ControlError`] naming the desired bits the CPU does not allow; nothing is dropped silently.
    pub const fn adjust(&self, desired: u32) -> Result<u32, ControlError> {
        let unsupported = desired & !self.allowed1;
        if unsupported != 0 {
            return Err(ControlError { kind: self.kind, desired, unsupported });
        }
        Ok(desired | self.allowed0)
    }
    /// Whether `value` is a setting the CPU accepts for this field (every must-be-1 bit set, no
    /// must-be-0 bit set): a check of a value read back from the VMCS.
    #[must_use]
    pub const fn accepts(&self, value: u32) -> bool {
        value & self.allowed0 == self.allowed0 && value & !self.allowed1 == 0
    }
}

/// A CR0 or CR4 value breaks the fixed bits of VMX operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error(
    "control register value {value:#x}: bits {must_be_one:#x} must be 1 and bits {must_be_zero:#x} must be 0 in VMX operation"
)]
pub struct FixedBitsError {
    /// The value checked.
    pub value: u64,
    /// Clear bits that FIXED0 requires.
    pub must_be_one: u64,
    /// Set bits that FIXED1 forbids.
    pub must_be_zero: u64,
}

/// IA32_VMX_CRn_FIXED0 / FIXED1: a 1 in FIXED0 must be 1, a 0 in FIXED1 must be 0.
///
/// ```
/// use tdp_vmx::caps::FixedBits;
/// let cr4 = FixedBits::new(0x2000, 0x3727ff); // Bochs corei7_skylake_x: VMXE must be 1
/// assert_eq!(cr4.adjust(0x20), 0x2020);
/// assert!(cr4.check(0x2020).is_ok());
/// let err = cr4.check(0x40_0020).unwrap_err();
/// assert_eq!((err.must_be_one, err.must_be_zero), (0x2000, 0x40_0000));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FixedBits {
    /// Bits that must be 1.
    pub fixed0: u64,
    /// Bits that may be 1.
    pub fixed1: u64,
}

impl FixedBits {
    /// From the two MSR values.
    #[must_use]
    pub const fn new(fixed0: u64, fixed1: u64) -> FixedBits {
        FixedBits { fixed0, fixed1 }
    }
    /// `value` with the must-be-1 bits set and the must-be-0 bits cleared.
    #[must_use]
    pub const fn adjust(&self, value: u64) -> u64 {
        (value | self.fixed0) & self.fixed1
    }
    /// Checks `value` against both MSRs.
    ///
    /// # Errors
    /// [`FixedBitsError`] with the offending bits.
    pub const fn check(&self, value: u64) -> Result<(), FixedBitsError> {
        let must_be_one = self.fixed0 & !value;
        let must_be_zero = value & !self.fixed1;
        if must_be_one != 0 || must_be_zero != 0 {
            return Err(FixedBitsError { value, must_be_one, must_be_zero });
        }
        Ok(())
    }
}
