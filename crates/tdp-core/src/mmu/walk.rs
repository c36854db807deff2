//! The single-gfn walker: from a root down one gfn's path (KVM's `kvm_tdp_mmu_get_walk` and the walk
//! inside `kvm_tdp_mmu_map`). The fault, the fast path, [`Mmu::lookup`] and the re-protection of
//! harvested pages all walk one gfn at a time through here; ranges go through [`crate::iter::TdpIter`].
//!
//! A single-gfn walk needs none of the range iterator's machinery (no restart, no yield), so it is one
//! load per level with Acquire, following present non-leaf entries. The caller holds a walk guard for
//! as long as it uses what the walk returns.
//!
//! A fault starts from a vCPU's [`WalkHint`] instead of the root when it can: the level-1 and level-2
//! tables the vCPU's last walks reached, used while no table has been removed from any tree since (the
//! MMU counts removals before it frees a table). Tables never move: a linked table stays the one on its
//! gfns' path until it is removed. Faults in a row of pages (a guest touching memory in order) skip all
//! but the last level of the walk, its chain of dependent loads; faults in a row of 2 MiB pages all but
//! the last two.

use crate::addr::{BITS_PER_LEVEL, Gfn, Level, Pfn};
use crate::host::{Host, Table};
use crate::spte::Spte;
use crate::sync::{AtomicU64, Ordering};

use super::Mmu;

/// Where a single-gfn walk stopped: the deepest table on the gfn's path that is linked, and its level
/// as an index shift (0 for level 1). The entry for the gfn in it is a leaf, non-present, frozen or
/// MMIO value, or (at level 1) a 4 KiB entry.
#[derive(Clone, Copy)]
pub(super) struct GfnWalk<'a> {
    /// The deepest linked table on the path.
    pub(super) table: &'a Table,
    /// Its entries' level as an index shift: `(level - 1) * 9`.
    pub(super) shift: u32,
    /// Its frame.
    pub(super) pfn: Pfn,
}

impl<'a> GfnWalk<'a> {
    /// The entry of the walk's table on `gfn`'s path.
    #[inline(always)]
    pub(super) fn entry(&self, gfn: Gfn) -> &'a AtomicU64 {
        &self.table[((gfn.0 >> self.shift) & 0x1ff) as usize]
    }

    /// The level of the walk's table entries.
    #[inline(always)]
    pub(super) fn level(&self) -> Level {
        // The shift of a walk is (level - 1) * 9 for a level of the tree, so the level exists.
        Level::new((self.shift / BITS_PER_LEVEL + 1) as u8).unwrap_or(Level::L5)
    }

    /// The entry on `gfn`'s path, its level and its value (loaded with Acquire).
    #[inline]
    pub(super) fn leaf(&self, gfn: Gfn) -> (&'a AtomicU64, Level, Spte) {
        let entry = self.entry(gfn);
        (entry, self.level(), Spte(entry.load(Ordering::Acquire)))
    }
}

/// The tables of levels 1 and 2 a vCPU's last walks reached (see [`Mmu::walk_gfn_hinted`]): a fault next
/// to the last one starts at level 1, a fault in the same 1 GiB (a run of 2 MiB faults, or the first
/// fault in each 2 MiB) at level 2.
#[derive(Clone, Copy, Debug)]
pub(super) struct WalkHint {
    /// The root of the tree walked.
    root: Pfn,
    /// The MMU's count of removed tables when the walk that took the tables started.
    removals: u64,
    /// The level-1 table, and the gfns it maps as `gfn >> 9` ([`WalkHint::NONE`]: none).
    l1: (u64, Pfn),
    /// The level-2 table, and the gfns it maps as `gfn >> 18`.
    l2: (u64, Pfn),
}

impl WalkHint {
    /// No gfn's index (gfns are below 2^52).
    const NONE: u64 = u64::MAX;
    /// No hint.
    pub(super) const EMPTY: WalkHint =
        WalkHint { root: Pfn(0), removals: 0, l1: (Self::NONE, Pfn(0)), l2: (Self::NONE, Pfn(0)) };
}

impl Default for WalkHint {
    fn default() -> Self {
        WalkHint::EMPTY
    }
}

