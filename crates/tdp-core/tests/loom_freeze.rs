//! Loom models of a removed table's freeze-and-free against the lockless walker, on the shipped MMU
//! (`crate::sync` swaps in loom's atomics, so every SPTE is a loom atomic): one thread tears the tree
//! down under the write lock (`ExclusiveMmu::zap_all`: each removed table's entries are frozen, its
//! children handled, the page freed deferred), another ages the same range with no MMU lock at all
//! (`Mmu::age_gfn_range`, under a walk guard only), and a third plays the CPU setting Accessed and Dirty
//! on the leaf with a locked compare-exchange, as hardware does.
//!
//! The host is this file's: loom atomics for the walk-guard count, a deferred-free list drained when the
//! last guard drops (the `TableMemory` contract: a page freed deferred is not reused while a guard that
//! existed at the free is alive), and "reuse" made visible: a reclaimed page's first entry is
//! overwritten with a poison leaf (present, young, read-only) and the page may not be handed out by
//! `table` again. Whatever the interleaving:
//! - the walker never reads a reclaimed page (`table` on it panics) and never writes one (the poison is
//!   intact at the end: an ager that read it would have cleared its Accessed bit);
//! - the Dirty bit the CPU set is never lost: when the CPU's update won, the zap saw it (the removal's
//!   `spte_changed` event carries D); aging clears Accessed only;
//! - every page freed deferred is reclaimed once the threads are done (no leak).
//!
//! The MMU lock is the default `spin` lock: only the zapping thread takes it, so it never spins (loom
//! cannot model a lock built on `core` atomics, and needs not here). The root list's `spin` mutex is
//! taken by both, but nothing inside it is a loom operation, so loom cannot switch threads in it.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p tdp-core --test loom_freeze --release --target-dir
//! target/loom` (`cargo xtask ci` does, in its `loom` step). The ager ages gfn 0 only, so that the
//! entries it loads are the ones the race is about (the leaf and the table entries above it); a scan of
//! the whole table makes the read-lock model take minutes. Checked by hand, each model fails: freeing
//! the removed table at once (`free_table_now` in place of `free_table_deferred` in `remove_table`) is
//! caught as the ager reading a reclaimed page; a zap that freezes with a load and a store instead of an
//! exchange (under the read lock), or writes a writable, clean leaf with a plain store (under the write
//! lock), loses the CPU's Dirty bit.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use loom::sync::{Arc, Mutex};
use loom::thread;
use tdp_core::addr::{AsId, Gfn, Level, Pfn, SlotId};
use tdp_core::fault::{AccessKind, Fault, FaultKind};
use tdp_core::host::{
    AllocError, ExternalTables, HostFaultError, HostMemory, HostPage, HostTranslate, MmuEvents, MmuYield,
    Table, TableMemory, TlbFlush,
};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{Mmu, MmuConfig, VcpuMmu};
use tdp_core::spte::{Spte, SpteFormat};

/// Table pages the host owns: a root, three levels below it, and the vCPU cache's spares.
const PAGES: usize = 10;
/// The host frame behind gfn `g` (no table page has a frame number this large).
const FRAME_BASE: u64 = 0x1000;

struct Page {
    entries: Box<Table>,
    in_use: AtomicBool,
    reclaimed: AtomicBool,
}

/// The test's host: table pages with loom atomics, walk guards, deferred frees, and the removal events.
struct LoomHost {
    pages: Vec<Page>,
    walkers: AtomicUsize,
    pending: Mutex<Vec<usize>>,
    /// Every `spte_changed` for the leaf's gfn at level 1: `(old, new)`.
    leaf_events: Mutex<Vec<(Spte, Spte)>>,
    /// The poison value written into a reclaimed page's entry 0.
    poison: Spte,
}

impl LoomHost {
    fn new(poison: Spte) -> LoomHost {
        let pages = (0..PAGES)
            .map(|_| Page {
                entries: Box::new(std::array::from_fn(|_| tdp_core::sync::AtomicU64::new(0))),
                in_use: AtomicBool::new(false),
                reclaimed: AtomicBool::new(false),
            })
            .collect();
        LoomHost {
            pages,
            walkers: AtomicUsize::new(0),
            pending: Mutex::new(Vec::new()),
            leaf_events: Mutex::new(Vec::new()),
            poison,
        }
    }

    /// Reuses every page on the pending list.
    fn reclaim_pending(&self) {
        let pending: Vec<usize> = std::mem::take(&mut *self.pending.lock().unwrap());
        pending.into_iter().for_each(|at| self.reuse(at));
    }

