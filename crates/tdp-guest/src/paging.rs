//! The guest's 4-level page tables, built by the host into the code slot before any vCPU runs.
//!
//! The guest runs only at CPL3, so every entry on every level has the U/S bit (a user-mode access needs
//! U/S=1 on all levels, SDM Vol. 3A §4.6 "Access Rights"). Accessed and Dirty are preset on every entry so
//! the CPU (and, on a shadow-paging host, KVM emulating it) never has to write them back: the guest's
//! only writes are its own data writes. The mapping is the identity: the code slot's fixed pages at
//! 4 KiB (the guard page at 0 stays unmapped, the program page is read-only), the data slot with 2 MiB
//! pages and one 4 KiB table for a last partial 2 MiB region, so an access one page past the slot's end
//! faults instead of reaching unbacked memory.

use crate::layout::{
    CODE_PAGE, CONTROL_PAGE, DATA_GPA, GDT_PAGE, LOW_PD_PAGE, LOW_PT_PAGE, Layout, PAGE_SIZE, PDPT_PAGE,
    PML4_PAGE, STACK_PAGE,
};

/// Present (bit 0). Intel SDM Vol. 3A §4.5, tables "Format of a PML4 Entry", "... PDPTE ...", "Format of a
/// Page-Directory Entry ...", "Format of a Page-Table Entry that Maps a 4-KByte Page" (all levels).
pub const PTE_P: u64 = 1 << 0;
/// Read/write (bit 1): writes allowed through this entry (same tables).
pub const PTE_RW: u64 = 1 << 1;
/// User/supervisor (bit 2): CPL3 accesses allowed through this entry (same tables).
pub const PTE_US: u64 = 1 << 2;
/// Accessed (bit 5), preset so the CPU never writes it (same tables).
pub const PTE_A: u64 = 1 << 5;
/// Dirty (bit 6) of a leaf, preset so the CPU never writes it (tables for 2 MiB PDEs and 4 KiB PTEs).
pub const PTE_D: u64 = 1 << 6;
/// Page size (bit 7) of a PDE: the entry maps a 2 MiB page ("Format of a Page-Directory Entry that Maps a
/// 2-MByte Page").
pub const PTE_PS: u64 = 1 << 7;
/// Physical-address bits 12..51 of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Flags of a non-leaf entry: present, writable, user, accessed.
pub const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;
/// Flags of a writable user leaf (data pages, the control page, the stack).
pub const USER_RW_LEAF: u64 = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;
/// Flags of the read-only user leaf that maps the program.
pub const USER_RO_LEAF: u64 = PTE_P | PTE_US | PTE_A | PTE_D;
/// Flags of the supervisor leaf that maps the GDT and TSS (the CPU reads them with supervisor rights).
pub const SUPERVISOR_LEAF: u64 = PTE_P | PTE_RW | PTE_A | PTE_D;

const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Writes every page table into `image`, the code slot viewed as 64-bit words (at least
/// `layout.code_slot_pages * 512` of them, zeroed).
///
/// ```
/// use tdp_guest::paging::{build_page_tables, walk};
/// use tdp_guest::{DATA_GPA, GuestSpec, Layout};
/// let layout = Layout::new(&GuestSpec::new(512 + 3, 1))?;
/// let mut image = vec![0u64; (layout.code_slot_pages * 512) as usize];
/// build_page_tables(&layout, &mut image);
/// let last = DATA_GPA + (512 + 2) * 4096;
/// assert_eq!(walk(&image, last).map(|t| (t.pa, t.writable, t.user)), Some((last, true, true)));
/// assert_eq!(walk(&image, last + 4096), None, "one page past the slot is unmapped");
/// # Ok::<(), tdp_guest::GuestError>(())
/// ```
///
/// # Panics
/// If `image` is shorter than the layout's code slot (a bug in the caller, which sizes it from `layout`).
pub fn build_page_tables(layout: &Layout, image: &mut [u64]) {
    let mut set = |table_gpa: u64, index: u64, value: u64| {
        image[((table_gpa / 8) + index) as usize] = value;
    };
    let gpa = Layout::code_gpa;

    set(gpa(PML4_PAGE), 0, gpa(PDPT_PAGE) | TABLE_FLAGS);
    set(gpa(PDPT_PAGE), 0, gpa(LOW_PD_PAGE) | TABLE_FLAGS);
    set(gpa(LOW_PD_PAGE), 0, gpa(LOW_PT_PAGE) | TABLE_FLAGS);
    for (page, flags) in [
        (GDT_PAGE, SUPERVISOR_LEAF),
        (CONTROL_PAGE, USER_RW_LEAF),
        (CODE_PAGE, USER_RO_LEAF),
        (STACK_PAGE, USER_RW_LEAF),
    ] {
        set(gpa(LOW_PT_PAGE), page, gpa(page) | flags);
    }

    let data_end = DATA_GPA + layout.data_slot_bytes();
    for pd in 0..layout.data_pds {
        let pd_base = DATA_GPA + pd * ONE_GIB;
        set(gpa(PDPT_PAGE), pd_base / ONE_GIB, layout.data_pd_gpa(pd) | TABLE_FLAGS);
        for i in 0..512 {
            let start = pd_base + i * TWO_MIB;
            if start + TWO_MIB <= data_end {
                set(layout.data_pd_gpa(pd), i, start | USER_RW_LEAF | PTE_PS);
            } else if start < data_end {
                // The last, partial 2 MiB region: map exactly the pages that exist.
                if let Some(pt) = layout.tail_pt_gpa() {
                    set(layout.data_pd_gpa(pd), i, pt | TABLE_FLAGS);
                    for j in 0..(data_end - start) / PAGE_SIZE {
                        set(pt, j, (start + j * PAGE_SIZE) | USER_RW_LEAF);
                    }
                }
            }
        }
    }
}

/// What a walk of the tables found for one virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address.
    pub pa: u64,
    /// Writable on every level.
    pub writable: bool,
    /// User-accessible on every level.
    pub user: bool,
}

