//! The scenario's steps for the second part of the MMU's completeness (NX huge pages, write tracking,
//! huge pages recovered in place when logging stops): the host's side of each, called by the Bochs
//! hypervisors and the mock alike ([`stop_logging_step`], [`track_step`], [`untrack_step`],
//! [`nx_on_step`], [`nx_recover_step`]), and the snapshots that judge them ([`Snapshot`]: the faults
//! the guest took since the previous host step and the leaves of a few gfns, against what the step
//! expects). Each must-fail variant here leaves one feature out ([`super::Broken::Nx`],
//! [`super::Broken::Track`], [`super::Broken::Recover`]) and must fail that feature's check.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{Gfn, SlotId};
use tdp_core::host::Host;
use tdp_core::mmu::Mmu;

use super::{AS_ID, Mapping, Observed, Scenario, SlotRole, Step, Translation};

/// Which feature a [`Snapshot`] judges: each has its own check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// NX huge pages: huge leaves not executable, a fetch exits and splits, recovery restores.
    Nx,
    /// Write tracking: a tracked gfn's write exits and is emulated; untracked, it maps writable.
    Track,
    /// Stopping dirty logging recovers huge leaves in place: no refault.
    Recover,
}

impl Feature {
    /// Every feature, in the order their checks are reported.
    pub const ALL: [Feature; 3] = [Feature::Recover, Feature::Track, Feature::Nx];

    /// The name of the feature's check ([`super::Check::name`]).
    #[must_use]
    pub const fn check(self) -> &'static str {
        match self {
            Feature::Nx => super::judge::NX_CHECK,
            Feature::Track => super::judge::TRACK_CHECK,
            Feature::Recover => super::judge::RECOVER_CHECK,
        }
    }
}

/// What a [`Snapshot`] expects of one gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafExpect {
    /// The gfn, in a non-system slot.
    pub gfn: u64,
    /// The level of the leaf that maps it (1: 4 KiB, 2: 2 MiB), or 0 for not mapped.
    pub level: u8,
    /// Whether the leaf must be executable (`None`: either).
    pub exec: Option<bool>,
    /// Whether the leaf must be writable (`None`: either).
    pub write: Option<bool>,
}

impl LeafExpect {
    /// Whether `kind` is what is expected, a leaf mapping `own_page` of slot `own_slot`.
    #[must_use]
    pub fn matches(&self, kind: &Mapping, own_slot: u16, own_page: u64) -> bool {
        match *kind {
            Mapping::NotPresent => self.level == 0,
            Mapping::Mmio => false,
            Mapping::Leaf { slot, page, level, rwx } => {
                slot == own_slot
                    && page == own_page
                    && level == self.level
                    && self.exec.is_none_or(|x| (rwx & 4 != 0) == x)
                    && self.write.is_none_or(|w| (rwx & 2 != 0) == w)
            }
        }
    }
}

/// A [`Step::Snapshot`]: what the host must find at that point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The feature judged.
    pub check: Feature,
    /// Faults the guest took in non-system slots since the previous host step (`None`: not judged,
    /// only compared between runners).
    pub faults: Option<u64>,
    /// Of those, instruction fetches (EPT violations with the execute bit, #NPF with the fetch bit).
    pub exec_faults: Option<u64>,
    /// The leaves expected.
    pub leaves: &'static [LeafExpect],
}

impl Snapshot {
    /// The gfns whose translations the runner records.
    pub fn gfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.leaves.iter().map(|l| l.gfn)
    }
}

/// What a runner recorded at a [`Step::Snapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSeen {
    /// Faults in non-system slots since the previous host step.
    pub faults: u64,
    /// Of those, instruction fetches.
    pub exec_faults: u64,
    /// The translations of the snapshot's gfns, in its order.
    pub translations: Vec<Translation>,
}

