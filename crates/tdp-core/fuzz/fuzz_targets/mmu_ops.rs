//! Fuzz target: MMU operation sequences on the mock machine, with every checker after every step.
//!
//! The input picks an MMU configuration (EPT with and without A/D bits, NPT, 5-level EPT) and a host
//! mapping level, then runs up to 64 operations in any order: guest accesses by two vCPUs (read, write,
//! fetch; inside memslots, outside them, beyond the tables' reach), range zaps, dirty-logging toggles,
//! re-protection of harvested pages, eager splits, root invalidation with the zap of invalid roots,
//! memslot inserts and deletes (valid or not), aging passes, host page migrations (an MMU-notifier
//! invalidation around each), write tracking and untracking, the NX huge-page switch and its recovery;
//! memslots may be private (mapped through the mirror root, with external tables that may answer busy).
//!
//! Defends I1-I3 under arbitrary sequences: after every operation `Machine::check_all` (tables, every
//! valid root's translations against the test's reference memslots and the host's current frames, every
//! TLB, no root letting a write reach a tracked gfn, the external tables equal to the mirror) must pass, no operation may panic, and an access must retire or be handed back for emulation.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tdp_core::addr::{AsId, Gfn, Gpa, Level, PAGE_SHIFT, Pfn, SlotId};
use tdp_core::fault::AccessKind;
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{MmuConfig, PageCache};
use tdp_core::spte::SpteFormat;
use tdp_mock::{HostConfig, Machine, Vcpu, VcpuError};

/// Guest frames the operations address: memslots live below it, accesses go a little beyond.
const SPACE: u64 = 0x1000;
/// At most this many operations per input.
const MAX_OPS: usize = 64;

#[derive(Arbitrary, Debug)]
struct Input {
    config: u8,
    host_level: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Access { vcpu: bool, gfn: u16, kind: u8 },
    Zap { start: u16, len: u16 },
    Logging { slot: u8, on: bool },
    Reprotect { slot: u8, base: u16, mask: u64 },
    Split { slot: u8 },
    InvalidateRoots,
    Insert { id: u8, base: u16, pages: u16, readonly: bool, private: bool },
    Delete { id: u8 },
    Age { start: u16, len: u16 },
    Migrate { gfn: u16 },
    Track { gfn: u16, untrack: bool },
    NxHugePages { on: bool },
    RecoverNx { ratio: u8 },
    ExternalBusy { every: u8 },
}

const CONFIGS: [MmuConfig; 4] = [
    MmuConfig::EPT,
    MmuConfig { format: SpteFormat::EPT_NO_AD, ..MmuConfig::EPT },
    MmuConfig::NPT,
    MmuConfig { root_level: Level::L5, ..MmuConfig::EPT },
];

fuzz_target!(|input: Input| {
    let config = CONFIGS[usize::from(input.config) % CONFIGS.len()];
    let host_level = [Level::L1, Level::L2, Level::L3][usize::from(input.host_level) % 3];
    let host =
        HostConfig { table_capacity: 512, guest_ram_pages: 1 << 16, host_level, ..HostConfig::default() };
    let m = Machine::new(config, host).expect("a valid configuration");
    m.host().enable_external_tables(config.root_level);
    // Spare frames for migrations, above every slot's frames.
    m.host().add_spare_frames(Pfn((m.host().guest_ram_base() >> PAGE_SHIFT) + (1 << 15)), 256);
    let mmu = std::sync::Arc::clone(m.mmu());
    let mut vcpus = [m.new_vcpu(AsId(0)), m.new_vcpu(AsId(0))];
    let mut slots: Vec<Memslot> = Vec::new();
    for op in input.ops.iter().take(MAX_OPS) {
        apply(&m, &mut vcpus, &mut slots, op);
        let refs: Vec<&Vcpu> = vcpus.iter().collect();
        if let Err(violations) = m.check_all(&refs, &slots) {
            panic!("after {op:?}: {violations:#?}");
        }
    }
    for vcpu in &mut vcpus {
        vcpu.release(&mmu);
    }
});

