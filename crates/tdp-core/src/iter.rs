//! The pre-order table iterator (KVM's `tdp_iter`): visits the entries of a tree that cover a gfn range,
//! stepping down into tables, sideways to the next entry and up when a table is done, and can yield and
//! restart from the root.
//!
//! The iterator holds a walk guard from [`TableMemory::begin_walk`] for as long as it walks, so no table
//! it can reach is reused under it (I2). It reads every entry with one atomic load, and it reads the
//! current entry again before stepping down, so a table linked by the caller in place of the entry it
//! just saw is entered (the fault handler relies on this).
//!
//! Forward progress: after a yield the walk restarts at the root from `next_last_level_gfn`, the first
//! 4 KiB gfn not yet finished. It never yields twice at the same gfn, so a host that always wants to
//! yield still sees the walk advance by at least one entry per yield.

use crate::addr::{Gfn, Level, Pfn};
use crate::host::{Table, TableMemory};
use crate::spte::{Spte, SpteFormat};
use crate::sync::{AtomicU64, Ordering};

/// The position of a walk in a tree: the current entry, its level and gfn, and the value last read.
///
/// ```
/// use tdp_core::addr::{Gfn, Level};
/// use tdp_core::iter::TdpIter;
/// use tdp_core::host::TableMemory;
/// use tdp_core::spte::SpteFormat;
/// use tdp_mock::MockHost;
///
/// let host = MockHost::new(tdp_mock::HostConfig::default());
/// let fmt = SpteFormat::EPT_AD;
/// let root = host.alloc_table(fmt.nonpresent()).unwrap();
/// // In an empty 4-level tree, a walk over 2 GiB sees one entry: the level-4 entry covering it,
/// // which is not present, so there is nothing to step down into.
/// let mut it = TdpIter::new(&host, &fmt, root, Level::L4, Level::L1, Gfn(0), Gfn(0x80000));
/// let mut visited = 0;
/// while it.valid() {
///     visited += 1;
///     it.next();
/// }
/// assert_eq!(visited, 1);
/// host.free_table_now(root);
/// ```
pub struct TdpIter<'a, M: TableMemory + ?Sized> {
    mem: &'a M,
    format: &'a SpteFormat,
    /// Keeps every table reachable from `root` allocated while the walk runs; `None` only inside
    /// [`TdpIter::yield_with`].
    guard: Option<M::WalkGuard<'a>>,
    /// The tables on the path from the root to the current entry, indexed by level: their frames, and
    /// their entries resolved once (so reading an entry is an index, not a backend lookup).
    path: [Option<(Pfn, &'a Table)>; 5],
    root_level: Level,
    min_level: Level,
    /// The first 4 KiB gfn the walk has not finished; restarts resume here.
    next_last_level_gfn: Gfn,
    /// `next_last_level_gfn` at the last yield: the walk may not yield again until it has moved on.
    yielded_gfn: Option<Gfn>,
    end: Gfn,
    gfn: Gfn,
    level: Level,
    /// The value of the current entry as last read (or as last written through the iterator).
    pub old_spte: Spte,
    valid: bool,
}

impl<'a, M: TableMemory + ?Sized> TdpIter<'a, M> {
    /// Starts a walk of the tree at `root` (a table at `root_level`) over `[start, end)`, visiting
    /// entries down to `min_level`.
    pub fn new(
        mem: &'a M,
        format: &'a SpteFormat,
        root: Pfn,
        root_level: Level,
        min_level: Level,
        start: Gfn,
        end: Gfn,
    ) -> Self {
        let mut path = [None; 5];
        path[root_level.idx()] = Some((root, mem.table(root)));
        let mut it = TdpIter {
            mem,
            format,
            guard: Some(mem.begin_walk()),
            path,
            root_level,
            min_level,
            next_last_level_gfn: start,
            yielded_gfn: None,
            end,
            gfn: start,
            level: root_level,
            old_spte: format.nonpresent(),
            valid: false,
        };
        it.restart();
        it
    }

    /// Whether the iterator points at an entry inside the range.
    #[must_use]
    #[inline]
    pub fn valid(&self) -> bool {
        self.valid && self.gfn < self.end
    }
    /// The first gfn mapped by the current entry.
    #[must_use]
    #[inline]
    pub fn gfn(&self) -> Gfn {
        self.gfn
    }
    /// The current entry's level.
    #[must_use]
    #[inline]
    pub fn level(&self) -> Level {
        self.level
    }
    /// The current entry.
    #[must_use]
    #[inline]
    pub fn entry(&self) -> &'a AtomicU64 {
        let (_, table) = self.path[self.level.idx()].expect("the current level's table is on the path");
        &table[self.gfn.index_at(self.level).get()]
    }
    /// The frame of the table holding the current entry.
    #[must_use]
    #[inline]
    pub fn table_pfn(&self) -> Pfn {
        self.path[self.level.idx()].expect("the current level's table is on the path").0
    }
    /// Reads the current entry again into [`TdpIter::old_spte`] and returns it.
    #[inline]
    pub fn refresh(&mut self) -> Spte {
        // Acquire pairs with the Release of the compare-exchange that linked a table here: a walker that
        // sees the new non-leaf also sees the child table's initialised entries. (Free on x86.)
        self.old_spte = Spte(self.entry().load(Ordering::Acquire));
        self.old_spte
    }

    /// Goes back to the root and walks down again to `next_last_level_gfn`.
    #[inline]
    pub fn restart(&mut self) {
        self.level = self.root_level;
        self.gfn = self.next_last_level_gfn.align_down(self.level);
        self.valid = self.gfn_in_tree(self.gfn);
        if self.valid {
            self.refresh();
        }
    }

    /// Moves to the next entry in pre-order: into the current entry's table (if it is one and the level
    /// is above `min_level`), else to the next entry at this level, else up.
    #[inline]
    pub fn next(&mut self) {
        if self.try_step_down() {
            return;
        }
        loop {
            if self.try_step_side() {
                return;
            }
            if !self.try_step_up() {
                self.valid = false;
                return;
            }
        }
    }

    /// Moves to the last entry of the current table, so that [`TdpIter::next`] leaves it. For callers that
    /// processed the whole table themselves.
    pub fn finish_table(&mut self) {
        let first = self.gfn.align_down(self.level.higher().unwrap_or(self.level));
        self.gfn = Gfn(first.0 + 511 * self.level.pages());
        self.next_last_level_gfn = self.gfn;
        self.refresh();
    }

    /// Whether a yield is allowed here by the forward-progress rule.
    #[must_use]
    #[inline]
    pub fn may_yield(&self) -> bool {
        self.yielded_gfn != Some(self.next_last_level_gfn)
    }

    /// Drops the walk guard, runs `f` (which drops and retakes the MMU lock), takes a new guard and
    /// restarts from the root at the first unfinished gfn. Call only when [`TdpIter::may_yield`].
    #[inline]
    pub fn yield_with<R>(&mut self, f: impl FnOnce() -> R) -> R {
        debug_assert!(
            self.may_yield(),
            "yielding twice at {:?} breaks forward progress",
            self.next_last_level_gfn
        );
        self.guard = None;
        let r = f();
        self.guard = Some(self.mem.begin_walk());
        self.yielded_gfn = Some(self.next_last_level_gfn);
        self.restart();
        r
    }

    fn gfn_in_tree(&self, gfn: Gfn) -> bool {
        let top = self.root_level.higher().map_or(u64::MAX, |l| l.pages());
        gfn.0 < top
    }

    #[inline]
    fn try_step_down(&mut self) -> bool {
        if self.level <= self.min_level {
            return false;
        }
        // Re-read: the caller may have linked a table here since `old_spte` was read.
        let spte = self.refresh();
        let Some(child) = self.format.child_table(spte, self.level) else {
            return false;
        };
        let Some(lower) = self.level.lower() else {
            return false;
        };
        self.level = lower;
        self.path[lower.idx()] = Some((child, self.mem.table(child)));
        self.gfn = self.next_last_level_gfn.align_down(lower);
        self.refresh();
        true
    }

    #[inline]
    fn try_step_side(&mut self) -> bool {
        if self.gfn.index_at(self.level).get() == 511 {
            return false;
        }
        self.gfn = Gfn(self.gfn.align_down(self.level).0 + self.level.pages());
        self.next_last_level_gfn = self.gfn;
        self.refresh();
        true
    }

    #[inline]
    fn try_step_up(&mut self) -> bool {
        let Some(higher) = self.level.higher().filter(|l| *l <= self.root_level) else {
            return false;
        };
        self.level = higher;
        self.gfn = self.gfn.align_down(higher);
        self.refresh();
        true
    }
}
