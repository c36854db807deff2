//! The two-vCPU part, run after the scenario: the same description for the Bochs hypervisors (two vCPUs
//! on two emulated processors) and the `tdp-mock` re-run (two mock vCPUs, interleaved), judged by the
//! same checks and printed in the same `TDP-SMP {json}` line.
//!
//! Both vCPUs work in the race slot ([`RACE_SLOT`], gfns [`RACE`].., dirty-logged from its insertion),
//! each into its own dirty ring ([`program`]): barrier 1; phase A, both write the 16 shared pages
//! (vCPU 0 ascending, vCPU 1 descending, so they meet) and then 16 pages of their own; barrier 2; each
//! harvests its own ring (which re-protects what it harvested); barrier 3; phase B, each writes its own
//! pages again (write-protected now: a fault, logged); barrier 4; each harvests again; barrier 5.
//!
//! Who faults a shared page first depends on the interleaving, so which ring holds it does too; what
//! does not, and what the runners must agree on ([`SmpObserved::agreed`]): phase A's two rings together
//! hold exactly the 48 pages written, each vCPU's own pages in its own ring; phase B's ring of each vCPU
//! holds exactly its own 16 pages; memory holds each vCPU's last values on its own pages, and one of the
//! two vCPUs' values on each shared page.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};
use core::ops::Range;

use tdp_core::addr::SlotId;

/// The race slot's id.
pub const RACE_SLOT: SlotId = SlotId(7);
/// The race slot's first gfn: past the scenario's slots (which end at 0x480 and whose remap invalidates
/// up to 0x600) and below its MMIO gfn (0x800).
pub const RACE: u64 = 0x600;
/// Pages in the race slot.
pub const RACE_PAGES: u64 = 0x200;
/// Pages both vCPUs write.
pub const SHARED_PAGES: Range<u64> = RACE..RACE + 16;
/// Each vCPU's own pages.
pub const OWN_PAGES: [Range<u64>; 2] = [RACE + 16..RACE + 32, RACE + 32..RACE + 48];
/// The prefix of the two-vCPU part's line.
pub const SMP_PREFIX: &str = "TDP-SMP ";

/// What vCPU `cpu` writes to page `gfn` in phase `phase` (0 = A, 1 = B).
#[must_use]
pub const fn race_value(phase: u64, cpu: u64, gfn: u64) -> u64 {
    ((0xa0 + phase * 0x10 + cpu) << 40) | gfn
}

/// One step of a vCPU's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpStep {
    /// Wait until both vCPUs reached barrier `n`.
    Barrier(u64),
    /// Write `value` as a `u64` at the start of page `gfn`.
    Write {
        /// The page.
        gfn: u64,
        /// The value.
        value: u64,
    },
    /// Harvest this vCPU's own ring (harvest number `n` of the part) and reset it.
    HarvestMine(u64),
}

/// vCPU `cpu`'s (0 or 1) program, in order; the vCPU is done after its last step.
#[must_use]
pub fn program(cpu: usize) -> Vec<SmpStep> {
    let c = cpu as u64;
    let own = OWN_PAGES.get(cpu).cloned().unwrap_or(0..0);
    let mut p = alloc::vec![SmpStep::Barrier(1)];
    let shared: Vec<u64> = if cpu == 0 { SHARED_PAGES.collect() } else { SHARED_PAGES.rev().collect() };
    p.extend(shared.into_iter().map(|gfn| SmpStep::Write { gfn, value: race_value(0, c, gfn) }));
    p.extend(own.clone().map(|gfn| SmpStep::Write { gfn, value: race_value(0, c, gfn) }));
    p.extend([SmpStep::Barrier(2), SmpStep::HarvestMine(0), SmpStep::Barrier(3)]);
    p.extend(own.map(|gfn| SmpStep::Write { gfn, value: race_value(1, c, gfn) }));
    p.extend([SmpStep::Barrier(4), SmpStep::HarvestMine(1), SmpStep::Barrier(5)]);
    p
}

/// What a run of the two-vCPU part saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmpObserved {
    /// What went wrong on each vCPU, if anything.
    pub errors: [Option<String>; 2],
    /// Whether each vCPU finished its program.
    pub done: [bool; 2],
    /// Each vCPU's harvests of its own ring, in order.
    pub own_harvests: [Vec<BTreeSet<u64>>; 2],
    /// The `u64` at the start of every page the part wrote, after the run, by gfn.
    pub memory: Vec<(u64, u64)>,
}