    /// What reuse would do to page `at`: someone else's data in it (the poison in entry 0), and no
    /// walker may be handed it again.
    fn reuse(&self, at: usize) {
        let page = &self.pages[at];
        page.reclaimed.store(true, Ordering::SeqCst);
        page.entries[0].store(self.poison.0, Ordering::SeqCst);
    }

    /// Pages freed deferred that were never reclaimed.
    fn leaked(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

/// A walk guard: the last one to drop reclaims what was freed meanwhile.
struct Guard<'a>(&'a LoomHost);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.0.walkers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.reclaim_pending();
        }
    }
}

impl TableMemory for LoomHost {
    type WalkGuard<'a> = Guard<'a>;

    fn alloc_table(&self, fill: Spte) -> Result<Pfn, AllocError> {
        let at = self.pages.iter().position(|p| !p.in_use.load(Ordering::SeqCst)).ok_or(AllocError)?;
        self.pages[at].in_use.store(true, Ordering::SeqCst);
        for entry in self.pages[at].entries.iter() {
            entry.store(fill.0, Ordering::Relaxed);
        }
        Ok(Pfn(at as u64))
    }

    fn table(&self, pfn: Pfn) -> &Table {
        let page = &self.pages[pfn.0 as usize];
        assert!(!page.reclaimed.load(Ordering::SeqCst), "table page {pfn:?} used after it was reclaimed");
        &page.entries
    }

    fn free_table_deferred(&self, pfn: Pfn) {
        self.pending.lock().unwrap().push(pfn.0 as usize);
        // Fences against `begin_walk`'s: either this sees the walker, whose guard then reclaims, or the
        // walker started after the page was unlinked and cannot reach it (RCU's grace period).
        fence(Ordering::SeqCst);
        if self.walkers.load(Ordering::SeqCst) == 0 {
            self.reclaim_pending();
        }
    }

    fn free_table_now(&self, pfn: Pfn) {
        self.reuse(pfn.0 as usize);
    }

    fn begin_walk(&self) -> Guard<'_> {
        self.walkers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Guard(self)
    }
}

impl HostTranslate for LoomHost {
    fn translate(&self, _slot: &Memslot, gfn: Gfn, _write: bool) -> Result<HostPage, HostFaultError> {
        Ok(HostPage {
            pfn: Pfn(FRAME_BASE + gfn.0),
            writable: true,
            level: Level::L1,
            memory: HostMemory::Ram,
        })
    }
}

impl TlbFlush for LoomHost {
    fn flush_all(&self) {}
}

impl MmuYield for LoomHost {}

impl ExternalTables for LoomHost {}

impl MmuEvents for LoomHost {
    fn spte_changed(&self, _as_id: AsId, gfn: Gfn, level: Level, old: Spte, new: Spte) {
        if gfn == Gfn(0) && level == Level::L1 {
            self.leaf_events.lock().unwrap().push((old, new));
        }
    }
}

/// An MMU on the loom host with one slot and gfn 0 mapped by a fault: a writable 4 KiB leaf, Accessed
/// and clean (EPT with A/D bits).
fn vm() -> (Arc<Mmu<LoomHost>>, VcpuMmu) {
    let config = MmuConfig::EPT;
    let fmt: SpteFormat = config.format;
    let poison = Spte(fmt.accessed_mask() | 1 | ((FRAME_BASE + 0xdead) << 12));
    let mmu = Arc::new(Mmu::new(LoomHost::new(poison), config).expect("valid config"));
    let slot = Memslot::new(AsId(0), SlotId(0), Gfn(0), 512, 0, SlotFlags::empty());
    mmu.write().insert_memslot(slot).expect("valid slot");
    let mut vcpu = VcpuMmu::new();
    mmu.load_root(&mut vcpu, AsId(0)).expect("a root");
    let fault = Fault {
        as_id: AsId(0),
        gpa: Gfn(0).gpa(),
        access: AccessKind::Read,
        kind: FaultKind::Violation { present: false },
    };
    mmu.handle_fault(&mut vcpu, fault, &mut ()).expect("the fault maps gfn 0");
    // The fault installs a writable leaf Dirty; clear D as a dirty-log harvest does, so that the CPU's
    // next write has a Dirty bit to set.
    let (page, leaf) = leaf_entry(&mmu, &vcpu);
    mmu.host().pages[page].entries[0].store(leaf.0 & !fmt.dirty_mask(), Ordering::SeqCst);
    (mmu, vcpu)
}

