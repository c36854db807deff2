//! Owned memory mappings: the vCPU's dirty ring (shared with KVM) and guard-paged scratch buffers for
//! `KVM_GET_DIRTY_LOG`. Each unmaps itself on drop.
//!
//! Keeps: I5 on our side (a mapping is never unmapped while a reference into it lives: views borrow the
//! owner; the kernel's writes past a dirty-log buffer hit a guard page, never our heap).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::Error;
use crate::sys::{last_errno, page_size};

/// An address range this process mapped and unmaps on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is an owned address range, like a `Box<[u8]>` whose bytes are only reached through
// views the owners build (`&[DirtyGfn]`, made of atomics, or `&[u64]`/`&mut [u64]` borrowed from the owner
// under Rust's usual aliasing rules). Moving the owner to another thread changes nothing about who may
// touch the memory, and `munmap` may be called from any thread.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` gives only the base pointer and length; building a reference from them is the job
// of the owner types, which hand out `&[atomic]` (shareable) or tie `&mut` views to `&mut self`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)`; `what` names it in errors.
    pub(crate) fn shared(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: i64,
        what: &'static str,
    ) -> Result<Self, Error> {
        // SAFETY: a fresh mapping at an address of the kernel's choosing (NULL hint), so no existing memory
        // is replaced; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        Mapping::from_mmap(ptr, len, what)
    }

    /// Anonymous private read-write memory of `len` bytes followed by one inaccessible guard page.
    /// Returns the mapping; bytes `0..len` are usable (zeroed), `len..len + page` fault.
    pub(crate) fn with_guard(len: usize, what: &'static str) -> Result<Self, Error> {
        let page = page_size();
        let total = len.checked_add(page).ok_or(Error::Mmap { what, errno: crate::Errno(libc::ENOMEM) })?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let map = Mapping::from_mmap(ptr, total, what)?;
        // SAFETY: `len` is a multiple of the page size (callers round it) and `len + page == total`, so the
        // range is the last page of the mapping we own; no reference into it exists yet.
        let ret = unsafe { libc::mprotect(map.ptr.as_ptr().add(len).cast(), page, libc::PROT_NONE) };
        if ret != 0 {
            return Err(Error::Mmap { what, errno: last_errno() });
        }
        Ok(map)
    }

    fn from_mmap(ptr: *mut libc::c_void, len: usize, what: &'static str) -> Result<Self, Error> {
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap { what, errno: last_errno() });
        }
        match NonNull::new(ptr.cast::<u8>()) {
            Some(ptr) => Ok(Mapping { ptr, len }),
            None => Err(Error::Mmap { what, errno: crate::Errno(libc::EFAULT) }),
        }
    }

    /// The first byte of the mapping.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped (including a guard page, if any).
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is exactly the range we mapped; views into it borrow their owner, so none
        // outlives this drop. An error (impossible for a range we mapped) would leave the mapping in place,
        // which is a leak, not unsoundness.
        let _ = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
