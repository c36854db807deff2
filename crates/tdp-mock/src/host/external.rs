//! The mock's external tables ([`ExternalTables`]): what a confidential-VM host keeps beside the MMU's
//! mirror roots (the TDX module's Secure EPT), kept here as a map from (address space, gfn, level) to
//! the table or frame linked there. Every call is checked against the order a real external tree
//! needs (a parent table before anything below it, nothing left below a table that is freed, no entry
//! set twice, a removal naming what is there); a call that breaks it is recorded as an
//! [`ExternalMisuse`], which `checker::check_mirror` reports with any difference between the copy and
//! the mirror roots.
//!
//! Off until [`MockHost::enable_external_tables`]. Knobs: every n-th link or set answers
//! [`ExternalError::Busy`] ([`MockHost::set_external_busy_every`]), or every one is refused
//! ([`MockHost::set_external_refusing`]).

use std::collections::BTreeMap;

use tdp_core::addr::{AsId, Gfn, Level, Pfn};
use tdp_core::host::{ExternalError, ExternalTables};

use super::MockHost;
use crate::lock;

/// What the external tables hold at one (address space, gfn, level).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExternalEntry {
    /// A table is linked below the entry (the mirror's table page that stands for it).
    Table(Pfn),
    /// The entry maps this frame.
    Leaf(Pfn),
}

/// A call on the external tables out of the order a real external tree accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExternalMisuse {
    /// A table linked or a leaf set under an entry whose parent table is not linked.
    #[error("{what} at {gfn:?} {level:?} in {as_id:?} has no parent table")]
    NoParent {
        /// "link" or "set".
        what: &'static str,
        /// The address space.
        as_id: AsId,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The entry's level.
        level: Level,
    },
    /// An entry linked or set while it already held something.
    #[error("{gfn:?} {level:?} in {as_id:?} set while it holds {held:?}")]
    Overwritten {
        /// The address space.
        as_id: AsId,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The entry's level.
        level: Level,
        /// What it held.
        held: ExternalEntry,
    },
    /// A removal or free that names something the entry does not hold.
    #[error("{gfn:?} {level:?} in {as_id:?}: asked to remove {asked:?}, it holds {held:?}")]
    WrongRemoval {
        /// The address space.
        as_id: AsId,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The entry's level.
        level: Level,
        /// What the call named.
        asked: ExternalEntry,
        /// What the entry held.
        held: Option<ExternalEntry>,
    },
    /// A table freed while something below it is still linked or mapped.
    #[error("table at {gfn:?} {level:?} in {as_id:?} freed with {children} entries below it")]
    FreedWithChildren {
        /// The address space.
        as_id: AsId,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The entry's level.
        level: Level,
        /// Entries still below it.
        children: usize,
    },
}

/// The external tables' state.
#[derive(Debug, Default)]
pub(super) struct ExternalCopy {
    /// The mirror roots' level: entries at this level have no parent.
    root_level: Option<Level>,
    entries: BTreeMap<(AsId, Gfn, Level), ExternalEntry>,
    misuses: Vec<ExternalMisuse>,
    calls: u64,
    busy_every: u64,
    refusing: bool,
}

impl ExternalCopy {
    /// Busy or refused, as the knobs say; counts the call.
    fn answer(&mut self) -> Result<(), ExternalError> {
        self.calls += 1;
        if self.refusing {
            return Err(ExternalError::Refused);
        }
        if self.busy_every > 0 && self.calls.is_multiple_of(self.busy_every) {
            return Err(ExternalError::Busy);
        }
        Ok(())
    }

    /// Whether the table that holds the entry at (`gfn`, `level`) is linked (or the entry is in a root).
    fn has_parent(&self, as_id: AsId, gfn: Gfn, level: Level) -> bool {
        match (level.higher(), self.root_level) {
            (Some(parent), Some(root)) if level < root => {
                matches!(
                    self.entries.get(&(as_id, gfn.align_down(parent), parent)),
                    Some(ExternalEntry::Table(_))
                )
            }
            _ => true,
        }
    }

    fn install(&mut self, what: &'static str, as_id: AsId, gfn: Gfn, level: Level, entry: ExternalEntry) {
        if !self.has_parent(as_id, gfn, level) {
            self.misuses.push(ExternalMisuse::NoParent { what, as_id, gfn, level });
        }
        if let Some(held) = self.entries.insert((as_id, gfn, level), entry) {
            self.misuses.push(ExternalMisuse::Overwritten { as_id, gfn, level, held });
        }
    }

    fn remove(&mut self, as_id: AsId, gfn: Gfn, level: Level, asked: ExternalEntry) {
        let held = self.entries.remove(&(as_id, gfn, level));
        if held != Some(asked) {
            self.misuses.push(ExternalMisuse::WrongRemoval { as_id, gfn, level, asked, held });
        }
    }
}

