//! I4 as a property: random multi-vCPU write workloads on the mock, with vCPUs on threads, logging turned
//! off and on mid-run (between rounds or while the vCPUs run), huge pages split (on demand or eagerly)
//! and recovered; after every round every page whose contents changed since the last harvest must be in
//! the harvest. Runs on `MmuConfig::EPT` and `MmuConfig::NPT` (write protection) and `MmuConfig::EPT_PML`
//! (D bits and the mock's Page-Modification Logging), with the marks going to a recording sink, to
//! per-slot `DirtyBitmap`s in get-and-clear and manual-protect modes, or to a `DirtyRingProducer` per
//! vCPU whose soft-full exits harvest and reset the ring while the other vCPUs run (`trackers`).
//!
//! Checks: I4 (`DirtyShadow` by contents; for a round in which logging started while vCPUs ran, every
//! write that began after the start returned; no ring push refused as full), I1-I3 after every round
//! (`Machine::check_all`), and I2's no-leak rule at the end.

#[path = "i4_logging/trackers.rs"]
mod trackers;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use proptest::prelude::*;
use tdp_core::addr::{AsId, Gfn, Gpa, Level, PAGE_SHIFT, SlotId};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, MmuConfig, PageCache};
use tdp_mock::checker::{DirtyPage, DirtyShadow};
use tdp_mock::{HostConfig, Machine, MockHost, Vcpu};
use trackers::{Marks, Tracker};

/// Rounds of concurrent accesses per run, with a harvest after each.
const ROUNDS: usize = 6;
/// Accesses per vCPU per round (at least), in the property test.
const ACCESSES: usize = 40;
/// Accesses each vCPU makes after it saw a mid-round toggle return, so some certainly follow it.
const AFTER_TOGGLE: usize = 8;
/// Slot A: 2 MiB-aligned, so it gets huge pages; its logging is toggled.
const A: SlotId = SlotId(1);
const A_BASE: u64 = 0x200;
const A_PAGES: u64 = 2 * 512 + 37;
/// Slot B: misaligned and small, 4 KiB pages only; always logged.
const B: SlotId = SlotId(2);
const B_BASE: u64 = 0x1003;
const B_PAGES: u64 = 150;

const CONFIGS: [(&str, MmuConfig); 3] =
    [("ept", MmuConfig::EPT), ("npt", MmuConfig::NPT), ("ept-pml", MmuConfig::EPT_PML)];

/// When slot A's logging goes off and back on.
#[derive(Clone, Copy, Debug)]
struct Toggle {
    /// Logging stops after (or, mid-round, during) this round.
    off: usize,
    /// Logging starts again after (or during) this round.
    on: usize,
    /// Toggle while the vCPU threads run instead of between rounds.
    mid_round: bool,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    seed: u64,
    vcpus: usize,
    /// Percentage of accesses that are writes.
    write_pct: u64,
    eager_split: bool,
    toggle: Option<Toggle>,
    tracker: Tracker,
    /// Accesses per vCPU per round (at least).
    accesses: usize,
}

