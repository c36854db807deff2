//! KVM's dirty ring and dirty bitmap (with `KVM_CLEAR_DIRTY_LOG`) for Rust VMMs, on any `kvm-ioctls`.
//!
//! `kvm-ioctls` offers `get_dirty_log` only: no `KVM_CLEAR_DIRTY_LOG`, no dirty ring. This crate adds them
//! on plain file descriptors ([`fd`]: `AsFd`, with its own copy of the few KVM ABI structs in [`abi`]), so
//! a VMM keeps whatever `kvm-ioctls` version it pins; with the default feature `kvm-ioctls` the same
//! operations also take that crate's (0.25) `VmFd` / `VcpuFd` at the crate root.
//!
//! - [`fd::enable_dirty_ring`], [`DirtyRing`] (a vCPU's mapped ring, harvested with `tdp-core`'s
//!   consumer), [`fd::reset_dirty_rings`];
//! - [`fd::get_dirty_log`] into a reusable [`DirtyLogBuffer`], [`fd::enable_manual_protect`],
//!   [`fd::clear_dirty_log`] of a [`ClearRange`];
//! - [`DirtyTracker`]: one tracker over every mode ([`TrackingMode`]: ring, ring with bitmap, get-and-clear,
//!   clear-log, clear-log chunk by chunk), usable from vCPU threads and a migration thread, returning
//!   per-slot [`DirtySets`] (as offsets, `(gpa, len)` ranges, words or 64-page chunks) and per-vCPU dirty
//!   rates; VMM and device writes through [`VmmBitmap`] (vm-memory's `Bitmap` with the `vm-memory`
//!   feature) and external logs are merged in;
//! - [`RingFullHandler`]: `KVM_EXIT_DIRTY_RING_FULL` in the VMM's own run loop (harvest, reset, throttle
//!   hook); `VcpuRunner` (feature `kvm-ioctls`) runs a `kvm-ioctls` vCPU with it;
//! - [`DirtyEpochs`]: dirty pages since a snapshot checkpoint, kept until committed (`serde` with the
//!   feature of that name).
//!
//! # Wiring it into a VMM
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
//! use kvm_ioctls::VcpuExit;
//! use tdp_kvm::{DirtyTracker, Error, SlotSpec, VcpuRunner};
//!
//! let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
//! let vm = kvm.create_vm()?;
//!
//! // 1. Choose the mode before creating vCPUs: the ring if offered, else the clear-log bitmap.
//! let tracker = match DirtyTracker::with_ring(&vm, 4096) {
//!     Ok(t) => t,
//!     Err(Error::NoDirtyRing) => DirtyTracker::with_clear_log(&vm, true)?,
//!     Err(e) => return Err(e.into()),
//! };
//! let tracker = Arc::new(tracker);
//!
//! // 2. Guest memory, registered with KVM_MEM_LOG_DIRTY_PAGES, and with the tracker.
//! let mem_size = 1 << 20;
//! let mem = vec![0u8; mem_size + 4096];
//! let host = (mem.as_ptr() as u64 + 4095) & !4095; // page-aligned
//! let region = kvm_userspace_memory_region {
//!     slot: 0, flags: KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr: 0, memory_size: mem_size as u64, userspace_addr: host,
//! };
//! // SAFETY: `mem` outlives `vm` in this example (declared before it is dropped), and nothing else uses it.
//! unsafe { vm.set_user_memory_region(region)? };
//! tracker.register_slot(SlotSpec::from_region(region.slot, region.guest_phys_addr, region.memory_size))?;
//!
//! // 3. vCPUs: attach each (maps its ring), run it through a VcpuRunner on its own thread.
//! let mut vcpu = vm.create_vcpu(0)?;
//! let handle = tracker.attach_vcpu(&vcpu)?;
//! let t = Arc::clone(&tracker);
//! let vcpu_thread = std::thread::spawn(move || -> Result<(), Error> {
//!     let mut runner = VcpuRunner::new(&t, handle);
//!     vcpu.set_kvm_immediate_exit(1); // this example has no guest code: return at once
//!     match runner.run(&mut vcpu, |exit| matches!(exit, VcpuExit::Hlt)) {
//!         Err(e) if e.is_interrupted() => Ok(()), // a VMM would handle its request and loop
//!         Err(e) => Err(e),
//!         Ok(_) => Ok(()),
//!     }
//! });
//!
//! // 4. The migration thread: collect, send, repeat; give pages back if a round fails.
//! let round = tracker.collect()?; // pages are re-protected before we read them
//! for slot in round.iter() {
//!     for gpa in slot.gpas() { let _ = gpa; /* read and send the page */ }
//! }
//! if false { tracker.restore(&round)?; } // a failed send reports them again
//! let rate = tracker.stats()?.rate_since(&tracker.stats()?);
//! println!("{} pages/s", rate.pages_per_sec);
//! vcpu_thread.join().map_err(|_| "vcpu thread panicked")??;
//! # drop(vm); drop(mem);
//! # Ok(()) }
//! ```
//!
//! Keeps: I4 (nothing harvested is dropped: collects, ring-full exits and failed rounds all end in a
//! result or the pending set) and I5 (ring entries are validated against the slots; every ioctl argument
//! is checked first; the kernel never writes outside memory we own).

#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod abi;
mod bitmap;
mod caps;
mod epochs;
mod error;
pub mod fd;
mod mapping;
mod ring;
mod ring_full;
#[cfg(feature = "kvm-ioctls")]
mod run;
mod sys;
#[cfg(feature = "kvm-ioctls")]
pub mod testing;
mod tracker;
#[cfg(feature = "kvm-ioctls")]
mod vmfd;
mod vmm_bitmap;

pub use bitmap::{ClearRange, DirtyLogBuffer};
pub use caps::{KVM_PATH, RingCap, RingSupport, check_ring_size, check_ring_size_reserving};
pub use epochs::DirtyEpochs;
pub use error::{Errno, Error, Result};
pub use ring::DirtyRing;
pub use ring_full::{KVM_EXIT_DIRTY_RING_FULL, RingFullEvent, RingFullHandler, Throttle, is_ring_full_exit};
#[cfg(feature = "kvm-ioctls")]
pub use run::VcpuRunner;
pub use tracker::{
    DirtyRate, DirtySets, DirtyTracker, MAX_SLOT_PAGES, SlotDirty, SlotSpec, TrackerStats, TrackingMode,
    VcpuHandle, VcpuRate, VcpuStats, X86_PAGE_SIZE,
};
#[cfg(feature = "kvm-ioctls")]
pub use vmfd::{
    clear_dirty_log, enable_dirty_ring, enable_manual_protect, get_dirty_log, max_memslots, open_kvm,
    open_kvm_at, probe_dirty_ring, probe_manual_protect, reset_dirty_rings,
};
pub use vmm_bitmap::VmmBitmap;

#[cfg(test)]
mod tests {
    /// The tracker is shared by vCPU threads and a migration thread; rings, buffers and runners move to
    /// the threads that use them. A change that loses one of these bounds fails to compile here.
    #[test]
    fn shared_types_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<crate::DirtyTracker>();
        send_sync::<crate::DirtySets>();
        send::<crate::DirtyRing>();
        send::<crate::DirtyLogBuffer>();
        #[cfg(feature = "kvm-ioctls")]
        send::<crate::VcpuRunner<'static>>();
        send::<crate::RingFullHandler<'static>>();
        send_sync::<crate::Error>();
    }
}
