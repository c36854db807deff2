//! `bochs-hv`: a bare-metal test hypervisor for tdp-core, booted by GRUB under Bochs.
//!
//! It enters VMX operation, builds the guest of `tdp_vmx::scenario::SCENARIO` (identity page tables and
//! one code sequence per step, [`guest`]), backs its memslots with identity-mapped RAM, lets tdp-core's
//! `Mmu` build every EPT entry from the faults the guest takes ([`run`]), logs dirty pages into a
//! tdp-core dirty ring (by write protection, or by PML and D bits when the CPU has them), checks each
//! harvest, samples the final translations, and prints one `TDP-RESULT {json}` line on COM1 before it
//! shuts Bochs down. Any panic or CPU exception prints a `TDP-PANIC` line instead.
//!
//! Layout: [`boot`] (multiboot2, long mode, GDT/TSS), [`idt`], [`serial`], [`rt`] (panic, mem*, heap,
//! shutdown), [`cpu`], [`raw`] (VMX instructions, MSRs, field encodings), [`vmx`] (VMXON, entry/exit
//! trampoline), [`vmcs`] (capabilities, VMCS contents), [`layout`] (physical memory map), [`host`]
//! (tdp-core's host traits), [`ring`] (dirty ring and PML drain), [`guest`], [`run`], and with the
//! `broken-ept` feature [`broken`].
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
mod idt;
mod layout;
mod raw;
mod ring;
mod rt;
mod run;
mod serial;
mod vmcs;
mod vmx;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::Level;
use tdp_core::addr::Pfn;
use tdp_core::dirty_ring::{DirtyRingConsumer, DirtyRingProducer};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, MmuConfig, PageCache};
use tdp_core::spte::{EptOptions, SpteFormat};
use tdp_vmx::scenario::report::{RunInfo, write_result_line};
use tdp_vmx::scenario::{AS_ID, Observed, SCENARIO, translate};

use crate::boot::Page;
use crate::host::HvHost;

static VMXON_REGION: Page = Page::zeroed();
static VMCS_REGION: Page = Page::zeroed();
static PML_LOG: Page = Page::zeroed();

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
    let features = vmcs::detect().map_err(|e| format!("VMX capabilities: {e}"))?;
    vmx::vmxon(&VMXON_REGION, &VMCS_REGION).map_err(|e| format!("VMXON: {e}"))?;
    let (config, mmu_name) = if features.pml {
        (MmuConfig::EPT_PML, "EPT_PML")
    } else {
        // No PML: dirty logging by write protection. Without EPT A/D the format must not rely on them,
        // and without 1 GiB EPT pages (sandy bridge) the largest leaf is 2 MiB.
        let format =
            SpteFormat::ept(EptOptions { accessed_dirty: features.ept_ad, max_leaf_level: Level::L2 });
        (MmuConfig { format, ..MmuConfig::EPT }, "EPT")
    };
    let mmu: Mmu<HvHost> = Mmu::new(HvHost::new(), config).map_err(|e| format!("MMU config: {e}"))?;
    let mut bases = Vec::new();
    for s in SCENARIO.slots {
        let host_base = layout::host_addr(s.base_gfn.gpa().0);
        let slot = Memslot::new(AS_ID, s.id, s.base_gfn, s.pages, host_base, SlotFlags::empty());
        mmu.write().insert_memslot(slot).map_err(|e| format!("memslot {}: {e}", s.id.0))?;
        bases.push((s.id.0, host_base, s.pages));
    }
    let mut cache = PageCache::new();
    let root = mmu.load_root(&mut cache, AS_ID).map_err(|e| format!("root: {e}"))?;
    let eptp = vmcs::eptp(root.pfn().0, features.ept_ad);
    mmu.host().set_eptp(eptp);
    let entry = guest::build(&SCENARIO).map_err(|e| format!("guest: {e}"))?;
    vmcs::setup(&features, eptp, PML_LOG.addr(), entry).map_err(|e| format!("VMCS: {e}"))?;

    let cfg = ring::config().map_err(|e| format!("ring: {e}"))?;
    let producer = DirtyRingProducer::new(&ring::RING, cfg).map_err(|e| format!("ring: {e}"))?;
    let consumer = DirtyRingConsumer::new(&ring::RING, cfg).map_err(|e| format!("ring: {e}"))?;
    let mut hv = run::Hv {
        scenario: &SCENARIO,
        mmu: &mmu,
        cache,
        root,
        sink: ring::RingSink { producer, lost: 0, soft_full: 0 },
        consumer,
        pml: features.pml.then_some(&PML_LOG),
        ad: features.ept_ad,
        seen: Observed::default(),
    };
    hv.run();
    let mut seen = core::mem::take(&mut hv.seen);
    seen.flushes = mmu.host().flushes();
    seen.invepts = mmu.host().invepts();
    let root_pfn = hv.root.pfn().0;
    seen.translations = SCENARIO
        .sample_gfns()
        .into_iter()
        .map(|gfn| tdp_vmx::scenario::Translation {
            gfn,
            kind: translate(|t, i| mmu.host().read_entry(t, i), root_pfn, gfn, &bases),
        })
        .collect();
    let checks = SCENARIO.evaluate(&seen);
    let info = RunInfo {
        runner: "bochs",
        model,
        mmu: mmu_name,
        features: features.names(),
        broken: cfg!(feature = "broken-ept"),
    };
    println!(
        "bochs-hv: {} exits handled, {} table pages in use, {} soft-full pushes",
        seen.ept_violations + seen.ept_misconfigs,
        mmu.host().pages_in_use(),
        hv.sink.soft_full
    );
    let _ = Pfn(root_pfn);
    write_result_line(&mut serial::Serial, &info, &seen, &checks).map_err(|_| String::from("serial"))?;
    Ok(())
}