/// What does not depend on the interleaving: the runners must agree on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmpAgreed {
    /// Phase A's two harvests together.
    pub phase_a: BTreeSet<u64>,
    /// Each vCPU's phase B harvest.
    pub phase_b: [BTreeSet<u64>; 2],
    /// Memory on each vCPU's own pages after the run.
    pub own_memory: Vec<(u64, u64)>,
}

impl SmpObserved {
    fn harvest(&self, cpu: usize, n: usize) -> BTreeSet<u64> {
        self.own_harvests[cpu].get(n).cloned().unwrap_or_default()
    }

    fn value(&self, gfn: u64) -> Option<u64> {
        self.memory.iter().find(|&&(g, _)| g == gfn).map(|&(_, v)| v)
    }

    /// The part of the observation that does not depend on the interleaving.
    #[must_use]
    pub fn agreed(&self) -> SmpAgreed {
        let own: BTreeSet<u64> = OWN_PAGES.iter().flat_map(Clone::clone).collect();
        SmpAgreed {
            phase_a: self.harvest(0, 0).union(&self.harvest(1, 0)).copied().collect(),
            phase_b: [self.harvest(0, 1), self.harvest(1, 1)],
            own_memory: self.memory.iter().filter(|(g, _)| own.contains(g)).copied().collect(),
        }
    }

    /// The checks; returns what failed (empty: pass).
    #[must_use]
    pub fn check(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for cpu in 0..2 {
            if let Some(e) = &self.errors[cpu] {
                failures.push(format!("vCPU {cpu}: {e}"));
            }
            if !self.done[cpu] {
                failures.push(format!("vCPU {cpu} did not finish"));
            }
            if self.own_harvests[cpu].len() != 2 {
                failures
                    .push(format!("vCPU {cpu}: {} own harvests, expected 2", self.own_harvests[cpu].len()));
            }
        }
        let agreed = self.agreed();
        let all: BTreeSet<u64> =
            SHARED_PAGES.chain(OWN_PAGES[0].clone()).chain(OWN_PAGES[1].clone()).collect();
        if agreed.phase_a != all {
            failures.push(format!(
                "phase A: the rings hold {:x?}, expected the {} pages written",
                agreed.phase_a,
                all.len()
            ));
        }
        for (cpu, pages) in OWN_PAGES.iter().enumerate() {
            let own: BTreeSet<u64> = pages.clone().collect();
            if !own.is_subset(&self.harvest(cpu, 0)) {
                failures.push(format!("phase A: vCPU {cpu}'s own pages are not all in its ring"));
            }
            if agreed.phase_b[cpu] != own {
                failures.push(format!(
                    "phase B: vCPU {cpu}'s ring holds {:x?}, expected its own pages",
                    agreed.phase_b[cpu]
                ));
            }
            for gfn in pages.clone() {
                let want = race_value(1, cpu as u64, gfn);
                if self.value(gfn) != Some(want) {
                    failures.push(format!("gfn {gfn:#x} holds {:x?}, expected {want:#x}", self.value(gfn)));
                }
            }
        }
        for gfn in SHARED_PAGES {
            let got = self.value(gfn);
            if got != Some(race_value(0, 0, gfn)) && got != Some(race_value(0, 1, gfn)) {
                failures.push(format!("shared gfn {gfn:#x} holds {got:x?}, neither vCPU's value"));
            }
        }
        failures
    }
}

