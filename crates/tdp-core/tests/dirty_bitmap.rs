//! The dirty bitmap through its public API: KVM's get-and-clear and manual-protect semantics, the
//! `KVM_CLEAR_DIRTY_LOG` argument rules with their error values, initially-set bitmaps, the ring/bitmap
//! exclusion, a property test against a `Vec<bool>` reference model, and threads marking while another
//! harvests.
//!
//! Defends I4 (every mark is reported, exactly once per clean-to-dirty transition, also under races) and
//! I5 (bad clear requests are refused with their values and change nothing; nothing outside the slot is
//! ever reported or re-protected).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use proptest::prelude::*;
use tdp_core::addr::{AsId, Gfn};
use tdp_core::dirty_bitmap::{
    BitmapError, DirtyBitmap, DirtyTrackingMode, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, PAGES_PER_WORD, words_for,
};
use tdp_core::flush::Flush;

/// Re-protect calls as the bitmap made them: `(base_offset, mask)`.
type Calls = Vec<(u64, u64)>;

/// A re-protect callback that records its calls and asks for a flush of what it was given, as the MMU's
/// `reprotect_dirty` does for pages it write-protected.
fn recorder(calls: &mut Calls) -> impl FnMut(u64, u64) -> Flush + '_ {
    move |base, mask| {
        calls.push((base, mask));
        Flush::range(AsId(0), Gfn(base), 64)
    }
}

fn bitmap(pages: u64, dirty: &[u64]) -> DirtyBitmap {
    let b = DirtyBitmap::new(pages, false).unwrap();
    for &page in dirty {
        b.mark(page).unwrap();
    }
    b
}

fn dirty_pages(b: &DirtyBitmap) -> Vec<u64> {
    (0..b.pages()).filter(|&p| b.is_dirty(p)).collect()
}

#[test]
fn i4_get_and_clear_reports_then_clears_and_reprotects_exactly_the_set_bits() {
    let b = bitmap(200, &[0, 63, 64, 130, 199]);
    let mut out = vec![!0u64; 5];
    let mut calls = Calls::new();
    let flush = b.get_and_clear(&mut out, recorder(&mut calls)).unwrap();
    assert_eq!(out, [1 | 1 << 63, 1, 1 << 2, 1 << 7, !0], "4 words written, the 5th untouched");
    assert_eq!(calls, [(0, 1 | 1 << 63), (64, 1), (128, 1 << 2), (192, 1 << 7)]);
    assert_eq!(flush, Flush::range(AsId(0), Gfn(0), 256), "one merged flush for all re-protections");
    assert!(dirty_pages(&b).is_empty());

    let mut calls = Calls::new();
    let flush = b.get_and_clear(&mut out, recorder(&mut calls)).unwrap();
    assert!(flush.is_none() && calls.is_empty(), "a clean bitmap owes no flush");
    assert_eq!(out[..4], [0; 4]);
}

#[test]
fn i4_mark_says_whether_the_page_was_clean() {
    let b = bitmap(10, &[]);
    assert_eq!(b.mark(9), Ok(true));
    assert_eq!(b.mark(9), Ok(false));
    assert_eq!(b.mark(10), Err(BitmapError::OffsetOutOfRange { offset: 10, pages: 10 }));
    assert_eq!(b.mark(u64::MAX), Err(BitmapError::OffsetOutOfRange { offset: u64::MAX, pages: 10 }));
    assert_eq!(dirty_pages(&b), [9]);
}

#[test]
fn i4_manual_get_copies_without_clearing() {
    let b = bitmap(128, &[1, 100]);
    let mut out = [0u64; 2];
    assert_eq!(b.get(&mut out), Ok(2));
    assert_eq!(out, [1 << 1, 1 << 36]);
    assert_eq!(b.get(&mut out), Ok(2), "still dirty");
    assert_eq!(dirty_pages(&b), [1, 100]);
}

