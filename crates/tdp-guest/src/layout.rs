//! Where everything lives in guest-physical memory, and the guest spec it is computed from.
//!
//! The VM has two memslots. Slot 0 (the *code slot*, never dirty-logged) starts at guest-physical 0 and
//! holds, one 4 KiB page each: an unmapped guard page, the GDT and TSS, the control page the host talks
//! to the guest through, the guest program, a stack page, and then the page tables. Slot 1 (the *data
//! slot*) starts at [`DATA_GPA`] (4 GiB, so it is 1 GiB aligned and one PDPT entry covers each GiB) and
//! holds any number of pages; it is what tests and tools dirty-log. The guest sees memory identity-mapped
//! (virtual address = physical address).

use crate::error::{GuestError, Result};
use crate::program::{CTL_VCPU_BLOCK_SIZE, CTL_VCPU_BLOCKS};

/// Size of a guest page (x86 4 KiB page).
pub const PAGE_SIZE: u64 = 4096;
/// Memslot id of the code/control slot (never dirty-logged).
pub const CODE_SLOT: u32 = 0;
/// Memslot id of the data slot (the one the guest dirties).
pub const DATA_SLOT: u32 = 1;
/// Guest-physical (and guest-virtual) address of the data slot's first page: 4 GiB.
pub const DATA_GPA: u64 = 1 << 32;
/// The largest data slot: everything between 4 GiB and 512 GiB, the reach of the one PDPT.
pub const MAX_DATA_PAGES: u64 = ((512 - 4) << 30) / PAGE_SIZE;
/// The most vCPUs one control page has room for (a 128-byte header, then 128 bytes per vCPU).
pub const MAX_VCPUS: usize = 31;

/// Page index (within the code slot) of the unmapped guard page at address 0.
pub const GUARD_PAGE: u64 = 0;
/// Page index of the GDT (first half) and TSS (second half).
pub const GDT_PAGE: u64 = 1;
/// Page index of the control page (iteration number, per-vCPU workload blocks).
pub const CONTROL_PAGE: u64 = 2;
/// Page index of the guest program.
pub const CODE_PAGE: u64 = 3;
/// Page index of the stack page (the program uses no stack; RSP points here so it is valid anyway).
pub const STACK_PAGE: u64 = 4;
/// Page index of the PML4.
pub const PML4_PAGE: u64 = 5;
/// Page index of the one PDPT (covers guest-virtual 0..512 GiB).
pub const PDPT_PAGE: u64 = 6;
/// Page index of the page directory for the first GiB (where the code slot is).
pub const LOW_PD_PAGE: u64 = 7;
/// Page index of the page table for the first 2 MiB, which maps the code slot's fixed pages at 4 KiB.
pub const LOW_PT_PAGE: u64 = 8;
/// Page index of the first page directory of the data slot; more follow, one per GiB, then the tail table.
pub const FIRST_DATA_PD_PAGE: u64 = 9;

/// Offset of the TSS within the GDT page.
pub const TSS_OFFSET: u64 = 2048;

/// What VM to build: the data slot's size and the number of vCPUs.
///
/// ```
/// use tdp_guest::GuestSpec;
/// // KVM's dirty_log_test shape, scaled down: 4 MiB + 3 pages, not a multiple of 64 pages.
/// let spec = GuestSpec::new(1024 + 3, 2).with_dirty_logging(true);
/// assert_eq!(spec.data_pages(), 1027);
/// assert!(spec.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    data_pages: u64,
    vcpus: usize,
    log_dirty: bool,
}

impl GuestSpec {
    /// A spec with `data_pages` pages in the data slot and `vcpus` vCPUs, dirty logging off.
    #[must_use]
    pub const fn new(data_pages: u64, vcpus: usize) -> Self {
        Self { data_pages, vcpus, log_dirty: false }
    }

    /// Registers the data slot with `KVM_MEM_LOG_DIRTY_PAGES` from the start (it can be toggled later with
    /// [`GuestVm::set_dirty_logging`](crate::GuestVm::set_dirty_logging)).
    #[must_use]
    pub const fn with_dirty_logging(mut self, on: bool) -> Self {
        self.log_dirty = on;
        self
    }

    /// Pages in the data slot.
    #[must_use]
    pub const fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Number of vCPUs.
    #[must_use]
    pub const fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Whether the data slot starts out dirty-logged.
    #[must_use]
    pub const fn dirty_logging(&self) -> bool {
        self.log_dirty
    }

