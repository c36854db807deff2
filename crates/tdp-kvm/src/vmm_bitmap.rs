//! Writes KVM never sees: the VMM's and its devices' own writes into guest memory (virtio queues, block
//! reads, DMA). [`VmmBitmap`] records them page by page with atomics; attached to a tracked slot
//! ([`DirtyTracker::attach_vmm_bitmap`](crate::DirtyTracker::attach_vmm_bitmap)), every collect takes
//! its pages (word by word, atomically swapped with zero) and merges them with KVM's.
//!
//! With the feature `vm-memory` it is vm-memory's `Bitmap` / `NewBitmap` (vm-memory 0.16, what
//! cloud-hypervisor and Firecracker pin), so `GuestMemoryMmap<VmmBitmap>` marks it on every write made
//! through vm-memory. A write is marked after the bytes are stored; a collect that swaps the word first
//! leaves the mark for the next collect, so the page is reported then: late, never lost.
//!
//! Keeps: I4 (a mark is cleared only by the swap that hands it to a collect) and I5 (marks outside the
//! bitmap are ignored, never indexed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tdp_core::dirty_bitmap::PAGES_PER_WORD;

/// The page size of the bitmap (x86-64's 4 KiB).
const PAGE: usize = 4096;

/// A shared, atomic dirty-page bitmap over one guest memory region (bit `i % 64` of word `i / 64` is the
/// region's page `i`, KVM's layout). Clones share the bits; a clone made by `slice_at` (vm-memory)
/// addresses the region from an offset. `Default` is a bitmap of nothing, which ignores every mark.
///
/// ```
/// use tdp_kvm::VmmBitmap;
/// let b = VmmBitmap::new(10 * 4096);
/// b.mark(4096 + 5, 4096); // bytes 4101..8197: pages 1 and 2
/// assert!(!b.is_dirty(0) && b.is_dirty(4096) && b.is_dirty(2 * 4096));
/// assert_eq!(b.pages(), 10);
/// let mut taken = Vec::new();
/// b.take(|word, bits| taken.push((word, bits)));
/// assert_eq!(taken, [(0, 0b110)]);
/// assert!(!b.is_dirty(4096), "taken: clean until the next write");
/// ```
#[derive(Clone, Debug, Default)]
pub struct VmmBitmap {
    inner: Option<Arc<Inner>>,
    /// Byte offset of this view into the region.
    base: usize,
}

