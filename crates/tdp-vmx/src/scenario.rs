//! The one test scenario that both the bare-metal hypervisor under Bochs (`examples/bochs-hv`) and the
//! `tdp-mock` replay (`examples/scenario_mock`) run, and the rules that judge a run of it.
//!
//! # Why one description
//! A check that a real CPU and the software model agree is only meaningful when both run the same
//! workload and expect the same answer. So the memslots, the guest's accesses (read, write, execute,
//! MMIO), the moment dirty logging starts and the harvests are data here ([`SCENARIO`]); the expected
//! dirty set of every harvest and the value every read must return are computed from that data
//! ([`Scenario::expected_harvests`], [`Scenario::expected_read`]); and a run's observations ([`Observed`])
//! are judged by the same code ([`Scenario::evaluate`]) and printed in the same machine-readable line
//! ([`report::write_result_line`]) whoever ran it.
//!
//! # What differs between the runners
//! Under Bochs the guest runs with its own page tables and code in the system slot, so the CPU also
//! touches those pages (fetches, page walks, and with EPT A/D the walks count as writes). Only the
//! data slot is dirty-logged and only data-slot and MMIO gfns are sampled, so those extra accesses never
//! reach a compared value; [`Scenario::guest_table_gfns`] still names the guest page-table pages so a
//! harvest that contains them is accepted, as the recipe's note on EPT A/D requires. The mock has no
//! guest page tables and accesses guest-physical addresses directly.

extern crate alloc;

pub mod report;

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};

/// The address space every scenario memslot lives in.
pub const AS_ID: AsId = AsId(0);

/// Gfns of the guest's page tables in the system slot (PML4, PDPT, PD), as the Bochs hypervisor lays
/// them out: the only pages a harvest may hold beyond what the steps wrote.
pub const GUEST_TABLE_GFNS: [u64; 3] = [1, 2, 3];

/// What a memslot of the scenario holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRole {
    /// The guest's page tables, code and stack (Bochs only; the mock never touches it).
    System,
    /// The pages the steps read, write and execute; the slot that is dirty-logged.
    Data,
}

/// One memslot: `pages` guest frames from `base_gfn`. Each runner backs it with host memory whose frame
/// number is congruent to `base_gfn` modulo 512, so 2 MiB-aligned parts of it can be mapped by 2 MiB
/// leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotSpec {
    /// The slot's id.
    pub id: SlotId,
    /// Its first gfn.
    pub base_gfn: Gfn,
    /// Its size in 4 KiB pages.
    pub pages: u64,
    /// What it holds.
    pub role: SlotRole,
}

impl SlotSpec {
    /// Whether `gfn` lies in the slot.
    #[must_use]
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.base_gfn.0 && gfn.0 < self.base_gfn.0 + self.pages
    }
}

/// One step of the guest's workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the `u64` at `gpa` and check it is [`Scenario::expected_read`].
    Read {
        /// 8-byte aligned address in the data slot.
        gpa: Gpa,
    },
    /// Write `value` as a `u64` at `gpa`.
    Write {
        /// 8-byte aligned address in the data slot.
        gpa: Gpa,
        /// The value written.
        value: u64,
    },
    /// Jump to code at `gpa` (placed there by the runner before the run) and come back.
    Exec {
        /// 16-byte aligned address in the data slot, on a page no step writes or reads.
        gpa: Gpa,
    },
    /// Read the `u64` at an MMIO address (no memslot); the hypervisor returns [`mmio_value`]`(gpa)`.
    MmioRead {
        /// The MMIO address.
        gpa: Gpa,
    },
    /// Write `value` to an MMIO address; the hypervisor records it.
    MmioWrite {
        /// The MMIO address.
        gpa: Gpa,
        /// The value written.
        value: u64,
    },
    /// Start dirty logging on slot `slot` (the guest asks with a hypercall).
    StartLogging {
        /// The slot to log.
        slot: SlotId,
    },
    /// Harvest the dirty ring, check the set, and reset (re-protect) what was harvested.
    Harvest,
}

