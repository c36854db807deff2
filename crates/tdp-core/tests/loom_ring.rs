//! Loom models of the dirty ring's acquire/release protocol, on the shipped code (`crate::sync` swaps in
//! loom's atomics): a producer thread pushing while a consumer thread harvests, and a reset racing a
//! harvest, and a hostile consumer racing a reset, on rings of two to four entries. Each model checks I4 in miniature: every pushed entry is
//! harvested exactly once, in order, with the slot and offset written before it was published, and every
//! harvested entry is reset and re-protected exactly once.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p tdp-core --test loom_ring --release --target-dir target/loom`
//! (`cargo xtask ci` does, in its `loom` step). Loom does not produce load-buffering outcomes, so the
//! consumer's Release store of RESET (which keeps its reads of an entry before the entry's reuse) is
//! argued in the code rather than checked here.
#![cfg(loom)]

use std::collections::BTreeSet;

use loom::sync::Arc;
use loom::thread;
use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
use tdp_core::dirty_ring::{
    DIRTY_GFN_F_RESET, DirtyEntry, DirtyGfn, DirtyRingConsumer, DirtyRingProducer, RingConfig,
};
use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};
use tdp_core::sync::Ordering;

const A: RingSlot = RingSlot::new(AsId(0), SlotId(0));
const B: RingSlot = RingSlot::new(AsId(1), SlotId(5));

fn slots() -> MemslotSet {
    let mut set = MemslotSet::new(Gfn(1 << 36));
    for (slot, base) in [(A, 0x100), (B, 0x200)] {
        let m = Memslot::new(slot.as_id(), slot.id(), Gfn(base), 64, 0, SlotFlags::LOG_DIRTY);
        set.insert(m).expect("fixture slots are valid");
    }
    set
}

fn gfn(slot: RingSlot, offset: u64) -> Gfn {
    Gfn(if slot == A { 0x100 } else { 0x200 } + offset)
}

/// A zeroed ring of `entries` entries with `reserved` above the soft limit, as the producer creates it.
fn new_ring(entries: u32, reserved: u32) -> (Arc<Vec<DirtyGfn>>, RingConfig) {
    let cfg = RingConfig::for_model(entries, reserved).expect("valid model size");
    let mem: Vec<DirtyGfn> = (0..entries).map(|_| DirtyGfn::zeroed()).collect();
    DirtyRingProducer::new(&mem, cfg).expect("length matches");
    (Arc::new(mem), cfg)
}

/// Resets whatever is harvested and returns the stats' reset count and the re-protected gfns.
fn reset(producer: &mut DirtyRingProducer<'_>, slots: &MemslotSet) -> (u32, Vec<Gfn>) {
    let mut gfns = Vec::new();
    let stats = producer.reset_with(slots, |b| gfns.extend(b.gfns()));
    assert_eq!(stats.invalid, 0, "every entry was pushed valid");
    (stats.reset, gfns)
}

/// A producer pushes three entries while a consumer harvests: whatever the consumer sees, it sees in order,
/// with the slot and offset of the push (never the zeroes that were there before), and nothing is lost.
#[test]
fn i4_loom_harvest_sees_what_push_published() {
    // From index 0, and across the u32 wrap of the free-running indices.
    for start in [0, u32::MAX - 1] {
        loom::model(move || harvest_sees_what_push_published(start));
    }
}

fn harvest_sees_what_push_published(start: u32) {
    {
        let (mem, cfg) = new_ring(4, 1);
        let pushes = [
            DirtyEntry { slot: A, offset: 10 },
            DirtyEntry { slot: B, offset: 20 },
            DirtyEntry { slot: A, offset: 11 },
        ];

        let producer = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let mut p = DirtyRingProducer::resume(&mem, cfg, start, start).expect("fresh ring");
                for e in pushes {
                    let _ = p.push(e.slot, e.offset).expect("room");
                }
                p.dirty_index()
            })
        };
        let consumer = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let mut c = DirtyRingConsumer::resume(&mem, cfg, start).expect("length matches");
                let mut got = Vec::new();
                c.harvest(3, |e| got.push(e));
                (got, c.fetch_index())
            })
        };
        let dirty_index = producer.join().expect("producer");
        let (mut got, fetch_index) = consumer.join().expect("consumer");
        assert_eq!(got[..], pushes[..got.len()], "a prefix of the pushes, exact values");

        // After both threads: the rest is there, then one reset re-protects both pages once.
        let mut c = DirtyRingConsumer::resume(&mem, cfg, fetch_index).expect("length matches");
        c.harvest(usize::MAX, |e| got.push(e));
        assert_eq!(got, pushes);
        let mut p = DirtyRingProducer::resume(&mem, cfg, dirty_index, start).expect("indices fit");
        let (n, gfns) = reset(&mut p, &slots());
        assert_eq!((n, gfns), (3, vec![gfn(A, 10), gfn(B, 20), gfn(A, 11)]));
        assert!(p.is_empty());
    }
}

