//! The one test scenario that both the bare-metal hypervisor under Bochs (`examples/bochs-hv`) and the
//! `tdp-mock` replay (`examples/scenario_mock`) run, and the rules that judge a run of it.
//!
//! # Why one description
//! A check that a real CPU and the software model agree is only meaningful when both run the same
//! workload and expect the same answer. So the memslots, the guest's accesses (read, write, execute,
//! MMIO, and range writes over more pages than Intel's PML log holds), the moment dirty logging starts
//! and the harvests are data here ([`SCENARIO`]); the expected dirty set of every harvest and the value
//! every read must return are computed from that data ([`Scenario::expected_harvests`],
//! [`Scenario::expected_read`]); and a run's observations ([`Observed`]) are judged by the same code
//! ([`Scenario::evaluate`]) and printed in the same machine-readable line ([`report::write_result_line`])
//! whoever ran it.
//!
//! # What differs between the runners
//! Under Bochs the guest runs with its own page tables and code in the system slot, so the CPU also
//! touches those pages (fetches, page walks, and with EPT A/D the walks count as writes). Only the
//! data slot is dirty-logged, only gfns of the data and NX slots and MMIO gfns are sampled, and only
//! faults in those slots are counted, so those extra accesses never reach a compared value (except the
//! NX recovery count, which is reported, not compared); [`Scenario::guest_table_gfns`] still names the guest page-table pages so a
//! harvest that contains them is accepted, as the recipe's note on EPT A/D requires. The mock has no
//! guest page tables and accesses guest-physical addresses directly.

extern crate alloc;

mod host_steps;
mod judge;
mod mmu_steps;
pub mod report;
pub mod smp;
mod tables;
#[cfg(test)]
mod tests;

pub use host_steps::{Broken, REMAP_POOL_OFFSET, REMAP_POOL_PAGES, REMAP_POOL_SLOT, age_step};
pub use judge::{Check, Observed};
pub use mmu_steps::{
    Feature, LeafExpect, Snapshot, SnapshotSeen, nx_on_step, nx_recover_step, stop_logging_step, track_step,
    untrack_step,
};
pub use tables::{Mapping, Paging, Translation, translate, unprotect_leaves};

