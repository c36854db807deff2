//! The dirty ring of the guest's one vCPU: its memory and the page-modification log page.
//!
//! The producer side is `tdp_vmx::ring_sink::RingSink`: the MMU's fault path marks pages into it (it is
//! the `DirtySink` of every fault), and so does `tdp_vmx::pml::Pml::drain`, which the run loop calls at
//! every exit before handling it (KVM's `vmx_flush_pml_buffer` in `vmx_handle_exit`). The harvest
//! hypercall empties the consumer side, then resets the ring against the MMU
//! (`crate::host_steps::harvest`), which re-protects what was harvested.

use tdp_core::dirty_ring::{DirtyGfn, PML_ENTRIES, RingConfig, RingError};
use tdp_vmx::pml::PmlPage;

/// Entries of the ring: room for the scenario's largest harvest (560 pages) below the soft limit
/// (2048 - 64 - 512 = 1472), so the vCPU never has to exit for a full ring.
pub const RING_ENTRIES: usize = 2048;

/// The ring's memory.
pub static RING: [DirtyGfn; RING_ENTRIES] = [const { DirtyGfn::zeroed() }; RING_ENTRIES];

/// The page-modification log (4 KiB-aligned, identity-mapped).
pub static PML_PAGE: PmlPage = PmlPage::new();

/// The ring's geometry: [`RING_ENTRIES`] with a reserve for a full PML log.
///
/// # Errors
/// As [`RingConfig::new`].
pub fn config() -> Result<RingConfig, RingError> {
    RingConfig::new(RING_ENTRIES as u32, PML_ENTRIES)
}
