//! The `TDP-RESULT` line of a run (Bochs or mock), parsed; what must agree between the two runners; and
//! what a broken-* build's result must show.

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The prefix of the result line.
pub const RESULT_PREFIX: &str = "TDP-RESULT ";
/// The prefix of the kernel's panic / exception line.
const PANIC_PREFIX: &str = "TDP-PANIC ";
/// The prefix of the two-vCPU part's line: a JSON object ([`SmpResult`]), or `skipped: ...`.
pub const SMP_PREFIX: &str = "TDP-SMP ";

/// The result line of a run's output, parsed; a panic line or no result line is an error.
///
/// # Errors
/// The kernel's `TDP-PANIC` line, an unparsable result, or the last lines when there is no result.
pub fn parse_output(text: &str) -> Result<RunResult> {
    if let Some(panic) = text.lines().find_map(|l| l.strip_prefix(PANIC_PREFIX)) {
        bail!("the kernel stopped: {panic}");
    }
    let Some(json) = text.lines().find_map(|l| l.strip_prefix(RESULT_PREFIX)) else {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        bail!("no {RESULT_PREFIX:?} line in the output; last lines: {tail:?}");
    };
    let mut result: RunResult =
        serde_json::from_str(json).with_context(|| format!("cannot parse the result: {json}"))?;
    if let Some(smp) = text.lines().find_map(|l| l.strip_prefix(SMP_PREFIX)) {
        result.smp = Some(parse_smp(smp)?);
    }
    Ok(result)
}

/// A `TDP-SMP` line after its prefix: its JSON, or what the kernel said instead (`skipped: ...`).
///
/// # Errors
/// A line that starts as JSON but does not parse.
pub fn parse_smp(line: &str) -> Result<SmpLine> {
    if line.starts_with('{') {
        let r = serde_json::from_str(line)
            .with_context(|| format!("cannot parse the two-vCPU result: {line}"))?;
        Ok(SmpLine::Ran(r))
    } else {
        Ok(SmpLine::Not(line.to_string()))
    }
}

/// A run with two processors must have run its two-vCPU part and passed it.
///
/// # Errors
/// No `TDP-SMP` line, a skipped part, or a failed one.
pub fn check_smp(r: &RunResult) -> Result<&SmpResult> {
    match &r.smp {
        Some(SmpLine::Ran(smp)) if smp.verdict == "pass" => Ok(smp),
        Some(SmpLine::Ran(smp)) => bail!("the two-vCPU part failed: {:?}", smp.failures),
        Some(SmpLine::Not(what)) => bail!("the two-vCPU part did not run: {what}"),
        None => bail!("no {SMP_PREFIX:?} line: the kernel stopped before its two-vCPU part"),
    }
}

/// What must agree between the two-vCPU part on Bochs and on the mock: what does not depend on the
/// interleaving (`tdp_metal::scenario::smp::SmpAgreed`) and the verdict.
#[must_use]
pub fn compare_smp(bochs: &SmpResult, mock: &SmpResult) -> Vec<String> {
    let mut diffs = Vec::new();
    if bochs.phase_a != mock.phase_a {
        diffs.push(format!("phase A's pages: bochs {:x?}, mock {:x?}", bochs.phase_a, mock.phase_a));
    }
    if bochs.phase_b != mock.phase_b {
        diffs.push(format!("phase B's rings: bochs {:x?}, mock {:x?}", bochs.phase_b, mock.phase_b));
    }
    if bochs.own_memory != mock.own_memory {
        diffs.push(format!("own pages' memory: bochs {:x?}, mock {:x?}", bochs.own_memory, mock.own_memory));
    }
    if bochs.verdict != mock.verdict {
        diffs.push(format!("two-vCPU verdict: bochs {}, mock {}", bochs.verdict, mock.verdict));
    }
    diffs
}

