//! I2 under allocation failure: a fault whose page-cache top-up fails at any allocation leaves the tables
//! exactly as they were (no half-linked table, no leak) and returns an error; and a fault called with a
//! cache too small to finish refuses before touching anything.

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::{AccessKind, Fault, FaultKind};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{FaultError, FaultOutcome, Mmu, MmuConfig, VcpuMmu};
use tdp_mock::{HostConfig, MockHost, check_tables};

fn write_fault(gfn: u64) -> Fault {
    Fault {
        as_id: AsId(0),
        gpa: Gpa(gfn << 12),
        access: AccessKind::Write,
        kind: FaultKind::Violation { present: false },
    }
}

/// Every entry of every table reachable from the roots, for before/after comparison.
fn snapshot(mmu: &Mmu<MockHost>) -> Vec<(u64, Vec<u64>)> {
    let mut out = Vec::new();
    let mut stack: Vec<(tdp_core::addr::Pfn, Level)> =
        mmu.roots().iter().map(|r| (r.pfn, mmu.config().root_level)).collect();
    while let Some((pfn, level)) = stack.pop() {
        let entries: Vec<u64> =
            mmu.host().table(pfn).iter().map(|e| e.load(std::sync::atomic::Ordering::Relaxed)).collect();
        for &e in &entries {
            let spte = tdp_core::spte::Spte(e);
            if let (Some(child), Some(lower)) = (mmu.format().child_table(spte, level), level.lower()) {
                stack.push((child, lower));
            }
        }
        out.push((pfn.0, entries));
    }
    out.sort();
    out
}

fn machine(host_level: Level) -> (Mmu<MockHost>, MockHost) {
    let host = MockHost::new(HostConfig { host_level, ..HostConfig::default() });
    let mmu = Mmu::new(host.clone(), MmuConfig::EPT).expect("valid config");
    let ram = host.guest_ram_base();
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 1 << 18, ram, SlotFlags::empty());
    mmu.write().insert_memslot(slot).expect("valid slot");
    (mmu, host)
}

use tdp_core::host::TableMemory;

#[test]
fn i2_a_failed_topup_at_every_allocation_point_changes_nothing() {
    for level in [Level::L1, Level::L2, Level::L3] {
        let (mmu, host) = machine(level);
        let mut vcpu = VcpuMmu::new();
        mmu.load_root(&mut vcpu, AsId(0)).expect("room for a root");
        vcpu.cache_mut().release(mmu.host());
        let mut succeeded_at = None;
        for budget in 0..16u64 {
            let before = snapshot(&mmu);
            let live_before = host.alloc_stats().live;
            host.set_alloc_budget(Some(budget));
            let result = mmu.handle_fault(&mut vcpu, write_fault(0x12345), &mut ());
            host.set_alloc_budget(None);
            match result {
                Err(FaultError::Alloc(_)) => {
                    assert_eq!(snapshot(&mmu), before, "budget {budget}: a failed fault changed the tables");
                    assert_eq!(host.alloc_stats().live, live_before + vcpu.cache().len() as u64);
                    check_tables(&mmu, vcpu.cache().pages()).expect("consistent after a failed top-up");
                }
                Ok(FaultOutcome::Fixed) => {
                    succeeded_at.get_or_insert(budget);
                    check_tables(&mmu, vcpu.cache().pages()).expect("consistent after the fault");
                    mmu.write().zap_all();
                    host.reclaim();
                }
                other => panic!("budget {budget}: unexpected {other:?}"),
            }
            vcpu.cache_mut().release(mmu.host());
        }
        // A 4-level tree needs at most three tables below the root, and the top-up asks for four pages.
        assert_eq!(succeeded_at, Some(4), "host level {level:?}");
        mmu.put_root(&mut vcpu);
    }
}

#[test]
fn i2_a_root_that_cannot_be_allocated_is_a_clean_error() {
    let (mmu, host) = machine(Level::L3);
    host.set_alloc_budget(Some(0));
    let mut vcpu = VcpuMmu::new();
    assert!(mmu.load_root(&mut vcpu, AsId(0)).is_err());
    assert!(mmu.roots().is_empty());
    assert_eq!(host.alloc_stats().live, 0);
}

#[test]
fn i2_splitting_a_huge_page_under_allocation_failure_keeps_the_huge_leaf() {
    let (mmu, host) = machine(Level::L3);
    let mut vcpu = VcpuMmu::new();
    mmu.load_root(&mut vcpu, AsId(0)).expect("room");
    assert_eq!(mmu.handle_fault(&mut vcpu, write_fault(5), &mut ()), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.stats().leaves, [0, 0, 1], "one 1 GiB leaf");
    vcpu.cache_mut().release(mmu.host());
    // Dirty logging forces 4K mappings: the next fault must split 1G -> 2M -> 4K (two tables).
    mmu.write()
        .set_memslot_flags(AsId(0), SlotId(0), SlotFlags::LOG_DIRTY)
        .expect("slot exists")
        .run(mmu.host());
    let before = snapshot(&mmu);
    host.set_alloc_budget(Some(2));
    assert!(matches!(mmu.handle_fault(&mut vcpu, write_fault(5), &mut ()), Err(FaultError::Alloc(_))));
    host.set_alloc_budget(None);
    assert_eq!(snapshot(&mmu), before);
    assert_eq!(mmu.stats().leaves, [0, 0, 1]);
    // Logging write-protected the huge leaf: the write splits it and makes its 4K page writable.
    assert_eq!(mmu.handle_fault(&mut vcpu, write_fault(5), &mut ()), Ok(FaultOutcome::Fixed));
    assert_eq!(mmu.stats().leaves, [512, 511, 0], "split into 511 2M leaves and 512 4K leaves");
    assert_eq!(mmu.stats().huge_splits, 2);
    check_tables(&mmu, vcpu.cache().pages()).expect("consistent after the split");
    vcpu.cache_mut().release(mmu.host());
    mmu.put_root(&mut vcpu);
}
