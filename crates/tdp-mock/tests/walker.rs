//! The hardware walker on hand-built EPT and NPT trees: translations, exit qualifications and error
//! codes (as Bochs and the manuals give them), misconfigurations, A/D updates, and refusal to read
//! freed tables. Entries are built from the walker's own constants, never from `tdp_core::spte`.
//!
//! Checks: I1 at the bit level (the walker decodes what the manuals say) and I2 (a freed table ends the
//! walk instead of being read).

use std::sync::atomic::Ordering;

use tdp_core::addr::{AsId, Gpa, Level, Pfn};
use tdp_core::fault::AccessKind::{self, Exec, Read, Write};
use tdp_core::fault::{Fault, FaultKind};
use tdp_core::host::TableMemory;
use tdp_core::spte::{Access, Spte, TdpKind};
use tdp_mock::walker::decode::{ept, npt};
use tdp_mock::walker::npf_reserved_code;
use tdp_mock::{Hardware, HostConfig, MockHost, WalkMode, WalkOutcome, walk};

const EPT_HW: Hardware =
    Hardware { kind: TdpKind::Ept, accessed_dirty: true, max_leaf_level: Level::L3, max_phys_bits: 48 };
const NPT_HW: Hardware =
    Hardware { kind: TdpKind::Npt, accessed_dirty: true, max_leaf_level: Level::L3, max_phys_bits: 48 };
/// Where the test leaf points: a 2 MiB-aligned frame of guest RAM.
const FRAME: u64 = 0x4_0200;
/// EPT write-back memory type in bits 5:3.
const WB: u64 = 6 << 3;

/// A 4-level tree whose path for GPA 0 ends in `leaf` at level 2 (a 2 MiB page). Returns the host,
/// the root, and the frames of the tables on the path (L4, L3, L2).
fn tree(nonleaf: u64, nonpresent: u64, leaf: u64) -> (MockHost, [Pfn; 3]) {
    let host = MockHost::new(HostConfig { table_capacity: 8, ..HostConfig::default() });
    let tables = [(); 3].map(|_| host.alloc_table(Spte(nonpresent)).expect("a page"));
    for pair in tables.windows(2) {
        host.table(pair[0])[0].store(nonleaf | pair[1].hpa(), Ordering::SeqCst);
    }
    host.table(tables[2])[0].store(leaf, Ordering::SeqCst);
    (host, tables)
}

fn entry(host: &MockHost, table: Pfn) -> u64 {
    host.table(table)[0].load(Ordering::SeqCst)
}

fn go(host: &MockHost, hw: Hardware, root: Pfn, gpa: u64, access: AccessKind, mode: WalkMode) -> WalkOutcome {
    walk(host, hw, root, Level::L4, Gpa(gpa), access, mode)
}

#[test]
fn i1_ept_translates_and_sets_accessed_then_dirty() {
    let rwx = ept::R | ept::W | ept::X;
    let (host, t) = tree(rwx, 1 << 63, rwx | WB | ept::PS | (FRAME << 12));
    let out = go(&host, EPT_HW, t[0], 0x3456, Read, WalkMode::Peek);
    assert_eq!(out, WalkOutcome::Translated { pfn: Pfn(FRAME + 3), level: Level::L2, rights: Access::all() });
    assert!(t.iter().all(|&p| entry(&host, p) & ept::A == 0), "a peek sets nothing");
    go(&host, EPT_HW, t[0], 0x3456, Read, WalkMode::Access);
    assert!(t.iter().all(|&p| entry(&host, p) & ept::A != 0), "A in every entry used");
    assert_eq!(entry(&host, t[2]) & ept::D, 0, "no D for a read");
    go(&host, EPT_HW, t[0], 0x3456, Write, WalkMode::Access);
    assert_ne!(entry(&host, t[2]) & ept::D, 0, "D in the leaf for a write");
    assert_eq!(entry(&host, t[1]) & ept::D, 0, "never D in a non-leaf");
    let (plain, t) = tree(rwx, 1 << 63, rwx | WB | ept::PS | (FRAME << 12));
    go(&plain, Hardware { accessed_dirty: false, ..EPT_HW }, t[0], 0x3456, Write, WalkMode::Access);
    assert!(t.iter().all(|&p| entry(&plain, p) & (ept::A | ept::D) == 0), "A/D disabled in the EPTP");
}

