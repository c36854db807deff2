//! Unit tests that need private items of the ring: the flag predicates, and the reset's in-place fast
//! path (`Window`) against the checked path alone (`Coalescer::add` after a memslot lookup).

use super::coalesce::{Coalescer, ReprotectBatch};
use super::*;
use crate::addr::{AsId, Gfn, RingSlot, SlotId};
use crate::memslot::{Memslot, MemslotSet, SlotFlags};
use alloc::vec::Vec;
use proptest::prelude::*;

#[test]
fn i5_reset_reads_only_the_reset_bit_and_harvest_needs_dirty_without_reset() {
    for flags in [DIRTY_GFN_F_RESET, DIRTY_GFN_F_MASK, u32::MAX, 0xffff_fff2] {
        assert!(is_harvested(flags), "{flags:#x}");
    }
    for flags in [0, DIRTY_GFN_F_DIRTY, 0xffff_fffd, 0x8000_0001] {
        assert!(!is_harvested(flags), "{flags:#x}");
    }
    for flags in [DIRTY_GFN_F_DIRTY, 0x8000_0001] {
        assert!(is_dirty(flags), "{flags:#x}");
    }
    for flags in [0, DIRTY_GFN_F_RESET, DIRTY_GFN_F_MASK, u32::MAX] {
        assert!(!is_dirty(flags), "{flags:#x}");
    }
}

