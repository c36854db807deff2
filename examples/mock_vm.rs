//! A mock VM end to end: three memslots laid out so that the fault handler picks 1 GiB, 2 MiB and 4 KiB
//! pages, two vCPUs (on two threads) touching every page of about 3.3 GiB, an MMIO access, a read-only
//! slot, a range zap, a refault, and a full teardown, with the invariant checkers run at each stage.
//!
//! Run: `cargo run --release --example mock_vm`.

use std::sync::Arc;
use std::time::Instant;

use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, Mmu, MmuConfig};
use tdp_mock::{
    AccessResult, HostConfig, Machine, MockHost, Vcpu, check_tables, check_tlbs, check_translations,
};

const GIB: u64 = 1 << 18; // in 4 KiB pages
const MIB2: u64 = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host_config =
        HostConfig { table_capacity: 16 * 1024, host_level: Level::L3, ..HostConfig::default() };
    let machine = Machine::new(MmuConfig::EPT, host_config)?;
    let ram = machine.host().guest_ram_base();
    let slots = [
        // 1 GiB + 2 MiB + 12 pages at gfn 0: one 1 GiB leaf, one 2 MiB leaf, twelve 4 KiB leaves.
        Memslot::new(AsId(0), SlotId(0), Gfn(0), GIB + MIB2 + 12, ram, SlotFlags::empty()),
        // 2 GiB at 4 GiB whose host address is one page off the gfn's alignment: only 4 KiB leaves fit.
        Memslot::new(
            AsId(0),
            SlotId(1),
            Gfn(4 * GIB),
            2 * GIB,
            ram + (2 * GIB + 1) * 4096,
            SlotFlags::empty(),
        ),
        // 64 MiB read-only at 8 GiB: 2 MiB leaves that never become writable.
        Memslot::new(AsId(0), SlotId(2), Gfn(8 * GIB), 32 * MIB2, ram + 5 * GIB * 4096, SlotFlags::READONLY),
    ];
    for slot in slots {
        machine.mmu().write().insert_memslot(slot)?;
    }
    println!("memslots:");
    for s in &slots {
        println!(
            "  slot {:>2}: gfn {:#9x}..{:#9x} ({:>5} MiB){}",
            s.id.0,
            s.base_gfn.0,
            s.end_gfn().0,
            s.pages / 256,
            if s.is_writable() { "" } else { " read-only" }
        );
    }

    // Two vCPUs split every slot between them and touch each page once: writes where allowed, else reads.
    let started = Instant::now();
    let mut vcpus = [machine.new_vcpu(AsId(0)), machine.new_vcpu(AsId(0))];
    let touched = std::thread::scope(|scope| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, vcpu)| {
                let mmu = Arc::clone(machine.mmu());
                scope.spawn(move || touch_half(&mmu, vcpu, &slots, i))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("vCPU thread")).sum::<Result<u64, String>>()
    })?;
    let elapsed = started.elapsed();
    let fixed: u64 = vcpus.iter().map(|v| v.mmu_state().counters.fixed).sum();
    let spurious: u64 = vcpus.iter().map(|v| v.mmu_state().counters.spurious).sum();
    let retried: u64 = vcpus.iter().map(|v| v.mmu_state().counters.retried).sum();
    println!(
        "\nfaulted in {} pages ({:.2} GiB) on 2 vCPUs in {elapsed:.2?}",
        touched,
        touched as f64 / GIB as f64
    );
    report(machine.mmu());
    println!(
        "  faults: {} fixed, {} spurious, {} retried; {:.0} ns per touched page",
        fixed,
        spurious,
        retried,
        elapsed.as_nanos() as f64 / touched as f64
    );
    check_all(&machine, &vcpus, &slots)?;

    // An access with no memslot is MMIO: the first installs an MMIO SPTE, the second hits it.
    let mmio = Gpa(16 * GIB * 4096);
    for round in ["first", "second"] {
        let result = vcpus[0].access(machine.mmu(), mmio, AccessKind::Read)?;
        println!("{round} MMIO read at {mmio:?}: {result:?}");
    }
    let ro = vcpus[1].access(machine.mmu(), Gfn(8 * GIB).gpa(), AccessKind::Write)?;
    println!("write to the read-only slot: {ro:?}");
    assert_eq!(ro, AccessResult::Emulated(EmulateReason::ReadOnlySlot));

    // Zap the middle GiB of slot 1 (its 4 KiB leaves) and fault one page back in.
    let (start, end) = (Gfn(4 * GIB + GIB / 2), Gfn(4 * GIB + GIB / 2 + GIB));
    let started = Instant::now();
    machine.mmu().write().zap_gfn_range(AsId(0), start, end).run(machine.mmu().host());
    println!("\nzapped gfns {start:?}..{end:?} in {:.2?}", started.elapsed());
    report(machine.mmu());
    let back = vcpus[0].access(machine.mmu(), start.gpa(), AccessKind::Write)?;
    println!("refault at {start:?}: {back:?}");
    check_all(&machine, &vcpus, &slots)?;

    // Tear everything down: vCPUs drop their roots, the roots are invalidated and zapped.
    for vcpu in &mut vcpus {
        vcpu.release(machine.mmu());
    }
    let started = Instant::now();
    machine.mmu().write().invalidate_roots(None).run(machine.mmu().host());
    machine.mmu().read().zap_invalidated_roots();
    machine.host().reclaim();
    println!("\ntore down every root in {:.2?}", started.elapsed());
    report(machine.mmu());
    check_tables(machine.mmu(), &[]).map_err(|v| format!("I2 after teardown: {v:?}"))?;
    println!("  table pages still allocated: {}", machine.host().alloc_stats().live);
    println!("\nall invariant checks passed");
    Ok(())
}

