//! The probe on the bootstrap processor: capabilities, enabling SVM, the shared MMU and memslots, the
//! guest, waking the second processor when there is one, vCPU 0's run ([`crate::hv::run_cpu`]), and the
//! checks whose outcome is the `SVM-RESULT` line.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{Gfn, Level, Pfn, SlotId};
use tdp_core::memslot::Memslot;
use tdp_core::mmu::Mmu;
use tdp_core::sync::Ordering;
use tdp_svm::asid::{AsidAllocator, TlbControl};
use tdp_svm::caps::{LEAF_EXT_FEATURES, LEAF_SVM, NptFeatures, SvmCapabilities};
use tdp_svm::host::{IdentityRegion, IdentityTranslate, PhysRange, SvmHost, TableFrames};
use tdp_svm::instr::SvmInstructions;
use tdp_svm::msr;
use tdp_svm::raw::{HsavePage, X86Svm};

use crate::guest::{self, OWN_PAGES, SHARED_PAGES};
use crate::hv::{self, AS_ID, Outcome, ProbeMmu, SLOTS, Shared};
use crate::layout::{GUEST_HOST_BASE, RAM_END, TABLE_POOL_END, TABLE_POOL_START, host_addr};
use crate::{println, smp};

static HSAVE: HsavePage = HsavePage::new();
static GUEST_RAM: [PhysRange; 1] = [PhysRange { start: GUEST_HOST_BASE, end: RAM_END }];

/// The gfns each harvest of vCPU 0's one-vCPU part must hold.
const HARVESTS: [&[u64]; 2] = [&[0x201, 0x203], &[0x201]];

unsafe extern "C" {
    static __kernel_end: u8;
}

/// Everything from the capabilities to the result line.
pub fn probe() -> Result<(), String> {
    let end = core::ptr::addr_of!(__kernel_end) as u64;
    if end > TABLE_POOL_START {
        return Err(format!("kernel ends at {end:#x}, inside the table pool"));
    }
    // SAFETY: CPL 0; the first GiB is identity-mapped (boot code), so every address below is physical;
    // VM_CR, VM_HSAVE_PA and EFER.SVME are touched only after `npt_features` found SVM present and not
    // disabled, and VMRUN only after both; the VMCBs run a guest confined by nested tables tdp-core
    // builds over the memslots in guest RAM, with VMRUN intercepted.
    let svm = unsafe { X86Svm::new() };
    let ext = svm.cpuid(LEAF_EXT_FEATURES, 0);
    let leaf_a = svm.cpuid(LEAF_SVM, 0);
    println!(
        "SVM-PROBE cpuid 8000_0001 ecx={:#010x} edx={:#010x}; 8000_000a eax={:#x} ebx={:#x} edx={:#x}",
        ext.ecx, ext.edx, leaf_a.eax, leaf_a.ebx, leaf_a.edx
    );
    let caps = SvmCapabilities::read(&svm);
    println!("SVM-PROBE caps {caps:?}");
    let npt = caps.npt_features().map_err(|e| format!("SVM capabilities: {e}"))?;
    println!("SVM-PROBE VM_CR={:#x} EFER before={:#x}", svm.rdmsr(msr::VM_CR), svm.rdmsr(msr::EFER));
    svm.set_hsave(&HSAVE);
    svm.enable_svme();
    println!(
        "SVM-PROBE EFER after={:#x} VM_HSAVE_PA={:#x} (page at {:#x})",
        svm.rdmsr(msr::EFER),
        svm.rdmsr(msr::VM_HSAVE_PA),
        HSAVE.addr()
    );

    let pages = (TABLE_POOL_END - TABLE_POOL_START) >> 12;
    // SAFETY: the pool is RAM below RAM_END, identity-mapped by the boot page tables, 4 KiB-aligned, and
    // used by nothing else: the kernel ends below it (checked above) and guest RAM starts above it.
    let region = unsafe { IdentityRegion::from_raw(TABLE_POOL_START, pages) };
    let frames = TableFrames::new(region).map_err(|e| format!("table pool: {e}"))?;
    // The `no-tlb-flush` experiment: flush requests are honoured with TLB_CONTROL 00h.
    let flushing = if cfg!(feature = "no-tlb-flush") {
        NptFeatures { flush_one: TlbControl::DoNothing, ..npt }
    } else {
        npt
    };
    let host = SvmHost::new(frames, IdentityTranslate::new(&GUEST_RAM, Level::L2), &flushing);
    let mmu: ProbeMmu = Mmu::new(host, npt.mmu_config()).map_err(|e| format!("MMU: {e}"))?;
    for (id, gfn, pages, flags) in SLOTS {
        guest::zero(gfn << 12, pages);
        let slot = Memslot::new(AS_ID, SlotId(id), Gfn(gfn), pages, host_addr(gfn << 12), flags);
        mmu.write().insert_memslot(slot).map_err(|e| format!("memslot {id}: {e}"))?;
    }
    // Whether a second processor exists is known only after waking it, and it needs the shared state
    // first: build the two-vCPU guest, wake, and let vCPU 0 skip the two-vCPU part if nobody answered.
    let (entry0, entry1) = guest::build(true)?;
    let asids = spin::Mutex::new(AsidAllocator::new(npt.asids));
    let shared = hv::SHARED.call_once(|| Shared { mmu, npt, entries: [entry0, entry1], asids });
    println!("SVM-PROBE flush value {:?}", shared.mmu.host().tlb.flush_one());
    let others = smp::wake_others()?;
    println!("SVM-PROBE other processors that ran the wake-up trampoline: {others}");
    if others == 0 {
        // Rebuild vCPU 0's code without the two-vCPU part (the guest has not run yet).
        let (entry0, _) = guest::build(false)?;
        if entry0 != shared.entries[0] {
            return Err(String::from("vCPU 0's entry point moved"));
        }
    }

    let out0 = hv::run_cpu(0, &svm, shared);
    let out1 = if others > 0 { Some(smp::wait_for_ap()) } else { None };
    report(shared, &out0, out1.as_ref());
    Ok(())
}

