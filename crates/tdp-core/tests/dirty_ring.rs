//! The dirty ring through its public API: the KVM ABI layout, size validation, push / harvest / reset
//! round trips, the soft and hard limits, u32 index wrap-around, KVM's coalescing, a hostile consumer
//! (I5), and a proptest of random push / harvest / reset sequences against a reference model (I4).

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;
use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
use tdp_core::dirty_ring::{
    DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_MASK, DIRTY_GFN_F_RESET, DirtyEntry, DirtyGfn, DirtyRingConsumer,
    DirtyRingProducer, MAX_ENTRIES, PML_ENTRIES, PushOutcome, RESERVED_ENTRIES, ReprotectBatch, ResetStats,
    ResetTarget, RingConfig, RingError, RingFull,
};
use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};
use tdp_core::sync::Ordering;

// --- fixtures and checkers ---------------------------------------------------------------------------

fn ring(cfg: RingConfig) -> Vec<DirtyGfn> {
    (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect()
}

const A: RingSlot = RingSlot::new(AsId(0), SlotId(0));
const B: RingSlot = RingSlot::new(AsId(0), SlotId(1));
const SMM: RingSlot = RingSlot::new(AsId(1), SlotId(0));

/// Slot A: 256 pages at gfn 0x1000; slot B: 64 pages at 0x10_000; slot 0 of address space 1: 16 pages at 0.
fn slots() -> MemslotSet {
    let mut set = MemslotSet::new(Gfn(1 << 36));
    for (as_id, id, base, pages) in [(0, 0, 0x1000, 256), (0, 1, 0x10_000, 64), (1, 0, 0, 16)] {
        let slot = Memslot::new(AsId(as_id), SlotId(id), Gfn(base), pages, base << 12, SlotFlags::LOG_DIRTY);
        set.insert(slot).expect("fixture slots are valid");
    }
    set
}

/// The gfn of page `offset` of `slot`, if the slot exists and the offset is inside it.
fn gfn_of(slots: &MemslotSet, slot: RingSlot, offset: u64) -> Option<Gfn> {
    let m = slots.get(slot.as_id(), slot.id())?;
    (offset < m.pages).then(|| m.base_gfn.add(offset))
}

/// A reset target that records every batch and checks, as it goes, that each batch is a valid range of
/// the memslot it names (I5) and that the producer never asks for an address space that cannot exist.
struct Recorder<'s> {
    slots: &'s MemslotSet,
    batches: Vec<ReprotectBatch>,
}

impl<'s> Recorder<'s> {
    fn new(slots: &'s MemslotSet) -> Self {
        Recorder { slots, batches: Vec::new() }
    }
    fn offsets(&self) -> Vec<(RingSlot, u64, u64)> {
        self.batches.iter().map(|b| (b.slot(), b.offset(), b.mask())).collect()
    }
    fn gfns(&self) -> BTreeSet<Gfn> {
        self.batches.iter().flat_map(ReprotectBatch::gfns).collect()
    }
}

impl ResetTarget for Recorder<'_> {
    fn memslot(&self, slot: RingSlot) -> Option<Memslot> {
        assert!(slot.as_id().0 < AsId::MAX_COUNT, "asked for address space {:?}", slot.as_id());
        self.slots.get(slot.as_id(), slot.id()).copied()
    }
    fn reprotect(&mut self, batch: ReprotectBatch) {
        check_batch_in_slot(self.slots, &batch);
        self.batches.push(batch);
    }
}

/// I5: a batch names only pages of its memslot, and the memslot is the one the set holds.
fn check_batch_in_slot(slots: &MemslotSet, batch: &ReprotectBatch) {
    let slot = batch.slot();
    let m = slots.get(slot.as_id(), slot.id()).unwrap_or_else(|| panic!("batch for missing slot {slot:?}"));
    assert_eq!(batch.memslot(), m);
    assert!(batch.mask() & 1 == 1, "bit 0 of {batch:?} is clear");
    for gfn in batch.gfns() {
        assert!(m.contains(gfn), "batch {batch:?} re-protects {gfn:?} outside its slot");
    }
}

