//! IA32_VMX_BASIC (MSR 0x480): VMCS revision id, VMCS region size, VMCS memory type, true controls.
//!
//! Source: Intel SDM Vol. 3D, appendix "VMX Capability Reporting Facility", section "Basic VMX
//! Information" (edition 325462-080, June 2023).

/// The memory type the CPU uses to access the VMCS and related structures (BASIC bits 53:50), also
/// the encoding of the EPTP's paging-structure memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum VmxMemoryType {
    /// Uncacheable (0).
    Uncacheable = 0,
    /// Write-back (6).
    WriteBack = 6,
}

/// IA32_VMX_BASIC, decoded.
///
/// ```
/// use tdp_vmx::caps::{VmxBasic, VmxMemoryType};
/// let tigerlake = VmxBasic::from_raw(0x01d8_1000_0000_0004); // recorded under Bochs
/// assert_eq!(tigerlake.revision_id(), 4);
/// assert_eq!(tigerlake.vmcs_size(), 4096);
/// assert_eq!(tigerlake.memory_type(), Some(VmxMemoryType::WriteBack));
/// assert!(tigerlake.has_true_controls() && tigerlake.ins_outs_info());
/// assert!(tigerlake.entry_exception_without_error_code());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VmxBasic(pub u64);

impl VmxBasic {
    /// Wraps the raw MSR value.
    #[must_use]
    pub const fn from_raw(raw: u64) -> VmxBasic {
        VmxBasic(raw)
    }
    /// Bits 30:0: the VMCS revision identifier, written to the first dword of the VMXON region and of
    /// every VMCS.
    #[must_use]
    pub const fn revision_id(self) -> u32 {
        (self.0 & 0x7fff_ffff) as u32
    }
    /// Bits 44:32: bytes to allocate for the VMXON region and each VMCS (at most 4096).
    #[must_use]
    pub const fn vmcs_size(self) -> u32 {
        ((self.0 >> 32) & 0x1fff) as u32
    }
    /// Bit 48: VMXON, VMCS and related addresses are limited to 32 bits.
    #[must_use]
    pub const fn addresses_limited_to_32_bits(self) -> bool {
        self.0 & (1 << 48) != 0
    }
    /// Bit 49: dual-monitor treatment of SMIs and SMM is supported.
    #[must_use]
    pub const fn dual_monitor(self) -> bool {
        self.0 & (1 << 49) != 0
    }
    /// Bits 53:50: the VMCS memory type; `None` for a value the SDM does not define (0 UC, 6 WB).
    #[must_use]
    pub const fn memory_type(self) -> Option<VmxMemoryType> {
        match (self.0 >> 50) & 0xf {
            0 => Some(VmxMemoryType::Uncacheable),
            6 => Some(VmxMemoryType::WriteBack),
            _ => None,
        }
    }
    /// Bit 54: VM exits for INS/OUTS report instruction information.
    #[must_use]
    pub const fn ins_outs_info(self) -> bool {
        self.0 & (1 << 54) != 0
    }
    /// Bit 55: the IA32_VMX_TRUE_*_CTLS MSRs exist, and default1 controls may be 0 where they allow.
    #[must_use]
    pub const fn has_true_controls(self) -> bool {
        self.0 & (1 << 55) != 0
    }
    /// Bit 56: VM entry may deliver a hardware exception with or without an error code regardless of
    /// the vector.
    #[must_use]
    pub const fn entry_exception_without_error_code(self) -> bool {
        self.0 & (1 << 56) != 0
    }
}
