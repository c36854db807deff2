//! Every bit position of both formats, checked against a transcription of the Intel SDM and AMD APM
//! tables, and the constructors' invariants.

use super::*;
use crate::addr::PtIndex;

/// (name, bit) from Intel SDM Vol. 3C, "Format of an EPT Page-Table Entry that Maps a 4-KByte Page" and
/// "Format of an EPT Page-Directory Entry (PDE) that Maps a 2-MByte Page".
const SDM_EPT: &[(&str, u32)] = &[
    ("read", 0),
    ("write", 1),
    ("execute", 2),
    ("ignore PAT", 6),
    ("page size (PDE)", 7),
    ("accessed", 8),
    ("dirty", 9),
    ("user-mode execute", 10),
    ("suppress #VE", 63),
];

/// (name, bit) from AMD APM Vol. 2, "4-Kbyte PTE—Long Mode" and "2-Mbyte PDE—Long Mode".
const APM_NPT: &[(&str, u32)] = &[
    ("P", 0),
    ("R/W", 1),
    ("U/S", 2),
    ("PWT", 3),
    ("PCD", 4),
    ("A", 5),
    ("D", 6),
    ("PS (PDE)", 7),
    ("G", 8),
    ("NX", 63),
];

#[test]
fn ept_bits_match_the_sdm_tables() {
    let ours = [
        EptBits::READ,
        EptBits::WRITE,
        EptBits::EXEC,
        EptBits::IGNORE_PAT,
        EptBits::PAGE_SIZE,
        EptBits::ACCESSED,
        EptBits::DIRTY,
        EptBits::USER_EXEC,
        EptBits::SUPPRESS_VE,
    ];
    for (flag, (name, bit)) in ours.iter().zip(SDM_EPT) {
        assert_eq!(flag.bits(), 1 << bit, "EPT {name}");
    }
    assert_eq!(EptBits::MEMTYPE.bits(), 0b111 << 3, "EPT memory type is bits 5:3");
}

#[test]
fn npt_bits_match_the_apm_figures() {
    let ours = [
        NptBits::PRESENT,
        NptBits::WRITE,
        NptBits::USER,
        NptBits::PWT,
        NptBits::PCD,
        NptBits::ACCESSED,
        NptBits::DIRTY,
        NptBits::PAGE_SIZE,
        NptBits::GLOBAL,
        NptBits::NO_EXEC,
    ];
    for (flag, (name, bit)) in ours.iter().zip(APM_NPT) {
        assert_eq!(flag.bits(), 1 << bit, "NPT {name}");
    }
}

fn attrs(write: LeafWrite, exec: bool) -> LeafAttrs {
    LeafAttrs { write, exec, memtype: MemType::WriteBack, accessed: true }
}

#[test]
fn spte_w_implies_mmu_w_implies_host_w() {
    for fmt in [SpteFormat::EPT_AD, SpteFormat::EPT_NO_AD, SpteFormat::NPT] {
        for write in [
            LeafWrite::ReadOnly { host_writable: false },
            LeafWrite::ReadOnly { host_writable: true },
            LeafWrite::WriteProtected,
            LeafWrite::Writable,
            LeafWrite::WritableClean,
        ] {
            let leaf = fmt.leaf(Pfn(0x200), Level::L2, attrs(write, true));
            assert_eq!(fmt.check(leaf, Level::L2), Ok(()), "{fmt:?} {write:?}");
            assert_eq!(leaf.is_writable(), matches!(write, LeafWrite::Writable | LeafWrite::WritableClean));
            assert_eq!(fmt.is_dirty(leaf), write == LeafWrite::Writable && fmt.has_accessed_dirty());
        }
        let writable = fmt.leaf(Pfn(1), Level::L1, attrs(LeafWrite::Writable, true));
        let w_without_mmu_w = Spte(writable.0 & !fmt.mmu_writable_mask);
        assert!(matches!(
            fmt.check(w_without_mmu_w, Level::L1),
            Err(SpteCheckError::WritableInvariant { .. })
        ));
        let protected = fmt.leaf(Pfn(1), Level::L1, attrs(LeafWrite::WriteProtected, true));
        let mmu_w_without_host_w = Spte(protected.0 & !fmt.host_writable_mask);
        assert!(fmt.check(mmu_w_without_host_w, Level::L1).is_err());
    }
}