/// A `TDP-SMP` line.
#[derive(Clone, Debug)]
pub enum SmpLine {
    /// The part ran: its result.
    Ran(SmpResult),
    /// It did not (`skipped: one processor`).
    Not(String),
}

/// The two-vCPU part's `TDP-SMP` JSON (`tdp_metal::scenario::smp::write_smp_line`).
#[derive(Clone, Debug, Deserialize)]
pub struct SmpResult {
    /// `bochs` or `mock`.
    pub runner: String,
    /// The CPU (Bochs: its brand string; mock: the model name).
    pub model: String,
    /// Phase A's two harvests together.
    pub phase_a: Vec<u64>,
    /// Each vCPU's phase B harvest.
    pub phase_b: Vec<Vec<u64>>,
    /// (gfn, value) on each vCPU's own pages after the run.
    pub own_memory: Vec<(u64, u64)>,
    /// Which vCPU's value each shared page holds (depends on the interleaving; reported only).
    pub last_writer: Vec<Option<u8>>,
    /// The failed checks.
    pub failures: Vec<String>,
    /// `pass` or `fail`.
    pub verdict: String,
}

/// The broken build `variant` must have run (a result line), say it is that variant, and fail the
/// check that the variant names in its line (`must_fail`, from `tdp_metal::scenario::Broken`).
pub fn check_broken(r: &RunResult, variant: &str) -> Result<()> {
    if r.broken.as_deref() != Some(variant) {
        bail!("the result says the kernel was built as {:?}, not broken-{variant}", r.broken);
    }
    let Some(must_fail) = r.must_fail.as_deref() else {
        bail!("the broken-{variant} result names no check it must fail");
    };
    if r.verdict != "fail" {
        bail!("verdict {} with every check passed: the checks cannot see broken-{variant}", r.verdict);
    }
    if !r.failed_checks().contains(&must_fail) {
        bail!(
            "it failed, but not the check {must_fail:?} (failed: {:?}); guest error {:?}",
            r.failed_checks(),
            r.guest_error
        );
    }
    Ok(())
}

/// What must agree between the Bochs run and the mock run of one model; each difference, described.
#[must_use]
pub fn compare(bochs: &RunResult, mock: &RunResult) -> Vec<String> {
    let mut diffs = Vec::new();
    let tables = &bochs.guest_table_gfns;
    let without_tables = |h: &[Vec<u64>]| -> Vec<Vec<u64>> {
        h.iter().map(|s| s.iter().copied().filter(|g| !tables.contains(g)).collect()).collect()
    };
    if without_tables(&bochs.harvests) != mock.harvests {
        diffs.push(format!("harvests: bochs {:x?}, mock {:x?}", bochs.harvests, mock.harvests));
    }
    for (when, b, m) in [
        ("after the run", &bochs.translations, &mock.translations),
        ("before logging", &bochs.early_translations, &mock.early_translations),
    ] {
        if b.len() != m.len() {
            diffs.push(format!("{} translations {when} on bochs, {} on the mock", b.len(), m.len()));
        }
        for (b, m) in b.iter().zip(m) {
            if b != m {
                diffs.push(format!("translation of gfn {:#x} {when}: bochs {b:?}, mock {m:?}", b.gfn));
            }
        }
    }
    if (bochs.mmio_reads, &bochs.mmio_writes) != (mock.mmio_reads, &mock.mmio_writes) {
        diffs.push(format!(
            "MMIO: bochs {} reads {:x?}, mock {} reads {:x?}",
            bochs.mmio_reads, bochs.mmio_writes, mock.mmio_reads, mock.mmio_writes
        ));
    }
    if bochs.pml_full_exits != mock.pml_full_exits {
        diffs.push(format!("PML-full exits: bochs {}, mock {}", bochs.pml_full_exits, mock.pml_full_exits));
    }
    if bochs.young != mock.young {
        diffs.push(format!("young pages per age: bochs {:x?}, mock {:x?}", bochs.young, mock.young));
    }
    if bochs.host_reads != mock.host_reads {
        diffs.push(format!(
            "moved pages' contents: bochs {:x?}, mock {:x?}",
            bochs.host_reads, mock.host_reads
        ));
    }
    if bochs.snapshots != mock.snapshots {
        for (i, (b, m)) in bochs.snapshots.iter().zip(&mock.snapshots).enumerate() {
            if b != m {
                diffs.push(format!("snapshot {i}: bochs {b:?}, mock {m:?}"));
            }
        }
        if bochs.snapshots.len() != mock.snapshots.len() {
            diffs.push(format!(
                "snapshots: {} on bochs, {} on the mock",
                bochs.snapshots.len(),
                mock.snapshots.len()
            ));
        }
    }
    if (bochs.slot_faults, bochs.exec_faults) != (mock.slot_faults, mock.exec_faults) {
        diffs.push(format!(
            "faults in the scenario's slots (fetches): bochs {} ({}), mock {} ({})",
            bochs.slot_faults, bochs.exec_faults, mock.slot_faults, mock.exec_faults
        ));
    }
    if bochs.tracked_writes != mock.tracked_writes {
        diffs.push(format!(
            "emulated tracked writes: bochs {:x?}, mock {:x?}",
            bochs.tracked_writes, mock.tracked_writes
        ));
    }
    if bochs.steps_completed != mock.steps_completed {
        diffs
            .push(format!("steps completed: bochs {}, mock {}", bochs.steps_completed, mock.steps_completed));
    }
    if bochs.verdict != mock.verdict {
        diffs.push(format!("verdict: bochs {}, mock {}", bochs.verdict, mock.verdict));
    }
    diffs
}

