//! Tests of the scenario's data, its expectations, its judge and its EPT and NPT decoding.

use super::tables::{EPT_PS, EPT_W, NPT_D, NPT_NX, NPT_P, NPT_PS, NPT_RSVD_51, NPT_W};
use super::*;
use tdp_core::sync::Ordering;

#[test]
fn the_scenario_is_runnable() {
    assert_eq!(SCENARIO.validate(), Ok(()));
}

#[test]
fn expected_harvests_follow_logging_and_resets() {
    let h = SCENARIO.expected_harvests();
    assert_eq!(h.len(), 7);
    assert!(h[0].is_empty(), "nothing is logged before logging starts");
    assert_eq!(h[1], [0x201, 0x202, 0x411, 0x412].into_iter().collect());
    assert_eq!(h[2], [0x202, 0x300].into_iter().collect());
    assert!(h[3].is_empty());
    let range: BTreeSet<u64> = (0x250..0x480).collect();
    assert_eq!((&h[4], &h[5]), (&range, &range), "every page of the range, twice");
    assert!(range.len() > 512, "more pages than a PML log holds");
    assert_eq!(h[6], [0x411, 0x420].into_iter().collect(), "a write to an aged page, one to a moved page");
}

#[test]
fn aging_expects_what_was_touched_since_the_last_age() {
    let young = SCENARIO.expected_young();
    let tail: BTreeSet<u64> = (0x400..0x480).collect();
    assert_eq!(young, [tail, [0x410, 0x411].into_iter().collect(), BTreeSet::new()]);
    static STEPS: [Step; 3] = [
        w(0x411, 0, 1),
        Step::Remap { gpa: Gpa(0x420 * 4096) },
        Step::Age { gpa: Gpa(0x400 * 4096), pages: 0x80 },
    ];
    let zapped = Scenario { steps: &STEPS, ..SCENARIO };
    assert_eq!(zapped.expected_young(), [BTreeSet::new()], "the remap's invalidation unmapped 0x411");
}

#[test]
fn a_moved_page_goes_to_the_pool_and_keeps_its_last_write() {
    assert_eq!(SCENARIO.remap_targets(), [(0x420, 0)]);
    assert_eq!(SCENARIO.expected_host_reads(), [(0x420 * 4096 + 0x808, 0xaaaa_0000_0000_0420)]);
    for b in Broken::ALL {
        assert_eq!(Broken::from_name(b.name()), Some(b));
    }
    assert_eq!(Broken::from_name("tlb"), None);
}

#[test]
fn huge_ranges_are_expected_at_level_2_before_logging() {
    assert_eq!(
        SCENARIO.expected_early_levels(),
        [(0x201, 2), (0x240, 2), (0x3f0, 2), (0x410, 1), (0x411, 1)],
        "0x200..0x400 is one 2 MiB range of the data slot; 0x400.. is its tail"
    );
}

#[test]
fn reads_expect_the_last_write() {
    let last = SCENARIO.steps.iter().position(|s| *s == r(0x47f, 0x800)).unwrap();
    assert_eq!(SCENARIO.expected_read(last), Some(0x8888_0000_0000_0002), "the second range write");
    assert_eq!(SCENARIO.expected_read(1), Some(0x1111_0000_0000_0201));
    assert_eq!(SCENARIO.expected_read(4), Some(0), "never written");
    assert_eq!(SCENARIO.expected_read(0), None, "a write");
}

#[test]
fn a_bad_step_is_named() {
    let bad = Scenario { steps: &[Step::Write { gpa: Gpa(0x1000), value: 1 }], ..SCENARIO };
    assert_eq!(bad.validate().map_err(|e| e.index), Err(0), "the system slot is not the data slot");
}

