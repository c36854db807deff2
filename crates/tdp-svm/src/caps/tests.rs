//! Capability decoding over every recorded Bochs model, and the errors for what a CPU can lack.

use tdp_core::addr::Level;

use super::*;
use crate::asid::TlbControl;
use crate::fake::{FakeSvm, bochs};

fn npt(model: bochs::BochsModel) -> Result<NptFeatures, CapsError> {
    SvmCapabilities::read(&FakeSvm::new(model)).npt_features()
}

#[test]
fn every_bochs_amd_model_decodes_as_recorded() {
    let with_asid_flush = |asids| NptFeatures {
        max_leaf_level: Level::L3,
        phys_bits: 40,
        asids,
        flush_one: TlbControl::FlushAsid,
        nrip_save: true,
        decode_assists: false,
    };
    assert_eq!(npt(bochs::RYZEN), Ok(with_asid_flush(32768)));
    assert_eq!(npt(bochs::ZAMBEZI), Ok(with_asid_flush(64)));
    assert_eq!(npt(bochs::TRINITY_APU), Ok(with_asid_flush(64)));
    let phenom = NptFeatures { flush_one: TlbControl::FlushAll, nrip_save: false, ..with_asid_flush(64) };
    assert_eq!(npt(bochs::PHENOM_8650_TOLIMAN), Ok(phenom));
    assert_eq!(npt(bochs::TURION64_TYLER), Err(CapsError::NoNestedPaging));
    assert_eq!(npt(bochs::ATHLON64_VENICE), Err(CapsError::NoSvm));
}

#[test]
fn vm_cr_is_read_only_when_cpuid_reports_svm() {
    for model in bochs::ALL {
        let caps = SvmCapabilities::read(&FakeSvm::new(*model));
        let has_svm =
            model.cpuid.iter().any(|&(leaf, r)| leaf == LEAF_EXT_FEATURES && r[2] & EXT_ECX_SVM != 0);
        assert_eq!(caps.svm, has_svm, "{}", model.name);
        if !has_svm {
            assert_eq!((caps.asids, caps.features), (0, SvmFeatureBits::empty()), "{}", model.name);
        }
    }
}

#[test]
fn firmware_disabled_svm_is_refused_and_enabling_it_would_fault() {
    let locked_off = bochs::BochsModel { vm_cr: msr::VM_CR_SVMDIS | msr::VM_CR_LOCK, ..bochs::RYZEN };
    let svm = FakeSvm::new(locked_off);
    let caps = SvmCapabilities::read(&svm);
    assert!(caps.disabled && caps.locked);
    assert_eq!(caps.npt_features(), Err(CapsError::Disabled { vm_cr: 0x18 }));
    svm.enable_svme();
    assert_eq!(svm.faults(), [crate::fake::Fault::EnableWithoutSvm]);
    assert_eq!(svm.rdmsr(msr::EFER) & msr::EFER_SVME, 0);
}

#[test]
fn missing_leaves_and_asids_are_reported_not_guessed() {
    let no_ext = bochs::BochsModel { cpuid: &[(LEAF_EXT_MAX, [0x8000_0000, 0, 0, 0])], ..bochs::RYZEN };
    let caps = SvmCapabilities::read(&FakeSvm::new(no_ext));
    assert_eq!((caps.svm, caps.phys_bits), (false, 36));
    let one_asid = bochs::BochsModel {
        cpuid: &[
            (LEAF_EXT_MAX, [0x8000_000a, 0, 0, 0]),
            (LEAF_EXT_FEATURES, [0, 0, EXT_ECX_SVM, 0]),
            (LEAF_SVM, [1, 1, 0, 1]),
        ],
        ..bochs::RYZEN
    };
    assert_eq!(npt(one_asid), Err(CapsError::NoGuestAsid { asids: 1 }));
}

#[test]
fn the_mmu_configuration_follows_the_cpu() {
    let ryzen = npt(bochs::RYZEN).unwrap();
    let config = ryzen.mmu_config();
    assert_eq!(
        (config.root_level, config.format.max_leaf_level(), config.pml),
        (Level::L4, Level::L3, false)
    );
    // 40 physical bits leave bit 51 reserved: MMIO SPTEs are usable (the #NPF Bochs reports has RSVD).
    assert!(config.format.has_mmio_caching());
    let small = NptFeatures { max_leaf_level: Level::L2, phys_bits: 52, ..ryzen };
    let config = small.mmu_config();
    assert_eq!(config.format.max_leaf_level(), Level::L2);
    assert!(!config.format.has_mmio_caching(), "no reserved address bit at 52 physical bits");
}
