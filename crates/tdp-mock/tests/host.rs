//! The mock host on its own: the table arena (poisoning, double-free detection, deferred free under
//! walk guards, exhaustion and failure injection), host translation, TLB-flush fan-out, yields, events
//! and guest data; and the `tdp-core` doc examples that run on it.
//!
//! Checks: I2 (poison, "I2 violation" panics, reclaim only without walkers) and the host knobs the I1
//! and I3 checkers rely on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::host::{
    AllocError, HostFaultError, HostMemory, HostPage, HostTranslate, MmuYield, TableMemory, TlbFlush,
};
use tdp_core::iter::TdpIter;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::PageCache;
use tdp_core::spte::{Access, Spte, SpteFormat};
use tdp_mock::{GUEST_RAM_BASE_PFN, HostConfig, MockHost, POISON, PageState, TABLE_BASE_PFN, Tlb};

fn small() -> MockHost {
    MockHost::new(HostConfig { table_capacity: 4, ..HostConfig::default() })
}

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("the call must panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn i2_freed_pages_are_poisoned_and_misuse_panics() {
    let host = small();
    let pfn = host.alloc_table(Spte(7)).expect("a page");
    assert_eq!(pfn, Pfn(TABLE_BASE_PFN));
    assert!(host.table(pfn).iter().all(|e| e.load(Ordering::Relaxed) == 7), "filled");
    host.free_table_now(pfn);
    assert_eq!(host.page_state(pfn), Some(PageState::Free));
    let table = host.arena_table(pfn).expect("an arena page");
    assert!(table.iter().all(|e| e.load(Ordering::Relaxed) == POISON), "poisoned");
    assert!(Spte(POISON).is_present(), "poison looks present to a careless reader");
    assert!(panic_message(|| host.free_table_now(pfn)).starts_with("I2 violation"));
    assert!(panic_message(|| host.free_table_deferred(pfn)).starts_with("I2 violation"));
    assert!(
        panic_message(|| {
            let _ = host.table(pfn);
        })
        .starts_with("I2 violation")
    );
    assert!(
        panic_message(|| {
            let _ = host.table(Pfn(GUEST_RAM_BASE_PFN));
        })
        .starts_with("I2 violation")
    );
    assert_eq!(host.page_state(Pfn(GUEST_RAM_BASE_PFN)), None);
}

#[test]
fn i2_deferred_frees_wait_for_every_walker() {
    let host = small();
    let a = host.alloc_table(Spte(0)).expect("a page");
    let b = host.alloc_table(Spte(0)).expect("a page");
    let outer = host.begin_walk();
    let inner = host.begin_walk();
    host.free_table_deferred(a);
    host.free_table_deferred(b);
    assert_eq!((host.pending_frees(), host.active_walkers()), (2, 2));
    drop(inner);
    host.reclaim();
    assert_eq!(host.page_state(a), Some(PageState::Deferred), "a walker is still active");
    assert_eq!(host.alloc_stats().deferred, 2);
    drop(outer);
    assert_eq!((host.page_state(a), host.page_state(b)), (Some(PageState::Free), Some(PageState::Free)));
    assert_eq!((host.pending_frees(), host.alloc_stats().deferred, host.alloc_stats().live), (0, 0, 0));
    // Without walkers a deferred free is immediate.
    let c = host.alloc_table(Spte(0)).expect("a page");
    host.free_table_deferred(c);
    assert_eq!(host.page_state(c), Some(PageState::Free));
}

#[test]
fn i2_exhaustion_and_the_budget_fail_cleanly() {
    let host = small();
    let pages: Vec<Pfn> = (0..4).map(|_| host.alloc_table(Spte(0)).expect("a page")).collect();
    assert_eq!(host.alloc_table(Spte(0)), Err(AllocError));
    // Without walkers, a deferred free makes the page available at once.
    host.free_table_deferred(pages[0]);
    assert!(host.alloc_table(Spte(0)).is_ok());
    pages[1..].iter().for_each(|&p| host.free_table_now(p));
    host.set_alloc_budget(Some(1));
    assert!(host.alloc_table(Spte(0)).is_ok());
    assert_eq!(host.alloc_table(Spte(0)), Err(AllocError));
    host.set_alloc_budget(None);
    assert!(host.alloc_table(Spte(0)).is_ok());
    let stats = host.alloc_stats();
    assert_eq!((stats.live, stats.peak_live, stats.total_allocs, stats.failed_allocs), (3, 4, 7, 2));
}