fn perfect_run() -> Observed {
    let s = &SCENARIO;
    Observed {
        steps_completed: s.steps.len(),
        harvests: s.expected_harvests(),
        mmio_reads: s.expected_mmio_reads(),
        mmio_writes: s.expected_mmio_writes(),
        translations: s
            .sample_gfns()
            .into_iter()
            .map(|gfn| {
                let moved = s.remap_targets().into_iter().find(|&(g, _)| g == gfn);
                let kind = moved.map_or(Mapping::NotPresent, |(_, page)| Mapping::Leaf {
                    slot: REMAP_POOL_SLOT,
                    page,
                    level: 1,
                    rwx: 7,
                });
                Translation { gfn, kind }
            })
            .collect(),
        young: s.expected_young(),
        host_reads: s.expected_host_reads(),
        early_translations: s
            .expected_early_levels()
            .into_iter()
            .map(|(gfn, level)| Translation {
                gfn,
                kind: Mapping::Leaf { slot: 1, page: gfn - 0x200, level, rwx: 7 },
            })
            .collect(),
        snapshots: s
            .snapshots()
            .map(|snap| SnapshotSeen {
                faults: snap.faults.unwrap_or(0),
                exec_faults: snap.exec_faults.unwrap_or(0),
                translations: snap
                    .leaves
                    .iter()
                    .map(|l| {
                        let slot = s.slot_of(Gfn(l.gfn)).unwrap();
                        let rwx = 1
                            | if l.write == Some(true) { 2 } else { 0 }
                            | if l.exec == Some(true) { 4 } else { 0 };
                        let (page, level) = (l.gfn - slot.base_gfn.0, l.level);
                        let kind = if level == 0 {
                            Mapping::NotPresent
                        } else {
                            Mapping::Leaf { slot: slot.id.0, page, level, rwx }
                        };
                        Translation { gfn: l.gfn, kind }
                    })
                    .collect(),
            })
            .collect(),
        tracked_writes: s.expected_tracked_writes(),
        ..Observed::default()
    }
}

#[test]
fn each_feature_check_sees_its_mistake() {
    assert_eq!(SCENARIO.expected_tracked_writes(), [(0x430 * 4096 + 0x18, 0xbbbb_0000_0000_0430)]);
    let failed = |seen: &Observed| -> Vec<&'static str> {
        SCENARIO.evaluate(seen).into_iter().filter(|c| !c.ok).map(|c| c.name).collect()
    };
    let mut refault = perfect_run();
    refault.snapshots[0].faults = 1;
    assert_eq!(failed(&refault), [Broken::Recover.must_fail()]);
    let mut writable = perfect_run();
    writable.tracked_writes.clear();
    assert_eq!(failed(&writable), [Broken::Track.must_fail()]);
    let mut no_exit = perfect_run();
    no_exit.snapshots[4].exec_faults = 0;
    assert_eq!(failed(&no_exit), [Broken::Nx.must_fail()]);
    let mut executable = perfect_run();
    let Mapping::Leaf { rwx, .. } = &mut executable.snapshots[3].translations[0].kind else { panic!() };
    *rwx |= 4;
    assert_eq!(failed(&executable), [Broken::Nx.must_fail()], "a huge leaf executable under NX");
    let mut missing = perfect_run();
    missing.snapshots.truncate(2);
    assert_eq!(failed(&missing), [Broken::Track.must_fail(), Broken::Nx.must_fail()]);
}

#[test]
fn evaluate_passes_a_perfect_run_and_names_what_a_broken_one_lost() {
    assert!(SCENARIO.evaluate(&perfect_run()).iter().all(|c| c.ok));
    let mut lost = perfect_run();
    lost.harvests[1].remove(&0x202);
    let failed: Vec<Check> = SCENARIO.evaluate(&lost).into_iter().filter(|c| !c.ok).collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].detail.contains("missing {202}"), "{}", failed[0].detail);
    let mut extra = perfect_run();
    extra.harvests[2].insert(0x203);
    assert!(SCENARIO.evaluate(&extra).iter().any(|c| !c.ok), "a page never written must not pass");
}

#[test]
fn evaluate_allows_guest_page_tables_and_rejects_foreign_frames() {
    let mut pt = perfect_run();
    pt.harvests[1].insert(GUEST_TABLE_GFNS[0]);
    assert!(SCENARIO.evaluate(&pt).iter().all(|c| c.ok), "hardware A/D may dirty the guest's tables");
    let mut wrong = perfect_run();
    wrong.translations[0].kind = Mapping::Leaf { slot: 1, page: 7, level: 1, rwx: 7 };
    assert!(SCENARIO.evaluate(&wrong).iter().any(|c| !c.ok && c.name.contains("I1")));
    let mut small = perfect_run();
    small.early_translations[0].kind = Mapping::Leaf { slot: 1, page: 1, level: 1, rwx: 7 };
    assert!(SCENARIO.evaluate(&small).iter().any(|c| !c.ok && c.name.contains("2 MiB")));
    let mut stale_age = perfect_run();
    stale_age.young[2].insert(0x410);
    assert!(SCENARIO.evaluate(&stale_age).iter().any(|c| !c.ok && c.name == Broken::Age.must_fail()));
    let mut stale_frame = perfect_run();
    let moved = stale_frame.translations.iter_mut().find(|t| t.gfn == 0x420).unwrap();
    moved.kind = Mapping::Leaf { slot: 1, page: 0x220, level: 1, rwx: 7 };
    let failed: Vec<&str> =
        SCENARIO.evaluate(&stale_frame).into_iter().filter(|c| !c.ok).map(|c| c.name).collect();
    assert!(
        failed.contains(&Broken::Remap.must_fail()) && failed.iter().any(|n| n.contains("I1")),
        "{failed:?}"
    );
    let mut old_bytes = perfect_run();
    old_bytes.host_reads[0].1 = 0;
    assert!(SCENARIO.evaluate(&old_bytes).iter().any(|c| !c.ok && c.name == Broken::Remap.must_fail()));
    let mut flush = perfect_run();
    flush.flushes = 2;
    assert!(SCENARIO.evaluate(&flush).iter().any(|c| !c.ok && c.name.contains("INVEPT")));
}

