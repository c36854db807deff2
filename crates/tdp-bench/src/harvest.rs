//! Harvest cost against memory size at a fixed 1000 dirty pages: the dirty ring against the dirty bitmap,
//! the crossover the dirty-ring cover letter describes (a bitmap's harvest scans every page's bit, a
//! ring's reads only the entries written).
//!
//! For each size (1 to 256 GiB), one memslot of that size, the same 1000 distinct pages spread at random
//! over it, and three ways to collect them, each timed over one harvest with the marking or pushing
//! before it untimed:
//! - **ring**: 1000 entries pushed in random order into a 4096-entry ring; timed: the consumer's harvest
//!   into a user buffer plus the producer's reset, which validates each entry against the memslot and
//!   coalesces the pages into re-protect batches;
//! - **bitmap**: the 1000 bits marked; timed: `get_and_clear` into a user buffer (classic
//!   `KVM_GET_DIRTY_LOG`);
//! - **bitmap, manual protect**: the same, timed: `get` into the buffer plus `clear` of the whole slot
//!   with that buffer as the mask (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`).
//!
//! Every re-protect callback counts the pages it is handed (the MMU would re-protect them; that cost is
//! the same on every side and is left out), and the counts are checked: 1000 each time.

use tdp_core::addr::{AsId, Gfn, RingSlot, SlotId};
use tdp_core::dirty_bitmap::DirtyBitmap;
use tdp_core::dirty_ring::{
    DirtyEntry, DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig,
};
use tdp_core::flush::Flush;
use tdp_core::memslot::{Memslot, MemslotSet, SlotFlags};

use crate::config::{Config, PAGES_1G};
use crate::outcome::Outcome;
pub use crate::outcome::{Point, Series};
use crate::report::Row;
use crate::ring::RING_ENTRIES;
use crate::timing::{Rounds, ns_per_op};

/// Dirty pages per harvest.
pub const DIRTY: u64 = 1000;
/// Memory sizes measured, in GiB.
pub const SIZES_GIB: [u64; 5] = [1, 4, 16, 64, 256];
/// The unit of the rows.
pub const UNIT: &str = "us/harvest";

/// Row name for a size and a bitmap variant (`""` classic, `"_manual"` manual protect).
#[must_use]
pub fn row_name(gib: u64, variant: &str) -> String {
    format!("harvest_{DIRTY}_dirty/{gib}g/ring_vs_bitmap{variant}")
}

/// `count` distinct pages below `pages`, in a fixed pseudo-random order (xorshift64*).
#[must_use]
pub fn random_pages(count: u64, pages: u64, seed: u64) -> Vec<u64> {
    let mut state = seed | 1;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while (out.len() as u64) < count.min(pages) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let page = state.wrapping_mul(0x2545_f491_4f6c_dd1d) % pages;
        if seen.insert(page) {
            out.push(page);
        }
    }
    out
}

/// One size: the slot, its bitmap, a ring, and the user buffers.
struct Sized {
    pages: u64,
    dirty: Vec<u64>,
    slots: MemslotSet,
    bitmap: DirtyBitmap,
    out: Vec<u64>,
    cfg: RingConfig,
    ring: Vec<DirtyGfn>,
    harvested: Vec<DirtyEntry>,
}

