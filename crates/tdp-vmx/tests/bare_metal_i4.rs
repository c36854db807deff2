//! I4 end to end on the bare-metal backend: a software CPU (an EPT walker with A/D flags and PML, as
//! the SDM and recipes/bochs-vmx.md describe them) writes guest pages through tables that `tdp-core`'s
//! MMU builds in a `TableFrames` region; every exit goes through `tdp_vmx::vcpu::handle_exit` (PML drain
//! into the vCPU's `RingSink`, fault into the MMU), and a VMM harvests the ring (after an on-demand
//! drain) and resets it through the MMU. Every page written since the previous harvest must be in the
//! next one: across logging start (huge pages split), PML-full exits and soft-full exits.
//!
//! Only public items are used. The software CPU has no TLB, so this checks I4, not I3 (INVEPT is
//! counted, and checked to be single-context for the loaded EPTP).

use std::collections::BTreeSet;

use tdp_core::addr::{AsId, Gfn, Pfn, SlotId};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig};
use tdp_core::host::TableMemory;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, VcpuMmu};
use tdp_vmx::caps::VmxCapabilities;
use tdp_vmx::fake::{FakeVmx, Op, bochs};
use tdp_vmx::host::{BareMetalHost, IdentityTranslate, InveptFlush, PhysRange, TableFrames};
use tdp_vmx::instr::VmxInstructions;
use tdp_vmx::inv::InveptKind;
use tdp_vmx::pml::{PML_ENTRIES, Pml, PmlPage};
use tdp_vmx::raw::{IdentityRegion, TablePage};
use tdp_vmx::ring_sink::RingSink;
use tdp_vmx::vcpu::{ExitAction, handle_exit, install_root};
use tdp_vmx::vmcs::VmcsField;

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const ACCESSED: u64 = 1 << 8;
const DIRTY: u64 = 1 << 9;
const ADDR: u64 = ((1 << 52) - 1) & !0xfff;

/// What the software CPU's write did.
enum Cpu {
    /// The write retired.
    Done,
    /// The write caused this exit (fields already in the VMCS).
    Exit,
}

