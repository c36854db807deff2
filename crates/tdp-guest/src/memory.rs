//! Host mappings of guest memory: anonymous `mmap` regions that back the memslots.
//!
//! This is one of the two places with `unsafe` in the crate (the other is memslot registration). The
//! guest writes these pages concurrently with the host, so the host touches them only through
//! `AtomicU64` loads and stores of aligned words: never a `&[u8]` over memory the guest may change.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{GuestError, Result};

/// An anonymous, private, zero-filled mapping, unmapped on drop.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; every access from `&self` goes through
// `AtomicU64` (sound under concurrent access from other threads and from the guest), and the pointer is
// never handed out as a reference.
unsafe impl Send for MmapRegion {}
// SAFETY: as above: shared access is atomic word access only.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Maps `len` bytes (a multiple of 4096, non-zero) of anonymous memory.
    ///
    /// `MAP_NORESERVE`: a large data slot costs nothing until the guest touches it.
    ///
    /// # Errors
    /// [`GuestError::Mmap`] with the OS error when the kernel refuses the mapping.
    pub fn new(len: usize) -> Result<Self> {
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(GuestError::InvalidSpec {
                what: "mapping length must be whole pages",
                value: len as u64,
            });
        }
        // SAFETY: an anonymous private mapping with a null hint creates new memory and touches no
        // existing mapping; the result is checked against MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(GuestError::Mmap { bytes: len, source: std::io::Error::last_os_error() });
        }
        let ptr = NonNull::new(raw.cast::<u8>())
            .ok_or(GuestError::Mmap { bytes: len, source: std::io::Error::other("mmap returned null") })?;
        Ok(Self { ptr, len })
    }

    /// Host address of the first byte (for `KVM_SET_USER_MEMORY_REGION`).
    #[must_use]
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The word at byte `offset`, or `None` if `offset` is unaligned or out of bounds.
    fn word(&self, offset: u64) -> Option<&AtomicU64> {
        let end = offset.checked_add(8)?;
        if !offset.is_multiple_of(8) || end > self.len as u64 {
            return None;
        }
        // SAFETY: `offset` is 8-aligned and the word lies inside the mapping (checked above), the mapping
        // is page-aligned so the address is 8-aligned, it lives as long as `self`, and all access to it is
        // atomic, so a shared `&AtomicU64` is sound even while the guest writes the same memory.
        Some(unsafe { &*self.ptr.as_ptr().add(offset as usize).cast::<AtomicU64>() })
    }

    /// Loads the u64 at byte `offset` (Acquire: pairs with nothing in the guest, which does plain
    /// stores, but orders this load before the caller's later reads).
    #[must_use]
    pub fn load(&self, offset: u64) -> Option<u64> {
        self.word(offset).map(|w| w.load(Ordering::Acquire))
    }

    /// Stores `value` at byte `offset` (Release: everything the host wrote before is visible to a guest
    /// that reads this word, once KVM_RUN enters it); returns false if out of bounds or unaligned.
    pub fn store(&self, offset: u64, value: u64) -> bool {
        self.word(offset).map(|w| w.store(value, Ordering::Release)).is_some()
    }

    /// Copies `dst.len()` bytes (a multiple of 8) from byte `offset`, word by word; false if out of
    /// bounds.
    pub fn copy_out(&self, offset: u64, dst: &mut [u8]) -> bool {
        if !dst.len().is_multiple_of(8)
            || offset.checked_add(dst.len() as u64).is_none_or(|e| e > self.len as u64)
        {
            return false;
        }
        for (i, chunk) in dst.chunks_exact_mut(8).enumerate() {
            match self.load(offset + 8 * i as u64) {
                Some(v) => chunk.copy_from_slice(&v.to_le_bytes()),
                None => return false,
            }
        }
        true
    }

    /// Copies `src` (a multiple of 8 bytes) to byte `offset`, word by word; false if out of bounds.
    pub fn copy_in(&self, offset: u64, src: &[u8]) -> bool {
        if !src.len().is_multiple_of(8)
            || offset.checked_add(src.len() as u64).is_none_or(|e| e > self.len as u64)
        {
            return false;
        }
        src.chunks_exact(8).enumerate().all(|(i, chunk)| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.store(offset + 8 * i as u64, u64::from_le_bytes(word))
        })
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; no reference into the region outlives
        // `self` (all accessors borrow `self`). A vCPU still holding the memslot would see -EFAULT from
        // KVM, not host memory corruption, but the crate keeps the region alive (Arc) while vCPUs exist.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of guest memory failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_bounds_checked_and_round_trip() {
        let r = MmapRegion::new(8192).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.load(0), Some(0), "anonymous memory is zeroed");
        assert!(r.store(8184, 0xdead_beef));
        assert_eq!(r.load(8184), Some(0xdead_beef));
        assert_eq!(r.load(8192), None);
        assert_eq!(r.load(4), None, "unaligned");
        assert!(!r.store(u64::MAX - 3, 1));
        let mut page = vec![0u8; 4096];
        assert!(r.copy_out(4096, &mut page));
        assert_eq!(&page[4088..], &0xdead_beef_u64.to_le_bytes());
        assert!(!r.copy_out(4097 + 7, &mut page));
        assert!(r.copy_in(0, &page));
        assert_eq!(r.load(4088), Some(0xdead_beef));
        assert!(MmapRegion::new(100).is_err());
    }
}
