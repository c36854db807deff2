//! `tdp-guest`: real KVM guests that dirty memory, for testing and measuring dirty tracking.
//!
//! A [`GuestVm`] is a KVM VM (on `kvm-ioctls`) whose vCPUs run a small 64-bit program at CPL3 over a
//! *data memslot* of any size. The host sets everything up itself: page tables in guest memory (user
//! bit on every level), a GDT with DPL3 segments, and each vCPU started directly in 64-bit mode at CPL3
//! with IOPL 3 through `KVM_SET_SREGS`/`KVM_SET_REGS`. No CPL0 code runs at all: on shadow-paging hosts
//! (such as PVM) CPL0 guest code is emulated instruction by instruction, which is slow and floods the
//! dirty ring; CPL3 code runs natively. The program is assembled with iced-x86's `CodeAssembler`.
//!
//! The guest loops forever: read the iteration number from the control page, write it at the start of
//! `batch` pages picked by its [`Pattern`] in its range (optionally into every word of the page, and its
//! tag after it), then `OUT` to [`BATCH_DONE_PORT`]. The host decides what happens between batches:
//! continue, sleep ([`Pacer`]), or park every vCPU ([`BatchGate`]) to harvest dirty pages and check page
//! contents against the iteration numbers. Workloads can be changed while vCPUs run (each vCPU's block
//! in the control page is a seqlock, see [`program`]). If the guest ever faults, there is no IDT to catch
//! it: the triple fault comes back as [`GuestError::TripleFault`] with the RIP.
//!
//! Building is in steps because `KVM_CAP_DIRTY_LOG_RING` must be enabled after the VM exists and before
//! any vCPU does: [`GuestVm::new`] → [`GuestVm::vm_fd`] (enable capabilities) → optionally
//! [`GuestVm::set_dirty_logging`] → [`GuestVm::create_vcpus`].
//!
//! Modules: [`layout`] (guest-physical map, [`GuestSpec`]), [`paging`] (page tables), [`gdt`]
//! (descriptors and segment state), [`program`] (the guest code and control page), [`workload`],
//! `vm` / `vcpu` (the KVM objects and exits), `data` (host access to guest pages and counters),
//! [`control`] (pausing and pacing), `memory` (mmap: with memslot registration, the crate's only
//! `unsafe`).
//!
//! ```
//! use tdp_guest::{GuestExit, GuestSpec, GuestVm};
//! let mut vm = match GuestVm::new(GuestSpec::new(512 + 3, 2).with_dirty_logging(true)) {
//!     Ok(vm) => vm,
//!     Err(tdp_guest::GuestError::OpenKvm(e)) => {
//!         eprintln!("SKIPPED: cannot open /dev/kvm: {e}");
//!         return Ok(());
//!     }
//!     Err(e) => return Err(e),
//! };
//! let mut vcpus = vm.create_vcpus()?;
//! for vcpu in &mut vcpus {
//!     assert!(matches!(vcpu.run()?, GuestExit::BatchDone { .. }));
//! }
//! let bitmap = vm.vm_fd().get_dirty_log(vm.data_slot(), (vm.data_pages() * 4096) as usize);
//! let dirty: u32 = bitmap.map(|b| b.iter().map(|w| w.count_ones()).sum()).unwrap_or(0);
//! assert!(dirty > 0, "the guest's first batches dirtied pages");
//! # Ok::<(), tdp_guest::GuestError>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod control;
mod data;
mod error;
pub mod gdt;
pub mod layout;
mod memory;
pub mod paging;
pub mod program;
mod vcpu;
mod vm;
pub mod workload;

pub use control::{BatchGate, Decision, Pacer};
pub use data::VcpuStats;
pub use error::{GuestError, Result};
pub use layout::{CODE_SLOT, DATA_GPA, DATA_SLOT, GuestSpec, Layout, MAX_VCPUS, PAGE_SIZE};
pub use program::BATCH_DONE_PORT;
pub use vcpu::{GuestExit, GuestVcpu, Unexpected, classify_exit};
pub use vm::GuestVm;
pub use workload::{Pattern, Workload};