impl MockHost {
    /// A link or a set in the external copy: answered by the knobs, then recorded (with any misuse).
    fn external_install(
        &self,
        what: &'static str,
        as_id: AsId,
        gfn: Gfn,
        level: Level,
        entry: ExternalEntry,
    ) -> Result<(), ExternalError> {
        let mut external = lock(&self.0.external);
        let copy = external.as_mut().ok_or(ExternalError::Unsupported)?;
        copy.answer()?;
        copy.install(what, as_id, gfn, level, entry);
        Ok(())
    }

    /// Gives the host external tables, so that the MMU loads mirror roots (at `root_level`, the MMU's)
    /// and accepts private memslots. Call it before any vCPU loads a root.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
    /// use tdp_core::memslot::SlotFlags;
    /// use tdp_core::mmu::MmuConfig;
    /// use tdp_mock::{ExternalEntry, HostConfig, Machine};
    ///
    /// let m = Machine::new(MmuConfig::NPT, HostConfig::default())?;
    /// m.host().enable_external_tables(Level::L4);
    /// m.host().set_external_busy_every(2); // every other call is busy: the faults retry
    /// m.mmu().write().insert_memslot(m.ram_slot(AsId(0), SlotId(0), Gfn(0), 16, SlotFlags::PRIVATE))?;
    /// let mut vcpu = m.new_vcpu(AsId(0));
    /// let frame = vcpu.write_u64(m.mmu(), Gpa(0x2000), 1)?;
    /// assert!(vcpu.mmu_state().counters.retried > 0);
    /// let leaf = m.host().external_entries().into_iter().find(|e| e.2 == Level::L1);
    /// assert_eq!(leaf, Some((AsId(0), Gfn(2), Level::L1, ExternalEntry::Leaf(frame))));
    /// assert!(m.host().external_misuses().is_empty());
    /// vcpu.release(m.mmu());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn enable_external_tables(&self, root_level: Level) {
        *lock(&self.0.external) =
            Some(ExternalCopy { root_level: Some(root_level), ..ExternalCopy::default() });
    }

    /// Every entry of the external tables, sorted by (address space, gfn, level).
    #[must_use]
    pub fn external_entries(&self) -> Vec<(AsId, Gfn, Level, ExternalEntry)> {
        lock(&self.0.external)
            .as_ref()
            .map(|c| c.entries.iter().map(|(&(a, g, l), &e)| (a, g, l, e)).collect())
            .unwrap_or_default()
    }

    /// The calls made out of order so far.
    #[must_use]
    pub fn external_misuses(&self) -> Vec<ExternalMisuse> {
        lock(&self.0.external).as_ref().map(|c| c.misuses.clone()).unwrap_or_default()
    }

    /// Link and set calls answered so far.
    #[must_use]
    pub fn external_calls(&self) -> u64 {
        lock(&self.0.external).as_ref().map_or(0, |c| c.calls)
    }

    /// Every `n`-th link or set call answers [`ExternalError::Busy`] (0: never).
    pub fn set_external_busy_every(&self, n: u64) {
        if let Some(c) = lock(&self.0.external).as_mut() {
            c.busy_every = n;
        }
    }

    /// Every link or set call is refused ([`ExternalError::Refused`]) while `refusing`.
    pub fn set_external_refusing(&self, refusing: bool) {
        if let Some(c) = lock(&self.0.external).as_mut() {
            c.refusing = refusing;
        }
    }
}

impl ExternalTables for MockHost {
    fn has_external_tables(&self) -> bool {
        lock(&self.0.external).is_some()
    }

    fn link_external_table(
        &self,
        as_id: AsId,
        gfn: Gfn,
        level: Level,
        table: Pfn,
    ) -> Result<(), ExternalError> {
        self.external_install("link", as_id, gfn, level, ExternalEntry::Table(table))
    }

    fn set_external_leaf(&self, as_id: AsId, gfn: Gfn, level: Level, pfn: Pfn) -> Result<(), ExternalError> {
        self.external_install("set", as_id, gfn, level, ExternalEntry::Leaf(pfn))
    }

    fn remove_external_leaf(&self, as_id: AsId, gfn: Gfn, level: Level, pfn: Pfn) {
        if let Some(copy) = lock(&self.0.external).as_mut() {
            copy.remove(as_id, gfn, level, ExternalEntry::Leaf(pfn));
        }
        // The TDX module blocks the entry and flushes every processor before the removal: the mock's
        // processors walk the mirror root, so their TLBs drop the page here.
        for tlb in self.tlbs() {
            tlb.flush_range(gfn, level.pages());
        }
    }

    fn free_external_table(&self, as_id: AsId, gfn: Gfn, level: Level, table: Pfn) {
        let mut external = lock(&self.0.external);
        let Some(copy) = external.as_mut() else {
            return;
        };
        let end = Gfn(gfn.0.saturating_add(level.pages()));
        let children = copy
            .entries
            .range((as_id, gfn, Level::L1)..(as_id, end, Level::L1))
            .filter(|((_, _, l), _)| *l < level)
            .count();
        if children > 0 {
            copy.misuses.push(ExternalMisuse::FreedWithChildren { as_id, gfn, level, children });
        }
        copy.remove(as_id, gfn, level, ExternalEntry::Table(table));
    }
}