/// One run's `TDP-RESULT` line (the fields the comparison and the report use).
#[derive(Clone, Debug, Deserialize)]
pub struct RunResult {
    /// `bochs` or `mock`.
    pub runner: String,
    /// The CPU (Bochs: its brand string; mock: the model name).
    pub model: String,
    /// `EPT_PML`, `EPT` or `NPT`.
    pub mmu: String,
    /// The must-fail variant it was built as (`ept`, `age`, `remap`), if any.
    pub broken: Option<String>,
    /// The check that variant must fail.
    pub must_fail: Option<String>,
    /// The gfns reported young by each age step.
    pub young: Vec<Vec<u64>>,
    /// Each remap step's address and what the page's current host frame holds there after the run.
    pub host_reads: Vec<(u64, u64)>,
    /// Steps the guest finished.
    pub steps_completed: u64,
    /// EPT violations handled (mock: fault-handler calls).
    pub ept_violations: u64,
    /// EPT misconfigurations handled.
    pub ept_misconfigs: u64,
    /// Flushes the core asked for.
    pub flushes: u64,
    /// INVEPTs executed for them.
    pub invepts: u64,
    /// MMIO reads emulated.
    pub mmio_reads: u64,
    /// Page-modification log-full exits.
    pub pml_full_exits: u64,
    /// MMIO writes emulated, `(gpa, value)`.
    pub mmio_writes: Vec<(u64, u64)>,
    /// Why the guest stopped early.
    pub guest_error: Option<String>,
    /// The guest's page-table gfns (allowed in a Bochs harvest).
    pub guest_table_gfns: Vec<u64>,
    /// The harvested gfns per harvest.
    pub harvests: Vec<Vec<u64>>,
    /// Faults the guest took in the scenario's non-system slots over the whole run (Bochs: EPT
    /// violations / #NPFs there, not counting one that only found the root stale; mock: faults).
    pub slot_faults: u64,
    /// Of those, instruction fetches.
    pub exec_faults: u64,
    /// What each snapshot step recorded.
    pub snapshots: Vec<SnapshotJson>,
    /// The writes to tracked pages the host emulated, `(address, value)`.
    pub tracked_writes: Vec<(u64, u64)>,
    /// Tables each NX recovery pass zapped (reported, not compared: Bochs's guest code splits too).
    pub nx_recovered: Vec<u64>,
    /// The sampled translations after the run (before the NX step, which replaces the root).
    pub translations: Vec<TranslationJson>,
    /// The same sample just before dirty logging started.
    pub early_translations: Vec<TranslationJson>,
    /// The checks.
    pub checks: Vec<CheckJson>,
    /// Checks passed.
    pub passed: u64,
    /// Checks failed.
    pub failed: u64,
    /// `pass` or `fail`.
    pub verdict: String,
    /// The `TDP-SMP` line that followed, if any (not part of the JSON).
    #[serde(skip)]
    pub smp: Option<SmpLine>,
}

