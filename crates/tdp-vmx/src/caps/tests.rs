//! Capability decoding against the MSR values recorded under Bochs (recipes/bochs-vmx.md): each model's
//! features as the recipe's table states them, the control set that ran, and the errors for CPUs that
//! lack what the MMU needs.

use tdp_core::addr::Level;
use tdp_core::mmu::MmuConfig;

use super::*;
use crate::fake::{FakeVmx, bochs};

fn caps_of(msrs: &[(u32, u64)]) -> (VmxCapabilities, FakeVmx) {
    let vmx = FakeVmx::with_msrs(msrs);
    let caps = VmxCapabilities::read(&vmx);
    (caps, vmx)
}

/// One row of the recipe's table: EPT A/D, 2M, 1G, PML, revision.
struct Row {
    msrs: &'static [(u32, u64)],
    revision: u32,
    ad: bool,
    max_leaf: Level,
    pml: bool,
}

#[test]
fn bochs_models_have_the_features_the_recipe_lists() {
    let rows = [
        Row { msrs: bochs::COREI7_SKYLAKE_X, revision: 0x2b, ad: true, max_leaf: Level::L3, pml: true },
        Row { msrs: bochs::COREI7_ICELAKE_U, revision: 0x4, ad: true, max_leaf: Level::L3, pml: true },
        Row { msrs: bochs::TIGERLAKE, revision: 0x4, ad: true, max_leaf: Level::L3, pml: true },
        Row {
            msrs: bochs::COREI7_SANDY_BRIDGE_2600K,
            revision: 0x2b,
            ad: false,
            max_leaf: Level::L2,
            pml: false,
        },
    ];
    for row in rows {
        let (caps, vmx) = caps_of(row.msrs);
        assert_eq!(vmx.absent_msr_reads(), [], "only MSRs the CPU has are read");
        assert_eq!(caps.basic.revision_id(), row.revision);
        assert_eq!(caps.basic.vmcs_size(), 4096);
        assert_eq!(caps.basic.memory_type(), Some(VmxMemoryType::WriteBack));
        assert!(caps.basic.has_true_controls());
        let ept = caps.ept_features().unwrap();
        // All EPT models: 4-level only, WB and UC, INVEPT single/all, INVVPID, unrestricted guest.
        assert_eq!((ept.walk_length, ept.five_level_available), (WalkLength::Four, false));
        assert_eq!(ept.memory_type, VmxMemoryType::WriteBack);
        assert_eq!(ept.invept, InveptSupport { single_context: true, all_context: true });
        let vpid = ept.vpid.unwrap();
        assert!(vpid.individual_address && vpid.single_context && vpid.all_context);
        assert!(ept.unrestricted_guest);
        assert_eq!((ept.accessed_dirty, ept.max_leaf_level, ept.pml), (row.ad, row.max_leaf, row.pml));
        assert_eq!(ept.mmu_config(true).is_ok(), row.pml);
        let cfg = ept.mmu_config(false).unwrap();
        assert_eq!((cfg.format.has_accessed_dirty(), cfg.root_level), (row.ad, Level::L4));
    }
}

#[test]
fn tigerlake_reports_the_extra_bits_the_recipe_saw() {
    let (caps, _) = caps_of(bochs::TIGERLAKE);
    assert!(caps.basic.entry_exception_without_error_code());
    assert!(caps.ept_vpid.contains(EptVpidCap::SUPERVISOR_SHADOW_STACK));
    let (sky, _) = caps_of(bochs::COREI7_SKYLAKE_X);
    assert!(!sky.basic.entry_exception_without_error_code());
    assert!(!sky.ept_vpid.contains(EptVpidCap::SUPERVISOR_SHADOW_STACK));
}

#[test]
fn skylake_features_are_exactly_the_mmu_defaults() {
    let (caps, _) = caps_of(bochs::COREI7_SKYLAKE_X);
    let ept = caps.ept_features().unwrap();
    assert_eq!(ept.mmu_config(false), Ok(MmuConfig::EPT));
    assert_eq!(ept.mmu_config(true), Ok(MmuConfig::EPT_PML));
}

