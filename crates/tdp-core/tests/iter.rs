//! The table iterator on hand-built trees: exact pre-order, ranges that start mid-table, and the
//! forward-progress rule when the host asks to yield at every step.

use tdp_core::addr::{Gfn, Level, Pfn, PtIndex};
use tdp_core::host::TableMemory;
use tdp_core::iter::TdpIter;
use tdp_core::spte::{LeafAttrs, LeafWrite, MemType, SpteFormat};
use tdp_mock::{HostConfig, MockHost};

const FMT: SpteFormat = SpteFormat::EPT_AD;

fn leaf(pfn: u64, level: Level) -> u64 {
    let attrs =
        LeafAttrs { write: LeafWrite::Writable, exec: true, memtype: MemType::WriteBack, accessed: true };
    FMT.leaf(Pfn(pfn), level, attrs).bits()
}

/// A 4-level tree: L4[0] -> L3 table; L3[0] -> L2 table; L2[1] is a 2 MiB leaf; L2[2] -> L1 table
/// with leaves at indices 0 and 5. Returns (host, root, tables).
fn tree() -> (MockHost, Pfn, Vec<Pfn>) {
    let host = MockHost::new(HostConfig::default());
    let new = || host.alloc_table(FMT.nonpresent()).expect("arena has room");
    let (root, l3, l2, l1) = (new(), new(), new(), new());
    let set = |t: Pfn, i: usize, v: u64| {
        host.table(t)[PtIndex::new(i).expect("index").get()].store(v, std::sync::atomic::Ordering::Relaxed)
    };
    set(root, 0, FMT.nonleaf(l3).bits());
    set(l3, 0, FMT.nonleaf(l2).bits());
    set(l2, 1, leaf(0x200, Level::L2));
    set(l2, 2, FMT.nonleaf(l1).bits());
    set(l1, 0, leaf(0x1000, Level::L1));
    set(l1, 5, leaf(0x1005, Level::L1));
    (host, root, vec![root, l3, l2, l1])
}

fn visit(host: &MockHost, root: Pfn, min: Level, start: u64, end: u64) -> Vec<(Level, u64)> {
    let mut it = TdpIter::new(host, &FMT, root, Level::L4, min, Gfn(start), Gfn(end));
    let mut seen = Vec::new();
    while it.valid() {
        seen.push((it.level(), it.gfn().0));
        it.next();
    }
    seen
}

#[test]
fn walks_in_exact_pre_order() {
    let (host, root, _) = tree();
    let seen = visit(&host, root, Level::L1, 0, 0x800);
    let mut expected =
        vec![(Level::L4, 0), (Level::L3, 0), (Level::L2, 0), (Level::L2, 0x200), (Level::L2, 0x400)];
    expected.extend((0x400..0x600).map(|g| (Level::L1, g)));
    expected.push((Level::L2, 0x600));
    assert_eq!(seen, expected);
}

#[test]
fn a_range_starting_mid_table_begins_at_its_first_gfn() {
    let (host, root, _) = tree();
    let seen = visit(&host, root, Level::L1, 0x405, 0x407);
    assert_eq!(
        seen,
        [(Level::L4, 0), (Level::L3, 0), (Level::L2, 0x400), (Level::L1, 0x405), (Level::L1, 0x406)]
    );
}

#[test]
fn min_level_stops_the_descent() {
    let (host, root, _) = tree();
    let seen = visit(&host, root, Level::L2, 0, 0x800);
    assert_eq!(
        seen,
        [
            (Level::L4, 0),
            (Level::L3, 0),
            (Level::L2, 0),
            (Level::L2, 0x200),
            (Level::L2, 0x400),
            (Level::L2, 0x600)
        ]
    );
}

#[test]
fn the_walk_ends_at_the_top_of_the_tree() {
    let (host, root, _) = tree();
    // The last L4 entry, then nothing: the iterator must not wrap around.
    let top = Level::L4.pages() * 512;
    let seen = visit(&host, root, Level::L1, top - 1, u64::MAX);
    assert_eq!(seen, [(Level::L4, top - Level::L4.pages())]);
}

#[test]
fn yielding_at_every_step_still_visits_every_leaf_once_in_order() {
    let (host, root, _) = tree();
    let mut it = TdpIter::new(&host, &FMT, root, Level::L4, Level::L1, Gfn(0x3f0), Gfn(0x610));
    let mut leaves = Vec::new();
    let mut yields = 0;
    let mut steps = 0;
    while it.valid() {
        steps += 1;
        assert!(steps < 100_000, "the walk does not make progress");
        if it.may_yield() {
            yields += 1;
            it.yield_with(|| ());
            // The forward-progress rule: right after a yield the walk may not yield again.
            assert!(!it.may_yield());
            continue;
        }
        if it.level() == Level::L1 {
            leaves.push(it.gfn().0);
        }
        it.next();
    }
    assert_eq!(leaves, (0x400..0x600).collect::<Vec<_>>());
    assert!(yields > 0x200, "one yield per finished entry, got {yields}");
}

#[test]
fn stepping_down_reads_the_entry_again() {
    let (host, root, tables) = tree();
    // Start at L2[3], which is not present; link a table there before stepping: the walk must enter it.
    let mut it = TdpIter::new(&host, &FMT, root, Level::L4, Level::L1, Gfn(0x600), Gfn(0x602));
    while it.level() != Level::L2 {
        it.next();
    }
    assert!(!it.old_spte.is_present());
    let child = host.alloc_table(FMT.nonpresent()).expect("arena has room");
    it.entry().store(FMT.nonleaf(child).bits(), std::sync::atomic::Ordering::Release);
    it.next();
    assert_eq!((it.level(), it.gfn(), it.table_pfn()), (Level::L1, Gfn(0x600), child));
    drop(it);
    for t in tables.into_iter().chain([child]) {
        host.free_table_now(t);
    }
}