/// Walks `image`'s tables (rooted at the PML4 page) for `va` the way the CPU does, for tests and
/// diagnostics. Returns `None` when some level is not present or a table lies outside `image`.
#[must_use]
pub fn walk(image: &[u64], va: u64) -> Option<Translation> {
    let mut table = Layout::code_gpa(PML4_PAGE);
    let (mut writable, mut user) = (true, true);
    for level in (1..=4u32).rev() {
        let index = (va >> (12 + 9 * (level - 1))) & 511;
        let entry = *image.get(((table / 8) + index) as usize)?;
        if entry & PTE_P == 0 {
            return None;
        }
        writable &= entry & PTE_RW != 0;
        user &= entry & PTE_US != 0;
        let base = entry & PTE_ADDR_MASK;
        if level == 1 || (level == 2 && entry & PTE_PS != 0) {
            let offset_bits = 12 + 9 * (level - 1);
            let pa = base | (va & ((1 << offset_bits) - 1));
            return Some(Translation { pa, writable, user });
        }
        table = base;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GuestSpec;

    fn built(data_pages: u64) -> (Layout, Vec<u64>) {
        let layout = Layout::new(&GuestSpec::new(data_pages, 1)).unwrap_or_else(|e| panic!("{e}"));
        let mut image = vec![0u64; (layout.code_slot_pages * 512) as usize];
        build_page_tables(&layout, &mut image);
        (layout, image)
    }

    #[test]
    fn bits_match_the_sdm_entry_formats() {
        assert_eq!((PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS), (1, 2, 4, 0x20, 0x40, 0x80));
        assert_eq!(TABLE_FLAGS, 0x27);
        assert_eq!(USER_RW_LEAF, 0x67);
        assert_eq!(USER_RO_LEAF, 0x65);
        assert_eq!(SUPERVISOR_LEAF, 0x63);
    }

    #[test]
    fn every_level_has_the_user_bit_and_identity_maps_data() {
        let (layout, image) = built((1 << 18) + 3);
        let pml4e = image[(Layout::code_gpa(PML4_PAGE) / 8) as usize];
        assert_eq!(pml4e, Layout::code_gpa(PDPT_PAGE) | 0x27);
        let pdpte = image[(Layout::code_gpa(PDPT_PAGE) / 8 + 4) as usize];
        assert_eq!(pdpte, layout.data_pd_gpa(0) | 0x27, "PDPT[4] covers 4 GiB");
        let pde = image[(layout.data_pd_gpa(0) / 8) as usize];
        assert_eq!(pde, DATA_GPA | 0xe7, "2 MiB leaf: P|RW|US|A|D|PS");
        for page in [0, 1, 511, 512, (1 << 18) - 1, 1 << 18, (1 << 18) + 2] {
            let va = DATA_GPA + page * PAGE_SIZE + 8;
            assert_eq!(walk(&image, va), Some(Translation { pa: va, writable: true, user: true }), "{page}");
        }
        // One page past the end is unmapped; so is the 2 MiB region after it.
        assert_eq!(walk(&image, DATA_GPA + ((1 << 18) + 3) * PAGE_SIZE), None);
        assert_eq!(walk(&image, DATA_GPA + (1 << 30) + TWO_MIB), None);
    }

    #[test]
    fn fixed_pages_have_their_rights() {
        let (_, image) = built(64);
        assert_eq!(walk(&image, 0), None, "guard page");
        let t = |page| walk(&image, Layout::code_gpa(page));
        assert_eq!(t(CODE_PAGE).map(|t| (t.writable, t.user)), Some((false, true)));
        assert_eq!(t(CONTROL_PAGE).map(|t| (t.writable, t.user)), Some((true, true)));
        assert_eq!(t(GDT_PAGE).map(|t| (t.writable, t.user)), Some((true, false)));
        assert_eq!(t(PML4_PAGE), None, "page tables are not mapped");
        assert_eq!(walk(&image, DATA_GPA + 64 * PAGE_SIZE), None);
    }

    #[test]
    fn whole_two_mib_regions_need_no_tail_table() {
        let (layout, image) = built(1024);
        assert_eq!(layout.tail_pt_gpa(), None);
        assert_eq!(
            walk(&image, DATA_GPA + 1023 * PAGE_SIZE).map(|t| t.pa),
            Some(DATA_GPA + 1023 * PAGE_SIZE)
        );
        assert_eq!(walk(&image, DATA_GPA + 1024 * PAGE_SIZE), None);
    }
}
