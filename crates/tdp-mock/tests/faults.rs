//! End-to-end fault scenarios on EPT (with and without A/D, 4- and 5-level) and NPT: huge-page choice,
//! slot edges, read-only slots and host pages, MMIO caching and its replacement, zaps, root
//! invalidation, allocation failure and teardown. Every checker runs after every step.
//!
//! Checks: I1 (frames and rights against the reference slots), I2 (tables, leaks, teardown), I3 (TLBs
//! after every flush).

mod common;

use common::{CONFIGS, Vm};
use tdp_core::addr::{AsId, Gfn, Level, Pfn};
use tdp_core::fault::AccessKind::{Exec, Read, Write};
use tdp_core::host::{AllocError, HostFaultError};
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::{EmulateReason, FaultError};
use tdp_core::spte::Access;
use tdp_mock::{AccessResult, HostConfig, VcpuError, WalkMode, WalkOutcome, walk};

fn each_config(host: HostConfig, vcpus: usize, f: impl Fn(&mut Vm)) {
    for (name, cfg) in CONFIGS {
        let mut vm = Vm::new(name, cfg, host, vcpus);
        f(&mut vm);
        vm.teardown();
    }
}

#[test]
fn i1_aligned_slot_maps_huge_pages() {
    each_config(HostConfig::default(), 1, |vm| {
        vm.add_slot(0, 0x200, 0x400, SlotFlags::empty());
        vm.add_slot(1, 0x40000, 0x40000, SlotFlags::empty());
        let pfn = vm.must_map(0, 0x300, Write);
        assert_eq!(Some(pfn), vm.expected_frame(0x300));
        assert_eq!(vm.leaf(0, 0x300).map(|(_, l)| l), Some(Level::L2), "{}", vm.name);
        // The rest of the 2 MiB page comes from the TLB.
        let again = vm.access(0, 0x3ff, Read).expect("mapped");
        assert!(matches!(again, AccessResult::Done { from_tlb: true, .. }), "{}: {again:?}", vm.name);
        vm.check("2 MiB fault");
        let pfn = vm.must_map(0, 0x5_1234, Exec);
        assert_eq!(Some(pfn), vm.expected_frame(0x5_1234));
        assert_eq!(vm.leaf(0, 0x5_1234).map(|(_, l)| l), Some(Level::L3), "{}", vm.name);
        vm.check("1 GiB fault");
        assert_eq!(vm.mmu().stats().leaves, [0, 1, 1]);
    });
}

#[test]
fn i1_odd_slot_maps_4k_at_the_edges() {
    each_config(HostConfig::default(), 1, |vm| {
        vm.add_slot(0, 0x1ff, 0x202, SlotFlags::empty());
        for (gfn, level) in [(0x1ff, Level::L1), (0x200, Level::L2), (0x3ff, Level::L2), (0x400, Level::L1)] {
            let pfn = vm.must_map(0, gfn, Write);
            assert_eq!(Some(pfn), vm.expected_frame(gfn), "{} gfn {gfn:#x}", vm.name);
            assert_eq!(vm.leaf(0, gfn).map(|(_, l)| l), Some(level), "{} gfn {gfn:#x}", vm.name);
        }
        let past = vm.access(0, 0x401, Read);
        assert_eq!(past, Ok(AccessResult::Emulated(EmulateReason::Mmio)), "{}", vm.name);
        vm.check("edge faults");
    });
}

#[test]
fn i1_read_only_slot_never_maps_writable() {
    each_config(HostConfig::default(), 1, |vm| {
        vm.add_slot(0, 0x1000, 0x200, SlotFlags::READONLY);
        let read = vm.access(0, 0x1010, Read).expect("a read of a read-only slot retires");
        let AccessResult::Done { pfn, rights, .. } = read else { panic!("{}: {read:?}", vm.name) };
        assert_eq!(Some(pfn), vm.expected_frame(0x1010));
        assert!(!rights.contains(Access::WRITE), "{}: {rights:?}", vm.name);
        vm.check("read fault");
        let write = vm.access(0, 0x1010, Write);
        assert_eq!(write, Ok(AccessResult::Emulated(EmulateReason::ReadOnlySlot)), "{}", vm.name);
        let (leaf, _) = vm.leaf(0, 0x1010).expect("the read mapped it");
        assert!(!leaf.is_writable(), "{}: {leaf:?}", vm.name);
        vm.check("write to a read-only slot");
    });
}

