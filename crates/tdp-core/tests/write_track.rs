//! Write tracking (KVM's page-track, for shadowing a nested hypervisor's tables) on the mock machine,
//! on EPT with and without A/D bits and on NPT: a tracked gfn is never writable in any root (the
//! `check_write_tracking` checker over every root, which is shown to catch a corrupted leaf), a write
//! to it is handed back for emulation, no huge leaf covers it, the fast path cannot undo the
//! protection, counts nest, and after untracking the next fault maps huge again.
//!
//! Checks: I1 (`Machine::check_all`, which includes `check_write_tracking`, after every phase).

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{Memslot, SlotFlags, TrackError};
use tdp_core::mmu::{EmulateReason, MmuConfig};
use tdp_core::spte::SpteFormat;
use tdp_mock::{AccessResult, HostConfig, Machine, Vcpu, Violation, check_write_tracking};

const EPT_NO_AD: MmuConfig = MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT };
const CONFIGS: [(&str, MmuConfig); 3] =
    [("ept", MmuConfig::EPT), ("ept-no-ad", EPT_NO_AD), ("npt", MmuConfig::NPT)];
/// The tracked gfn, inside the first 2 MiB of the slot.
const TRACKED: u64 = 7;

/// A machine whose host maps 2 MiB, a 4 MiB slot and one vCPU.
fn machine(cfg: MmuConfig, flags: SlotFlags) -> (Machine, Memslot, Vcpu) {
    let m = Machine::new(cfg, HostConfig { host_level: Level::L2, ..HostConfig::default() })
        .expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 1024, flags);
    m.mmu().write().insert_memslot(slot).expect("valid slot");
    let vcpu = m.new_vcpu(AsId(0));
    (m, slot, vcpu)
}

fn access(m: &Machine, vcpu: &mut Vcpu, gfn: u64, kind: AccessKind) -> AccessResult {
    vcpu.access(m.mmu(), Gpa(gfn * 4096 + 8), kind).expect("the access completes")
}

fn level(m: &Machine, vcpu: &Vcpu, gfn: u64) -> Option<Level> {
    let root = vcpu.root().expect("the vCPU has a root");
    m.mmu().lookup(root, Gfn(gfn)).map(|(_, level)| level)
}

fn track(m: &Machine, gfn: u64) {
    let flush = m.mmu().write().track_write(AsId(0), Gfn(gfn)).expect("a memslot gfn");
    flush.run(m.host());
}

#[test]
fn a_tracked_gfn_is_read_only_in_every_root_and_its_writes_are_emulated() {
    for (name, cfg) in CONFIGS {
        let (m, slot, mut vcpu) = machine(cfg, SlotFlags::empty());
        assert!(matches!(access(&m, &mut vcpu, 3, AccessKind::Write), AccessResult::Done { .. }), "{name}");
        assert_eq!(level(&m, &vcpu, TRACKED), Some(Level::L2), "{name}: one 2 MiB leaf before tracking");
        track(&m, TRACKED);
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        assert_eq!(
            access(&m, &mut vcpu, TRACKED, AccessKind::Write),
            AccessResult::Emulated(EmulateReason::WriteTracked),
            "{name}: a write to the tracked gfn exits"
        );
        // Neighbours are written through 4 KiB leaves: no huge leaf over the tracked gfn.
        assert!(matches!(access(&m, &mut vcpu, TRACKED + 1, AccessKind::Write), AccessResult::Done { .. }));
        assert_eq!(level(&m, &vcpu, TRACKED + 1), Some(Level::L1), "{name}");
        // A read maps it, read-only, at 4 KiB.
        match access(&m, &mut vcpu, TRACKED, AccessKind::Read) {
            AccessResult::Done { rights, .. } => assert!(!rights.contains(tdp_core::spte::Access::WRITE)),
            other => panic!("{name}: read of the tracked gfn gave {other:?}"),
        }
        assert_eq!(level(&m, &vcpu, TRACKED), Some(Level::L1), "{name}");
        // A new root (root invalidation) rebuilds the tree: still read-only there, and in the old root.
        let flush = m.mmu().write().invalidate_roots(Some(AsId(0)));
        flush.run(m.host());
        access(&m, &mut vcpu, TRACKED, AccessKind::Read);
        assert_eq!(
            access(&m, &mut vcpu, TRACKED, AccessKind::Write),
            AccessResult::Emulated(EmulateReason::WriteTracked),
            "{name}: after the root changed"
        );
        assert!(check_write_tracking(m.mmu()).is_ok_and(|checked| checked >= 2), "{name}: two roots checked");
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        vcpu.release(m.mmu());
    }
}

