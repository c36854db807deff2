//! What the vCPUs of one group write on every fault, on a cache line of their own: their count on the
//! fault path's read side of the MMU lock (Linux's percpu-rwsem, the "big reader" lock) and their share
//! of the leaf counters. With the lock word of a plain reader/writer lock and one leaf counter per VM,
//! every fault writes two lines that every other vCPU's faults write too; on a fault of a few dozen
//! nanoseconds, passing those lines between cores, not the work, sets the pace (two threads faulting
//! disjoint ranges ran at 0.1-0.2x the throughput of one).
//!
//! The read side, per group, is one word: the count of faults inside, and a writer bit.
//! - A fault adds one to its group's word and looks at the value it replaced: with the writer bit set it
//!   takes the one back and falls back to the lock's ordinary read side, which waits for the writer.
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
                core::hint::spin_loop();
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
    /// The read side for a fault whose vCPU group has `line`: the group's count, or the lock's read
    /// side while a writer is there.
    #[inline]
    pub(super) fn for_fault(lock: &'a RwLock<R, MemslotSet>, line: &'a GroupLine) -> Self {
        if line.try_enter() {
            // SAFETY: the group's count is held and no writer was there when it was taken: a writer sets
            // its bit in every group and waits for each count to drain before it touches the data
            // (`block`), and clears the bits only when done with it, so the data is not written (and no
            // `&mut` to it exists) until this guard drops.
            let slots = unsafe { &*lock.data_ptr() };
            SlotsRead::Group { slots, line }
        } else {
            SlotsRead::Locked(lock.read())
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
