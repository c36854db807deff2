//! KVM's per-memslot dirty bitmap: one bit per page, set by vCPUs, harvested by the VMM with KVM's two
//! semantics.
//!
//! - **Get-and-clear** (classic `KVM_GET_DIRTY_LOG`, [`DirtyBitmap::get_and_clear`]): every word is
//!   exchanged with 0, copied out, and its set bits are handed to a re-protect callback (the MMU's
//!   `kvm_arch_mmu_enable_log_dirty_pt_masked`); one TLB flush is owed at the end.
//! - **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): [`DirtyBitmap::get`] only copies, and
//!   [`DirtyBitmap::clear`] (`KVM_CLEAR_DIRTY_LOG`) clears and re-protects exactly the pages that are set
//!   both in the caller's mask and in the bitmap, with KVM's argument rules: `first_page` a multiple of 64;
//!   `num_pages` a multiple of 64 unless the range ends at the slot's end; the range inside the slot.
//!   With `KVM_DIRTY_LOG_INITIALLY_SET` the bitmap starts with every page set ([`DirtyBitmap::new`]).
//!
//! Which semantics a VM uses, and whether it uses the bitmap at all rather than the dirty ring, is a
//! [`DirtyTrackingMode`]; [`DirtyBitmap::get_log`] and [`DirtyBitmap::clear_log`] apply it the way KVM's
//! two ioctls do.
//!
//! Keeps: I4 (no mark is lost: a bit set before a harvest starts is reported by it, one set during a
//! harvest by it or by the next, and each set bit by exactly one harvest) and I5 (every caller-supplied
//! range, length and buffer is checked before anything changes; a bad request leaves the bitmap as it
//! was and returns an error carrying the values; bits past the slot's last page are never set, so they
//! are never reported or re-protected).
//!
//! # Memory ordering
//! Completeness needs only the atomicity of read-modify-writes: a mark (`fetch_or`) and a harvest's
//! exchange (or `fetch_and`) on the same word are totally ordered, so the mark lands either before the
//! exchange (reported now) or after it (the bit stays set for the next harvest); `Relaxed` would keep I4.
//! The orderings used are stronger for one reason: a software writer (device emulation writing guest
//! memory, then marking the page, as KVM's `kvm_write_guest` does) must have its data visible to the
//! harvester that sees its bit, so marks are `Release` and harvests `Acquire`. For guest writes through
//! the MMU the bit is set *before* the write can happen (the fault path marks, then makes the SPTE
//! writable), so their data is ordered by the re-protect and the TLB flush the harvest returns, not by
//! these orderings. On x86 every one of these operations is a `lock`-prefixed instruction whatever the
//! ordering, so the stronger orderings cost nothing there.

mod error;
mod mode;

use alloc::boxed::Box;
use alloc::vec::Vec;

pub use error::BitmapError;
pub use mode::{DirtyTrackingMode, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};

use crate::flush::Flush;
use crate::sync::{AtomicU64, Ordering};

/// Pages per bitmap word, and the alignment `KVM_CLEAR_DIRTY_LOG` demands of `first_page`.
pub const PAGES_PER_WORD: u64 = 64;

/// Words needed for a bitmap (or a clear mask) of `pages` pages: KVM's
/// `ALIGN(npages, BITS_PER_LONG) / 8` bytes, in 64-bit words.
///
/// ```
/// use tdp_core::dirty_bitmap::words_for;
/// assert_eq!((words_for(0), words_for(1), words_for(64), words_for(1000)), (0, 1, 1, 16));
/// ```
#[must_use]
#[inline]
pub const fn words_for(pages: u64) -> u64 {
    pages.div_ceil(PAGES_PER_WORD)
}

/// The set bits of a bitmap in KVM's layout (bit `i % 64` of word `i / 64` is page `i`) as page offsets,
/// ascending: how a harvested copy, from [`DirtyBitmap::get`] or `KVM_GET_DIRTY_LOG`, becomes pages.
///
/// ```
/// use tdp_core::dirty_bitmap::dirty_offsets;
/// let words = [0b1010, 0, 1 << 63];
/// assert_eq!(dirty_offsets(&words).collect::<Vec<_>>(), [1, 3, 191]);
/// ```
pub fn dirty_offsets(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let base = w as u64 * PAGES_PER_WORD;
        let mut rest = word;
        core::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let bit = u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            Some(base + bit)
        })
    })
}

