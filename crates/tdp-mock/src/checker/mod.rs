//! Invariant checkers over a quiescent `Mmu<MockHost>`: [`check_tables`] (I2: every table reachable
//! once, live, unfrozen, well-formed, counted, nothing leaked), [`check_translations`] (I1: every leaf
//! agrees with the test's reference memslots and with the hardware walker) and [`check_tlbs`] (I3: no
//! vCPU caches a translation the current tables do not grant), [`check_write_tracking`] (I1: no leaf
//! in any root lets a write reach a write-tracked gfn) and [`DirtyShadow`] (I4: every page whose
//! contents changed since the last harvest is in the next one).
//!
//! Each checker takes the MMU lock for write while it looks, so faults cannot change the tables under
//! it; do not call one while holding an MMU guard. They return every violation found, each naming its
//! invariant ([`Violation::invariant`]) and carrying the values.

mod dirty;
mod mirror;
mod tables;
mod tlbs;
mod track;
mod translations;

pub use dirty::{DirtyPage, DirtyShadow};
pub use mirror::check_mirror;
pub use tables::{TableReport, check_tables};
pub use tlbs::check_tlbs;
pub use track::check_write_tracking;
pub use translations::{check_translations, check_translations_in};

use std::sync::atomic::Ordering;

use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::spte::{Access, Spte, SpteCheckError, SpteFormat};

use crate::host::{MockHost, PageState};
use crate::tlb::TlbEntry;
use crate::walker::WalkOutcome;

/// Which invariant of DESIGN.md a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Invariant {
    /// Translation: hardware sees what the reference model says.
    I1,
    /// Memory: no table page leaked, none reachable after it is freed.
    I2,
    /// TLB: no cached translation beyond the current tables.
    I3,
    /// Dirty completeness: every write after logging starts is in the next harvest.
    I4,
}

