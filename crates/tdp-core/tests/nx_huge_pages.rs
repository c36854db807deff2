//! The NX huge-page mitigation on the mock machine (EPT with A/D bits and NPT), as KVM documents it:
//! huge leaves are not executable; a fetch in a huge range maps its 4 KiB page executable and splits the
//! range, whose table is tracked; data accesses elsewhere stay huge, and in the split range they do not
//! rebuild the huge leaf over the executable pages; recovery zaps the oldest tracked tables (a given
//! fraction), after which the range maps huge again; dirty-logged slots are skipped; the switch
//! invalidates the roots. The mock's hardware enforces execute permission, so every fetch below really
//! fails on a non-executable leaf.
//!
//! Checks: I1-I3 (`Machine::check_all`) after every phase.

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::Access;
use tdp_mock::{AccessResult, HostConfig, Machine, Vcpu};

const CONFIGS: [(&str, MmuConfig); 2] = [("ept", MmuConfig::EPT), ("npt", MmuConfig::NPT)];

/// A machine whose host maps 2 MiB, an 8 MiB slot, the mitigation on, and one vCPU.
fn machine(cfg: MmuConfig) -> (Machine, Memslot, Vcpu) {
    let m = Machine::new(cfg, HostConfig { host_level: Level::L2, ..HostConfig::default() })
        .expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 4 * 512, SlotFlags::empty());
    m.mmu().write().insert_memslot(slot).expect("valid slot");
    m.mmu().write().set_nx_huge_pages(true).run(m.host());
    let vcpu = m.new_vcpu(AsId(0));
    (m, slot, vcpu)
}

/// Accesses `gfn` and returns the rights of the translation used.
fn access(m: &Machine, vcpu: &mut Vcpu, gfn: u64, kind: AccessKind) -> Access {
    match vcpu.access(m.mmu(), Gpa(gfn * 4096), kind).expect("the access completes") {
        AccessResult::Done { rights, .. } => rights,
        other => panic!("{kind:?} of gfn {gfn:#x} gave {other:?}"),
    }
}

fn level(m: &Machine, vcpu: &Vcpu, gfn: u64) -> Option<Level> {
    m.mmu().lookup(vcpu.root().expect("a root"), Gfn(gfn)).map(|(_, level)| level)
}

#[test]
fn an_executed_huge_range_is_split_and_recovered_once_execution_stops() {
    for (name, cfg) in CONFIGS {
        let (m, slot, mut vcpu) = machine(cfg);
        let rights = access(&m, &mut vcpu, 10, AccessKind::Read);
        assert_eq!(level(&m, &vcpu, 10), Some(Level::L2), "{name}: data maps huge");
        assert!(!rights.contains(Access::EXEC), "{name}: a huge leaf is not executable under NX");
        // A fetch in the same 2 MiB: its page executable at 4 KiB, the huge leaf split and tracked.
        assert!(access(&m, &mut vcpu, 20, AccessKind::Exec).contains(Access::EXEC), "{name}");
        assert_eq!(
            (level(&m, &vcpu, 20), level(&m, &vcpu, 10)),
            (Some(Level::L1), Some(Level::L1)),
            "{name}"
        );
        assert_eq!(m.mmu().stats().nx_huge_splits, 1, "{name}");
        // Another 2 MiB range stays huge; in the split one, data does not rebuild the huge leaf.
        access(&m, &mut vcpu, 600, AccessKind::Write);
        assert_eq!(level(&m, &vcpu, 600), Some(Level::L2), "{name}: data elsewhere stays huge");
        access(&m, &mut vcpu, 30, AccessKind::Write);
        assert_eq!(level(&m, &vcpu, 30), Some(Level::L1), "{name}: the executable page keeps its table");
        assert!(access(&m, &mut vcpu, 20, AccessKind::Exec).contains(Access::EXEC), "{name}");
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        // Execution stopped: recovery zaps the table and the next access maps huge again.
        let done = m.mmu().read().recover_nx_huge_pages(1);
        assert_eq!((done.zapped, done.dropped), (1, 0), "{name}");
        assert_eq!(level(&m, &vcpu, 30), None, "{name}: the range is unmapped");
        access(&m, &mut vcpu, 30, AccessKind::Read);
        assert_eq!(level(&m, &vcpu, 30), Some(Level::L2), "{name}: huge again after recovery");
        let stats = m.mmu().stats();
        assert_eq!((stats.nx_huge_splits, stats.nx_recovered), (0, 1), "{name}");
        // The trace events and the vCPU's counters saw the same story.
        let trace = m.host().trace_counts();
        let counters = vcpu.mmu_state().counters;
        assert_eq!((trace.huge_splits, trace.nx_recovered), (1, 1), "{name}: {trace:?}");
        assert_eq!(trace.faults, counters.taken, "{name}: one event per fault handled");
        assert_eq!(
            counters.taken,
            counters.fixed + counters.spurious + counters.retried + counters.emulated,
            "{name}: {counters:?}"
        );
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        vcpu.release(m.mmu());
    }
}

