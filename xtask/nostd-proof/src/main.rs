//! The no_std proof: a `#![no_std]`, `#![no_main]` static binary that links `tdp-core`, runs a few of its
//! operations on inputs the optimiser cannot see, and exits 0 only if every answer is the expected one.
//!
//! Keeps the architecture invariant "`tdp-core` uses no std": there is no `std` and no libc in this
//! link, so a `std` dependency anywhere in `tdp-core` fails the build. The runtime it needs instead
//! (entry point, exit, panic handler, `mem*` functions, a heap) is in [`rt`].
//!
//! Exit codes: 0 every check passed; 1 a check failed (its name is written to stdout); 2 a panic.
//! Uses from `tdp-core`: `addr::{Gfn, Gpa, Pfn, Level, AsId, SlotId}`, `spte::{SpteFormat::{EPT_AD, NPT},
//! LeafAttrs, LeafWrite, MemType}`, `memslot::{MemslotSet, Memslot, SlotFlags, SlotError}`. From
//! `tdp-svm` (the AMD backend, `no_std` too): `caps`, `ncr3`, `exit`, `vmcb` over its fake CPU. From
//! `tdp-metal` (the vendor-neutral bare-metal pieces both backends use): `frames`, `region`,
//! `translate`, and the scenario's validation, expectations and NPT decoding.
#![no_std]
#![no_main]
// Some `mem*` functions in `rt`'s shared `rt_common` are loops (memmove's backward copy, memcmp);
// without this, LLVM may turn a loop back into a call to the very function it is in.
#![no_builtins]

extern crate alloc;

mod rt;

use core::hint::black_box;

use tdp_core::addr::{AsId, Gfn, Gpa, Level, Pfn, SlotId};
use tdp_core::memslot::{Memslot, MemslotSet, SlotError, SlotFlags};
use tdp_core::spte::{LeafAttrs, LeafWrite, MemType, SpteFormat};

/// A named check: returns whether `tdp-core` gave the expected answer.
type Check = (&'static str, fn() -> bool);

/// Every check, in the order they run.
const CHECKS: &[Check] = &[
    ("addr: gfn <-> gpa and table indices", addr_conversions),
    ("spte: writable EPT 4K leaf", ept_writable_leaf),
    ("spte: read-only NPT 2M leaf", npt_read_only_huge_leaf),
    ("memslot: insert, overlap, find", memslot_set),
    ("alloc: heap round trip", heap_round_trip),
    ("tdp-svm: capabilities, nCR3, #NPF decode", svm_backend),
    ("tdp-metal: table frames, identity translation, scenario", metal_pieces),
];

/// Runs every check and returns the process exit code; called by `rt`'s `_start`.
fn main() -> i32 {
    let mut failed = 0;
    for (name, check) in CHECKS {
        if !check() {
            rt::print("tdp-nostd-proof: FAILED: ");
            rt::print(name);
            rt::print("\n");
            failed += 1;
        }
    }
    if failed == 0 {
        rt::print("tdp-nostd-proof: all checks passed\n");
        0
    } else {
        1
    }
}

fn addr_conversions() -> bool {
    let gfn = black_box(Gfn(3));
    gfn.gpa() == Gpa(0x3000)
        && black_box(Gpa(0x3fff)).gfn() == gfn
        && black_box(Gfn(0x12345)).index_at(Level::L2).get() == 0x91
        && black_box(Gfn(0x12345)).align_down(Level::L2) == Gfn(0x12200)
}

fn ept_writable_leaf() -> bool {
    let ept = black_box(SpteFormat::EPT_AD);
    let attrs =
        LeafAttrs { write: LeafWrite::Writable, exec: true, memtype: MemType::WriteBack, accessed: true };
    let leaf = ept.leaf(black_box(Pfn(0x1234)), Level::L1, black_box(attrs));
    leaf.is_present()
        && leaf.is_writable()
        && leaf.is_leaf(Level::L1)
        && leaf.pfn() == Pfn(0x1234)
        && ept.is_dirty(leaf)
        && ept.check(leaf, Level::L1).is_ok()
}

fn npt_read_only_huge_leaf() -> bool {
    let npt = black_box(SpteFormat::NPT);
    let attrs = LeafAttrs {
        write: LeafWrite::ReadOnly { host_writable: true },
        exec: false,
        memtype: MemType::WriteBack,
        accessed: false,
    };
    let leaf = npt.leaf(black_box(Pfn(0x200)), Level::L2, black_box(attrs));
    leaf.is_present()
        && !leaf.is_writable()
        && leaf.is_leaf(Level::L2)
        && npt.is_host_writable(leaf)
        && !npt.is_mmu_writable(leaf)
        && npt.check(leaf, Level::L2).is_ok()
}

fn memslot_set() -> bool {
    let mut set = MemslotSet::new(black_box(Gfn(1 << 20)));
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0x100), 0x100, 0x20_0000, SlotFlags::empty());
    let clash = Memslot::new(AsId(0), SlotId(1), Gfn(0x1ff), 2, 0x40_0000, SlotFlags::empty());
    set.insert(black_box(slot)).is_ok()
        && matches!(set.insert(black_box(clash)), Err(SlotError::Overlap { .. }))
        && set.find(AsId(0), black_box(Gfn(0x150))).map(|s| s.id) == Some(SlotId(0))
        && set.find(AsId(0), black_box(Gfn(0x200))).is_none()
        && set.generation() == 1
}