/// The level-2 table's entries' shift.
const L2_SHIFT: u32 = BITS_PER_LEVEL;

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// Follows the tables already linked on `gfn`'s path from the root table at `root` and stops at the
    /// first entry that is not a table (a leaf, or a non-present, frozen or MMIO value) or at level 1.
    /// Reads only; the caller holds a walk guard.
    #[inline(always)]
    pub(super) fn walk_gfn(&self, root: Pfn, gfn: Gfn) -> GfnWalk<'_> {
        self.walk_down(root, self.config.root_level.shift_in_frames(), gfn, 0)
    }

    /// [`Mmu::walk_gfn`] from the table at `pfn` whose entries are at index shift `shift`, down to the
    /// table at shift `stop` at the lowest.
    #[inline(always)]
    fn walk_down(&self, pfn: Pfn, shift: u32, gfn: Gfn, stop: u32) -> GfnWalk<'_> {
        let (mut pfn, mut table, mut shift) = (pfn, self.host.table(pfn), shift);
        while shift > stop {
            // Acquire pairs with the Release of the compare-exchange that linked a child table here.
            let spte = Spte(table[((gfn.0 >> shift) & 0x1ff) as usize].load(Ordering::Acquire));
            // Above level 1 a present entry is a table unless its page-size bit says leaf.
            if !spte.is_present() || spte.is_large() {
                break;
            }
            pfn = spte.pfn();
            table = self.host.table(pfn);
            shift -= BITS_PER_LEVEL;
        }
        GfnWalk { table, shift, pfn }
    }

    /// [`Mmu::walk_gfn`], starting at `hint`'s level-1 or level-2 table when it is on `gfn`'s path in the
    /// tree at `root` and no table has been removed since the hint was taken; the walk renews the hint.
    /// The caller holds a walk guard, taken before this call.
    ///
    /// Why a stale hint cannot be used: the count is read inside the walk guard, and every removed
    /// table is counted before it is freed (`Mmu::free_removed_table`). A count that matches the hint's
    /// was read before the removal of the hint's table was counted, so before its free was requested:
    /// the deferred free then waits for this walk guard, as it waits for a walker that read the table's
    /// parent entry before the unlink (the host's walk guards order their start before the walker's
    /// loads, which the lockless walkers already need). An SPTE changed in a table removed meanwhile is
    /// caught as for any walker: the removal exchanges every entry with the frozen value. Tables never
    /// move, so a table not removed is still the one on its gfns' path.
    #[inline(always)]
    pub(super) fn walk_gfn_hinted(&self, root: Pfn, gfn: Gfn, hint: &mut WalkHint) -> GfnWalk<'_> {
        let removals = self.table_removals.load(Ordering::Acquire);
        let (l1_index, l2_index) = (gfn.0 >> BITS_PER_LEVEL, gfn.0 >> (L2_SHIFT + BITS_PER_LEVEL));
        let l2 = if hint.root == root && hint.removals == removals {
            if hint.l1.0 == l1_index {
                return GfnWalk { table: self.host.table(hint.l1.1), shift: 0, pfn: hint.l1.1 };
            }
            (hint.l2.0 == l2_index).then_some(hint.l2.1)
        } else {
            None
        };
        let l2 = match l2 {
            Some(l2) => GfnWalk { table: self.host.table(l2), shift: L2_SHIFT, pfn: l2 },
            None => {
                *hint = WalkHint { root, removals, ..WalkHint::EMPTY };
                let walk = self.walk_down(root, self.config.root_level.shift_in_frames(), gfn, L2_SHIFT);
                if walk.shift != L2_SHIFT {
                    return walk;
                }
                hint.l2 = (l2_index, walk.pfn);
                walk
            }
        };
        let walk = self.walk_down(l2.pfn, L2_SHIFT, gfn, 0);
        if walk.shift == 0 {
            hint.l1 = (l1_index, walk.pfn);
        }
        walk
    }

    /// Frees the page of a table removed from a tree (deferred: walkers may still be on it), counting the
    /// removal first, so that no vCPU's [`WalkHint`] leads to it afterwards.
    pub(super) fn free_removed_table(&self, pfn: Pfn) {
        // SeqCst: one locked add per removed table, off the fault path; see `walk_gfn_hinted`.
        self.table_removals.fetch_add(1, Ordering::SeqCst);
        self.host.free_table_deferred(pfn);
    }

    /// The leaf currently mapping `gfn` in the tree whose root table is at `root`, and its level, if any
    /// (for checkers and tests). An access-tracked leaf counts: it still maps the gfn.
    pub fn lookup_in(&self, root: Pfn, gfn: Gfn) -> Option<(Spte, Level)> {
        let _walk = self.host.begin_walk();
        let (_, level, spte) = self.walk_gfn(root, gfn).leaf(gfn);
        (spte.is_present() && spte.is_leaf(level)).then_some((spte, level))
    }
}