impl RunResult {
    /// The names of the failed checks.
    #[must_use]
    pub fn failed_checks(&self) -> Vec<&str> {
        self.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect()
    }
}

/// One sampled translation.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TranslationJson {
    /// The gfn.
    pub gfn: u64,
    /// `leaf`, `mmio` or `none`.
    pub kind: String,
    /// A leaf's slot.
    pub slot: Option<u16>,
    /// A leaf's slot-relative page.
    pub page: Option<u64>,
    /// A leaf's level.
    pub level: Option<u8>,
    /// A leaf's R/W/X bits.
    pub rwx: Option<u8>,
}

/// One snapshot: faults in the scenario's slots since the previous host step and the leaves then.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct SnapshotJson {
    /// Faults in non-system slots.
    pub faults: u64,
    /// Of those, instruction fetches.
    pub exec_faults: u64,
    /// The translations of the snapshot's gfns.
    pub translations: Vec<TranslationJson>,
}

/// One check.
#[derive(Clone, Debug, Deserialize)]
pub struct CheckJson {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"TDP-RESULT {"runner":"bochs","model":"cpu","mmu":"EPT","broken":null,"must_fail":null,"features":["ept"],"steps_completed":3,"ept_violations":4,"ept_misconfigs":1,"pml_full_exits":0,"flushes":2,"invepts":2,"mmio_reads":1,"ring_lost":0,"guest_error":null,"mmio_writes":[[8388616,5]],"guest_table_gfns":[1,2,3],"harvests":[[],[1,513]],"young":[[1024]],"host_reads":[[4325384,7]],"slot_faults":3,"exec_faults":1,"snapshots":[{"faults":1,"exec_faults":1,"translations":[{"gfn":2624,"kind":"leaf","slot":2,"page":64,"level":1,"rwx":7}]}],"tracked_writes":[[4390936,9]],"nx_recovered":[2],"translations":[{"gfn":513,"kind":"leaf","slot":1,"page":1,"level":1,"rwx":7},{"gfn":2048,"kind":"mmio"}],"early_translations":[{"gfn":513,"kind":"leaf","slot":1,"page":1,"level":2,"rwx":7}],"checks":[{"name":"harvest holds exactly the written pages","ok":true,"detail":""}],"passed":1,"failed":0,"verdict":"pass"}"#;

    fn parsed() -> RunResult {
        parse_output(&format!("bochs-hv: booting\n{LINE}\n")).unwrap()
    }

    #[test]
    fn the_result_line_parses_and_a_panic_line_is_an_error() {
        let r = parsed();
        assert_eq!(
            (r.verdict.as_str(), r.harvests.len(), r.translations[1].kind.as_str()),
            ("pass", 2, "mmio")
        );
        let err = parse_output("TDP-PANIC exception 14 at rip 0x1000\n").unwrap_err();
        assert!(err.to_string().contains("exception 14"), "{err}");
        assert!(parse_output("GRUB loading\n").is_err());
    }