#[test]
fn the_control_set_that_ran_under_bochs_comes_out_of_adjust() {
    use crate::vmcs::{EntryControls, ExitControls, PinControls, PrimaryControls};
    for msrs in [bochs::COREI7_SKYLAKE_X, bochs::COREI7_SANDY_BRIDGE_2600K] {
        let (caps, _) = caps_of(msrs);
        assert_eq!(caps.pin.adjust(PinControls::empty().bits()), Ok(0x16));
        let primary = PrimaryControls::ACTIVATE_SECONDARY_CONTROLS | PrimaryControls::HLT_EXITING;
        assert_eq!(caps.primary.adjust(primary.bits()), Ok(0x8400_61f2));
        let exit = ExitControls::HOST_ADDRESS_SPACE_SIZE | ExitControls::LOAD_IA32_EFER;
        assert_eq!(caps.exit.adjust(exit.bits()), Ok(0x23_6ffb));
        let entry = EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER;
        assert_eq!(caps.entry.adjust(entry.bits()), Ok(0x93fb));
        for (allowed, value) in
            [(caps.pin, 0x16), (caps.primary, 0x8400_61f2), (caps.exit, 0x23_6ffb), (caps.entry, 0x93fb)]
        {
            assert!(allowed.accepts(value));
        }
    }
}

#[test]
fn adjust_names_every_bit_the_cpu_forbids() {
    let (caps, _) = caps_of(bochs::COREI7_SKYLAKE_X);
    // TRUE_PINBASED allowed-1 is 0x7f: posted interrupts (bit 7) are not available.
    assert_eq!(
        caps.pin.adjust(0x81),
        Err(ControlError { kind: ControlKind::Pin, desired: 0x81, unsupported: 0x80 })
    );
    // Sandy Bridge's secondary controls lack PML (bit 17).
    let (sandy, _) = caps_of(bochs::COREI7_SANDY_BRIDGE_2600K);
    let pml = crate::vmcs::SecondaryControls::ENABLE_PML.bits() | 0x2;
    assert_eq!(sandy.secondary.adjust(pml).map_err(|e| e.unsupported), Err(1 << 17));
    assert!(!sandy.secondary.accepts(1 << 17));
    // A value missing a must-be-1 bit is not accepted.
    assert!(!caps.pin.accepts(0x06));
}

#[test]
fn fixed_bits_of_the_recorded_cr0_and_cr4() {
    let (caps, _) = caps_of(bochs::COREI7_SKYLAKE_X);
    // PG, NE, PE must be 1 (no unrestricted-guest relief for the host).
    assert_eq!(caps.cr0.adjust(0x1), 0x8000_0021);
    assert_eq!(caps.cr0.check(0x8000_0011).map_err(|e| e.must_be_one), Err(0x20));
    assert!(caps.cr4.check(0x2020).is_ok());
    let (sandy, _) = caps_of(bochs::COREI7_SANDY_BRIDGE_2600K);
    // Sandy's CR4_FIXED1 0x627ff lacks bit 16 (FSGSBASE) that skylake's 0x3727ff has.
    assert_eq!(sandy.cr4.check(0x1_2020).map_err(|e| e.must_be_zero), Err(0x1_0000));
    assert!(caps.cr4.check(0x1_2020).is_ok());
}

#[test]
fn a_cpu_without_ept_is_refused_without_reading_absent_msrs() {
    let (caps, vmx) = caps_of(bochs::BX_GENERIC_LIKE);
    assert_eq!(vmx.absent_msr_reads(), [], "EPT_VPID_CAP must not be read when CTLS2 has no EPT/VPID");
    assert_eq!(caps.ept_vpid, EptVpidCap::empty());
    assert_eq!(caps.ept_features(), Err(CapsError::NoEpt { allowed1: 0xdd }));
}