use alloc::collections::BTreeSet;
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
    /// Never logged, two 2 MiB-aligned ranges: where the NX huge-page steps execute and read.
    Nx,
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
        /// 8-byte aligned address in a non-system slot.
        gpa: Gpa,
    },
    /// Write `value` as a `u64` at `gpa`.
    Write {
        /// 8-byte aligned address in a non-system slot.
        gpa: Gpa,
        /// The value written.
        value: u64,
    },
    /// Write `value` at `gpa`, `gpa + 4096`, ... in `pages` consecutive pages (a loop in the guest):
    /// enough pages to fill Intel's 512-entry PML log and take its log-full exit.
    WriteRange {
        /// 8-byte aligned address in the first page, in the data slot.
        gpa: Gpa,
        /// How many pages, all in the data slot.
        pages: u64,
        /// The value written to each.
        value: u64,
    },
    /// Jump to code at `gpa` (placed there by the runner before the run) and come back.
    Exec {
        /// 16-byte aligned address in a non-system slot, on a page no step writes or reads.
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
    /// Age `pages` gfns from `gpa`'s one by one (`Mmu::age_gfn_range`, KVM's `kvm_age_gfn`) and record
    /// which were young, then flush the TLB. The MMU's aging never flushes (KVM's rule: a missed access
    /// only makes a page look idle); the runner flushes so the next access walks the tables again and
    /// the answer is exact.
    Age {
        /// The first page's address, in the data slot.
        gpa: Gpa,
        /// How many pages.
        pages: u64,
    },
    /// The host moves the page holding `gpa` to the next frame of the remap pool ([`REMAP_POOL_SLOT`]),
    /// bytes and all, between `invalidate_range_start` and `invalidate_range_end` over the page's whole
    /// 2 MiB host mapping (splitting a huge host page invalidates all of it). After the run the runner
    /// reads the `u64` at `gpa` from the page's current host frame ([`Scenario::expected_host_reads`]).
    Remap {
        /// An 8-byte aligned address in the data slot.
        gpa: Gpa,
    },
    /// Stop dirty logging on slot `slot` (a hypercall): `set_memslot_flags` recovers the huge leaves the
    /// logging split in place (KVM 6.13's `recover_huge_pages`), so the accesses that follow take no
    /// fault ([`stop_logging_step`]).
    StopLogging {
        /// The slot.
        slot: SlotId,
    },
    /// Track writes to the page holding `gpa` (`ExclusiveMmu::track_write`, KVM's page-track): from
    /// then on a guest write to it exits and the host emulates it ([`track_step`]).
    Track {
        /// An address in a non-system slot.
        gpa: Gpa,
    },
    /// Stop tracking it (`untrack_write`): its next write fault maps it writable ([`untrack_step`]).
    Untrack {
        /// The address given to the [`Step::Track`].
        gpa: Gpa,
    },
    /// Turn the NX huge-page mitigation on (`set_nx_huge_pages`, which invalidates every root; the
    /// runner loads a new one at once). The runner first samples [`Scenario::sample_gfns`] into
    /// [`Observed::translations`]: the state the earlier steps left, which the new root no longer
    /// holds ([`nx_on_step`]).
    NxHugePages,
    /// One NX recovery pass over every tracked table (`recover_nx_huge_pages(1)`, [`nx_recover_step`]).
    NxRecover,
    /// The host records the faults the guest took in non-system slots since the previous host step
    /// and the translations of the snapshot's gfns ([`SnapshotSeen`]), judged against the expectation.
    Snapshot(Snapshot),
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
/// Gfns 0xa00..0xe00: two 2 MiB ranges for the NX huge-page steps, never logged.
const NX: SlotSpec = SlotSpec { id: SlotId(2), base_gfn: Gfn(0xa00), pages: 0x400, role: SlotRole::Nx };
const MMIO: Gpa = Gpa(0x80_0000);
/// The write-tracked page: in the data slot's tail (4 KiB leaves only), not mapped since the remap's
/// invalidation.
const TRACKED: Gpa = Gpa(0x430 * 4096);
/// Pages of the range writes: 0x250..0x480, more than a PML log holds.
const RANGE_PAGES: u64 = 0x480 - 0x250;
/// The data slot's tail, 0x400..0x480, which only 4 KiB leaves map: the aged range, so that what is
/// young is a property of single pages (an aged 2 MiB leaf is young for all its pages).
const TAIL: Gfn = Gfn(0x400);
const TAIL_PAGES: u64 = 0x80;

const fn w(gfn: u64, offset: u64, value: u64) -> Step {
    Step::Write { gpa: Gpa(gfn * 4096 + offset), value }
}
const fn r(gfn: u64, offset: u64) -> Step {
    Step::Read { gpa: Gpa(gfn * 4096 + offset) }
}
const fn x(gfn: u64, offset: u64) -> Step {
    Step::Exec { gpa: Gpa(gfn * 4096 + offset) }
}
/// A snapshot for `check` expecting `faults` (and `exec_faults`) since the previous host step.
const fn snap(
    check: Feature,
    faults: Option<u64>,
    exec_faults: Option<u64>,
    leaves: &'static [LeafExpect],
) -> Step {
    Step::Snapshot(Snapshot { check, faults, exec_faults, leaves })
}
/// `gfn` mapped by a leaf at `level` (0: not mapped), with the given execute and write rights (`None`:
/// either).
const fn leaf(gfn: u64, level: u8, exec: Option<bool>, write: Option<bool>) -> LeafExpect {
    LeafExpect { gfn, level, exec, write }
}

/// The scenario both runners run.
pub const SCENARIO: Scenario = Scenario {
    slots: &[SYS, DATA, NX],
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
        // Many pages: first by faults (the reset then cleans their D bits, or write-protects them), then
        // again, which with PML logs more than the log's 512 entries and takes a log-full exit.
        Step::WriteRange { gpa: Gpa(0x250 * 4096 + 0x800), pages: RANGE_PAGES, value: 0x7777_0000_0000_0001 },
        Step::Harvest,
        Step::WriteRange { gpa: Gpa(0x250 * 4096 + 0x800), pages: RANGE_PAGES, value: 0x8888_0000_0000_0002 },
        r(0x47f, 0x800),
        Step::Harvest,
        // The host's side. Age the tail (the range writes wrote every page of it: all young), touch two
        // pages, age again (exactly those two are young) and once more (none). Then the host moves a
        // page to another frame: the guest reads what the page held through the new frame and writes to
        // it, and that write is still logged.
        Step::Age { gpa: Gpa(TAIL.0 * 4096), pages: TAIL_PAGES },
        r(0x410, 0x800),
        w(0x411, 0x40, 0x9999_0000_0000_0411),
        Step::Age { gpa: Gpa(TAIL.0 * 4096), pages: TAIL_PAGES },
        Step::Age { gpa: Gpa(TAIL.0 * 4096), pages: TAIL_PAGES },
        Step::Remap { gpa: Gpa(0x420 * 4096 + 0x808) },
        r(0x420, 0x800),
        w(0x420, 0x808, 0xaaaa_0000_0000_0420),
        Step::Harvest,
        // Logging stops: the tables of 4 KiB leaves it left in the 2 MiB range become 2 MiB leaves again
        // in place, so reading pages mapped small until now takes no fault at all.
        Step::StopLogging { slot: DATA.id },
        r(0x201, 0x08),
        r(0x300, 0x30),
        r(0x3f0, 0x10),
        snap(
            Feature::Recover,
            Some(0),
            Some(0),
            &[leaf(0x201, 2, None, None), leaf(0x300, 2, None, None), leaf(0x3f0, 2, None, None)],
        ),
        // A write-tracked page: the write exits and the host emulates it; the read maps it read-only at
        // 4 KiB; once untracked, the next write maps it writable with no emulation.
        Step::Track { gpa: TRACKED },
        w(0x430, 0x18, 0xbbbb_0000_0000_0430),
        r(0x430, 0x18),
        snap(Feature::Track, None, Some(0), &[leaf(0x430, 1, None, Some(false))]),
        Step::Untrack { gpa: TRACKED },
        w(0x430, 0x20, 0xcccc_0000_0000_0430),
        r(0x430, 0x18),
        snap(Feature::Track, Some(1), Some(0), &[leaf(0x430, 1, None, Some(true))]),
        // NX huge pages: data maps 2 MiB and not executable; a fetch exits, maps its page executable at
        // 4 KiB and splits the range, while the other range stays huge; recovery brings the huge leaf
        // back for the next data access.
        Step::NxHugePages,
        r(0xa10, 0x00),
        r(0xc10, 0x00),
        snap(
            Feature::Nx,
            Some(2),
            Some(0),
            &[leaf(0xa10, 2, Some(false), None), leaf(0xc10, 2, Some(false), None)],
        ),
        x(0xa40, 0x00),
        r(0xc10, 0x18),
        snap(
            Feature::Nx,
            Some(1),
            Some(1),
            &[
                leaf(0xa40, 1, Some(true), None),
                leaf(0xa10, 1, Some(false), None),
                leaf(0xc10, 2, Some(false), None),
            ],
        ),
        Step::NxRecover,
        r(0xa20, 0x00),
        snap(
            Feature::Nx,
            Some(1),
            Some(0),
            &[leaf(0xa20, 2, Some(false), None), leaf(0xa40, 2, Some(false), None)],
        ),
    ],
    extra_samples: &[0x200, 0x2ff, 0x3ff, 0x400, 0x47f],
};