#[test]
fn check_batch_in_slot_catches_a_batch_outside_its_slot() {
    // A target that claims slot A is twice its size lets the producer build a batch past A's end; the
    // checker the other tests rely on must reject it.
    struct Lying<'s>(&'s MemslotSet, Vec<ReprotectBatch>);
    impl ResetTarget for Lying<'_> {
        fn memslot(&self, slot: RingSlot) -> Option<Memslot> {
            self.0.get(slot.as_id(), slot.id()).map(|m| Memslot { pages: m.pages * 2, ..*m })
        }
        fn reprotect(&mut self, batch: ReprotectBatch) {
            self.1.push(batch);
        }
    }
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    push_all(&mut producer, &[(A, 300)]);
    let _ = harvest_all(&mut consumer);
    let slots = slots();
    let mut lying = Lying(&slots, Vec::new());
    assert_eq!(producer.reset(&mut lying).batches, 1);
    let caught = std::panic::catch_unwind(|| check_batch_in_slot(&slots, &lying.1[0]));
    assert!(caught.is_err(), "a batch at offset 300 of a 256-page slot passed the checker");
}

fn harvest_all(consumer: &mut DirtyRingConsumer<'_>) -> Vec<DirtyEntry> {
    let mut out = Vec::new();
    consumer.harvest(usize::MAX, |e| out.push(e));
    out
}

fn push_all(producer: &mut DirtyRingProducer<'_>, pushes: &[(RingSlot, u64)]) {
    for &(slot, offset) in pushes {
        let _ = producer.push(slot, offset).expect("room in the ring");
    }
}

/// Pushes `pushes`, harvests, resets; returns the batches as (slot, offset, mask).
fn coalesced(pushes: &[(RingSlot, u64)]) -> Vec<(RingSlot, u64, u64)> {
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    push_all(&mut producer, pushes);
    assert_eq!(harvest_all(&mut consumer).len(), pushes.len());
    let slots = slots();
    let mut rec = Recorder::new(&slots);
    let stats = producer.reset(&mut rec);
    assert_eq!((stats.reset, stats.invalid), (pushes.len() as u32, 0));
    assert_eq!(stats.batches as usize, rec.batches.len());
    rec.offsets()
}

fn halves(mem: &[DirtyGfn], cfg: RingConfig) -> (DirtyRingProducer<'_>, DirtyRingConsumer<'_>) {
    (
        DirtyRingProducer::new(mem, cfg).expect("length matches"),
        DirtyRingConsumer::new(mem, cfg).expect("length matches"),
    )
}

fn raw(e: &DirtyGfn) -> (u32, u32, u64) {
    (e.flags.load(Ordering::Relaxed), e.slot.load(Ordering::Relaxed), e.offset.load(Ordering::Relaxed))
}

// --- layout ------------------------------------------------------------------------------------------

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn dirty_gfn_is_byte_identical_to_kvm_bindings() {
    use kvm_bindings::kvm_dirty_gfn;
    use std::mem::{align_of, offset_of, size_of};
    assert_eq!(size_of::<DirtyGfn>(), size_of::<kvm_dirty_gfn>());
    assert_eq!(align_of::<DirtyGfn>(), align_of::<kvm_dirty_gfn>());
    assert_eq!(offset_of!(DirtyGfn, flags), offset_of!(kvm_dirty_gfn, flags));
    assert_eq!(offset_of!(DirtyGfn, slot), offset_of!(kvm_dirty_gfn, slot));
    assert_eq!(offset_of!(DirtyGfn, offset), offset_of!(kvm_dirty_gfn, offset));
    // kvm-bindings exports the mask; the single bits are `BIT(0)` / `BIT(1)` macros bindgen skips.
    assert_eq!(DIRTY_GFN_F_MASK, kvm_bindings::KVM_DIRTY_GFN_F_MASK);
    assert_eq!((DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET), (1, 2));
    // A ring's bytes, as KVM_ENABLE_CAP takes them.
    let cfg = RingConfig::new(4096, 0).expect("valid size");
    assert_eq!(cfg.bytes() as usize, 4096 * size_of::<kvm_dirty_gfn>());
}

// --- size validation ---------------------------------------------------------------------------------