/// Touches every other chunk of each slot (vCPU `half` takes chunks of its parity). Returns pages touched.
fn touch_half(mmu: &Mmu<MockHost>, vcpu: &mut Vcpu, slots: &[Memslot], half: usize) -> Result<u64, String> {
    let mut touched = 0;
    for slot in slots {
        let kind = if slot.is_writable() { AccessKind::Write } else { AccessKind::Read };
        for gfn in (slot.base_gfn.0..slot.end_gfn().0).filter(|g| (g / 4096) as usize % 2 == half) {
            match vcpu.access(mmu, Gfn(gfn).gpa(), kind) {
                Ok(AccessResult::Done { pfn, .. }) if pfn.0 == slot.host_addr(Gfn(gfn)) >> 12 => touched += 1,
                other => return Err(format!("gfn {gfn:#x}: unexpected {other:?}")),
            }
        }
    }
    Ok(touched)
}

fn report(mmu: &Mmu<MockHost>) {
    let s = mmu.stats();
    println!(
        "  leaves: {} x 4 KiB, {} x 2 MiB, {} x 1 GiB; {} table pages below {} root(s)",
        s.leaves[0],
        s.leaves[1],
        s.leaves[2],
        s.tables,
        mmu.roots().len()
    );
}

fn check_all(machine: &Machine, vcpus: &[Vcpu], slots: &[Memslot]) -> Result<(), String> {
    let mmu = machine.mmu();
    let cache: Vec<_> = vcpus.iter().flat_map(|v| v.cache().pages().to_vec()).collect();
    let tables = check_tables(mmu, &cache).map_err(|v| format!("I2: {v:?}"))?;
    let root = vcpus[0].root().ok_or("vCPU 0 has no root")?;
    let leaves = check_translations(mmu, root, slots).map_err(|v| format!("I1: {v:?}"))?;
    let tlbs: Vec<_> = vcpus.iter().map(|v| v.tlb()).collect();
    let cached = check_tlbs(mmu, &tlbs).map_err(|v| format!("I3: {v:?}"))?;
    println!(
        "  checks: I1 ({leaves} leaves match the slots), I2 ({tables:?}), I3 ({cached} TLB entries current)"
    );
    Ok(())
}
