//! [`Tlb`]: one vCPU's cache of guest-physical translations, tagged by root (EPTP / nCR3), as hardware
//! keeps them between flushes.
//!
//! An entry also remembers whether the leaf's dirty flag was set when it was filled (a write walk sets
//! it). As on real hardware, a write through an entry that is not marked dirty does not retire from the
//! TLB: the processor walks again to set the flag (Intel SDM Vol. 3C, "Accessed and Dirty Flags for
//! EPT" and, for ordinary paging, Vol. 3A "Caching Translation Information"; AMD APM Vol. 2, "Nested
//! Paging"). This is what makes a write after a re-protection visible to Page-Modification Logging.
//!
//! Checks nothing itself; it is the state the I3 checker (`check_tlbs`) compares with the current
//! tables (including a dirty mark the current leaf no longer carries). A fill happens under the TLB's
//! lock together with the walk that produced it (see [`crate::vcpu`]), so a flush, which takes the same
//! lock, never misses a translation that was being filled when it started: as with real hardware, a
//! flush is complete when it returns.

use std::collections::HashMap;
use std::sync::Mutex;

use tdp_core::addr::{Gfn, Level, Pfn};
use tdp_core::spte::Access;

use crate::lock;

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbEntry {
    /// The first 4 KiB host frame of the mapping.
    pub pfn: Pfn,
    /// The level of the leaf it came from (L1, L2 or L3).
    pub level: Level,
    /// What the walk allowed.
    pub rights: Access,
    /// The leaf's dirty flag was set when the entry was filled, so writes may use the entry without a
    /// walk. Only meaningful on hardware that sets A/D flags; writes through an entry without it walk.
    pub dirty: bool,
}

/// A vCPU's TLB: translations keyed by (root frame, level-aligned gfn, level).
///
/// ```
/// use tdp_core::addr::{Gfn, Level, Pfn};
/// use tdp_core::spte::Access;
/// use tdp_mock::Tlb;
///
/// let tlb = Tlb::new();
/// tlb.insert(Pfn(0x100), Gfn(0x200), Level::L2, Pfn(0x40200), Access::READ | Access::WRITE);
/// assert_eq!(tlb.lookup(Pfn(0x100), Gfn(0x203)), Some((Pfn(0x40203), Access::READ | Access::WRITE)));
/// tlb.invalidate_gfn(Gfn(0x3ff)); // the 2 MiB entry covers it
/// assert_eq!(tlb.lookup(Pfn(0x100), Gfn(0x203)), None);
/// ```
#[derive(Debug, Default)]
pub struct Tlb {
    map: Mutex<TlbMap>,
}

/// The entries of a [`Tlb`], behind its lock.
#[derive(Debug, Default)]
pub(crate) struct TlbMap {
    entries: HashMap<(Pfn, Gfn, Level), TlbEntry>,
    /// Every root tag ever filled since the last full flush, so a small range flush can remove exact
    /// keys instead of scanning every entry.
    roots: Vec<Pfn>,
}

/// Entries a TLB holds before it evicts one (hardware TLBs are small; evicting is always allowed).
pub const TLB_CAPACITY: usize = 4096;

/// Range flushes up to this many pages remove exact keys; larger ones scan every entry.
const EXACT_FLUSH_PAGES: u64 = 1 << 12;

/// Leaf levels a TLB entry can have, smallest first.
const LEAF_LEVELS: [Level; 3] = [Level::L1, Level::L2, Level::L3];

impl TlbMap {
    /// The exact frame for `gfn` and the entry that translates it (smallest page first).
    pub(crate) fn lookup(&self, root: Pfn, gfn: Gfn) -> Option<(Pfn, TlbEntry)> {
        LEAF_LEVELS.iter().find_map(|&level| {
            let base = gfn.align_down(level);
            let e = self.entries.get(&(root, base, level))?;
            Some((e.pfn.add(gfn.0 - base.0), *e))
        })
    }