impl Observed {
    /// Counts a fault the guest took at `gfn` (a fetch when `exec`) if `gfn` lies in a non-system slot
    /// of `scenario`: the Bochs hypervisors call it for every EPT violation or #NPF the core handled
    /// (the guest's own code, stack and page tables live in the system slot), the mock for the faults
    /// each slot access took.
    pub fn count_fault(&mut self, scenario: &Scenario, gfn: u64, exec: bool) {
        if scenario.slot_of(Gfn(gfn)).is_some_and(|s| s.role != SlotRole::System) {
            self.slot_faults += 1;
            self.exec_faults += u64::from(exec);
        }
    }

    /// A host step (any hypercall) ran: the next snapshot counts faults from here.
    pub fn host_step(&mut self) {
        self.fault_mark = (self.slot_faults, self.exec_faults);
    }

    /// Records a [`Step::Snapshot`] with `translations` of its gfns, and starts a new fault count.
    pub fn snapshot(&mut self, translations: Vec<Translation>) {
        self.snapshots.push(SnapshotSeen {
            faults: self.slot_faults.saturating_sub(self.fault_mark.0),
            exec_faults: self.exec_faults.saturating_sub(self.fault_mark.1),
            translations,
        });
        self.host_step();
    }
}

impl Scenario {
    /// The writes the host must emulate, as `(address, value)` in order: those of [`Step::Write`]s to
    /// pages tracked at the time ([`Step::Track`] until [`Step::Untrack`]).
    #[must_use]
    pub fn expected_tracked_writes(&self) -> Vec<(u64, u64)> {
        let mut tracked = Vec::new();
        let mut out = Vec::new();
        for step in self.steps {
            match *step {
                Step::Track { gpa } => tracked.push(gpa.gfn()),
                Step::Untrack { gpa } => {
                    if let Some(at) = tracked.iter().position(|&g| g == gpa.gfn()) {
                        tracked.swap_remove(at);
                    }
                }
                Step::Write { gpa, value } if tracked.contains(&gpa.gfn()) => out.push((gpa.0, value)),
                _ => {}
            }
        }
        out
    }

    /// The [`Step::Snapshot`]s, in order.
    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> + '_ {
        self.steps.iter().filter_map(|s| if let Step::Snapshot(snap) = s { Some(snap) } else { None })
    }
}

/// [`Step::StopLogging`]: turns dirty logging off on `slot` (`set_memslot_flags`, which recovers the
/// huge leaves in place) and runs the flush it owes. `broken` (`broken-recover`): then zaps every
/// 2 MiB-aligned range of the slot, as KVM before 6.13 zapped the collapsible tables, so the guest's
/// next accesses refault.
///
/// ```
/// use tdp_core::addr::{Gfn, Level, SlotId};
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_metal::scenario::{AS_ID, stop_logging_step};
/// use tdp_mock::{HostConfig, Machine};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })?;
/// let slot = m.ram_slot(AS_ID, SlotId(1), Gfn(0), 512, SlotFlags::LOG_DIRTY);
/// m.mmu().write().insert_memslot(slot)?;
/// let mut vcpu = m.new_vcpu(AS_ID);
/// for gfn in 0..4 {
///     vcpu.write_u64(m.mmu(), Gfn(gfn).gpa(), 1)?;
/// }
/// assert_eq!(m.mmu().stats().leaves, [4, 0, 0], "logged: 4 KiB leaves");
/// stop_logging_step(m.mmu(), SlotId(1), false)?;
/// assert_eq!(m.mmu().stats().leaves, [0, 1, 0], "one 2 MiB leaf, in place");
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// No such slot, or the MMU refused the flags.
pub fn stop_logging_step<H: Host>(mmu: &Mmu<H>, slot: SlotId, broken: bool) -> Result<(), String> {
    let mut w = mmu.write();
    let s =
        w.memslots().get(AS_ID, slot).copied().ok_or_else(|| format!("stop logging: no slot {}", slot.0))?;
    let flags = s.flags.difference(tdp_core::memslot::SlotFlags::LOG_DIRTY);
    let flush = w.set_memslot_flags(AS_ID, slot, flags).map_err(|e| format!("stop logging: {e}"))?;
    drop(w);
    flush.run(mmu.host());
    if broken {
        let first = s.base_gfn.0.checked_next_multiple_of(512).unwrap_or(u64::MAX);
        let end = s.base_gfn.0.saturating_add(s.pages) & !511;
        if first < end {
            let flush = mmu.write().zap_gfn_range(AS_ID, Gfn(first), Gfn(end));
            flush.run(mmu.host());
        }
    }
    Ok(())
}

