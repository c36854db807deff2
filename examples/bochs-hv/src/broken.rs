//! The must-fail variant (`--features broken-ept`): right after the core started dirty logging on a
//! slot, the hypervisor itself sets W (and D when EPT A/D is on) again on every present leaf of the
//! slot (`tdp_metal::scenario::unprotect_leaves`), undoing the write protection (or the D clearing PML
//! relies on) behind the core's back, then invalidates the TLB so the corrupted entries take effect.
//! Guest writes then escape the dirty log and the harvest checks must fail; `cargo xtask bochs` requires
//! that they do.

use alloc::format;
use alloc::string::String;

use tdp_core::addr::{Pfn, SlotId};
use tdp_core::mmu::{Mmu, RootRef};
use tdp_metal::scenario::{AS_ID, Paging, unprotect_leaves};
use tdp_vmx::caps::EptFeatures;
use tdp_vmx::eptp::Eptp;
use tdp_vmx::inv::invept_context;
use tdp_vmx::raw::X86Vmx;

use crate::host::HvHost;

/// Sets W (and D with A/D) on every present leaf mapping slot `slot`; returns the leaves changed.
///
/// # Errors
/// The slot does not exist, or the INVEPT fails.
pub fn unprotect_slot(
    vmx: &X86Vmx,
    features: &EptFeatures,
    mmu: &Mmu<HvHost<'_>>,
    root: &RootRef,
    slot: SlotId,
) -> Result<u64, String> {
    let (base, pages) = {
        let shared = mmu.read();
        let s =
            shared.memslots().get(AS_ID, slot).ok_or_else(|| format!("broken-ept: no slot {}", slot.0))?;
        (s.base_gfn.0, s.pages)
    };
    let frames = mmu.host().frames.region();
    let ad = mmu.format().has_accessed_dirty();
    let changed = unprotect_leaves(Paging::Ept, |pfn| frames.table(Pfn(pfn)), root.pfn().0, base, pages, ad);
    let eptp = Eptp::new(features, mmu.config(), root.pfn()).map_err(|e| format!("broken-ept: {e}"))?;
    invept_context(vmx, features, eptp).map_err(|e| format!("broken-ept INVEPT: {e}"))?;
    Ok(changed)
}