#[test]
fn i1_host_read_only_page_is_mapped_4k_and_read_only() {
    each_config(HostConfig::default(), 1, |vm| {
        let slot = vm.add_slot(0, 0x200, 0x200, SlotFlags::empty());
        let ro = Pfn((slot.host_base >> 12) + 0x10);
        vm.host().set_host_readonly(ro, true);
        vm.must_map(0, 0x210, Read);
        let (leaf, level) = vm.leaf(0, 0x210).expect("mapped");
        assert_eq!((level, leaf.is_writable()), (Level::L1, false), "{}", vm.name);
        let write = vm.access(0, 0x210, Write);
        let refused = Err(VcpuError::Fault(FaultError::Host(HostFaultError::ReadOnly { gfn: Gfn(0x210) })));
        assert_eq!(write, refused, "{}", vm.name);
        // A neighbour is writable, but cannot be mapped 2 MiB over the read-only page.
        vm.must_map(0, 0x211, Write);
        assert_eq!(vm.leaf(0, 0x211).map(|(_, l)| l), Some(Level::L1), "{}", vm.name);
        vm.check("host read-only page");
    });
}

#[test]
fn i1_mmio_is_cached_then_replaced_by_a_new_slot() {
    each_config(HostConfig::default(), 1, |vm| {
        vm.add_slot(0, 0, 0x10, SlotFlags::empty());
        vm.must_map(0, 0x1, Write);
        let mmio = Ok(AccessResult::Emulated(EmulateReason::Mmio));
        assert_eq!(vm.access(0, 0x80, Read), mmio, "{}", vm.name);
        assert_eq!(vm.mmu().stats().mmio_sptes_created, 1, "{}", vm.name);
        vm.check("first MMIO access");
        // Hardware now exits with a misconfiguration on the cached MMIO SPTE.
        let (host, hw) = (vm.host().clone(), vm.m.hardware());
        let root = vm.vcpus[0].root().expect("loaded").pfn();
        let level = vm.mmu().config().root_level;
        let seen = walk(&host, hw, root, level, Gfn(0x80).gpa(), Write, WalkMode::Peek);
        assert_eq!(seen, WalkOutcome::Misconfig, "{}", vm.name);
        assert_eq!(vm.access(0, 0x80, Write), mmio, "{}", vm.name);
        assert_eq!(vm.mmu().stats().mmio_sptes_created, 1, "{}: the SPTE was reused", vm.name);
        vm.check("second MMIO access");
        vm.add_slot(1, 0x80, 0x10, SlotFlags::empty());
        vm.check("slot inserted over a stale MMIO SPTE");
        let pfn = vm.must_map(0, 0x80, Write);
        assert_eq!(Some(pfn), vm.expected_frame(0x80), "{}", vm.name);
        vm.check("stale MMIO replaced");
    });
}

#[test]
fn i3_zap_range_then_access_refaults() {
    each_config(HostConfig::default(), 2, |vm| {
        vm.add_slot(0, 0, 0x1000, SlotFlags::empty());
        vm.add_slot(1, 0x1000, 0x7, SlotFlags::empty());
        for gfn in [0x10, 0x400, 0x1003] {
            vm.must_map(0, gfn, Write);
            vm.must_map(1, gfn, Read);
        }
        vm.check("faults");
        let flush = vm.mmu().write().zap_gfn_range(AsId(0), Gfn(0x3ff), Gfn(0x1004));
        flush.run(vm.host());
        vm.check("zap and flush");
        assert!(vm.leaf(0, 0x400).is_none() && vm.leaf(0, 0x1003).is_none(), "{}", vm.name);
        assert!(vm.leaf(0, 0x10).is_some(), "{}: outside the range", vm.name);
        let fixed = vm.vcpus[0].mmu_state().counters.fixed;
        let again = vm.access(0, 0x400, Read).expect("refault");
        assert!(matches!(again, AccessResult::Done { from_tlb: false, .. }), "{}: {again:?}", vm.name);
        assert_eq!(vm.vcpus[0].mmu_state().counters.fixed, fixed + 1, "{}", vm.name);
        vm.check("refault");
        vm.delete_slot(1);
        assert_eq!(vm.access(1, 0x1003, Read), Ok(AccessResult::Emulated(EmulateReason::Mmio)));
        vm.check("slot deleted");
    });
}

