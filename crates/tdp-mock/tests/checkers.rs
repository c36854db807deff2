//! Every checker catches a deliberately broken state: entries corrupted through the arena, flushes
//! dropped by the host, page caches leaked. Each test breaks one thing, asserts the checker names the
//! right invariant with the right values, repairs it, and asserts the checker is satisfied again.
//!
//! Checks: that the I1, I2 and I3 checkers are not vacuous.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{CONFIGS, Vm};
use tdp_core::addr::{AsId, Gfn, Level, Pfn};
use tdp_core::fault::AccessKind::{Read, Write};
use tdp_core::host::TableMemory;
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::PageCache;
use tdp_core::spte::Spte;
use tdp_mock::checker::Invariant;
use tdp_mock::{HostConfig, MockHost, VcpuError, Violation, check_tables, check_tlbs, check_translations};

/// The entry at `level` on the path to `gfn` below `root`.
fn entry_at(host: &MockHost, root: Pfn, root_level: Level, gfn: Gfn, level: Level) -> &AtomicU64 {
    let mut table = root;
    let mut at = root_level;
    loop {
        let entry = &host.arena_table(table).expect("an arena page")[gfn.index_at(at).get()];
        if at == level {
            return entry;
        }
        let spte = Spte(entry.load(Ordering::SeqCst));
        assert!(spte.is_table(at), "no table at {at:?} on the way to {gfn:?}: {spte:?}");
        table = spte.pfn();
        at = at.lower().expect("above level 1");
    }
}

fn root_of(vm: &Vm) -> (Pfn, Level) {
    (vm.vcpus[0].root().expect("a loaded root").pfn(), vm.mmu().config().root_level)
}

fn invariants(v: &[Violation]) -> Vec<Invariant> {
    v.iter().map(Violation::invariant).collect()
}

#[test]
fn i1_checker_catches_a_writable_leaf_in_a_read_only_slot() {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 1);
        let slot = vm.add_slot(0, 0x200, 0x200, SlotFlags::READONLY);
        vm.must_map(0, 0x250, Read);
        let (root, root_level) = root_of(&vm);
        let host = vm.host().clone();
        let leaf = entry_at(&host, root, root_level, Gfn(0x250), Level::L2);
        leaf.fetch_or(1 << 1, Ordering::SeqCst); // W in both formats
        let root_ref = vm.vcpus[0].root().expect("loaded");
        let errors = check_translations(vm.mmu(), root_ref, &[slot]).expect_err("a writable leaf");
        assert!(
            errors.iter().any(|v| matches!(
                v,
                Violation::WritableBeyondSlot { gfn: Gfn(0x200), level: Level::L2, .. }
            )),
            "{name}: {errors:?}"
        );
        assert!(invariants(&errors).iter().all(|i| *i == Invariant::I1), "{name}: {errors:?}");
        assert!(
            check_tables(vm.mmu(), &[]).is_err(),
            "{name}: W without MMU-writable fails the format check"
        );
        leaf.fetch_and(!(1 << 1), Ordering::SeqCst);
        assert_eq!(check_translations(vm.mmu(), root_ref, &[slot]), Ok(1), "{name}");
        vm.check("repair");
        vm.teardown();
    }
}

#[test]
fn i1_checker_catches_a_wrong_frame_and_a_shadowing_mmio_spte() {
    for (name, cfg) in CONFIGS {
        let host = HostConfig { host_level: Level::L1, ..HostConfig::default() };
        let mut vm = Vm::new(name, cfg, host, 1);
        let slot = vm.add_slot(0, 0, 0x10, SlotFlags::empty());
        vm.must_map(0, 0x3, Write);
        vm.must_map(0, 0x4, Write);
        let (root, root_level) = root_of(&vm);
        let host = vm.host().clone();
        let leaf = entry_at(&host, root, root_level, Gfn(0x3), Level::L1);
        let good = leaf.load(Ordering::SeqCst);
        leaf.store(good + 0x1000, Ordering::SeqCst); // the next frame
        let root_ref = vm.vcpus[0].root().expect("loaded");
        let errors = check_translations(vm.mmu(), root_ref, &[slot]).expect_err("a wrong frame");
        let expected = Pfn((slot.host_base >> 12) + 3);
        let wrong = Violation::WrongFrame { gfn: Gfn(3), level: Level::L1, expected, found: expected.add(1) };
        assert!(errors.contains(&wrong), "{name}: {errors:?}");
        leaf.store(good, Ordering::SeqCst);
        // An MMIO SPTE of the current generation over slot memory.
        let generation = vm.mmu().read().memslots().generation();
        let mmio = vm.mmu().format().mmio(Gfn(0x4), generation).expect("MMIO caching is on");
        let other = entry_at(&host, root, root_level, Gfn(0x4), Level::L1);
        let good = other.swap(mmio.0, Ordering::SeqCst);
        let errors = check_translations(vm.mmu(), root_ref, &[slot]).expect_err("MMIO over a slot");
        assert!(
            errors.contains(&Violation::MmioShadowsSlot { gfn: Gfn(4), spte: mmio }),
            "{name}: {errors:?}"
        );
        other.store(good, Ordering::SeqCst);
        vm.check("repair");
        vm.teardown();
    }
}

