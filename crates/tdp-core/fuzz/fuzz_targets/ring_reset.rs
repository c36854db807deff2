//! Fuzz target: the dirty-ring producer's reset over ring memory a hostile consumer wrote.
//!
//! The input builds a `MemslotSet` of a few slots, a ring of 2 to 2048 entries filled with arbitrary
//! `DirtyGfn`s (flags, slot and offset raw, or steered towards real slots and edge offsets), and producer
//! indices taken over with `DirtyRingProducer::resume`. Then it runs a sequence of hostile stores into the
//! ring, honest pushes, honest harvests by a `DirtyRingConsumer`, and resets.
//!
//! Defends I5 (and I4 for the reset's bookkeeping): no panic, no out-of-bounds access; every page a
//! reset re-protects lies inside a memslot of the set (`offset + bit < pages`); `ResetTarget::memslot` is
//! asked only about address spaces that exist; a reset returns after at most the entries the producer
//! pushed; and it does exactly what a model computed from the memory beforehand says: it frees the run of
//! harvested entries from `reset_index` (no further than `len()`), re-protects exactly the valid pages
//! among them and counts the invalid ones.
#![no_main]

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
use tdp_core::dirty_ring::{
    DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET, DirtyGfn, DirtyRingConsumer, DirtyRingProducer, ReprotectBatch,
    ResetTarget, RingConfig, RingError, RingFull,
};
use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};

/// Relaxed everywhere in this target: it is single-threaded, so every load sees the last store.
use std::sync::atomic::Ordering::Relaxed;

