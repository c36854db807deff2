//! The crate's one `unsafe` module: a physically contiguous, identity-mapped run of table pages
//! ([`IdentityRegion`]) whose pages are handed out as shared references to atomics ([`TablePage`]).
//!
//! Nothing outside this module uses `unsafe` (the crate root denies `unsafe_code` and only this module
//! allows it).
#![allow(unsafe_code)]

use core::marker::PhantomData;

use tdp_core::addr::{PAGE_SHIFT, Pfn};
use tdp_core::host::Table;

/// A 4 KiB page usable as a paging-structure page: 512 atomic entries, 4 KiB-aligned.
#[derive(Debug)]
#[repr(C, align(4096))]
pub struct TablePage(pub Table);

impl TablePage {
    /// A zeroed page.
    #[must_use]
    pub const fn new() -> TablePage {
        TablePage([const { tdp_core::sync::AtomicU64::new(0) }; 512])
    }
}

impl Default for TablePage {
    fn default() -> Self {
        TablePage::new()
    }
}

static_assertions::const_assert_eq!(core::mem::size_of::<TablePage>(), 4096);

/// A physically contiguous run of table pages whose physical address equals its address in the
/// hypervisor's address space (identity mapping), as on a bare-metal hypervisor that maps RAM 1:1.
///
/// ```
/// use tdp_core::addr::Pfn;
/// use tdp_metal::region::{IdentityRegion, TablePage};
/// let mut pages: Vec<TablePage> = (0..4).map(|_| TablePage::new()).collect();
/// let region = IdentityRegion::from_pages(&mut pages);
/// let first = region.base();
/// assert_eq!(region.pages(), 4);
/// assert!(region.table(first.add(3)).is_some());
/// assert!(region.table(first.add(4)).is_none() && region.table(Pfn(0)).is_none());
/// ```
#[derive(Debug)]
pub struct IdentityRegion<'a> {
    base: *const TablePage,
    pages: u64,
    _pages: PhantomData<&'a [TablePage]>,
}

// SAFETY: an IdentityRegion only hands out shared references to `TablePage`s, whose contents are atomics
// (Sync); the pointer is to memory borrowed for 'a (from_pages) or owned by the region's user for
// 'static under from_raw's contract, exactly as a `&'a [TablePage]` would be, which is Send and Sync.
unsafe impl Send for IdentityRegion<'_> {}
// SAFETY: as for Send: the region behaves as a `&'a [TablePage]`, and `[AtomicU64; 512]` is Sync.
unsafe impl Sync for IdentityRegion<'_> {}

impl<'a> IdentityRegion<'a> {
    /// The region formed by `pages`. On an identity-mapped hypervisor the address of each page is its
    /// physical address; in host-side tests the same holds by construction for the software model, since
    /// no hardware reads the pages. The borrow is exclusive: only the region reaches these pages.
    #[must_use]
    pub fn from_pages(pages: &'a mut [TablePage]) -> IdentityRegion<'a> {
        IdentityRegion { base: pages.as_ptr(), pages: pages.len() as u64, _pages: PhantomData }
    }

    /// The region of `pages` pages at physical address `base_hpa`, identity-mapped.
    ///
    /// ```no_run
    /// use tdp_metal::frames::TableFrames;
    /// use tdp_metal::region::IdentityRegion;
    /// // 8 MiB at 64 MiB that the hypervisor's boot memory map reserved for EPT tables.
    /// // SAFETY: the range is RAM, identity-mapped read/write, and nothing else uses it.
    /// let region = unsafe { IdentityRegion::from_raw(0x400_0000, 2048) };
    /// let frames = TableFrames::new(region)?;
    /// # Ok::<(), tdp_metal::frames::FramesError>(())
    /// ```
    ///
    /// # Safety
    /// The caller guarantees, for as long as the region or a reference it returned lives: the range
    /// `base_hpa .. base_hpa + pages * 4096` is RAM, mapped readable and writable at the same virtual
    /// address, 4 KiB-aligned, and used by nothing else (not by the hypervisor's own allocator, not by
    /// a guest).
    #[must_use]
    pub unsafe fn from_raw(base_hpa: u64, pages: u64) -> IdentityRegion<'static> {
        IdentityRegion { base: base_hpa as usize as *const TablePage, pages, _pages: PhantomData }
    }

    /// The first frame.
    #[must_use]
    pub fn base(&self) -> Pfn {
        Pfn(self.base as usize as u64 >> PAGE_SHIFT)
    }

    /// Pages in the region.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether `pfn` lies in the region.
    #[must_use]
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn.0.checked_sub(self.base().0).is_some_and(|i| i < self.pages)
    }

    /// The page at frame `pfn`, or `None` outside the region.
    #[must_use]
    pub fn table(&self, pfn: Pfn) -> Option<&'a Table> {
        let index = pfn.0.checked_sub(self.base().0).filter(|&i| i < self.pages)?;
        // SAFETY: index < pages, so the pointer stays inside the region (from_pages: a live slice of
        // `pages` TablePages borrowed for 'a; from_raw: the caller's guarantee that the range is mapped
        // RAM for the region's life). Only shared references to atomics are created, so concurrent
        // users (and the CPU's page walker) never alias a `&mut`.
        let page = unsafe { &*self.base.add(index as usize) };
        Some(&page.0)
    }
}
