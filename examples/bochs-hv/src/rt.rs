//! The runtime a freestanding kernel brings itself: the panic handler, the `rust_eh_personality` symbol
//! the prebuilt `core` references, the `mem*` functions `core` calls, a bump allocator for `alloc`
//! (tdp-core keeps its memslots and root list in `Vec`s), and the Bochs shutdown.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

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

/// The prebuilt `core` is compiled with unwinding and references this symbol; with `panic = "abort"` it
/// is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// The prebuilt `alloc` has landing pads that resume unwinding; with `panic = "abort"` none is ever
/// reached, but the symbol must exist.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::println!("TDP-PANIC unwinding resumed under panic = abort");
    shutdown()
}

/// Copies `n` bytes from `src` to `dest`; the regions must not overlap.
///
/// # Safety
/// `src` must be valid for `n` reads and `dest` for `n` writes (the C contract; `core` guarantees it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep movsb` copies forward, which non-overlapping regions allow.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the regions may overlap.
///
/// # Safety
/// As [`memcpy`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize) + n {
        // SAFETY: a forward copy reads each byte before any write reaches it in this case.
        return unsafe { memcpy(dest, src, n) };
    }
    for i in (0..n).rev() {
        // SAFETY: `i < n`, and the caller guarantees both regions span `n` bytes.
        unsafe { *dest.add(i) = *src.add(i) };
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` spans `n` bytes. The cast keeps the low byte, as C's does.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
            options(nostack, preserves_flags));
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

/// Bytes of heap: the MMU's bookkeeping and the result's sets take a few tens of KiB.
const HEAP_SIZE: usize = 2 * 1024 * 1024;

#[repr(C, align(4096))]
struct Heap(UnsafeCell<[u8; HEAP_SIZE]>);
// SAFETY: bytes are reached only through pointers `Bump::alloc` hands out, each range once.
unsafe impl Sync for Heap {}
static HEAP: Heap = Heap(UnsafeCell::new([0; HEAP_SIZE]));

/// A bump allocator over [`HEAP`]: memory is never reused, which a run of a few seconds affords.
struct Bump {
    next: AtomicUsize,
}

#[global_allocator]
static ALLOCATOR: Bump = Bump { next: AtomicUsize::new(0) };

// SAFETY: `alloc` returns null or a fresh range of `layout.size()` bytes inside `HEAP` aligned to
// `layout.align()` that no earlier call returned; `dealloc` does nothing, which GlobalAlloc allows.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = HEAP.0.get().cast::<u8>();
        // Relaxed: one CPU; the counter only has to hand out each range once.
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base as usize + next).next_multiple_of(layout.align()) - base as usize;
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