#[test]
fn i5_ring_sizes_are_validated_with_their_values() {
    use RingError::*;
    // (entries, pml_entries, Ok((reserved, soft_limit)) or the error)
    type Case = (u32, u32, Result<(u32, u32), RingError>);
    let cases: &[Case] = &[
        (0, 0, Err(NotPowerOfTwo { entries: 0 })),
        (1000, 0, Err(NotPowerOfTwo { entries: 1000 })),
        (128, 0, Err(TooSmall { entries: 128, min: 256 })),
        (256, 0, Ok((64, 192))),
        (256, PML_ENTRIES, Err(TooSmall { entries: 256, min: 1024 })),
        (1024, PML_ENTRIES, Ok((576, 448))),
        (MAX_ENTRIES, PML_ENTRIES, Ok((576, 65536 - 576))),
        (MAX_ENTRIES * 2, 0, Err(TooLarge { entries: 131_072, max: 65536 })),
        (1 << 31, 0, Err(TooLarge { entries: 1 << 31, max: 65536 })),
        // A reserve of exactly the ring's size would leave no room to push: refused (KVM accepts it).
        (256, 192, Err(TooSmall { entries: 256, min: 512 })),
        (512, 192, Ok((256, 256))),
        // A reserve no ring can hold.
        (1 << 31, u32::MAX, Err(TooSmall { entries: 1 << 31, min: u32::MAX })),
    ];
    for &(entries, pml, want) in cases {
        let got = RingConfig::new(entries, pml).map(|c| (c.reserved(), c.soft_limit()));
        assert_eq!(got, want, "RingConfig::new({entries}, {pml})");
    }
    assert_eq!(RingConfig::new(256, 0).map(|c| c.reserved()), Ok(RESERVED_ENTRIES));

    let bytes: &[(u32, Result<u32, RingError>)] = &[
        (4096, Ok(256)),
        (1 << 20, Ok(65536)),
        (0, Err(BytesNotPowerOfTwo { bytes: 0 })),
        (4097, Err(BytesNotPowerOfTwo { bytes: 4097 })),
        (8, Err(TooSmall { entries: 0, min: 256 })),
        (2048, Err(TooSmall { entries: 128, min: 256 })),
        (1 << 21, Err(TooLarge { entries: 131_072, max: 65536 })),
    ];
    for &(b, want) in bytes {
        assert_eq!(RingConfig::from_bytes(b, 0).map(|c| c.entries()), want, "from_bytes({b})");
    }
    let cfg = RingConfig::from_bytes(65536, PML_ENTRIES).expect("valid size");
    assert_eq!((cfg.entries(), cfg.bytes()), (4096, 65536));

    // Messages carry the values, lowercase, no trailing period.
    for e in [TooSmall { entries: 128, min: 256 }, TooLarge { entries: 131_072, max: 65536 }] {
        let msg = e.to_string();
        assert!(msg.starts_with(char::is_lowercase) && !msg.ends_with('.'), "{msg}");
    }
    assert_eq!(
        TooSmall { entries: 128, min: 256 }.to_string(),
        "dirty ring of 128 entries is too small: at least 256 entries are needed"
    );
    assert!(RingFull { entries: 256 }.to_string().contains("256"));

    // The memory must have the configured length; resumed indices must fit the ring.
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let short = ring(RingConfig::new(512, 0).expect("valid size"));
    assert_eq!(
        DirtyRingProducer::new(&short, cfg).map(|_| ()),
        Err(LengthMismatch { len: 512, entries: 256 })
    );
    assert_eq!(
        DirtyRingConsumer::new(&short[..100], cfg).map(|_| ()),
        Err(LengthMismatch { len: 100, entries: 256 })
    );
    let mem = ring(cfg);
    assert_eq!(
        DirtyRingProducer::resume(&mem, cfg, 300, 43).map(|_| ()),
        Err(BadIndices { dirty_index: 300, reset_index: 43, entries: 256 })
    );
    assert_eq!(
        DirtyRingProducer::resume(&mem, cfg, 5, u32::MAX - 250).map(|p| p.len()),
        Ok(256),
        "wrapping: 5 - (2^32 - 251) = 256"
    );
    assert!(DirtyRingProducer::resume(&mem, cfg, 0, 1).is_err(), "reset ahead of dirty by one");
}

// --- round trips and limits --------------------------------------------------------------------------

