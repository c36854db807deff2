//! The bootstrap processor's work: capabilities, enabling SVM, the shared MMU and the scenario's
//! memslots, the guest, the scenario on vCPU 0 ([`crate::scenario`]) and its `TDP-RESULT` line; then,
//! when a second processor answers, the two-vCPU part (vCPU 0 here, vCPU 1 there, [`crate::hv::run_cpu`])
//! and its `TDP-SMP` line.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{Gfn, Level};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::Mmu;
use tdp_metal::scenario::report::{RunInfo, write_result_line};
use tdp_metal::scenario::{AS_ID, REMAP_POOL_OFFSET, REMAP_POOL_PAGES, REMAP_POOL_SLOT, SCENARIO};
use tdp_metal::translate::MovedPage;
use tdp_svm::asid::{AsidAllocator, TlbControl};
use tdp_svm::caps::{LEAF_EXT_FEATURES, LEAF_SVM, NptFeatures, SvmCapabilities};
use tdp_svm::host::{IdentityRegion, IdentityTranslate, PhysRange, SvmHost, TableFrames};
use tdp_svm::instr::SvmInstructions;
use tdp_svm::msr;
use tdp_svm::raw::{HsavePage, X86Svm};

use crate::hv::{self, Shared, SvmMmu};
use crate::layout::{GUEST_HOST_BASE, RAM_END, TABLE_POOL_END, TABLE_POOL_START, host_addr};
use crate::smp_guest;
use crate::{BROKEN, guest, println, serial, smp};
use tdp_metal::scenario::smp::{RACE, RACE_PAGES, RACE_SLOT, SMP_PREFIX};

static HSAVE: HsavePage = HsavePage::new();
static GUEST_RAM: [PhysRange; 1] = [PhysRange { start: GUEST_HOST_BASE, end: RAM_END }];
/// The pages the host moved to another frame (the scenario's remap steps), one entry per pool frame.
static MOVED: [MovedPage; REMAP_POOL_PAGES as usize] =
    [const { MovedPage::new() }; REMAP_POOL_PAGES as usize];

unsafe extern "C" {
    static __kernel_end: u8;
}

/// Everything from the capabilities to the result lines.
pub fn main(model: &str) -> Result<(), String> {
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
        "SVM-PROBE cpuid 8000_0001 ecx={:#010x}; 8000_000a eax={:#x} ebx={:#x} edx={:#x}",
        ext.ecx, leaf_a.eax, leaf_a.ebx, leaf_a.edx
    );
    let caps = SvmCapabilities::read(&svm);
    let npt = caps.npt_features().map_err(|e| format!("SVM capabilities: {e}"))?;
    svm.set_hsave(&HSAVE);
    svm.enable_svme();
    println!("SVM-PROBE EFER={:#x} VM_HSAVE_PA={:#x}", svm.rdmsr(msr::EFER), svm.rdmsr(msr::VM_HSAVE_PA));

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
    let translate = IdentityTranslate::new(&GUEST_RAM, Level::L2).with_moved_pages(&MOVED);
    let host = SvmHost::new(frames, translate, &flushing);
    // Leaves up to 2 MiB: guest RAM is backed by 2 MiB host pages (as the mock's NPT mode).
    let config = NptFeatures { max_leaf_level: Level::L2, ..npt }.mmu_config();
    let mmu: SvmMmu = Mmu::new(host, config).map_err(|e| format!("MMU: {e}"))?;
    let mut bases = Vec::new();
    for s in SCENARIO.slots {
        let host_base = host_addr(s.base_gfn.gpa().0);
        let slot = Memslot::new(AS_ID, s.id, s.base_gfn, s.pages, host_base, SlotFlags::empty());
        mmu.write().insert_memslot(slot).map_err(|e| format!("memslot {}: {e}", s.id.0))?;
        bases.push((s.id.0, host_base, s.pages));
    }
    bases.push((REMAP_POOL_SLOT, host_addr(REMAP_POOL_OFFSET), REMAP_POOL_PAGES));
    let entry = guest::build(&SCENARIO).map_err(|e| format!("guest: {e}"))?;
    let smp_entries = smp_guest::build().map_err(|e| format!("two-vCPU guest: {e}"))?;
    if entry != guest::CODE {
        return Err(format!("the scenario's entry is {entry:#x}"));
    }
    let asids = spin::Mutex::new(AsidAllocator::new(npt.asids));
    let shared = hv::SHARED.call_once(|| Shared { mmu, npt, smp_entries, asids });

    let seen = crate::scenario::run(&svm, shared, &bases);
    let checks = SCENARIO.evaluate(&seen);
    let features: &[&str] = if npt.nrip_save {
        &["svm", "npt", "npt_4level", "npt_ad", "npt_2m", "nrip_save"]
    } else {
        &["svm", "npt", "npt_4level", "npt_ad", "npt_2m"]
    };
    let info = RunInfo { runner: "bochs", model, mmu: "NPT", features, broken: BROKEN };
    write_result_line(&mut serial::Serial, &info, &seen, &checks).map_err(|_| String::from("serial"))?;
    if BROKEN.is_some() {
        // A must-fail build proves the scenario's checks; the two-vCPU part is the correct build's.
        return Ok(());
    }
    two_vcpus(model, &svm, shared)
}

/// The two-vCPU part: inserts the race slot, wakes the second processor and runs vCPU 0 here while it
/// runs vCPU 1, then prints the `TDP-SMP` line (`skipped` when no second processor answered).
fn two_vcpus(model: &str, svm: &X86Svm, shared: &'static Shared) -> Result<(), String> {
    let race =
        Memslot::new(AS_ID, RACE_SLOT, Gfn(RACE), RACE_PAGES, host_addr(RACE << 12), SlotFlags::LOG_DIRTY);
    shared.mmu.write().insert_memslot(race).map_err(|e| format!("race memslot: {e}"))?;
    let others = smp::wake_others()?;
    if others == 0 {
        println!("{SMP_PREFIX}skipped: one processor");
        return Ok(());
    }
    let out0 = hv::run_cpu(0, svm, shared);
    match smp::wait_for_ap() {
        Err(e) => smp_guest::report_lost(model, &out0, e),
        Ok(out1) => smp_guest::report(model, [&out0, &out1]),
    }
    println!("SMP flushes: {:?}, other processors: {others}", shared.mmu.host().tlb.stats());
    Ok(())
}
