//! The runtime a libc-free static binary must bring itself: the `_start` entry point, `exit` and `write`
//! as raw Linux syscalls, the panic handler, and the heap's size. The `mem*` functions `core` calls, the
//! `rust_eh_personality` symbol the prebuilt `core` references and the bump allocator for `alloc` are
//! shared with the Bochs kernel, in [`rt_common`].
//!
//! All of this module's `unsafe` is argued where it is used. Nothing here is shared between threads: the
//! process has exactly one.

use core::arch::{asm, global_asm};

#[path = "../../freestanding-rt/rt_common.rs"]
mod rt_common;

// The kernel enters `_start` with `rsp` pointing at `argc`, 16-byte aligned, and no return address. The
// SysV ABI wants `rsp + 8` aligned at a function's first instruction, so enter Rust through a `call`
// (which pushes 8 bytes) from an aligned stack, with `rbp` cleared to end frame-pointer walks.
global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "xor ebp, ebp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym rust_start,
);

extern "C" fn rust_start() -> ! {
    exit(crate::main())
}

/// Linux x86-64 syscall numbers (`arch/x86/entry/syscalls/syscall_64.tbl`).
const SYS_WRITE: usize = 1;
const SYS_EXIT: usize = 60;

/// Ends the process with `code` through the `exit` syscall.
pub fn exit(code: i32) -> ! {
    // SAFETY: `exit` takes one integer argument and never returns; the process holds no state that needs
    // flushing (stdout is written unbuffered by `print`).
    unsafe { asm!("syscall", in("rax") SYS_EXIT, in("rdi") i64::from(code), options(noreturn, nostack)) }
}

/// Writes `s` to stdout with the `write` syscall; errors and short writes are ignored (diagnostics only).
pub fn print(s: &str) {
    // SAFETY: `write` reads `s.len()` bytes from `s.as_ptr()`, which the borrow keeps valid; the kernel
    // clobbers only `rax` (the result), `rcx` and `r11`, all declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_WRITE => _,
            in("rdi") 1usize,
            in("rsi") s.as_ptr(),
            in("rdx") s.len(),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, readonly),
        );
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    print("tdp-nostd-proof: panicked\n");
    exit(2)
}

/// Bytes of heap: ample for the checks, which allocate a few KiB.
const HEAP_SIZE: usize = 256 * 1024;

/// The heap, in `.bss` (zeroed by the kernel's ELF loader): memory is never reused, which is fine for a
/// process that runs a few checks and exits.
#[global_allocator]
static ALLOCATOR: rt_common::Bump<HEAP_SIZE> = rt_common::Bump::new();