/// Prints what both vCPUs saw and the verdict.
fn report(shared: &Shared, out0: &Outcome, out1: Option<&Result<Outcome, String>>) {
    let mmu = &shared.mmu;
    for (i, (info1, info2)) in out0.npfs.iter().enumerate() {
        println!("SVM-PROBE npf {i}: EXITINFO1={info1:#x} EXITINFO2={info2:#x}");
    }
    println!("SVM-PROBE nRIP at VMMCALLs (rip, nrip): {:x?}", out0.nrips);
    println!(
        "SVM-PROBE vCPU 0: ASID {}, {} exits, faults {:?}, ring {:?}",
        out0.asid, out0.exits, out0.counters, out0.ring
    );
    let mut failures = Vec::new();
    if let Some(e) = &out0.error {
        failures.push(e.clone());
    }
    if !out0.done {
        failures.push(String::from("vCPU 0 did not finish"));
    }
    for (i, want) in HARVESTS.iter().enumerate() {
        let got: Vec<u64> = out0.harvests.get(i).map(|s| s.iter().copied().collect()).unwrap_or_default();
        if got != *want {
            failures.push(format!("harvest {i}: {got:x?}, expected {want:x?}"));
        }
    }
    if out0.mmio_reads != 2 {
        failures.push(format!("{} MMIO reads emulated, expected 2", out0.mmio_reads));
    }
    let mut last = BTreeSet::new();
    for &(gpa, value) in guest::WRITES.iter().rev() {
        if last.insert(gpa) && guest::read_u64(gpa) != value {
            failures.push(format!(
                "guest memory at {gpa:#x} holds {:#x}, expected {value:#x}",
                guest::read_u64(gpa)
            ));
        }
    }
    match out1 {
        None => println!("SVM-PROBE one processor: the two-vCPU part did not run"),
        Some(Err(e)) => failures.push(format!("vCPU 1: {e}")),
        Some(Ok(out1)) => two_vcpus(out0, out1, &mut failures),
    }
    println!(
        "SVM-PROBE flushes {:?}; table pages in use {}",
        mmu.host().tlb.stats(),
        mmu.host().frames.stats().in_use
    );
    if let Some(root) = out0.root {
        for gfn in [0x10, 0x200, 0x201, 0x202, 0x203, 0x400, 0x410, 0x420] {
            let (level, spte) = walk(mmu, root, gfn);
            println!(
                "SVM-PROBE npt gfn {gfn:#x}: {level:?} leaf {spte:#018x} (A={} D={} W={})",
                spte >> 5 & 1,
                spte >> 6 & 1,
                spte >> 1 & 1
            );
        }
    }
    if failures.is_empty() {
        let vcpus = if out1.is_some() { 2 } else { 1 };
        println!(
            "SVM-RESULT pass: {vcpus} vCPU(s), {} harvests as expected, {} MMIO reads emulated",
            out0.harvests.len()
                + out0.own_harvests.len()
                + out1.and_then(|o| o.as_ref().ok()).map_or(0, |o| o.own_harvests.len()),
            out0.mmio_reads
        );
    } else {
        println!("SVM-RESULT fail: {failures:?}");
    }
}

