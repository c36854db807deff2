//! The shared scenario on `tdp-mock`, in the dirty-logging modes the Bochs hypervisors use (EPT with PML,
//! EPT with write protection, NPT with write protection): every check
//! passes, the harvests are exactly the scenario's expected sets, and the data-slot pages written while
//! logging end up mapped by 4 KiB leaves of their own slot page; aging reports exactly the pages touched
//! since the last age; the page the host moved is mapped to its new frame, which holds its last write.
//! Each broken variant (leaves unprotected behind the MMU's back, aging that never clears, a page moved
//! without the MMU notifier, the NX mitigation left off, a tracked page never tracked, huge ranges
//! zapped after logging stops: what `bochs-hv --features broken-<name>` does) must fail its own check
//! and only the checks that follow from it. After logging stops, the split huge range is back at
//! 2 MiB with no refault; a tracked page's write is emulated; a fetch under NX huge pages faults once. The two-vCPU part passes in every mode.

#[path = "../examples/scenario_mock/run.rs"]
mod run;
#[path = "../examples/scenario_mock/smp.rs"]
mod smp;

use run::Mode;
use tdp_metal::scenario::{Broken, Mapping, Paging, REMAP_POOL_SLOT, SCENARIO};

fn check(model: &str, mode: Mode) {
    let result = run::run(model, mode, None).unwrap();
    let failed: Vec<_> = result.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty() && result.passed(), "{model}: failed checks {failed:#?}");
    assert_eq!(result.seen.harvests, SCENARIO.expected_harvests(), "{model}");
    assert!(result.line.starts_with("TDP-RESULT {") && result.line.contains("\"verdict\":\"pass\""));
    // (0x411 and 0x412, in the tail, were unmapped by the remap's invalidation of 0x400..0x600.) The
    // translations are sampled at the NX step, after logging stopped: the pages written at 4 KiB
    // while logging are mapped by the 2 MiB leaf recovered in place.
    for gfn in [0x201, 0x202, 0x300] {
        let t = result.seen.translations.iter().find(|t| t.gfn == gfn).unwrap();
        assert!(
            matches!(t.kind, Mapping::Leaf { slot: 1, level: 2, .. }),
            "{model}: gfn {gfn:#x} written while logging, after logging stopped, is {:?}",
            t.kind
        );
    }
    // Stopping logging: no refault; tracking: one emulated write; NX: one fetch fault, which split.
    let faults: Vec<(u64, u64)> = result.seen.snapshots.iter().map(|s| (s.faults, s.exec_faults)).collect();
    assert_eq!(faults, [(0, 0), (2, 0), (1, 0), (2, 0), (1, 1), (1, 0)], "{model}");
    assert_eq!(result.seen.tracked_writes, SCENARIO.expected_tracked_writes(), "{model}");
    assert_eq!(result.seen.nx_recovered, [1], "{model}: the fetched range's table");
    let mmio = result.seen.translations.iter().find(|t| t.gfn == 0x800).unwrap();
    assert_eq!(mmio.kind, Mapping::Mmio, "{model}");
    let tail = result.seen.translations.iter().find(|t| t.gfn == 0x411).unwrap();
    assert_eq!(tail.kind, Mapping::NotPresent, "{model}: the remap's invalidation covers the 2 MiB range");
    let young: Vec<usize> = result.seen.young.iter().map(|y| y.len()).collect();
    assert_eq!(young, [0x80, 2, 0], "{model}: the whole tail, then the two pages touched, then none");
    let moved = result.seen.translations.iter().find(|t| t.gfn == 0x420).unwrap();
    assert!(
        matches!(moved.kind, Mapping::Leaf { slot: REMAP_POOL_SLOT, page: 0, level: 1, .. }),
        "{model}: the moved page maps {:?}",
        moved.kind
    );
    assert_eq!(result.seen.host_reads, [(0x420 * 4096 + 0x808, 0xaaaa_0000_0000_0420)], "{model}");
    assert_eq!(result.seen.harvests.last(), Some(&[0x411, 0x420].into_iter().collect()), "{model}");
}

#[test]
fn the_scenario_passes_on_the_mock_with_pml() {
    check("corei7_skylake_x", Mode::Pml);
}

#[test]
fn the_scenario_passes_on_the_mock_with_write_protection() {
    check("corei7_sandy_bridge_2600k", Mode::WriteProtect);
}

#[test]
fn the_scenario_passes_on_the_mock_with_ad_and_write_protection() {
    check("corei7_haswell_4770", Mode::AdWriteProtect);
}

#[test]
fn the_scenario_passes_on_the_mock_under_npt() {
    check("ryzen", Mode::Npt);
}

