//! Parallel faults: 4 KiB write faults into a fresh table from one thread, then from two threads on
//! disjoint halves of the same range, on one `Mmu` shared by reference (the read side of its lock).
//! The figure is the per-fault cost of each, and the scaling ratio (how many times more faults per
//! second two threads complete than one; 2.0 is the limit of two cores).
//!
//! The backend here must be `Sync`, unlike the lean single-threaded one of the other groups: its table
//! pages come from a preallocated arena through a mutex-protected free list, taken once per page-cache
//! refill (ten pages), not per fault. A fault takes four locked instructions: the read side of the MMU
//! lock entered and left through its vCPU group's word, the install (a compare-exchange on the thread's
//! own table line) and the group's leaf counter. The two vCPUs are in different groups, so none of the
//! four writes a line the other thread writes (before the groups, the lock word and the leaf counter
//! were shared, and two threads ran at 0.1-0.2x the throughput of one).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tdp_core::addr::{AsId, Gfn, Level, PAGE_SHIFT, Pfn, SlotId};
use tdp_core::fault::{AccessKind, Fault, FaultKind};
use tdp_core::host::{
    AllocError, ExternalTables, HostFaultError, HostMemory, HostPage, HostTranslate, MmuEvents, MmuYield,
    Table, TableMemory, TlbFlush,
};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, VcpuMmu};
use tdp_core::spte::Spte;

use crate::config::{Config, PAGES_1G, arena_pages};
use crate::outcome::Outcome;
use crate::report::Row;
use crate::timing::Rounds;

/// Frame number of the arena's first page (frames are only names here).
const BASE_PFN: u64 = 0x1000;
/// Where guest memory starts in host addresses (any value above the arena's frames).
const GUEST_BASE: u64 = 1 << 40;

/// A thread-safe backend: preallocated table pages, a free list behind a mutex, a flush counter.
struct SyncHost {
    tables: Box<[Table]>,
    free: Mutex<Vec<u32>>,
    flushes: AtomicU64,
}

impl SyncHost {
    fn new(pages: usize) -> Self {
        let tables =
            (0..pages).map(|_| core::array::from_fn(|_| tdp_core::sync::AtomicU64::new(0))).collect();
        let free = (0..pages as u32).rev().collect();
        SyncHost { tables, free: Mutex::new(free), flushes: AtomicU64::new(0) }
    }
    fn index(pfn: Pfn) -> usize {
        (pfn.0 - BASE_PFN) as usize
    }
}

impl TableMemory for SyncHost {
    type WalkGuard<'g>
        = ()
    where
        Self: 'g;
    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        let index = self.free.lock().map_err(|_| AllocError)?.pop().ok_or(AllocError)?;
        for entry in &self.tables[index as usize] {
            entry.store(fill.0, tdp_core::sync::Ordering::Relaxed);
        }
        Ok(Pfn(BASE_PFN + u64::from(index)))
    }
    fn table(&self, pfn: Pfn) -> &Table {
        &self.tables[Self::index(pfn)]
    }
    fn free_table_deferred(&self, _pfn: Pfn) {
        // Nothing is freed while the benchmark's MMUs live; the arena goes with the host.
    }
    fn free_table_now(&self, pfn: Pfn) {
        if let Ok(mut free) = self.free.lock() {
            free.push(Self::index(pfn) as u32);
        }
    }
    fn begin_walk(&self) -> Self::WalkGuard<'_> {}
}

impl HostTranslate for SyncHost {
    fn translate(&self, slot: &Memslot, gfn: Gfn, _write: bool) -> Result<HostPage, HostFaultError> {
        let pfn = Pfn(slot.host_addr(gfn) >> PAGE_SHIFT);
        Ok(HostPage { pfn, writable: true, level: Level::L1, memory: HostMemory::Ram })
    }
}

