//! The measurements: every comparison of `cargo xtask bench`, run in one process, each as interleaved
//! rounds of fresh trees, summarised by medians.
//!
//! Setup (building the MMU or the peer's empty tree, populating before a zap) and teardown stay outside
//! the timed regions; each timed region is checked afterwards (every fault fixed, every entry zapped), so
//! a figure cannot come from a run that did less than it claims.

use std::sync::atomic::AtomicU64;

use tdp_core::addr::Level;
use tdp_core::host::TableMemory;
use tdp_core::spte::SpteFormat;

pub use crate::config::{Config, PAGES_1G, PAGES_2M, arena_pages};
use crate::floor::{self, FloorShared};
use crate::harvest;
use crate::host::{Arena, BenchHost};
use crate::ours::OurTree;
pub use crate::outcome::Outcome;
use crate::peer::{PeerArena, atomic_swap_sweep, plain_write_sweep};
use crate::report::{FAULT_4K, METADATA, METADATA_TARGET_BYTES, Metadata, Row};
use crate::timing::{Rounds, ns_per_op};
use crate::{kvm, logging, ring};

/// Passes of each sweep per timed sample.
const SWEEP_PASSES: u64 = 16;

/// The groups of comparisons, by the name `--only` takes.
pub const GROUPS: [&str; 16] = [
    "fault_4k",
    "fault_4k_parallel",
    "fault_2m",
    "zap_range",
    "zap_all",
    "metadata",
    "ring",
    "enable_logging",
    "aging",
    "nx_recovery",
    "recover_huge",
    "eager_split",
    "harvest",
    "kvm_harvest",
    "kvm_dirtying",
    "kvm_migrate",
];

/// One group of comparisons.
type Measure = fn(&Config, &mut Outcome);

/// Runs every comparison whose group `only` accepts; `progress` is told which one starts.
///
/// # Panics
/// If a timed operation did not do all its work (a fault not fixed, an entry left mapped): then the
/// figures would be meaningless.
pub fn run(cfg: &Config, only: impl Fn(&str) -> bool, mut progress: impl FnMut(&str)) -> Outcome {
    let mut out = Outcome::default();
    let groups: [(&str, &str, Measure); GROUPS.len()] = [
        ("fault_4k", "4 KiB faults in a fresh table vs x86_64 map_to", fault_4k),
        ("fault_4k_parallel", "4 KiB faults from one and two threads (scaling)", crate::parallel::measure),
        ("fault_2m", "2 MiB faults vs x86_64 map_to (2 MiB pages)", fault_2m),
        ("zap_range", "zap of 1 GiB of 4 KiB leaves vs x86_64 unmap and sweeps", zap_range),
        ("zap_all", "zap_all teardown of a 1 GiB tree vs x86_64 unmap + clean_up", zap_all),
        ("metadata", "metadata per table page", |_, out| metadata(out)),
        ("ring", "dirty ring push + harvest + reset vs rtrb push + pop", ring::measure),
        ("enable_logging", "enable-logging pass over 1, 16 GiB of 4K leaves vs sweeps", logging::measure),
        ("aging", "aging pass over 1 GiB of 4K leaves (young, then idle) vs sweeps", crate::aging::measure),
        (
            "nx_recovery",
            "NX huge-page recovery over 1 GiB of tracked tables vs freeze sweep",
            crate::nx::measure,
        ),
        (
            "recover_huge",
            "stop logging over 1 GiB at 4K: in-place recovery vs zap + refault, and vs sweeps",
            crate::recover::measure_recover,
        ),
        (
            "eager_split",
            "split 1 GiB of 2M leaves (enable, first clear) vs allocating and filling a table",
            crate::recover::measure_split,
        ),
        ("harvest", "harvest of 1000 dirty pages vs memory size: ring vs bitmap", |cfg, out| {
            let series = harvest::measure(cfg, out);
            out.harvest = Some(series);
        }),
        (
            "kvm_harvest",
            "real KVM: harvest of 1000 guest-dirtied pages, ring vs bitmap vs kvm-ioctls",
            kvm::harvest::measure,
        ),
        (
            "kvm_dirtying",
            "real KVM: guest dirtying throughput, no logging vs bitmap vs ring",
            kvm::dirtying::measure,
        ),
        (
            "kvm_migrate",
            "real KVM: `tdp migrate` total time and downtime, ring vs bitmap",
            kvm::migrate::measure,
        ),
    ];
    for (name, what, measure) in groups {
        if only(name) {
            progress(what);
            measure(cfg, &mut out);
        }
    }
    out
}

