//! Judging a run of the scenario: what a runner observed ([`Observed`]) and the checks that decide its
//! verdict ([`Scenario::evaluate`]), the same code for the Bochs hypervisor and the mock.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::Gfn;

use super::{Feature, Mapping, REMAP_POOL_SLOT, Scenario, SnapshotSeen, Translation};

/// The check a write escaping the dirty log fails.
pub(super) const HARVEST_CHECK: &str = "harvest holds exactly the written pages";
/// The check an aging mistake fails.
pub(super) const AGE_CHECK: &str = "aging reports young exactly the pages touched since the last age";
/// The check a page moved behind the MMU's back fails.
pub(super) const REMAP_CHECK: &str = "a page the host moved is read and written in its new frame";
/// The check NX huge pages left off fails.
pub(super) const NX_CHECK: &str = "under NX huge pages a fetch in a huge range exits and maps its page \
     executable at 4 KiB, data elsewhere stays huge, recovery brings the huge leaf back";
/// The check a write escaping write tracking fails.
pub(super) const TRACK_CHECK: &str =
    "a write to a tracked gfn exits and is emulated, its leaf stays read-only; untracked it maps writable";
/// The check a refault after logging stops fails.
pub(super) const RECOVER_CHECK: &str = "stopping dirty logging restores huge leaves in place with no refault";