#[derive(Debug)]
struct Inner {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl VmmBitmap {
    /// A clean bitmap for a region of `bytes` bytes (rounded up to whole pages).
    #[must_use]
    pub fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE);
        let words = (0..pages.div_ceil(PAGES_PER_WORD as usize)).map(|_| AtomicU64::new(0)).collect();
        VmmBitmap { inner: Some(Arc::new(Inner { words, pages: pages as u64 })), base: 0 }
    }

    /// Pages covered (0 for the default, empty bitmap).
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.pages)
    }

    /// Marks the pages holding bytes `offset .. offset + len` of this view. Bytes past the region are
    /// ignored.
    pub fn mark(&self, offset: usize, len: usize) {
        let Some(inner) = &self.inner else { return };
        if len == 0 {
            return;
        }
        let Some(first) = self.base.checked_add(offset) else { return };
        let last = first.saturating_add(len - 1);
        let (first, last) =
            ((first / PAGE) as u64, ((last / PAGE) as u64).min(inner.pages.saturating_sub(1)));
        for page in first..=last {
            if let Some(w) = inner.words.get((page / PAGES_PER_WORD) as usize) {
                // Release: pairs with the collect's swap (AcqRel), so a collect that sees the mark also
                // sees that the write before it happened (the caller stored the bytes first).
                w.fetch_or(1 << (page % PAGES_PER_WORD), Ordering::Release);
            }
        }
    }

    /// Whether the page holding byte `offset` of this view is marked.
    #[must_use]
    pub fn is_dirty(&self, offset: usize) -> bool {
        let Some(inner) = &self.inner else { return false };
        let Some(byte) = self.base.checked_add(offset) else { return false };
        let page = (byte / PAGE) as u64;
        page < inner.pages
            && inner
                .words
                .get((page / PAGES_PER_WORD) as usize)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % PAGES_PER_WORD)) != 0)
    }

    /// Takes every marked page: each non-zero word is swapped with zero and handed to `f` as (word index,
    /// bits), in ascending order. A mark made during the call lands either in what `f` gets or in the
    /// bitmap for the next take, never nowhere.
    pub fn take(&self, mut f: impl FnMut(usize, u64)) {
        let Some(inner) = &self.inner else { return };
        for (i, w) in inner.words.iter().enumerate() {
            // Relaxed load to skip clean words cheaply; the swap is what synchronises.
            if w.load(Ordering::Relaxed) != 0 {
                // AcqRel: acquires the marks' releases (see `mark`).
                let bits = w.swap(0, Ordering::AcqRel);
                if bits != 0 {
                    f(i, bits);
                }
            }
        }
    }

    /// Whether two bitmaps share the same bits (clones of one another).
    pub(crate) fn same_bits(&self, other: &VmmBitmap) -> bool {
        match (&self.inner, &other.inner) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

#[cfg(feature = "vm-memory")]
mod vm_memory_impl {
    use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
    use vm_memory::mmap::NewBitmap;

    use super::VmmBitmap;

    impl WithBitmapSlice<'_> for VmmBitmap {
        type S = VmmBitmap;
    }

    impl BitmapSlice for VmmBitmap {}

    impl Bitmap for VmmBitmap {
        fn mark_dirty(&self, offset: usize, len: usize) {
            self.mark(offset, len);
        }

        fn dirty_at(&self, offset: usize) -> bool {
            self.is_dirty(offset)
        }

        fn slice_at(&self, offset: usize) -> VmmBitmap {
            VmmBitmap { inner: self.inner.clone(), base: self.base.saturating_add(offset) }
        }
    }

    impl NewBitmap for VmmBitmap {
        fn with_len(len: usize) -> Self {
            VmmBitmap::new(len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::VmmBitmap;

    #[test]
    fn i4_marks_are_taken_once_and_i5_marks_past_the_region_are_ignored() {
        let b = VmmBitmap::new(70 * 4096);
        let view = b.clone();
        view.mark(69 * 4096, 10 * 4096); // runs past the end: only page 69
        view.mark(usize::MAX - 1, 10); // overflowing offset: nothing
        b.mark(0, 0); // empty: nothing
        let mut got = Vec::new();
        b.take(|w, bits| got.push((w, bits)));
        assert_eq!(got, [(1, 1 << 5)]);
        b.take(|_, _| panic!("taken twice"));
        assert!(VmmBitmap::default().pages() == 0 && !VmmBitmap::default().is_dirty(0));
    }

    /// Two writer threads mark every page of their half (sharing words) while a collector takes until the
    /// writers are done; every mark lands in exactly one take. Bounded by operation counts: each writer
    /// marks its pages once, the collector takes until both finished, then once more.
    #[test]
    fn i4_marks_racing_takes_are_each_taken_exactly_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let b = VmmBitmap::new(4096 * 4096);
        let done = AtomicUsize::new(0);
        let mut seen = vec![0u8; 4096];
        std::thread::scope(|s| {
            for half in 0..2usize {
                let (b, done) = (b.clone(), &done);
                s.spawn(move || {
                    // Interleaved pages: both writers hit every word.
                    for page in (half..4096).step_by(2) {
                        b.mark(page * 4096 + 100, 8);
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            let mut record = |w: usize, bits: u64| {
                for bit in 0..64 {
                    if bits & (1 << bit) != 0 {
                        seen[w * 64 + bit] += 1;
                    }
                }
            };
            while done.load(Ordering::Acquire) < 2 {
                b.take(&mut record);
            }
            b.take(&mut record);
        });
        assert!(
            seen.iter().all(|&n| n == 1),
            "pages taken other than once: {:?}",
            seen.iter().position(|&n| n != 1)
        );
    }
}
