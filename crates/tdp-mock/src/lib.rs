//! `tdp-mock`: a software model of the hardware and host under `tdp-core`, to run the whole MMU
//! deterministically in tests and doc examples.
//!
//! Map of the modules:
//! - [`host`]: [`MockHost`], which implements every `tdp-core` host trait: a table-page arena with
//!   poisoning and RCU-like deferred free (I2), guest RAM and host translation, TLB-flush fan-out.
//! - [`walker`]: the hardware page walker, decoding raw EPT / NPT entries with its own constants
//!   transcribed from the Intel SDM and AMD APM, independent of `tdp_core::spte` (I1, I2).
//! - [`pml`]: Intel Page-Modification Logging, the per-vCPU log the walker fills when a write sets an
//!   EPT dirty flag (I4 at the hardware level).
//! - [`tlb`]: a vCPU's TLB, the state the I3 checker audits; an entry serves writes only while it
//!   remembers the leaf's dirty flag as set.
//! - [`vcpu`] and [`machine`]: simulated vCPUs running the hardware loop (TLB, walk, exit, fault
//!   handler) on a shared `Mmu<MockHost>`.
//! - [`checker`]: the invariant checkers `check_tables` (I2), `check_translations` (I1),
//!   `check_tlbs` (I3) and `DirtyShadow` (I4: every page changed since a harvest is in the next one).
#![forbid(unsafe_code)]

pub mod checker;
pub mod host;
pub mod machine;
pub mod pml;
pub mod tlb;
pub mod vcpu;
pub mod walker;

pub use checker::{
    DirtyShadow, TableReport, Violation, check_mirror, check_tables, check_tlbs, check_translations,
    check_write_tracking,
};
pub use host::{
    AllocStats, ExternalEntry, ExternalMisuse, FlushStats, GUEST_RAM_BASE_PFN, HostConfig, HostInvalidation,
    HostMmuError, HostMmuStats, InvalidationHook, MockHost, POISON, PageState, TABLE_BASE_PFN, TraceCounts,
    TranslateHook,
};
pub use machine::Machine;
pub use pml::{Pml, PmlStats};
pub use tlb::{TLB_CAPACITY, Tlb, TlbEntry};
pub use vcpu::{AccessResult, Vcpu, VcpuError};
pub use walker::{AccessWalk, Hardware, WalkMode, WalkOutcome, walk, walk_access};

/// Locks `m`, ignoring poisoning: a test thread that panicked must not hide the state from the checkers.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
