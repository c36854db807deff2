//! `bochs-svm`: a bare-metal SVM probe for tdp-core and tdp-svm, booted by GRUB under Bochs on an AMD
//! CPU model.
//!
//! It reads the SVM capabilities, sets VM_HSAVE_PA and EFER.SVME, builds a 64-bit guest ([`guest`])
//! whose nested page tables tdp-core's `Mmu` fills from the guest's #NPF exits, emulates the guest's
//! MMIO reads, logs dirty pages by write protection into a tdp-core dirty ring, checks each harvest and
//! the memory the guest wrote, reads the nested A/D bits Bochs set, and prints `SVM-PROBE` lines and one
//! `SVM-RESULT pass|fail` line on COM1 before it shuts Bochs down ([`run`]).
//!
//! The boot path, IDT, serial port, runtime and memory layout are `examples/bochs-hv`'s files, included
//! by path (not copied); everything SVM comes from `tdp-svm`.
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
mod guest;
mod hv;
#[path = "../../bochs-hv/src/idt.rs"]
#[allow(dead_code)]
mod idt;
#[path = "../../bochs-hv/src/layout.rs"]
mod layout;
#[path = "../../bochs-hv/src/rt.rs"]
mod rt;
mod run;
#[path = "../../bochs-hv/src/serial.rs"]
mod serial;
mod smp;

/// The Rust entry point, called by the boot code with the multiboot2 information address.
extern "C" fn kmain(_multiboot_info: u32) -> ! {
    serial::init();
    idt::init();
    boot::load_tss();
    let mut brand = [0u8; 48];
    let model = cpu::brand(&mut brand);
    println!("bochs-svm: {model}");
    match run::probe() {
        Ok(()) => {}
        Err(e) => println!("SVM-RESULT fail {e}"),
    }
    rt::shutdown()
}