#[test]
fn leaves_encode_frame_level_and_rights_in_hardware_bits() {
    let ept = SpteFormat::EPT_AD;
    let leaf = ept.leaf(Pfn(0x40000), Level::L3, attrs(LeafWrite::Writable, false));
    assert_eq!(leaf.0 & 0b111, 0b011, "EPT R and W, no X");
    assert_eq!((leaf.0 >> 3) & 0b111, 6, "write-back memory type");
    assert!(leaf.is_large() && leaf.pfn() == Pfn(0x40000));
    assert!(ept.is_dirty(leaf) && ept.is_accessed(leaf));
    assert_eq!(ept.access(leaf), Access::READ | Access::WRITE);

    let npt = SpteFormat::NPT;
    let leaf = npt.leaf(Pfn(0x1234), Level::L1, attrs(LeafWrite::ReadOnly { host_writable: true }, false));
    assert_eq!(leaf.0 & 0b111, 0b101, "NPT P and U, no R/W");
    assert_ne!(leaf.0 & NptBits::NO_EXEC.bits(), 0, "no-exec is NX set");
    assert!(!leaf.is_large());
    assert_eq!(npt.access(leaf), Access::READ);
    let x = npt.leaf(Pfn(0x1234), Level::L1, attrs(LeafWrite::Writable, true));
    assert_eq!(npt.access(x), Access::all());
}

#[test]
fn nonleaf_sptes_grant_everything_and_are_not_leaves() {
    for fmt in [SpteFormat::EPT_AD, SpteFormat::NPT] {
        let table = fmt.nonleaf(Pfn(0x777));
        assert!(table.is_table(Level::L4) && table.is_table(Level::L2));
        assert_eq!(fmt.child_table(table, Level::L3), Some(Pfn(0x777)));
        assert_eq!(fmt.access(table), Access::all());
        assert_eq!(fmt.check(table, Level::L4), Ok(()));
    }
}

#[test]
fn split_children_cover_the_huge_page_with_its_rights() {
    for fmt in [SpteFormat::EPT_AD, SpteFormat::NPT] {
        let huge = fmt.leaf(Pfn(0x4_0000), Level::L3, attrs(LeafWrite::Writable, true));
        let i = PtIndex::new(3).unwrap();
        let mid = fmt.split_child(huge, Level::L3, i);
        assert_eq!(mid.pfn(), Pfn(0x4_0000 + 3 * 512));
        assert!(mid.is_leaf(Level::L2) && mid.is_large());
        let small = fmt.split_child(mid, Level::L2, PtIndex::new(511).unwrap());
        assert_eq!(small.pfn(), Pfn(0x4_0000 + 3 * 512 + 511));
        assert!(!small.is_large(), "PS is cleared at 4 KiB");
        assert_eq!(fmt.access(small), fmt.access(huge));
        assert_eq!(fmt.check(small, Level::L1), Ok(()));
    }
}

#[test]
fn mmio_sptes_round_trip_and_stay_apart_from_present_and_frozen() {
    for fmt in [SpteFormat::EPT_AD, SpteFormat::NPT] {
        for generation in [0, 1, 0xff, 0x100, (1 << MMIO_GEN_BITS) - 1, 1 << MMIO_GEN_BITS] {
            let spte = fmt.mmio(Gfn(0xabcde), generation).unwrap();
            assert!(fmt.is_mmio(spte) && !spte.is_present() && !fmt.is_frozen(spte));
            assert_eq!(fmt.mmio_gfn(spte), Gfn(0xabcde));
            assert!(fmt.mmio_generation_matches(spte, generation));
            assert!(!fmt.mmio_generation_matches(spte, generation + 1));
        }
    }
    let ept_mmio = SpteFormat::EPT_AD.mmio(Gfn(1), 0).unwrap();
    assert_eq!(ept_mmio.0 & 0b111, 0b110, "W+X without R is an EPT misconfiguration");
    let npt_52 = SpteFormat::npt(NptOptions { max_phys_bits: 52, max_leaf_level: Level::L3 });
    assert_eq!(npt_52.mmio(Gfn(1), 0), None, "no reserved bit left for MMIO at MAXPHYADDR 52");
}

#[test]
fn nonpresent_and_frozen_values_are_not_present_to_hardware() {
    let ept = SpteFormat::EPT_AD;
    assert_eq!(ept.nonpresent().0, 1 << 63, "KVM's SHADOW_NONPRESENT_VALUE");
    assert_eq!(ept.frozen().0 & 0b111, 0, "EPT entries with R=W=X=0 are not present");
    assert_eq!(SpteFormat::NPT.frozen().0 & 1, 0, "NPT entries with P=0 are not present");
}

#[test]
fn dirty_log_transitions_keep_the_writable_invariant() {
    for fmt in [SpteFormat::EPT_AD, SpteFormat::EPT_NO_AD, SpteFormat::NPT] {
        let leaf = fmt.leaf(Pfn(7), Level::L1, attrs(LeafWrite::Writable, true));
        let wp = fmt.write_protected(leaf);
        assert!(!wp.is_writable() && fmt.is_mmu_writable(wp) && fmt.check(wp, Level::L1).is_ok());
        let back = fmt.made_writable(wp);
        assert_eq!(back, leaf, "the fast path restores exactly the writable leaf");
        let clean = fmt.cleaned(leaf);
        assert!(clean.is_writable() && !fmt.is_dirty(clean));
        assert_eq!(clean, fmt.leaf(Pfn(7), Level::L1, attrs(LeafWrite::WritableClean, true)));
    }
}