#[test]
fn i4_clear_clears_only_pages_set_in_both_and_reprotects_exactly_those() {
    let b = bitmap(256, &[0, 1, 2, 70, 200]);
    let mut calls = Calls::new();
    // Mask: pages 1, 2, 3 (3 is clean) in the first word, nothing in the second, 200 and 201 in the fourth.
    let mask = [0b1110, 0, 0, 1 << 8 | 1 << 9];
    let flush = b.clear(0, 256, &mask, recorder(&mut calls)).unwrap();
    assert_eq!(calls, [(0, 0b110), (192, 1 << 8)], "clean pages in the mask are not re-protected");
    assert!(!flush.is_none());
    assert_eq!(dirty_pages(&b), [0, 70]);

    // A range in the middle of the slot: mask word 0 is page 64..128.
    let mut calls = Calls::new();
    b.clear(64, 64, &[!0], recorder(&mut calls)).unwrap().ignore(); // recorded only
    assert_eq!(calls, [(64, 1 << 6)]);
    assert_eq!(dirty_pages(&b), [0]);
}

#[test]
fn i5_clear_rules_refuse_with_the_values_and_change_nothing() {
    let pages = 1000;
    let b = DirtyBitmap::new(pages, true).unwrap();
    let all = [!0u64; 20];
    let cases: &[(u64, u32, usize, BitmapError)] = &[
        (1, 64, 20, BitmapError::Misaligned { first_page: 1 }),
        (63, 0, 20, BitmapError::Misaligned { first_page: 63 }),
        // Misalignment is checked before the range, as in KVM.
        (u64::MAX, 1, 20, BitmapError::Misaligned { first_page: u64::MAX }),
        (1024, 0, 20, BitmapError::OutOfRange { first_page: 1024, num_pages: 0, pages }),
        (960, 41, 20, BitmapError::OutOfRange { first_page: 960, num_pages: 41, pages }),
        (0, 1024, 20, BitmapError::OutOfRange { first_page: 0, num_pages: 1024, pages }),
        (!63, u32::MAX, 20, BitmapError::OutOfRange { first_page: !63, num_pages: u32::MAX, pages }),
        (0, 40, 20, BitmapError::BadLength { first_page: 0, num_pages: 40, pages }),
        (896, 65, 20, BitmapError::BadLength { first_page: 896, num_pages: 65, pages }),
        (0, 1000, 15, BitmapError::ShortMask { have: 15, need: 16 }),
        (960, 40, 0, BitmapError::ShortMask { have: 0, need: 1 }),
    ];
    for &(first_page, num_pages, mask_words, want) in cases {
        let mut calls = Calls::new();
        let got = b.clear(first_page, num_pages, &all[..mask_words], recorder(&mut calls));
        assert_eq!(got, Err(want), "clear({first_page}, {num_pages}) with {mask_words} mask words");
        assert!(calls.is_empty());
        assert_eq!(want.kvm_errno(), if matches!(want, BitmapError::ShortMask { .. }) { 14 } else { 22 });
    }
    assert_eq!(dirty_pages(&b).len(), 1000, "refused requests cleared nothing");
}

#[test]
fn i5_end_of_slot_exception_allows_only_ranges_that_reach_the_end() {
    let b = DirtyBitmap::new(1000, true).unwrap();
    assert_eq!(
        b.clear(0, 40, &[!0], |_, _| Flush::none()),
        Err(BitmapError::BadLength { first_page: 0, num_pages: 40, pages: 1000 })
    );
    let mut calls = Calls::new();
    b.clear(960, 40, &[!0], recorder(&mut calls)).unwrap().ignore(); // recorded only
    assert_eq!(calls, [(960, (1 << 40) - 1)], "mask bits past the slot's end select nothing");
    // The whole slot in one request, and empty requests at the end and in the middle.
    b.clear(0, 1000, &[!0; 16], recorder(&mut calls)).unwrap().ignore(); // recorded only
    b.clear(960, 0, &[], |_, _| unreachable!()).unwrap().ignore(); // nothing to flush
    b.clear(64, 0, &[], |_, _| unreachable!()).unwrap().ignore(); // nothing to flush
    assert!(dirty_pages(&b).is_empty());
    // A slot whose size is a multiple of 64 has no exception to make.
    let b = DirtyBitmap::new(128, true).unwrap();
    assert!(b.clear(64, 64, &[!0], |_, _| Flush::none()).is_ok());
    assert!(matches!(b.clear(64, 63, &[!0], |_, _| Flush::none()), Err(BitmapError::BadLength { .. })));
}