fn heap_round_trip() -> bool {
    let mut v: alloc::vec::Vec<u64> = alloc::vec::Vec::new();
    for i in 0..black_box(1000u64) {
        v.push(i * i);
    }
    let copy = v.clone();
    copy.len() == 1000 && copy[999] == 999 * 999 && copy == v
}

fn svm_backend() -> bool {
    use tdp_svm::caps::SvmCapabilities;
    use tdp_svm::exit::{SvmExit, code, read_exit};
    use tdp_svm::fake::{FakeSvm, bochs};
    use tdp_svm::ncr3::NestedCr3;
    use tdp_svm::vmcb::Vmcb;

    let Ok(npt) = SvmCapabilities::read(&FakeSvm::new(black_box(bochs::RYZEN))).npt_features() else {
        return false;
    };
    let ncr3 = NestedCr3::new(&npt, &npt.mmu_config(), black_box(Pfn(0x1009)));
    let mut vmcb = Vmcb::new();
    vmcb.control.exit_code = code::NPF;
    vmcb.control.exit_info1 = black_box(0x1_0000_0006);
    vmcb.control.exit_info2 = black_box(0x20_1008);
    let npf = matches!(read_exit(&vmcb, AsId(0)), Ok(SvmExit::Npf(n)) if n.fault.gpa == Gpa(0x20_1008));
    npt.asids == 32768 && ncr3.map(|n| n.raw()) == Ok(0x100_9000) && npf
}

fn metal_pieces() -> bool {
    use tdp_core::host::{HostTranslate, TableMemory};
    use tdp_core::spte::Spte;
    use tdp_metal::frames::TableFrames;
    use tdp_metal::region::{IdentityRegion, TablePage};
    use tdp_metal::scenario::{Mapping, Paging, SCENARIO, translate};
    use tdp_metal::translate::{IdentityTranslate, PhysRange};

    let mut pages: alloc::vec::Vec<TablePage> = (0..black_box(4)).map(|_| TablePage::new()).collect();
    let Ok(frames) = TableFrames::new(IdentityRegion::from_pages(&mut pages)) else { return false };
    let allocated = frames.alloc_table(Spte(black_box(0))).is_ok() && frames.stats().in_use == 1;
    let ram = [PhysRange { start: 0x100_0000, end: 0x200_0000 }];
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 4096, 0x100_0000, SlotFlags::empty());
    let level = IdentityTranslate::new(&ram, Level::L2).translate(&slot, black_box(Gfn(0x205)), true);
    // A 2 MiB NPT leaf (P, W, PS) under root 1 -> 2 -> 3, for gfn 0x205.
    let read = |t: u64, i: usize| match (t, i) {
        (1, 0) => (2 << 12) | 7,
        (2, 0) => (3 << 12) | 7,
        (3, 1) => 0x120_0000 | 0x83,
        _ => 0,
    };
    let leaf = translate(Paging::Npt, read, 1, black_box(0x205), &[(1, 0x100_0000, 4096)]);
    allocated
        && level.map(|p| p.level) == Ok(Level::L2)
        && leaf == (Mapping::Leaf { slot: 1, page: 0x205, level: 2, rwx: 7 })
        && SCENARIO.validate().is_ok()
        && SCENARIO.expected_harvests().len() == 7
}
