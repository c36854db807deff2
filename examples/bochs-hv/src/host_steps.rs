//! The scenario's host-side steps under Bochs: aging a range (`Step::Age`) and moving a page to another
//! host frame (`Step::Remap`), each asked for by a hypercall that names its step. The `broken-age`
//! build ages without clearing; the `broken-remap` build moves the page without the MMU notifier.

use alloc::format;

use tdp_core::addr::Gfn;
use tdp_core::host::TlbFlush;
use tdp_vmx::scenario::{AS_ID, REMAP_POOL_OFFSET, Step};

use crate::layout::host_addr;
use crate::run::{Hv, Stop};

impl Hv<'_, '_> {
    /// The step the guest's hypercall names.
    fn step(&self, index: u64) -> Result<(usize, Step), Stop> {
        let at = usize::try_from(index).ok().filter(|&i| i < self.scenario.steps.len());
        let at =
            at.ok_or_else(|| Stop::Error(format!("hypercall names step {index}, which does not exist")))?;
        Ok((at, self.scenario.steps[at]))
    }

    /// `Step::Age`: ages the range one gfn at a time and records the young ones, then flushes so the
    /// next access walks the tables (the core's aging never flushes). The `broken-age` build only tests.
    pub(crate) fn age(&mut self, index: u64) -> Result<(), Stop> {
        let (_, Step::Age { gpa, pages }) = self.step(index)? else {
            return Err(Stop::Error(format!("hypercall age names step {index}, which is no age")));
        };
        let first = gpa.gfn().0;
        let young = (first..first.saturating_add(pages))
            .filter(|&g| {
                let (start, end) = (Gfn(g), Gfn(g + 1));
                if cfg!(feature = "broken-age") {
                    self.mmu.test_age_gfn_range(AS_ID, start, end)
                } else {
                    self.mmu.age_gfn_range(AS_ID, start, end)
                }
            })
            .collect();
        self.mmu.host().flush_all();
        self.seen.young.push(young);
        Ok(())
    }

    /// `Step::Remap`: the host moves the page to the next frame of the remap pool, as Linux migrates a
    /// page: invalidation start over the page's 2 MiB host block (the core zaps and flushes), copy,
    /// the old frame freed (zeroed here), the new frame recorded, invalidation end. The `broken-remap`
    /// build moves it without the start and end.
    pub(crate) fn remap(&mut self, index: u64) -> Result<(), Stop> {
        let (at, Step::Remap { gpa }) = self.step(index)? else {
            return Err(Stop::Error(format!("hypercall remap names step {index}, which is no remap")));
        };
        let earlier = self.scenario.steps[..at].iter().filter(|s| matches!(s, Step::Remap { .. })).count();
        let from = host_addr(gpa.0 & !0xfff);
        let to = host_addr(REMAP_POOL_OFFSET + earlier as u64 * 4096);
        let notify = !cfg!(feature = "broken-remap");
        let first = gpa.gfn().0 & !511;
        if notify {
            self.mmu
                .write()
                .invalidate_range_start(AS_ID, Gfn(first), Gfn(first + 512))
                .map_err(|e| Stop::Error(format!("remap: {e}")))?;
        }
        // SAFETY: `from` and `to` are distinct 4 KiB pages of guest RAM (the data slot's page and a pool
        // page past every slot, `tdp_vmx::scenario::REMAP_POOL_OFFSET`), identity-mapped, and the guest
        // is stopped at this exit.
        unsafe {
            core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, 4096);
            core::ptr::write_bytes(from as *mut u8, 0, 4096);
        }
        let moved = self.mmu.host().translate.move_page(from, to);
        if notify {
            self.mmu.write().invalidate_range_end().map_err(|e| Stop::Error(format!("remap: {e}")))?;
        }
        moved.map_err(|e| Stop::Error(format!("remap: {e}")))
    }
}
