//! The shared scenario on `tdp-mock`, in both dirty-logging modes the Bochs hypervisor uses: every check
//! passes, the harvests are exactly the scenario's expected sets, and the data-slot pages written while
//! logging end up mapped by 4 KiB leaves of their own slot page. The broken variant (leaves unprotected
//! behind the MMU's back, as `bochs-hv --features broken-ept` does) must fail the harvest checks.

#[path = "../examples/scenario_mock/run.rs"]
mod run;

use run::Mode;
use tdp_vmx::scenario::{Mapping, SCENARIO};

fn check(model: &str, mode: Mode) {
    let result = run::run(model, mode, false).unwrap();
    let failed: Vec<_> = result.checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty() && result.passed(), "{model}: failed checks {failed:#?}");
    assert_eq!(result.seen.harvests, SCENARIO.expected_harvests(), "{model}");
    assert!(result.line.starts_with("TDP-RESULT {") && result.line.contains("\"verdict\":\"pass\""));
    for gfn in [0x201, 0x202, 0x300, 0x411, 0x412] {
        let t = result.seen.translations.iter().find(|t| t.gfn == gfn).unwrap();
        assert!(
            matches!(t.kind, Mapping::Leaf { slot: 1, level: 1, .. }),
            "{model}: gfn {gfn:#x} written while logging is {:?}",
            t.kind
        );
    }
    let mmio = result.seen.translations.iter().find(|t| t.gfn == 0x800).unwrap();
    assert_eq!(mmio.kind, Mapping::Mmio, "{model}");
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
fn models_map_to_the_modes_the_hypervisor_picks() {
    assert_eq!(Mode::for_model("corei7_skylake_x"), Some(Mode::Pml));
    assert_eq!(Mode::for_model("corei7_sandy_bridge_2600k"), Some(Mode::WriteProtect));
    assert_eq!(Mode::for_model("bx_generic"), None, "no EPT");
}

fn check_broken(model: &str, mode: Mode) {
    let result = run::run(model, mode, true).unwrap();
    assert!(!result.passed(), "{model}: a broken EPT passed every check");
    let failed: Vec<&str> = result.checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    assert!(failed.iter().all(|n| n.starts_with("harvest")), "{model}: {failed:?}");
    let missing = SCENARIO.expected_harvests()[1].difference(&result.seen.harvests[1]).count();
    assert!(missing > 0, "{model}: the first harvest while logging lost nothing: {:?}", result.seen.harvests);
    assert!(result.line.contains("\"broken\":true") && result.line.contains("\"verdict\":\"fail\""));
}

#[test]
fn a_broken_ept_fails_the_harvest_checks_with_pml() {
    check_broken("corei7_skylake_x", Mode::Pml);
}

#[test]
fn a_broken_ept_fails_the_harvest_checks_with_write_protection() {
    check_broken("corei7_sandy_bridge_2600k", Mode::WriteProtect);
}