#[test]
fn recovery_zaps_the_oldest_fraction_and_skips_logged_slots() {
    let (m, slot, mut vcpu) = machine(MmuConfig::EPT);
    for range in 0..4u64 {
        access(&m, &mut vcpu, range * 512 + 7, AccessKind::Exec);
    }
    assert_eq!(m.mmu().stats().nx_huge_splits, 4);
    let done = m.mmu().read().recover_nx_huge_pages(2);
    assert_eq!((done.zapped, done.dropped), (2, 0), "half of four, oldest first");
    assert_eq!((level(&m, &vcpu, 7), level(&m, &vcpu, 512 + 7)), (None, None));
    assert_eq!(level(&m, &vcpu, 2 * 512 + 7), Some(Level::L1), "the newer two stay");
    // In a dirty-logged slot recovery only drops the tables from the list: a refault would be small.
    let flush =
        m.mmu().write().set_memslot_flags(AsId(0), SlotId(0), SlotFlags::LOG_DIRTY).expect("the slot");
    flush.run(m.host());
    let done = m.mmu().read().recover_nx_huge_pages(1);
    assert_eq!((done.zapped, done.dropped), (0, 2));
    assert_eq!(level(&m, &vcpu, 2 * 512 + 7), Some(Level::L1), "not zapped");
    assert_eq!(m.mmu().stats().nx_huge_splits, 0);
    assert_eq!(m.mmu().read().recover_nx_huge_pages(1), tdp_core::mmu::NxRecovery::default(), "nothing left");
    m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{v:?}"));
    vcpu.release(m.mmu());
}

#[test]
fn with_the_mitigation_off_huge_leaves_execute_and_nothing_is_tracked() {
    let m = Machine::new(MmuConfig::EPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })
        .expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 1024, SlotFlags::empty());
    m.mmu().write().insert_memslot(slot).expect("valid slot");
    let mut vcpu = m.new_vcpu(AsId(0));
    assert!(access(&m, &mut vcpu, 20, AccessKind::Exec).contains(Access::EXEC));
    assert_eq!(level(&m, &vcpu, 20), Some(Level::L2));
    assert_eq!(m.mmu().stats().nx_huge_splits, 0);
    // Turning it on invalidates the root (no executable huge leaf survives); again, nothing changes.
    m.mmu().write().set_nx_huge_pages(true).run(m.host());
    assert!(!m.mmu().root_is_valid(vcpu.root().expect("the old root, until the next fault reloads")));
    assert!(m.mmu().write().set_nx_huge_pages(true).is_none());
    assert!(access(&m, &mut vcpu, 20, AccessKind::Exec).contains(Access::EXEC));
    assert_eq!(level(&m, &vcpu, 20), Some(Level::L1), "a fetch maps small once the mitigation is on");
    m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{v:?}"));
    vcpu.release(m.mmu());
}
