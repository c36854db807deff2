//! Criterion bench of the 4 KiB fault path in a fresh table against `x86_64`'s `OffsetPageTable::map_to`,
//! for those who prefer Criterion's statistics to `cargo xtask bench`'s one-run table. Run with
//! `cargo bench -p tdp-bench`.
//!
//! Each iteration maps 128 MiB (32768 pages) into a fresh tree; building the tree and tearing it down
//! are outside the timed region (`iter_custom`). Throughput is reported per fault / per `map_to`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tdp_bench::host::Arena;
use tdp_bench::ours::OurTree;
use tdp_bench::peer::PeerArena;
use tdp_core::addr::Level;

/// Pages per iteration: 128 MiB of 4 KiB pages, 64 leaf tables.
const PAGES: u64 = 32768;
/// Table pages for both sides: leaf tables, the tables above them, and slack for a page cache.
const TABLES: usize = 64 + 3 + 16;

fn fault_4k(c: &mut Criterion) {
    let mut group = c.benchmark_group("fault_4k_fresh_128m");
    group.throughput(Throughput::Elements(PAGES));
    group.sample_size(20);

    let arena = Arena::new(TABLES);
    group.bench_function("tdp_core_handle_fault", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                arena.reset();
                let mut tree = OurTree::new(&arena, Level::L1, PAGES);
                let start = Instant::now();
                let not_fixed = black_box(tree.fault_each(PAGES, 1));
                total += start.elapsed();
                assert_eq!(not_fixed, 0);
            }
            total
        });
    });

    let mut peer = PeerArena::new(TABLES);
    group.bench_function("x86_64_map_to", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut tree = peer.fresh();
                let start = Instant::now();
                let failed = black_box(tree.map_4k(PAGES));
                total += start.elapsed();
                assert_eq!(failed, 0);
            }
            total
        });
    });
    group.finish();
}

criterion_group!(benches, fault_4k);
criterion_main!(benches);
