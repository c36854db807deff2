//! The enable-logging pass: `set_memslot_flags(.., LOG_DIRTY)` over 1 GiB and 16 GiB of 4 KiB leaves,
//! for three MMU configurations, beside a plain and an atomic sweep over the same table bytes.
//!
//! Each round, per configuration: a fresh tree is populated with write faults (untimed; every leaf is
//! born writable with A and D set), the pass and its flush are timed, and every leaf is then looked up
//! through `Mmu::lookup` to check that it changed (W clear, or D clear with PML). Logging is then turned
//! off (with the host mapping at 4 KiB nothing can be collapsed, so nothing is zapped) and on again: the
//! second pass finds every leaf already protected, so it must store nothing and request no flush; its
//! time is the cost of visiting the leaves alone. Re-populating per round is what makes the 16 GiB case
//! slow (4 Mi faults per configuration; docs/benchmarks.md, "Measurements behind choices in the code"),
//! so it gets fewer rounds.

use std::sync::atomic::AtomicU64;

use tdp_core::addr::{Gfn, Level};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::{EptBits, SpteFormat};

use crate::config::{Config, PAGES_1G, arena_pages};
use crate::host::Arena;
use crate::ours::OurTree;
use crate::outcome::Outcome;
use crate::peer::{atomic_clear_sweep, plain_clear_sweep, scalar_clear_sweep};
use crate::report::Row;
use crate::timing::{Rounds, ns_per_op};

/// The MMU configurations measured: a name for the rows (empty for the default, EPT with A/D bits) and
/// the configuration.
pub const VARIANTS: [(&str, MmuConfig); 3] = [
    ("", MmuConfig::EPT),
    ("_no_ad", MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT }),
    ("_pml", MmuConfig::EPT_PML),
];

/// Guest sizes measured, in GiB.
pub const SIZES_GIB: [u64; 2] = [1, 16];

/// Contenders per round: per variant the first and the second pass, then the plain, atomic and scalar
/// sweeps.
const CONTENDERS: usize = 2 * VARIANTS.len() + 3;

/// Where the sweeps are among the contenders.
const PLAIN: usize = CONTENDERS - 3;
const ATOMIC: usize = CONTENDERS - 2;
const SCALAR: usize = CONTENDERS - 1;

/// Table pages of a 4-level tree mapping `pages` 4 KiB pages from gfn 0: leaf tables, the tables above
/// them and the root. The sweeps cover as many entries (512 per table).
#[must_use]
pub const fn tree_tables(pages: u64) -> u64 {
    let l1 = pages.div_ceil(512);
    let l2 = l1.div_ceil(512);
    let l3 = l2.div_ceil(512);
    l1 + l2 + l3 + 1
}

/// Warm-up and recorded rounds for a size: every round re-populates the tree, which at 16 GiB costs far
/// more than the pass, so big sizes get a third of the rounds (at least 3) and one warm-up round.
#[must_use]
pub fn rounds_for(cfg: &Config, gib: u64) -> (usize, usize) {
    if gib <= 1 { (cfg.warmup, cfg.reps) } else { (cfg.warmup.min(1), (cfg.reps / 3).max(3).min(cfg.reps)) }
}

/// How many leaves of a tree of `pages` leaves do not carry the protection the pass must leave: W clear
/// for write protection, D clear (W kept) with PML.
fn unprotected_leaves(tree: &OurTree<'_>, pages: u64) -> u64 {
    let mmu = tree.mmu();
    let fmt = *mmu.format();
    let pml = mmu.config().pml;
    let mut wrong = 0;
    for gfn in 0..pages {
        let ok = match mmu.lookup(tree.root(), Gfn(gfn)) {
            Some((spte, Level::L1)) if pml => spte.is_writable() && !fmt.is_dirty(spte),
            Some((spte, Level::L1)) => !spte.is_writable(),
            _ => false,
        };
        wrong += u64::from(!ok);
    }
    wrong
}

/// Times the first and the second enable-logging pass over a fresh tree of `pages` 4 KiB leaves built
/// with `config`, and checks both.
fn passes(arena: &Arena, pages: u64, config: MmuConfig) -> [f64; 2] {
    arena.reset();
    let mut tree = OurTree::with_config(arena, Level::L1, pages, config);
    assert_eq!(tree.fault_each(pages, 1), 0, "populating a fresh tree fixes every fault");
    let flushes = tree.mmu().host().flushes();
    let (first, ()) = ns_per_op(pages, || tree.set_logging(true));
    assert_eq!(tree.mmu().host().flushes(), flushes + 1, "the pass owes one (merged) flush");
    assert_eq!(tree.mmu().stats().leaves, [pages, 0, 0], "the pass kept every leaf");
    assert_eq!(unprotected_leaves(&tree, pages), 0, "the pass protected every leaf");

    tree.set_logging(false);
    assert_eq!(tree.mmu().stats().leaves, [pages, 0, 0], "with 4 KiB host pages nothing is collapsed");
    let flushes = tree.mmu().host().flushes();
    let (second, ()) = ns_per_op(pages, || tree.set_logging(true));
    assert_eq!(tree.mmu().host().flushes(), flushes, "a pass over protected leaves changes nothing");
    [first, second]
}