fn fault_4k(cfg: &Config, out: &mut Outcome) {
    let arena = Arena::new(arena_pages(PAGES_1G, Level::L1));
    let mut peer = PeerArena::new(arena_pages(PAGES_1G, Level::L1));
    let mut flushes = 0;
    let rounds = Rounds::<4>::run(cfg.warmup, cfg.reps, || {
        arena.reset();
        let mut tree = OurTree::new(&arena, Level::L1, PAGES_1G);
        let (ours, not_fixed) = ns_per_op(PAGES_1G, || tree.fault_each(PAGES_1G, 1));
        assert_eq!(not_fixed, 0, "every fault in a fresh table installs a mapping");
        assert_eq!(tree.mmu().stats().leaves[0], PAGES_1G);
        flushes = tree.mmu().host().flushes();
        drop(tree);

        // The same faults in an order that never reuses the walk hint, with every table linked first.
        arena.reset();
        let mut tree = OurTree::new(&arena, Level::L1, PAGES_1G);
        let tables = PAGES_1G / PAGES_2M;
        assert_eq!(tree.fault_each(tables, PAGES_2M), 0, "the tables are linked");
        let (scattered, not_fixed) = ns_per_op(PAGES_1G - tables, || tree.fault_scattered(tables));
        assert_eq!(not_fixed, 0, "every scattered fault installs a mapping");
        assert_eq!(tree.mmu().stats().leaves[0], PAGES_1G);
        drop(tree);

        let mut tree = peer.fresh();
        let (theirs, failed) = ns_per_op(PAGES_1G, || tree.map_4k(PAGES_1G));
        assert_eq!(failed, 0, "every map_to on a fresh table succeeds");

        arena.reset();
        let host = BenchHost::new(&arena, Level::L1);
        let root = host.alloc_table(SpteFormat::EPT_AD.nonpresent()).expect("a fresh arena has pages");
        let shared = FloorShared::default();
        let (floor, missed) = ns_per_op(PAGES_1G, || floor::fault_each(&host, root, &shared, PAGES_1G));
        assert_eq!((missed, shared.leaves()), (0, PAGES_1G));
        arena.forget_all();
        [ours, theirs, floor, scattered]
    });
    out.rows.push(Row::new(FAULT_4K, rounds.median(0), rounds.median(1), "ns/fault"));
    out.rows.push(Row::new("fault_4k_fresh/design_floor", rounds.median(0), rounds.median(2), "ns/fault"));
    out.rows.push(Row::new(
        "fault_4k_scattered/fault_4k_fresh",
        rounds.median(3),
        rounds.median(0),
        "ns/fault",
    ));
    out.notes.push(format!(
        "4K faults: {PAGES_1G} per round, TLB flushes requested {flushes}; design floor / map_to = {:.2}x; \
         spread (IQR/median) ours {:.0}%, map_to {:.0}%, floor {:.0}%",
        rounds.median(2) / rounds.median(1),
        100.0 * rounds.spread(0),
        100.0 * rounds.spread(1),
        100.0 * rounds.spread(2)
    ));
}

fn fault_2m(cfg: &Config, out: &mut Outcome) {
    let count = cfg.faults_2m;
    let pages = count * PAGES_2M;
    let arena = Arena::new(arena_pages(pages, Level::L2));
    let mut peer = PeerArena::new(arena_pages(pages, Level::L2));
    let rounds = Rounds::<2>::run(cfg.warmup, cfg.reps, || {
        arena.reset();
        let mut tree = OurTree::new(&arena, Level::L2, pages);
        let (ours, not_fixed) = ns_per_op(count, || tree.fault_each(count, PAGES_2M));
        assert_eq!(not_fixed, 0, "every 2 MiB fault in a fresh table installs a mapping");
        assert_eq!(tree.mmu().stats().leaves, [0, count, 0], "the host maps 2 MiB, so the MMU does");
        drop(tree);

        let mut tree = peer.fresh();
        let (theirs, failed) = ns_per_op(count, || tree.map_2m(count));
        assert_eq!(failed, 0);
        [ours, theirs]
    });
    out.rows.push(Row::new("fault_2m/x86_64_map_to_2m", rounds.median(0), rounds.median(1), "ns/fault"));
    out.notes.push(format!(
        "2M faults: {count} per round ({} GiB); spread ours {:.0}%, map_to {:.0}%",
        count / 512,
        100.0 * rounds.spread(0),
        100.0 * rounds.spread(1)
    ));
}