    pub(crate) fn insert(&mut self, root: Pfn, gfn: Gfn, entry: TlbEntry) {
        let level = entry.level;
        let base = gfn.align_down(level);
        if self.entries.len() >= TLB_CAPACITY
            && let Some(&victim) = self.entries.keys().next()
        {
            self.entries.remove(&victim);
        }
        if !self.roots.contains(&root) {
            self.roots.push(root);
        }
        self.entries.insert((root, base, level), entry);
    }

    fn flush_range(&mut self, start: Gfn, pages: u64) {
        let end = start.0.saturating_add(pages);
        if pages > EXACT_FLUSH_PAGES {
            self.entries.retain(|&(_, base, level), _| base.0 >= end || base.0 + level.pages() <= start.0);
            return;
        }
        for &root in &self.roots {
            for level in LEAF_LEVELS {
                let mut base = start.align_down(level).0;
                while base < end {
                    self.entries.remove(&(root, Gfn(base), level));
                    base += level.pages();
                }
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.roots.clear();
    }
}

impl Tlb {
    /// An empty TLB.
    #[must_use]
    pub fn new() -> Tlb {
        Tlb::default()
    }

    /// The exact 4 KiB frame and rights cached for `gfn` under `root`, if any.
    pub fn lookup(&self, root: Pfn, gfn: Gfn) -> Option<(Pfn, Access)> {
        lock(&self.map).lookup(root, gfn).map(|(pfn, e)| (pfn, e.rights))
    }

    /// The exact 4 KiB frame cached for `gfn` under `root` and the entry it comes from, if any.
    pub fn lookup_entry(&self, root: Pfn, gfn: Gfn) -> Option<(Pfn, TlbEntry)> {
        lock(&self.map).lookup(root, gfn)
    }

    /// Caches a translation of the `level` page containing `gfn`, whose first frame is `first_frame`,
    /// not marked dirty.
    pub fn insert(&self, root: Pfn, gfn: Gfn, level: Level, first_frame: Pfn, rights: Access) {
        self.insert_entry(root, gfn, TlbEntry { pfn: first_frame, level, rights, dirty: false });
    }

    /// Caches `entry` for the `entry.level` page containing `gfn` (`entry.pfn` is its first frame).
    pub fn insert_entry(&self, root: Pfn, gfn: Gfn, entry: TlbEntry) {
        lock(&self.map).insert(root, gfn, entry);
    }

    /// Drops every entry covering `gfn`, in every root: what hardware does for the faulting address
    /// when it reports an EPT violation or a nested page fault.
    pub fn invalidate_gfn(&self, gfn: Gfn) {
        self.flush_range(gfn, 1);
    }

    /// Drops every entry.
    pub fn flush_all(&self) {
        lock(&self.map).clear();
    }

    /// Drops every entry overlapping `pages` frames from `start`, in every root.
    pub fn flush_range(&self, start: Gfn, pages: u64) {
        lock(&self.map).flush_range(start, pages);
    }

    /// Drops every entry tagged with `root` (INVEPT single-context on loading a root, as KVM does).
    pub fn flush_root(&self, root: Pfn) {
        lock(&self.map).entries.retain(|&(r, _, _), _| r != root);
    }

    /// Every cached entry as (root, first gfn, level, entry), sorted.
    pub fn entries(&self) -> Vec<(Pfn, Gfn, Level, TlbEntry)> {
        let mut all: Vec<_> = lock(&self.map).entries.iter().map(|(&(r, g, l), &e)| (r, g, l, e)).collect();
        all.sort_by_key(|&(r, g, l, _)| (r, g, l));
        all
    }

    /// How many entries are cached.
    pub fn len(&self) -> usize {
        lock(&self.map).entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` with the entries locked: a walk and the fill it produces happen atomically with
    /// respect to flushes.
    pub(crate) fn with_locked<R>(&self, f: impl FnOnce(&mut TlbMap) -> R) -> R {
        f(&mut lock(&self.map))
    }
}
