//! What the vCPUs of one group write on every fault, on a cache line of their own: their count on the
//! fault path's read side of the MMU lock (Linux's percpu-rwsem, the "big reader" lock) and their share
//! of the leaf counters. With the lock word of a plain reader/writer lock and one leaf counter per VM,
//! every fault writes two lines that every other vCPU's faults write too; on a fault of a few dozen
//! nanoseconds, passing those lines between cores, not the work, sets the pace (two threads faulting
//! disjoint ranges ran at 0.1-0.2x the throughput of one).
//!
//! The read side, per group, is one word: the count of faults inside, and a writer bit.
//! - A fault adds one to its group's word and looks at the value it replaced: with the writer bit set it
//!   takes the one back, waits for the writer on the lock's ordinary read side and, holding that, takes
//!   its count again (no writer can be there then).
//! - A writer, once it holds the lock for write, sets the bit in every group's word, then waits for each
//!   count to drain; it clears the bits before it lets the lock go.
//!
//! Each fault and the writer meet in one read-modify-write of the same word, so either the fault's add
//! comes first (and the writer waits for it) or the writer's bit does (and the fault backs off): one
//! locked instruction to enter, one to leave, both on the group's own line. Ordinary readers
//! (`Mmu::read`) and writers keep using the lock (`R`) itself, which also orders writers among
//! themselves; only the holder of the write side sets and clears the bits.

use core::ops::Deref;

use crossbeam_utils::CachePadded;
use lock_api::{RawRwLock, RwLock, RwLockReadGuard};

use crate::addr::Level;
use crate::memslot::MemslotSet;
use crate::sync::{AtomicU64, Ordering};

/// Groups. vCPUs are spread over them in the order they load their first root; more vCPUs than groups
/// share lines again, which costs traffic, never correctness. A power of two: a group index is masked.
pub(super) const GROUPS: usize = 32;

/// The writer bit of a group's word; the rest counts the faults inside.
const WRITER: u64 = 1 << 63;

/// One group's line.
pub(super) struct GroupLine {
    /// Faults inside the read side through this group, and [`WRITER`].
    word: AtomicU64,
    /// Present leaves per level as this group's deltas (wrapping; the sum over groups is the count).
    leaves: [AtomicU64; 3],
}

/// The groups' lines.
pub(super) struct VcpuGroups {
    groups: [CachePadded<GroupLine>; GROUPS],
    next_group: AtomicU64,
}

impl VcpuGroups {
    pub(super) fn new() -> Self {
        VcpuGroups {
            groups: core::array::from_fn(|_| {
                CachePadded::new(GroupLine {
                    word: AtomicU64::new(0),
                    leaves: core::array::from_fn(|_| AtomicU64::new(0)),
                })
            }),
            next_group: AtomicU64::new(0),
        }
    }

    /// A group for a new vCPU (round robin).
    pub(super) fn assign(&self) -> u8 {
        (self.next_group.fetch_add(1, Ordering::Relaxed) % GROUPS as u64) as u8
    }

    /// Group `group`'s line (any number: it is masked).
    #[inline]
    pub(super) fn line(&self, group: u8) -> &GroupLine {
        &self.groups[usize::from(group) & (GROUPS - 1)]
    }

    /// Called by the holder of the write lock: keeps faults out of their groups and waits for those
    /// inside to leave.
    pub(super) fn block(&self) {
        for group in &self.groups {
            // Acquire, with the loads below: what the faults did before they left is seen.
            let mut word = group.word.fetch_or(WRITER, Ordering::Acquire);
            while word & !WRITER != 0 {
                crate::sync::spin_loop();
                word = group.word.load(Ordering::Acquire);
            }
        }
    }

    /// Called by the holder of the write lock before it lets the lock go (or drops it for a while).
    /// Release: the next fault to enter sees the writer's changes.
    pub(super) fn unblock(&self) {
        for group in &self.groups {
            group.word.fetch_and(!WRITER, Ordering::Release);
        }
    }

    /// Present leaves per level, summed over the groups.
    pub(super) fn leaves(&self) -> [u64; 3] {
        core::array::from_fn(|level| {
            self.groups.iter().fold(0u64, |sum, g| sum.wrapping_add(g.leaves[level].load(Ordering::Relaxed)))
        })
    }
}

impl GroupLine {
    /// Enters the read side through this group; false (nothing held) when a writer is there.
    #[inline]
    fn try_enter(&self) -> bool {
        // Acquire: a writer's changes, made before it cleared the bit this add found clear, are seen.
        if self.word.fetch_add(1, Ordering::Acquire) & WRITER == 0 {
            return true;
        }
        self.word.fetch_sub(1, Ordering::Relaxed);
        false
    }

    /// Leaves the read side entered through this group. Release: the writer that waits for the count
    /// to drain sees everything the fault did.
    #[inline]
    fn exit(&self) {
        self.word.fetch_sub(1, Ordering::Release);
    }

