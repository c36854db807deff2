//! Aging: one `age_gfn_range` pass over 1 GiB of 4 KiB leaves with every leaf young (each has A set, or
//! without A/D bits is not yet access-tracked), then a second pass with nothing young, beside an atomic
//! read-modify-write sweep and a plain write sweep over the same table bytes.
//!
//! A young leaf costs a compare-exchange (a locked instruction) in every format: clearing A, or making
//! the leaf access-tracked. A pass with nothing young should cost a read per entry. KVM's published
//! figure for its lockless aging (a pass over a VM: 15.95 s -> 0.527 s) is context, not a peer: it
//! compares KVM with itself.
//!
//! Each round, per configuration: a fresh tree is populated with write faults (untimed), both passes are
//! timed, and both are checked (the first reported the range young, the second did not, and a leaf
//! sampled at every table is old afterwards).

use std::sync::atomic::AtomicU64;

use tdp_core::addr::{AsId, Gfn, Level};
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::SpteFormat;

use crate::config::{Config, PAGES_1G, arena_pages};
use crate::host::Arena;
use crate::logging::tree_tables;
use crate::ours::OurTree;
use crate::outcome::Outcome;
use crate::peer::{atomic_swap_sweep, plain_write_sweep};
use crate::report::Row;
use crate::timing::{Rounds, ns_per_op};

/// The configurations measured: A/D bits in hardware (an accessed bit to clear) and EPT without them
/// (the access-tracked form).
const VARIANTS: [(&str, MmuConfig); 2] =
    [("", MmuConfig::EPT), ("_no_ad", MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT })];

/// Per variant the young and the idle pass, then the atomic and plain sweeps.
const CONTENDERS: usize = 2 * VARIANTS.len() + 2;
const ATOMIC: usize = CONTENDERS - 2;
const PLAIN: usize = CONTENDERS - 1;

/// Times the young and the idle pass over a fresh tree of `pages` leaves built with `config`.
fn passes(arena: &Arena, pages: u64, config: MmuConfig) -> [f64; 2] {
    arena.reset();
    let mut tree = OurTree::with_config(arena, Level::L1, pages, config);
    assert_eq!(tree.fault_each(pages, 1), 0, "populating a fresh tree fixes every fault");
    let mmu = tree.mmu();
    let flushes = mmu.host().flushes();
    let (young, was_young) = ns_per_op(pages, || mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(pages)));
    assert!(was_young, "every leaf is born accessed");
    let (idle, still_young) = ns_per_op(pages, || mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(pages)));
    assert!(!still_young, "nothing was used between the passes");
    assert_eq!(mmu.host().flushes(), flushes, "aging owes no flush");
    let fmt = *mmu.format();
    for gfn in (0..pages).step_by(512) {
        let (leaf, _) = mmu.lookup(tree.root(), Gfn(gfn)).expect("aging keeps every leaf");
        let old = if fmt.has_accessed_dirty() { !fmt.is_accessed(leaf) } else { fmt.is_access_tracked(leaf) };
        assert!(old, "gfn {gfn}: the pass aged it");
    }
    [young, idle]
}

/// Measures both variants over 1 GiB with the sweeps; pushes the rows and a note.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let pages = PAGES_1G;
    let arena = Arena::new(arena_pages(pages, Level::L1));
    let n = (tree_tables(pages) * 512) as usize;
    let mut plain = vec![0u64; n];
    let atomic: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let mut round = 0u64;
    let rounds = Rounds::<CONTENDERS>::run(cfg.warmup, cfg.reps, || {
        let mut r = [0.0; CONTENDERS];
        round += 1;
        for k in 0..VARIANTS.len() {
            let i = (k + round as usize) % VARIANTS.len();
            [r[2 * i], r[2 * i + 1]] = passes(&arena, pages, VARIANTS[i].1);
        }
        (r[ATOMIC], _) = ns_per_op(pages, || atomic_swap_sweep(&atomic, round));
        (r[PLAIN], ()) = ns_per_op(pages, || plain_write_sweep(&mut plain, round));
        r
    });
    let (atomic_ns, plain_ns) = (rounds.median(ATOMIC), rounds.median(PLAIN));
    let mut idle = Vec::new();
    for (i, (suffix, _)) in VARIANTS.iter().enumerate() {
        let what = format!("age_1g_4k{suffix}");
        let young = rounds.median(2 * i);
        out.rows.push(Row::new(&format!("{what}/atomic_rmw_sweep"), young, atomic_ns, "ns/spte"));
        out.rows.push(Row::new(&format!("{what}/plain_write_sweep"), young, plain_ns, "ns/spte"));
        out.rows.push(Row::new(
            &format!("{what}_idle/plain_write_sweep"),
            rounds.median(2 * i + 1),
            plain_ns,
            "ns/spte",
        ));
        idle.push(format!(
            "{}: young {young:.2} (spread {:.0}%), idle {:.2}",
            if suffix.is_empty() { "EPT with A/D" } else { "EPT without A/D" },
            100.0 * rounds.spread(2 * i),
            rounds.median(2 * i + 1)
        ));
    }
    out.notes.push(format!(
        "aging 1 GiB ({pages} leaves; the sweeps cover the {} tables' entries): ns/spte {}; atomic sweep {atomic_ns:.2}, \
         plain sweep {plain_ns:.2}; a young leaf costs one compare-exchange, an idle one a read",
        tree_tables(pages),
        idle.join("; ")
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_passes_check_out_on_every_variant() {
        let pages = 4096;
        let arena = Arena::new(arena_pages(pages, Level::L1));
        for (_, config) in VARIANTS {
            let [young, idle] = passes(&arena, pages, config);
            assert!(young > 0.0 && idle > 0.0);
        }
    }
}