impl Step {
    /// The data writes the step makes, as `(address, value)`, in order.
    pub fn writes(&self) -> impl Iterator<Item = (Gpa, u64)> + use<> {
        let (gpa, pages, value) = match *self {
            Step::Write { gpa, value } => (gpa, 1, value),
            Step::WriteRange { gpa, pages, value } => (gpa, pages, value),
            _ => (Gpa(0), 0, 0),
        };
        (0..pages).map(move |i| (Gpa(gpa.0 + i * 4096), value))
    }
}

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

    /// Checks that the steps can be run: data accesses 8-byte aligned inside a non-system slot (the
    /// data slot, or the NX slot), MMIO addresses outside every slot, exec targets 16-byte aligned in a
    /// non-system slot on pages no data step touches, no range write to a page tracked at the time,
    /// logging started and stopped only on an existing slot, tracked and snapshot gfns in a non-system
    /// slot.
    ///
    /// # Errors
    /// The first step that breaks a rule.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let exec_pages: BTreeSet<u64> = self
            .steps
            .iter()
            .filter_map(|s| if let Step::Exec { gpa } = s { Some(gpa.gfn().0) } else { None })
            .collect();
        let in_data = |gpa: Gpa| self.slot_of(gpa.gfn()).is_some_and(|s| s.role != SlotRole::System);
        // The pages tracked at the current step.
        let mut tracked: BTreeSet<u64> = BTreeSet::new();
        for (index, step) in self.steps.iter().enumerate() {
            match *step {
                Step::Track { gpa } => {
                    tracked.insert(gpa.gfn().0);
                }
                Step::Untrack { gpa } => {
                    tracked.remove(&gpa.gfn().0);
                }
                _ => {}
            }
            let fail = |why| Err(ScenarioError { index, step: *step, why });
            match *step {
                Step::Read { gpa } | Step::Write { gpa, .. } | Step::WriteRange { gpa, .. } => {
                    let touched: Vec<Gpa> = step
                        .writes()
                        .map(|(g, _)| g)
                        .chain(matches!(step, Step::Read { .. }).then_some(gpa))
                        .collect();
                    if !gpa.0.is_multiple_of(8) || touched.iter().any(|&g| !in_data(g)) {
                        return fail("data access not 8-byte aligned in the data slot");
                    }
                    if touched.iter().any(|g| exec_pages.contains(&g.gfn().0)) {
                        return fail("data access to a page that holds exec code");
                    }
                    if matches!(step, Step::WriteRange { .. })
                        && touched.iter().any(|g| tracked.contains(&g.gfn().0))
                    {
                        return fail("range write to a tracked page (the host emulates single moves only)");
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
                Step::Age { gpa, pages } => {
                    let last = Gpa(gpa.0.saturating_add(pages.saturating_sub(1).saturating_mul(4096)));
                    if pages == 0 || !in_data(gpa) || !in_data(last) {
                        return fail("aged range empty or not inside the data slot");
                    }
                }
                Step::Remap { gpa } => {
                    if !gpa.0.is_multiple_of(8) || !in_data(gpa) {
                        return fail("remapped address not 8-byte aligned in the data slot");
                    }
                    if self.remap_targets().len() as u64 > REMAP_POOL_PAGES {
                        return fail("more remaps than the remap pool has frames");
                    }
                }
                Step::StopLogging { slot } => {
                    if !self.slots.iter().any(|s| s.id == slot) {
                        return fail("logging stopped on a slot that does not exist");
                    }
                }
                Step::Track { gpa } | Step::Untrack { gpa } => {
                    if !in_data(gpa) {
                        return fail("tracked page outside the non-system slots");
                    }
                }
                Step::Snapshot(snap) => {
                    if snap.leaves.iter().any(|l| !in_data(Gfn(l.gfn).gpa())) {
                        return fail("snapshot of a gfn outside the non-system slots");
                    }
                }
                Step::Harvest | Step::NxHugePages | Step::NxRecover => {}
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
                    .find_map(|s| s.writes().filter(|(g, _)| g == gpa).last().map(|(_, v)| v))
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
                Step::StopLogging { slot } => {
                    logged.remove(&slot.0);
                }
                Step::Harvest => harvests.push(core::mem::take(&mut pending)),
                _ => {
                    for (gpa, _) in step.writes() {
                        if self.slot_of(gpa.gfn()).is_some_and(|s| logged.contains(&s.id.0)) {
                            pending.insert(gpa.gfn().0);
                        }
                    }
                }
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

    /// The gfns whose translations are reported: every gfn a step touches (of a range write, its
    /// first and last page), plus [`Scenario::extra_samples`], sorted and without duplicates.
    #[must_use]
    pub fn sample_gfns(&self) -> Vec<u64> {
        let touched = self.steps.iter().flat_map(|s| match *s {
            Step::Read { gpa }
            | Step::Write { gpa, .. }
            | Step::Exec { gpa }
            | Step::MmioRead { gpa }
            | Step::MmioWrite { gpa, .. } => [Some(gpa.gfn().0), None],
            Step::WriteRange { gpa, pages, .. } | Step::Age { gpa, pages } => {
                [Some(gpa.gfn().0), Some(gpa.gfn().0 + pages.saturating_sub(1))]
            }
            Step::Remap { gpa } | Step::Track { gpa } | Step::Untrack { gpa } => [Some(gpa.gfn().0), None],
            Step::StartLogging { .. }
            | Step::StopLogging { .. }
            | Step::Harvest
            | Step::NxHugePages
            | Step::NxRecover
            | Step::Snapshot(_) => [None, None],
        });
        let touched = touched.flatten();
        let all: BTreeSet<u64> = touched.chain(self.extra_samples.iter().copied()).collect();
        all.into_iter().collect()
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
                Step::WriteRange { gpa, .. } => gpa,
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
}