/// Measures every variant at every size, interleaved with the sweeps; pushes the rows and notes.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let max_pages = SIZES_GIB.iter().max().copied().unwrap_or(1) * PAGES_1G;
    let arena = Arena::new(arena_pages(max_pages, Level::L1));
    let entries = (tree_tables(max_pages) * 512) as usize;
    let mut plain = vec![u64::MAX; entries];
    let atomic: Vec<AtomicU64> = (0..entries).map(|_| AtomicU64::new(u64::MAX)).collect();
    let bit = EptBits::WRITE.bits();
    for gib in SIZES_GIB {
        let pages = gib * PAGES_1G;
        let n = (tree_tables(pages) * 512) as usize;
        // Short passes are timed several at a time, as in the zap group.
        let sweeps = (16 / gib).max(1);
        let (warmup, reps) = rounds_for(cfg, gib);
        let mut round = 0;
        let rounds = Rounds::<CONTENDERS>::run(warmup, reps, || {
            let mut r = [0.0; CONTENDERS];
            // The configuration measured first after the sweeps runs slower (the sweeps leave 2 MiB of
            // freshly written lines behind; docs/benchmarks.md, "Measurements behind choices in the
            // code"); rotate which one goes first so no row carries that alone.
            round += 1;
            for k in 0..VARIANTS.len() {
                let i = (k + round) % VARIANTS.len();
                [r[2 * i], r[2 * i + 1]] = passes(&arena, pages, VARIANTS[i].1);
            }
            let per_leaf = pages * sweeps;
            (r[PLAIN], ()) = ns_per_op(per_leaf, || {
                (0..sweeps).for_each(|_| plain_clear_sweep(&mut plain[..n], bit));
            });
            (r[ATOMIC], ()) = ns_per_op(per_leaf, || {
                (0..sweeps).for_each(|_| atomic_clear_sweep(&atomic[..n], bit));
            });
            (r[SCALAR], ()) = ns_per_op(per_leaf, || {
                (0..sweeps).for_each(|_| scalar_clear_sweep(&atomic[..n], bit));
            });
            r
        });
        let (plain_ns, atomic_ns) = (rounds.median(PLAIN), rounds.median(ATOMIC));
        let mut second = Vec::new();
        for (i, (suffix, _)) in VARIANTS.iter().enumerate() {
            let what = format!("enable_logging_{gib}g_4k{suffix}");
            let ours = rounds.median(2 * i);
            out.rows.push(Row::new(&format!("{what}/atomic_rmw_sweep"), ours, atomic_ns, "ns/spte"));
            out.rows.push(Row::new(&format!("{what}/plain_write_sweep"), ours, plain_ns, "ns/spte"));
            let spread = 100.0 * rounds.spread(2 * i);
            second.push(format!("{}: {:.2} (spread {spread:.0}%)", label(suffix), rounds.median(2 * i + 1)));
        }
        out.notes.push(format!(
            "enable logging {gib} GiB ({pages} leaves, {reps} rounds, sweeps over {} MiB of tables): atomic / \
             plain sweep = {:.1}x; scalar (unvectorised) sweep {:.2} ns/spte; a second pass over already \
             protected leaves (no store, no flush), ns/spte: {}",
            (n * 8) >> 20,
            atomic_ns / plain_ns,
            rounds.median(SCALAR),
            second.join(", ")
        ));
    }
}

/// The configuration a row suffix names, for notes.
fn label(suffix: &str) -> &'static str {
    match suffix {
        "_no_ad" => "EPT without A/D",
        "_pml" => "EPT + PML",
        _ => "EPT with A/D",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_tables_count_every_level() {
        assert_eq!(tree_tables(PAGES_1G), 512 + 1 + 1 + 1);
        assert_eq!(tree_tables(16 * PAGES_1G), 8192 + 16 + 1 + 1);
    }

    #[test]
    fn every_variant_protects_every_leaf_and_the_second_pass_changes_nothing() {
        let pages = 2048;
        let arena = Arena::new(arena_pages(pages, Level::L1));
        for (_, config) in VARIANTS {
            let [first, second] = passes(&arena, pages, config);
            assert!(first > 0.0 && second > 0.0);
        }
    }

    #[test]
    fn big_sizes_get_fewer_rounds() {
        assert_eq!(rounds_for(&Config::QUICK, 1), (1, 5));
        assert_eq!(rounds_for(&Config::QUICK, 16), (1, 3));
        assert_eq!(rounds_for(&Config::FULL, 16), (1, 10));
        let one = Config { reps: 1, ..Config::QUICK };
        assert_eq!(rounds_for(&one, 16), (1, 1));
    }
}