#[test]
fn i3_checker_catches_a_dropped_flush() {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 2);
        vm.add_slot(0, 0, 0x400, SlotFlags::empty());
        vm.must_map(0, 0x20, Write); // vCPU A caches the 2 MiB translation
        vm.host().set_drop_flushes(true);
        let before = vm.host().flush_stats();
        let flush = vm.mmu().write().zap_gfn_range(AsId(0), Gfn(0x20), Gfn(0x21));
        flush.run(vm.host());
        assert_eq!(vm.host().flush_stats().range, before.range + 1, "{name}: the flush was asked for");
        let tlbs = [vm.vcpus[0].tlb(), vm.vcpus[1].tlb()];
        let errors = check_tlbs(vm.mmu(), &tlbs).expect_err("a stale TLB entry");
        assert!(
            matches!(errors.as_slice(), [Violation::StaleTlb { gfn: Gfn(0), at: Gfn(0), .. }]),
            "{name}: {errors:?}"
        );
        assert_eq!(invariants(&errors), [Invariant::I3]);
        vm.host().set_drop_flushes(false);
        tdp_core::host::TlbFlush::flush_all(vm.host());
        assert_eq!(check_tlbs(vm.mmu(), &tlbs), Ok(0), "{name}");
        vm.check("repair");
        vm.teardown();
    }
}

#[test]
fn i2_checker_catches_a_leaked_page_cache() {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 1);
        vm.add_slot(0, 0, 0x10, SlotFlags::empty());
        vm.must_map(0, 0x1, Read);
        let leaked: Vec<Pfn> = {
            let mut cache = PageCache::new();
            vm.mmu().topup(&mut cache).expect("pages available");
            cache.pages().to_vec()
            // The cache goes out of scope here without `release`: deliberately broken.
        };
        let errors = check_tables(vm.mmu(), vm.vcpus[0].cache().pages()).expect_err("a leak");
        assert!(matches!(errors.as_slice(), [Violation::Leak { .. }]), "{name}: {errors:?}");
        assert_eq!(invariants(&errors), [Invariant::I2]);
        // Naming the leaked pages as cache pages accounts for them.
        let all: Vec<Pfn> = vm.vcpus[0].cache().pages().iter().chain(&leaked).copied().collect();
        assert!(check_tables(vm.mmu(), &all).is_ok(), "{name}");
        leaked.iter().for_each(|&pfn| vm.host().free_table_now(pfn));
        vm.check("repair");
        vm.teardown();
    }
}