/// [`Step::Track`]: tracks writes to `gfn` and runs the flush the write protection owes. `broken`
/// (`broken-track`): does nothing, so the page maps writable and its writes never exit.
///
/// ```
/// use tdp_core::addr::{Gfn, Level, SlotId};
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::{EmulateReason, MmuConfig};
/// use tdp_metal::scenario::{AS_ID, track_step, untrack_step};
/// use tdp_mock::{HostConfig, Machine, VcpuError};
///
/// let m = Machine::new(MmuConfig::NPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })?;
/// m.mmu().write().insert_memslot(m.ram_slot(AS_ID, SlotId(1), Gfn(0), 512, SlotFlags::empty()))?;
/// let mut vcpu = m.new_vcpu(AS_ID);
/// track_step(m.mmu(), Gfn(7), false)?;
/// let write = vcpu.write_u64(m.mmu(), Gfn(7).gpa(), 1);
/// assert!(matches!(write, Err(VcpuError::Emulate { reason: EmulateReason::WriteTracked, .. })));
/// untrack_step(m.mmu(), Gfn(7), false)?;
/// vcpu.write_u64(m.mmu(), Gfn(7).gpa(), 1)?;
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The MMU refused (no slot, too many).
pub fn track_step<H: Host>(mmu: &Mmu<H>, gfn: Gfn, broken: bool) -> Result<(), String> {
    if broken {
        return Ok(());
    }
    let flush = mmu.write().track_write(AS_ID, gfn).map_err(|e| format!("track {:#x}: {e}", gfn.0))?;
    flush.run(mmu.host());
    Ok(())
}

/// [`Step::Untrack`]: stops tracking `gfn` (nothing to do for `broken`, which never tracked it).
///
/// # Errors
/// The gfn is not tracked.
pub fn untrack_step<H: Host>(mmu: &Mmu<H>, gfn: Gfn, broken: bool) -> Result<(), String> {
    if broken {
        return Ok(());
    }
    mmu.write().untrack_write(AS_ID, gfn).map_err(|e| format!("untrack {:#x}: {e}", gfn.0))
}

/// [`Step::NxHugePages`]: turns the mitigation on and runs the flush (every root is invalidated; the
/// runner loads a new one). `broken` (`broken-nx`): leaves it off, so huge leaves stay executable
/// and a fetch in them never exits.
///
/// ```
/// use tdp_core::addr::{Gfn, Level, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_metal::scenario::{AS_ID, nx_on_step, nx_recover_step};
/// use tdp_mock::{HostConfig, Machine};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })?;
/// m.mmu().write().insert_memslot(m.ram_slot(AS_ID, SlotId(1), Gfn(0), 512, SlotFlags::empty()))?;
/// let mut vcpu = m.new_vcpu(AS_ID);
/// nx_on_step(m.mmu(), false);
/// vcpu.access(m.mmu(), Gfn(3).gpa(), AccessKind::Exec)?;
/// assert_eq!(m.mmu().stats().nx_huge_splits, 1, "the fetch split the 2 MiB range");
/// assert_eq!(nx_recover_step(m.mmu()), 1, "recovery zapped its table");
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn nx_on_step<H: Host>(mmu: &Mmu<H>, broken: bool) {
    if !broken {
        let flush = mmu.write().set_nx_huge_pages(true);
        flush.run(mmu.host());
    }
}

/// [`Step::NxRecover`]: one recovery pass over every tracked table (ratio 1); returns the tables
/// zapped. The pass runs its own flush. Example: [`nx_on_step`].
pub fn nx_recover_step<H: Host>(mmu: &Mmu<H>) -> u64 {
    mmu.read().recover_nx_huge_pages(1).zapped
}