#[test]
fn i4_push_harvest_reset_round_trip_in_order() {
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    let slots = slots();
    // Three laps over the ring, so that entries are reused after their reset.
    for lap in 0..3u64 {
        let pushes: Vec<(RingSlot, u64)> =
            (0..150).map(|i| ([A, B, SMM][(i % 3) as usize], (i * 7 + lap) % 16)).collect();
        push_all(&mut producer, &pushes);
        assert_eq!(producer.len(), 150);
        let got = harvest_all(&mut consumer);
        let want: Vec<DirtyEntry> =
            pushes.iter().map(|&(slot, offset)| DirtyEntry { slot, offset }).collect();
        assert_eq!(got, want, "harvest returns every push once, in order");
        assert_eq!(consumer.pop(), None);
        let mut rec = Recorder::new(&slots);
        let stats = producer.reset(&mut rec);
        assert_eq!((stats.reset, stats.invalid), (150, 0));
        let want_gfns: BTreeSet<Gfn> = pushes.iter().filter_map(|&(s, o)| gfn_of(&slots, s, o)).collect();
        assert_eq!(rec.gfns(), want_gfns, "every harvested page is re-protected, and no other");
        assert!(producer.is_empty());
        assert!(mem.iter().all(|e| e.flags.load(Ordering::Relaxed) == 0), "reset frees every entry");
        assert_eq!(producer.reset(&mut Recorder::new(&slots)), ResetStats::default(), "nothing left");
    }
    assert_eq!((producer.dirty_index(), producer.reset_index(), consumer.fetch_index()), (450, 450, 450));
}

#[test]
fn i4_reset_stops_at_the_first_entry_not_harvested() {
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    let slots = slots();
    push_all(&mut producer, &[(A, 1), (A, 2), (A, 3), (A, 4)]);
    assert_eq!(consumer.harvest(2, |_| {}), 2);
    let stats = producer.reset_with(&slots, |_| {});
    assert_eq!((stats.reset, producer.len()), (2, 2), "entries 3 and 4 are dirty, not harvested");
    assert_eq!(raw(&mem[2]), (DIRTY_GFN_F_DIRTY, A.raw(), 3), "an unharvested entry is untouched");
    assert_eq!(harvest_all(&mut consumer).len(), 2);
    assert_eq!(producer.reset_with(&slots, |_| {}).reset, 2);
}

#[test]
fn i4_soft_full_at_exactly_size_minus_reserved() {
    for (entries, pml) in [(256, 0), (1024, PML_ENTRIES), (4096, PML_ENTRIES)] {
        let cfg = RingConfig::new(entries, pml).expect("valid size");
        let mem = ring(cfg);
        let (mut producer, mut consumer) = halves(&mem, cfg);
        let limit = entries - RESERVED_ENTRIES - pml;
        assert_eq!(cfg.soft_limit(), limit);
        for i in 0..limit - 1 {
            assert_eq!(producer.push(A, u64::from(i % 256)), Ok(PushOutcome::Room), "push {i} of {entries}");
        }
        assert!(!producer.is_soft_full());
        assert_eq!(producer.push(A, 0), Ok(PushOutcome::SoftFull), "push number {limit} reaches the limit");
        assert!(producer.is_soft_full());
        // Still soft-full after a harvest: only a reset frees entries.
        assert_eq!(consumer.harvest(usize::MAX, |_| {}), limit as usize);
        assert!(producer.is_soft_full());
        let _ = producer.reset_with(&slots(), |_| {});
        assert!(!producer.is_soft_full() && producer.is_empty());
    }
}

#[test]
fn i4_hard_full_refuses_and_loses_nothing() {
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    for i in 0..256 {
        let _ = producer.push(A, i).expect("room");
    }
    assert!(producer.is_full());
    let before: Vec<(u32, u32, u64)> = mem.iter().map(raw).collect();
    assert_eq!(producer.push(B, 9), Err(RingFull { entries: 256 }));
    assert_eq!(producer.push(B, 9), Err(RingFull { entries: 256 }), "refusing is repeatable");
    let after: Vec<(u32, u32, u64)> = mem.iter().map(raw).collect();
    assert_eq!(before, after, "a refused push writes nothing");
    assert_eq!(
        raw(&mem[0]),
        (DIRTY_GFN_F_DIRTY, A.raw(), 0),
        "the entry that would be overwritten is intact"
    );
    assert_eq!(producer.dirty_index(), 256);

    // Harvested but not reset is still full: the producer waits for the reset, not the harvest.
    let got = harvest_all(&mut consumer);
    assert_eq!(got.iter().map(|e| e.offset).collect::<Vec<_>>(), (0..256).collect::<Vec<_>>());
    assert_eq!(producer.push(B, 9), Err(RingFull { entries: 256 }));
    assert_eq!(producer.reset_with(&slots(), |_| {}).reset, 256);
    assert_eq!(producer.push(B, 9), Ok(PushOutcome::Room));
    assert_eq!(consumer.pop(), Some(DirtyEntry { slot: B, offset: 9 }));
}