/// One guest write to `gfn`, as the CPU does it under EPT with A/D flags and PML.
fn cpu_write(vmx: &FakeVmx, tables: &impl TableMemory, root: Pfn, log: &PmlPage, gfn: u64) -> Cpu {
    let gpa = gfn << 12;
    let mut table = root;
    for level in (1..=4u32).rev() {
        let index = ((gfn >> ((level - 1) * 9)) & 0x1ff) as usize;
        let entry = &tables.table(table)[index];
        let spte = entry.load(std::sync::atomic::Ordering::Acquire);
        let rwx = spte & (READ | WRITE | EXEC);
        if rwx == 0 {
            // Not present: qualification 0x182 (write, linear valid, translated), as Bochs reports.
            vmx.set_exit_ept_violation(0x182, gpa, gpa);
            return Cpu::Exit;
        }
        let leaf = level == 1 || spte & LARGE != 0;
        if !leaf {
            entry.fetch_or(ACCESSED, std::sync::atomic::Ordering::AcqRel);
            table = Pfn((spte & ADDR) >> 12);
            continue;
        }
        if spte & WRITE == 0 {
            vmx.set_exit_ept_violation(0x182 | (rwx << 3), gpa, gpa);
            return Cpu::Exit;
        }
        if spte & DIRTY == 0 {
            // Before setting D the CPU needs room in the log, or it exits with the flag unset.
            let index = vmx.vmread(VmcsField::GUEST_PML_INDEX).unwrap() as u16;
            if usize::from(index) >= PML_ENTRIES {
                vmx.set_field(VmcsField::EXIT_REASON, 62);
                return Cpu::Exit;
            }
            let old = entry.fetch_or(ACCESSED | DIRTY, std::sync::atomic::Ordering::AcqRel);
            if old & DIRTY == 0 {
                log.set_entry(usize::from(index), gpa);
                vmx.set_field(VmcsField::GUEST_PML_INDEX, u64::from(index.wrapping_sub(1)));
            }
        }
        return Cpu::Done;
    }
    unreachable!("a 4-level walk ends at level 1")
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn i4_every_write_after_logging_starts_is_in_the_next_harvest() {
    let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
    let caps = VmxCapabilities::read(&vmx);
    let ept = caps.ept_features().unwrap();
    vmx.set_field(VmcsField::CPU_BASED_VM_EXEC_CONTROL, u64::from(caps.primary.adjust(0x8000_0080).unwrap()));
    vmx.set_field(VmcsField::SECONDARY_VM_EXEC_CONTROL, u64::from(caps.secondary.adjust(0x82).unwrap()));

    let mut pages: Vec<TablePage> = (0..256).map(|_| TablePage::new()).collect();
    let ram = [PhysRange { start: 0x100_0000, end: 0x180_0000 }];
    let host = BareMetalHost {
        frames: TableFrames::new(IdentityRegion::from_pages(&mut pages)).unwrap(),
        translate: IdentityTranslate::new(&ram, ept.max_leaf_level),
        tlb: InveptFlush::new(&vmx, ept.invept),
    };
    let config = ept.mmu_config(true).unwrap();
    let mmu: Mmu<_> = Mmu::new(host, config).unwrap();
    // 4 MiB of guest RAM in one slot, 2 MiB-aligned: faults map 2 MiB leaves until logging starts.
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 1024, 0x100_0000, SlotFlags::empty());
    mmu.write().insert_memslot(slot).unwrap();
    let mut vcpu = VcpuMmu::new();
    let root = mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    let eptp = install_root(&vmx, &mmu.host().tlb, &ept, &config, vcpu.root().unwrap()).unwrap();
    let log = PmlPage::new();
    let mut pml = Pml::enable(&vmx, &ept, eptp, &log).unwrap();
    let cfg = RingConfig::new(1024, PML_ENTRIES as u32).unwrap();
    let ring: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
    let mut sink = RingSink::new(DirtyRingProducer::new(&ring, cfg).unwrap()).unwrap();
    let mut consumer = DirtyRingConsumer::new(&ring, cfg).unwrap();

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut written: BTreeSet<u64> = BTreeSet::new();
    let mut logging = false;
    let (mut harvests, mut full_exits, mut soft_full_stops, mut faults) = (0, 0, 0, 0);
    let mut harvest = |pml: &mut Pml<'_>, sink: &mut RingSink<'_>, written: &mut BTreeSet<u64>| {
        // The VMM's kick: the vCPU drains its log, then the ring is harvested and reset.
        let slots = mmu.read().memslots().clone();
        pml.drain(&vmx, &slots, AsId(0), sink).unwrap();
        let mut got = BTreeSet::new();
        consumer.harvest(usize::MAX, |e| {
            got.insert(e.offset);
        });
        let (reset, flush) = sink.reset_by(|ring| mmu.write().reset_dirty_ring(ring));
        flush.run(mmu.host());
        assert_eq!(reset.invalid, 0);
        let missing: Vec<_> = written.difference(&got).collect();
        assert!(missing.is_empty(), "I4: written but not harvested: {missing:x?}");
        written.clear();
    };

    for step in 0..30_000u32 {
        if step == 2_000 {
            assert!(mmu.stats().leaves[1] > 0, "before logging, faults mapped 2 MiB leaves");
            // Dirty logging starts: huge leaves are write-protected, 4 KiB leaves cleaned.
            let flush = mmu.write().set_memslot_flags(AsId(0), SlotId(0), SlotFlags::LOG_DIRTY).unwrap();
            flush.run(mmu.host());
            logging = true;
            written.clear();
        }
        // Half the writes to a hot set of 64 pages, half anywhere in the slot: between harvests more pages
        // are dirtied than a PML log or the ring's soft limit holds.
        let r = next(&mut seed);
        let gfn = if r.is_multiple_of(2) { (r >> 8) % 1024 } else { 0x180 + (r >> 8) % 64 };
        let mut tries = 0;
        loop {
            match cpu_write(&vmx, mmu.host(), root, &log, gfn) {
                Cpu::Done => break,
                Cpu::Exit => {
                    tries += 1;
                    assert!(tries < 8, "write to gfn {gfn:#x} never retires");
                    let report = handle_exit(&vmx, &mmu, &mut vcpu, Some(&mut pml), &mut sink).unwrap();
                    assert_eq!(report.action, ExitAction::Resume);
                    match report.exit {
                        tdp_vmx::exit::VmExit::PmlFull => full_exits += 1,
                        _ => faults += 1,
                    }
                    if sink.must_exit() {
                        // KVM_EXIT_DIRTY_RING_FULL: the VMM harvests before the vCPU runs again.
                        soft_full_stops += 1;
                        harvest(&mut pml, &mut sink, &mut written);
                        harvests += 1;
                    }
                }
            }
        }
        if logging {
            written.insert(gfn);
        }
        if logging && (step + 1).is_multiple_of(5_000) {
            harvest(&mut pml, &mut sink, &mut written);
            harvests += 1;
        }
    }
    harvest(&mut pml, &mut sink, &mut written);
    harvests += 1;

    assert!(
        full_exits > 0 && soft_full_stops > 0 && harvests > 5,
        "{full_exits} {soft_full_stops} {harvests}"
    );
    assert!(faults > 0);
    assert_eq!(sink.stats().lost, 0);
    assert_eq!(sink.stats().overflowed, 0, "the PML reserve keeps the ring from filling");
    assert_eq!(mmu.stats().leaves[1], 0, "logging replaced every 2 MiB leaf by 4 KiB ones");
    let tlb = mmu.host().tlb.stats();
    assert_eq!((tlb.errors, tlb.uncovered, tlb.all_context), (0, 0, 0));
    assert!(tlb.single_context > 0);
    assert!(
        vmx.ops().iter().all(|op| *op == Op::Invept { kind: InveptKind::SingleContext, eptp: eptp.raw() })
    );
    let frames = mmu.host().frames.stats();
    assert_eq!(frames.alloc_failures, 0);
    eprintln!(
        "bare-metal I4: {harvests} harvests, {full_exits} PML-full exits, {soft_full_stops} soft-full stops, \
         {faults} EPT faults, {} INVEPTs, {} table pages at peak",
        tlb.single_context, frames.peak
    );
    mmu.release_vcpu(&mut vcpu);
}