/// One broken invariant, with the values that show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The host's external tables differ from the mirror root at one entry (`None`: nothing there).
    #[error(
        "mirror: at {gfn:?} {level:?} in {as_id:?}, mirror root {root:?} holds {mirror:?}, the external tables {external:?}"
    )]
    MirrorMismatch {
        /// The mirror root.
        root: Pfn,
        /// Its address space.
        as_id: AsId,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The entry's level.
        level: Level,
        /// What the mirror holds.
        mirror: Option<crate::host::ExternalEntry>,
        /// What the external tables hold.
        external: Option<crate::host::ExternalEntry>,
    },
    /// The MMU called the external tables out of order.
    #[error("mirror: external tables misused: {0}")]
    ExternalMisuse(crate::host::ExternalMisuse),
    /// A leaf in the wrong kind of root: a private memslot's gfn in a direct root, or a shared one in a
    /// mirror root.
    #[error(
        "I1: leaf {spte:?} at {gfn:?} in {as_id:?} is in a {kind} root {root:?}, the wrong kind for its slot"
    )]
    MisroutedLeaf {
        /// The root.
        root: Pfn,
        /// "mirror" or "direct".
        kind: &'static str,
        /// Its address space.
        as_id: AsId,
        /// The leaf's first gfn.
        gfn: Gfn,
        /// The leaf.
        spte: Spte,
    },
    /// Table pages unlinked from a live tree became reusable before any TLB flush: hardware could still
    /// walk them through cached paging-structure entries while they hold something else.
    #[error("I2: {pages} table page(s) were reusable before a TLB flush followed their unlink")]
    FreedBeforeFlush {
        /// How many, since the host was created.
        pages: u64,
    },
    /// A leaf that maps a write-tracked gfn is writable, or MMU-writable (the fast path could make it
    /// writable): a guest write to the gfn would not exit.
    #[error(
        "I1: leaf {spte:?} at {level:?} in root {root:?} lets writes reach write-tracked {gfn:?} in {as_id:?}"
    )]
    WritableTrackedGfn {
        /// The address space.
        as_id: AsId,
        /// The tracked gfn.
        gfn: Gfn,
        /// The root the leaf is in.
        root: Pfn,
        /// The leaf.
        spte: Spte,
        /// Its level.
        level: Level,
    },
    /// A present leaf maps a gfn that no reference slot of its address space holds.
    #[error("I1: leaf {spte:?} at {gfn:?} {level:?} in {as_id:?} maps a gfn no reference slot holds")]
    LeafWithoutSlot {
        /// The address space.
        as_id: AsId,
        /// The leaf's first gfn.
        gfn: Gfn,
        /// Its level.
        level: Level,
        /// The leaf.
        spte: Spte,
    },
    /// A huge leaf extends past the end of the slot its first gfn is in.
    #[error("I1: leaf {spte:?} at {gfn:?} {level:?} extends past the end of slot {slot:?}")]
    LeafCrossesSlot {
        /// The leaf's first gfn.
        gfn: Gfn,
        /// Its level.
        level: Level,
        /// The leaf.
        spte: Spte,
        /// The slot.
        slot: SlotId,
    },
    /// A leaf maps a different frame than the slot's host address says.
    #[error("I1: leaf at {gfn:?} {level:?} maps {found:?}, the reference slot says {expected:?}")]
    WrongFrame {
        /// The leaf's first gfn.
        gfn: Gfn,
        /// Its level.
        level: Level,
        /// The frame the reference gives.
        expected: Pfn,
        /// The frame in the leaf.
        found: Pfn,
    },
    /// A leaf maps a host page that the host swapped out: the invalidation did not zap it, or a fault
    /// installed a translation it made before the swap.
    #[error("I1: leaf {spte:?} at {gfn:?} {level:?} maps a host page that is swapped out")]
    LeafOfSwappedPage {
        /// The leaf's first gfn.
        gfn: Gfn,
        /// Its level.
        level: Level,
        /// The leaf.
        spte: Spte,
    },
    /// A writable leaf in a read-only slot, or over a host-read-only page.
    #[error("I1: leaf {spte:?} at {gfn:?} {level:?} is writable, its slot or host page is not")]
    WritableBeyondSlot {
        /// The leaf's first gfn.
        gfn: Gfn,
        /// Its level.
        level: Level,
        /// The leaf.
        spte: Spte,
    },
    /// The hardware walker does not see what the leaf encodes (frame, level, or rights).
    #[error("I1: at {gfn:?} hardware sees {seen:?}; the leaf encodes {pfn:?} {level:?} {rights:?}")]
    HardwareDisagrees {
        /// The gfn walked.
        gfn: Gfn,
        /// The frame the leaf (and reference) say.
        pfn: Pfn,
        /// The leaf's level.
        level: Level,
        /// The rights the core gives the leaf.
        rights: Access,
        /// What the walker saw.
        seen: WalkOutcome,
    },
    /// An MMIO SPTE names another gfn than the one it sits at.
    #[error("I1: MMIO SPTE {spte:?} at {gfn:?} names {named:?}")]
    MmioWrongGfn {
        /// Where it sits.
        gfn: Gfn,
        /// The SPTE.
        spte: Spte,
        /// The gfn it names.
        named: Gfn,
    },
    /// An MMIO SPTE of the current memslot generation covers a gfn that a slot holds.
    #[error("I1: MMIO SPTE {spte:?} of the current generation hides slot memory at {gfn:?}")]
    MmioShadowsSlot {
        /// The gfn.
        gfn: Gfn,
        /// The SPTE.
        spte: Spte,
    },
    /// Hardware does not exit with a misconfiguration (EPT) or reserved-bit fault (NPT) on an MMIO SPTE.
    #[error("I1: MMIO SPTE {spte:?} at {gfn:?} does not make hardware exit as misconfigured: {seen:?}")]
    MmioNotReserved {
        /// The gfn.
        gfn: Gfn,
        /// The SPTE.
        spte: Spte,
        /// What the walker saw.
        seen: WalkOutcome,
    },
    /// A table (or root) is reachable twice.
    #[error("I2: table {pfn:?} is linked more than once")]
    LinkedTwice {
        /// The table.
        pfn: Pfn,
    },
    /// A reachable table, a root or a cache page is not live (`None`: not an arena page at all).
    #[error("I2: table {pfn:?} is reachable but {state:?}")]
    NotLive {
        /// The page.
        pfn: Pfn,
        /// Its state.
        state: Option<PageState>,
    },
    /// A frozen entry in a reachable table while no operation runs.
    #[error("I2: entry {index} of table {table:?} ({level:?}) is frozen at rest")]
    FrozenAtRest {
        /// The table.
        table: Pfn,
        /// The entry.
        index: usize,
        /// The table's level.
        level: Level,
    },
    /// A present entry that fails the format's own check.
    #[error("I2: entry {index} of table {table:?} ({level:?}) is {spte:?}: {cause}")]
    BadSpte {
        /// The table.
        table: Pfn,
        /// The entry.
        index: usize,
        /// The table's level.
        level: Level,
        /// The entry's value.
        spte: Spte,
        /// What is wrong.
        cause: SpteCheckError,
    },
    /// The leaves found at a level differ from the MMU's statistics.
    #[error("I2: {found} leaves at {level:?} in the tables, the MMU counts {stats}")]
    LeafCount {
        /// The level.
        level: Level,
        /// Leaves found.
        found: u64,
        /// The MMU's count.
        stats: u64,
    },
    /// The non-root tables found differ from the MMU's statistics.
    #[error("I2: {found} non-root tables reachable, the MMU counts {stats}")]
    TableCount {
        /// Tables found.
        found: u64,
        /// The MMU's count.
        stats: u64,
    },
    /// Live pages that are neither reachable nor in a page cache.
    #[error("I2: {live} live pages, but {tables} tables + {roots} roots + {cache_pages} cache pages")]
    Leak {
        /// Live pages in the arena.
        live: u64,
        /// Reachable non-root tables.
        tables: u64,
        /// Roots.
        roots: u64,
        /// Cache pages given to the checker.
        cache_pages: u64,
    },
    /// A page-cache page is also linked into a tree.
    #[error("I2: cache page {pfn:?} is linked into a tree")]
    CachePageLinked {
        /// The page.
        pfn: Pfn,
    },
    /// A TLB entry no longer matches the tables of its root.
    #[error(
        "I3: TLB entry {cached:?} for {gfn:?} under root {root:?} is stale at {at:?}: tables say {current:?}"
    )]
    StaleTlb {
        /// The root the entry is tagged with.
        root: Pfn,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The gfn where the tables disagree.
        at: Gfn,
        /// The entry.
        cached: TlbEntry,
        /// What a walk of the current tables gives.
        current: WalkOutcome,
    },
    /// A TLB entry is marked dirty but the current leaf has D clear: writes through it would retire
    /// without setting D (unlogged by PML), because a flush was missed after D was cleared.
    #[error("I3: TLB entry {cached:?} for {gfn:?} under root {root:?} is dirty; the leaf at {at:?} is clean")]
    StaleDirtyTlb {
        /// The root the entry is tagged with.
        root: Pfn,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The gfn whose leaf has D clear.
        at: Gfn,
        /// The entry.
        cached: TlbEntry,
    },
    /// A page changed since the last harvest and the new harvest does not report it.
    #[error(
        "I4: page {offset:#x} of slot {slot:?} ({gfn:?}) changed since the last harvest, not in this one"
    )]
    UnreportedWrite {
        /// The slot.
        slot: SlotId,
        /// The page's offset in the slot.
        offset: u64,
        /// Its gfn.
        gfn: Gfn,
    },
    /// A TLB entry is tagged with a root the MMU no longer has.
    #[error("I3: TLB entry {cached:?} for {gfn:?} is tagged with root {root:?}, which is gone")]
    TlbRootGone {
        /// The root.
        root: Pfn,
        /// The entry's first gfn.
        gfn: Gfn,
        /// The entry.
        cached: TlbEntry,
    },
}