/// A reset races a harvest, then the producer reuses the freed entries of a two-entry ring: every entry
/// is reset once in total, the pages re-protected are exactly the harvested ones, and a reused entry is
/// never reported with an older push's values or twice.
#[test]
fn i4_loom_reset_races_harvest_and_entries_are_reused() {
    loom::model(|| {
        let (mem, cfg) = new_ring(2, 1);
        let mut p = DirtyRingProducer::resume(&mem, cfg, 0, 0).expect("fresh ring");
        let _ = p.push(A, 1).expect("room");
        let _ = p.push(A, 2).expect("room");
        let (dirty_index, reset_index) = (p.dirty_index(), p.reset_index());

        let consumer = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let mut c = DirtyRingConsumer::new(&mem, cfg).expect("length matches");
                let mut got = Vec::new();
                c.harvest(3, |e| got.push(e));
                (got, c.fetch_index())
            })
        };
        let producer = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let mut p = DirtyRingProducer::resume(&mem, cfg, dirty_index, reset_index).expect("fits");
                let (n, gfns) = reset(&mut p, &slots());
                // Reuse whatever was freed: the third push lands in entry 0 only after it was reset.
                let pushed_third = p.push(B, 3).is_ok();
                (n, gfns, pushed_third, p.dirty_index(), p.reset_index())
            })
        };
        let (mut got, fetch_index) = consumer.join().expect("consumer");
        let (n1, mut gfns, pushed_third, dirty_index, reset_index) = producer.join().expect("producer");

        let mut pushes = vec![DirtyEntry { slot: A, offset: 1 }, DirtyEntry { slot: A, offset: 2 }];
        if pushed_third {
            pushes.push(DirtyEntry { slot: B, offset: 3 });
        }
        assert_eq!(got[..], pushes[..got.len()], "in order, exact values, none twice");
        assert!(n1 as usize <= got.len(), "reset only what was harvested");

        // Drain and reset the rest: each pushed entry harvested once, each harvested one reset once.
        let mut c = DirtyRingConsumer::resume(&mem, cfg, fetch_index).expect("length matches");
        c.harvest(usize::MAX, |e| got.push(e));
        assert_eq!(got, pushes);
        let mut p = DirtyRingProducer::resume(&mem, cfg, dirty_index, reset_index).expect("fits");
        let (n2, more) = reset(&mut p, &slots());
        gfns.extend(more);
        assert_eq!(n1 + n2, pushes.len() as u32);
        let want: BTreeSet<Gfn> = pushes.iter().map(|e| gfn(e.slot, e.offset)).collect();
        assert_eq!(gfns.iter().copied().collect::<BTreeSet<Gfn>>(), want);
        assert!(p.is_empty());
    });
}

/// I5 under concurrency: a hostile consumer marks every entry RESET and scribbles on a slot while the
/// producer resets. The reset walks only the one entry that was pushed, re-protects nothing but that
/// entry's page, and terminates.
#[test]
fn i5_loom_hostile_consumer_races_reset() {
    loom::model(|| {
        let (mem, cfg) = new_ring(2, 1);
        let mut p = DirtyRingProducer::resume(&mem, cfg, 0, 0).expect("fresh ring");
        let _ = p.push(A, 1).expect("room");
        let dirty_index = p.dirty_index();

        let hostile = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                // Relaxed on purpose: a hostile consumer owes the producer no ordering.
                mem[0].slot.store(u32::MAX, Ordering::Relaxed);
                for e in mem.iter() {
                    e.flags.store(DIRTY_GFN_F_RESET, Ordering::Relaxed);
                }
            })
        };
        let producer = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let mut p = DirtyRingProducer::resume(&mem, cfg, dirty_index, 0).expect("fits");
                let mut gfns = Vec::new();
                let stats = p.reset_with(&slots(), |b| gfns.extend(b.gfns()));
                (stats.reset, stats.invalid, gfns, p.len())
            })
        };
        hostile.join().expect("hostile consumer");
        let (reset, invalid, gfns, left) = producer.join().expect("producer");
        assert!(reset <= 1, "walked {reset} entries, one was pushed");
        assert_eq!(left, 1 - reset);
        // Either the old slot (valid, re-protected) or the scribbled one (invalid, dropped) was read.
        let want: Vec<Gfn> = if reset == 1 && invalid == 0 { vec![gfn(A, 1)] } else { vec![] };
        assert_eq!(gfns, want);
    });
}