#[test]
fn a_cpu_without_secondary_controls_is_refused_without_reading_ctls2() {
    // Primary allowed-1 without bit 31 (activate secondary controls).
    let msrs = [
        (crate::msr::IA32_VMX_BASIC, 0x00d8_1000_0000_002b),
        (crate::msr::IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_007f_0000_0016),
        (crate::msr::IA32_VMX_TRUE_PROCBASED_CTLS, 0x77f9_fffe_0400_6172),
        (crate::msr::IA32_VMX_TRUE_EXIT_CTLS, 0x007f_ffff_0003_6dfb),
        (crate::msr::IA32_VMX_TRUE_ENTRY_CTLS, 0x0000_ffff_0000_11fb),
        (crate::msr::IA32_VMX_CR0_FIXED0, 0x8000_0021),
        (crate::msr::IA32_VMX_CR0_FIXED1, 0xffff_ffff),
        (crate::msr::IA32_VMX_CR4_FIXED0, 0x2000),
        (crate::msr::IA32_VMX_CR4_FIXED1, 0x0037_27ff),
    ];
    let (caps, vmx) = caps_of(&msrs);
    assert_eq!(vmx.absent_msr_reads(), []);
    assert_eq!(caps.ept_features(), Err(CapsError::NoSecondaryControls { allowed1: 0x77f9_fffe }));
}

#[test]
fn without_true_controls_the_plain_control_msrs_are_read() {
    let msrs = [
        (crate::msr::IA32_VMX_BASIC, 0x0058_1000_0000_0001), // bit 55 clear
        (crate::msr::IA32_VMX_PINBASED_CTLS, 0x0000_007f_0000_0016),
        (crate::msr::IA32_VMX_PROCBASED_CTLS, 0xf7f9_fffe_0401_e172),
        (crate::msr::IA32_VMX_EXIT_CTLS, 0x007f_ffff_0003_6dff),
        (crate::msr::IA32_VMX_ENTRY_CTLS, 0x0000_ffff_0000_11ff),
        (crate::msr::IA32_VMX_PROCBASED_CTLS2, 0x0000_00ff_0000_0000),
        (crate::msr::IA32_VMX_EPT_VPID_CAP, 0x0000_0f01_0611_4141),
        (crate::msr::IA32_VMX_CR0_FIXED0, 0x8000_0021),
        (crate::msr::IA32_VMX_CR0_FIXED1, 0xffff_ffff),
        (crate::msr::IA32_VMX_CR4_FIXED0, 0x2000),
        (crate::msr::IA32_VMX_CR4_FIXED1, 0x0006_27ff),
    ];
    let (caps, vmx) = caps_of(&msrs);
    assert_eq!(vmx.absent_msr_reads(), []);
    // Without true controls CR3-load/store exiting (bits 15, 16) are default1 and stay set.
    assert_eq!(caps.primary.adjust(0x8000_0000), Ok(0x8401_e172));
    assert!(caps.ept_features().is_ok());
}

#[test]
fn ept_capability_errors_name_the_missing_piece() {
    let base = |cap: u64| {
        let mut msrs: alloc::vec::Vec<(u32, u64)> = bochs::COREI7_SKYLAKE_X.to_vec();
        for m in &mut msrs {
            if m.0 == crate::msr::IA32_VMX_EPT_VPID_CAP {
                m.1 = cap;
            }
        }
        caps_of(&msrs).0.ept_features()
    };
    let sky = 0x0000_0f01_0633_4141u64;
    let no_walk = sky & !(EptVpidCap::WALK_LENGTH_4.bits());
    assert_eq!(base(no_walk), Err(CapsError::NoWalkLength { cap: no_walk }));
    let five_only = no_walk | EptVpidCap::WALK_LENGTH_5.bits();
    assert_eq!(base(five_only).map(|f| f.walk_length), Ok(WalkLength::Five));
    assert_eq!(base(five_only).and_then(|f| f.mmu_config(false)).map(|c| c.root_level), Ok(Level::L5));
    let no_mem = sky & !(EptVpidCap::MEMTYPE_UC | EptVpidCap::MEMTYPE_WB).bits();
    assert_eq!(base(no_mem), Err(CapsError::NoMemoryType { cap: no_mem }));
    let uc_only = sky & !EptVpidCap::MEMTYPE_WB.bits();
    assert_eq!(base(uc_only).map(|f| f.memory_type), Ok(VmxMemoryType::Uncacheable));
    let no_invept = sky & !EptVpidCap::INVEPT.bits();
    assert_eq!(base(no_invept), Err(CapsError::NoInvept { cap: no_invept }));
    let single_only = sky & !EptVpidCap::INVEPT_ALL_CONTEXT.bits();
    assert_eq!(
        base(single_only).map(|f| f.invept),
        Ok(InveptSupport { single_context: true, all_context: false })
    );
    let no_ad = sky & !EptVpidCap::ACCESSED_DIRTY.bits();
    assert_eq!(base(no_ad).map(|f| f.pml), Ok(false), "PML needs A/D even with the PML control");
    let only_1g = sky & !EptVpidCap::PDE_2M.bits();
    assert_eq!(base(only_1g).map(|f| f.max_leaf_level), Ok(Level::L1));
}