#[derive(Arbitrary, Debug)]
struct Input {
    slots: Vec<SlotSpec>,
    /// log2 of the ring size, reduced to 1..=11.
    ring_log2: u8,
    /// The reserve above the soft limit, reduced below the ring size.
    reserved: u16,
    /// The initial ring contents, repeated to fill the ring.
    fill: Vec<RawEntry>,
    indices: Indices,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct SlotSpec {
    as_id: u8,
    id: u8,
    base: u32,
    pages: u16,
}

#[derive(Arbitrary, Debug)]
enum Indices {
    /// Raw `dirty_index` / `reset_index`, often refused by `resume`.
    Raw { dirty: u32, reset: u32 },
    /// A valid pair: `reset = dirty - in_use`, `in_use` reduced to 0..=entries.
    Valid { dirty: u32, in_use: u32 },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Flags {
    Raw(u32),
    Free,
    Dirty,
    Reset,
    DirtyReset,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SlotSel {
    Raw(u32),
    /// One of the slots in the input (which may not have made it into the set).
    Known(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum OffsetSel {
    Raw(u64),
    /// Reduced into the slot chosen.
    Inside(u16),
    /// `pages - 2 + k` for k in 0..4: on both sides of the slot's end.
    NearEnd(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct RawEntry {
    flags: Flags,
    slot: SlotSel,
    offset: OffsetSel,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The consumer stores anything into one entry.
    Write { index: u16, entry: RawEntry },
    /// The consumer sets RESET on every entry, pushed or not.
    ResetEverything,
    /// The producer pushes a page.
    Push { slot: SlotSel, offset: OffsetSel },
    /// An honest consumer harvests up to `max` entries from where its last harvest stopped.
    Harvest { max: u8 },
    /// The producer resets, through `reset` with its own target or through `reset_with`.
    Reset { with_closure: bool },
}

fuzz_target!(|input: Input| {
    let specs = &input.slots[..input.slots.len().min(8)];
    let mut slots = MemslotSet::new(Gfn(1 << 40));
    for spec in specs {
        let slot = Memslot::new(
            AsId(u16::from(spec.as_id % 3)), // 2 is refused by the set
            SlotId(u16::from(spec.id % 8)),
            Gfn(u64::from(spec.base)),
            u64::from(spec.pages),
            0,
            SlotFlags::LOG_DIRTY,
        );
        let _ = slots.insert(slot); // overlaps, duplicates and empty slots are refused: fine
    }

    let entries = 1u32 << (input.ring_log2 % 11 + 1);
    let Ok(cfg) = RingConfig::for_model(entries, u32::from(input.reserved) % entries) else {
        panic!("a ring of {entries} entries with a smaller reserve is valid");
    };
    let ring: Vec<DirtyGfn> = (0..entries).map(|_| DirtyGfn::zeroed()).collect();
    if !input.fill.is_empty() {
        for (entry, raw) in ring.iter().zip(input.fill.iter().cycle()) {
            store(entry, raw, specs);
        }
    }

    let (dirty, reset) = match input.indices {
        Indices::Raw { dirty, reset } => (dirty, reset),
        Indices::Valid { dirty, in_use } => (dirty, dirty.wrapping_sub(in_use % (entries + 1))),
    };
    let mut producer = match DirtyRingProducer::resume(&ring, cfg, dirty, reset) {
        Ok(p) => p,
        Err(RingError::BadIndices { dirty_index, reset_index, entries: n }) => {
            assert!(dirty.wrapping_sub(reset) > entries, "resume refused valid indices {dirty}/{reset}");
            assert_eq!((dirty_index, reset_index, n), (dirty, reset, entries));
            return;
        }
        Err(e) => panic!("resume failed: {e}"),
    };
    assert!(dirty.wrapping_sub(reset) <= entries, "resume accepted indices {dirty}/{reset}");
    // The honest consumer starts where the producer's unharvested entries start.
    let mut fetch_index = reset;

    for op in input.ops.iter().take(256) {
        match *op {
            Op::Write { index, entry } => store(&ring[usize::from(index) % ring.len()], &entry, specs),
            Op::ResetEverything => {
                for entry in &ring {
                    entry.flags.fetch_or(DIRTY_GFN_F_RESET, Relaxed);
                }
            }
            Op::Push { slot, offset } => {
                let slot = ring_slot(slot, specs);
                let offset = page_offset(offset, slot, specs);
                let len = producer.len();
                match producer.push(RingSlot::from_raw(slot), offset) {
                    Ok(outcome) => {
                        assert!(len < entries);
                        assert_eq!(outcome.is_soft_full(), len + 1 >= cfg.soft_limit());
                        let pushed = &ring[(producer.dirty_index().wrapping_sub(1) % entries) as usize];
                        assert_eq!(pushed.flags.load(Relaxed), DIRTY_GFN_F_DIRTY);
                        assert_eq!((pushed.slot.load(Relaxed), pushed.offset.load(Relaxed)), (slot, offset));
                    }
                    Err(RingFull { entries: n }) => assert!(len == entries && n == entries),
                }
            }
            Op::Harvest { max } => {
                let Ok(mut consumer) = DirtyRingConsumer::resume(&ring, cfg, fetch_index) else {
                    panic!("a consumer of a well-sized ring can resume anywhere");
                };
                let taken = consumer.harvest(usize::from(max), |_| {});
                assert!(taken <= usize::from(max));
                fetch_index = consumer.fetch_index();
            }
            Op::Reset { with_closure } => check_reset(&mut producer, &ring, &slots, with_closure),
        }
    }
});

/// Runs one reset and checks it against a model computed from the ring memory beforehand.
fn check_reset(
    producer: &mut DirtyRingProducer<'_>,
    ring: &[DirtyGfn],
    slots: &MemslotSet,
    with_closure: bool,
) {
    let entries = ring.len() as u32;
    let (start, len) = (producer.reset_index(), producer.len());
    let mut expect_reset = 0u32;
    let mut expect_invalid = 0u32;
    let mut expect_pages = BTreeSet::new();
    for k in 0..len {
        let entry = &ring[(start.wrapping_add(k) % entries) as usize];
        if entry.flags.load(Relaxed) & DIRTY_GFN_F_RESET == 0 {
            break;
        }
        expect_reset += 1;
        let (slot, offset) = (RingSlot::from_raw(entry.slot.load(Relaxed)), entry.offset.load(Relaxed));
        let valid = slot.as_id().0 < AsId::MAX_COUNT
            && slots.get(slot.as_id(), slot.id()).is_some_and(|m| offset < m.pages);
        if valid {
            expect_pages.insert((slot.raw(), offset));
        } else {
            expect_invalid += 1;
        }
    }

    let mut batches = Vec::new();
    let stats = if with_closure {
        producer.reset_with(slots, |batch| batches.push(batch))
    } else {
        producer.reset(&mut Checked { slots, batches: &mut batches })
    };

    let mut got_pages = BTreeSet::new();
    for batch in &batches {
        let memslot = batch.memslot();
        let Some(in_set) = slots.get(memslot.as_id, memslot.id) else {
            panic!("re-protect of a slot not in the set: {batch:?}");
        };
        assert_eq!(memslot, in_set, "a batch carries a stale memslot");
        assert_eq!(batch.mask() & 1, 1, "a batch's bit 0 is always set: {batch:?}");
        let mut mask = batch.mask();
        while mask != 0 {
            let bit = u64::from(mask.trailing_zeros());
            mask &= mask - 1;
            let page = batch.offset().checked_add(bit).expect("offset + bit overflows");
            assert!(
                page < memslot.pages,
                "re-protect of page {page} outside a slot of {} pages",
                memslot.pages
            );
            got_pages.insert((batch.slot().raw(), page));
        }
    }
    assert_eq!(
        (stats.reset, stats.invalid, stats.batches as usize),
        (expect_reset, expect_invalid, batches.len()),
        "reset statistics"
    );
    assert_eq!(got_pages, expect_pages, "re-protected pages");
    assert_eq!(producer.reset_index(), start.wrapping_add(expect_reset));
    assert_eq!(producer.len(), len - expect_reset);
    for k in 0..expect_reset {
        assert_eq!(
            ring[(start.wrapping_add(k) % entries) as usize].flags.load(Relaxed),
            0,
            "entry not freed"
        );
    }
}

/// A reset target that also checks the producer's side of the contract.
struct Checked<'a> {
    slots: &'a MemslotSet,
    batches: &'a mut Vec<ReprotectBatch>,
}

impl ResetTarget for Checked<'_> {
    fn memslot(&self, slot: RingSlot) -> Option<Memslot> {
        assert!(slot.as_id().0 < AsId::MAX_COUNT, "memslot asked about address space {:?}", slot.as_id());
        self.slots.get(slot.as_id(), slot.id()).copied()
    }
    fn reprotect(&mut self, batch: ReprotectBatch) {
        self.batches.push(batch);
    }
}

fn store(entry: &DirtyGfn, raw: &RawEntry, specs: &[SlotSpec]) {
    let flags = match raw.flags {
        Flags::Raw(f) => f,
        Flags::Free => 0,
        Flags::Dirty => DIRTY_GFN_F_DIRTY,
        Flags::Reset => DIRTY_GFN_F_RESET,
        Flags::DirtyReset => DIRTY_GFN_F_DIRTY | DIRTY_GFN_F_RESET,
    };
    let slot = ring_slot(raw.slot, specs);
    entry.slot.store(slot, Relaxed);
    entry.offset.store(page_offset(raw.offset, slot, specs), Relaxed);
    entry.flags.store(flags, Relaxed);
}

fn ring_slot(sel: SlotSel, specs: &[SlotSpec]) -> u32 {
    match sel {
        SlotSel::Raw(raw) => raw,
        SlotSel::Known(i) if !specs.is_empty() => {
            let spec = &specs[usize::from(i) % specs.len()];
            RingSlot::new(AsId(u16::from(spec.as_id % 3)), SlotId(u16::from(spec.id % 8))).raw()
        }
        SlotSel::Known(i) => u32::from(i),
    }
}

fn page_offset(sel: OffsetSel, slot: u32, specs: &[SlotSpec]) -> u64 {
    let slot = RingSlot::from_raw(slot);
    let pages = specs
        .iter()
        .find(|s| u16::from(s.as_id % 3) == slot.as_id().0 && u16::from(s.id % 8) == slot.id().0)
        .map_or(1, |s| u64::from(s.pages));
    match sel {
        OffsetSel::Raw(raw) => raw,
        OffsetSel::Inside(k) => u64::from(k) % pages.max(1),
        OffsetSel::NearEnd(k) => (pages + u64::from(k % 4)).saturating_sub(2),
    }
}
