//! Reading and writing the guest's memory from the host: data pages (which the guest writes
//! concurrently, so every access is a word-sized atomic) and the counters in the vCPU blocks.

use crate::error::{GuestError, Result};
use crate::layout::PAGE_SIZE;
use crate::program::block;
use crate::vm::GuestVm;

/// Counters the guest keeps in its vCPU block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Batches completed.
    pub batches: u64,
    /// Page writes completed (a page written twice counts twice).
    pub writes: u64,
    /// Batches that wrote nothing because the workload the guest read failed its range check (read
    /// while [`GuestVm::set_workload`] was rewriting it).
    pub skipped: u64,
}

impl GuestVm {
    /// The guest's counters for vCPU `vcpu`.
    ///
    /// # Errors
    /// [`GuestError::NoSuchVcpu`].
    pub fn vcpu_stats(&self, vcpu: usize) -> Result<VcpuStats> {
        let base = self.block(vcpu)?;
        Ok(VcpuStats {
            batches: self.code.load(base + block::BATCHES).unwrap_or(0),
            writes: self.code.load(base + block::WRITES).unwrap_or(0),
            skipped: self.code.load(base + block::SKIPPED).unwrap_or(0),
        })
    }

    /// Word `word` (0..512) of data page `page`.
    ///
    /// # Errors
    /// [`GuestError::PageOutOfRange`] when `page` is beyond the slot or `word` beyond the page.
    pub fn data_word(&self, page: u64, word: u64) -> Result<u64> {
        let out_of_range = GuestError::PageOutOfRange { page, pages: self.layout.data_pages };
        if page >= self.layout.data_pages || word >= PAGE_SIZE / 8 {
            return Err(out_of_range);
        }
        self.data.load(page * PAGE_SIZE + word * 8).ok_or(out_of_range)
    }

    /// The iteration number stored at the start of data page `page` (0 if never written).
    ///
    /// # Errors
    /// [`GuestError::PageOutOfRange`].
    pub fn page_iteration(&self, page: u64) -> Result<u64> {
        self.data_word(page, 0)
    }

    /// The tag stored after the iteration number in data page `page`.
    ///
    /// # Errors
    /// [`GuestError::PageOutOfRange`].
    pub fn page_tag(&self, page: u64) -> Result<u64> {
        self.data_word(page, 1)
    }

    /// Copies data page `page` into `buf` (4096 bytes).
    ///
    /// # Errors
    /// [`GuestError::BadPageBuffer`] or [`GuestError::PageOutOfRange`].
    pub fn copy_data_page(&self, page: u64, buf: &mut [u8]) -> Result<()> {
        self.check_page_io(page, buf.len())?;
        if self.data.copy_out(page * PAGE_SIZE, buf) { Ok(()) } else { Err(self.out_of_range(page)) }
    }

    /// Overwrites data page `page` with `buf` (4096 bytes), e.g. for a migration destination.
    ///
    /// # Errors
    /// [`GuestError::BadPageBuffer`] or [`GuestError::PageOutOfRange`].
    pub fn write_data_page(&self, page: u64, buf: &[u8]) -> Result<()> {
        self.check_page_io(page, buf.len())?;
        if self.data.copy_in(page * PAGE_SIZE, buf) { Ok(()) } else { Err(self.out_of_range(page)) }
    }

    /// Copies code-slot page `page` (page tables, GDT, control page, program) into `buf` (4096 bytes).
    ///
    /// # Errors
    /// [`GuestError::BadPageBuffer`] or [`GuestError::PageOutOfRange`] (with the code slot's size).
    pub fn copy_code_page(&self, page: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() != PAGE_SIZE as usize {
            return Err(GuestError::BadPageBuffer { len: buf.len() });
        }
        let out_of_range = GuestError::PageOutOfRange { page, pages: self.layout.code_slot_pages };
        if page >= self.layout.code_slot_pages {
            return Err(out_of_range);
        }
        if self.code.copy_out(page * PAGE_SIZE, buf) { Ok(()) } else { Err(out_of_range) }
    }

    fn check_page_io(&self, page: u64, len: usize) -> Result<()> {
        if len != PAGE_SIZE as usize {
            return Err(GuestError::BadPageBuffer { len });
        }
        if page >= self.layout.data_pages {
            return Err(self.out_of_range(page));
        }
        Ok(())
    }

    fn out_of_range(&self, page: u64) -> GuestError {
        GuestError::PageOutOfRange { page, pages: self.layout.data_pages }
    }
}
