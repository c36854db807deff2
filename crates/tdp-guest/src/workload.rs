//! What each vCPU writes: the page-choice pattern, its range within the data slot and the batch size.
//!
//! A [`Workload`] is host-side data; [`crate::GuestVm::set_workload`] validates it against the data slot
//! and copies it into the vCPU's block of the control page, where the guest reads it at the start of its
//! next batch.

use crate::error::{GuestError, Result};

/// How the guest picks the page for each write within its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Pages in order, wrapping at the end of the range (the position persists across batches).
    Sequential,
    /// Uniformly pseudo-random pages (xorshift64).
    Random,
    /// `percent`% of writes go to the first `hot_pages` pages of the range; the rest anywhere in it.
    Hot {
        /// Size of the hot set (1..=range pages).
        hot_pages: u64,
        /// Share of writes aimed at the hot set (0..=100).
        percent: u8,
    },
}

/// One vCPU's workload: a range of data pages, a batch size and a pattern.
///
/// ```
/// use tdp_guest::{Pattern, Workload};
/// let w = Workload::new(0, 1000, 64, Pattern::Hot { hot_pages: 10, percent: 90 }).with_seed(7);
/// assert!(w.validate(0, 1027).is_ok());
/// assert!(w.validate(0, 999).is_err(), "range beyond the data slot");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// First data page (index within the data slot) of the range.
    pub first_page: u64,
    /// Pages in the range.
    pub pages: u64,
    /// Pages written per batch (0: the guest only reports empty batches).
    pub batch: u64,
    /// The page-choice pattern.
    pub pattern: Pattern,
    /// Also write the vCPU's tag (its index) at byte 8 of each page it writes.
    pub write_tag: bool,
    /// Write the iteration number into every word of the page, not just the first (512 stores per page
    /// write instead of one: realistic page contents for migrations, more guest time per page).
    pub fill_page: bool,
    /// Seed of the pseudo-random generator (0 is replaced by a fixed non-zero constant).
    pub seed: u64,
}

impl Workload {
    /// A workload over `pages` pages from `first_page`, `batch` writes per batch, writing the tag too,
    /// with a fixed seed.
    #[must_use]
    pub const fn new(first_page: u64, pages: u64, batch: u64, pattern: Pattern) -> Self {
        Self {
            first_page,
            pages,
            batch,
            pattern,
            write_tag: true,
            fill_page: false,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// The `index`th of `vcpus` equal shares of a `data_pages`-page slot (the last share takes the
    /// remainder), e.g. for vCPUs that should never write the same page.
    #[must_use]
    pub const fn share(data_pages: u64, vcpus: u64, index: u64, batch: u64, pattern: Pattern) -> Self {
        let vcpus = if vcpus == 0 { 1 } else { vcpus };
        let each = data_pages / vcpus;
        let first = each * index;
        let pages = if index + 1 >= vcpus { data_pages.saturating_sub(first) } else { each };
        Self::new(first, pages, batch, pattern)
    }

    /// Sets the generator seed.
    #[must_use]
    pub const fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets whether every word of a written page gets the iteration number.
    #[must_use]
    pub const fn with_fill(mut self, fill_page: bool) -> Self {
        self.fill_page = fill_page;
        self
    }

    /// Sets whether the tag is written after the iteration number.
    #[must_use]
    pub const fn with_tag(mut self, write_tag: bool) -> Self {
        self.write_tag = write_tag;
        self
    }

    /// The seed the guest starts from (never 0, which xorshift cannot leave).
    #[must_use]
    pub const fn effective_seed(&self) -> u64 {
        if self.seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { self.seed }
    }

    /// The hot-set threshold on a draw's top 16 bits: `percent * 65536 / 100`.
    #[must_use]
    pub const fn hot_threshold(percent: u8) -> u64 {
        (percent as u64) * 65536 / 100
    }

    /// Checks the workload against a data slot of `data_pages` pages, for vCPU `vcpu` (named in errors).
    ///
    /// # Errors
    /// [`GuestError::InvalidWorkload`] when the range is empty or leaves the slot, a hot set is empty or
    /// larger than the range, or a percentage is above 100.
    pub fn validate(&self, vcpu: usize, data_pages: u64) -> Result<()> {
        let bad = |what, value| Err(GuestError::InvalidWorkload { vcpu, what, value });
        if self.pages == 0 {
            return bad("range must hold at least one page", 0);
        }
        match self.first_page.checked_add(self.pages) {
            Some(end) if end <= data_pages => {}
            _ => return bad("range ends beyond the data slot", self.first_page.saturating_add(self.pages)),
        }
        if let Pattern::Hot { hot_pages, percent } = self.pattern {
            if hot_pages == 0 || hot_pages > self.pages {
                return bad("hot set must hold 1..=range pages", hot_pages);
            }
            if percent > 100 {
                return bad("hot percentage above 100", u64::from(percent));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_slot_without_overlap() {
        let shares: Vec<Workload> = (0..3).map(|i| Workload::share(1027, 3, i, 8, Pattern::Random)).collect();
        assert_eq!(
            shares.iter().map(|w| (w.first_page, w.pages)).collect::<Vec<_>>(),
            [(0, 342), (342, 342), (684, 343)]
        );
        assert!(shares.iter().all(|w| w.validate(0, 1027).is_ok()));
    }

    #[test]
    fn invalid_workloads_are_refused() {
        assert!(Workload::new(0, 0, 1, Pattern::Random).validate(0, 10).is_err());
        assert!(Workload::new(u64::MAX, 2, 1, Pattern::Random).validate(0, 10).is_err());
        let hot = |hot_pages, percent| Workload::new(0, 10, 1, Pattern::Hot { hot_pages, percent });
        assert!(hot(0, 50).validate(0, 10).is_err());
        assert!(hot(11, 50).validate(0, 10).is_err());
        assert!(hot(10, 101).validate(0, 10).is_err());
        assert!(hot(10, 100).validate(0, 10).is_ok());
        assert_eq!(Workload::hot_threshold(100), 65536);
        assert_eq!(Workload::hot_threshold(0), 0);
        assert_ne!(Workload::new(0, 1, 1, Pattern::Random).with_seed(0).effective_seed(), 0);
    }
}
