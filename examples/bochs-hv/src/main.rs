//! `bochs-hv`: a bare-metal test hypervisor for tdp-core, booted by GRUB under Bochs.
//!
//! It enters VMX operation, builds the guest of `tdp_metal::scenario::SCENARIO` (identity page tables and
//! one code sequence per step, [`guest`]), backs its memslots with identity-mapped RAM, lets tdp-core's
//! `Mmu` build every EPT entry from the faults the guest takes ([`run`]), logs dirty pages into a
//! tdp-core dirty ring (by write protection, or by PML and D bits when the CPU has them), checks each
//! harvest, samples the final translations, and prints one `TDP-RESULT {json}` line on COM1; with a
//! second processor it then runs two vCPUs at once ([`smp_run`]) and prints a `TDP-SMP` line, before it
//! shuts Bochs down. Any panic or CPU exception prints a `TDP-PANIC` line instead.
//!
//! Layout: [`boot`] (multiboot2, long mode, GDT/TSS), [`idt`], [`serial`], [`rt`] (panic, mem*, heap,
//! shutdown), [`cpu`], [`vmx`] (VMXON, entry/exit trampoline), [`vmcs`] (VMCS contents), [`layout`]
//! (physical memory map), [`host`] (tdp-core's host traits), [`ring`] (dirty ring memory, PML page,
//! ring memory), [`guest`], [`run`], [`host_steps`] (logging, harvests, aging, moving a page, MMIO
//! emulation, sampling: the vendor-neutral part, which `examples/bochs-svm` includes too), [`smp`] (waking
//! the second processor) and [`smp_guest`] (the two-vCPU part's guest, hypercalls and checks), both
//! vendor-neutral and included by `bochs-svm` too, [`smp_run`] (the two-vCPU part under VMX), and with the
//! `broken-ept` feature [`broken`] (the other must-fail builds, `broken-age` and `broken-remap`, are
//! switches passed to [`host_steps`]). The VMX instructions, capability decoding, EPTP, exit decoding
//! and PML drain come from `tdp-vmx`; the ring sink and the scenario from `tdp-metal`.
#![no_std]
#![no_main]
#![no_builtins]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod boot;
#[cfg(feature = "broken-ept")]
mod broken;
mod cpu;
mod guest;
mod host;
mod host_steps;
mod idt;
mod layout;
mod ring;
mod rt;
mod run;
mod serial;
mod smp;
mod smp_guest;
mod smp_run;
mod vmcs;
mod vmx;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::Level;
use tdp_core::dirty_ring::{DirtyRingConsumer, DirtyRingProducer};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, VcpuMmu};
use tdp_metal::ring_sink::RingSink;
use tdp_metal::scenario::report::{RunInfo, write_result_line};
use tdp_metal::scenario::{
    AS_ID, Broken, Observed, REMAP_POOL_OFFSET, REMAP_POOL_PAGES, REMAP_POOL_SLOT, SCENARIO,
};
use tdp_vmx::caps::VmxCapabilities;
use tdp_vmx::eptp::Eptp;
use tdp_vmx::pml::Pml;
use tdp_vmx::raw::X86Vmx;

use crate::boot::Page;
use crate::host::HvHost;

/// The must-fail variant this kernel was built as (at most one `broken-*` feature).
pub(crate) const BROKEN: Option<Broken> = if cfg!(feature = "broken-ept") {
    Some(Broken::Ept)
} else if cfg!(feature = "broken-age") {
    Some(Broken::Age)
} else if cfg!(feature = "broken-remap") {
    Some(Broken::Remap)
} else if cfg!(feature = "broken-nx") {
    Some(Broken::Nx)
} else if cfg!(feature = "broken-track") {
    Some(Broken::Track)
} else if cfg!(feature = "broken-recover") {
    Some(Broken::Recover)
} else {
    None
};

pub(crate) use smp_run::ap_run;

/// The guest's hypercall instruction (`guest` emits it): VMCALL.
pub(crate) const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xc1];

/// The VMX instructions, stateless (each acts on the calling processor), so both processors use this one.
// SAFETY: every processor that uses it runs at CPL 0 on a CPU with VMX (checked in `hypervise` before
// the first use; the second processor is the same model); VMREAD, VMWRITE and INVEPT are used only after
// that processor's `vmx::vmxon` succeeded, RDMSR only for MSRs `VmxCapabilities::read` knows exist.
static VMX: X86Vmx = unsafe { X86Vmx::new() };

/// The MMU, built once by the bootstrap processor and shared with the second one.
pub(crate) static MMU: spin::Once<Mmu<HvHost<'static>>> = spin::Once::new();

static VMXON_REGION: Page = Page::zeroed();
static VMCS_REGION: Page = Page::zeroed();

unsafe extern "C" {
    static __kernel_end: u8;
}

/// The Rust entry point, called by the boot code with the multiboot2 information address.
extern "C" fn kmain(_multiboot_info: u32) -> ! {
    serial::init();
    idt::init();
    boot::load_tss();
    let mut brand = [0u8; 48];
    let model = cpu::brand(&mut brand);
    println!("bochs-hv: {model}");
    match hypervise(model) {
        Ok(()) => {}
        Err(e) => println!("TDP-PANIC {e}"),
    }
    rt::shutdown()
}

