//! The per-vCPU fault counters and the host's trace events (`MmuEvents`) on the mock machine: a fault
//! that maps, one the fast path fixes, an MMIO access (an MMIO SPTE installed), a split; each event is
//! reported once, and the counters add up (`taken` is the sum of the outcomes; `fast` counts the fast
//! path's fixes among `fixed`).

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::{FaultCounters, MmuConfig};
use tdp_mock::{AccessResult, HostConfig, Machine, TraceCounts, Vcpu};

#[test]
fn every_fault_split_and_mmio_spte_is_reported_and_counted() {
    let m = Machine::new(MmuConfig::EPT, HostConfig { host_level: Level::L2, ..HostConfig::default() })
        .expect("valid config");
    let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 1024, SlotFlags::LOG_DIRTY);
    m.mmu().write().insert_memslot(slot).expect("valid slot");
    let mut vcpu = m.new_vcpu(AsId(0));
    let access =
        |vcpu: &mut Vcpu, gfn: u64, kind| vcpu.access(m.mmu(), Gpa(gfn << 12), kind).expect("completes");
    // A read in a logged slot: a write-protected 4 KiB leaf; the write then goes through the fast path.
    assert!(matches!(access(&mut vcpu, 5, AccessKind::Read), AccessResult::Done { .. }));
    assert!(matches!(access(&mut vcpu, 5, AccessKind::Write), AccessResult::Done { .. }));
    // No memslot at 0x2000: MMIO, with an MMIO SPTE cached the first time.
    assert!(matches!(access(&mut vcpu, 0x2000, AccessKind::Read), AccessResult::Emulated(_)));
    assert!(matches!(access(&mut vcpu, 0x2000, AccessKind::Read), AccessResult::Emulated(_)));
    let counters = vcpu.mmu_state().counters;
    assert_eq!(
        counters,
        FaultCounters { taken: 4, fixed: 2, fast: 1, spurious: 0, retried: 0, emulated: 2 },
        "the fast path fixed the write"
    );
    let trace = m.host().trace_counts();
    assert_eq!(trace, TraceCounts { faults: 4, mmio_sptes: 1, huge_splits: 0, nx_recovered: 0 });
    // Logging off, a huge leaf, logging on with an eager split: one split reported.
    m.mmu().write().set_memslot_flags(AsId(0), SlotId(0), SlotFlags::empty()).expect("slot").run(m.host());
    access(&mut vcpu, 600, AccessKind::Write);
    let mut cache = tdp_core::mmu::PageCache::new();
    m.mmu().write().split_huge_pages(AsId(0), SlotId(0), &mut cache).expect("pages for the split");
    cache.release(m.host());
    assert_eq!(m.host().trace_counts().huge_splits, 1);
    assert_eq!(m.mmu().stats().huge_splits, 1);
    vcpu.release(m.mmu());
}