#[test]
fn i5_initially_set_marks_every_page_and_nothing_past_the_end() {
    let b = DirtyBitmap::new(1000, true).unwrap();
    let mut out = vec![0u64; b.words()];
    assert_eq!(b.words(), 16);
    assert_eq!(b.get(&mut out), Ok(1000));
    assert!(out[..15].iter().all(|&w| w == !0));
    assert_eq!(out[15], (1 << 40) - 1);

    let mut calls = Calls::new();
    b.get_and_clear(&mut out, recorder(&mut calls)).unwrap().ignore(); // recorded only
    assert!(calls.iter().all(|&(base, mask)| base + u64::from(63 - mask.leading_zeros()) < 1000));
    assert_eq!(calls.iter().map(|(_, m)| m.count_ones()).sum::<u32>(), 1000);

    for pages in [0, 1, 63, 64, 65] {
        let b = DirtyBitmap::new(pages, true).unwrap();
        assert_eq!(b.words() as u64, words_for(pages));
        assert_eq!(dirty_pages(&b).len() as u64, pages);
    }
}

#[test]
fn i5_short_output_buffers_are_refused_and_change_nothing() {
    let b = bitmap(65, &[64]);
    let mut out = [7u64; 1];
    assert_eq!(b.get(&mut out), Err(BitmapError::ShortBuffer { have: 1, need: 2 }));
    assert_eq!(
        b.get_and_clear(&mut out, |_, _| unreachable!()),
        Err(BitmapError::ShortBuffer { have: 1, need: 2 })
    );
    assert_eq!(out, [7]);
    assert_eq!(dirty_pages(&b), [64]);
}

#[test]
fn i5_ring_vms_have_no_bitmap_and_the_check_comes_first() {
    let b = bitmap(64, &[3]);
    let ring = DirtyTrackingMode::Ring { with_bitmap: false };
    assert_eq!(ring.check_bitmap_allowed(), Err(BitmapError::NotInBitmapMode));
    assert_eq!(BitmapError::NotInBitmapMode.kvm_errno(), 6);
    let mut out = [0u64; 1];
    assert_eq!(b.get_log(ring, &mut out, |_, _| unreachable!()), Err(BitmapError::NotInBitmapMode));
    // A misaligned request on a ring VM fails with -ENXIO, not -EINVAL.
    assert_eq!(b.clear_log(ring, 1, 1, &[], |_, _| unreachable!()), Err(BitmapError::NotInBitmapMode));
    assert!(b.is_dirty(3));
    assert!(ring.uses_ring() && !ring.manual_protect() && !ring.initially_set());

    // With KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP the bitmap is harvested with get-and-clear.
    let with_bitmap = DirtyTrackingMode::Ring { with_bitmap: true };
    let mut calls = Calls::new();
    b.get_log(with_bitmap, &mut out, recorder(&mut calls)).unwrap().ignore(); // recorded only
    assert_eq!((out, calls), ([1 << 3], vec![(0, 1 << 3)]));
}

#[test]
fn get_log_follows_the_mode() {
    let manual = DirtyTrackingMode::ManualProtect { initially_set: false };
    let b = bitmap(64, &[3]);
    let mut out = [0u64; 1];
    let flush = b.get_log(manual, &mut out, |_, _| unreachable!()).unwrap();
    assert!(flush.is_none() && out == [1 << 3] && b.is_dirty(3), "manual protect copies only");
    let mut calls = Calls::new();
    b.clear_log(manual, 0, 64, &out, recorder(&mut calls)).unwrap().ignore(); // recorded only
    assert_eq!(calls, [(0, 1 << 3)]);

    b.mark(4).unwrap();
    let flush = b.get_log(DirtyTrackingMode::Bitmap, &mut out, recorder(&mut calls)).unwrap();
    assert!(!flush.is_none() && out == [1 << 4] && !b.is_dirty(4), "the classic mode gets and clears");
}