    /// Checks the spec's limits.
    ///
    /// # Errors
    /// [`GuestError::InvalidSpec`] when the data slot is empty or larger than [`MAX_DATA_PAGES`], or the
    /// vCPU count is 0 or above [`MAX_VCPUS`].
    pub fn validate(&self) -> Result<()> {
        if self.data_pages == 0 || self.data_pages > MAX_DATA_PAGES {
            return Err(GuestError::InvalidSpec {
                what: "data pages must be between 1 and MAX_DATA_PAGES",
                value: self.data_pages,
            });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(GuestError::InvalidSpec {
                what: "vCPU count must be between 1 and MAX_VCPUS",
                value: self.vcpus as u64,
            });
        }
        Ok(())
    }
}

/// The guest-physical layout computed from a [`GuestSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Pages in the data slot.
    pub data_pages: u64,
    /// Page directories for the data slot (one per GiB it touches).
    pub data_pds: u64,
    /// Whether the data slot ends inside a 2 MiB region, which then gets a 4 KiB page table.
    pub has_tail_pt: bool,
    /// Pages in the code slot: the fixed pages plus every page table.
    pub code_slot_pages: u64,
}

impl Layout {
    /// Computes the layout for `spec`.
    ///
    /// ```
    /// use tdp_guest::{GuestSpec, Layout};
    /// // 1 GiB + 3 pages: two page directories, and a 4 KiB table for the last 3 pages.
    /// let l = Layout::new(&GuestSpec::new((1 << 18) + 3, 2))?;
    /// assert_eq!((l.data_pds, l.has_tail_pt), (2, true));
    /// # Ok::<(), tdp_guest::GuestError>(())
    /// ```
    ///
    /// # Errors
    /// The errors of [`GuestSpec::validate`].
    pub fn new(spec: &GuestSpec) -> Result<Self> {
        spec.validate()?;
        let data_pages = spec.data_pages;
        let data_pds = data_pages.div_ceil(512 * 512);
        let has_tail_pt = !data_pages.is_multiple_of(512);
        let code_slot_pages = FIRST_DATA_PD_PAGE + data_pds + u64::from(has_tail_pt);
        Ok(Self { data_pages, data_pds, has_tail_pt, code_slot_pages })
    }

    /// Guest-physical address of code-slot page `page`.
    #[must_use]
    pub const fn code_gpa(page: u64) -> u64 {
        page * PAGE_SIZE
    }

    /// Guest-physical address of the `i`th data page directory.
    #[must_use]
    pub const fn data_pd_gpa(&self, i: u64) -> u64 {
        (FIRST_DATA_PD_PAGE + i) * PAGE_SIZE
    }

    /// Guest-physical address of the tail page table, if the data slot has one.
    #[must_use]
    pub const fn tail_pt_gpa(&self) -> Option<u64> {
        if self.has_tail_pt { Some((FIRST_DATA_PD_PAGE + self.data_pds) * PAGE_SIZE) } else { None }
    }

    /// Size of the code slot in bytes.
    #[must_use]
    pub const fn code_slot_bytes(&self) -> u64 {
        self.code_slot_pages * PAGE_SIZE
    }

    /// Size of the data slot in bytes.
    #[must_use]
    pub const fn data_slot_bytes(&self) -> u64 {
        self.data_pages * PAGE_SIZE
    }
}

/// Byte offset of `offset` within the control page, from the start of the code slot (the code slot
/// starts at guest-physical 0 and is identity-mapped, so this is also the guest address).
pub(crate) const fn control_offset(offset: u64) -> u64 {
    CONTROL_PAGE * PAGE_SIZE + offset
}

/// Guest address of vCPU `index`'s block in the control page.
pub(crate) const fn block_gva(index: usize) -> u64 {
    control_offset(CTL_VCPU_BLOCKS + index as u64 * CTL_VCPU_BLOCK_SIZE)
}

/// Guest address of the control page.
pub(crate) const fn control_gva() -> u64 {
    control_offset(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_tables_for_unaligned_sizes() {
        // 1 GiB + 3 pages (dirty_log_test): two PDs, and a tail table for the 3 pages.
        let l = Layout::new(&GuestSpec::new((1 << 18) + 3, 1)).map_err(|e| e.to_string());
        let l = l.as_ref().map_err(Clone::clone);
        assert_eq!(l.map(|l| (l.data_pds, l.has_tail_pt, l.code_slot_pages)), Ok((2, true, 12)));
        // Exactly 2 MiB: one PD, no tail.
        let l = Layout::new(&GuestSpec::new(512, 1)).map(|l| (l.data_pds, l.has_tail_pt));
        assert_eq!(l.ok(), Some((1, false)));
    }

    #[test]
    fn spec_limits_are_enforced() {
        assert!(GuestSpec::new(0, 1).validate().is_err());
        assert!(GuestSpec::new(MAX_DATA_PAGES + 1, 1).validate().is_err());
        assert!(GuestSpec::new(MAX_DATA_PAGES, 1).validate().is_ok());
        assert!(GuestSpec::new(1, 0).validate().is_err());
        assert!(GuestSpec::new(1, MAX_VCPUS + 1).validate().is_err());
    }
}