#[test]
fn i4_u32_indices_wrap_around() {
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let start = u32::MAX - 2;
    let mut producer = DirtyRingProducer::resume(&mem, cfg, start, start).expect("empty ring");
    let mut consumer = DirtyRingConsumer::resume(&mem, cfg, start).expect("length matches");
    let slots = slots();
    let pushes: Vec<(RingSlot, u64)> = (0..200).map(|i| (A, i % 256)).collect();
    push_all(&mut producer, &pushes);
    assert_eq!((producer.len(), producer.dirty_index()), (200, start.wrapping_add(200)));
    assert!(producer.is_soft_full(), "200 >= 192 across the wrap");
    let got = harvest_all(&mut consumer);
    assert_eq!(got.iter().map(|e| e.offset).collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
    assert_eq!(consumer.fetch_index(), 197);
    let mut rec = Recorder::new(&slots);
    assert_eq!(producer.reset(&mut rec).reset, 200);
    assert_eq!((producer.reset_index(), producer.len()), (197, 0));
    assert_eq!(rec.gfns().len(), 200);
    // Fill to hard-full across the wrap.
    for i in 0..256 {
        let _ = producer.push(B, i % 64).expect("room");
    }
    assert_eq!(producer.push(B, 0), Err(RingFull { entries: 256 }));
}

// --- coalescing --------------------------------------------------------------------------------------

#[test]
fn reset_coalesces_like_kvm() {
    // Forward within 64 pages joins; 70 - 5 = 65 does not.
    assert_eq!(coalesced(&[(A, 5), (A, 6), (A, 70)]), [(A, 5, 0b11), (A, 70, 1)]);
    // Descending rebases into one batch.
    assert_eq!(coalesced(&[(A, 10), (A, 9), (A, 8)]), [(A, 8, 0b111)]);
    // A duplicate sets the same bit.
    assert_eq!(coalesced(&[(A, 3), (A, 3)]), [(A, 3, 1)]);
    // A different slot breaks the batch, also for the same id in another address space.
    assert_eq!(coalesced(&[(A, 1), (B, 1), (A, 2)]), [(A, 1, 1), (B, 1, 1), (A, 2, 1)]);
    assert_eq!(coalesced(&[(A, 1), (SMM, 1)]), [(A, 1, 1), (SMM, 1, 1)]);
    // A rebase that would shift a set bit out of the mask starts a new batch.
    assert_eq!(coalesced(&[(A, 100), (A, 163), (A, 99)]), [(A, 100, 1 | 1 << 63), (A, 99, 1)]);
    assert_eq!(coalesced(&[]), []);
}

// --- hostile consumer (I5) ---------------------------------------------------------------------------

/// Pushes `pushed` valid entries, lets `tamper` rewrite the ring memory, then resets; returns the stats
/// and the batches. Every batch is checked to lie inside its memslot.
fn reset_after(pushed: u32, tamper: impl FnOnce(&[DirtyGfn])) -> (ResetStats, Vec<(RingSlot, u64, u64)>) {
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let mut producer = DirtyRingProducer::new(&mem, cfg).expect("length matches");
    for i in 0..pushed {
        let _ = producer.push(A, u64::from(i)).expect("room");
    }
    tamper(&mem);
    let slots = slots();
    let mut rec = Recorder::new(&slots);
    let stats = producer.reset(&mut rec);
    assert!(stats.reset <= pushed, "reset walked {} entries, only {pushed} were pushed", stats.reset);
    assert_eq!(producer.len(), pushed - stats.reset);
    (stats, rec.offsets())
}

fn set(e: &DirtyGfn, flags: u32, slot: u32, offset: u64) {
    e.flags.store(flags, Ordering::Relaxed);
    e.slot.store(slot, Ordering::Relaxed);
    e.offset.store(offset, Ordering::Relaxed);
}

#[test]
fn i5_bad_slots_and_offsets_are_counted_and_never_reprotected() {
    let r = DIRTY_GFN_F_RESET;
    let (stats, batches) = reset_after(8, |m| {
        set(&m[0], r, A.raw(), 256); // offset == pages
        set(&m[1], r, A.raw(), u64::MAX); // offset overflow bait
        set(&m[2], r, RingSlot::new(AsId(0), SlotId(9)).raw(), 0); // no such slot
        set(&m[3], r, RingSlot::new(AsId(2), SlotId(0)).raw(), 0); // address space out of range
        set(&m[4], r, u32::MAX, 0); // as_id 0xffff, id 0xffff
        set(&m[5], r, SMM.raw(), 16); // one past the SMM slot
        set(&m[6], r, B.raw(), 63); // valid: last page of B
        set(&m[7], r, A.raw(), 255); // valid: last page of A
    });
    assert_eq!((stats.reset, stats.invalid, stats.batches), (8, 6, 2));
    assert_eq!(batches, [(B, 63, 1), (A, 255, 1)]);
}

#[test]
fn i5_a_bad_entry_does_not_cost_its_valid_neighbours_their_reprotection() {
    // KVM would coalesce (A, 250) and (A, 260) into one batch and drop it whole for reaching past the
    // slot; here the bad entry is dropped alone.
    let (stats, batches) = reset_after(3, |m| {
        for (e, off) in m.iter().zip([250, 260, 252]) {
            set(e, DIRTY_GFN_F_RESET, A.raw(), off);
        }
    });
    assert_eq!((stats.reset, stats.invalid), (3, 1));
    assert_eq!(batches, [(A, 250, 0b101)]);
}

#[test]
fn i5_reset_ignores_reset_bits_on_unpublished_entries_and_repeated_resets() {
    // The consumer marks all 256 entries, but only 5 were pushed.
    let (stats, _) = reset_after(5, |m| m.iter().for_each(|e| set(e, DIRTY_GFN_F_RESET, A.raw(), 1)));
    assert_eq!(stats.reset, 5);

    // Re-setting RESET on already-reset entries makes the next reset do nothing.
    let cfg = RingConfig::new(256, 0).expect("valid size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    let slots = slots();
    push_all(&mut producer, &[(A, 1), (A, 2)]);
    let _ = harvest_all(&mut consumer);
    assert_eq!(producer.reset_with(&slots, |_| {}).reset, 2);
    for _ in 0..3 {
        mem.iter().for_each(|e| e.flags.store(DIRTY_GFN_F_RESET, Ordering::Relaxed));
        assert_eq!(producer.reset_with(&slots, |_| panic!("nothing to re-protect")), ResetStats::default());
    }
}

#[test]
fn i5_reset_flag_semantics_follow_kvm() {
    // Only the RESET bit counts, as in KVM's `kvm_dirty_gfn_harvested`: DIRTY|RESET, RESET and garbage
    // with bit 1 set are harvested; garbage without bit 1 stops the walk there.
    let (stats, batches) = reset_after(4, |m| {
        set(&m[0], DIRTY_GFN_F_RESET, A.raw(), 0);
        set(&m[1], DIRTY_GFN_F_DIRTY | DIRTY_GFN_F_RESET, A.raw(), 1);
        set(&m[2], u32::MAX, A.raw(), 2);
        set(&m[3], 0xffff_fffd, A.raw(), 3);
    });
    assert_eq!((stats.reset, stats.invalid), (3, 0));
    assert_eq!(batches, [(A, 0, 0b111)]);
}

#[test]
fn i5_consumer_does_not_report_its_own_reset_marks_as_new() {
    // A consumer that writes DIRTY|RESET (allowed by KVM's ABI) and laps the ring must not harvest the
    // same entries again before the producer reset them.
    let cfg = RingConfig::for_model(4, 1).expect("valid model size");
    let mem = ring(cfg);
    let (mut producer, mut consumer) = halves(&mem, cfg);
    push_all(&mut producer, &[(A, 0), (A, 1), (A, 2), (A, 3)]);
    assert_eq!(harvest_all(&mut consumer).len(), 4);
    mem.iter().for_each(|e| e.flags.store(DIRTY_GFN_F_DIRTY | DIRTY_GFN_F_RESET, Ordering::Relaxed));
    assert_eq!(consumer.pop(), None);
}

// --- property: random garbage never escapes a memslot ------------------------------------------------

fn any_slot() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(A.raw()),
        Just(B.raw()),
        Just(SMM.raw()),
        (0u32..4, 0u32..4).prop_map(|(a, i)| a << 16 | i),
        any::<u32>(),
    ]
}