#[test]
fn i5_manual_protect_capability_arguments_follow_kvm() {
    let on = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    let init = KVM_DIRTY_LOG_INITIALLY_SET;
    assert_eq!(DirtyTrackingMode::from_manual_protect_cap(0), Ok(DirtyTrackingMode::Bitmap));
    assert_eq!(
        DirtyTrackingMode::from_manual_protect_cap(on),
        Ok(DirtyTrackingMode::ManualProtect { initially_set: false })
    );
    let both = DirtyTrackingMode::from_manual_protect_cap(on | init).unwrap();
    assert!(both.manual_protect() && both.initially_set() && both.check_bitmap_allowed().is_ok());
    for bad in [init, 1 << 2, on | 1 << 63, u64::MAX] {
        let err = DirtyTrackingMode::from_manual_protect_cap(bad);
        assert_eq!(err, Err(BitmapError::BadCapArgs { args: bad }));
        assert_eq!(err.unwrap_err().kvm_errno(), 22);
    }
    assert_eq!(DirtyTrackingMode::default(), DirtyTrackingMode::Bitmap);
}

#[test]
fn error_messages_name_the_operation_and_the_values() {
    let msg = BitmapError::BadLength { first_page: 0, num_pages: 40, pages: 1000 }.to_string();
    assert_eq!(
        msg,
        "clear-dirty-log: num_pages 40 is not a multiple of 64 and 0+40 is not the slot's end 1000"
    );
    assert_eq!(BitmapError::NoMemory { pages: 5 }.kvm_errno(), 12);
    assert_eq!(BitmapError::ShortBuffer { have: 0, need: 1 }.kvm_errno(), 14);
}

#[test]
fn i5_huge_slots_fail_cleanly_instead_of_aborting() {
    assert_eq!(DirtyBitmap::new(u64::MAX, false).unwrap_err(), BitmapError::NoMemory { pages: u64::MAX });
}

// ---- Reference model -----------------------------------------------------------------------------

/// One step of a property test.
#[derive(Clone, Debug)]
enum Op {
    Mark(u64),
    Get,
    GetAndClear,
    Clear { first_page: u64, num_pages: u32, mask: Vec<u64> },
}

/// What the tests need of a bitmap, so that the checker can be shown to catch a broken one.
trait UnderTest {
    fn new(pages: u64, initially_set: bool) -> Self;
    fn mark(&self, offset: u64) -> Result<bool, BitmapError>;
    fn get(&self, out: &mut [u64]) -> Result<u64, BitmapError>;
    fn get_and_clear(&self, out: &mut [u64], calls: &mut Calls) -> Result<(), BitmapError>;
    fn clear(&self, first: u64, num: u32, mask: &[u64], calls: &mut Calls) -> Result<(), BitmapError>;
}

impl UnderTest for DirtyBitmap {
    fn new(pages: u64, initially_set: bool) -> Self {
        DirtyBitmap::new(pages, initially_set).unwrap()
    }
    fn mark(&self, offset: u64) -> Result<bool, BitmapError> {
        DirtyBitmap::mark(self, offset)
    }
    fn get(&self, out: &mut [u64]) -> Result<u64, BitmapError> {
        DirtyBitmap::get(self, out)
    }
    fn get_and_clear(&self, out: &mut [u64], calls: &mut Calls) -> Result<(), BitmapError> {
        DirtyBitmap::get_and_clear(self, out, recorder(calls)).map(Flush::ignore) // recorded only
    }
    fn clear(&self, first: u64, num: u32, mask: &[u64], calls: &mut Calls) -> Result<(), BitmapError> {
        DirtyBitmap::clear(self, first, num, mask, recorder(calls)).map(Flush::ignore) // recorded only
    }
}

/// KVM's validity rule for `KVM_CLEAR_DIRTY_LOG`, transcribed from `kvm_clear_dirty_log_protect`.
fn kvm_clear_verdict(pages: u64, first: u64, num: u32, mask_words: usize) -> Result<(), BitmapError> {
    let num64 = u64::from(num);
    if first & 63 != 0 {
        return Err(BitmapError::Misaligned { first_page: first });
    }
    if first > pages || num64 > pages - first {
        return Err(BitmapError::OutOfRange { first_page: first, num_pages: num, pages });
    }
    if num64 < pages - first && num64 & 63 != 0 {
        return Err(BitmapError::BadLength { first_page: first, num_pages: num, pages });
    }
    let need = num64.div_ceil(64);
    if (mask_words as u64) < need {
        return Err(BitmapError::ShortMask { have: mask_words, need });
    }
    Ok(())
}