#[test]
fn i2_checker_catches_double_links_frozen_entries_and_freed_tables() {
    for (name, cfg) in CONFIGS {
        let host = HostConfig { host_level: Level::L1, ..HostConfig::default() };
        let mut vm = Vm::new(name, cfg, host, 1);
        vm.add_slot(0, 0, 0x400, SlotFlags::empty());
        vm.must_map(0, 0x0, Write);
        vm.must_map(0, 0x200, Write);
        let (root, root_level) = root_of(&vm);
        let host = vm.host().clone();
        let fmt = *vm.mmu().format();
        let cache = vm.vcpus[0].cache().pages().to_vec();
        // One L1 table linked from two L2 entries.
        let first = entry_at(&host, root, root_level, Gfn(0), Level::L2).load(Ordering::SeqCst);
        let second = entry_at(&host, root, root_level, Gfn(0x200), Level::L2);
        let good = second.swap(first, Ordering::SeqCst);
        let errors = check_tables(vm.mmu(), &cache).expect_err("a double link");
        assert!(errors.contains(&Violation::LinkedTwice { pfn: Spte(first).pfn() }), "{name}: {errors:?}");
        second.store(good, Ordering::SeqCst);
        // A frozen entry at rest.
        let spare = entry_at(&host, root, root_level, Gfn(0x5), Level::L1);
        spare.store(fmt.frozen().0, Ordering::SeqCst);
        let errors = check_tables(vm.mmu(), &cache).expect_err("a frozen entry");
        assert!(matches!(errors.as_slice(), [Violation::FrozenAtRest { index: 5, level: Level::L1, .. }]));
        spare.store(fmt.nonpresent().0, Ordering::SeqCst);
        // An entry pointing to a freed table: the checker and the hardware walker both refuse it.
        let freed = vm.host().alloc_table(fmt.nonpresent()).expect("a page");
        vm.host().free_table_now(freed);
        let hole = entry_at(&host, root, root_level, Gfn(0x3_0000), Level::L2);
        let good = hole.swap(fmt.nonleaf(freed).0, Ordering::SeqCst);
        let errors = check_tables(vm.mmu(), &cache).expect_err("a freed table");
        let not_live = Violation::NotLive { pfn: freed, state: Some(tdp_mock::PageState::Free) };
        assert!(errors.contains(&not_live), "{name}: {errors:?}");
        assert_eq!(vm.access(0, 0x3_0000, Read), Err(VcpuError::FreedTable { pfn: freed }), "{name}");
        hole.store(good, Ordering::SeqCst);
        vm.check("repair");
        vm.teardown();
    }
}

#[test]
fn i2_checker_catches_a_vcpu_dropped_without_release() {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 2);
        vm.add_slot(0, 0, 0x10, SlotFlags::empty());
        vm.must_map(1, 0x1, Read);
        let dropped = vm.vcpus.pop().expect("two vCPUs");
        let pages = dropped.cache().pages().to_vec();
        drop(dropped);
        let errors = check_tables(vm.mmu(), &[]).expect_err("a leak");
        let Violation::Leak { live, tables, roots, cache_pages } = errors[0] else {
            panic!("{name}: {errors:?}")
        };
        let below_root = u64::from(vm.mmu().config().root_level.number()) - 1;
        assert_eq!(
            (live, tables, roots, cache_pages),
            (tables + roots + pages.len() as u64, below_root, 1, 0)
        );
        // The leaked root reference keeps the root alive: teardown still frees it, the cache pages we do.
        pages.iter().for_each(|&pfn| vm.host().free_table_now(pfn));
        vm.teardown();
    }
}

#[test]
fn i2_checker_catches_a_table_reusable_before_its_flush() {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 1);
        vm.add_slot(0, 0, 0x400, SlotFlags::empty());
        vm.must_map(0, 0x20, Write);
        // A host whose flushes never reach the TLBs: the tables zap_all frees become reusable while
        // hardware could still hold paging-structure entries pointing into them.
        vm.host().set_drop_flushes(true);
        vm.mmu().write().zap_all();
        vm.host().reclaim();
        let errors = check_tables(vm.mmu(), &[]).expect_err("tables freed with no flush after their unlink");
        assert!(
            errors.iter().any(|v| matches!(v, Violation::FreedBeforeFlush { pages } if *pages > 0)),
            "{name}: {errors:?}"
        );
        assert!(invariants(&errors).iter().all(|i| *i == Invariant::I2), "{name}: {errors:?}");
        vm.host().set_drop_flushes(false);
    }
    // With working flushes the same zap frees its tables only after the flush it runs itself.
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 1);
        vm.add_slot(0, 0, 0x400, SlotFlags::empty());
        vm.must_map(0, 0x20, Write);
        let unlinked_before = vm.host().tables_unlinked();
        vm.mmu().write().zap_all(); // it flushes itself
        vm.host().reclaim();
        assert!(vm.host().tables_unlinked() > unlinked_before, "{name}: zap_all unlinked tables");
        assert_eq!(vm.host().tables_freed_before_flush(), 0, "{name}");
        vm.check("after zap_all");
        vm.teardown();
    }
}