fn any_offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..300, Just(u64::MAX), any::<u64>()]
}

proptest! {
    #[test]
    fn i5_reset_survives_any_ring_contents(
        pushed in 0u32..=256,
        start in any::<u32>(),
        garbage in prop::collection::vec((any::<u32>(), any_slot(), any_offset()), 256),
        rounds in 1usize..4,
    ) {
        let cfg = RingConfig::new(256, 0).expect("valid size");
        let mem = ring(cfg);
        let mut producer = DirtyRingProducer::resume(&mem, cfg, start, start).expect("empty ring");
        for i in 0..pushed {
            let _ = producer.push(A, u64::from(i)).expect("room");
        }
        let slots = slots();
        let mut total = 0;
        for _ in 0..rounds {
            for (e, &(flags, slot, offset)) in mem.iter().zip(&garbage) {
                set(e, flags, slot, offset);
            }
            let mut rec = Recorder::new(&slots); // checks each batch against its memslot
            let stats = producer.reset(&mut rec);
            prop_assert!(stats.invalid <= stats.reset);
            prop_assert_eq!(stats.batches as usize, rec.batches.len());
            let pages: u32 = rec.batches.iter().map(ReprotectBatch::pages).sum();
            prop_assert!(pages <= stats.reset - stats.invalid);
            total += stats.reset;
        }
        prop_assert!(total <= pushed, "reset {} entries in all, {} were pushed", total, pushed);
        prop_assert_eq!(producer.len(), pushed - total);
        prop_assert_eq!(producer.reset_index(), start.wrapping_add(total));
    }
}