#[test]
fn the_checker_catches_a_writable_leaf_over_a_tracked_gfn() {
    let (m, _slot, mut vcpu) = machine(MmuConfig::EPT, SlotFlags::empty());
    track(&m, TRACKED);
    access(&m, &mut vcpu, TRACKED, AccessKind::Read);
    assert!(check_write_tracking(m.mmu()).is_ok());
    // Behind the MMU's back, give the read-only leaf W again.
    let root = vcpu.root().expect("a root").pfn();
    let host = m.host();
    let mut table = root;
    for shift in [27u32, 18, 9] {
        let entry = host.arena_table(table).expect("a table")[((TRACKED >> shift) & 511) as usize]
            .load(std::sync::atomic::Ordering::Relaxed);
        table = tdp_core::spte::Spte(entry).pfn();
    }
    let leaf = &host.arena_table(table).expect("the leaf table")[TRACKED as usize];
    leaf.fetch_or(tdp_core::spte::EptBits::WRITE.bits(), std::sync::atomic::Ordering::Relaxed);
    let found = check_write_tracking(m.mmu()).expect_err("a writable leaf over a tracked gfn");
    assert!(matches!(found[..], [Violation::WritableTrackedGfn { gfn: Gfn(TRACKED), level: Level::L1, .. }]));
    vcpu.release(m.mmu());
}

#[test]
fn the_fast_path_cannot_undo_tracking() {
    for (name, cfg) in CONFIGS {
        // Dirty logging leaves the leaf write-protected but MMU-writable: the fast path's case.
        let (m, slot, mut vcpu) = machine(cfg, SlotFlags::LOG_DIRTY);
        access(&m, &mut vcpu, TRACKED, AccessKind::Read);
        track(&m, TRACKED);
        for _ in 0..3 {
            assert_eq!(
                access(&m, &mut vcpu, TRACKED, AccessKind::Write),
                AccessResult::Emulated(EmulateReason::WriteTracked),
                "{name}"
            );
        }
        assert_eq!(vcpu.mmu_state().counters.fixed, 1, "{name}: only the first read was fixed");
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        vcpu.release(m.mmu());
    }
}

#[test]
fn counts_nest_and_untracking_lets_huge_leaves_back() {
    for (name, cfg) in CONFIGS {
        let (m, slot, mut vcpu) = machine(cfg, SlotFlags::empty());
        track(&m, TRACKED);
        track(&m, TRACKED);
        m.mmu().write().untrack_write(AsId(0), Gfn(TRACKED)).expect("tracked twice");
        assert_eq!(
            access(&m, &mut vcpu, TRACKED, AccessKind::Write),
            AccessResult::Emulated(EmulateReason::WriteTracked),
            "{name}: one count left"
        );
        access(&m, &mut vcpu, TRACKED, AccessKind::Read);
        assert_eq!(level(&m, &vcpu, TRACKED), Some(Level::L1), "{name}: read-only and small while tracked");
        m.mmu().write().untrack_write(AsId(0), Gfn(TRACKED)).expect("tracked once more");
        // The next write fault may map huge again: as KVM's, it replaces the table with a 2 MiB leaf.
        assert!(
            matches!(access(&m, &mut vcpu, TRACKED, AccessKind::Write), AccessResult::Done { .. }),
            "{name}"
        );
        assert_eq!(level(&m, &vcpu, TRACKED), Some(Level::L2), "{name}: huge again after untracking");
        assert_eq!(
            m.mmu().write().untrack_write(AsId(0), Gfn(TRACKED)),
            Err(TrackError::NotTracked { as_id: AsId(0), gfn: Gfn(TRACKED) })
        );
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        vcpu.release(m.mmu());
    }
}

#[test]
fn tracking_needs_a_memslot_and_dies_with_it() {
    let (m, _slot, vcpu) = machine(MmuConfig::EPT, SlotFlags::empty());
    assert_eq!(
        m.mmu().write().track_write(AsId(0), Gfn(5000)),
        Err(TrackError::NoSlot { as_id: AsId(0), gfn: Gfn(5000) })
    );
    assert_eq!(
        m.mmu().write().track_write(AsId(1), Gfn(TRACKED)),
        Err(TrackError::NoSlot { as_id: AsId(1), gfn: Gfn(TRACKED) })
    );
    track(&m, TRACKED);
    assert!(m.mmu().read().memslots().write_track().is_tracked(AsId(0), Gfn(TRACKED)));
    let flush = m.mmu().write().delete_memslot(AsId(0), SlotId(0)).expect("the slot exists");
    flush.run(m.host());
    assert!(m.mmu().read().memslots().write_track().is_empty(), "KVM frees the counts with the slot");
    drop(vcpu);
}

#[test]
fn stopping_logging_recovers_no_huge_leaf_over_a_tracked_gfn() {
    for (name, cfg) in CONFIGS {
        let (m, slot, mut vcpu) = machine(cfg, SlotFlags::LOG_DIRTY);
        // Two 2 MiB ranges mapped at 4 KiB while logging; a gfn of the first is tracked.
        for gfn in [3, TRACKED + 1, 600, 601] {
            access(&m, &mut vcpu, gfn, AccessKind::Write);
        }
        track(&m, TRACKED);
        let flush = m.mmu().write().set_memslot_flags(AsId(0), SlotId(0), SlotFlags::empty()).expect("slot");
        flush.run(m.host());
        assert_eq!(level(&m, &vcpu, 600), Some(Level::L2), "{name}: the untracked range is recovered");
        assert_eq!(level(&m, &vcpu, 3), Some(Level::L1), "{name}: the tracked gfn's range stays small");
        m.check_all(&[&vcpu], &[slot]).unwrap_or_else(|v| panic!("{name}: {v:?}"));
        vcpu.release(m.mmu());
    }
}
