//! Huge pages around dirty logging: recovering them in place when logging stops (KVM 6.13's
//! `recover_huge_pages`) against the zap of KVM up to 6.12 followed by the refaults it causes, and
//! splitting them eagerly (at enable, or at the first clear with a log that starts all-set, KVM
//! cb00a70b) against the cost of allocating and filling a table.
//!
//! Shapes, per round, on a fresh tree of one 1 GiB slot the host maps at 2 MiB (so every 2 MiB range can
//! be one leaf): mapped with 512 2 MiB write faults, then split to 4 KiB by `split_huge_pages` (untimed
//! for recovery; the shape stopping logging leaves, every leaf writable). Then:
//! - recovery: `recover_huge_pages` (the pass `set_memslot_flags` runs when logging stops), checked to
//!   leave 512 writable 2 MiB leaves, so a guest touching all of memory takes no fault;
//! - zap + refault: `zap_collapsible` (the old pass), then the 512 faults that map 2 MiB again, each
//!   checked `Fixed`;
//! - the limits of the recovery pass: the atomic and plain sweeps over the 512 tables' entries (each
//!   removed table has its 512 entries frozen with an exchange, as KVM's `handle_removed_pt` does under
//!   the read lock);
//! - eager split at enable (`split_huge_pages`) and the first clear of an initially-set log
//!   (`reprotect_dirty` per 64 pages, splitting and protecting), per split table, against allocating a
//!   table from the same arena and filling its 512 entries.
//!
//! The fault count is KVM's `dirty_log_perf_test` comparison (393,599 -> 262,575 faults: one refault per
//! 2 MiB page saved): a logging cycle over 1 GiB takes one fault per 4 KiB page while logged (the same
//! code either way), then none after an in-place recovery, or one per 2 MiB page after the zap.

use std::sync::atomic::{AtomicU64, Ordering};

use tdp_core::addr::{AsId, Gfn, Level, PtIndex, SlotId};
use tdp_core::host::TableMemory;
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::PageCache;

use crate::host::Arena;
use crate::ours::OurTree;
use crate::peer::{atomic_swap_sweep, plain_write_sweep};
use crate::report::Row;
use crate::suite::{Config, Outcome, PAGES_1G, PAGES_2M, arena_pages};
use crate::timing::{Rounds, ns_per_op};

/// 2 MiB pages (and so tables of 4 KiB leaves) in the slot.
const HUGE: u64 = PAGES_1G / PAGES_2M;

/// A tree of `pages` pages mapped with 2 MiB leaves, then split to 4 KiB with logging off.
fn split_tree(arena: &Arena, pages: u64) -> OurTree<'_> {
    arena.reset();
    let mut tree = OurTree::new(arena, Level::L2, pages);
    assert_eq!(tree.fault_each(pages / PAGES_2M, PAGES_2M), 0, "every 2 MiB fault fixed");
    assert_eq!(tree.mmu().stats().leaves, [0, pages / PAGES_2M, 0]);
    let mut cache = PageCache::new();
    tree.mmu().write().split_huge_pages(AsId(0), SlotId(0), &mut cache).expect("the arena has the pages");
    cache.release(tree.mmu().host());
    assert_eq!(tree.mmu().stats().leaves, [pages, 0, 0]);
    tree
}

/// Every 2 MiB range is one writable 2 MiB leaf (a guest touching it takes no fault).
fn all_huge_and_writable(tree: &OurTree<'_>, pages: u64) -> bool {
    (0..pages).step_by(PAGES_2M as usize).all(|gfn| {
        tree.mmu()
            .lookup(tree.root(), Gfn(gfn))
            .is_some_and(|(leaf, level)| level == Level::L2 && leaf.is_writable())
    })
}

/// Times the recovery pass over a split tree; returns ns per 4 KiB page.
fn recovery(arena: &Arena, pages: u64) -> f64 {
    let tree = split_tree(arena, pages);
    let mmu = tree.mmu();
    let (ns, recovered) = ns_per_op(pages, || mmu.read().recover_huge_pages(AsId(0), SlotId(0)));
    assert_eq!(recovered as u64, pages / PAGES_2M, "every table replaced");
    assert!(all_huge_and_writable(&tree, pages), "nothing left to refault");
    ns
}