// --- property: the protocol against a reference model (I4) ------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Push(RingSlot, u64),
    Harvest(usize),
    Reset,
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![Just(A), Just(B), Just(SMM)], 0u64..16).prop_map(|(s, o)| Op::Push(s, o)),
        2 => (0usize..6).prop_map(Op::Harvest),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #[test]
    fn i4_random_push_harvest_reset_matches_the_model(
        start in prop_oneof![Just(0u32), Just(u32::MAX - 5), any::<u32>()],
        ops in prop::collection::vec(any_op(), 1..200),
    ) {
        // A tiny ring, so that the soft and hard limits are reached often.
        let cfg = RingConfig::for_model(16, 4).expect("valid model size");
        let mem = ring(cfg);
        let mut producer = DirtyRingProducer::resume(&mem, cfg, start, start).expect("empty ring");
        let mut consumer = DirtyRingConsumer::resume(&mem, cfg, start).expect("length matches");
        let slots = slots();
        let mut published: VecDeque<DirtyEntry> = VecDeque::new(); // pushed, not harvested
        let mut harvested: Vec<DirtyEntry> = Vec::new(); // harvested, not reset
        for op in ops {
            let in_use = (published.len() + harvested.len()) as u32;
            match op {
                Op::Push(slot, offset) => {
                    let got = producer.push(slot, offset);
                    if in_use == cfg.entries() {
                        prop_assert_eq!(got, Err(RingFull { entries: 16 }));
                    } else {
                        let soft = in_use + 1 >= cfg.soft_limit();
                        prop_assert_eq!(got, Ok(if soft { PushOutcome::SoftFull } else { PushOutcome::Room }));
                        published.push_back(DirtyEntry { slot, offset });
                    }
                }
                Op::Harvest(max) => {
                    let mut got = Vec::new();
                    let n = consumer.harvest(max, |e| got.push(e));
                    let want: Vec<DirtyEntry> = published.drain(..max.min(published.len())).collect();
                    prop_assert_eq!(n, want.len());
                    prop_assert_eq!(&got, &want, "in order, none skipped, none twice");
                    harvested.extend(want);
                }
                Op::Reset => {
                    let mut rec = Recorder::new(&slots);
                    let stats = producer.reset(&mut rec);
                    prop_assert_eq!((stats.reset as usize, stats.invalid), (harvested.len(), 0));
                    let want: BTreeSet<Gfn> =
                        harvested.iter().filter_map(|e| gfn_of(&slots, e.slot, e.offset)).collect();
                    prop_assert_eq!(rec.gfns(), want, "exactly the harvested pages are re-protected");
                    let pages: u32 = rec.batches.iter().map(ReprotectBatch::pages).sum();
                    prop_assert!(pages as usize <= harvested.len());
                    harvested.clear();
                }
            }
            let in_use = (published.len() + harvested.len()) as u32;
            prop_assert_eq!(producer.len(), in_use);
            prop_assert_eq!(producer.is_soft_full(), in_use >= cfg.soft_limit());
            prop_assert_eq!(consumer.fetch_index(), producer.reset_index().wrapping_add(harvested.len() as u32));
        }
    }
}