/// The whole scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// The memslots, inserted before the guest runs.
    pub slots: &'static [SlotSpec],
    /// The guest's steps, in order.
    pub steps: &'static [Step],
    /// Gfns whose translations are reported and compared after the run, besides those the steps touch.
    pub extra_samples: &'static [u64],
}

const SYS: SlotSpec = SlotSpec { id: SlotId(0), base_gfn: Gfn(0), pages: 0x200, role: SlotRole::System };
/// Gfns 0x200..0x400 form one 2 MiB-aligned range (2 MiB leaves until logging starts); 0x400..0x480 is
/// a tail that only 4 KiB leaves can map.
const DATA: SlotSpec = SlotSpec { id: SlotId(1), base_gfn: Gfn(0x200), pages: 0x280, role: SlotRole::Data };
const MMIO: Gpa = Gpa(0x80_0000);

const fn w(gfn: u64, offset: u64, value: u64) -> Step {
    Step::Write { gpa: Gpa(gfn * 4096 + offset), value }
}
const fn r(gfn: u64, offset: u64) -> Step {
    Step::Read { gpa: Gpa(gfn * 4096 + offset) }
}
const fn x(gfn: u64, offset: u64) -> Step {
    Step::Exec { gpa: Gpa(gfn * 4096 + offset) }
}

/// The scenario both runners run.
pub const SCENARIO: Scenario = Scenario {
    slots: &[SYS, DATA],
    steps: &[
        // Before logging: huge-range and tail pages are mapped, MMIO is emulated.
        w(0x201, 0x08, 0x1111_0000_0000_0201),
        r(0x201, 0x08),
        w(0x3f0, 0x10, 0x2222_0000_0000_03f0),
        x(0x240, 0x00),
        r(0x410, 0x18),
        w(0x411, 0x20, 0x3333_0000_0000_0411),
        Step::MmioRead { gpa: MMIO },
        Step::MmioWrite { gpa: Gpa(MMIO.0 + 8), value: 0x4444_0000_0000_0800 },
        Step::Harvest,
        Step::StartLogging { slot: DATA.id },
        // Logging: writes to a write-protected huge leaf, a never-touched page of it, a protected 4 KiB
        // leaf and a not-present one; reads and fetches that must not count.
        w(0x201, 0x08, 0x5555_0000_0000_0201),
        w(0x202, 0x00, 0x5555_0000_0000_0202),
        r(0x203, 0x00),
        w(0x411, 0x20, 0x5555_0000_0000_0411),
        w(0x412, 0x28, 0x5555_0000_0000_0412),
        x(0x240, 0x10),
        r(0x3f0, 0x10),
        Step::MmioRead { gpa: MMIO },
        Step::Harvest,
        // After the reset re-protected them, pages are caught again; a second write to a page is one mark.
        w(0x202, 0x00, 0x6666_0000_0000_0202),
        w(0x300, 0x30, 0x6666_0000_0000_0300),
        w(0x300, 0x38, 0x6666_0000_0000_0301),
        x(0x241, 0x20),
        r(0x411, 0x20),
        r(0x202, 0x00),
        Step::Harvest,
        // Nothing written: an empty harvest.
        r(0x300, 0x30),
        Step::Harvest,
    ],
    extra_samples: &[0x200, 0x2ff, 0x3ff, 0x400, 0x47f],
};

/// The value the hypervisor returns for an MMIO read at `gpa`.
#[must_use]
pub const fn mmio_value(gpa: Gpa) -> u64 {
    0x4d4d_494f_0000_0000 | (gpa.0 & 0xffff_ffff)
}

/// Why a scenario cannot be run as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("step {index} ({step:?}): {why}")]
pub struct ScenarioError {
    /// The step's index.
    pub index: usize,
    /// The step.
    pub step: Step,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Scenario {
    /// The slot that `gfn` lies in.
    #[must_use]
    pub fn slot_of(&self, gfn: Gfn) -> Option<&SlotSpec> {
        self.slots.iter().find(|s| s.contains(gfn))
    }

    /// The data slot (the one that is dirty-logged).
    #[must_use]
    pub fn data_slot(&self) -> Option<&SlotSpec> {
        self.slots.iter().find(|s| s.role == SlotRole::Data)
    }

    /// Gfns of the guest's page tables, which the CPU may report dirty (EPT A/D): allowed in a harvest.
    #[must_use]
    pub fn guest_table_gfns(&self) -> &'static [u64] {
        &GUEST_TABLE_GFNS
    }