fn zap_range(cfg: &Config, out: &mut Outcome) {
    let arena = Arena::new(arena_pages(PAGES_1G, Level::L1));
    let mut peer = PeerArena::new(arena_pages(PAGES_1G, Level::L1));
    let n = PAGES_1G as usize;
    let mut plain = vec![0u64; n];
    let atomic: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let mut seed = 0;
    let rounds = Rounds::<4>::run(cfg.warmup, cfg.reps, || {
        arena.reset();
        let mut tree = OurTree::new(&arena, Level::L1, PAGES_1G);
        assert_eq!(tree.fault_each(PAGES_1G, 1), 0);
        let (ours, ()) = ns_per_op(PAGES_1G, || tree.zap_range(PAGES_1G));
        let stats = tree.mmu().stats();
        assert_eq!(stats.leaves, [0; 3], "the zap removed every leaf");
        assert_eq!(stats.tables, 2 + 512, "and kept the tables");
        drop(tree);

        let mut tree = peer.fresh();
        assert_eq!(tree.map_4k(PAGES_1G), 0);
        let (unmap, failed) = ns_per_op(PAGES_1G, || tree.unmap_4k(PAGES_1G));
        assert_eq!(failed, 0);

        // One pass takes tens of microseconds, too short to time alone: time several back to back.
        let (plain_ns, ()) = ns_per_op(PAGES_1G * SWEEP_PASSES, || {
            for _ in 0..SWEEP_PASSES {
                seed += 1;
                plain_write_sweep(&mut plain, seed);
            }
        });
        let (atomic_ns, _) = ns_per_op(PAGES_1G * SWEEP_PASSES, || {
            (0..SWEEP_PASSES).fold(0, |acc, pass| acc ^ atomic_swap_sweep(&atomic, seed + pass))
        });
        [ours, unmap, plain_ns, atomic_ns]
    });
    let ours = rounds.median(0);
    out.rows.push(Row::new("zap_range_1g_4k/x86_64_unmap", ours, rounds.median(1), "ns/entry"));
    out.rows.push(Row::new("zap_range_1g_4k/plain_write_sweep", ours, rounds.median(2), "ns/entry"));
    out.rows.push(Row::new("zap_range_1g_4k/atomic_xchg_sweep", ours, rounds.median(3), "ns/entry"));
    out.notes.push(format!(
        "sweeps over {} MiB: atomic xchg / plain write = {:.1}x; spread zap {:.0}%, unmap {:.0}%, \
         plain {:.0}%, atomic {:.0}%",
        (PAGES_1G * 8) >> 20,
        rounds.median(3) / rounds.median(2),
        100.0 * rounds.spread(0),
        100.0 * rounds.spread(1),
        100.0 * rounds.spread(2),
        100.0 * rounds.spread(3)
    ));
}

fn zap_all(cfg: &Config, out: &mut Outcome) {
    let arena = Arena::new(arena_pages(PAGES_1G, Level::L1));
    let mut peer = PeerArena::new(arena_pages(PAGES_1G, Level::L1));
    let rounds = Rounds::<2>::run(cfg.warmup, cfg.reps, || {
        arena.reset();
        let mut tree = OurTree::new(&arena, Level::L1, PAGES_1G);
        assert_eq!(tree.fault_each(PAGES_1G, 1), 0);
        let (ours, ()) = ns_per_op(PAGES_1G, || tree.zap_all());
        let stats = tree.mmu().stats();
        assert_eq!((stats.leaves, stats.tables), ([0; 3], 0), "zap_all removed every leaf and table");
        drop(tree);

        let mut tree = peer.fresh();
        assert_eq!(tree.map_4k(PAGES_1G), 0);
        let used = tree.frames_used();
        let (theirs, freed) = ns_per_op(PAGES_1G, || {
            let failed = tree.unmap_4k(PAGES_1G);
            (failed, tree.clean_up_4k(PAGES_1G))
        });
        assert_eq!(freed, (0, used - 1), "unmap + clean_up removed every leaf and table below the root");
        [ours, theirs]
    });
    out.rows.push(Row::new(
        "zap_all_1g_4k/x86_64_unmap_clean_up",
        rounds.median(0),
        rounds.median(1),
        "ns/entry",
    ));
}

fn metadata(out: &mut Outcome) {
    let m = Metadata::measure();
    out.rows.push(Row::new(METADATA, m.worst_per_page() as f64, METADATA_TARGET_BYTES, "bytes"));
    let tables = 1 + 1 + 1 + PAGES_1G / PAGES_2M;
    out.notes.push(format!(
        "metadata: core {} B per non-root table, {} B per root (root-list entry + Arc'd validity flag); \
         backend {} B per page; worst page {} B, average over a 1 GiB 4K tree ({tables} tables) {:.2} B",
        m.core_per_table,
        m.core_per_root,
        m.backend_per_page,
        m.worst_per_page(),
        m.average_per_page(tables)
    ));
}