    #[test]
    fn comparison_sets_guest_tables_aside_and_catches_differences() {
        let bochs = parsed();
        let mut mock = parsed();
        mock.harvests = vec![vec![], vec![513]];
        assert_eq!(compare(&bochs, &mock), Vec::<String>::new(), "gfn 1 is a guest page table");
        mock.harvests[1].push(514);
        mock.translations[0].rwx = Some(5);
        mock.early_translations[0].level = Some(1);
        let diffs = compare(&bochs, &mock);
        assert_eq!(diffs.len(), 3, "{diffs:?}");
        assert!(diffs[0].starts_with("harvests") && diffs[1].contains("0x201 after"), "{diffs:?}");
        assert!(diffs[2].contains("0x201 before logging"), "{diffs:?}");
    }

    #[test]
    fn a_broken_run_must_fail_the_check_its_variant_names() {
        let mut r = parsed();
        assert!(check_broken(&r, "age").is_err(), "not built broken");
        r.broken = Some("age".into());
        r.must_fail = Some("harvest holds exactly the written pages".into());
        assert!(check_broken(&r, "age").is_err(), "a passing broken run is an error");
        assert!(check_broken(&r, "remap").is_err(), "another variant's result");
        r.verdict = "fail".into();
        r.checks[0].ok = false;
        check_broken(&r, "age").unwrap();
        r.checks[0].name = "guest ran every step".into();
        assert!(check_broken(&r, "age").is_err(), "failing for another reason proves nothing");
    }

    #[test]
    fn aging_and_moved_pages_must_agree_too() {
        let bochs = parsed();
        let mut mock = parsed();
        mock.harvests = vec![vec![], vec![513]];
        mock.young[0].push(1025);
        mock.host_reads[0].1 = 0;
        let diffs = compare(&bochs, &mock);
        assert!(
            diffs.len() == 2 && diffs[0].starts_with("young") && diffs[1].starts_with("moved"),
            "{diffs:?}"
        );
    }

    #[test]
    fn snapshots_fault_counts_and_tracked_writes_must_agree_but_nx_recovery_counts_need_not() {
        let bochs = parsed();
        let mut mock = parsed();
        mock.harvests = vec![vec![], vec![513]];
        mock.nx_recovered = vec![1];
        assert_eq!(compare(&bochs, &mock), Vec::<String>::new(), "Bochs's guest code is split too");
        mock.snapshots[0].exec_faults = 0;
        mock.snapshots[0].translations[0].level = Some(2);
        mock.tracked_writes.clear();
        mock.slot_faults += 1;
        let diffs = compare(&bochs, &mock);
        assert!(
            diffs.len() == 3
                && diffs[0].starts_with("snapshot 0")
                && diffs[1].starts_with("faults in the scenario's slots")
                && diffs[2].starts_with("emulated"),
            "{diffs:?}"
        );
    }

    const SMP: &str = r#"TDP-SMP {"runner":"bochs","model":"cpu","phase_a":[1536,1552],"phase_b":[[1552],[1568]],"own_memory":[[1552,7]],"last_writer":[1,null],"failures":[],"verdict":"pass"}"#;

    #[test]
    fn a_two_processor_run_must_pass_and_agree_with_the_mock() {
        let r = parsed();
        assert!(r.smp.is_none() && check_smp(&r).is_err(), "no TDP-SMP line");
        let pass = parse_output(&format!("{LINE}\n{SMP}\n")).unwrap();
        let bochs = check_smp(&pass).unwrap();
        let failed =
            parse_output(&format!("{LINE}\n{}\n", SMP.replace(r#""verdict":"pass""#, r#""verdict":"fail""#)));
        assert!(check_smp(&failed.unwrap()).is_err());
        let skipped = parse_output(&format!("{LINE}\nTDP-SMP skipped: one processor\n")).unwrap();
        assert!(check_smp(&skipped).is_err());
        let mut mock = bochs.clone();
        mock.last_writer = vec![Some(0), Some(0)];
        assert_eq!(compare_smp(bochs, &mock), Vec::<String>::new(), "the interleaving may differ");
        mock.phase_b[1].push(1569);
        mock.own_memory[0].1 = 8;
        assert_eq!(compare_smp(bochs, &mock).len(), 2);
    }
}