    /// Adds `n` (may be negative) to this group's share of the leaves at `level`.
    #[inline]
    pub(super) fn add_leaves(&self, level: Level, n: i64) {
        // Statistics: no other data is published through them, so Relaxed.
        if let Some(counter) = self.leaves.get(level.idx()) {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// The memslots as a reader holds them: through the lock's read side, or through a vCPU group.
pub(super) enum SlotsRead<'a, R: RawRwLock> {
    /// An ordinary read guard of the MMU lock.
    Locked(RwLockReadGuard<'a, R, MemslotSet>),
    /// A fault inside the read side through its group's count.
    Group {
        /// The lock's data, valid while the count is held (no writer holds the lock's data then).
        slots: &'a MemslotSet,
        /// The group's line, whose count is held.
        line: &'a GroupLine,
    },
    /// Nothing held: only inside [`SlotsRead::unlocked`], while the yield runs.
    Released,
}

impl<'a, R: RawRwLock> SlotsRead<'a, R> {
    /// The read side for a fault whose vCPU group has `line`.
    ///
    /// Always the group's count, so that the fault path, which holds only these, has one kind of guard to
    /// deref and drop: behind a writer, the fault waits for it on the lock's read side and then takes
    /// the count ([`enter_behind_writer`]).
    #[inline]
    pub(super) fn for_fault(lock: &'a RwLock<R, MemslotSet>, line: &'a GroupLine) -> Self {
        if !line.try_enter() {
            enter_behind_writer(lock, line);
        }
        // SAFETY: the group's count is held and no writer was there when it was taken: a writer sets
        // its bit in every group and waits for each count to drain before it touches the data
        // (`block`), and clears the bits only when done with it, so the data is not written (and no
        // `&mut` to it exists) until this guard drops.
        let slots = unsafe { &*lock.data_ptr() };
        SlotsRead::Group { slots, line }
    }

    /// The line of the group whose count this holds; `None` for the lock's read side.
    #[inline]
    pub(super) fn group_line(&self) -> Option<&'a GroupLine> {
        match self {
            SlotsRead::Group { line, .. } => Some(line),
            SlotsRead::Locked(_) | SlotsRead::Released => None,
        }
    }

    /// Runs `f` with the read side dropped, then takes it again from `lock` (the lock it was taken
    /// from): a yield.
    pub(super) fn unlocked<U>(this: &mut Self, lock: &'a RwLock<R, MemslotSet>, f: impl FnOnce() -> U) -> U {
        match this {
            SlotsRead::Locked(guard) => RwLockReadGuard::unlocked(guard, f),
            SlotsRead::Group { line, .. } => {
                let line = *line;
                // Dropping the group's guard leaves the group; `Released` holds nothing, so a panic in
                // `f` leaves nothing to give back twice.
                *this = SlotsRead::Released;
                let result = f();
                *this = SlotsRead::for_fault(lock, line);
                result
            }
            SlotsRead::Released => unreachable!("a released read side is replaced before it is used"),
        }
    }
}

/// Takes `line`'s count behind a writer: waits for the writer on the lock's read side, then, with no
/// writer able to hold the lock, takes the count and lets the read side go (the count keeps the next
/// writer out from then on, as on the fast path). Holding the read side, no writer holds the lock, and a
/// writer clears its bits before it lets the lock go: the count is taken at the first try.
#[cold]
#[inline(never)]
fn enter_behind_writer<R: RawRwLock>(lock: &RwLock<R, MemslotSet>, line: &GroupLine) {
    let _no_writer = lock.read();
    while !line.try_enter() {
        crate::sync::spin_loop();
    }
}

impl<R: RawRwLock> Deref for SlotsRead<'_, R> {
    type Target = MemslotSet;

    #[inline]
    fn deref(&self) -> &MemslotSet {
        match self {
            SlotsRead::Locked(guard) => guard,
            SlotsRead::Group { slots, .. } => slots,
            SlotsRead::Released => unreachable!("a released read side is replaced before it is used"),
        }
    }
}

impl<R: RawRwLock> Drop for SlotsRead<'_, R> {
    #[inline]
    fn drop(&mut self) {
        if let SlotsRead::Group { line, .. } = self {
            line.exit();
        }
    }
}

/// Loom models of the group read side against a writer, on this module's code (`crate::sync` is loom's):
/// a fault through its group and a writer that takes the lock, blocks the groups, writes and unblocks.
/// A loom cell stands for the data the lock protects: loom fails a model where the writer's write and
/// the fault's read are not ordered (either the fault's count kept the writer waiting, or the writer's
/// bit sent the fault to wait behind it).
///
/// Run: `RUSTFLAGS="--cfg loom" cargo test -p tdp-core --lib --release --target-dir target/loom --
/// loom_model` (`cargo xtask ci` does, in its `loom` step). Checked by hand: a `try_enter` that ignores the
/// writer bit, or a `block` that does not wait for the counts to drain, fails every model; a fault behind
/// a writer that does not take its group's count fails `fault_against_two_writes`.
#[cfg(all(test, loom))]
mod loom_model {
    use super::{SlotsRead, VcpuGroups};
    use crate::addr::Gfn;
    use crate::memslot::MemslotSet;
    use crate::sync::{AtomicU64, Ordering};
    use lock_api::{GuardSend, RawRwLock, RwLock};
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    /// A reader/writer lock on loom's atomics (the shipped default, `spin`'s, spins on `core` atomics,
    /// which loom cannot schedule around).
    struct LoomRawRwLock {
        /// Readers inside, or [`LoomRawRwLock::WRITER`].
        state: AtomicU64,
    }

