//! The must-fail variant (`--features broken-ept`): right after the core started dirty logging on a
//! slot, the hypervisor itself sets W (and D when EPT A/D is on) again on every present leaf of the
//! slot, undoing the write protection (or the D clearing PML relies on) behind the core's back, then
//! invalidates the TLB so the corrupted entries take effect. Guest writes then escape the dirty log and
//! the harvest checks must fail; `cargo xtask bochs` requires that they do.

use alloc::format;
use alloc::string::String;

use tdp_core::addr::{Pfn, SlotId};
use tdp_core::host::TableMemory;
use tdp_core::mmu::{Mmu, RootRef};
use tdp_core::sync::Ordering;
use tdp_vmx::caps::EptFeatures;
use tdp_vmx::eptp::Eptp;
use tdp_vmx::instr::VmxInstructions;
use tdp_vmx::inv::invept_context;
use tdp_vmx::raw::X86Vmx;
use tdp_vmx::scenario::AS_ID;
use tdp_vmx::vmcs::VmcsField;

use crate::host::HvHost;

const EPT_RWX: u64 = 0b111;
const EPT_W: u64 = 1 << 1;
const EPT_PS: u64 = 1 << 7;
const EPT_D: u64 = 1 << 9;
const EPT_ADDR: u64 = 0x000f_ffff_ffff_f000;

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
    let ad = mmu.format().has_accessed_dirty();
    let (base, pages) = {
        let shared = mmu.read();
        let s =
            shared.memslots().get(AS_ID, slot).ok_or_else(|| format!("broken-ept: no slot {}", slot.0))?;
        (s.base_gfn.0, s.pages)
    };
    let bits = EPT_W | if ad { EPT_D } else { 0 };
    let host = mmu.host();
    let mut changed = 0;
    let mut gfn = base;
    while gfn < base + pages {
        let mut table = root.pfn().0;
        let mut step = 1;
        for level in (1..=4u32).rev() {
            let shift = 9 * (level - 1);
            let entry = &host.table(Pfn(table))[((gfn >> shift) & 511) as usize];
            let value = entry.load(Ordering::Relaxed);
            if value & EPT_RWX == 0 {
                step = 1 << shift;
                break;
            }
            if level == 1 || value & EPT_PS != 0 {
                entry.fetch_or(bits, Ordering::Relaxed);
                changed += 1;
                step = 1 << shift;
                break;
            }
            table = (value & EPT_ADDR) >> 12;
        }
        gfn = (gfn & !(step - 1)) + step;
    }
    let eptp = vmx.vmread(VmcsField::EPT_POINTER).map_err(|e| format!("{e}"))?;
    let eptp = Eptp::from_raw(eptp).map_err(|e| format!("{e}"))?;
    invept_context(vmx, features, eptp).map_err(|e| format!("broken-ept INVEPT: {e}"))?;
    Ok(changed)
}