/// The dirty bitmap of one memslot: bit `i` of word `w` is page `64 * w + i` of the slot.
///
/// vCPUs [`mark`](DirtyBitmap::mark) concurrently through a shared reference; harvests take a shared
/// reference too and may race marks and each other (each set bit goes to exactly one harvest). Bits at
/// or past [`pages`](DirtyBitmap::pages) are never set.
///
/// Re-protect callbacks receive `(base_offset, mask)`: bit `i` of `mask` is page `base_offset + i` of the
/// slot, `base_offset` is a multiple of 64 and every set bit is below `pages`. They return the TLB flush
/// their change needs (the MMU's `reprotect_dirty` does) and must not flush themselves: the harvest
/// merges the requests and returns one [`Flush`], as KVM flushes once after the loop.
///
/// ```
/// use tdp_core::dirty_bitmap::DirtyBitmap;
/// use tdp_core::flush::Flush;
///
/// let bitmap = DirtyBitmap::new(100, false)?;
/// assert!(bitmap.mark(3)?); // newly dirty
/// assert!(!bitmap.mark(3)?); // already dirty
/// bitmap.mark(70)?;
///
/// let mut out = vec![0u64; bitmap.words()];
/// let mut reprotected = Vec::new();
/// let flush = bitmap.get_and_clear(&mut out, |base, mask| {
///     reprotected.push((base, mask));
///     Flush::none() // a real MMU returns what its write-protection needs
/// })?;
/// flush.ignore(); // nothing was mapped in this example
/// assert_eq!(out, [1 << 3, 1 << 6]);
/// assert_eq!(reprotected, [(0, 1 << 3), (64, 1 << 6)]);
/// assert!(!bitmap.is_dirty(3), "reported, then cleared");
/// # Ok::<(), tdp_core::dirty_bitmap::BitmapError>(())
/// ```
pub struct DirtyBitmap {
    pages: u64,
    words: Box<[AtomicU64]>,
}

impl core::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DirtyBitmap").field("pages", &self.pages).finish_non_exhaustive()
    }
}

