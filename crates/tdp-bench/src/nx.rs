//! NX huge-page recovery: one `recover_nx_huge_pages` pass over 1 GiB of tracked tables (a fetch in each
//! 2 MiB range, with the mitigation on, left 512 tables of 4 KiB entries on the list), beside the floor
//! of what unlinking a table must do: freeze its 512 entries, one atomic exchange each (the read-lock
//! removal path), here an atomic exchange sweep over the same number of entries.
//!
//! Each round: a fresh tree with the mitigation on, one fetch per 2 MiB (untimed), the pass timed and
//! checked (every table recovered, the list empty, the range unmapped).

use std::sync::atomic::AtomicU64;

use tdp_core::addr::{Gfn, Level};

use crate::host::Arena;
use crate::ours::OurTree;
use crate::peer::atomic_swap_sweep;
use crate::report::Row;
use crate::suite::{Config, Outcome, PAGES_1G, PAGES_2M, arena_pages};
use crate::timing::{Rounds, ns_per_op};

/// Times one recovery pass over `pages` (a multiple of 512) with a tracked table per 2 MiB; returns
/// nanoseconds per table.
fn recovery_pass(arena: &Arena, pages: u64) -> f64 {
    arena.reset();
    let tables = pages / PAGES_2M;
    let mut tree = OurTree::new(arena, Level::L2, pages);
    tree.enable_nx_huge_pages();
    assert_eq!(tree.fetch_each(tables, PAGES_2M), 0, "every fetch in a fresh table maps");
    let mmu = tree.mmu();
    assert_eq!(mmu.stats().nx_huge_splits, tables, "each fetch linked one tracked table");
    let (ns, done) = ns_per_op(tables, || mmu.read().recover_nx_huge_pages(1));
    assert_eq!((done.zapped, mmu.stats().nx_huge_splits), (tables, 0), "ratio 1 recovers every table");
    assert!(mmu.lookup(tree.root(), Gfn(0)).is_none(), "the range was unmapped");
    ns
}

/// Measures the pass over 1 GiB and the exchange sweep; pushes the row and a note.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let pages = PAGES_1G;
    let tables = pages / PAGES_2M;
    let arena = Arena::new(arena_pages(pages, Level::L1));
    let entries: Vec<AtomicU64> = (0..tables * 512).map(|_| AtomicU64::new(0)).collect();
    let mut round = 0u64;
    let rounds = Rounds::<2>::run(cfg.warmup, cfg.reps, || {
        round += 1;
        let ours = recovery_pass(&arena, pages);
        let (floor, _) = ns_per_op(tables, || atomic_swap_sweep(&entries, round));
        [ours, floor]
    });
    let (ours, floor) = (rounds.median(0), rounds.median(1));
    out.rows.push(Row::new("nx_recover_1g/atomic_freeze_sweep", ours, floor, "ns/table"));
    out.notes.push(format!(
        "NX recovery over 1 GiB: {tables} tracked tables, {ours:.0} ns per table (spread {:.0}%) against \
         {floor:.0} ns to exchange a table's 512 entries (the freeze every read-lock removal does)",
        100.0 * rounds.spread(0)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_recovers_every_tracked_table() {
        let pages = 8 * PAGES_2M;
        let arena = Arena::new(arena_pages(pages, Level::L1));
        assert!(recovery_pass(&arena, pages) > 0.0);
    }
}