fn apply(m: &Machine, vcpus: &mut [Vcpu; 2], slots: &mut Vec<Memslot>, op: &Op) {
    let mmu = m.mmu();
    let host = m.host();
    let slot_of = |n: u8| slots.get(usize::from(n) % slots.len().max(1)).copied();
    match *op {
        Op::Access { vcpu, gfn, kind } => {
            let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Exec][usize::from(kind) % 3];
            let gfn = u64::from(gfn) % (SPACE + 0x100);
            match vcpus[usize::from(vcpu)].access(mmu, Gpa(gfn << PAGE_SHIFT), kind) {
                Ok(_) => {}
                Err(e @ (VcpuError::Livelock { .. } | VcpuError::FreedTable { .. })) => {
                    panic!("access {gfn:#x}: {e}")
                }
                // Host errors (no spare frame left for a swap-in) and emulation are clean outcomes.
                Err(_) => {}
            }
        }
        Op::Zap { start, len } => {
            let start = u64::from(start) % SPACE;
            let end = start + 1 + u64::from(len) % 0x400;
            mmu.write().zap_gfn_range(AsId(0), Gfn(start), Gfn(end)).run(host);
        }
        Op::Logging { slot, on } => {
            let Some(s) = slot_of(slot) else { return };
            let mut flags = s.flags;
            flags.set(SlotFlags::LOG_DIRTY, on);
            if let Ok(flush) = mmu.write().set_memslot_flags(AsId(0), s.id, flags) {
                flush.run(host);
                if let Some(r) = slots.iter_mut().find(|r| r.id == s.id) {
                    r.flags = flags;
                }
            }
        }
        Op::Reprotect { slot, base, mask } => {
            let Some(s) = slot_of(slot) else { return };
            mmu.write().reprotect_dirty(AsId(0), s.id, u64::from(base), mask).run(host);
        }
        Op::Split { slot } => {
            let Some(s) = slot_of(slot) else { return };
            let mut cache = PageCache::new();
            let _ = mmu.write().split_huge_pages(AsId(0), s.id, &mut cache);
            cache.release(host);
        }
        Op::InvalidateRoots => {
            mmu.write().invalidate_roots(None).run(host);
            mmu.read().zap_invalidated_roots();
        }
        Op::Insert { id, base, pages, readonly, private } => {
            let flags = match (private, readonly) {
                (true, _) => SlotFlags::PRIVATE,
                (false, true) => SlotFlags::READONLY,
                (false, false) => SlotFlags::empty(),
            };
            let slot = m.ram_slot(
                AsId(0),
                SlotId(u16::from(id % 8)),
                Gfn(u64::from(base) % SPACE),
                u64::from(pages) % 0x400,
                flags,
            );
            if mmu.write().insert_memslot(slot).is_ok() {
                slots.push(slot);
            }
        }
        Op::Delete { id } => {
            if let Ok(flush) = mmu.write().delete_memslot(AsId(0), SlotId(u16::from(id % 8))) {
                flush.run(host);
                slots.retain(|s| s.id != SlotId(u16::from(id % 8)));
            }
        }
        Op::Age { start, len } => {
            let start = u64::from(start) % SPACE;
            mmu.age_gfn_range(AsId(0), Gfn(start), Gfn(start + 1 + u64::from(len) % 0x400));
        }
        Op::Migrate { gfn } => {
            let gfn = Gfn(u64::from(gfn) % SPACE);
            if let Some(s) = slots.iter().find(|s| s.contains(gfn)) {
                // Swapped pages and an empty spare pool refuse cleanly.
                let _ = host.migrate_page(s.host_addr(gfn));
            }
        }
        Op::Track { gfn, untrack } => {
            // Outside every slot, untracking what is not tracked and counts past 65535 refuse cleanly.
            let gfn = Gfn(u64::from(gfn) % SPACE);
            if untrack {
                let _ = mmu.write().untrack_write(AsId(0), gfn);
            } else if let Ok(flush) = mmu.write().track_write(AsId(0), gfn) {
                flush.run(host);
            }
        }
        Op::NxHugePages { on } => {
            mmu.write().set_nx_huge_pages(on).run(host);
            mmu.read().zap_invalidated_roots();
        }
        Op::RecoverNx { ratio } => {
            mmu.read().recover_nx_huge_pages(u32::from(ratio));
        }
        // Never every call: a fault that links tables needs some to go through.
        Op::ExternalBusy { every } => host.set_external_busy_every(match every % 8 {
            1 => 2,
            n => u64::from(n),
        }),
    }
}