#[test]
fn models_map_to_the_modes_the_hypervisor_picks() {
    assert_eq!(Mode::for_model("corei7_skylake_x"), Some(Mode::Pml));
    assert_eq!(Mode::for_model("corei7_sandy_bridge_2600k"), Some(Mode::WriteProtect));
    assert_eq!(Mode::for_model("ryzen"), Some(Mode::Npt));
    assert_eq!(Mode::for_model("bx_generic"), None, "no EPT");
}

fn check_broken(model: &str, mode: Mode, broken: Broken) {
    let result = run::run(model, mode, Some(broken)).unwrap();
    assert!(!result.passed(), "{model}: broken-{} passed every check", broken.name());
    let failed: Vec<&str> = result.checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    assert!(failed.contains(&broken.must_fail()), "{model} broken-{}: {failed:?}", broken.name());
    match broken {
        Broken::Ept | Broken::Npt => {
            assert!(failed.iter().all(|n| n.starts_with("harvest")), "{model}: {failed:?}");
            let missing = SCENARIO.expected_harvests()[1].difference(&result.seen.harvests[1]).count();
            assert!(missing > 0, "{model}: the first harvest while logging lost nothing");
        }
        Broken::Age => {
            assert_eq!(failed, [broken.must_fail()], "{model}: only aging is wrong");
            assert_eq!(result.seen.young.last().map(|y| y.len()), Some(0x80), "{model}: nothing was cleared");
        }
        Broken::Nx => {
            assert_eq!(failed, [broken.must_fail()], "{model}: only NX is wrong");
            let fetches: u64 = result.seen.snapshots.iter().map(|s| s.exec_faults).sum();
            assert_eq!(fetches, 0, "{model}: executable huge leaves let the fetch through");
        }
        Broken::Track => {
            assert_eq!(failed, [broken.must_fail()], "{model}: only tracking is wrong");
            assert!(result.seen.tracked_writes.is_empty(), "{model}: nothing was emulated");
        }
        Broken::Recover => {
            assert_eq!(failed, [broken.must_fail()], "{model}: only the recovery is wrong");
            assert_eq!(result.seen.snapshots[0].faults, 1, "{model}: the zapped range refaulted");
        }
        Broken::Remap => {
            // The host freed the frame the page left: the guest reads it through the stale leaf.
            let error = result.seen.guest_error.as_deref().unwrap_or_default();
            assert!(error.contains("read 0x0, expected Some(8888000000000002)"), "{model}: {error}");
            let moved = result.seen.translations.iter().find(|t| t.gfn == 0x420).unwrap();
            assert!(
                matches!(moved.kind, Mapping::Leaf { slot: 1, page: 0x220, .. }),
                "{model}: the stale leaf still maps the old frame: {:?}",
                moved.kind
            );
        }
    }
    let variant = format!("\"broken\":\"{}\"", broken.name());
    assert!(result.line.contains(&variant) && result.line.contains("\"verdict\":\"fail\""));
}

#[test]
fn broken_variants_fail_their_checks_with_pml() {
    for broken in Broken::for_paging(Paging::Ept) {
        check_broken("corei7_skylake_x", Mode::Pml, broken);
    }
}

#[test]
fn broken_variants_fail_their_checks_with_write_protection() {
    for broken in Broken::for_paging(Paging::Ept) {
        check_broken("corei7_sandy_bridge_2600k", Mode::WriteProtect, broken);
    }
}

#[test]
fn broken_variants_fail_their_checks_under_npt() {
    for broken in Broken::for_paging(Paging::Npt) {
        check_broken("ryzen", Mode::Npt, broken);
    }
}

#[test]
fn a_table_corruption_of_the_other_vendor_is_refused() {
    assert!(run::run("ryzen", Mode::Npt, Some(Broken::Ept)).is_err());
    assert!(run::run("corei7_skylake_x", Mode::Pml, Some(Broken::Npt)).is_err());
}

#[test]
fn the_two_vcpu_part_passes_on_the_mock_and_agrees_across_modes() {
    let runs: Vec<_> = [Mode::Pml, Mode::WriteProtect, Mode::Npt].map(|mode| smp::run(mode).unwrap()).into();
    for seen in &runs {
        assert_eq!(seen.check(), Vec::<String>::new());
        assert_eq!(seen.own_harvests.each_ref().map(Vec::len), [2, 2]);
    }
    assert!(runs.iter().all(|r| r.agreed() == runs[0].agreed()), "the agreed part depends on nothing");
    assert_eq!(runs[0].agreed().phase_a.len(), 48);
}
