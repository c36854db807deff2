//! The dirty ring of the guest's one vCPU: a tdp-core [`DirtyRingProducer`] fed by the fault path (the
//! MMU's `DirtySink` calls) and by the PML drain, and its consumer, which the harvest hypercall empties.
//!
//! PML (Intel SDM Vol. 3C, "Page-Modification Logging"): the CPU writes the GPA of every write that sets
//! an EPT leaf's D bit into the 4 KiB log at PML_ADDRESS, at GUEST_PML_INDEX, which counts down from 511;
//! it exits (reason 62) when it would log with the index outside 0..=511. [`drain_pml`] runs at every
//! exit, before the exit is handled (KVM's `vmx_flush_pml_buffer` in `vmx_handle_exit`): it marks each
//! GPA of a dirty-logged slot and resets the index.

use tdp_core::addr::{Gfn, RingSlot};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingProducer, PML_ENTRIES, RingConfig};
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::Memslot;
use tdp_core::mmu::Mmu;
use tdp_vmx::scenario::AS_ID;

use crate::boot::Page;
use crate::host::HvHost;
use crate::raw::{self, VmxFail, field};

/// Entries of the ring: the smallest KVM allows with a PML reserve.
pub const RING_ENTRIES: usize = 1024;

/// The ring's memory.
pub static RING: [DirtyGfn; RING_ENTRIES] = [const { DirtyGfn::zeroed() }; RING_ENTRIES];

/// The ring's geometry.
pub fn config() -> Result<RingConfig, tdp_core::dirty_ring::RingError> {
    RingConfig::new(RING_ENTRIES as u32, PML_ENTRIES)
}

/// The producer as the MMU's dirty sink, counting what a full ring refused.
pub struct RingSink {
    /// The producer.
    pub producer: DirtyRingProducer<'static>,
    /// Marks refused because the ring was full.
    pub lost: u64,
    /// Pushes that reached the soft limit (the vCPU would have to exit to have the ring harvested).
    pub soft_full: u64,
}

impl DirtySink for RingSink {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: DirtySource) {
        match self.producer.push(RingSlot::new(slot.as_id, slot.id), slot.offset_of(gfn)) {
            Ok(outcome) if outcome.is_soft_full() => self.soft_full += 1,
            Ok(_) => {}
            Err(_) => self.lost += 1,
        }
    }
}

/// Index value that means "the log is empty" (the CPU logs at 511 first).
pub const PML_EMPTY_INDEX: u64 = 511;

/// Drains the PML log into `sink` and resets its index; returns how many GPAs it marked.
///
/// # Errors
/// A failed VMREAD / VMWRITE of the index.
pub fn drain_pml(log: &Page, mmu: &Mmu<HvHost>, sink: &mut RingSink) -> Result<u64, VmxFail> {
    let index = raw::vmread(field::GUEST_PML_INDEX)? & 0xffff;
    // After logging entry 0 the index wraps to 0xffff: the whole log is valid.
    let first = if index >= 512 { 0 } else { index as usize + 1 };
    if first == 512 {
        return Ok(0);
    }
    // SAFETY: the log page is the kernel's static; the CPU writes it only while the guest runs.
    let log: &[u64; 512] = unsafe { &*log.0.get() };
    let entries = &log[first..];
    let shared = mmu.read();
    let mut marked = 0;
    for &gpa in entries {
        let gfn = Gfn(gpa >> 12);
        if let Some(slot) = shared.memslots().find(AS_ID, gfn).filter(|s| s.is_dirty_logged()) {
            sink.mark_dirty(slot, gfn, DirtySource::HardwareLog);
            marked += 1;
        }
    }
    drop(shared);
    raw::vmwrite(field::GUEST_PML_INDEX, PML_EMPTY_INDEX)?;
    Ok(marked)
}
