//! `bochs-svm`: the bare-metal SVM test hypervisor for tdp-core and tdp-svm, booted by GRUB under Bochs
//! on an AMD CPU model.
//!
//! It reads the SVM capabilities, sets VM_HSAVE_PA and EFER.SVME, and runs the scenario that
//! `examples/bochs-hv` runs under VMX (`tdp_metal::scenario::SCENARIO`) on one vCPU whose nested page
//! tables tdp-core's `Mmu` builds from the guest's #NPF exits: MMIO emulated, dirty logging by write
//! protection into a tdp-core dirty ring, harvests, aging through NPT A bits, a page moved between
//! `invalidate_range_start` and `_end`; then it prints the same `TDP-RESULT {json}` line on COM1
//! ([`scenario`], [`run`]). With a second processor (`cpu: count=2`), it then runs two vCPUs on two
//! processors faulting the same and different gfns of a dirty-logged slot concurrently and prints a
//! `TDP-SMP pass|fail|skipped` line ([`hv`], [`smp`], [`smp_guest`]). Any panic or CPU exception prints a
//! `TDP-PANIC` line.
//!
//! Shared with `examples/bochs-hv` by path (not copied): the boot path, IDT, serial port, runtime,
//! memory layout, the scenario's guest generator (`guest`), the vendor-neutral hypervisor steps
//! (`host_steps`: logging, harvests, aging, moving a page, MMIO emulation, sampling), the second
//! processor's wake-up (`smp`) and the two-vCPU part's guest, hypercalls and checks (`smp_guest`). Everything SVM
//! comes from `tdp-svm`, the ring sink and the scenario from `tdp-metal`. The must-fail builds:
//! `broken-npt` gives W and D back to the nested leaves the core protected for dirty logging,
//! `broken-age` ages without clearing, `broken-remap` moves the page without the MMU notifier.
#![no_std]
#![no_main]
#![no_builtins]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[path = "../../bochs-hv/src/boot.rs"]
#[allow(dead_code)]
mod boot;
#[path = "../../bochs-hv/src/cpu.rs"]
#[allow(dead_code)]
mod cpu;
#[path = "../../bochs-hv/src/guest.rs"]
mod guest;
#[path = "../../bochs-hv/src/host_steps.rs"]
mod host_steps;
mod hv;
#[path = "../../bochs-hv/src/idt.rs"]
#[allow(dead_code)]
mod idt;
#[path = "../../bochs-hv/src/layout.rs"]
mod layout;
#[path = "../../bochs-hv/src/rt.rs"]
mod rt;
mod run;
mod scenario;
#[path = "../../bochs-hv/src/serial.rs"]
mod serial;
#[path = "../../bochs-hv/src/smp.rs"]
mod smp;
#[path = "../../bochs-hv/src/smp_guest.rs"]
mod smp_guest;

use tdp_metal::scenario::Broken;

pub(crate) use hv::ap_run;

/// The guest's hypercall instruction (`guest` emits it): VMMCALL.
pub(crate) const HYPERCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// The must-fail variant this kernel was built as (at most one `broken-*` feature).
pub(crate) const BROKEN: Option<Broken> = if cfg!(feature = "broken-npt") {
    Some(Broken::Npt)
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

/// The Rust entry point, called by the boot code with the multiboot2 information address.
extern "C" fn kmain(_multiboot_info: u32) -> ! {
    serial::init();
    idt::init();
    boot::load_tss();
    let mut brand = [0u8; 48];
    let model = cpu::brand(&mut brand);
    println!("bochs-svm: {model}");
    if let Err(e) = run::main(model) {
        println!("TDP-PANIC {e}");
    }
    rt::shutdown()
}