/// Times the zap of the collapsible tables, then the refaults; returns (zap, zap + refaults) in ns per
/// 4 KiB page and the number of refaults.
fn zap_and_refault(arena: &Arena, pages: u64) -> (f64, f64, u64) {
    let mut tree = split_tree(arena, pages);
    let (zap, zapped) = ns_per_op(pages, || tree.mmu().write().zap_collapsible(AsId(0), SlotId(0)));
    assert_eq!(zapped as u64, pages / PAGES_2M);
    assert!(
        (0..pages).step_by(PAGES_2M as usize).all(|g| tree.mmu().lookup(tree.root(), Gfn(g)).is_none()),
        "the zap left the range unmapped"
    );
    let (refault, not_fixed) = ns_per_op(pages, || tree.fault_each(pages / PAGES_2M, PAGES_2M));
    assert_eq!(not_fixed, 0, "every refault fixed");
    assert!(all_huge_and_writable(&tree, pages));
    (zap, zap + refault, pages / PAGES_2M)
}

/// Faults of a whole logging cycle over `pages`: logging on over a 2 MiB mapping, one write per 4 KiB
/// page (counted), logging off, then one write per 4 KiB page again (a fault where no writable leaf
/// maps it). Returns (faults while logged, faults after stopping).
fn cycle_faults(arena: &Arena, pages: u64) -> (u64, u64) {
    arena.reset();
    let mut tree = OurTree::new(arena, Level::L2, pages);
    assert_eq!(tree.fault_each(pages / PAGES_2M, PAGES_2M), 0);
    tree.set_logging(true);
    // Every page written once: each write faults (write-protected, then split or made writable) and
    // each fault fixes its page.
    assert_eq!(tree.fault_each(pages, 1), 0, "every logged write fault fixed");
    let logged = pages;
    tree.set_logging(false);
    let after = (0..pages)
        .filter(|&g| !tree.mmu().lookup(tree.root(), Gfn(g)).is_some_and(|(leaf, _)| leaf.is_writable()))
        .count() as u64;
    (logged, after)
}

/// How a 2 MiB-mapped tree gets split in [`split`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// Eagerly, when logging starts without an all-set log (`split_huge_pages`).
    AtEnable,
    /// At the first clear of an all-set log: `reprotect_dirty` over every 64 pages, splitting and
    /// protecting.
    AtClear,
    /// The same clear over the same tree split beforehand (untimed): the protection alone.
    ClearOnly,
}

/// Times one way of splitting a 1 GiB tree mapped with 2 MiB leaves. Returns ns per 2 MiB table.
fn split(arena: &Arena, pages: u64, how: Split) -> f64 {
    arena.reset();
    let mut tree = OurTree::new(arena, Level::L2, pages);
    assert_eq!(tree.fault_each(pages / PAGES_2M, PAGES_2M), 0);
    let mmu = tree.mmu();
    let tables = pages / PAGES_2M;
    let mut cache = PageCache::new();
    if how == Split::ClearOnly {
        mmu.write().split_huge_pages(AsId(0), SlotId(0), &mut cache).expect("the arena has the pages");
        cache.release(mmu.host());
    }
    let splits = mmu.stats().huge_splits;
    let ns = if how == Split::AtEnable {
        let (ns, r) = ns_per_op(tables, || mmu.write().split_huge_pages(AsId(0), SlotId(0), &mut cache));
        r.expect("the arena has the pages");
        cache.release(mmu.host());
        ns
    } else {
        let flags = SlotFlags::LOG_DIRTY | SlotFlags::LOG_INITIALLY_SET;
        mmu.write().set_memslot_flags(AsId(0), SlotId(0), flags).expect("slot").run(mmu.host());
        let (ns, ()) = ns_per_op(tables, || {
            let mut w = mmu.write();
            for base in (0..pages).step_by(64) {
                w.reprotect_dirty(AsId(0), SlotId(0), base, u64::MAX).run(mmu.host());
            }
        });
        let (leaf, _) = mmu.lookup(tree.root(), Gfn(pages - 1)).expect("mapped");
        assert!(!leaf.is_writable(), "the clear protected the last page");
        ns
    };
    let split_now = mmu.stats().huge_splits - splits;
    assert_eq!(split_now, if how == Split::ClearOnly { 0 } else { tables }, "{how:?}");
    assert_eq!(mmu.stats().leaves, [pages, 0, 0], "every 2 MiB leaf split");
    drop(tree);
    ns
}