/// The leaf entry of gfn 0, found by walking the tree from the vCPU's root.
fn leaf_entry(mmu: &Mmu<LoomHost>, vcpu: &VcpuMmu) -> (usize, Spte) {
    let fmt = *mmu.format();
    let mut table = vcpu.root().expect("a root").pfn();
    for level in [Level::L4, Level::L3, Level::L2] {
        let entry = Spte(mmu.host().table(table)[0].load(Ordering::SeqCst));
        table = fmt.child_table(entry, level).expect("a table entry above the leaf");
    }
    let leaf = Spte(mmu.host().table(table)[0].load(Ordering::SeqCst));
    (table.0 as usize, leaf)
}

/// The CPU's Accessed/Dirty update of a write through the leaf: a locked compare-exchange that sets both
/// while the entry is still a present, writable leaf. Returns whether it set them.
fn cpu_write(mmu: &Mmu<LoomHost>, page: usize) -> bool {
    let fmt = *mmu.format();
    let entry = &mmu.host().pages[page].entries[0];
    let old = Spte(entry.load(Ordering::SeqCst));
    if !old.is_present() || !old.is_writable() || old == mmu.host().poison {
        return false;
    }
    let new = old.0 | fmt.accessed_mask() | fmt.dirty_mask();
    entry.compare_exchange(old.0, new, Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

/// Loom's explorer for these models: every entry a table scan loads is a scheduling point (about 2,000
/// per run), so the branch limit is raised; the preemption bound keeps the search to the interleavings
/// with at most `PREEMPTIONS` forced switches, which is where such races live (loom's advice).
fn explorer() -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    builder.max_branches = 20_000;
    builder.preemption_bound = Some(PREEMPTIONS);
    builder
}

const PREEMPTIONS: usize = 2;

/// How the model's first thread tears the tree down.
#[derive(Clone, Copy)]
enum Teardown {
    /// `zap_all` under the write lock: removed tables are frozen entry by entry with plain stores, or
    /// exchanges where hardware or the fast path may still write (`write_spte_exclusive`).
    Exclusive,
    /// `invalidate_roots` under the write lock, then `zap_invalidated_roots` under the read lock: every
    /// entry is frozen with an exchange.
    Shared,
}

#[test]
fn a_table_zapped_under_the_write_lock_is_never_walked_after_reuse_and_no_dirty_bit_is_lost() {
    explorer().check(|| race(Teardown::Exclusive));
}

#[test]
fn a_root_zapped_under_the_read_lock_is_never_walked_after_reuse_and_no_dirty_bit_is_lost() {
    explorer().check(|| race(Teardown::Shared));
}

/// One run of the model: teardown, ager and CPU race; then the checks of the header.
fn race(teardown: Teardown) {
    {
        let (mmu, mut vcpu) = vm();
        let fmt = *mmu.format();
        let (leaf_page, leaf) = leaf_entry(&mmu, &vcpu);
        assert!(leaf.is_writable() && fmt.is_accessed(leaf) && !fmt.is_dirty(leaf), "setup: {leaf:?}");

        let zapper = {
            let mmu = mmu.clone();
            thread::spawn(move || match teardown {
                Teardown::Exclusive => mmu.write().zap_all(),
                Teardown::Shared => {
                    let _flush = mmu.write().invalidate_roots(None);
                    mmu.read().zap_invalidated_roots();
                }
            })
        };
        let ager = {
            let mmu = mmu.clone();
            thread::spawn(move || mmu.age_gfn_range(AsId(0), Gfn(0), Gfn(1)))
        };
        let cpu_set_dirty = cpu_write(&mmu, leaf_page);
        zapper.join().unwrap();
        let young = ager.join().unwrap();

        let host = mmu.host();
        let events = host.leaf_events.lock().unwrap().clone();
        let zapped: Vec<Spte> =
            events.iter().filter(|(_, new)| !new.is_present()).map(|(old, _)| *old).collect();
        assert_eq!(zapped.len(), 1, "the leaf is removed exactly once: {events:?}");
        if cpu_set_dirty {
            assert!(fmt.is_dirty(zapped[0]), "the CPU's Dirty bit was lost: the zap saw {:?}", zapped[0]);
        }
        // The ager saw the leaf young unless the zap froze it first: then it saw nothing.
        assert!(young || zapped[0] == leaf || fmt.is_dirty(zapped[0]), "an unaged leaf went unreported");
        let page = &host.pages[leaf_page];
        if page.reclaimed.load(Ordering::SeqCst) {
            let now = Spte(page.entries[0].load(Ordering::SeqCst));
            assert_eq!(now, host.poison, "a walker wrote into the reclaimed page");
        }
        mmu.release_vcpu(&mut vcpu);
        assert_eq!(host.leaked(), 0, "a page freed deferred was never reclaimed");
    }
}