impl Scenario {
    /// Judges a run: every check the scenario implies, each with what was seen when it failed.
    #[must_use]
    pub fn evaluate(&self, seen: &Observed) -> Vec<Check> {
        let mut checks = Vec::new();
        let mut check =
            |name: &'static str, ok: bool, detail: String| checks.push(Check { name, ok, detail });
        check(
            "guest ran every step",
            seen.steps_completed == self.steps.len() && seen.guest_error.is_none(),
            format!("{} of {} steps; error: {:?}", seen.steps_completed, self.steps.len(), seen.guest_error),
        );
        let expected = self.expected_harvests();
        check(
            "one harvest per harvest step",
            seen.harvests.len() == expected.len(),
            format!("{} harvests, expected {}", seen.harvests.len(), expected.len()),
        );
        let allowed: BTreeSet<u64> = self.guest_table_gfns().iter().copied().collect();
        for (i, (got, want)) in seen.harvests.iter().zip(&expected).enumerate() {
            let extra: BTreeSet<u64> =
                got.difference(want).filter(|g| !allowed.contains(g)).copied().collect();
            let missing: BTreeSet<u64> = want.difference(got).copied().collect();
            check(
                HARVEST_CHECK,
                extra.is_empty() && missing.is_empty(),
                format!("harvest {i}: missing {missing:x?}, unexpected {extra:x?}"),
            );
        }
        check(
            "no dirty mark lost (ring never full)",
            seen.ring_lost == 0,
            format!("{} marks refused by a full ring", seen.ring_lost),
        );
        check(
            "every flush the core asked for was delivered (an INVEPT, or an ASID flush at the next VMRUN)",
            seen.flushes == seen.invepts,
            format!("{} flushes, {} delivered (INVEPTs)", seen.flushes, seen.invepts),
        );
        check(
            "MMIO emulated as the steps ask",
            seen.mmio_reads == self.expected_mmio_reads() && seen.mmio_writes == self.expected_mmio_writes(),
            format!("reads {} writes {:x?}", seen.mmio_reads, seen.mmio_writes),
        );
        let early = self.expected_early_levels();
        let wrong: Vec<(u64, Option<u8>, u8)> = early
            .iter()
            .filter_map(|&(gfn, want)| {
                let got = seen.early_translations.iter().find(|t| t.gfn == gfn).and_then(|t| match t.kind {
                    Mapping::Leaf { level, .. } => Some(level),
                    _ => None,
                });
                (got != Some(want)).then_some((gfn, got, want))
            })
            .collect();
        check(
            "before logging, 2 MiB-aligned slot parts are mapped by 2 MiB leaves, the rest by 4 KiB",
            wrong.is_empty() && !early.is_empty(),
            format!("{} pages touched before logging; (gfn, level, expected): {wrong:x?}", early.len()),
        );
        let young = self.expected_young();
        check(
            AGE_CHECK,
            seen.young == young,
            format!("young per age: {:x?}, expected {young:x?}", seen.young),
        );
        let host_reads = self.expected_host_reads();
        let remapped = self.remap_targets();
        let moved_leaf = |gfn: u64| seen.translations.iter().find(|t| t.gfn == gfn).map(|t| t.kind);
        let misplaced: Vec<(u64, Option<Mapping>)> = remapped
            .iter()
            .filter(|&&(gfn, page)| {
                !matches!(moved_leaf(gfn), Some(Mapping::Leaf { slot, page: p, .. })
                    if slot == REMAP_POOL_SLOT && p == page)
            })
            .map(|&(gfn, _)| (gfn, moved_leaf(gfn)))
            .collect();
        check(
            REMAP_CHECK,
            seen.host_reads == host_reads && misplaced.is_empty(),
            format!(
                "host frames hold {:x?}, expected {host_reads:x?}; moved gfns not mapped to their new \
                 frame: {misplaced:x?}",
                seen.host_reads
            ),
        );
        for feature in Feature::ALL {
            let mut problems: Vec<String> = Vec::new();
            let mut judged = false;
            for (i, want) in self.snapshots().enumerate().filter(|(_, s)| s.check == feature) {
                judged = true;
                let Some(got) = seen.snapshots.get(i) else {
                    problems.push(format!("snapshot {i} not taken"));
                    continue;
                };
                problems.extend(self.snapshot_problems(i, want, got));
            }
            if feature == Feature::Track {
                let want = self.expected_tracked_writes();
                judged |= !want.is_empty();
                if seen.tracked_writes != want {
                    problems.push(format!("emulated writes {:x?}, expected {want:x?}", seen.tracked_writes));
                }
            }
            if judged {
                check(feature.check(), problems.is_empty(), problems.join("; "));
            }
        }
        let bad: Vec<&Translation> = seen
            .translations
            .iter()
            .filter(|t| !self.translation_ok(t, true))
            .chain(seen.early_translations.iter().filter(|t| !self.translation_ok(t, false)))
            .collect();
        check(
            "sampled translations map their own slot page (I1)",
            bad.is_empty() && seen.translations.len() == self.sample_gfns().len(),
            format!("{} samples, wrong: {bad:x?}", seen.translations.len()),
        );
        checks
    }

    /// What differs between snapshot `i` as expected (`want`) and as seen (`got`).
    fn snapshot_problems(&self, i: usize, want: &super::Snapshot, got: &SnapshotSeen) -> Vec<String> {
        let mut problems = Vec::new();
        if want.faults.is_some_and(|f| f != got.faults) {
            problems.push(format!("snapshot {i}: {} faults, expected {:?}", got.faults, want.faults));
        }
        if want.exec_faults.is_some_and(|f| f != got.exec_faults) {
            problems.push(format!(
                "snapshot {i}: {} fetch faults, expected {:?}",
                got.exec_faults, want.exec_faults
            ));
        }
        for leaf in want.leaves {
            let kind = got.translations.iter().find(|t| t.gfn == leaf.gfn).map(|t| t.kind);
            let own = self.slot_of(Gfn(leaf.gfn)).map(|s| (s.id.0, leaf.gfn - s.base_gfn.0));
            let ok = match (kind, own) {
                (Some(kind), Some((slot, page))) => leaf.matches(&kind, slot, page),
                _ => false,
            };
            if !ok {
                problems.push(format!("snapshot {i}: gfn {:#x} is {kind:x?}, expected {leaf:x?}", leaf.gfn));
            }
        }
        problems
    }

