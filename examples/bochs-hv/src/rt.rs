//! The runtime a freestanding kernel brings itself: the panic handler, `_Unwind_Resume`, the Bochs
//! shutdown, and the heap's size. The `mem*` functions `core` calls, the `rust_eh_personality` symbol the
//! prebuilt `core` references and the bump allocator for `alloc` (tdp-core keeps its memslots and root
//! list in `Vec`s) are shared with the no_std proof, in [`rt_common`].

#[path = "../../../xtask/freestanding-rt/rt_common.rs"]
mod rt_common;

use crate::serial;

/// Stops Bochs: the bytes `Shutdown` written to port 0x8900 (Bochs's shutdown port). Bochs then exits;
/// its log records the request as a `>>PANIC<<`, which is this stop, not a failure.
pub fn shutdown() -> ! {
    serial::flush();
    for b in b"Shutdown" {
        serial::outb(0x8900, *b);
    }
    loop {
        // SAFETY: `hlt` with interrupts off stops the CPU; Bochs has exited by now anyway.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::println!("TDP-PANIC {info}");
    shutdown()
}

/// The prebuilt `alloc` has landing pads that resume unwinding; with `panic = "abort"` none is ever
/// reached, but the symbol must exist.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::println!("TDP-PANIC unwinding resumed under panic = abort");
    shutdown()
}

/// Bytes of heap: the MMU's bookkeeping and the result's sets take a few tens of KiB.
const HEAP_SIZE: usize = 2 * 1024 * 1024;

/// The heap, in `.bss`: memory is never reused, which a run of a few seconds affords.
#[global_allocator]
static ALLOCATOR: rt_common::Bump<HEAP_SIZE> = rt_common::Bump::new();