/// Runs `ops` on a fresh `B` and on a `Vec<bool>` reference, comparing every result, output word and
/// re-protect call.
fn check_against_model<B: UnderTest>(pages: u64, initially_set: bool, ops: &[Op]) -> Result<(), String> {
    let b = B::new(pages, initially_set);
    let mut model = vec![initially_set; pages as usize];
    let words = words_for(pages) as usize;
    let model_words = |model: &[bool]| -> Vec<u64> {
        (0..words)
            .map(|w| {
                (0..64).filter(|i| model.get(w * 64 + i).copied().unwrap_or(false)).fold(0, |m, i| m | 1 << i)
            })
            .collect()
    };
    for (step, op) in ops.iter().enumerate() {
        let at = format!("step {step} ({op:?})");
        match op {
            Op::Mark(offset) => {
                let want = match model.get_mut(*offset as usize).filter(|_| *offset < pages) {
                    Some(bit) => Ok(!std::mem::replace(bit, true)),
                    None => Err(BitmapError::OffsetOutOfRange { offset: *offset, pages }),
                };
                let got = b.mark(*offset);
                if got != want {
                    return Err(format!("{at}: mark returned {got:?}, model {want:?}"));
                }
            }
            Op::Get => {
                let mut out = vec![0; words];
                let count = b.get(&mut out).map_err(|e| format!("{at}: {e}"))?;
                let want = model_words(&model);
                if out != want || count != model.iter().filter(|&&d| d).count() as u64 {
                    return Err(format!("{at}: get gave {out:x?} ({count}), model {want:x?}"));
                }
            }
            Op::GetAndClear => {
                let mut out = vec![0; words];
                let mut calls = Calls::new();
                b.get_and_clear(&mut out, &mut calls).map_err(|e| format!("{at}: {e}"))?;
                let want = model_words(&model);
                let want_calls: Calls = want
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m != 0)
                    .map(|(w, m)| (w as u64 * 64, *m))
                    .collect();
                if out != want || calls != want_calls {
                    return Err(format!("{at}: got {out:x?} {calls:x?}, model {want:x?} {want_calls:x?}"));
                }
                model.iter_mut().for_each(|d| *d = false);
            }
            Op::Clear { first_page, num_pages, mask } => {
                let verdict = kvm_clear_verdict(pages, *first_page, *num_pages, mask.len());
                let mut calls = Calls::new();
                let got = b.clear(*first_page, *num_pages, mask, &mut calls);
                if got != verdict {
                    return Err(format!("{at}: clear returned {got:?}, KVM's rule says {verdict:?}"));
                }
                let mut want_calls = Calls::new();
                if verdict.is_ok() {
                    for (w, &m) in mask.iter().enumerate().take(words_for(u64::from(*num_pages)) as usize) {
                        let base = first_page + w as u64 * 64;
                        let mut cleared = 0;
                        for i in 0..64 {
                            if m & 1 << i != 0 && model.get((base + i) as usize) == Some(&true) {
                                model[(base + i) as usize] = false;
                                cleared |= 1 << i;
                            }
                        }
                        if cleared != 0 {
                            want_calls.push((base, cleared));
                        }
                    }
                }
                if calls != want_calls {
                    return Err(format!("{at}: re-protected {calls:x?}, model {want_calls:x?}"));
                }
            }
        }
    }
    Ok(())
}

fn op(pages: u64) -> impl Strategy<Value = Op> {
    let aligned_first = (0..=pages.div_ceil(64) + 1).prop_map(|w| w * 64);
    let first = prop_oneof![4 => aligned_first, 1 => any::<u64>(), 1 => 0..pages + 2];
    let num = prop_oneof![
        3 => (0..=words_for(pages) as u32 + 1).prop_map(|w| w * 64),
        3 => 0..=pages as u32 + 1,
        1 => any::<u32>(),
    ];
    let mask_word = prop_oneof![Just(!0u64), any::<u64>(), Just(0u64)];
    let clear = (first, num, prop::collection::vec(mask_word, 0..=words_for(pages) as usize + 1))
        .prop_map(|(first_page, num_pages, mask)| Op::Clear { first_page, num_pages, mask });
    prop_oneof![
        6 => (0..pages + 2).prop_map(Op::Mark),
        1 => Just(Op::Get),
        2 => Just(Op::GetAndClear),
        4 => clear,
    ]
}