    /// Whether a sampled translation is allowed: a slot gfn maps its own page of its own slot (or is
    /// not mapped), or after the run (`after_run`) a moved gfn its remap-pool page; an MMIO gfn holds
    /// an MMIO entry or nothing.
    fn translation_ok(&self, t: &Translation, after_run: bool) -> bool {
        let moved_to = after_run
            .then(|| self.remap_targets().into_iter().find(|&(gfn, _)| gfn == t.gfn).map(|(_, p)| p))
            .flatten();
        match (self.slot_of(Gfn(t.gfn)), t.kind) {
            (_, Mapping::NotPresent) => true,
            (Some(slot), Mapping::Leaf { slot: id, page, .. }) => match moved_to {
                Some(pool_page) => id == REMAP_POOL_SLOT && page == pool_page,
                None => id == slot.id.0 && page == t.gfn - slot.base_gfn.0,
            },
            (None, Mapping::Mmio) => true,
            _ => false,
        }
    }
}

/// What a runner saw. Both runners fill one and hand it to [`Scenario::evaluate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Steps the guest finished (all of them when it reached its end).
    pub steps_completed: usize,
    /// Why the guest stopped early (a read that returned the wrong value, an unexpected exit...).
    pub guest_error: Option<String>,
    /// The gfns harvested at each harvest step.
    pub harvests: Vec<BTreeSet<u64>>,
    /// Dirty marks a full ring refused.
    pub ring_lost: u64,
    /// EPT violations (SVM: #NPF exits other than reserved-bit ones) handled by the core's fault
    /// handler.
    pub ept_violations: u64,
    /// EPT misconfigurations (SVM: reserved-bit #NPFs) handled: MMIO SPTEs hit again.
    pub ept_misconfigs: u64,
    /// Page-modification log-full exits (PML only).
    pub pml_full_exits: u64,
    /// Flushes the core asked for (calls of the host's flush methods).
    pub flushes: u64,
    /// Flushes delivered for them: requests after which every registered EPTP was invalidated by
    /// INVEPT (VMX: `tdp_vmx::host::FlushStats::delivered`); requests a VMRUN honoured with
    /// TLB_CONTROL, as the flush generation the vCPU last flushed at (SVM); the flushes the mock
    /// delivered.
    pub invepts: u64,
    /// MMIO reads emulated.
    pub mmio_reads: u64,
    /// MMIO writes emulated, as `(gpa, value)`.
    pub mmio_writes: Vec<(u64, u64)>,
    /// The translation of every gfn of [`Scenario::sample_gfns`] after the run, or when the run has a
    /// [`super::Step::NxHugePages`], just before it (turning the mitigation on replaces every root).
    pub translations: Vec<Translation>,
    /// The same sample taken just before dirty logging started (empty if it never did): shows the
    /// 2 MiB leaves, which logging splits.
    pub early_translations: Vec<Translation>,
    /// The gfns reported young by each [`super::Step::Age`].
    pub young: Vec<BTreeSet<u64>>,
    /// For each [`super::Step::Remap`], its address and the `u64` the page's current host frame holds
    /// there after the run.
    pub host_reads: Vec<(u64, u64)>,
    /// Faults the guest took in non-system slots ([`Observed::count_fault`]).
    pub slot_faults: u64,
    /// Of those, instruction fetches.
    pub exec_faults: u64,
    /// `(slot_faults, exec_faults)` at the last host step: where the next snapshot starts counting.
    pub fault_mark: (u64, u64),
    /// What each [`super::Step::Snapshot`] recorded.
    pub snapshots: Vec<SnapshotSeen>,
    /// The writes to tracked pages the host emulated, as `(address, value)`.
    pub tracked_writes: Vec<(u64, u64)>,
    /// Tables each [`super::Step::NxRecover`] zapped (not compared: under Bochs the guest's own code
    /// fetches split the system slot's range too).
    pub nx_recovered: Vec<u64>,
}

/// One check of [`Scenario::evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}