#[test]
fn feature_control_must_be_locked_with_vmxon_enabled() {
    assert_eq!(VmxCapabilities::check_feature_control(0x5), Ok(()));
    assert_eq!(
        VmxCapabilities::check_feature_control(0x4),
        Err(CapsError::FeatureControlUnlocked { feature_control: 0x4 })
    );
    assert_eq!(
        VmxCapabilities::check_feature_control(0x3),
        Err(CapsError::VmxonDisabled { feature_control: 0x3 })
    );
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn i5_random_capability_msrs_decode_to_consistent_features_or_errors() {
    use crate::eptp::Eptp;
    use tdp_core::addr::Pfn;
    let mut seed = 0x1234_5678_9abc_def1u64;
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let mut msrs = bochs::COREI7_SKYLAKE_X.to_vec();
        for m in &mut msrs {
            // Keep BASIC's true-controls bit so the same MSRs are read; randomise everything else.
            m.1 = match m.0 {
                crate::msr::IA32_VMX_BASIC => m.1,
                _ => next(&mut seed),
            };
        }
        let (caps, vmx) = caps_of(&msrs);
        // Only MSRs the (random) CPU claims are read: CTLS2 when primary allows bit 31, the EPT cap
        // when CTLS2 allows EPT or VPID; the table has them all, so nothing absent is read.
        assert_eq!(vmx.absent_msr_reads(), []);
        match caps.ept_features() {
            Ok(f) => {
                ok += 1;
                assert!(!f.pml || f.accessed_dirty, "PML implies A/D");
                assert!(caps.primary.allows(1 << 31) && caps.secondary.allows(1 << 1));
                assert!(f.invept.single_context || f.invept.all_context);
                assert_eq!(f.mmu_config(true).is_ok(), f.pml);
                let cfg = f.mmu_config(f.pml).unwrap();
                let eptp = Eptp::new(&f, &cfg, Pfn(0x1234)).unwrap();
                assert_eq!(Eptp::from_raw(eptp.raw()), Ok(eptp));
                assert_eq!(
                    (eptp.walk_length(), eptp.accessed_dirty(), eptp.memory_type()),
                    (f.walk_length, f.accessed_dirty, f.memory_type)
                );
            }
            Err(_) => refused += 1,
        }
    }
    assert!(ok > 100 && refused > 100, "both outcomes exercised: {ok} ok, {refused} refused");
}

#[test]
fn adjust_results_always_hold_the_desired_and_required_bits() {
    let mut seed = 0x0fed_cba9_8765_4321u64;
    for _ in 0..50_000 {
        let raw = next(&mut seed);
        let allowed = AllowedControls::from_msr(ControlKind::Exit, raw);
        let desired = next(&mut seed) as u32 & allowed.allowed1();
        let desired =
            if next(&mut seed).is_multiple_of(3) { desired | (next(&mut seed) as u32) } else { desired };
        match allowed.adjust(desired) {
            Ok(v) => {
                assert_eq!(v & desired, desired);
                assert_eq!(v & allowed.allowed0(), allowed.allowed0());
                if allowed.allowed0() & !allowed.allowed1() == 0 {
                    assert!(allowed.accepts(v));
                }
            }
            Err(e) => {
                assert_eq!(e.unsupported, desired & !allowed.allowed1());
                assert_ne!(e.unsupported, 0);
            }
        }
    }
}
