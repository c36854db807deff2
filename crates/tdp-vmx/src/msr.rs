//! Model-specific register numbers the VMX backend reads: the feature-control MSR and the VMX capability
//! MSRs.
//!
//! Source: Intel SDM Vol. 4, chapter "Model-Specific Registers (MSRs)", table "IA-32 Architectural MSRs",
//! and Vol. 3D, appendix "VMX Capability Reporting Facility" (edition 325462-080, June 2023).

/// IA32_FEATURE_CONTROL: bit 0 lock, bit 2 VMXON outside SMX.
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_VMX_BASIC: VMCS revision id, region size, memory type, true-controls bit.
pub const IA32_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PINBASED_CTLS: allowed settings of the pin-based controls.
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// IA32_VMX_PROCBASED_CTLS: allowed settings of the primary processor-based controls.
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_EXIT_CTLS: allowed settings of the VM-exit controls.
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// IA32_VMX_ENTRY_CTLS: allowed settings of the VM-entry controls.
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// IA32_VMX_MISC: miscellaneous data (preemption-timer rate, CR3-target count, ...).
pub const IA32_VMX_MISC: u32 = 0x485;
/// IA32_VMX_CR0_FIXED0: CR0 bits that must be 1 in VMX operation.
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
/// IA32_VMX_CR0_FIXED1: CR0 bits that may be 1 in VMX operation.
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
/// IA32_VMX_CR4_FIXED0: CR4 bits that must be 1 in VMX operation.
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
/// IA32_VMX_CR4_FIXED1: CR4 bits that may be 1 in VMX operation.
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// IA32_VMX_VMCS_ENUM: the highest VMCS field index.
pub const IA32_VMX_VMCS_ENUM: u32 = 0x48a;
/// IA32_VMX_PROCBASED_CTLS2: allowed settings of the secondary processor-based controls. Exists only
/// when the primary controls allow "activate secondary controls" (bit 63 of IA32_VMX_PROCBASED_CTLS).
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
/// IA32_VMX_EPT_VPID_CAP: EPT and VPID capabilities. Exists only when the secondary controls allow
/// "enable EPT" or "enable VPID".
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
/// IA32_VMX_TRUE_PINBASED_CTLS: pin-based controls, with default1 bits that may be 0. Exists when
/// IA32_VMX_BASIC bit 55 is set.
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
/// IA32_VMX_TRUE_PROCBASED_CTLS: primary processor-based controls (true allowed-0 settings).
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
/// IA32_VMX_TRUE_EXIT_CTLS: VM-exit controls (true allowed-0 settings).
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
/// IA32_VMX_TRUE_ENTRY_CTLS: VM-entry controls (true allowed-0 settings).
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
/// IA32_VMX_VMFUNC: allowed VM functions.
pub const IA32_VMX_VMFUNC: u32 = 0x491;

/// IA32_FEATURE_CONTROL bit 0: the MSR is locked (writes #GP until reset).
pub const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
/// IA32_FEATURE_CONTROL bit 2: VMXON is allowed outside SMX operation.
pub const FEATURE_CONTROL_VMXON_OUTSIDE_SMX: u64 = 1 << 2;