#[test]
fn i1_ept_violation_qualifications_match_bochs_and_the_sdm() {
    let rwx = ept::R | ept::W | ept::X;
    let (host, t) = tree(rwx, 1 << 63, ept::R | ept::X | WB | ept::PS | (FRAME << 12));
    // Not present (GPA 1 GiB is behind a not-present L3 entry): bits 5:3 clear, bits 8:7 set.
    for (access, qual) in [(Read, 0x181), (Write, 0x182), (Exec, 0x184)] {
        assert_eq!(
            go(&host, EPT_HW, t[0], 1 << 30, access, WalkMode::Access),
            WalkOutcome::Violation { exit: qual }
        );
    }
    // A write to a present read+execute page: bits 3 and 5 report what the translation allowed.
    let out = go(&host, EPT_HW, t[0], 0x1000, Write, WalkMode::Access);
    assert_eq!(out, WalkOutcome::Violation { exit: 0x182 | 0x8 | 0x20 });
    let WalkOutcome::Violation { exit } = out else { unreachable!() };
    let fault = Fault::from_ept_violation(AsId(0), Gpa(0x1000), exit).expect("decodes");
    assert_eq!((fault.access, fault.kind), (Write, FaultKind::Violation { present: true }));
    assert_eq!(entry(&host, t[2]) & ept::A, 0, "no A/D update on a faulting walk");
}

#[test]
fn i1_ept_misconfigurations_end_the_walk() {
    let rwx = ept::R | ept::W | ept::X;
    let cases = [
        ("write without read", ept::W | ept::X | WB | ept::PS | (FRAME << 12)),
        ("memory type 3", rwx | (3 << 3) | ept::PS | (FRAME << 12)),
        ("address above MAXPHYADDR", rwx | WB | ept::PS | (1 << 50)),
        ("misaligned 2 MiB page", rwx | WB | ept::PS | ((FRAME + 1) << 12)),
    ];
    for (what, leaf) in cases {
        let (host, t) = tree(rwx, 1 << 63, leaf);
        assert_eq!(go(&host, EPT_HW, t[0], 0, Read, WalkMode::Access), WalkOutcome::Misconfig, "{what}");
    }
    let (host, t) = tree(rwx, 1 << 63, 0);
    host.table(t[0])[1].store(rwx | ept::PS | WB, Ordering::SeqCst);
    assert_eq!(
        go(&host, EPT_HW, t[0], 512 << 30, Read, WalkMode::Peek),
        WalkOutcome::Misconfig,
        "PS in a PML4E"
    );
}