fn case() -> impl Strategy<Value = (u64, bool, Vec<Op>)> {
    (prop_oneof![0..200u64, Just(1000u64), Just(64u64), Just(128u64)], any::<bool>())
        .prop_flat_map(|(pages, init)| (Just(pages), Just(init), prop::collection::vec(op(pages), 1..60)))
}

proptest! {
    #[test]
    fn i4_i5_bitmap_matches_the_reference_model((pages, initially_set, ops) in case()) {
        if let Err(e) = check_against_model::<DirtyBitmap>(pages, initially_set, &ops) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// A bitmap with KVM's end-of-slot exception forgotten: it refuses `num_pages` that is not a multiple
/// of 64 even when the range ends the slot.
struct NoEndOfSlotException(DirtyBitmap);

impl UnderTest for NoEndOfSlotException {
    fn new(pages: u64, initially_set: bool) -> Self {
        NoEndOfSlotException(DirtyBitmap::new(pages, initially_set).unwrap())
    }
    fn mark(&self, offset: u64) -> Result<bool, BitmapError> {
        self.0.mark(offset)
    }
    fn get(&self, out: &mut [u64]) -> Result<u64, BitmapError> {
        self.0.get(out)
    }
    fn get_and_clear(&self, out: &mut [u64], calls: &mut Calls) -> Result<(), BitmapError> {
        UnderTest::get_and_clear(&self.0, out, calls)
    }
    fn clear(&self, first: u64, num: u32, mask: &[u64], calls: &mut Calls) -> Result<(), BitmapError> {
        if !num.is_multiple_of(64) && first.is_multiple_of(64) && first + u64::from(num) <= self.0.pages() {
            return Err(BitmapError::BadLength { first_page: first, num_pages: num, pages: self.0.pages() });
        }
        UnderTest::clear(&self.0, first, num, mask, calls)
    }
}

/// A bitmap whose harvest reports and clears only the first word.
struct LosesWords(DirtyBitmap);

impl UnderTest for LosesWords {
    fn new(pages: u64, initially_set: bool) -> Self {
        LosesWords(DirtyBitmap::new(pages, initially_set).unwrap())
    }
    fn mark(&self, offset: u64) -> Result<bool, BitmapError> {
        self.0.mark(offset)
    }
    fn get(&self, out: &mut [u64]) -> Result<u64, BitmapError> {
        self.0.get(out)
    }
    fn get_and_clear(&self, out: &mut [u64], calls: &mut Calls) -> Result<(), BitmapError> {
        let words = out.len();
        let first_word = self.0.words().min(1);
        let mut full = vec![0; words];
        let mask: Vec<u64> = (0..first_word).map(|_| !0).collect();
        self.0.get(&mut full)?;
        out.fill(0);
        out[..first_word].copy_from_slice(&full[..first_word]);
        let num = (64 * first_word as u64).min(self.0.pages()) as u32;
        UnderTest::clear(&self.0, 0, num, &mask, calls)
    }
    fn clear(&self, first: u64, num: u32, mask: &[u64], calls: &mut Calls) -> Result<(), BitmapError> {
        UnderTest::clear(&self.0, first, num, mask, calls)
    }
}

#[test]
fn the_model_checker_catches_broken_bitmaps() {
    let end_of_slot = [Op::Clear { first_page: 960, num_pages: 40, mask: vec![!0] }];
    assert!(check_against_model::<DirtyBitmap>(1000, true, &end_of_slot).is_ok());
    let err = check_against_model::<NoEndOfSlotException>(1000, true, &end_of_slot).unwrap_err();
    assert!(err.contains("KVM's rule says Ok"), "{err}");

    let lost = [Op::Mark(100), Op::GetAndClear];
    assert!(check_against_model::<DirtyBitmap>(128, false, &lost).is_ok());
    assert!(check_against_model::<LosesWords>(128, false, &lost).is_err());
}

// ---- Concurrency ---------------------------------------------------------------------------------

const RACE_PAGES: u64 = 1 << 12;
const MARKS_PER_THREAD: usize = 200_000;

/// Two threads mark pseudo-random pages while a third harvests with `harvest` until they are done, then
/// once more; each marker waits for a harvest 20 times along the way. Returns (pages each thread newly dirtied, pages each harvest reported), summed per page.
fn race(harvest: fn(&DirtyBitmap, &mut [u64], &mut [u32])) -> (Vec<u32>, Vec<u32>) {
    let bitmap = Arc::new(DirtyBitmap::new(RACE_PAGES, false).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let harvests = Arc::new(AtomicUsize::new(0));
    let markers: Vec<_> = (0..2u64)
        .map(|t| {
            let bitmap = Arc::clone(&bitmap);
            let harvests = Arc::clone(&harvests);
            std::thread::spawn(move || {
                let mut newly = vec![0u32; RACE_PAGES as usize];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for n in 0..MARKS_PER_THREAD {
                    if n % (MARKS_PER_THREAD / 20) == 0 {
                        // Wait for a harvest, so that harvests interleave with the marks however the
                        // threads are scheduled. Relaxed: a progress counter, it publishes nothing.
                        let seen = harvests.load(Ordering::Relaxed);
                        while harvests.load(Ordering::Relaxed) == seen {
                            std::thread::yield_now();
                        }
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Cluster the pages so that both threads hit the same words often.
                    let page = (x % 256) * (RACE_PAGES / 256) + (x >> 32) % 4;
                    if bitmap.mark(page).unwrap() {
                        newly[page as usize] += 1;
                    }
                }
                newly
            })
        })
        .collect();
    let harvester = {
        let bitmap = Arc::clone(&bitmap);
        let done = Arc::clone(&done);
        let harvests = Arc::clone(&harvests);
        std::thread::spawn(move || {
            let mut reported = vec![0u32; RACE_PAGES as usize];
            let mut out = vec![0u64; bitmap.words()];
            // Acquire: pairs with the Release store below, so the last harvest sees every mark.
            while !done.load(Ordering::Acquire) {
                harvest(&bitmap, &mut out, &mut reported);
                harvests.fetch_add(1, Ordering::Relaxed);
            }
            harvest(&bitmap, &mut out, &mut reported);
            reported
        })
    };
    let mut newly = vec![0u32; RACE_PAGES as usize];
    for marker in markers {
        for (sum, n) in newly.iter_mut().zip(marker.join().unwrap()) {
            *sum += n;
        }
    }
    // Release: the joins above ordered every mark before this store.
    done.store(true, Ordering::Release);
    (newly, harvester.join().unwrap())
}

fn count_reported(out: &[u64], reported: &mut [u32]) {
    for (w, &word) in out.iter().enumerate() {
        for i in (0..64).filter(|i| word & 1 << i != 0) {
            reported[w * 64 + i] += 1;
        }
    }
}

#[test]
fn i4_no_mark_is_lost_while_get_and_clear_races_two_markers() {
    let (newly, reported) = race(|bitmap, out, reported| {
        let mut calls = Calls::new();
        bitmap.get_and_clear(out, recorder(&mut calls)).unwrap().ignore(); // no MMU in this test
        count_reported(out, reported);
        let from_calls: u32 = calls.iter().map(|(_, m)| m.count_ones()).sum();
        assert_eq!(from_calls, out.iter().map(|w| w.count_ones()).sum::<u32>(), "re-protected = reported");
    });
    // 1024 distinct pages are marked: more transitions than that mean harvests took bits between marks.
    assert!(newly.iter().sum::<u32>() > 1024, "harvests interleaved with the marks");
    // Each clean-to-dirty transition is reported by exactly one harvest: none lost, none twice.
    assert_eq!(newly, reported);
}

#[test]
fn i4_no_mark_is_lost_while_manual_get_and_clear_race_two_markers() {
    let (newly, reported) = race(|bitmap, out, reported| {
        bitmap.get(out).unwrap();
        let mut calls = Calls::new();
        bitmap.clear(0, RACE_PAGES as u32, out, recorder(&mut calls)).unwrap().ignore(); // no MMU here
        // Only what `clear` re-protected was taken: a bit set after `get` stays for the next round.
        let mut cleared = vec![0u64; out.len()];
        for (base, mask) in calls {
            cleared[(base / PAGES_PER_WORD) as usize] |= mask;
        }
        count_reported(&cleared, reported);
    });
    assert_eq!(newly, reported);
}
