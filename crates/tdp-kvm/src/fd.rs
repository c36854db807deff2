//! The fd API: everything `tdp-kvm` does to a VM, on file descriptors (`std::os::fd::AsFd`), with no
//! `kvm-ioctls` or `kvm-bindings` type in any signature. A VMM on any `kvm-ioctls` version (or none) uses
//! this module; with the default feature `kvm-ioctls`, the crate root offers the same functions on that
//! crate's `VmFd` / `VcpuFd`.
//!
//! `kvm-ioctls` objects implement `AsRawFd` only. A VMM borrows their fd for a call with
//! `unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }`, whose SAFETY argument is that the `VmFd` owns the
//! fd and outlives the borrow. The tracker keeps its own duplicate of the VM fd; a mapped ring keeps the
//! vCPU file alive by itself.
//!
//! Opening KVM and creating VMs and vCPUs ([`open_kvm`], [`create_vm`], [`create_vcpu`]) are here too, for
//! tests and examples without `kvm-ioctls`; a VMM keeps creating them with its own crate.
//!
//! Keeps: I5 (as the functions it re-exports; the fds are borrowed, never closed or leaked).

use std::os::fd::{AsFd, OwnedFd};

pub use crate::bitmap::{check_slot, clear_dirty_log, get_dirty_log};
pub use crate::caps::{
    enable_dirty_ring, enable_dirty_ring_reserving, enable_manual_protect, enable_ring_with_bitmap,
    max_memslots, probe_dirty_ring, probe_manual_protect,
};
pub use crate::ring::reset_dirty_rings;

use crate::caps::{KVM_PATH, open_error};
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::sys;

/// Opens `/dev/kvm` (read-write, close-on-exec).
///
/// # Errors
/// [`Error::NoKvm`], [`Error::KvmPermissionDenied`], [`Error::Os`].
///
/// ```
/// match tdp_kvm::fd::open_kvm() {
///     Ok(kvm) => drop(kvm),
///     Err(e) => println!("SKIPPED: {e}"),
/// }
/// ```
pub fn open_kvm() -> Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_PATH)
        .map(OwnedFd::from)
        .map_err(|e| open_error(KVM_PATH, e.raw_os_error().unwrap_or(0)))
}

/// `KVM_CREATE_VM` (default machine type) on the KVM fd `kvm`.
///
/// # Errors
/// [`Error::Ioctl`].
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// assert!(tdp_kvm::fd::create_vm(&vm).is_err(), "a VM fd cannot create VMs");
/// # Ok(()) }
/// ```
pub fn create_vm(kvm: impl AsFd) -> Result<OwnedFd> {
    sys::ioctl_new_fd(kvm.as_fd(), sys::KVM_CREATE_VM, 0, "KVM_CREATE_VM")
}

/// `KVM_CREATE_VCPU(id)` on the VM fd `vm`.
///
/// # Errors
/// [`Error::Ioctl`] (`EEXIST` for an id in use).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// let _vcpu = tdp_kvm::fd::create_vcpu(&vm, 0)?;
/// assert!(matches!(tdp_kvm::fd::create_vcpu(&vm, 0), Err(tdp_kvm::Error::Ioctl { errno: tdp_kvm::Errno(libc::EEXIST), .. })));
/// # Ok(()) }
/// ```
pub fn create_vcpu(vm: impl AsFd, id: u32) -> Result<OwnedFd> {
    sys::ioctl_new_fd(vm.as_fd(), sys::KVM_CREATE_VCPU, libc::c_ulong::from(id), "KVM_CREATE_VCPU")
}