impl DirtyBitmap {
    /// A bitmap for a slot of `pages` pages, clean, or with every page dirty when `initially_set`
    /// (`KVM_DIRTY_LOG_INITIALLY_SET`, see [`DirtyTrackingMode::initially_set`]).
    ///
    /// With `initially_set`, turn the slot's logging on with
    /// [`SlotFlags::LOG_INITIALLY_SET`](crate::memslot::SlotFlags::LOG_INITIALLY_SET) (see
    /// [`SlotFlags::logging`](crate::memslot::SlotFlags::logging)): the MMU then skips the write-protect
    /// pass, as KVM does, since every page already counts as dirty, and the pages of each range are
    /// split (huge leaves) and protected lazily, 64 at a time, when [`clear`](DirtyBitmap::clear)
    /// re-protects them through the MMU's `reprotect_dirty`. Without that flag the MMU protects the
    /// whole slot at once, which is correct too, only slower.
    ///
    /// # Errors
    /// [`BitmapError::NoMemory`] if the words cannot be allocated; nothing is allocated then.
    pub fn new(pages: u64, initially_set: bool) -> Result<Self, BitmapError> {
        let no_memory = BitmapError::NoMemory { pages };
        let n = usize::try_from(words_for(pages)).map_err(|_| no_memory)?;
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| no_memory)?;
        words.extend((0..n).map(|w| AtomicU64::new(if initially_set { valid_bits(pages, w) } else { 0 })));
        Ok(DirtyBitmap { pages, words: words.into_boxed_slice() })
    }

    /// The slot's size in pages.
    #[must_use]
    #[inline]
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// Words in the bitmap: the size of the buffer [`get`](DirtyBitmap::get) and
    /// [`get_and_clear`](DirtyBitmap::get_and_clear) fill.
    #[must_use]
    #[inline]
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Marks page `offset` of the slot dirty (KVM's `mark_page_dirty_in_slot`) and says whether it was
    /// clean before. Safe to call from any number of vCPUs at once.
    ///
    /// # Errors
    /// [`BitmapError::OffsetOutOfRange`] if `offset >= pages`; nothing changes.
    #[inline]
    pub fn mark(&self, offset: u64) -> Result<bool, BitmapError> {
        let out_of_range = BitmapError::OffsetOutOfRange { offset, pages: self.pages };
        if offset >= self.pages {
            return Err(out_of_range);
        }
        let word = self.word(offset / PAGES_PER_WORD).ok_or(out_of_range)?;
        let bit = 1u64 << (offset % PAGES_PER_WORD);
        // Release: publishes what this thread wrote to the page before marking it; pairs with the
        // Acquire exchange / fetch_and / load of the harvest that reports the bit. Atomicity alone
        // guarantees the bit is not lost (see the module documentation).
        Ok(word.fetch_or(bit, Ordering::Release) & bit == 0)
    }

    /// Whether page `offset` is marked dirty now (false outside the slot). A snapshot for tests and
    /// statistics: it orders nothing.
    #[must_use]
    #[inline]
    pub fn is_dirty(&self, offset: u64) -> bool {
        offset < self.pages
            && self.word(offset / PAGES_PER_WORD).is_some_and(|word| {
                // Relaxed: a snapshot; the caller learns a bit's value, not the data behind it.
                word.load(Ordering::Relaxed) & (1 << (offset % PAGES_PER_WORD)) != 0
            })
    }

    /// Copies the bitmap to `out` without clearing anything (`KVM_GET_DIRTY_LOG` with manual protect)
    /// and returns how many pages were dirty. Only the first [`words`](DirtyBitmap::words) words of
    /// `out` are written. No flush is owed: nothing was re-protected.
    ///
    /// # Errors
    /// [`BitmapError::ShortBuffer`] if `out` has fewer words than the bitmap; `out` is untouched.
    pub fn get(&self, out: &mut [u64]) -> Result<u64, BitmapError> {
        let out = self.out_buffer(out)?;
        let mut dirty = 0;
        for (dst, word) in out.iter_mut().zip(self.words.iter()) {
            // Acquire: pairs with the Release `fetch_or` of `mark`, so the pages reported here show what
            // their writers wrote before marking them.
            *dst = word.load(Ordering::Acquire);
            dirty += u64::from(dst.count_ones());
        }
        Ok(dirty)
    }

    /// Classic `KVM_GET_DIRTY_LOG`: for each word, exchanges it with 0, copies the old value to `out` and
    /// hands its set bits to `reprotect`. Only the first [`words`](DirtyBitmap::words) words of `out` are
    /// written.
    ///
    /// Returns the merged flush of every `reprotect` call. The caller owes it before it reads the
    /// reported pages, so that any later guest write faults and marks the page again.
    ///
    /// # Errors
    /// [`BitmapError::ShortBuffer`] if `out` has fewer words than the bitmap; nothing is cleared or
    /// re-protected and `out` is untouched.
    pub fn get_and_clear(
        &self,
        out: &mut [u64],
        mut reprotect: impl FnMut(u64, u64) -> Flush,
    ) -> Result<Flush, BitmapError> {
        let out = self.out_buffer(out)?;
        let mut flush = Flush::none();
        for (w, (dst, word)) in out.iter_mut().zip(self.words.iter()).enumerate() {
            // Relaxed: only skips clean words, as KVM does. A bit this load misses was set after the
            // harvest reached its word (a mark that happens-before the harvest is seen, by coherence),
            // and it stays set for the next harvest.
            if word.load(Ordering::Relaxed) == 0 {
                *dst = 0;
                continue;
            }
            // Acquire: pairs with the Release `fetch_or` of `mark` (see `get`). The exchange is the point
            // where each bit is taken exactly once: a racing mark is ordered before it (reported now) or
            // after it (left for the next harvest).
            let mask = word.swap(0, Ordering::Acquire);
            *dst = mask;
            if mask != 0 {
                flush = flush.merge(reprotect(w as u64 * PAGES_PER_WORD, mask));
            }
        }
        Ok(flush)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears the pages `first_page + i` whose bit `i` is set in `user_mask`
    /// (bit `i % 64` of word `i / 64`) and in the bitmap, and hands exactly those to `reprotect`.
    ///
    /// KVM's rules, checked in KVM's order before anything changes: `first_page` is a multiple of 64;
    /// `first_page + num_pages <= pages` (no overflow); `num_pages` is a multiple of 64 unless
    /// `first_page + num_pages == pages` (the end-of-slot exception, for slots whose size is not a
    /// multiple of 64); `user_mask` has at least `ceil(num_pages / 64)` words (extra words are ignored).
    /// `num_pages == 0` clears nothing. Mask bits past the slot's end select pages that are never dirty.
    ///
    /// Returns the merged flush of every `reprotect` call, which the caller owes before it reads the
    /// cleared pages. Works in any bitmap mode, as in KVM; it is useful with manual protect.
    ///
    /// ```
    /// use tdp_core::dirty_bitmap::{BitmapError, DirtyBitmap};
    /// use tdp_core::flush::Flush;
    ///
    /// let bitmap = DirtyBitmap::new(1000, true)?; // initially set: every page dirty
    /// // The last 40 pages: allowed although 40 is not a multiple of 64, because the range ends the slot.
    /// let flush = bitmap.clear(960, 40, &[u64::MAX], |base, mask| {
    ///     assert_eq!((base, mask), (960, (1 << 40) - 1));
    ///     Flush::none()
    /// })?;
    /// flush.ignore(); // nothing was mapped in this example
    /// assert!(!bitmap.is_dirty(999) && bitmap.is_dirty(959));
    /// assert_eq!(
    ///     bitmap.clear(0, 40, &[u64::MAX], |_, _| Flush::none()),
    ///     Err(BitmapError::BadLength { first_page: 0, num_pages: 40, pages: 1000 })
    /// );
    /// # Ok::<(), BitmapError>(())
    /// ```
    ///
    /// # Errors
    /// [`BitmapError::Misaligned`], [`BitmapError::OutOfRange`], [`BitmapError::BadLength`] or
    /// [`BitmapError::ShortMask`], checked in that order; nothing is cleared or re-protected.
    pub fn clear(
        &self,
        first_page: u64,
        num_pages: u32,
        user_mask: &[u64],
        mut reprotect: impl FnMut(u64, u64) -> Flush,
    ) -> Result<Flush, BitmapError> {
        let words = self.clear_range(first_page, num_pages, user_mask)?;
        let mut flush = Flush::none();
        let mut base = first_page;
        for (word, &mask) in words.iter().zip(user_mask) {
            if mask != 0 {
                // Acquire: pairs with the Release `fetch_or` of `mark` (see `get`). KVM's
                // `mask &= atomic_long_fetch_andnot(mask, p)`: only bits that were set are re-protected.
                let cleared = mask & word.fetch_and(!mask, Ordering::Acquire);
                if cleared != 0 {
                    flush = flush.merge(reprotect(base, cleared));
                }
            }
            base += PAGES_PER_WORD;
        }
        Ok(flush)
    }

    /// `KVM_GET_DIRTY_LOG` in `mode`: refused on a ring VM, copy-only with manual protect, else
    /// [`get_and_clear`](DirtyBitmap::get_and_clear).
    ///
    /// ```
    /// use tdp_core::dirty_bitmap::{BitmapError, DirtyBitmap, DirtyTrackingMode};
    /// use tdp_core::flush::Flush;
    ///
    /// let bitmap = DirtyBitmap::new(64, false)?;
    /// bitmap.mark(5)?;
    /// let mut out = [0u64];
    /// let manual = DirtyTrackingMode::ManualProtect { initially_set: false };
    /// bitmap.get_log(manual, &mut out, |_, _| Flush::none())?.ignore(); // copies only: no flush
    /// assert!(out[0] == 1 << 5 && bitmap.is_dirty(5));
    /// let ring = DirtyTrackingMode::Ring { with_bitmap: false };
    /// assert_eq!(bitmap.get_log(ring, &mut out, |_, _| Flush::none()), Err(BitmapError::NotInBitmapMode));
    /// # Ok::<(), BitmapError>(())
    /// ```
    ///
    /// # Errors
    /// [`BitmapError::NotInBitmapMode`] (checked first, as KVM does), then those of the operation.
    /// Nothing changes on error.
    pub fn get_log(
        &self,
        mode: DirtyTrackingMode,
        out: &mut [u64],
        reprotect: impl FnMut(u64, u64) -> Flush,
    ) -> Result<Flush, BitmapError> {
        mode.check_bitmap_allowed()?;
        if mode.manual_protect() {
            self.get(out)?;
            Ok(Flush::none())
        } else {
            self.get_and_clear(out, reprotect)
        }
    }

    /// `KVM_CLEAR_DIRTY_LOG` in `mode`: refused on a ring VM, else [`clear`](DirtyBitmap::clear).
    ///
    /// # Errors
    /// [`BitmapError::NotInBitmapMode`] (checked first, as KVM does), then those of
    /// [`clear`](DirtyBitmap::clear). Nothing changes on error.
    pub fn clear_log(
        &self,
        mode: DirtyTrackingMode,
        first_page: u64,
        num_pages: u32,
        user_mask: &[u64],
        reprotect: impl FnMut(u64, u64) -> Flush,
    ) -> Result<Flush, BitmapError> {
        mode.check_bitmap_allowed()?;
        self.clear(first_page, num_pages, user_mask, reprotect)
    }

    /// The word that holds page `64 * index`, if any.
    #[inline]
    fn word(&self, index: u64) -> Option<&AtomicU64> {
        self.words.get(usize::try_from(index).ok()?)
    }

    /// The prefix of `out` that a get fills, or the error if `out` is too short.
    fn out_buffer<'a>(&self, out: &'a mut [u64]) -> Result<&'a mut [u64], BitmapError> {
        let have = out.len();
        out.get_mut(..self.words.len())
            .ok_or(BitmapError::ShortBuffer { have, need: self.words.len() as u64 })
    }

    /// Checks a clear request against KVM's rules and returns the bitmap words it covers.
    fn clear_range(
        &self,
        first_page: u64,
        num_pages: u32,
        user_mask: &[u64],
    ) -> Result<&[AtomicU64], BitmapError> {
        let pages = self.pages;
        if !first_page.is_multiple_of(PAGES_PER_WORD) {
            return Err(BitmapError::Misaligned { first_page });
        }
        // KVM: `first_page > npages || num_pages > npages - first_page`, which cannot overflow.
        let out_of_range = BitmapError::OutOfRange { first_page, num_pages, pages };
        let room = pages.checked_sub(first_page).ok_or(out_of_range)?;
        if u64::from(num_pages) > room {
            return Err(out_of_range);
        }
        if u64::from(num_pages) < room && !u64::from(num_pages).is_multiple_of(PAGES_PER_WORD) {
            return Err(BitmapError::BadLength { first_page, num_pages, pages });
        }
        let need = words_for(u64::from(num_pages));
        if (user_mask.len() as u64) < need {
            return Err(BitmapError::ShortMask { have: user_mask.len(), need });
        }
        // In range by the checks above: first_page / 64 + need <= words_for(pages). `get` keeps this
        // panic-free even if that reasoning were wrong.
        let start = usize::try_from(first_page / PAGES_PER_WORD).map_err(|_| out_of_range)?;
        let len = usize::try_from(need).map_err(|_| out_of_range)?;
        self.words.get(start..start.checked_add(len).ok_or(out_of_range)?).ok_or(out_of_range)
    }
}

/// The bits of word `w` that name pages of a slot of `pages` pages: all 64, or fewer in the last word.
fn valid_bits(pages: u64, w: usize) -> u64 {
    let first = w as u64 * PAGES_PER_WORD;
    match pages.saturating_sub(first) {
        n if n >= PAGES_PER_WORD => u64::MAX,
        n => (1u64 << n) - 1,
    }
}