/// The floor of a split: allocate a table from the same arena (filled with the non-present value, as
/// every table page is) and fill its 512 entries with the children of a huge leaf. ns per table.
fn alloc_and_fill(arena: &Arena, tables: u64) -> f64 {
    arena.reset();
    let host = crate::host::BenchHost::new(arena, Level::L2);
    let fmt = tdp_core::spte::SpteFormat::EPT_AD;
    let attrs = tdp_core::spte::LeafAttrs {
        write: tdp_core::spte::LeafWrite::Writable,
        exec: true,
        memtype: tdp_core::spte::MemType::WriteBack,
        accessed: true,
    };
    let mut pfns = Vec::with_capacity(tables as usize);
    let (ns, ()) = ns_per_op(tables, || {
        for t in 0..tables {
            let pfn = host.alloc_table(fmt.nonpresent()).expect("the arena has the pages");
            let huge = fmt.leaf(tdp_core::addr::Pfn((1 << 28) + t * PAGES_2M), Level::L2, attrs);
            for (i, entry) in host.table(pfn).iter().enumerate() {
                let index = PtIndex::new(i).expect("512 entries");
                entry.store(fmt.split_child(huge, Level::L2, index).bits(), Ordering::Relaxed);
            }
            pfns.push(pfn);
        }
    });
    for pfn in pfns {
        host.free_table_now(pfn);
    }
    ns
}

/// Contenders of the recovery group: recovery, zap, zap + refault, atomic sweep, plain sweep.
const RECOVER: usize = 0;
const ZAP: usize = 1;
const ZAP_REFAULT: usize = 2;
const ATOMIC: usize = 3;
const PLAIN: usize = 4;

/// Measures in-place recovery over 1 GiB against the zap + refault and the sweeps; pushes the rows,
/// the fault counts and a note.
pub fn measure_recover(cfg: &Config, out: &mut Outcome) {
    let pages = PAGES_1G;
    let arena = Arena::new(arena_pages(pages, Level::L1));
    let n = (HUGE * 512) as usize;
    let mut plain = vec![0u64; n];
    let atomic: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let mut round = 0u64;
    let mut refaults = 0;
    let rounds = Rounds::<5>::run(cfg.warmup, cfg.reps, || {
        round += 1;
        let mut r = [0.0; 5];
        if round.is_multiple_of(2) {
            r[RECOVER] = recovery(&arena, pages);
            (r[ZAP], r[ZAP_REFAULT], refaults) = zap_and_refault(&arena, pages);
        } else {
            (r[ZAP], r[ZAP_REFAULT], refaults) = zap_and_refault(&arena, pages);
            r[RECOVER] = recovery(&arena, pages);
        }
        (r[ATOMIC], _) = ns_per_op(pages, || atomic_swap_sweep(&atomic, round));
        (r[PLAIN], ()) = ns_per_op(pages, || plain_write_sweep(&mut plain, round));
        r
    });
    let (logged, after) = cycle_faults(&arena, pages);
    assert_eq!(after, 0, "no fault after an in-place recovery");
    let us = |i: usize| rounds.median(i) * pages as f64 / 1e3;
    let what = "stop_logging_1g_4k_in_2m_slot";
    out.rows.push(Row::new(&format!("{what}/zap_and_refault"), us(RECOVER), us(ZAP_REFAULT), "us"));
    out.rows.push(Row::new(&format!("{what}/zap_pass_only"), us(RECOVER), us(ZAP), "us"));
    out.rows.push(Row::new(
        &format!("{what}_faults/zap_and_refault"),
        (logged + after) as f64,
        (logged + refaults) as f64,
        "faults",
    ));
    let recover = rounds.median(RECOVER);
    out.rows.push(Row::new("recover_1g_4k/atomic_rmw_sweep", recover, rounds.median(ATOMIC), "ns/spte"));
    out.rows.push(Row::new("recover_1g_4k/plain_write_sweep", recover, rounds.median(PLAIN), "ns/spte"));
    out.notes.push(format!(
        "stop logging over 1 GiB mapped at 4 KiB (2 MiB-capable): in-place recovery {:.0} us (spread {:.0}%), \
         zap {:.0} us + {refaults} refaults = {:.0} us (spread {:.0}%); a logging cycle takes {logged} faults \
         while logged, then {after} after recovery against {refaults} after the zap (KVM, dirty_log_perf_test \
         -v 64 -b 4g: 393,599 -> 262,575); the recovery pass {recover:.2} ns/spte, atomic sweep {:.2}, plain \
         sweep {:.2}",
        us(RECOVER),
        100.0 * rounds.spread(RECOVER),
        us(ZAP),
        us(ZAP_REFAULT),
        100.0 * rounds.spread(ZAP_REFAULT),
        rounds.median(ATOMIC),
        rounds.median(PLAIN),
    ));
}