fn workload() -> impl Strategy<Value = Workload> {
    let toggle = (0..ROUNDS - 2)
        .prop_flat_map(|off| (Just(off), off + 1..ROUNDS - 1, any::<bool>()))
        .prop_map(|(off, on, mid_round)| Toggle { off, on, mid_round });
    let tracker = prop_oneof![
        Just(Tracker::Recorder),
        Just(Tracker::Bitmap),
        Just(Tracker::ManualProtect),
        Just(Tracker::Ring)
    ];
    (any::<u64>(), 2usize..=3, 20u64..=100, any::<bool>(), proptest::option::of(toggle), tracker).prop_map(
        |(seed, vcpus, write_pct, eager_split, toggle, tracker)| Workload {
            seed,
            vcpus,
            write_pct,
            eager_split,
            toggle,
            tracker,
            accesses: ACCESSES,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn i4_every_changed_page_is_in_the_next_harvest(w in workload()) {
        for (name, cfg) in CONFIGS {
            let _ = Run::new(name, cfg, w).go();
        }
    }
}

/// The I4 rule for the round in which logging started while vCPUs ran: every write that began after
/// the start returned must be harvested, whatever the vCPUs were doing when it happened.
#[test]
fn i4_logging_started_under_running_vcpus_misses_nothing() {
    for (name, cfg) in CONFIGS {
        for seed in 0..3 {
            let toggle = Some(Toggle { off: 0, on: 1, mid_round: true });
            let (eager_split, tracker) = (seed == 1, Tracker::Recorder);
            let w =
                Workload { seed, vcpus: 3, write_pct: 100, eager_split, toggle, tracker, accesses: ACCESSES };
            let _ = Run::new(name, cfg, w).go();
        }
    }
}

/// Dirty rings small enough that write-heavy rounds fill them: every soft-full exit harvests and
/// resets one vCPU's ring while the others keep writing, and still no write is missing from the
/// round's harvest (early harvests included), and no push is ever refused.
#[test]
fn i4_no_loss_across_ring_full() {
    for (name, cfg) in CONFIGS {
        let toggle = Some(Toggle { off: 1, on: 2, mid_round: false });
        // With PML a ring has 1024 entries and exits at 448: a vCPU needs a full PML log (512 pages
        // dirtied) between harvests to reach it, hence the long rounds.
        let w = Workload {
            seed: 7,
            vcpus: 2,
            write_pct: 100,
            eager_split: false,
            toggle,
            tracker: Tracker::Ring,
            accesses: 1500,
        };
        let exits = Run::new(name, cfg, w).go();
        assert!(exits >= 1, "{name}: the rings filled up and the vCPUs exited ({exits} soft-full exits)");
    }
}

/// One write a vCPU made: the sequence number taken before the access began, and the page.
type Write = (u64, DirtyPage);

struct Run {
    name: &'static str,
    w: Workload,
    m: Machine,
    vcpus: Vec<Vcpu>,
    marks: Marks,
    slots: [Memslot; 2],
    /// Taken by every access before it starts, so a write can be ordered against a logging start.
    seq: AtomicU64,
}

/// Whether slot A's harvest is checked after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AState {
    /// Logged for the whole round: the shadow check applies.
    Logged,
    /// Logging started during the round at this sequence number: writes that began later must be in.
    StartedAt(u64),
    /// Not logged for some of the round: nothing is owed.
    Off,
}

impl Run {
    fn new(name: &'static str, cfg: MmuConfig, w: Workload) -> Run {
        let host = HostConfig { host_level: Level::L2, ..HostConfig::default() };
        let m = Machine::new(cfg, host).expect("a valid configuration");
        let slots = [
            m.ram_slot(AsId(0), A, Gfn(A_BASE), A_PAGES, SlotFlags::empty()),
            m.ram_slot(AsId(0), B, Gfn(B_BASE), B_PAGES, SlotFlags::empty()),
        ];
        for s in slots {
            m.mmu().write().insert_memslot(s).expect("valid slots");
        }
        let marks = Marks::new(w.tracker, &slots, w.vcpus, cfg.pml);
        let vcpus = (0..w.vcpus)
            .map(|i| {
                let mut v = m.new_vcpu(AsId(0));
                v.set_dirty_sink(marks.sink(i));
                v
            })
            .collect();
        Run { name, w, m, vcpus, marks, slots, seq: AtomicU64::new(0) }
    }

    /// Runs the workload, checking after every round; returns the soft-full exits the rings took.
    fn go(mut self) -> u64 {
        let mmu = Arc::clone(self.m.mmu());
        // Before logging: huge mappings in A, small ones in B.
        for off in [0, 512, 1000] {
            self.vcpus[0].write_u64(&mmu, page_gpa(A, off, 0), 1).expect("prelude write");
        }
        self.vcpus[1].write_u64(&mmu, page_gpa(B, 7, 0), 1).expect("prelude write");
        assert!(mmu.stats().leaves[1] >= 2, "{}: huge leaves before logging", self.name);
        self.set_logging(B, true);
        self.set_logging(A, true);
        let mut shadow_a = DirtyShadow::new(self.m.host(), &self.slots[..1], &offsets(self.w.vcpus));
        let mut shadow_b = DirtyShadow::new(self.m.host(), &self.slots[1..], &offsets(self.w.vcpus));
        let mut a = AState::Logged;
        for round in 0..ROUNDS {
            let toggle = self.w.toggle;
            let mid = toggle.filter(|t| t.mid_round && (t.off == round || t.on == round));
            let (writes, started) = self.round(round, mid.map(|t| t.on == round));
            match (mid, started) {
                (Some(t), Some(at)) if t.on == round => a = AState::StartedAt(at),
                (Some(_), _) => a = AState::Off,
                _ => {}
            }
            let harvested = self.harvest();
            let at = format!("{} {:?} round {round}", self.name, self.w);
            if let Err(v) = shadow_b.check_harvest(self.m.host(), &harvested) {
                panic!("{at}: slot B: {v:?}");
            }
            match a {
                AState::Logged => {
                    if let Err(v) = shadow_a.check_harvest(self.m.host(), &harvested) {
                        panic!("{at}: slot A: {v:?}");
                    }
                }
                AState::StartedAt(seq) => {
                    let owed: BTreeSet<DirtyPage> =
                        writes.iter().filter(|(s, (id, _))| *s >= seq && *id == A).map(|w| w.1).collect();
                    let missing: Vec<_> = owed.difference(&harvested).collect();
                    assert!(
                        missing.is_empty(),
                        "{at}: written after logging started, not harvested: {missing:?}"
                    );
                    shadow_a.refresh(self.m.host());
                    a = AState::Logged;
                }
                AState::Off => {}
            }
            self.check(&at);
            match toggle {
                Some(t) if !t.mid_round && t.off == round => {
                    self.set_logging(A, false);
                    a = AState::Off;
                }
                Some(t) if !t.mid_round && t.on == round => {
                    self.recover_huge_pages(&at);
                    self.set_logging(A, true);
                    shadow_a.refresh(self.m.host());
                    a = AState::Logged;
                }
                _ => {}
            }
        }
        drop(mmu);
        assert_eq!(self.marks.refused(), 0, "{}: ring pushes refused as full: lost marks", self.name);
        let exits = self.marks.soft_full_exits();
        self.teardown();
        exits
    }

    /// One round: every vCPU on its own thread, started together. With `toggle` (true: start logging
    /// A, false: stop it), the main thread toggles once the vCPUs are about halfway, and each vCPU keeps
    /// going until it has made [`AFTER_TOGGLE`] accesses after seeing the toggle return. Returns the
    /// writes and, for a start, the sequence number after which writes are owed.
    fn round(&mut self, round: usize, toggle: Option<bool>) -> (Vec<Write>, Option<u64>) {
        let mmu = Arc::clone(self.m.mmu());
        let total = self.vcpus.len() * self.w.accesses;
        let progress = AtomicUsize::new(0);
        let toggled = AtomicBool::new(toggle.is_none());
        let barrier = Barrier::new(self.vcpus.len() + 1);
        let (w, seq, marks, vcpus) = (self.w, &self.seq, &self.marks, &mut self.vcpus);
        std::thread::scope(|s| {
            let workers: Vec<_> = vcpus
                .iter_mut()
                .enumerate()
                .map(|(i, vcpu)| {
                    let (mmu, progress, toggled, barrier) = (&mmu, &progress, &toggled, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        worker(vcpu, mmu, Worker { w, round, index: i, seq, progress, toggled, marks })
                    })
                })
                .collect();
            barrier.wait();
            let started = toggle.map(|on| {
                while progress.load(Ordering::Relaxed) < total / 2 {
                    std::thread::yield_now();
                }
                toggle_logging(&mmu, &w, on);
                // SeqCst: a write whose fetch_add comes after this load in the total order began after
                // the toggle (and its flush) returned.
                let at = seq.load(Ordering::SeqCst);
                toggled.store(true, Ordering::SeqCst);
                at
            });
            let writes = workers.into_iter().flat_map(|h| h.join().expect("a vCPU thread")).collect();
            (writes, started.filter(|_| toggle == Some(true)))
        })
    }

    /// Drains every PML log (KVM kicks the vCPUs), then harvests and re-protects with the tracker,
    /// running the flush it owes.
    fn harvest(&mut self) -> BTreeSet<DirtyPage> {
        let mmu = Arc::clone(self.m.mmu());
        for v in &mut self.vcpus {
            v.flush_pml(&mmu);
        }
        self.marks.harvest(&mmu)
    }

    fn set_logging(&self, id: SlotId, on: bool) {
        if id == A {
            toggle_logging(self.m.mmu(), &self.w, on);
        } else {
            let flags = if on { SlotFlags::LOG_DIRTY } else { SlotFlags::empty() };
            let mmu = self.m.mmu();
            mmu.write().set_memslot_flags(AsId(0), id, flags).expect("slot").run(mmu.host());
        }
    }

    /// While A is not logged, touching one page per 2 MiB region maps it huge again.
    fn recover_huge_pages(&mut self, at: &str) {
        let mmu = Arc::clone(self.m.mmu());
        for off in [0, 512] {
            self.vcpus[0].read_u64(&mmu, page_gpa(A, off, 0)).expect("read");
        }
        assert!(mmu.stats().leaves[1] >= 2, "{at}: huge pages are back while logging is off");
    }

    fn check(&self, at: &str) {
        let vcpus: Vec<&Vcpu> = self.vcpus.iter().collect();
        if let Err(v) = self.m.check_all(&vcpus, &self.slots) {
            let list: Vec<String> = v.iter().map(ToString::to_string).collect();
            panic!("{at}:\n  {}", list.join("\n  "));
        }
    }

    fn teardown(mut self) {
        let mmu = Arc::clone(self.m.mmu());
        for v in &mut self.vcpus {
            v.release(&mmu);
        }
        drop(mmu);
        let (host, name) = (self.m.host().clone(), self.name);
        drop(self);
        host.reclaim();
        let stats = host.alloc_stats();
        assert_eq!((stats.live, stats.deferred), (0, 0), "{name}: I2 leak {stats:?}");
    }
}

