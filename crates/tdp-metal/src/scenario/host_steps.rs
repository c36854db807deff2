//! The host's side of the scenario: what aging must report ([`Step::Age`]), where a page the host
//! moved must be found afterwards ([`Step::Remap`]), and the must-fail variants ([`Broken`]) that prove
//! the checks see each kind of mistake.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use tdp_core::addr::Gfn;
use tdp_core::host::Host;
use tdp_core::mmu::Mmu;

use super::{AS_ID, Scenario, Step};

/// The pseudo-slot id under which a translation into the remap pool is reported
/// ([`super::Mapping::Leaf`]'s `slot`): both runners add the pool to the bases they decode with.
pub const REMAP_POOL_SLOT: u16 = 0xfff0;
/// How far into guest RAM (as a guest-physical address would be) each runner places its remap pool:
/// past every slot of the scenario.
pub const REMAP_POOL_OFFSET: u64 = 0x100_0000;
/// Frames in the remap pool: the most [`Step::Remap`]s a scenario may have.
pub const REMAP_POOL_PAGES: u64 = 4;

/// A must-fail variant: a mistake made on purpose behind the core's back (or in the harness's use of
/// it), which the scenario's checks must catch, on Bochs and on the mock alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// When logging starts, W (and D with A/D) is set again on the logged slot's EPT leaves: writes
    /// escape the dirty log.
    Ept,
    /// The same on NPT leaves (W and D), for the SVM hypervisor: under Bochs, which ignores
    /// TLB_CONTROL, a missing ASID flush cannot be seen, but nested entries that lost their write
    /// protection can.
    Npt,
    /// Aging only tests the Accessed state and never clears it: pages stay young forever.
    Age,
    /// The host moves a page without the MMU notifier (no `invalidate_range_start` / `end`): the old
    /// leaf keeps pointing at the frame the page left.
    Remap,
    /// The NX huge-page mitigation is left off: huge leaves stay executable and a fetch never exits.
    Nx,
    /// The tracked page is never tracked: it maps writable and its writes never exit.
    Track,
    /// After logging stops, the slot's huge ranges are zapped (KVM before 6.13) on top of the in-place
    /// recovery: the next accesses refault.
    Recover,
}

impl Broken {
    /// Every variant.
    pub const ALL: [Broken; 7] =
        [Broken::Ept, Broken::Npt, Broken::Age, Broken::Remap, Broken::Nx, Broken::Track, Broken::Recover];

    /// The variants a hypervisor on `paging` tables is built as: the table corruption of its format,
    /// then aging and remapping.
    #[must_use]
    pub const fn for_paging(paging: super::Paging) -> [Broken; 6] {
        let corrupt = match paging {
            super::Paging::Ept => Broken::Ept,
            super::Paging::Npt => Broken::Npt,
        };
        [corrupt, Broken::Age, Broken::Remap, Broken::Nx, Broken::Track, Broken::Recover]
    }

    /// The table format whose entries the variant corrupts (`None`: it corrupts no table).
    #[must_use]
    pub const fn corrupts(self) -> Option<super::Paging> {
        match self {
            Broken::Ept => Some(super::Paging::Ept),
            Broken::Npt => Some(super::Paging::Npt),
            Broken::Age | Broken::Remap | Broken::Nx | Broken::Track | Broken::Recover => None,
        }
    }

    /// The variant's name: `ept`, `npt`, `age`, `remap`, `nx`, `track` or `recover` (the kernel's
    /// feature is `broken-<name>`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Broken::Ept => "ept",
            Broken::Npt => "npt",
            Broken::Age => "age",
            Broken::Remap => "remap",
            Broken::Nx => "nx",
            Broken::Track => "track",
            Broken::Recover => "recover",
        }
    }

    /// The variant named `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Broken> {
        Broken::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The check ([`super::Check::name`]) the variant must fail.
    #[must_use]
    pub const fn must_fail(self) -> &'static str {
        match self {
            Broken::Ept | Broken::Npt => super::judge::HARVEST_CHECK,
            Broken::Age => super::judge::AGE_CHECK,
            Broken::Remap => super::judge::REMAP_CHECK,
            Broken::Nx => super::judge::NX_CHECK,
            Broken::Track => super::judge::TRACK_CHECK,
            Broken::Recover => super::judge::RECOVER_CHECK,
        }
    }
}

impl Scenario {
    /// For each [`Step::Age`], in order, the gfns of its range that the guest read or wrote since the
    /// previous age of that gfn (or since the run began), and not unmapped since by a remap's
    /// invalidation: exactly what aging must report young. A runner's accesses that are not the steps' (code fetches, page walks) never touch the data slot.
    #[must_use]
    pub fn expected_young(&self) -> Vec<BTreeSet<u64>> {
        let mut touched = BTreeSet::new();
        let mut out = Vec::new();
        for step in self.steps {
            match *step {
                Step::Age { gpa, pages } => {
                    let range = gpa.gfn().0..gpa.gfn().0.saturating_add(pages);
                    let young: BTreeSet<u64> = touched.range(range).copied().collect();
                    touched.retain(|g| !young.contains(g));
                    out.push(young);
                }
                Step::Read { gpa } | Step::Exec { gpa } => {
                    touched.insert(gpa.gfn().0);
                }
                Step::Remap { gpa } => {
                    // The invalidation zaps the page's whole 2 MiB range: nothing there is mapped, so
                    // nothing there can be young until it is touched again.
                    let first = gpa.gfn().0 & !511;
                    touched.retain(|&g| !(first..first + 512).contains(&g));
                }
                _ => touched.extend(step.writes().map(|(g, _)| g.gfn().0)),
            }
        }
        out
    }

    /// The gfn of each [`Step::Remap`], in order, with the pool page it moves to (the first remap to
    /// page 0, the next to page 1...).
    #[must_use]
    pub fn remap_targets(&self) -> Vec<(u64, u64)> {
        self.steps
            .iter()
            .filter_map(|s| if let Step::Remap { gpa } = s { Some(gpa.gfn().0) } else { None })
            .zip(0..)
            .collect()
    }

    /// For each [`Step::Remap`], in order, its address and the value the page's current host frame must
    /// hold there after the run: the last value the steps wrote to it (0 if none did).
    #[must_use]
    pub fn expected_host_reads(&self) -> Vec<(u64, u64)> {
        self.steps
            .iter()
            .filter_map(|s| if let Step::Remap { gpa } = s { Some(*gpa) } else { None })
            .map(|gpa| {
                let last = self.steps.iter().flat_map(Step::writes).filter(|(g, _)| *g == gpa).last();
                (gpa.0, last.map_or(0, |(_, v)| v))
            })
            .collect()
    }
}

/// Runs a [`Step::Age`] over `pages` gfns from `first` on `mmu`, one gfn at a time, and returns the young
/// ones; then flushes every TLB so the next access walks the tables (the MMU's aging never flushes, and
/// the scenario wants exact answers). With `broken` (the `broken-age` variant) it only tests, never
/// clears. Both runners call it.
pub fn age_step<H: Host>(mmu: &Mmu<H>, first: u64, pages: u64, broken: bool) -> BTreeSet<u64> {
    let young = (first..first.saturating_add(pages))
        .filter(|&g| {
            let (start, end) = (Gfn(g), Gfn(g + 1));
            if broken {
                mmu.test_age_gfn_range(AS_ID, start, end)
            } else {
                mmu.age_gfn_range(AS_ID, start, end)
            }
        })
        .collect();
    mmu.host().flush_all();
    young
}