impl TlbFlush for SyncHost {
    fn flush_all(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
}
impl MmuYield for SyncHost {}
impl MmuEvents for SyncHost {}

/// No external tables: no mirror roots.
impl ExternalTables for SyncHost {}

/// Faults gfns `[start, end)` for write on `vcpu`, each until it is fixed (the threads share the upper
/// tables, so a fault that loses the race to link one retries, as a vCPU re-executes); returns how many
/// faults ended in anything else.
fn fault_range(mmu: &Mmu<SyncHost>, vcpu: &mut VcpuMmu, start: u64, end: u64) -> u64 {
    let mut not_fixed = 0;
    for gfn in start..end {
        let fault = Fault {
            as_id: AsId(0),
            gpa: Gfn(gfn).gpa(),
            access: AccessKind::Write,
            kind: FaultKind::Violation { present: false },
        };
        let mut retries = 0u32;
        loop {
            match mmu.handle_fault(vcpu, std::hint::black_box(fault), &mut ()) {
                Ok(FaultOutcome::Fixed) => break,
                Ok(FaultOutcome::Retry) if retries < 1000 => retries += 1,
                _ => {
                    not_fixed += 1;
                    break;
                }
            }
        }
    }
    not_fixed
}

/// A fresh MMU over `pages` pages, with `threads` vCPUs (roots loaded) ready to fault.
fn fresh(pages: u64, threads: usize) -> (Mmu<SyncHost>, Vec<VcpuMmu>) {
    let host = SyncHost::new(arena_pages(pages, Level::L1) + 16 * threads);
    let mmu = Mmu::new(host, MmuConfig::EPT).expect("a valid config");
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), pages, GUEST_BASE, SlotFlags::empty());
    mmu.write().insert_memslot(slot).expect("a valid slot");
    let vcpus = (0..threads)
        .map(|_| {
            let mut vcpu = VcpuMmu::new();
            mmu.load_root(&mut vcpu, AsId(0)).expect("a page for the root");
            vcpu
        })
        .collect();
    (mmu, vcpus)
}

/// Wall-clock nanoseconds per fault for `threads` threads faulting disjoint parts of `pages` pages.
fn run_threads(pages: u64, threads: usize) -> f64 {
    let (mmu, mut vcpus) = fresh(pages, threads);
    let per = pages / threads as u64;
    let start = std::sync::Barrier::new(threads);
    // Each thread times its own part, from leaving the barrier to its last fault; the run is the first
    // start to the last end. (Timing from the main thread after the barrier undercounted: on two cores
    // the main thread could be scheduled only after the workers had run, and one run read 5.2x.)
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let workers: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, vcpu)| {
                let (mmu, start) = (&mmu, &start);
                s.spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    let begin = i as u64 * per;
                    assert_eq!(
                        fault_range(mmu, vcpu, begin, begin + per),
                        0,
                        "every fault in a fresh table installs"
                    );
                    (t, Instant::now())
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a faulting thread")).collect()
    });
    let first = spans.iter().map(|s| s.0).min().expect("at least one thread");
    let last = spans.iter().map(|s| s.1).max().expect("at least one thread");
    let ns = last.duration_since(first).as_nanos() as f64;

    for vcpu in &mut vcpus {
        mmu.release_vcpu(vcpu);
    }
    ns / (per * threads as u64) as f64
}

/// Measures one and two threads over 1 GiB (256 Ki faults); pushes the rows and a note.
pub fn measure(cfg: &Config, out: &mut Outcome) {
    let pages = PAGES_1G;
    let rounds = Rounds::<2>::run(cfg.warmup, cfg.reps, || [run_threads(pages, 1), run_threads(pages, 2)]);
    let (one, two) = (rounds.median(0), rounds.median(1));
    out.rows.push(Row::new("fault_4k_parallel_2_threads/one_thread", two, one, "ns/fault"));
    // The scaling ratio as a row against its target (1.8x): ours = one / two, peer = 1.8.
    out.rows.push(Row::new("fault_4k_parallel_scaling/target_1.8x", one / two, 1.8, "x"));
    out.notes.push(format!(
        "parallel 4K faults over 1 GiB: one thread {one:.1} ns/fault (spread {:.0}%), two threads on disjoint \
         halves {two:.1} ns/fault of wall time (spread {:.0}%): {:.2}x the throughput of one (target 1.8x, limit \
         2.0 on two cores); per fault 4 locked instructions, none on a line the other thread writes",
        100.0 * rounds.spread(0),
        100.0 * rounds.spread(1),
        one / two
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_thread_counts_map_every_page() {
        assert!(run_threads(4096, 1) > 0.0);
        assert!(run_threads(4096, 2) > 0.0);
    }
}