    /// Checks that the steps can be run: data accesses 8-byte aligned inside the data slot, MMIO
    /// addresses outside every slot, exec targets 16-byte aligned in the data slot on pages no data step
    /// touches, and logging started only on an existing slot.
    ///
    /// # Errors
    /// The first step that breaks a rule.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let exec_pages: BTreeSet<u64> = self
            .steps
            .iter()
            .filter_map(|s| if let Step::Exec { gpa } = s { Some(gpa.gfn().0) } else { None })
            .collect();
        let data = self.data_slot();
        let in_data = |gpa: Gpa| data.is_some_and(|d| d.contains(gpa.gfn()));
        for (index, step) in self.steps.iter().enumerate() {
            let fail = |why| Err(ScenarioError { index, step: *step, why });
            match *step {
                Step::Read { gpa } | Step::Write { gpa, .. } => {
                    if !gpa.0.is_multiple_of(8) || !in_data(gpa) {
                        return fail("data access not 8-byte aligned in the data slot");
                    }
                    if exec_pages.contains(&gpa.gfn().0) {
                        return fail("data access to a page that holds exec code");
                    }
                }
                Step::Exec { gpa } => {
                    if !gpa.0.is_multiple_of(16) || !in_data(gpa) || gpa.page_offset() > 4096 - 16 {
                        return fail("exec target not 16-byte aligned in the data slot");
                    }
                }
                Step::MmioRead { gpa } | Step::MmioWrite { gpa, .. } => {
                    if !gpa.0.is_multiple_of(8) || self.slot_of(gpa.gfn()).is_some() {
                        return fail("MMIO address not 8-byte aligned outside every slot");
                    }
                }
                Step::StartLogging { slot } => {
                    if !self.slots.iter().any(|s| s.id == slot) {
                        return fail("logging started on a slot that does not exist");
                    }
                }
                Step::Harvest => {}
            }
        }
        Ok(())
    }

    /// The value the read at step `index` must return: the last value written to its address by an
    /// earlier step, 0 for memory never written (runners zero the data slot), [`mmio_value`] for an
    /// MMIO read. `None` when step `index` is not a read.
    #[must_use]
    pub fn expected_read(&self, index: usize) -> Option<u64> {
        match self.steps.get(index)? {
            Step::Read { gpa } => Some(
                self.steps[..index]
                    .iter()
                    .rev()
                    .find_map(|s| match s {
                        Step::Write { gpa: g, value } if g == gpa => Some(*value),
                        _ => None,
                    })
                    .unwrap_or(0),
            ),
            Step::MmioRead { gpa } => Some(mmio_value(*gpa)),
            _ => None,
        }
    }

    /// For each [`Step::Harvest`], in order, the gfns written in dirty-logged slots since logging
    /// started or since the previous harvest.
    #[must_use]
    pub fn expected_harvests(&self) -> Vec<BTreeSet<u64>> {
        let mut logged: BTreeSet<u16> = BTreeSet::new();
        let mut pending = BTreeSet::new();
        let mut harvests = Vec::new();
        for step in self.steps {
            match *step {
                Step::StartLogging { slot } => {
                    logged.insert(slot.0);
                }
                Step::Write { gpa, .. }
                    if self.slot_of(gpa.gfn()).is_some_and(|s| logged.contains(&s.id.0)) =>
                {
                    pending.insert(gpa.gfn().0);
                }
                Step::Harvest => harvests.push(core::mem::take(&mut pending)),
                _ => {}
            }
        }
        harvests
    }

    /// The MMIO writes in order, as `(gpa, value)`.
    #[must_use]
    pub fn expected_mmio_writes(&self) -> Vec<(u64, u64)> {
        self.steps
            .iter()
            .filter_map(|s| match *s {
                Step::MmioWrite { gpa, value } => Some((gpa.0, value)),
                _ => None,
            })
            .collect()
    }

    /// How many MMIO reads the steps make.
    #[must_use]
    pub fn expected_mmio_reads(&self) -> u64 {
        self.steps.iter().filter(|s| matches!(s, Step::MmioRead { .. })).count() as u64
    }

    /// The gfns whose translations are reported: every gfn a step touches, plus
    /// [`Scenario::extra_samples`], sorted and without duplicates.
    #[must_use]
    pub fn sample_gfns(&self) -> Vec<u64> {
        let touched = self.steps.iter().filter_map(|s| match *s {
            Step::Read { gpa }
            | Step::Write { gpa, .. }
            | Step::Exec { gpa }
            | Step::MmioRead { gpa }
            | Step::MmioWrite { gpa, .. } => Some(gpa.gfn().0),
            Step::StartLogging { .. } | Step::Harvest => None,
        });
        let all: BTreeSet<u64> = touched.chain(self.extra_samples.iter().copied()).collect();
        all.into_iter().collect()
    }

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
                "harvest holds exactly the written pages",
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
            "every flush the core asked for ran as an INVEPT",
            seen.flushes == seen.invepts,
            format!("{} flushes, {} INVEPTs", seen.flushes, seen.invepts),
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
        let bad: Vec<&Translation> = seen
            .translations
            .iter()
            .chain(&seen.early_translations)
            .filter(|t| !self.translation_ok(t))
            .collect();
        check(
            "sampled translations map their own slot page (I1)",
            bad.is_empty() && seen.translations.len() == self.sample_gfns().len(),
            format!("{} samples, wrong: {bad:x?}", seen.translations.len()),
        );
        checks
    }

    /// For each data gfn a step touches before logging starts, the leaf level it must be mapped at just
    /// before logging starts: 2 (2 MiB) when its whole 2 MiB-aligned range lies in its slot (runners
    /// back slots with 2 MiB-aligned host memory), 1 otherwise. Sorted by gfn.
    #[must_use]
    pub fn expected_early_levels(&self) -> Vec<(u64, u8)> {
        let mut out = BTreeSet::new();
        for step in self.steps {
            let gpa = match *step {
                Step::StartLogging { .. } => break,
                Step::Read { gpa } | Step::Write { gpa, .. } | Step::Exec { gpa } => gpa,
                _ => continue,
            };
            let gfn = gpa.gfn().0;
            if let Some(slot) = self.slot_of(gpa.gfn()) {
                let start = gfn & !511;
                let huge = start >= slot.base_gfn.0 && start + 512 <= slot.base_gfn.0 + slot.pages;
                out.insert((gfn, if huge { 2 } else { 1 }));
            }
        }
        out.into_iter().collect()
    }

    /// Whether a sampled translation is allowed: a slot gfn maps its own page of its own slot (or is
    /// not mapped), an MMIO gfn holds an MMIO entry or nothing.
    fn translation_ok(&self, t: &Translation) -> bool {
        match (self.slot_of(Gfn(t.gfn)), t.kind) {
            (_, Mapping::NotPresent) => true,
            (Some(slot), Mapping::Leaf { slot: id, page, .. }) => {
                id == slot.id.0 && page == t.gfn - slot.base_gfn.0
            }
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
    /// EPT violations handled by the core's fault handler.
    pub ept_violations: u64,
    /// EPT misconfigurations handled (MMIO SPTEs hit again).
    pub ept_misconfigs: u64,
    /// Flushes the core asked for (calls of the host's flush methods).
    pub flushes: u64,
    /// INVEPT instructions executed for them (the mock counts the flushes it delivered).
    pub invepts: u64,
    /// MMIO reads emulated.
    pub mmio_reads: u64,
    /// MMIO writes emulated, as `(gpa, value)`.
    pub mmio_writes: Vec<(u64, u64)>,
    /// The translation of every gfn of [`Scenario::sample_gfns`] after the run.
    pub translations: Vec<Translation>,
    /// The same sample taken just before dirty logging started (empty if it never did): shows the
    /// 2 MiB leaves, which logging splits.
    pub early_translations: Vec<Translation>,
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

/// The EPT translation of one gfn after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The gfn.
    pub gfn: u64,
    /// What the tables hold for it.
    pub kind: Mapping,
}

/// What the EPT tables hold for a gfn, decoded from the raw entries (Intel SDM Vol. 3C, 29.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// No present entry on the path.
    NotPresent,
    /// A misconfigured entry (write without read): an MMIO SPTE.
    Mmio,
    /// A leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    Leaf {
        /// The slot whose host memory the frame lies in (`u16::MAX`: none).
        slot: u16,
        /// The frame's page index within that slot.
        page: u64,
        /// The leaf's level.
        level: u8,
        /// Readable, writable, executable (bits 0-2).
        rwx: u8,
    },
}