#[test]
fn i1_translation_follows_the_slot_and_the_host_mapping() {
    let host = MockHost::new(HostConfig { guest_ram_pages: 0x40_0000, ..HostConfig::default() });
    let ram = host.guest_ram_base();
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0x100), 0x200, ram + 0x10_0000, SlotFlags::empty());
    let page = host.translate(&slot, Gfn(0x105), true).expect("guest RAM");
    assert_eq!(
        page,
        HostPage {
            pfn: Pfn(GUEST_RAM_BASE_PFN + 0x105),
            writable: true,
            level: Level::L3,
            memory: HostMemory::Ram
        }
    );
    host.set_host_readonly(page.pfn, true);
    let ro = host.translate(&slot, Gfn(0x105), true).expect("guest RAM");
    assert_eq!((ro.writable, ro.level), (false, Level::L1));
    let next = host.translate(&slot, Gfn(0x106), false).expect("guest RAM");
    assert_eq!(next.level, Level::L1, "no huge host page covers a read-only page");
    host.set_host_readonly(page.pfn, false);
    assert_eq!(host.translate(&slot, Gfn(0x106), false).map(|p| p.level), Ok(Level::L3));
    let outside = Memslot { host_base: 0x1000, ..slot };
    assert_eq!(host.translate(&outside, Gfn(0x100), false), Err(HostFaultError::NoPage { gfn: Gfn(0x100) }));
    // The last 1 GiB of a RAM size that is not a multiple of 1 GiB is mapped with 2 MiB pages.
    let short = MockHost::new(HostConfig { guest_ram_pages: 0x4_0200, ..HostConfig::default() });
    assert_eq!(short.host_level(Pfn(GUEST_RAM_BASE_PFN + 0x4_0001)), Some(Level::L2));
    assert_eq!(short.host_level(Pfn(GUEST_RAM_BASE_PFN + 0x4_0200)), None);
}

#[test]
fn i3_flushes_reach_every_live_tlb_unless_dropped() {
    let host = small();
    let (a, b) = (Arc::new(Tlb::new()), Arc::new(Tlb::new()));
    host.register_tlb(Arc::clone(&a));
    host.register_tlb(Arc::clone(&b));
    let fill = |t: &Tlb| {
        t.insert(Pfn(1), Gfn(0x10), Level::L1, Pfn(0x50), Access::READ);
        t.insert(Pfn(1), Gfn(0x200), Level::L2, Pfn(0x400), Access::READ);
    };
    fill(&a);
    fill(&b);
    host.flush_range(AsId(0), Gfn(0x3ff), 1);
    assert_eq!((a.len(), b.len()), (1, 1), "the 2 MiB entry overlaps the range");
    host.set_drop_flushes(true);
    host.flush_all();
    assert_eq!((a.len(), b.len()), (1, 1), "dropped");
    host.set_drop_flushes(false);
    drop(b);
    host.flush_all();
    assert!(a.is_empty());
    assert_eq!(host.tlbs().len(), 1, "a dropped TLB is forgotten");
    assert_eq!((host.flush_stats().all, host.flush_stats().range), (2, 1));
}

#[test]
fn yield_hint_and_guest_data() {
    let host = MockHost::new(HostConfig { yield_every: Some(3), table_capacity: 1, ..HostConfig::default() });
    let answers: Vec<bool> = (0..6).map(|_| host.should_yield()).collect();
    assert_eq!(answers, [false, false, true, false, false, true]);
    host.yield_now();
    assert_eq!(host.yields(), 1);
    let frame = Pfn(GUEST_RAM_BASE_PFN + 9);
    assert_eq!(host.read_u64(frame, 0x10), 0);
    host.write_u64(frame, 0x10, u64::MAX - 1);
    assert_eq!(host.read_u64(frame, 0x10), u64::MAX - 1);
    assert!(
        panic_message(|| {
            let _ = host.read_u64(frame, 0xff9);
        })
        .contains("no room")
    );
}

/// The examples in `tdp-core`'s docs that run on the mock (`iter`, `mmu::cache`), kept here too.
#[test]
fn core_doc_examples_run_on_the_mock() {
    let host = MockHost::new(HostConfig::default());
    let fmt = SpteFormat::EPT_AD;
    let root = host.alloc_table(fmt.nonpresent()).expect("a page");
    let mut it = TdpIter::new(&host, &fmt, root, Level::L4, Level::L1, Gfn(0), Gfn(0x80000));
    let mut visited = 0;
    while it.valid() {
        visited += 1;
        it.next();
    }
    assert_eq!(visited, 1);
    drop(it);
    host.free_table_now(root);
    let mut cache = PageCache::new();
    cache.topup(&host, fmt.nonpresent(), 4).expect("pages");
    assert!(cache.len() >= 4);
    cache.release(&host);
    assert_eq!(host.alloc_stats().live, 0);
}
