//! VMX capability MSR values recorded inside Bochs 2.7 (recipes/bochs-vmx.md), one table per CPU model,
//! for [`super::FakeVmx::with_msrs`].
//!
//! Where the recipe did not record a value for a model, the table says which value stands in (from a
//! model the recipe says behaves the same), so a test never claims more than was observed.

use crate::msr::*;

/// TRUE_ control MSRs recorded on corei7_skylake_x and corei7_sandy_bridge_2600k.
const TRUE_CONTROLS: [(u32, u64); 4] = [
    (IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
    (IA32_VMX_TRUE_PROCBASED_CTLS, 0xf7f9_fffe_0400_6172),
    (IA32_VMX_TRUE_EXIT_CTLS, 0x007f_ffff_0003_6dfb),
    (IA32_VMX_TRUE_ENTRY_CTLS, 0x0000_ffff_0000_11fb),
];

/// A model's MSRs: the values that differ, then the shared ones.
const fn model(basic: u64, ctls2: u64, ept_vpid_cap: u64, cr4_fixed1: u64) -> [(u32, u64); 12] {
    [
        (IA32_FEATURE_CONTROL, 0x5),
        (IA32_VMX_BASIC, basic),
        (IA32_VMX_PROCBASED_CTLS2, ctls2),
        (IA32_VMX_EPT_VPID_CAP, ept_vpid_cap),
        (IA32_VMX_CR0_FIXED0, 0x8000_0021),
        (IA32_VMX_CR0_FIXED1, 0xffff_ffff),
        (IA32_VMX_CR4_FIXED0, 0x2000),
        (IA32_VMX_CR4_FIXED1, cr4_fixed1),
        TRUE_CONTROLS[0],
        TRUE_CONTROLS[1],
        TRUE_CONTROLS[2],
        TRUE_CONTROLS[3],
    ]
}

/// corei7_skylake_x: every value recorded. EPT with A/D, 2M/1G pages, PML; revision 0x2b.
pub const COREI7_SKYLAKE_X: &[(u32, u64)] =
    &model(0x00d8_1000_0000_002b, 0x0217_7fff_0000_0000, 0x0000_0f01_0633_4141, 0x0037_27ff);

/// corei7_sandy_bridge_2600k: BASIC, PROCBASED_CTLS2, EPT_VPID_CAP, CR4_FIXED1 and the TRUE_ controls
/// recorded; CR0 fixed bits and CR4_FIXED0 as on skylake_x (not recorded separately). EPT with 2M pages,
/// no A/D, no 1G, no PML.
pub const COREI7_SANDY_BRIDGE_2600K: &[(u32, u64)] =
    &model(0x00d8_1000_0000_002b, 0x0000_00ff_0000_0000, 0x0000_0f01_0611_4141, 0x0006_27ff);

/// corei7_icelake_u: BASIC (revision 4) and PROCBASED_CTLS2 recorded. EPT_VPID_CAP, the TRUE_ controls
/// and the fixed bits are skylake_x's (the recipe lists the same EPT features: A/D, 2M/1G, PML).
pub const COREI7_ICELAKE_U: &[(u32, u64)] =
    &model(0x00d8_1000_0000_0004, 0x0297_7fff_0000_0000, 0x0000_0f01_0633_4141, 0x0037_27ff);

/// tigerlake: BASIC (with bit 56), PROCBASED_CTLS2 and EPT_VPID_CAP (with bit 23) recorded; the TRUE_
/// controls and fixed bits are skylake_x's.
pub const TIGERLAKE: &[(u32, u64)] =
    &model(0x01d8_1000_0000_0004, 0x0297_7fff_0000_0000, 0x0000_0f01_06b3_4141, 0x0037_27ff);

/// A bx_generic-like CPU (synthetic: the recipe says only that bx_generic has VMX MSRs but no EPT or VPID
/// in PROCBASED_CTLS2): skylake_x's values with secondary controls that allow neither EPT (bit 1) nor
/// VPID (bit 5), and no IA32_VMX_EPT_VPID_CAP at all (reading it would #GP).
pub const BX_GENERIC_LIKE: &[(u32, u64)] = &[
    (IA32_FEATURE_CONTROL, 0x5),
    (IA32_VMX_BASIC, 0x00d8_1000_0000_002b),
    (IA32_VMX_PROCBASED_CTLS2, 0x0000_00dd_0000_0000),
    (IA32_VMX_CR0_FIXED0, 0x8000_0021),
    (IA32_VMX_CR0_FIXED1, 0xffff_ffff),
    (IA32_VMX_CR4_FIXED0, 0x2000),
    (IA32_VMX_CR4_FIXED1, 0x0037_27ff),
    TRUE_CONTROLS[0],
    TRUE_CONTROLS[1],
    TRUE_CONTROLS[2],
    TRUE_CONTROLS[3],
];