#[test]
fn translate_decodes_leaves_mmio_and_holes() {
    // root 1 -> table 2 -> table 3 -> a 2 MiB leaf at gfn 0x200 backed by host 0x40_0000.
    let read = |t: u64, i: usize| match (t, i) {
        (1, 0) => (2 << 12) | 7,
        (2, 0) => (3 << 12) | 7,
        (3, 1) => 0x40_0000 | EPT_PS | 3,
        (3, 4) => EPT_W,
        _ => 0,
    };
    let bases = [(1, 0x40_0000, 0x280)];
    let ept = |gfn| translate(Paging::Ept, read, 1, gfn, &bases);
    assert_eq!(ept(0x205), Mapping::Leaf { slot: 1, page: 5, level: 2, rwx: 3 });
    assert_eq!(ept(0x800), Mapping::Mmio);
    assert_eq!(ept(0x600), Mapping::NotPresent);
}

#[test]
fn translate_decodes_npt_leaves_mmio_and_holes() {
    // The same tree in NPT's format: non-leaf entries P|W|U, a writable 2 MiB leaf with A/D and the PAT
    // bit (12) set, a read-only 4 KiB no-execute leaf, and tdp-core's MMIO entry (P and bit 51).
    let read = |t: u64, i: usize| match (t, i) {
        (1, 0) => (2 << 12) | 7,
        (2, 0) => (3 << 12) | 7,
        (3, 1) => 0x40_0000 | 0x1000 | NPT_PS | NPT_D | 0x20 | NPT_W | NPT_P,
        (3, 2) => (4 << 12) | 7,
        (4, 3) => 0x60_3000 | NPT_NX | NPT_P,
        (3, 4) => NPT_RSVD_51 | NPT_P | (0x800 << 12),
        (3, 5) => 0x40_0000 | NPT_W, // not present: P clear
        _ => 0,
    };
    let bases = [(1, 0x40_0000, 0x280)];
    let npt = |gfn| translate(Paging::Npt, read, 1, gfn, &bases);
    assert_eq!(npt(0x205), Mapping::Leaf { slot: 1, page: 5, level: 2, rwx: 7 }, "the PAT bit is no address");
    assert_eq!(npt(0x403), Mapping::Leaf { slot: 1, page: 0x203, level: 1, rwx: 1 });
    assert_eq!(npt(0x800), Mapping::Mmio);
    assert_eq!((npt(0xa00), npt(0x600)), (Mapping::NotPresent, Mapping::NotPresent));
}

#[test]
fn unprotecting_npt_leaves_sets_w_and_d() {
    let tables: Vec<tdp_core::host::Table> =
        (0..4).map(|_| core::array::from_fn(|_| Default::default())).collect();
    let set = |t: usize, i: usize, v: u64| tables[t][i].store(v, Ordering::Relaxed);
    set(0, 0, (1 << 12) | 7);
    set(1, 0, (2 << 12) | 7);
    set(2, 1, (3 << 12) | 7);
    set(3, 5, 0x40_5000 | NPT_P); // a read-only 4 KiB leaf
    set(3, 6, NPT_RSVD_51 | NPT_P); // MMIO: untouched
    let changed = unprotect_leaves(Paging::Npt, |pfn| tables.get(pfn as usize), 0, 0x200, 0x200, false);
    assert_eq!(changed, 1);
    assert_eq!(tables[3][5].load(Ordering::Relaxed), 0x40_5000 | NPT_P | NPT_W | NPT_D);
    assert_eq!(tables[3][6].load(Ordering::Relaxed), NPT_RSVD_51 | NPT_P);
}
