//! A VM with logged memslots backed by anonymous memory, for doc examples and tests that need real KVM
//! but no guest code. Not part of the stable API.
//!
//! Keeps: its memory alive for as long as the VM can touch it (fields drop in declaration order: the VM
//! first, then the memory).

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use tdp_core::addr::PAGE_SHIFT;
use tdp_core::dirty_ring::RingConfig;
use tdp_core::memslot::KVM_USER_MEM_SLOTS;

use crate::error::{Errno, Error, Result};
use crate::mapping::Mapping;

/// How [`TestVm`] sets up dirty logging before it registers its slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogSetup {
    /// Slots without `KVM_MEM_LOG_DIRTY_PAGES`.
    NotLogged,
    /// Logged slots, classic get-and-clear bitmap.
    GetAndClear,
    /// Manual protection (no `INITIALLY_SET`), logged slots.
    Manual,
    /// Manual protection with `INITIALLY_SET`, logged slots: every page starts dirty.
    ManualInitiallySet,
    /// A dirty ring of this many entries, logged slots.
    Ring(u32),
}

/// A VM with memslots `(id, guest base, pages)` of anonymous memory.
#[derive(Debug)]
pub struct TestVm {
    /// The VM (declared first: dropped before the memory it maps).
    pub vm: VmFd,
    /// The KVM handle.
    pub kvm: Kvm,
    /// The ring geometry, for [`LogSetup::Ring`].
    pub ring: Option<RingConfig>,
    mem: Vec<Mapping>,
}

impl TestVm {
    /// Builds the VM, or prints `SKIPPED: <why>` to stderr and returns `None` when `/dev/kvm` cannot be
    /// opened (or, for [`LogSetup::Ring`], offers no ring).
    ///
    /// # Errors
    /// Any failure after KVM was opened.
    pub fn new_or_skip(slots: &[(u16, u64, u64)], setup: LogSetup) -> Result<Option<TestVm>> {
        let kvm = match crate::open_kvm() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return Ok(None);
            }
        };
        let vm = kvm.create_vm().map_err(|e| Error::Os { op: "KVM_CREATE_VM", errno: Errno(e.errno()) })?;
        let mut ring = None;
        match setup {
            LogSetup::NotLogged | LogSetup::GetAndClear => {}
            LogSetup::Manual => crate::enable_manual_protect(&vm, false)?,
            LogSetup::ManualInitiallySet => crate::enable_manual_protect(&vm, true)?,
            LogSetup::Ring(entries) => match crate::enable_dirty_ring(&vm, entries) {
                Ok((_, cfg)) => ring = Some(cfg),
                Err(Error::NoDirtyRing) => {
                    eprintln!("SKIPPED: {}", Error::NoDirtyRing);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            },
        }
        let mut t = TestVm { vm, kvm, ring, mem: Vec::new() };
        let flags = if setup == LogSetup::NotLogged { 0 } else { KVM_MEM_LOG_DIRTY_PAGES };
        for &(id, base, pages) in slots {
            crate::fd::check_slot("KVM_SET_USER_MEMORY_REGION", u32::from(id), KVM_USER_MEM_SLOTS)?;
            let bytes = usize::try_from(pages << PAGE_SHIFT)
                .map_err(|_| Error::Mmap { what: "test guest memory", errno: Errno(libc::ENOMEM) })?;
            // `with_guard` maps `bytes` usable bytes; the guard page after them is never given to KVM.
            let map = Mapping::with_guard(bytes, "test guest memory")?;
            let region = kvm_userspace_memory_region {
                slot: u32::from(id),
                flags,
                guest_phys_addr: base,
                memory_size: pages << PAGE_SHIFT,
                userspace_addr: map.as_ptr() as u64,
            };
            // SAFETY: the region's host range is `bytes` bytes of our own anonymous mapping, which `t` keeps
            // alive until after the VM fd is closed (field order); nothing else uses that memory.
            unsafe { t.vm.set_user_memory_region(region) }
                .map_err(|e| Error::Ioctl { ioctl: "KVM_SET_USER_MEMORY_REGION", errno: Errno(e.errno()) })?;
            t.mem.push(map);
        }
        Ok(Some(t))
    }

    /// The VM's fd, for the fd API ([`crate::fd`]).
    #[must_use]
    pub fn vm_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        crate::sys::borrow(&self.vm)
    }

    /// The host memory of the `i`-th slot given to [`TestVm::new_or_skip`], writable.
    pub fn memory_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let map = self.mem.get(i)?;
        let len = map.len() - crate::sys::page_size();
        // SAFETY: the first `len` bytes of the mapping are read-write memory we own (the rest is the guard
        // page); `&mut self` makes this the only Rust view. The VM may also access it, as guest memory is
        // shared with the guest by design; no vCPU runs in a `TestVm`.
        Some(unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), len) })
    }
}
