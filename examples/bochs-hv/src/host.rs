//! tdp-core's host for this hypervisor: `tdp_vmx::host::BareMetalHost` over the kernel's physical
//! layout. EPT table pages come from the pool `TABLE_POOL_START..TABLE_POOL_END` (identity-mapped RAM
//! nothing else uses), guest frames are translated over guest RAM (`GUEST_HOST_BASE..RAM_END`, which the
//! kernel maps with 2 MiB pages, with the pages the host moved found in their new frames), and every flush the core asks for is a single-context INVEPT of the
//! guest's EPTP (counted: the result compares requests with INVEPTs issued).

use alloc::format;
use alloc::string::String;

use tdp_core::addr::{Level, Pfn};
use tdp_core::sync::Ordering;
use tdp_vmx::caps::EptFeatures;
use tdp_vmx::host::{BareMetalHost, IdentityTranslate, InveptFlush, MovedPage, PhysRange, TableFrames};
use tdp_vmx::raw::{IdentityRegion, X86Vmx};

use tdp_metal::scenario::REMAP_POOL_PAGES;

use crate::layout::{GUEST_HOST_BASE, RAM_END, TABLE_POOL_END, TABLE_POOL_START};

/// The MMU's host: table pages from the pool, guest RAM translation, INVEPT through `&X86Vmx`.
pub type HvHost<'v> = BareMetalHost<'static, 'static, &'v X86Vmx>;

/// Guest RAM, for host translation.
static GUEST_RAM: [PhysRange; 1] = [PhysRange { start: GUEST_HOST_BASE, end: RAM_END }];

/// The pages the host moved to another frame (the scenario's remap steps), one entry per pool frame.
static MOVED: [MovedPage; REMAP_POOL_PAGES as usize] =
    [const { MovedPage::new() }; REMAP_POOL_PAGES as usize];

/// The host, built once.
///
/// # Errors
/// When the frame allocator cannot be set up.
pub fn new<'v>(vmx: &'v X86Vmx, features: &EptFeatures) -> Result<HvHost<'v>, String> {
    let pages = (TABLE_POOL_END - TABLE_POOL_START) >> 12;
    // The pool is RAM below RAM_END, identity-mapped by the boot page tables (the first GiB), 4 KiB-aligned.
    // SAFETY: and used by nothing else: the kernel image ends below it (checked in `hypervise`), guest
    // RAM starts above it (see `layout`), and `new` is called once.
    let region = unsafe { IdentityRegion::from_raw(TABLE_POOL_START, pages) };
    Ok(BareMetalHost {
        frames: TableFrames::new(region).map_err(|e| format!("EPT table pool: {e}"))?,
        translate: IdentityTranslate::new(&GUEST_RAM, Level::L2).with_moved_pages(&MOVED),
        tlb: InveptFlush::new(vmx, features.invept),
    })
}

/// Entry `index` of table page `pfn`, or 0 when `pfn` is not a pool page (a corrupted entry points
/// anywhere): for decoding translations after the run.
pub fn read_entry(host: &HvHost<'_>, pfn: u64, index: usize) -> u64 {
    host.frames.region().table(Pfn(pfn)).map_or(0, |t| t[index % 512].load(Ordering::Relaxed))
}