/// Writes the `TDP-SMP {json}` line (with a trailing newline) for a run of the two-vCPU part by
/// `runner` (`bochs` or `mock`) on `model`: the agreed part, which vCPU's value each shared page holds, the
/// failures of [`SmpObserved::check`] and the verdict.
///
/// ```
/// use tdp_metal::scenario::smp::{SmpObserved, write_smp_line};
/// let mut line = String::new();
/// write_smp_line(&mut line, "mock", "ryzen", &SmpObserved::default())?;
/// assert!(line.starts_with("TDP-SMP {\"runner\":\"mock\",\"model\":\"ryzen\""));
/// assert!(line.contains("\"verdict\":\"fail\""), "nothing ran: {line}");
/// # Ok::<(), std::fmt::Error>(())
/// ```
///
/// # Errors
/// What `out` returns.
pub fn write_smp_line(out: &mut impl Write, runner: &str, model: &str, seen: &SmpObserved) -> fmt::Result {
    let failures = seen.check();
    let agreed = seen.agreed();
    let set = |s: &BTreeSet<u64>| {
        let items: Vec<String> = s.iter().map(|g| format!("{g}")).collect();
        format!("[{}]", items.join(","))
    };
    out.write_str(SMP_PREFIX)?;
    write!(out, "{{\"runner\":\"{}\",\"model\":\"{}\"", runner.escape_default(), model.escape_default())?;
    write!(out, ",\"phase_a\":{}", set(&agreed.phase_a))?;
    write!(out, ",\"phase_b\":[{},{}]", set(&agreed.phase_b[0]), set(&agreed.phase_b[1]))?;
    let memory: Vec<String> = agreed.own_memory.iter().map(|(g, v)| format!("[{g},{v}]")).collect();
    write!(out, ",\"own_memory\":[{}]", memory.join(","))?;
    let winners: Vec<String> = SHARED_PAGES
        .map(|gfn| match seen.value(gfn) {
            Some(v) if v == race_value(0, 0, gfn) => String::from("0"),
            Some(v) if v == race_value(0, 1, gfn) => String::from("1"),
            _ => String::from("null"),
        })
        .collect();
    write!(out, ",\"last_writer\":[{}],\"failures\":[", winners.join(","))?;
    for (i, f) in failures.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(out, "{sep}\"{}\"", f.escape_default())?;
    }
    let verdict = if failures.is_empty() { "pass" } else { "fail" };
    writeln!(out, "],\"verdict\":\"{verdict}\"}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run that did everything right, built from the programs.
    fn perfect() -> SmpObserved {
        let mut seen = SmpObserved { done: [true, true], ..SmpObserved::default() };
        let shared: BTreeSet<u64> = SHARED_PAGES.collect();
        for (cpu, (pages, harvests)) in OWN_PAGES.iter().zip(&mut seen.own_harvests).enumerate() {
            let own: BTreeSet<u64> = pages.clone().collect();
            let first: BTreeSet<u64> =
                if cpu == 0 { own.union(&shared).copied().collect() } else { own.clone() };
            *harvests = alloc::vec![first, own];
        }
        for cpu in 0..2 {
            for step in program(cpu) {
                if let SmpStep::Write { gfn, value } = step {
                    seen.memory.retain(|&(g, _)| g != gfn);
                    seen.memory.push((gfn, value));
                }
            }
        }
        seen.memory.sort_unstable();
        seen
    }

    #[test]
    fn the_programs_write_what_the_checks_expect_and_the_checks_can_fail() {
        assert_eq!(program(0).len(), 1 + 16 + 16 + 3 + 16 + 3);
        let seen = perfect();
        assert_eq!(seen.check(), Vec::<String>::new());
        let mut lost = seen.clone();
        lost.own_harvests[1][1].remove(&(RACE + 40));
        assert!(lost.check().iter().any(|f| f.starts_with("phase B: vCPU 1")), "{:?}", lost.check());
        let mut stale = seen.clone();
        stale.memory.retain(|&(g, _)| g != RACE + 20);
        stale.memory.push((RACE + 20, race_value(0, 0, RACE + 20)));
        assert!(stale.check().iter().any(|f| f.contains("0x614")), "{:?}", stale.check());
        let mut unfinished = seen.clone();
        unfinished.done[0] = false;
        assert_eq!(unfinished.check(), ["vCPU 0 did not finish"]);
        // The interleaving may move a shared page from one ring to the other: nothing agreed changes.
        let mut moved = seen.clone();
        moved.own_harvests[0][0].remove(&RACE);
        moved.own_harvests[1][0].insert(RACE);
        assert_eq!((moved.check(), moved.agreed()), (Vec::<String>::new(), seen.agreed()));
    }

    #[test]
    fn the_line_carries_the_agreed_part_and_the_verdict() {
        let mut line = String::new();
        write_smp_line(&mut line, "bochs", "cpu", &perfect()).unwrap();
        assert!(
            line.starts_with("TDP-SMP {\"runner\":\"bochs\",\"model\":\"cpu\",\"phase_a\":[1536,"),
            "{line}"
        );
        assert!(line.trim_end().ends_with("\"failures\":[],\"verdict\":\"pass\"}"), "{line}");
        assert!(line.contains("\"last_writer\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]"), "{line}");
    }
}
