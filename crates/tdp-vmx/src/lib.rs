//! `tdp-vmx`: the bare-metal Intel VMX backend for `tdp-core`.
//!
//! A Rust hypervisor that runs guests under VMX with EPT embeds `tdp-core`'s MMU for its EPT tables and
//! this crate for everything that touches the CPU: the capability MSRs, the EPT pointer, INVEPT and
//! INVVPID, decoding EPT exits into the MMU's fault input, and draining Intel PML into a dirty ring.
//!
//! Map of the modules:
//! - [`instr`]: the instruction trait ([`instr::VmxInstructions`]: RDMSR, VMREAD, VMWRITE, INVEPT,
//!   INVVPID) everything else goes through; [`raw`] has the real x86_64 implementation and is the only
//!   module with `unsafe`; [`fake`] has a software one with MSR values recorded under Bochs.
//! - [`msr`], [`caps`]: capability MSRs decoded into a feature set that picks the EPT options.
//! - [`vmcs`]: field encodings, control bits, VM-instruction errors.
//! - [`eptp`]: the EPT pointer. [`inv`]: INVEPT / INVVPID.
//! - [`exit`]: exit reasons; EPT violations and misconfigurations as [`tdp_core::fault::Fault`]s.
//! - [`scenario`]: the test scenario shared by the Bochs hypervisor and the mock replay.
#![no_std]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod caps;
pub mod eptp;
pub mod exit;
pub mod fake;
pub mod host;
pub mod instr;
pub mod inv;
pub mod msr;
pub mod pml;
pub mod raw;
pub mod ring_sink;
pub mod scenario;
pub mod vmcs;