impl Sized {
    fn new(gib: u64) -> Self {
        let pages = gib * PAGES_1G;
        let mut slots = MemslotSet::new(Gfn(1 << 40));
        let memslot = Memslot::new(AsId(0), SlotId(0), Gfn(0), pages, 1 << 40, SlotFlags::LOG_DIRTY);
        slots.insert(memslot).expect("a valid slot");
        let bitmap = DirtyBitmap::new(pages, false).expect("the bitmap fits in memory");
        let out = vec![0; bitmap.words()];
        let cfg = RingConfig::new(RING_ENTRIES, PML_ENTRIES).expect("a valid ring");
        let ring = (0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect();
        let harvested = Vec::with_capacity(RING_ENTRIES as usize);
        Sized { pages, dirty: random_pages(DIRTY, pages, gib), slots, bitmap, out, cfg, ring, harvested }
    }

    /// Marks the dirty pages in the bitmap (untimed).
    fn mark(&self) {
        for &page in &self.dirty {
            assert_eq!(self.bitmap.mark(page), Ok(true), "the bitmap was clean");
        }
    }

    /// Timed `get_and_clear`; returns (µs, pages handed to re-protect).
    fn bitmap_classic(&mut self) -> (f64, u64) {
        self.mark();
        let (bitmap, out) = (&self.bitmap, &mut self.out);
        let mut pages = 0;
        let (ns, flush) = ns_per_op(1, || {
            bitmap.get_and_clear(out, |_, mask| {
                pages += u64::from(mask.count_ones());
                Flush::none()
            })
        });
        flush.expect("the buffer fits the bitmap").ignore(); // Nothing is mapped: no TLB to flush.
        (ns / 1e3, pages)
    }

    /// Timed `get` + `clear` of the whole slot; returns (µs, pages handed to re-protect).
    fn bitmap_manual(&mut self) -> (f64, u64) {
        self.mark();
        let (bitmap, out) = (&self.bitmap, &mut self.out);
        let num_pages = u32::try_from(self.pages).expect("a slot below 16 TiB");
        let mut pages = 0;
        let (ns, (got, flush)) = ns_per_op(1, || {
            let got = bitmap.get(out);
            let flush = bitmap.clear(0, num_pages, out, |_, mask| {
                pages += u64::from(mask.count_ones());
                Flush::none()
            });
            (got, flush)
        });
        assert_eq!(got, Ok(DIRTY), "get reported every dirty page");
        flush.expect("a whole-slot clear is valid").ignore(); // Nothing is mapped: no TLB to flush.
        (ns / 1e3, pages)
    }

    /// Pushes the dirty pages (untimed), then times harvest + reset; returns (µs, pages re-protected).
    fn ring(&mut self) -> (f64, u64) {
        let mut producer = DirtyRingProducer::new(&self.ring, self.cfg).expect("ring sized for its config");
        let mut consumer = DirtyRingConsumer::new(&self.ring, self.cfg).expect("ring sized for its config");
        let slot = RingSlot::new(AsId(0), SlotId(0));
        for &page in &self.dirty {
            let _room = producer.push(slot, page).expect("1000 entries fit below the soft limit");
        }
        let (slots, harvested) = (&self.slots, &mut self.harvested);
        harvested.clear();
        let mut pages = 0;
        let (ns, stats) = ns_per_op(1, || {
            consumer.harvest(usize::MAX, |e| harvested.push(e));
            producer.reset_with(slots, |batch| pages += u64::from(batch.pages()))
        });
        assert_eq!((harvested.len() as u64, u64::from(stats.reset), stats.invalid), (DIRTY, DIRTY, 0));
        (ns / 1e3, pages)
    }
}

/// Measures every size, its three ways interleaved; pushes the rows and a note, returns the plot data.
/// Each harvest is short and its setup cheap, so this group runs three times the configured rounds.
pub fn measure(cfg: &Config, out: &mut Outcome) -> Series {
    let mut series = Series::default();
    let mut crossover = None;
    for gib in SIZES_GIB {
        let mut s = Sized::new(gib);
        let rounds = Rounds::<3>::run(cfg.warmup, 3 * cfg.reps, || {
            let (ring, a) = s.ring();
            let (classic, b) = s.bitmap_classic();
            let (manual, c) = s.bitmap_manual();
            assert_eq!([a, b, c], [DIRTY; 3], "each way handed every dirty page to re-protect, once");
            [ring, classic, manual]
        });
        let (ring, classic, manual) = (rounds.median(0), rounds.median(1), rounds.median(2));
        out.rows.push(Row::new(&row_name(gib, ""), ring, classic, UNIT));
        out.rows.push(Row::new(&row_name(gib, "_manual"), ring, manual, UNIT));
        if crossover.is_none() && ring < classic {
            crossover = Some(gib);
        }
        series.points.push(Point { gib, ring, bitmap: classic, manual });
    }
    let by_size: Vec<String> = series.points.iter().map(|p| format!("{}g {:.2}", p.gib, p.ring)).collect();
    out.notes.push(format!(
        "harvest of {DIRTY} dirty pages: the ring is faster than the bitmap from {} on; ring us/harvest by \
         size: {}",
        crossover.map_or_else(|| "no size measured".to_owned(), |g| format!("{g} GiB")),
        by_size.join(", ")
    ));
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_pages_are_distinct_and_in_range() {
        let pages = random_pages(1000, PAGES_1G, 7);
        assert_eq!(pages.len(), 1000);
        assert!(pages.iter().all(|&p| p < PAGES_1G));
        let distinct: std::collections::HashSet<_> = pages.iter().collect();
        assert_eq!(distinct.len(), 1000);
        assert_eq!(random_pages(10, 4, 1).len(), 4, "never more pages than the slot has");
    }

    #[test]
    fn each_way_collects_every_page() {
        let mut s = Sized::new(1);
        for _ in 0..2 {
            assert_eq!(s.ring().1, DIRTY);
            assert_eq!(s.bitmap_classic().1, DIRTY);
            assert_eq!(s.bitmap_manual().1, DIRTY);
        }
    }
}