impl Violation {
    /// The invariant this violation breaks.
    #[must_use]
    pub fn invariant(&self) -> Invariant {
        use Violation::*;
        match self {
            LeafWithoutSlot { .. }
            | WritableTrackedGfn { .. }
            | LeafCrossesSlot { .. }
            | WrongFrame { .. }
            | LeafOfSwappedPage { .. }
            | WritableBeyondSlot { .. }
            | HardwareDisagrees { .. }
            | MmioWrongGfn { .. }
            | MmioShadowsSlot { .. }
            | MmioNotReserved { .. }
            // The external tables are what a confidential guest's processor walks.
            | MirrorMismatch { .. }
            | MisroutedLeaf { .. } => Invariant::I1,
            LinkedTwice { .. }
            | NotLive { .. }
            | FrozenAtRest { .. }
            | BadSpte { .. }
            | LeafCount { .. }
            | TableCount { .. }
            | Leak { .. }
            | CachePageLinked { .. }
            | FreedBeforeFlush { .. }
            | ExternalMisuse(_) => Invariant::I2,
            StaleTlb { .. } | StaleDirtyTlb { .. } | TlbRootGone { .. } => Invariant::I3,
            UnreportedWrite { .. } => Invariant::I4,
        }
    }
}

/// One entry of a tree, as a scan sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryRef {
    pub(crate) table: Pfn,
    pub(crate) index: usize,
    pub(crate) level: Level,
    pub(crate) gfn: Gfn,
    pub(crate) spte: Spte,
}

/// Visits every entry of the tree below `root` in pre-order; `visit` returns whether to enter the
/// table a present non-leaf entry points to. Pages outside the arena are skipped. The caller holds a
/// walk guard.
pub(crate) fn scan_tree(
    host: &MockHost,
    fmt: &SpteFormat,
    root: Pfn,
    root_level: Level,
    visit: &mut dyn FnMut(&EntryRef) -> bool,
) {
    scan_table(host, fmt, root, root_level, Gfn(0), visit);
}

fn scan_table(
    host: &MockHost,
    fmt: &SpteFormat,
    table: Pfn,
    level: Level,
    base: Gfn,
    visit: &mut dyn FnMut(&EntryRef) -> bool,
) {
    let Some(entries) = host.arena_table(table) else {
        return;
    };
    for (index, entry) in entries.iter().enumerate() {
        // Acquire pairs with the Release that linked a child table, as the walker's loads do.
        let spte = Spte(entry.load(Ordering::Acquire));
        let gfn = Gfn(base.0 + index as u64 * level.pages());
        let descend = visit(&EntryRef { table, index, level, gfn, spte });
        if descend
            && let Some(child) = fmt.child_table(spte, level)
            && let Some(lower) = level.lower()
        {
            scan_table(host, fmt, child, lower, gfn, visit);
        }
    }
}