#[test]
fn i3_zap_yields_and_still_flushes_everything() {
    let host = HostConfig { host_level: Level::L1, yield_every: Some(3), ..HostConfig::default() };
    each_config(host, 1, |vm| {
        vm.add_slot(0, 0, 0x600, SlotFlags::empty());
        for gfn in (0..0x600).step_by(5) {
            vm.must_map(0, gfn, Write);
        }
        vm.check("faults");
        let flush = vm.mmu().write().zap_gfn_range(AsId(0), Gfn(0), Gfn(0x600));
        flush.run(vm.host());
        assert!(vm.host().yields() > 0, "{}", vm.name);
        assert!(vm.vcpus[0].tlb().is_empty(), "{}", vm.name);
        vm.check("yielding zap");
    });
}

#[test]
fn i3_invalidated_roots_are_reloaded_and_freed() {
    each_config(HostConfig::default(), 2, |vm| {
        vm.add_slot(0, 0, 0x800, SlotFlags::empty());
        vm.must_map(0, 0x10, Write);
        vm.must_map(1, 0x610, Write);
        let old = vm.vcpus[0].root().expect("loaded").pfn();
        vm.check("faults");
        let flush = vm.mmu().write().invalidate_roots(None);
        flush.run(vm.host());
        vm.check("invalidate and flush");
        vm.mmu().read().zap_invalidated_roots();
        vm.check("zap of the invalidated roots");
        let pfn = vm.must_map(0, 0x10, Read);
        assert_eq!(Some(pfn), vm.expected_frame(0x10));
        let new = vm.vcpus[0].root().expect("reloaded").pfn();
        assert_ne!(new, old, "{}: a fresh root", vm.name);
        vm.must_map(1, 0x611, Read);
        assert_eq!(vm.vcpus[1].root().map(|r| r.pfn()), Some(new), "{}: the root is shared", vm.name);
        let roots = vm.mmu().roots();
        assert_eq!(roots.len(), 1, "{}: the old root is gone: {roots:?}", vm.name);
        vm.check("reload");
    });
}

#[test]
fn i1_host_level_4k_forces_4k_leaves() {
    let host = HostConfig { host_level: Level::L1, ..HostConfig::default() };
    each_config(host, 1, |vm| {
        vm.add_slot(0, 0x40000, 0x40000, SlotFlags::empty());
        for gfn in [0x40000, 0x40200, 0x5ffff] {
            vm.must_map(0, gfn, Write);
            assert_eq!(vm.leaf(0, gfn).map(|(_, l)| l), Some(Level::L1), "{} gfn {gfn:#x}", vm.name);
        }
        vm.check("4K faults");
    });
}

#[test]
fn i2_allocation_failure_is_clean_and_recoverable() {
    each_config(HostConfig::default(), 1, |vm| {
        vm.add_slot(0, 0, 0x10, SlotFlags::empty());
        vm.host().set_alloc_budget(Some(0));
        assert_eq!(vm.access(0, 0x1, Read), Err(VcpuError::Root(AllocError)), "{}", vm.name);
        assert!(vm.host().alloc_stats().failed_allocs > 0);
        vm.check("failed root allocation");
        vm.host().set_alloc_budget(None);
        vm.must_map(0, 0x1, Read);
        vm.check("after recovery");
    });
}

