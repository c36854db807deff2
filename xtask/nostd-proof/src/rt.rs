//! The runtime a libc-free static binary must bring itself: the `_start` entry point, `exit` and `write`
//! as raw Linux syscalls, the panic handler, the `rust_eh_personality` symbol the prebuilt `core`
//! references, the `mem*` functions `core` calls, and a bump allocator for `alloc`.
//!
//! All of this module's `unsafe` is argued where it is used. Nothing here is shared between threads: the
//! process has exactly one.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

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

/// The prebuilt `core` is compiled with unwinding and references this symbol; with `panic = "abort"` it
/// is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Copies `n` bytes from `src` to `dest`; the regions must not overlap.
///
/// # Safety
/// `src` must be valid for `n` reads and `dest` for `n` writes (the C contract; `core` guarantees it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: `i < n`, and the caller guarantees both regions span `n` bytes.
        unsafe { *dest.add(i) = *src.add(i) };
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the regions may overlap.
///
/// # Safety
/// As [`memcpy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if dest.cast_const() < src {
        // Forward: each byte is read before any write reaches it.
        for i in 0..n {
            // SAFETY: `i < n`, and the caller guarantees both regions span `n` bytes.
            unsafe { *dest.add(i) = *src.add(i) };
        }
    } else {
        // Backward, for the same reason when `dest` is above `src`.
        for i in (0..n).rev() {
            // SAFETY: as above.
            unsafe { *dest.add(i) = *src.add(i) };
        }
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: `i < n`, and the caller guarantees `dest` spans `n` bytes. The cast keeps the low byte,
        // as C's memset does.
        unsafe { *dest.add(i) = c as u8 };
    }
    dest
}

/// Compares `n` bytes: negative, zero or positive as `a` sorts before, equal to or after `b`.
///
/// # Safety
/// `a` and `b` must be valid for `n` reads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`, and the caller guarantees both regions span `n` bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// Zero when the `n` bytes are equal, non-zero otherwise.
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's guarantee is exactly memcmp's.
    unsafe { memcmp(a, b, n) }
}

/// Bytes of heap: ample for the checks, which allocate a few KiB.
const HEAP_SIZE: usize = 256 * 1024;

/// The heap's memory, in `.bss` (zeroed by the kernel's ELF loader).
#[repr(C, align(4096))]
struct Heap(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: the bytes are only reached through pointers `Bump::alloc` hands out, each range exactly once
// (the offset only grows), so no two users share a byte; the process is single-threaded anyway.
unsafe impl Sync for Heap {}

static HEAP: Heap = Heap(UnsafeCell::new([0; HEAP_SIZE]));

/// A bump allocator over [`HEAP`]: `alloc` carves the next aligned range, `dealloc` forgets it. Memory is
/// never reused, which is fine for a process that runs a few checks and exits.
struct Bump {
    /// Bytes of `HEAP` handed out so far.
    next: AtomicUsize,
}

#[global_allocator]
static ALLOCATOR: Bump = Bump { next: AtomicUsize::new(0) };

// SAFETY: `alloc` returns either null or a range of `layout.size()` bytes inside `HEAP`, aligned to
// `layout.align()`, that no earlier call returned (the compare-exchange claims it); `dealloc` does nothing,
// which GlobalAlloc allows.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = HEAP.0.get().cast::<u8>();
        // Relaxed: the counter orders no other memory; it only has to hand out each range once.
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let addr = (base as usize + next).next_multiple_of(layout.align());
            let start = addr - base as usize;
            let Some(end) = start.checked_add(layout.size()).filter(|&end| end <= HEAP_SIZE) else {
                return core::ptr::null_mut();
            };
            match self.next.compare_exchange_weak(next, end, Ordering::Relaxed, Ordering::Relaxed) {
                // SAFETY: `start + size <= HEAP_SIZE`, so the result stays inside `HEAP`.
                Ok(_) => return unsafe { base.add(start) },
                Err(seen) => next = seen,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}
