//! The single-gfn walker: from a root down one gfn's path (KVM's `kvm_tdp_mmu_get_walk` and the walk
//! inside `kvm_tdp_mmu_map`). The fault, the fast path, [`Mmu::lookup`] and the re-protection of
//! harvested pages all walk one gfn at a time through here; ranges go through [`crate::iter::TdpIter`].
//!
//! A single-gfn walk needs none of the range iterator's machinery (no restart, no yield), so it is one
//! load per level with Acquire, following present non-leaf entries. The caller holds a walk guard for
//! as long as it uses what the walk returns.

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

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// Follows the tables already linked on `gfn`'s path from the root table at `root` and stops at the
    /// first entry that is not a table (a leaf, or a non-present, frozen or MMIO value) or at level 1.
    /// Reads only; the caller holds a walk guard.
    #[inline(always)]
    pub(super) fn walk_gfn(&self, root: Pfn, gfn: Gfn) -> GfnWalk<'_> {
        let mut table = self.host.table(root);
        let mut shift = self.config.root_level.shift_in_frames();
        while shift > 0 {
            // Acquire pairs with the Release of the compare-exchange that linked a child table here.
            let spte = Spte(table[((gfn.0 >> shift) & 0x1ff) as usize].load(Ordering::Acquire));
            // Above level 1 a present entry is a table unless its page-size bit says leaf.
            if !spte.is_present() || spte.is_large() {
                break;
            }
            table = self.host.table(spte.pfn());
            shift -= BITS_PER_LEVEL;
        }
        GfnWalk { table, shift }
    }

    /// The leaf currently mapping `gfn` in the tree whose root table is at `root`, and its level, if any
    /// (for checkers and tests). An access-tracked leaf counts: it still maps the gfn.
    pub fn lookup_in(&self, root: Pfn, gfn: Gfn) -> Option<(Spte, Level)> {
        let _walk = self.host.begin_walk();
        let (_, level, spte) = self.walk_gfn(root, gfn).leaf(gfn);
        (spte.is_present() && spte.is_leaf(level)).then_some((spte, level))
    }
}