#[test]
fn i1_data_written_through_one_vcpu_is_read_through_another() {
    each_config(HostConfig::default(), 2, |vm| {
        let slot = vm.add_slot(0, 0x200, 0x200, SlotFlags::empty());
        let mmu = std::sync::Arc::clone(vm.m.mmu());
        let gpa = Gfn(0x234).gpa();
        vm.vcpus[0].write_u64(&mmu, tdp_core::addr::Gpa(gpa.0 + 0x18), 0xfeed).expect("write");
        assert_eq!(vm.vcpus[1].read_u64(&mmu, tdp_core::addr::Gpa(gpa.0 + 0x18)), Ok(0xfeed));
        let frame = Pfn((slot.host_base >> 12) + 0x34);
        assert_eq!(vm.host().read_u64(frame, 0x18), 0xfeed, "{}", vm.name);
        let odd = vm.vcpus[1].read_u64(&mmu, tdp_core::addr::Gpa(gpa.0 + 3));
        assert_eq!(odd, Err(VcpuError::Unaligned { gpa: tdp_core::addr::Gpa(gpa.0 + 3) }));
        vm.check("data");
    });
}

#[test]
fn i3_a_huge_leaf_replacing_a_table_flushes_the_small_translations() {
    each_config(HostConfig::default(), 2, |vm| {
        let slot = vm.add_slot(0, 0x200, 0x200, SlotFlags::empty());
        let ro = Pfn((slot.host_base >> 12) + 0x10);
        // While one host page is read-only, the host maps the region with 4 KiB pages.
        vm.host().set_host_readonly(ro, true);
        vm.must_map(1, 0x211, Write);
        vm.must_map(1, 0x212, Read);
        assert_eq!(vm.vcpus[1].tlb().len(), 2);
        let tables = vm.mmu().stats().tables;
        vm.check("4K faults");
        // The host collapses the region into a huge page; the next fault maps it 2 MiB over the table.
        vm.host().set_host_readonly(ro, false);
        vm.must_map(0, 0x300, Write);
        assert_eq!(vm.leaf(0, 0x211).map(|(_, l)| l), Some(Level::L2), "{}", vm.name);
        assert_eq!(vm.mmu().stats().tables, tables - 1, "{}: the L1 table was removed", vm.name);
        assert!(vm.vcpus[1].tlb().is_empty(), "{}: the 4K translations were flushed", vm.name);
        vm.check("huge leaf over a table");
        let again = vm.access(1, 0x211, Read).expect("mapped");
        assert!(matches!(again, AccessResult::Done { from_tlb: false, .. }), "{}: {again:?}", vm.name);
        vm.check("access through the huge leaf");
    });
}

#[test]
fn i1_address_spaces_are_kept_apart() {
    for (name, cfg) in CONFIGS {
        let m = tdp_mock::Machine::new(cfg, HostConfig::default()).expect("a valid configuration");
        let normal = m.ram_slot(AsId(0), tdp_core::addr::SlotId(0), Gfn(0), 0x400, SlotFlags::empty());
        let smm = tdp_core::memslot::Memslot {
            as_id: AsId(1),
            host_base: normal.host_base + (0x400 << 12),
            ..normal
        };
        m.mmu().write().insert_memslot(normal).expect("valid");
        m.mmu().write().insert_memslot(smm).expect("valid");
        let (mut a, mut b) = (m.new_vcpu(AsId(0)), m.new_vcpu(AsId(1)));
        let gpa = Gfn(0x123).gpa();
        let fa = a.write_u64(m.mmu(), gpa, 1).expect("AS 0");
        let fb = b.write_u64(m.mmu(), gpa, 2).expect("AS 1");
        assert_eq!(fb.0 - fa.0, 0x400, "{name}: each address space has its own frames");
        assert_ne!(a.root().map(|r| r.pfn()), b.root().map(|r| r.pfn()), "{name}: and its own root");
        m.mmu().write().zap_gfn_range(AsId(0), Gfn(0), Gfn(0x400)).run(m.host());
        assert!(b.root().and_then(|r| m.mmu().lookup(r, Gfn(0x123))).is_some(), "{name}: AS 1 untouched");
        assert_eq!(a.read_u64(m.mmu(), gpa), Ok(1), "{name}");
        assert_eq!(b.read_u64(m.mmu(), gpa), Ok(2), "{name}");
        let check = m.check_all(&[&a, &b], &[normal, smm]);
        assert!(check.is_ok(), "{name}: {check:?}");
        a.release(m.mmu());
        b.release(m.mmu());
    }
}