/// Turns slot A's logging on (with the eager split if the workload asks) or off, running the flush.
fn toggle_logging(mmu: &Mmu<MockHost>, w: &Workload, on: bool) {
    let flags = if on { SlotFlags::LOG_DIRTY } else { SlotFlags::empty() };
    mmu.write().set_memslot_flags(AsId(0), A, flags).expect("slot A").run(mmu.host());
    if on && w.eager_split {
        let mut cache = PageCache::new();
        mmu.write().split_huge_pages(AsId(0), A, &mut cache).expect("pages for the split");
        cache.release(mmu.host());
        assert_eq!(mmu.stats().leaves[1..], [0, 0], "no huge leaf survives an eager split");
    }
}

struct Worker<'a> {
    w: Workload,
    round: usize,
    index: usize,
    seq: &'a AtomicU64,
    progress: &'a AtomicUsize,
    /// Set once a mid-round toggle returned (true from the start when there is none).
    toggled: &'a AtomicBool,
    /// For the exit a full dirty ring forces.
    marks: &'a Marks,
}

/// One vCPU's accesses for a round: random pages, mostly in A; each write stores a value unique to
/// (round, vCPU, access) in the vCPU's own word of the page, so every write changes the page.
fn worker(vcpu: &mut Vcpu, mmu: &Mmu<MockHost>, c: Worker<'_>) -> Vec<Write> {
    let mut rng = XorShift((c.w.seed ^ ((c.round as u64) << 48) ^ ((c.index as u64 + 1) << 40)) | 1);
    let mut writes = Vec::new();
    let mut after_toggle = 0;
    for i in 0.. {
        if c.toggled.load(Ordering::SeqCst) {
            if i >= c.w.accesses && after_toggle >= AFTER_TOGGLE {
                break;
            }
            after_toggle += 1;
        }
        let (id, pages) = if rng.below(4) == 0 { (B, B_PAGES) } else { (A, A_PAGES) };
        let off = rng.below(pages);
        let gpa = page_gpa(id, off, c.index);
        // SeqCst: orders this access's start against the main thread's load after a logging start.
        let seq = c.seq.fetch_add(1, Ordering::SeqCst);
        if rng.below(100) < c.w.write_pct {
            let value = ((c.round as u64 + 1) << 40) | ((c.index as u64 + 1) << 32) | (i as u64 + 1);
            vcpu.write_u64(mmu, gpa, value).expect("writes to RAM retire");
            writes.push((seq, (id, off)));
        } else {
            vcpu.read_u64(mmu, gpa).expect("reads of RAM retire");
        }
        c.marks.after_access(c.index, mmu);
        c.progress.fetch_add(1, Ordering::Relaxed);
    }
    writes
}

/// The GPA of vCPU `index`'s word in page `off` of slot `id`.
fn page_gpa(id: SlotId, off: u64, index: usize) -> Gpa {
    let base = if id == A { A_BASE } else { B_BASE };
    Gpa(((base + off) << PAGE_SHIFT) + 8 * index as u64)
}

/// The words the shadow compares: one per vCPU.
fn offsets(vcpus: usize) -> Vec<u64> {
    (0..vcpus as u64).map(|i| 8 * i).collect()
}

/// Xorshift64: deterministic per (seed, round, vCPU), independent of thread scheduling.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