/// EPT entry bits (Intel SDM Vol. 3C, Tables 29-2 to 29-6).
const EPT_RWX: u64 = 0b111;
const EPT_R: u64 = 1;
const EPT_W: u64 = 2;
const EPT_PS: u64 = 1 << 7;
const EPT_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Walks a 4-level EPT from `root_pfn` for `gfn`, reading entries with `read(table_pfn, index)`, and
/// decodes what it finds. `host_bases` gives each slot's id and host base address, to express the
/// frame as a slot-relative page.
pub fn translate(
    mut read: impl FnMut(u64, usize) -> u64,
    root_pfn: u64,
    gfn: u64,
    host_bases: &[(u16, u64, u64)],
) -> Mapping {
    let mut table = root_pfn;
    for level in (1..=4u8).rev() {
        let shift = 9 * u32::from(level - 1);
        let entry = read(table, ((gfn >> shift) & 511) as usize);
        if entry & EPT_RWX == 0 {
            return Mapping::NotPresent;
        }
        if entry & (EPT_R | EPT_W) == EPT_W {
            return Mapping::Mmio;
        }
        let frame = (entry & EPT_ADDR) >> 12;
        if level == 1 || entry & EPT_PS != 0 {
            let pfn = frame + (gfn & ((1 << shift) - 1));
            let (slot, page) = host_bases
                .iter()
                .find(|&&(_, base, pages)| pfn >= base >> 12 && pfn < (base >> 12) + pages)
                .map_or((u16::MAX, pfn), |&(id, base, _)| (id, pfn - (base >> 12)));
            return Mapping::Leaf { slot, page, level, rwx: (entry & EPT_RWX) as u8 };
        }
        table = frame;
    }
    Mapping::NotPresent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_is_runnable() {
        assert_eq!(SCENARIO.validate(), Ok(()));
    }

    #[test]
    fn expected_harvests_follow_logging_and_resets() {
        let h = SCENARIO.expected_harvests();
        assert_eq!(h.len(), 4);
        assert!(h[0].is_empty(), "nothing is logged before logging starts");
        assert_eq!(h[1], [0x201, 0x202, 0x411, 0x412].into_iter().collect());
        assert_eq!(h[2], [0x202, 0x300].into_iter().collect());
        assert!(h[3].is_empty());
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
                .map(|gfn| Translation { gfn, kind: Mapping::NotPresent })
                .collect(),
            early_translations: s
                .expected_early_levels()
                .into_iter()
                .map(|(gfn, level)| Translation {
                    gfn,
                    kind: Mapping::Leaf { slot: 1, page: gfn - 0x200, level, rwx: 7 },
                })
                .collect(),
            ..Observed::default()
        }
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
        assert_eq!(translate(read, 1, 0x205, &bases), Mapping::Leaf { slot: 1, page: 5, level: 2, rwx: 3 });
        assert_eq!(translate(read, 1, 0x800, &bases), Mapping::Mmio);
        assert_eq!(translate(read, 1, 0x600, &bases), Mapping::NotPresent);
    }
}