#[test]
fn producer_and_consumer_state_never_share_a_cache_line() {
    // Two lines, as `CachePadded` on x86-64: see `DirtyRingProducer`.
    assert!(align_of::<DirtyRingProducer<'_>>() >= 128);
    assert!(align_of::<DirtyRingConsumer<'_>>() >= 128);
    assert!(align_of::<DirtyRingProducer<'static, alloc::sync::Arc<[DirtyGfn]>>>() >= 128);
}

#[test]
fn halves_holding_their_memory_behave_as_borrowing_ones_over_many_laps() {
    use alloc::boxed::Box;
    use alloc::sync::Arc;
    let cfg = RingConfig::new(256, 0).unwrap();
    let short: Box<[DirtyGfn]> = (0..128).map(|_| DirtyGfn::zeroed()).collect();
    assert_eq!(
        DirtyRingProducer::with_memory(short, cfg).unwrap_err(),
        RingError::LengthMismatch { len: 128, entries: 256 }
    );
    let shared: Arc<[DirtyGfn]> = (0..256).map(|_| DirtyGfn::zeroed()).collect();
    let borrowed: Vec<DirtyGfn> = (0..256).map(|_| DirtyGfn::zeroed()).collect();
    let mut owned = (
        DirtyRingProducer::with_memory(Arc::clone(&shared), cfg).unwrap(),
        DirtyRingConsumer::with_memory(shared, cfg).unwrap(),
    );
    let mut plain =
        (DirtyRingProducer::new(&borrowed, cfg).unwrap(), DirtyRingConsumer::new(&borrowed, cfg).unwrap());
    let set = slots();
    let slot = RingSlot::new(AsId(0), SlotId(0));
    // Five rounds of 100 pushes, a harvest and a reset (two laps of the ring): indices and batches agree
    // round after round.
    for lap in 0..5u64 {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..100 {
            assert_eq!(owned.0.push(slot, (lap + i) % 100), plain.0.push(slot, (lap + i) % 100));
        }
        assert_eq!(owned.1.harvest(usize::MAX, |e| a.push(e)), plain.1.harvest(usize::MAX, |e| b.push(e)));
        assert_eq!((a.len(), &a), (100, &b));
        let (mut ba, mut bb) = (Vec::new(), Vec::new());
        assert_eq!(owned.0.reset_with(&set, |x| ba.push(x)), plain.0.reset_with(&set, |x| bb.push(x)));
        assert_eq!(ba, bb);
        assert_eq!(
            (owned.0.dirty_index(), owned.0.reset_index()),
            (plain.0.dirty_index(), plain.0.reset_index())
        );
        assert_eq!(owned.1.fetch_index(), plain.1.fetch_index());
    }
    assert!(owned.0.is_empty() && owned.0.dirty_index() == 500);
    let resumed = DirtyRingProducer::resume_with_memory(Box::<[DirtyGfn]>::from(borrowed), cfg, 600, 200);
    assert!(matches!(resumed, Err(RingError::BadIndices { dirty_index: 600, .. })));
}

/// Slot (0, 0): 100 pages (not a multiple of 64, so a batch's window can end at the slot's end inside
/// its 64 pages); slot (0, 1): 64 pages; slot (1, 0): 16 pages.
fn slots() -> MemslotSet {
    let mut set = MemslotSet::new(Gfn(1 << 36));
    for (as_id, id, base, pages) in [(0, 0, 0x1000, 100), (0, 1, 0x10_000, 64), (1, 0, 0, 16)] {
        let slot = Memslot::new(AsId(as_id), SlotId(id), Gfn(base), pages, base << 12, SlotFlags::LOG_DIRTY);
        set.insert(slot).expect("fixture slots are valid");
    }
    set
}

/// The reference: every entry validated by a lookup and coalesced with `Coalescer::add`, as the reset
/// did before it had a fast path. Returns the batches and the count of invalid entries.
fn reference(slots: &MemslotSet, entries: &[(u32, u64)]) -> (Vec<ReprotectBatch>, u32) {
    let (mut out, mut invalid, mut c) = (Vec::new(), 0, Coalescer::new());
    for &(raw, offset) in entries {
        let slot = RingSlot::from_raw(raw);
        let memslot =
            if slot.as_id().0 < AsId::MAX_COUNT { slots.get(slot.as_id(), slot.id()) } else { None };
        match memslot {
            Some(m) if offset < m.pages => out.extend(c.add(m, offset)),
            _ => invalid += 1,
        }
    }
    out.extend(c.finish());
    (out, invalid)
}

fn any_entry() -> impl Strategy<Value = (u32, u64)> {
    let slot = prop_oneof![
        4 => Just(0u32),
        2 => Just(1u32),
        1 => Just(1u32 << 16),
        1 => (0u32..4, 0u32..4).prop_map(|(a, i)| a << 16 | i),
        1 => any::<u32>(),
    ];
    let offset = prop_oneof![8 => 0u64..140, 1 => Just(u64::MAX), 1 => any::<u64>()];
    (slot, offset)
}

/// Pushes `entries` from index `start` (the values a hostile consumer could have left are the same as
/// pushed ones to the reset), marks them all harvested and resets. Returns the batches and the stats.
fn reset_of(entries: &[(u32, u64)], start: u32) -> (Vec<ReprotectBatch>, ResetStats) {
    let slots = slots();
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem: Vec<DirtyGfn> = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
    let mut producer = DirtyRingProducer::resume(&mem, cfg, start, start).expect("empty ring");
    for &(raw, offset) in entries {
        let _ = producer.push(RingSlot::from_raw(raw), offset).expect("room");
    }
    for e in &mem {
        e.flags.store(DIRTY_GFN_F_RESET, crate::sync::Ordering::Relaxed);
    }
    let mut got = Vec::new();
    let stats = producer.reset_with(&slots, |b| got.push(b));
    assert!(producer.is_empty());
    (got, stats)
}

proptest! {
    /// The reset's batches, in order, and its counts are exactly those of the checked path alone: the
    /// in-place extension never accepts a page the lookup would refuse or coalesce differently.
    #[test]
    fn reset_fast_path_batches_like_the_checked_path(
        entries in prop::collection::vec(any_entry(), 0..=256),
        start in prop_oneof![Just(0u32), Just(u32::MAX - 100), any::<u32>()],
    ) {
        let (got, stats) = reset_of(&entries, start);
        let (want, invalid) = reference(&slots(), &entries);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(stats, ResetStats { reset: entries.len() as u32, invalid, batches: want.len() as u32 });
    }
}

#[test]
fn reset_fast_path_stops_at_the_slot_end_and_the_window() {
    let s0 = |o| (0u32, o);
    // Slot (0, 0) has 100 pages: from 60 the window is 40 pages, so 99 joins and 100 is invalid; 124
    // is past the slot and outside the window.
    let entries = [s0(60), s0(99), s0(100), s0(61), s0(124), (1, 0), s0(62)];
    let (got, stats) = reset_of(&entries, u32::MAX - 2);
    assert_eq!(got, reference(&slots(), &entries).0);
    assert_eq!(stats, ResetStats { reset: 7, invalid: 2, batches: 3 });
    let batches: Vec<(SlotId, u64, u64)> =
        got.iter().map(|b| (b.memslot().id, b.offset(), b.mask())).collect();
    assert_eq!(batches, [(SlotId(0), 60, 1 | 1 << 39 | 1 << 1), (SlotId(1), 0, 1), (SlotId(0), 62, 1)]);
}
