//! Fuzz target: arbitrary dirty-bitmap traffic (slot size, tracking mode, marks, gets, get-and-clears and
//! `KVM_CLEAR_DIRTY_LOG` requests with arbitrary `first_page` / `num_pages` / mask) against a `Vec<bool>`
//! reference model.
//!
//! Defends I5 and I4: no panic and no out-of-bounds access whatever the request; every request is
//! refused exactly when KVM's rules refuse it (same error, same values); a refused request changes
//! nothing; every re-protect callback names only pages inside the slot; the bitmap always equals the
//! model. Each operation costs at most one pass over the bitmap (at most 1024 words), so the work per
//! input is bounded by its length.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tdp_core::dirty_bitmap::{BitmapError, DirtyBitmap, DirtyTrackingMode, PAGES_PER_WORD, words_for};
use tdp_core::flush::Flush;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Slot size in pages: 0..=65535, so up to 1024 bitmap words.
    pages: u16,
    /// Selects the tracking mode, ring modes included.
    mode: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Mark a raw offset (often outside the slot).
    Mark(u32),
    /// Mark a page inside the slot.
    MarkIn(u16),
    /// Copy-only get, with an output buffer `words + out_delta` long (clamped to -2..=2).
    Get {
        out_delta: i8,
    },
    GetAndClear {
        out_delta: i8,
    },
    /// `KVM_GET_DIRTY_LOG` in the VM's mode.
    GetLog {
        out_delta: i8,
    },
    /// Raw `KVM_CLEAR_DIRTY_LOG` arguments.
    Clear {
        first_page: u64,
        num_pages: u32,
        mask: Vec<u64>,
        through_mode: bool,
    },
    /// Arguments near the interesting edges: aligned or off by a little, ending at or near the slot's end.
    ClearNear {
        first_word: u16,
        skew: u8,
        len: Len,
        mask: Vec<u64>,
        through_mode: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Len {
    /// `num_pages` reaches the slot's end exactly (the end-of-slot exception).
    ToEnd,
    /// `num_pages` is `64 * words + tail`.
    Words { words: u16, tail: u8 },
}

fuzz_target!(|input: Input| {
    let mode = match input.mode % 5 {
        0 => DirtyTrackingMode::Bitmap,
        1 => DirtyTrackingMode::ManualProtect { initially_set: false },
        2 => DirtyTrackingMode::ManualProtect { initially_set: true },
        3 => DirtyTrackingMode::Ring { with_bitmap: false },
        _ => DirtyTrackingMode::Ring { with_bitmap: true },
    };
    let pages = u64::from(input.pages);
    let Ok(bitmap) = DirtyBitmap::new(pages, mode.initially_set()) else {
        panic!("a bitmap of {pages} pages must be allocatable");
    };
    let mut model = Model { pages, dirty: vec![mode.initially_set(); usize::from(input.pages)] };
    let words = words_for(pages) as usize;
    assert_eq!(bitmap.words(), words);

    for op in input.ops {
        match op {
            Op::Mark(offset) => model.mark(&bitmap, u64::from(offset)),
            Op::MarkIn(offset) if pages > 0 => model.mark(&bitmap, u64::from(offset) % pages),
            Op::MarkIn(_) => {}
            Op::Get { out_delta } => {
                let mut out = vec![0xa5a5; out_len(words, out_delta)];
                let got = bitmap.get(&mut out);
                model.check_get(got.map(|_| ()), &out);
                if let Ok(count) = got {
                    assert_eq!(count, model.dirty.iter().filter(|&&d| d).count() as u64);
                }
            }
            Op::GetAndClear { out_delta } => {
                let mut out = vec![0xa5a5; out_len(words, out_delta)];
                let mut calls = Vec::new();
                let got =
                    bitmap.get_and_clear(&mut out, |base, mask| model.reprotect(&mut calls, base, mask));
                model.check_harvest(got, &out, &calls);
            }
            Op::GetLog { out_delta } => {
                let mut out = vec![0xa5a5; out_len(words, out_delta)];
                let mut calls = Vec::new();
                let got =
                    bitmap.get_log(mode, &mut out, |base, mask| model.reprotect(&mut calls, base, mask));
                if mode.check_bitmap_allowed().is_err() {
                    assert_eq!(got, Err(BitmapError::NotInBitmapMode));
                    assert!(calls.is_empty() && out.iter().all(|&w| w == 0xa5a5));
                } else if mode.manual_protect() {
                    assert!(calls.is_empty() && got.is_ok_and(|f| f.is_none()) || got.is_err());
                    model.check_get(got.map(Flush::ignore), &out);
                } else {
                    model.check_harvest(got, &out, &calls);
                }
            }
            Op::Clear { first_page, num_pages, mask, through_mode } => {
                model.clear(&bitmap, mode, through_mode, first_page, num_pages, &mask);
            }
            Op::ClearNear { first_word, skew, len, mask, through_mode } => {
                let first_page = u64::from(first_word) % (words as u64 + 2) * PAGES_PER_WORD
                    + if skew < 0xf0 { 0 } else { u64::from(skew & 0xf) };
                let num_pages = match len {
                    Len::ToEnd => pages.saturating_sub(first_page),
                    Len::Words { words, tail } => u64::from(words) * PAGES_PER_WORD + u64::from(tail % 66),
                };
                model.clear(&bitmap, mode, through_mode, first_page, num_pages as u32, &mask);
            }
        }
    }
    // Final state: the bitmap equals the model, read through the copy-only get.
    let mut out = vec![0; words];
    model.check_get(bitmap.get(&mut out).map(|_| ()), &out);
});

fn out_len(words: usize, delta: i8) -> usize {
    (words as i64 + i64::from(delta.clamp(-2, 2))).max(0) as usize
}

struct Model {
    pages: u64,
    dirty: Vec<bool>,
}

impl Model {
    fn words(&self) -> Vec<u64> {
        self.dirty.chunks(64).map(|c| c.iter().rev().fold(0, |m, &d| m << 1 | u64::from(d))).collect()
    }

    fn mark(&mut self, bitmap: &DirtyBitmap, offset: u64) {
        let want = match self.dirty.get_mut(offset as usize).filter(|_| offset < self.pages) {
            Some(bit) => Ok(!std::mem::replace(bit, true)),
            None => Err(BitmapError::OffsetOutOfRange { offset, pages: self.pages }),
        };
        assert_eq!(bitmap.mark(offset), want);
    }

    /// The re-protect callback: every page it names lies inside the slot, and it is called once per word.
    fn reprotect(&self, calls: &mut Vec<(u64, u64)>, base: u64, mask: u64) -> Flush {
        assert!(base.is_multiple_of(PAGES_PER_WORD), "base {base} is not word-aligned");
        assert_ne!(mask, 0, "re-protect called with an empty mask");
        let last = base + u64::from(63 - mask.leading_zeros());
        assert!(last < self.pages, "re-protect of page {last} outside a slot of {} pages", self.pages);
        assert!(calls.last().is_none_or(|&(prev, _)| prev < base), "words re-protected out of order");
        calls.push((base, mask));
        Flush::none()
    }

    /// A copy-only get: the output equals the model, or the buffer was short and untouched.
    fn check_get(&self, got: Result<(), BitmapError>, out: &[u64]) {
        let want = self.words();
        match got {
            Ok(()) => assert_eq!(&out[..want.len()], &want[..]),
            Err(BitmapError::ShortBuffer { have, need }) => {
                assert!(have < want.len() && have == out.len() && need == want.len() as u64);
                assert!(out.iter().all(|&w| w == 0xa5a5), "a refused get wrote to the buffer");
            }
            Err(e) => panic!("unexpected get error {e}"),
        }
    }

    /// A get-and-clear: the output equals the model, exactly the dirty words were re-protected, and the
    /// model is now clean; or the buffer was short and nothing changed.
    fn check_harvest(&mut self, got: Result<Flush, BitmapError>, out: &[u64], calls: &[(u64, u64)]) {
        let want = self.words();
        match got {
            Ok(flush) => {
                flush.ignore(); // the callbacks asked for none
                assert_eq!(&out[..want.len()], &want[..]);
                let want_calls: Vec<(u64, u64)> = want
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| **w != 0)
                    .map(|(i, &w)| (i as u64 * PAGES_PER_WORD, w))
                    .collect();
                assert_eq!(calls, &want_calls[..]);
                self.dirty.fill(false);
            }
            Err(BitmapError::ShortBuffer { have, need }) => {
                assert!(have < want.len() && need == want.len() as u64 && calls.is_empty());
                assert!(out.iter().all(|&w| w == 0xa5a5), "a refused get wrote to the buffer");
            }
            Err(e) => panic!("unexpected get-and-clear error {e}"),
        }
    }

    fn clear(
        &mut self,
        bitmap: &DirtyBitmap,
        mode: DirtyTrackingMode,
        through_mode: bool,
        first_page: u64,
        num_pages: u32,
        mask: &[u64],
    ) {
        let mut calls = Vec::new();
        let mut reprotect = |base, m| self.reprotect(&mut calls, base, m);
        let got = if through_mode {
            bitmap.clear_log(mode, first_page, num_pages, mask, &mut reprotect)
        } else {
            bitmap.clear(first_page, num_pages, mask, &mut reprotect)
        };
        let verdict = if through_mode && mode.check_bitmap_allowed().is_err() {
            Err(BitmapError::NotInBitmapMode)
        } else {
            kvm_clear_verdict(self.pages, first_page, num_pages, mask.len())
        };
        assert_eq!(got.map(Flush::ignore), verdict, "clear({first_page}, {num_pages}) in {mode:?}");
        let mut want_calls = Vec::new();
        if verdict.is_ok() {
            for (w, &m) in mask.iter().take(words_for(u64::from(num_pages)) as usize).enumerate() {
                let base = first_page + w as u64 * PAGES_PER_WORD;
                let mut cleared = 0u64;
                for i in 0..64 {
                    let page = base + i;
                    if m & 1 << i != 0 && page < self.pages && self.dirty[page as usize] {
                        self.dirty[page as usize] = false;
                        cleared |= 1 << i;
                    }
                }
                if cleared != 0 {
                    want_calls.push((base, cleared));
                }
            }
        }
        assert_eq!(calls, want_calls, "clear({first_page}, {num_pages}) re-protected the wrong pages");
    }
}

/// KVM's validity rule for `KVM_CLEAR_DIRTY_LOG`, transcribed from `kvm_clear_dirty_log_protect`
/// (`virt/kvm/kvm_main.c`), with the mask length standing in for `copy_from_user`'s `-EFAULT`.
fn kvm_clear_verdict(pages: u64, first: u64, num: u32, mask_words: usize) -> Result<(), BitmapError> {
    let num64 = u64::from(num);
    if first & 63 != 0 {
        return Err(BitmapError::Misaligned { first_page: first });
    }
    if first > pages || num64 > pages - first || (num64 < pages - first && num64 & 63 != 0) {
        return Err(if first > pages || num64 > pages - first {
            BitmapError::OutOfRange { first_page: first, num_pages: num, pages }
        } else {
            BitmapError::BadLength { first_page: first, num_pages: num, pages }
        });
    }
    let need = num64.div_ceil(64);
    if (mask_words as u64) < need {
        return Err(BitmapError::ShortMask { have: mask_words, need });
    }
    Ok(())
}