#[test]
fn i1_five_level_tables_map_above_48_bits() {
    let (name, cfg) = CONFIGS[3];
    assert_eq!(cfg.root_level, Level::L5);
    let mut vm = Vm::new(name, cfg, HostConfig::default(), 1);
    let high = 1u64 << 37; // GPA 2^49: beyond a 4-level tree
    let slot = vm.m.ram_slot(AsId(0), tdp_core::addr::SlotId(0), Gfn(0), 0x200, SlotFlags::empty());
    let slot = tdp_core::memslot::Memslot { base_gfn: Gfn(high), ..slot };
    vm.mmu().write().insert_memslot(slot).expect("within 5-level reach");
    vm.slots.push(slot);
    let pfn = vm.must_map(0, high + 7, Write);
    assert_eq!(Some(pfn), vm.expected_frame(high + 7));
    assert_eq!(vm.leaf(0, high).map(|(_, l)| l), Some(Level::L2));
    vm.check("a fault above 48 bits");
    let four_level = Vm::new("ept", CONFIGS[0].1, HostConfig::default(), 0);
    let refused = four_level.mmu().write().insert_memslot(slot);
    assert!(matches!(refused, Err(tdp_core::memslot::SlotError::TooHigh { .. })), "{refused:?}");
    vm.teardown();
    four_level.teardown();
}

#[test]
fn i2_teardown_returns_every_page_even_with_invalid_roots_held() {
    each_config(HostConfig::default(), 2, |vm| {
        vm.add_slot(0, 0, 0x400, SlotFlags::empty());
        vm.add_slot(1, 0x40000, 0x40000, SlotFlags::empty());
        vm.must_map(0, 0x1, Write);
        vm.must_map(0, 0x40001, Write);
        assert_eq!(vm.access(1, 0x9999, Read), Ok(AccessResult::Emulated(EmulateReason::Mmio)));
        vm.mmu().write().invalidate_roots(None).run(vm.host());
        // vCPU 0 still holds the invalid, unzapped root when the VM goes away.
        vm.must_map(1, 0x2, Read);
        assert_eq!(vm.mmu().roots().len(), 2, "{}", vm.name);
        vm.check("an invalid root still held");
    });
}

#[test]
fn i1_a_stale_mmio_spte_never_matches_again_after_the_generation_wraps() {
    for (name, cfg) in [CONFIGS[0], CONFIGS[2]] {
        let mut vm = Vm::new(name, cfg, HostConfig::default(), 1);
        vm.add_slot(0, 0, 0x10, SlotFlags::empty());
        let mmio = Ok(AccessResult::Emulated(EmulateReason::Mmio));
        assert_eq!(vm.access(0, 0x80, Read), mmio, "{name}");
        let cached_at = vm.mmu().read().memslots().generation();
        vm.add_slot(1, 0x80, 0x10, SlotFlags::empty());
        // Bring the generation back to the MMIO SPTE's value modulo 2^19 without touching gfn 0x80.
        let wrap = 1u64 << tdp_core::spte::MMIO_GEN_BITS;
        let mut logging = false;
        while vm.mmu().read().memslots().generation() != cached_at + wrap {
            logging = !logging;
            let flags = if logging { SlotFlags::LOG_DIRTY } else { SlotFlags::empty() };
            let flush = vm.mmu().write().set_memslot_flags(AsId(0), tdp_core::addr::SlotId(0), flags);
            flush.expect("slot 0 exists").run(vm.host());
        }
        let pfn = vm.must_map(0, 0x80, Read);
        assert_eq!(Some(pfn), vm.expected_frame(0x80), "{name}");
        vm.mmu().read().zap_invalidated_roots();
        vm.check("generation wrap");
        vm.teardown();
    }
}
