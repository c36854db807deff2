//! Dirty-ring throughput: `N` entries pushed, harvested and reset through a `DirtyRingProducer` /
//! `DirtyRingConsumer` pair over a ring of 4096 entries, beside `rtrb`, a well-kept SPSC queue crate,
//! moving as many `(u32, u64)` items with `push` / `pop` through a queue of the same capacity.
//!
//! Two ways each:
//! - **two threads** (the main row): the producer on the calling thread, the consumer on a second one,
//!   both spinning when they must wait, as a vCPU and a VMM's harvesting thread would run. Our producer
//!   resets (with a no-op re-protect) whenever a push reports the soft limit, and spins resetting while
//!   the ring is full: in KVM the vCPU would exit and the VMM call `KVM_RESET_DIRTY_RINGS`. The clock
//!   runs from a barrier both threads pass to the end of the last reset.
//! - **one thread, in batches**: push until the soft limit (3520 entries), harvest them all, reset; `rtrb`
//!   pushes as many and pops them all.
//!
//! Offsets are `i mod 2^18`, pages of one 1 GiB slot in order, so a reset coalesces them into batches of
//! 64 pages as it would for a guest writing a buffer. Every side sums the offsets it received, and the sum
//! is checked, as are the counts of pushes, harvests and resets.

use std::hint::spin_loop;
use std::sync::Barrier;
use std::time::Instant;

use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig};
use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};

use crate::config::{Config, PAGES_1G};
use crate::outcome::Outcome;
use crate::report::Row;
use crate::timing::{Rounds, ns_per_op};

/// Entries moved per timed region.
pub const ENTRIES: u64 = 1 << 22;
/// Ring size in entries (64 KiB, KVM's recommended minimum), and the capacity of the `rtrb` queue.
pub const RING_ENTRIES: u32 = 4096;
/// Name of the main row, which carries the target.
pub const RING_2T: &str = "dirty_ring_push_harvest_reset/rtrb_2_threads";
/// Name of the single-threaded row.
pub const RING_1T: &str = "dirty_ring_push_harvest_reset/rtrb_batch_1_thread";

/// The ring and the slot its entries name.
struct Setup {
    cfg: RingConfig,
    ring: Vec<DirtyGfn>,
    slots: MemslotSet,
    slot: RingSlot,
}

impl Setup {
    fn new() -> Self {
        let cfg = RingConfig::new(RING_ENTRIES, PML_ENTRIES).expect("4096 entries is a valid ring");
        let mut slots = MemslotSet::new(Gfn(1 << 36));
        let memslot = Memslot::new(AsId(0), SlotId(0), Gfn(0), PAGES_1G, 1 << 40, SlotFlags::LOG_DIRTY);
        slots.insert(memslot).expect("a valid slot");
        let ring = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
        Setup { cfg, ring, slots, slot: RingSlot::new(AsId(0), SlotId(0)) }
    }
}

/// The offset pushed `i`-th.
fn offset(i: u64) -> u64 {
    i & (PAGES_1G - 1)
}

/// The sum of the offsets of `n` entries.
fn expected_sum(n: u64) -> u64 {
    (0..n).map(offset).sum()
}

/// One thread, in batches up to the soft limit. Returns (sum of harvested offsets, entries reset).
fn ours_batch(s: &Setup, n: u64) -> (u64, u64) {
    let mut producer = DirtyRingProducer::new(&s.ring, s.cfg).expect("ring sized for its config");
    let mut consumer = DirtyRingConsumer::new(&s.ring, s.cfg).expect("ring sized for its config");
    let (mut sum, mut reset, mut i) = (0, 0, 0);
    while i < n {
        while i < n {
            let outcome = producer.push(s.slot, offset(i)).expect("the batch stops at the soft limit");
            i += 1;
            if outcome.is_soft_full() {
                break;
            }
        }
        consumer.harvest(usize::MAX, |e| sum += e.offset);
        reset += u64::from(producer.reset_with(&s.slots, |_| {}).reset);
    }
    (sum, reset)
}

/// `rtrb`, one thread, in batches of `batch`. Returns the sum of popped offsets.
fn rtrb_batch(n: u64, batch: u64) -> u64 {
    let (mut tx, mut rx) = rtrb::RingBuffer::<(u32, u64)>::new(RING_ENTRIES as usize);
    let (mut sum, mut i) = (0, 0);
    while i < n {
        let end = n.min(i + batch);
        for j in i..end {
            tx.push((0, offset(j))).expect("a batch fits the queue");
        }
        i = end;
        while let Ok((_, off)) = rx.pop() {
            sum += off;
        }
    }
    sum
}