#[test]
fn i1_npt_error_codes_match_the_apm() {
    let table = npt::P | npt::RW | npt::US;
    let (host, t) = tree(table, 0, npt::P | npt::US | npt::NX | npt::PS | (FRAME << 12));
    let not_present = 1 << 32 | 0x4; // final translation, user
    assert_eq!(
        go(&host, NPT_HW, t[0], 1 << 30, Write, WalkMode::Peek),
        WalkOutcome::Violation { exit: not_present | 0x2 }
    );
    assert_eq!(
        go(&host, NPT_HW, t[0], 1 << 30, Exec, WalkMode::Peek),
        WalkOutcome::Violation { exit: not_present | 0x10 }
    );
    let rights = Access::READ;
    let out = go(&host, NPT_HW, t[0], 0x5000, Read, WalkMode::Peek);
    assert_eq!(out, WalkOutcome::Translated { pfn: Pfn(FRAME + 5), level: Level::L2, rights });
    // Write to a read-only page, fetch from an NX page: protection faults with P.
    assert_eq!(
        go(&host, NPT_HW, t[0], 0x5000, Write, WalkMode::Peek),
        WalkOutcome::Violation { exit: not_present | 0x3 }
    );
    assert_eq!(
        go(&host, NPT_HW, t[0], 0x5000, Exec, WalkMode::Peek),
        WalkOutcome::Violation { exit: not_present | 0x11 }
    );
    // U clear in a non-leaf entry: nested walks are user accesses.
    host.table(t[1])[0].fetch_and(!npt::US, Ordering::SeqCst);
    assert_eq!(
        go(&host, NPT_HW, t[0], 0x5000, Read, WalkMode::Peek),
        WalkOutcome::Violation { exit: not_present | 0x1 }
    );
    // Bit 51 (reserved below MAXPHYADDR 52) gives a reserved-bit fault.
    host.table(t[1])[0].fetch_or(npt::US | 1 << 51, Ordering::SeqCst);
    assert_eq!(go(&host, NPT_HW, t[0], 0x5000, Read, WalkMode::Peek), WalkOutcome::Misconfig);
    assert_eq!(npf_reserved_code(Read), 1 << 32 | 0x4 | 0x8 | 0x1);
    let fault = Fault::from_npf(AsId(0), Gpa(0x5000), npf_reserved_code(Write)).expect("decodes");
    assert_eq!((fault.access, fault.kind), (Write, FaultKind::Misconfig));
}

#[test]
fn i1_npt_sets_accessed_and_dirty_always() {
    let table = npt::P | npt::RW | npt::US;
    let (host, t) = tree(table, 0, table | npt::PS | (FRAME << 12));
    // Even with accessed_dirty false: NPT has no switch for them.
    let hw = Hardware { accessed_dirty: false, ..NPT_HW };
    assert!(matches!(go(&host, hw, t[0], 0x1000, Write, WalkMode::Access), WalkOutcome::Translated { .. }));
    assert!(t.iter().all(|&p| entry(&host, p) & npt::A != 0));
    assert_ne!(entry(&host, t[2]) & npt::D, 0);
    assert_eq!(entry(&host, t[1]) & npt::D, 0);
}

#[test]
fn i2_the_walker_never_reads_a_freed_table() {
    let rwx = ept::R | ept::W | ept::X;
    let (host, t) = tree(rwx, 1 << 63, rwx | WB | ept::PS | (FRAME << 12));
    host.free_table_now(t[2]);
    assert_eq!(go(&host, EPT_HW, t[0], 0, Read, WalkMode::Access), WalkOutcome::FreedTable { pfn: t[2] });
    // A deferred page is still readable: a walker may be inside it.
    let (host, t) = tree(rwx, 1 << 63, rwx | WB | ept::PS | (FRAME << 12));
    let guard = host.begin_walk();
    host.free_table_deferred(t[2]);
    assert!(matches!(go(&host, EPT_HW, t[0], 0, Read, WalkMode::Access), WalkOutcome::Translated { .. }));
    drop(guard);
    assert_eq!(go(&host, EPT_HW, t[0], 0, Read, WalkMode::Access), WalkOutcome::FreedTable { pfn: t[2] });
    // A frame outside the arena is not a table either.
    host.table(t[1])[0].store(rwx | (FRAME << 12), Ordering::SeqCst);
    assert_eq!(
        go(&host, EPT_HW, t[0], 0, Read, WalkMode::Access),
        WalkOutcome::FreedTable { pfn: Pfn(FRAME) }
    );
}

#[test]
fn i1_hardware_matches_each_mmu_config() {
    use tdp_core::mmu::MmuConfig;
    let ept = Hardware::for_config(&MmuConfig::EPT);
    assert_eq!(ept, EPT_HW);
    assert!(Hardware::for_config(&MmuConfig::NPT).sets_accessed_dirty());
    let no_ad = MmuConfig { format: tdp_core::spte::SpteFormat::EPT_NO_AD, ..MmuConfig::EPT };
    assert!(!Hardware::for_config(&no_ad).sets_accessed_dirty());
}