/// Measures splitting 1 GiB of 2 MiB leaves, at enable and at the first clear, per split table against
/// allocating and filling a table; pushes the rows and a note.
pub fn measure_split(cfg: &Config, out: &mut Outcome) {
    let pages = PAGES_1G;
    let arena = Arena::new(arena_pages(pages, Level::L1));
    let mut round = 0usize;
    let rounds = Rounds::<4>::run(cfg.warmup, cfg.reps, || {
        round += 1;
        let mut r = [0.0; 4];
        for k in 0..4 {
            match (k + round) % 4 {
                0 => r[0] = split(&arena, pages, Split::AtEnable),
                1 => r[1] = split(&arena, pages, Split::AtClear),
                2 => r[2] = split(&arena, pages, Split::ClearOnly),
                _ => r[3] = alloc_and_fill(&arena, HUGE),
            }
        }
        r
    });
    let floor = rounds.median(3);
    let (clear, clear_only) = (rounds.median(1), rounds.median(2));
    out.rows.push(Row::new("eager_split_1g_2m/alloc_and_fill_table", rounds.median(0), floor, "ns/table"));
    out.rows.push(Row::new("clear_split_1g_2m/clear_already_split", clear, clear_only, "ns/table"));
    out.rows.push(Row::new(
        "clear_split_1g_2m_split_part/alloc_and_fill_table",
        clear - clear_only,
        floor,
        "ns/table",
    ));
    out.notes.push(format!(
        "splitting 1 GiB of 2 MiB leaves ({HUGE} tables): at enable {:.0} ns/table (spread {:.0}%); the first clear \
         of an all-set log (64 pages per reprotect_dirty, split + protect) {clear:.0} ns/table (spread {:.0}%), \
         the same clear of the tree already split {clear_only:.0} (spread {:.0}%), so the split adds {:.0} ns/table \
         (one page allocated with the write lock dropped per split, as KVM); allocating and filling a table \
         {floor:.0} ns. KVM's eager split, for context: 2.94 s -> 0.146 s per enable",
        rounds.median(0),
        100.0 * rounds.spread(0),
        100.0 * rounds.spread(1),
        100.0 * rounds.spread(2),
        clear - clear_only,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contender_checks_out_on_a_small_slot() {
        let pages = 8 * PAGES_2M;
        let arena = Arena::new(arena_pages(pages, Level::L1));
        assert!(recovery(&arena, pages) > 0.0);
        let (zap, total, refaults) = zap_and_refault(&arena, pages);
        assert!(zap > 0.0 && total > zap);
        assert_eq!(refaults, 8);
        assert_eq!(cycle_faults(&arena, pages), (pages, 0));
        for how in [Split::AtEnable, Split::AtClear, Split::ClearOnly] {
            assert!(split(&arena, pages, how) > 0.0);
        }
        assert!(alloc_and_fill(&arena, 8) > 0.0);
    }
}