/// Two threads, streaming. Returns (ns per entry, sum harvested, entries reset).
fn ours_streaming(s: &Setup, n: u64) -> (f64, u64, u64) {
    let mut producer = DirtyRingProducer::new(&s.ring, s.cfg).expect("ring sized for its config");
    let mut consumer = DirtyRingConsumer::new(&s.ring, s.cfg).expect("ring sized for its config");
    let start = &Barrier::new(2);
    std::thread::scope(|scope| {
        // The consumer half moves to its thread (its own stack), as a VMM's would: the two halves' state
        // never shares a cache line by accident of stack layout. Same for `rtrb` below.
        let harvester = scope.spawn(move || {
            start.wait();
            let (mut got, mut sum) = (0, 0);
            while got < n {
                let k = consumer.harvest(usize::MAX, |e| sum += e.offset) as u64;
                if k == 0 {
                    spin_loop();
                }
                got += k;
            }
            sum
        });
        start.wait();
        let t = Instant::now();
        let mut reset = 0;
        for i in 0..n {
            loop {
                match producer.push(s.slot, offset(i)) {
                    Ok(outcome) => {
                        if outcome.is_soft_full() {
                            reset += u64::from(producer.reset_with(&s.slots, |_| {}).reset);
                        }
                        break;
                    }
                    Err(_full) => {
                        reset += u64::from(producer.reset_with(&s.slots, |_| {}).reset);
                        spin_loop();
                    }
                }
            }
        }
        let sum = harvester.join().expect("the harvesting thread does not panic");
        reset += u64::from(producer.reset_with(&s.slots, |_| {}).reset);
        (t.elapsed().as_nanos() as f64 / n as f64, sum, reset)
    })
}

/// `rtrb`, two threads, streaming. Returns (ns per entry, sum popped).
fn rtrb_streaming(n: u64) -> (f64, u64) {
    let (mut tx, mut rx) = rtrb::RingBuffer::<(u32, u64)>::new(RING_ENTRIES as usize);
    let start = &Barrier::new(2);
    std::thread::scope(|scope| {
        let consumer = scope.spawn(move || {
            start.wait();
            let (mut got, mut sum) = (0, 0);
            while got < n {
                match rx.pop() {
                    Ok((_, off)) => {
                        sum += off;
                        got += 1;
                    }
                    Err(_empty) => spin_loop(),
                }
            }
            sum
        });
        start.wait();
        let t = Instant::now();
        for i in 0..n {
            let mut item = (0, offset(i));
            while let Err(rtrb::PushError::Full(back)) = tx.push(item) {
                item = back;
                spin_loop();
            }
        }
        let sum = consumer.join().expect("the consumer thread does not panic");
        (t.elapsed().as_nanos() as f64 / n as f64, sum)
    })
}

/// Measures both ways, interleaved; pushes the rows and a note with entries per second.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let setup = Setup::new();
    let n = ENTRIES;
    let sum = expected_sum(n);
    let batch = u64::from(setup.cfg.soft_limit());
    let rounds = Rounds::<4>::run(cfg.warmup, cfg.reps, || {
        let (ours_2t, got, reset) = ours_streaming(&setup, n);
        assert_eq!((got, reset), (sum, n), "every entry harvested once, with its offset, and reset");
        let (theirs_2t, got) = rtrb_streaming(n);
        assert_eq!(got, sum, "rtrb delivered every item");
        let (ours_1t, (got, reset)) = ns_per_op(n, || ours_batch(&setup, n));
        assert_eq!((got, reset), (sum, n), "every entry harvested once, with its offset, and reset");
        let (theirs_1t, got) = ns_per_op(n, || rtrb_batch(n, batch));
        assert_eq!(got, sum, "rtrb delivered every item");
        [ours_2t, theirs_2t, ours_1t, theirs_1t]
    });
    out.rows.push(Row::new(RING_2T, rounds.median(0), rounds.median(1), "ns/entry"));
    out.rows.push(Row::new(RING_1T, rounds.median(2), rounds.median(3), "ns/entry"));
    let rate = |i| 1e3 / rounds.median(i);
    out.notes.push(format!(
        "ring throughput ({n} entries, ring of {RING_ENTRIES}, batches of {batch}), M entries/s: two threads \
         ours {:.0}, rtrb {:.0}; one thread ours {:.0}, rtrb {:.0}; spread ours {:.0}% / {:.0}%, rtrb \
         {:.0}% / {:.0}%",
        rate(0),
        rate(1),
        rate(2),
        rate(3),
        100.0 * rounds.spread(0),
        100.0 * rounds.spread(2),
        100.0 * rounds.spread(1),
        100.0 * rounds.spread(3)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_moves_every_entry() {
        let setup = Setup::new();
        let n = 10_000;
        let sum = expected_sum(n);
        assert_eq!(ours_batch(&setup, n), (sum, n));
        assert_eq!(rtrb_batch(n, 3520), sum);
        let (_, got, reset) = ours_streaming(&setup, n);
        assert_eq!((got, reset), (sum, n));
        assert_eq!(rtrb_streaming(n).1, sum);
    }
}