    impl LoomRawRwLock {
        const WRITER: u64 = u64::MAX;
    }

    // SAFETY: the state word admits either readers or one writer, with Acquire on entry and Release on exit.
    unsafe impl RawRwLock for LoomRawRwLock {
        // Loom's atomics have no `const` constructor; the models build the lock with `RwLock::from_raw`.
        const INIT: Self = panic!("build the loom lock with RwLock::from_raw");
        type GuardMarker = GuardSend;

        fn lock_shared(&self) {
            while !self.try_lock_shared() {
                crate::sync::spin_loop();
            }
        }
        fn try_lock_shared(&self) -> bool {
            let state = self.state.load(Ordering::Relaxed);
            state != Self::WRITER
                && self.state.compare_exchange(state, state + 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
        }
        unsafe fn unlock_shared(&self) {
            self.state.fetch_sub(1, Ordering::Release);
        }
        fn lock_exclusive(&self) {
            while !self.try_lock_exclusive() {
                crate::sync::spin_loop();
            }
        }
        fn try_lock_exclusive(&self) -> bool {
            self.state.compare_exchange(0, Self::WRITER, Ordering::Acquire, Ordering::Relaxed).is_ok()
        }
        unsafe fn unlock_exclusive(&self) {
            self.state.store(0, Ordering::Release);
        }
    }

    struct Vm {
        lock: RwLock<LoomRawRwLock, MemslotSet>,
        groups: VcpuGroups,
        /// What the lock protects, as loom sees it.
        data: UnsafeCell<u64>,
    }

    // SAFETY: `data` is written only by a writer holding the lock with the groups blocked, and read only
    // by holders of a read side: the protocol under test.
    unsafe impl Sync for Vm {}

    fn vm() -> Arc<Vm> {
        Arc::new(Vm {
            lock: RwLock::from_raw(LoomRawRwLock { state: AtomicU64::new(0) }, MemslotSet::new(Gfn(1 << 20))),
            groups: VcpuGroups::new(),
            data: UnsafeCell::new(0),
        })
    }

    /// The writer: the lock, the groups blocked, a write, the groups unblocked, the lock let go (the
    /// order of `Mmu::write` and the drop of its guard).
    fn write(vm: &Vm) {
        let _guard = vm.lock.write();
        vm.groups.block();
        vm.data.with_mut(|data| {
            // SAFETY: the write side is held and every group's count has drained.
            unsafe { *data += 1 }
        });
        vm.groups.unblock();
    }

    /// A fault's read side through group 0: returns the value it read.
    fn fault(vm: &Vm) -> u64 {
        let read = SlotsRead::for_fault(&vm.lock, vm.groups.line(0));
        let seen = vm.data.with(|data| {
            // SAFETY: a read side is held: no writer is between `block` and `unblock`.
            unsafe { *data }
        });
        drop(read);
        seen
    }

    fn builder() -> loom::model::Builder {
        let mut builder = loom::model::Builder::new();
        // The writer's block and unblock touch every group's word: bound the preemptions so the model
        // finishes in seconds (a race between the fault and the writer needs at most two).
        builder.preemption_bound = Some(3);
        builder
    }

    /// `faults` faults of group 0 in a row on this thread while another thread makes `writes` writes in
    /// a row; returns what each fault read.
    fn faults_against_writes(faults: usize, writes: usize) -> alloc::vec::Vec<u64> {
        let vm = vm();
        let writer = {
            let vm = Arc::clone(&vm);
            thread::spawn(move || (0..writes).for_each(|_| write(&vm)))
        };
        let seen = (0..faults).map(|_| fault(&vm)).collect();
        writer.join().expect("the writer finishes");
        seen
    }

    /// One fault against one writer: the fault reads before or after the write, never during it.
    #[test]
    fn fault_against_writer() {
        builder().check(|| {
            let seen = faults_against_writes(1, 1);
            assert!(seen[0] <= 1);
        });
    }

    /// A fault against two writes in a row: a fault that waited behind the first still holds its
    /// group's count when the second comes, so the second waits for it.
    #[test]
    fn fault_against_two_writes() {
        builder().check(|| {
            let seen = faults_against_writes(1, 2);
            assert!(seen[0] <= 2);
        });
    }

    /// Two faults of one group against a writer, the second after the first left: the count drains and
    /// the writer gets in, and a fault behind the writer waits on the lock's read side and sees the write
    /// when it comes after it.
    #[test]
    fn two_faults_against_writer() {
        builder().check(|| {
            let seen = faults_against_writes(2, 1);
            let (first, second) = (seen[0], seen[1]);
            assert!(first <= second && second <= 1, "reads go forward: {first} then {second}");
        });
    }
}