/// The two-vCPU checks: both finished; phase A's harvests together hold every page written exactly
/// (each vCPU's own pages in its own ring); phase B's hold each vCPU's own pages in its own ring; memory
/// holds the last values (a shared page one of the two vCPUs' values).
fn two_vcpus(out0: &Outcome, out1: &Outcome, failures: &mut Vec<String>) {
    println!(
        "SVM-PROBE vCPU 1: ASID {}, {} exits, faults {:?}, ring {:?}",
        out1.asid, out1.exits, out1.counters, out1.ring
    );
    if let Some(e) = &out1.error {
        failures.push(e.clone());
    }
    if !out1.done {
        failures.push(String::from("vCPU 1 did not finish"));
    }
    let outs = [out0, out1];
    for (cpu, out) in outs.iter().enumerate() {
        for (n, set) in out.own_harvests.iter().enumerate() {
            println!("SVM-PROBE vCPU {cpu} own harvest {n}: {} pages {set:x?}", set.len());
        }
        if out.own_harvests.len() != 2 {
            failures.push(format!("vCPU {cpu}: {} own harvests, expected 2", out.own_harvests.len()));
        }
    }
    let empty = BTreeSet::new();
    let h = |cpu: usize, n: usize| outs[cpu].own_harvests.get(n).unwrap_or(&empty);
    let all: BTreeSet<u64> = SHARED_PAGES.chain(OWN_PAGES[0].clone()).chain(OWN_PAGES[1].clone()).collect();
    let union: BTreeSet<u64> = h(0, 0).union(h(1, 0)).copied().collect();
    if union != all {
        failures
            .push(format!("phase A: the rings hold {union:x?}, expected the {} pages written", all.len()));
    }
    let both: Vec<u64> = h(0, 0).intersection(h(1, 0)).copied().collect();
    println!("SVM-PROBE phase A: {} pages in both rings {both:x?}", both.len());
    for (cpu, pages) in OWN_PAGES.iter().enumerate() {
        let own: BTreeSet<u64> = pages.clone().collect();
        if !own.is_subset(h(cpu, 0)) {
            failures.push(format!("phase A: vCPU {cpu}'s own pages are not all in its ring"));
        }
        if *h(cpu, 1) != own {
            failures
                .push(format!("phase B: vCPU {cpu}'s ring holds {:x?}, expected its own pages", h(cpu, 1)));
        }
        for gfn in pages.clone() {
            let want = guest::race_value(1, cpu as u64, gfn);
            let got = guest::read_u64(gfn << 12);
            if got != want {
                failures.push(format!("gfn {gfn:#x} holds {got:#x}, expected {want:#x}"));
            }
        }
    }
    let winners: Vec<u64> = SHARED_PAGES
        .map(|gfn| {
            let got = guest::read_u64(gfn << 12);
            if got == guest::race_value(0, 0, gfn) {
                0
            } else if got == guest::race_value(0, 1, gfn) {
                1
            } else {
                failures.push(format!("shared gfn {gfn:#x} holds {got:#x}"));
                9
            }
        })
        .collect();
    println!("SVM-PROBE shared pages, last writer per page: {winners:?}");
}

/// The leaf mapping `gfn` in the nested tables at `root`: its level and value (0 when none).
fn walk(mmu: &ProbeMmu, root: Pfn, gfn: u64) -> (Option<Level>, u64) {
    let region = mmu.host().frames.region();
    let mut table = root;
    for (level, shift) in [(Level::L4, 27), (Level::L3, 18), (Level::L2, 9), (Level::L1, 0)] {
        let Some(t) = region.table(table) else { return (None, 0) };
        let e = t[((gfn >> shift) & 511) as usize].load(Ordering::Relaxed);
        if e & 1 == 0 {
            return (None, e);
        }
        if level == Level::L1 || e & 0x80 != 0 {
            return (Some(level), e);
        }
        table = Pfn((e & 0x000f_ffff_ffff_f000) >> 12);
    }
    (None, 0)
}
