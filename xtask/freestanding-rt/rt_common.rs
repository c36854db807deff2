//! The runtime pieces every libc-free static binary of this repository brings the same way: the `mem*`
//! functions `core` calls (memcpy, memmove, memset, memcmp, bcmp), the `rust_eh_personality` symbol the
//! prebuilt `core` references, and a bump allocator for `alloc`.
//!
//! One file, included by both such binaries with `#[path = ...] mod rt_common;` from their `rt` module:
//! the Bochs kernel (`examples/bochs-hv`) and the no_std proof (`xtask/nostd-proof`). It is not a crate
//! on purpose: its `#[no_mangle]` symbols must never reach a std binary, and as a module it is
//! formatted and linted (`-D warnings`) by each includer's own `cargo fmt` and `cargo clippy` runs in
//! `cargo xtask ci`. What differs between the two (entry, exit, output, panic message, heap size) stays
//! in each `rt.rs`.
//!
//! Nothing here may call a `mem*` function through a loop LLVM could turn back into that call: the
//! includers are `#![no_builtins]` crates for this reason.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

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
    // SAFETY: the caller's contract; `rep movsb` copies forward (the ABI keeps the direction flag clear
    // at every call), which non-overlapping regions allow.
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
    // Backward, for the same reason now that `dest` overlaps `src` from above.
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

/// A bump allocator over `SIZE` bytes of its own: `alloc` carves the next aligned range, `dealloc`
/// forgets it. Memory is never reused, which suits binaries that run for seconds and stop.
///
/// Page-aligned, and all zero when created, so a `static` of it lands in `.bss`.
#[repr(C, align(4096))]
pub struct Bump<const SIZE: usize> {
    /// The heap's bytes, first so that they start page-aligned.
    heap: UnsafeCell<[u8; SIZE]>,
    /// Bytes of `heap` handed out so far.
    next: AtomicUsize,
}

impl<const SIZE: usize> Bump<SIZE> {
    /// An allocator with nothing handed out, for a `#[global_allocator] static`.
    pub const fn new() -> Self {
        Self { heap: UnsafeCell::new([0; SIZE]), next: AtomicUsize::new(0) }
    }
}

// SAFETY: the heap's bytes are only reached through pointers `alloc` hands out, each range exactly once
// (the compare-exchange claims it and the offset only grows), so no two users share a byte.
unsafe impl<const SIZE: usize> Sync for Bump<SIZE> {}

// SAFETY: `alloc` returns either null or a range of `layout.size()` bytes inside `heap`, aligned to
// `layout.align()`, that no earlier call returned (the compare-exchange claims it); `dealloc` does nothing,
// which GlobalAlloc allows.
unsafe impl<const SIZE: usize> GlobalAlloc for Bump<SIZE> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.heap.get().cast::<u8>();
        // Relaxed: the counter orders no other memory; it only has to hand out each range once.
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base as usize + next).next_multiple_of(layout.align()) - base as usize;
            let Some(end) = start.checked_add(layout.size()).filter(|&end| end <= SIZE) else {
                return core::ptr::null_mut();
            };
            match self.next.compare_exchange_weak(next, end, Ordering::Relaxed, Ordering::Relaxed) {
                // SAFETY: `start + size <= SIZE`, so the result stays inside `heap`.
                Ok(_) => return unsafe { base.add(start) },
                Err(seen) => next = seen,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}