/// Everything from VMXON to the result line.
fn hypervise(model: &str) -> Result<(), String> {
    let end = core::ptr::addr_of!(__kernel_end) as u64;
    if end > layout::TABLE_POOL_START {
        return Err(format!("kernel ends at {end:#x}, inside the EPT pool"));
    }
    if cpu::cpuid(1).2 & (1 << 5) == 0 {
        return Err(String::from("the CPU has no VMX (CPUID.1:ECX.VMX = 0)"));
    }
    let vmx = &VMX;
    let caps = VmxCapabilities::read(vmx);
    let features = caps.ept_features().map_err(|e| format!("VMX capabilities: {e}"))?;
    if features.max_leaf_level < Level::L2 {
        return Err(String::from("the CPU has no 2 MiB EPT pages, which the scenario maps"));
    }
    vmx::vmxon(vmx, &caps, &VMXON_REGION, &VMCS_REGION).map_err(|e| format!("VMXON: {e}"))?;
    // PML when the CPU has it (EPT A/D with D-bit logging), write protection otherwise; the format has
    // A/D bits exactly when the CPU does, and leaves no larger than it can map.
    let config = features.mmu_config(features.pml).map_err(|e| format!("MMU config: {e}"))?;
    let mmu_name = if config.pml { "EPT_PML" } else { "EPT" };
    let mmu: Mmu<HvHost<'static>> =
        Mmu::new(host::new(vmx, &features)?, config).map_err(|e| format!("MMU config: {e}"))?;
    let mmu = MMU.call_once(|| mmu);
    let mut bases = Vec::new();
    for s in SCENARIO.slots {
        let host_base = layout::host_addr(s.base_gfn.gpa().0);
        let slot = Memslot::new(AS_ID, s.id, s.base_gfn, s.pages, host_base, SlotFlags::empty());
        mmu.write().insert_memslot(slot).map_err(|e| format!("memslot {}: {e}", s.id.0))?;
        bases.push((s.id.0, host_base, s.pages));
    }
    // The remap pool, so that a translation into it decodes as a pool page.
    bases.push((REMAP_POOL_SLOT, layout::host_addr(REMAP_POOL_OFFSET), REMAP_POOL_PAGES));
    let mut vcpu = VcpuMmu::new();
    let root = mmu.load_root(&mut vcpu, AS_ID).map_err(|e| format!("root: {e}"))?;
    let eptp = Eptp::new(&features, &config, root).map_err(|e| format!("EPTP: {e}"))?;
    mmu.host().tlb.load_eptp(eptp);
    let entry = guest::build(&SCENARIO).map_err(|e| format!("guest: {e}"))?;
    vmcs::setup(vmx, &caps, eptp, entry).map_err(|e| format!("VMCS: {e}"))?;
    let pml = if config.pml {
        Some(Pml::enable(vmx, &features, eptp, &ring::PML_PAGE).map_err(|e| format!("PML: {e}"))?)
    } else {
        None
    };

    let cfg = ring::config().map_err(|e| format!("ring: {e}"))?;
    let producer = DirtyRingProducer::new(&ring::RING, cfg).map_err(|e| format!("ring: {e}"))?;
    let consumer = DirtyRingConsumer::new(&ring::RING, cfg).map_err(|e| format!("ring: {e}"))?;
    let sink = RingSink::new(producer).map_err(|e| format!("ring sink: {e}"))?;
    let mut hv = run::Hv {
        vmx,
        features,
        scenario: &SCENARIO,
        mmu,
        vcpu,
        sink,
        consumer,
        pml,
        bases,
        seen: Observed::default(),
    };
    hv.run();
    let mut seen = core::mem::take(&mut hv.seen);
    let flushes = mmu.host().tlb.stats();
    seen.flushes = flushes.requests;
    // Requests delivered, not INVEPTs: after the NX step replaced the root, one request takes two.
    seen.invepts = flushes.delivered;
    if seen.translations.is_empty() {
        // Taken at the NX step when the run reached it (turning NX on replaces the root).
        seen.translations = hv.sample();
    }
    seen.host_reads = host_steps::host_reads(&SCENARIO, &mmu.host().translate);
    let checks = SCENARIO.evaluate(&seen);
    let info = RunInfo {
        runner: "bochs",
        model,
        mmu: mmu_name,
        features: vmcs::feature_names(&features),
        broken: BROKEN,
    };
    println!(
        "bochs-hv: {} EPT exits, {} table pages in use, ring {:?}, PML {:?}",
        seen.ept_violations + seen.ept_misconfigs,
        mmu.host().frames.stats().in_use,
        hv.sink.stats(),
        hv.pml.as_ref().map(Pml::stats)
    );
    write_result_line(&mut serial::Serial, &info, &seen, &checks).map_err(|_| String::from("serial"))?;
    if BROKEN.is_some() {
        // A must-fail build proves the scenario's checks; the two-vCPU part is the correct build's.
        return Ok(());
    }
    smp_run::two_vcpus(model, vmx, caps, features)
}
