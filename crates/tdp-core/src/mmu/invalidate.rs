//! MMU-notifier invalidation (KVM's `mmu_invalidate_seq`, `mmu_invalidate_in_progress` and
//! `mmu_invalidate_range_start/end`): how a host that changes its own mapping of guest memory (swap,
//! migration, page merging, copy-on-write) keeps the MMU from installing what it is taking away.
//!
//! The host brackets every change with [`ExclusiveMmu::invalidate_range_start`] (zaps the gfns, flushes,
//! and records an invalidation in progress over them) and [`ExclusiveMmu::invalidate_range_end`] (bumps
//! the sequence count, ends it). A fault reads the sequence count *before* it asks the host to translate
//! the gfn, translates without the MMU lock (the host may block), then takes the lock and gives up
//! ([`super::FaultOutcome::Retry`]) if an invalidation covering the gfn is in progress or any
//! invalidation ended since its read. So a translation made before or during a change never reaches an
//! SPTE: either the fault installs before the zap of `start` (which then removes it), or it sees the
//! invalidation and retries.
//!
//! As in KVM, the in-progress range is one gfn interval: the union of every range started since the
//! count was last zero (nested and overlapping invalidations widen it), and it does not tell address
//! spaces apart (a conservative retry at worst). The counters are written under the write lock and read
//! under the read lock, which orders them; only the fault's first read of the sequence count is outside
//! the lock, and it pairs (Acquire) with the Release of the count's bump in `end`, so a fault that reads
//! the new count also sees the host's new mapping.

use crate::addr::{AsId, Gfn};
use crate::sync::{AtomicU64, Ordering};

use super::ExclusiveMmu;
use crate::host::Host;

/// The invalidation state of one VM: the sequence count, the depth and the range (KVM's
/// `mmu_invalidate_seq`, `mmu_invalidate_in_progress` and `mmu_invalidate_range_start/end`).
///
/// An [`super::Mmu`] keeps one and drives it from [`ExclusiveMmu::invalidate_range_start`] / `end` and
/// its fault path; it is public so that its protocol can be model-checked on its own (the loom model in
/// `tests/loom_invalidation.rs`). [`Invalidation::begin`] and [`Invalidation::end`] are called under the
/// MMU's write lock, [`Invalidation::must_retry`] under either side, [`Invalidation::snapshot`] with no
/// lock, before the host translation it guards.
///
/// ```
/// use tdp_core::addr::Gfn;
/// use tdp_core::mmu::Invalidation;
/// let inv = Invalidation::new();
/// let seq = inv.snapshot();
/// inv.begin(Gfn(8), Gfn(16)).unwrap();
/// assert!(inv.must_retry(seq, Gfn(9)) && !inv.must_retry(seq, Gfn(20)));
/// inv.end().unwrap();
/// assert!(inv.must_retry(seq, Gfn(20)), "any end since the snapshot retries");
/// assert!(!inv.must_retry(inv.snapshot(), Gfn(9)));
/// ```
#[derive(Debug)]
pub struct Invalidation {
    /// Bumped by every `invalidate_range_end` (KVM's `mmu_invalidate_seq`).
    seq: AtomicU64,
    /// Invalidations started and not yet ended (KVM's `mmu_invalidate_in_progress`).
    in_progress: AtomicU64,
    /// The union of the ranges in progress, `[start, end)` in gfns; meaningful while `in_progress > 0`.
    start: AtomicU64,
    end: AtomicU64,
}

/// An `invalidate_range_end` without a matching start, or a start the counter cannot hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidateError {
    /// `invalidate_range_end` was called with no invalidation in progress.
    #[error("invalidate_range_end without a matching invalidate_range_start")]
    NotStarted,
    /// The range is empty or backwards.
    #[error("invalidation range {start:?}..{end:?} is empty")]
    EmptyRange {
        /// The first gfn asked for.
        start: Gfn,
        /// One past the last gfn asked for.
        end: Gfn,
    },
}

impl Default for Invalidation {
    fn default() -> Self {
        Self::new()
    }
}

impl Invalidation {
    /// Nothing in progress, sequence count 0.
    #[must_use]
    pub fn new() -> Self {
        Invalidation {
            seq: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            start: AtomicU64::new(0),
            end: AtomicU64::new(0),
        }
    }

    /// The sequence count, read by a fault before it translates (KVM's `mmu_seq = kvm->mmu_invalidate_seq;
    /// smp_rmb()`). Acquire pairs with the Release bump in `end`.
    #[inline]
    #[must_use]
    pub fn snapshot(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// KVM's `mmu_invalidate_retry_gfn`: whether a fault on `gfn` that read `seq` before translating must
    /// retry. Called under the MMU lock (either side).
    #[inline]
    #[must_use]
    pub fn must_retry(&self, seq: u64, gfn: Gfn) -> bool {
        // Relaxed: written under the write lock, read under the read lock; the lock orders them.
        self.in_progress_at(gfn) || self.seq.load(Ordering::Relaxed) != seq
    }

    /// Whether an invalidation covering `gfn` is in progress now (pre-fault stops there). Under the MMU
    /// lock (either side).
    #[inline]
    #[must_use]
    pub fn in_progress_at(&self, gfn: Gfn) -> bool {
        self.in_progress.load(Ordering::Relaxed) != 0
            && gfn.0 >= self.start.load(Ordering::Relaxed)
            && gfn.0 < self.end.load(Ordering::Relaxed)
    }

    /// Invalidations in progress.
    #[must_use]
    pub fn depth(&self) -> u64 {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// Records an invalidation of `[start, end)` in progress (KVM's `kvm_mmu_invalidate_begin` and
    /// `kvm_mmu_invalidate_range_add`): the range becomes the union of those in progress. Under the MMU
    /// write lock; the caller then zaps the range and flushes.
    ///
    /// # Errors
    /// [`InvalidateError::EmptyRange`] when `end <= start`; nothing changed.
    pub fn begin(&self, start: Gfn, end: Gfn) -> Result<(), InvalidateError> {
        if end <= start {
            return Err(InvalidateError::EmptyRange { start, end });
        }
        // Relaxed: the write lock orders these against every reader (faults read them under the lock).
        let depth = self.in_progress.load(Ordering::Relaxed);
        if depth == 0 {
            self.start.store(start.0, Ordering::Relaxed);
            self.end.store(end.0, Ordering::Relaxed);
        } else {
            self.start.store(start.0.min(self.start.load(Ordering::Relaxed)), Ordering::Relaxed);
            self.end.store(end.0.max(self.end.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        // A saturating add keeps even a runaway host from wrapping the count back to "nothing in progress".
        self.in_progress.store(depth.saturating_add(1), Ordering::Relaxed);
        Ok(())
    }

    /// Ends the innermost invalidation (KVM's `kvm_mmu_invalidate_end`): bumps the sequence count, so
    /// that every fault that read it before retries, then drops the depth. Under the MMU write lock.
    ///
    /// # Errors
    /// [`InvalidateError::NotStarted`] when none is in progress; nothing changed.
    pub fn end(&self) -> Result<(), InvalidateError> {
        let depth = self.in_progress.load(Ordering::Relaxed);
        let Some(depth) = depth.checked_sub(1) else {
            return Err(InvalidateError::NotStarted);
        };
        // Release: a fault that reads the new count (Acquire, before translating) sees the host's new
        // mapping, which the host changed before calling this. The bump comes before the depth drops,
        // as KVM's smp_wmb() orders them, for readers outside the lock.
        self.seq.fetch_add(1, Ordering::Release);
        self.in_progress.store(depth, Ordering::Relaxed);
        Ok(())
    }
}

impl<H: Host, R: lock_api::RawRwLock> ExclusiveMmu<'_, H, R> {
    /// The host is about to change its mapping of guest frames `[start, end)` of `as_id` (KVM's
    /// `kvm_mmu_notifier_invalidate_range_start`): records an invalidation in progress over the range,
    /// zaps every leaf mapping it in every root of the address space, and runs the TLB flush, so that when
    /// this returns no vCPU can reach the old host pages and no fault can install a translation of them.
    /// Faults on these gfns retry until the matching [`ExclusiveMmu::invalidate_range_end`].
    ///
    /// Invalidations nest and overlap: the gfns of every range started since none was in progress stay
    /// covered until the last one ends, as in KVM.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{FaultOutcome, Mmu, MmuConfig, VcpuMmu};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 16, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    /// let read = |gpa| Fault { as_id: AsId(0), gpa: Gpa(gpa), access: AccessKind::Read,
    ///                          kind: FaultKind::Violation { present: false } };
    ///
    /// mmu.write().invalidate_range_start(AsId(0), Gfn(2), Gfn(4)).unwrap();
    /// // The host is changing gfns 2 and 3: a fault there retries, one elsewhere proceeds.
    /// assert_eq!(mmu.handle_fault(&mut vcpu, read(0x2000), &mut ()), Ok(FaultOutcome::Retry));
    /// assert_eq!(mmu.handle_fault(&mut vcpu, read(0x8000), &mut ()), Ok(FaultOutcome::Fixed));
    /// mmu.write().invalidate_range_end().unwrap();
    /// assert_eq!(mmu.handle_fault(&mut vcpu, read(0x2000), &mut ()), Ok(FaultOutcome::Fixed));
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    ///
    /// # Errors
    /// [`InvalidateError::EmptyRange`] when `end <= start`; nothing changed.
    pub fn invalidate_range_start(
        &mut self,
        as_id: AsId,
        start: Gfn,
        end: Gfn,
    ) -> Result<(), InvalidateError> {
        self.mmu.invalidation.begin(start, end)?;
        // The old host pages must be unreachable when this returns: zap and flush now (KVM flushes
        // before the notifier returns).
        self.zap_gfn_range(as_id, start, end).run(&self.mmu.host);
        Ok(())
    }

    /// The host finished the change announced by the matching [`ExclusiveMmu::invalidate_range_start`]
    /// (KVM's `kvm_mmu_notifier_invalidate_range_end`): bumps the sequence count, so that every fault that
    /// translated before now retries, and ends the invalidation. Owes no flush: nothing was mapped.
    /// Nested and overlapping invalidations end one at a time; faults in their union retry until the
    /// last one ends (KVM's `mmu_invalidate_in_progress` count and range).
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::fault::{AccessKind, Fault, FaultKind};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{FaultOutcome, InvalidateError, Mmu, MmuConfig, VcpuMmu};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT)?;
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 16, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0))?;
    /// let read = |gfn: u64| Fault { as_id: AsId(0), gpa: Gpa(gfn << 12), access: AccessKind::Read,
    ///                               kind: FaultKind::Violation { present: false } };
    /// mmu.write().invalidate_range_start(AsId(0), Gfn(2), Gfn(4))?;
    /// mmu.write().invalidate_range_start(AsId(0), Gfn(8), Gfn(9))?;
    /// mmu.write().invalidate_range_end()?;
    /// // One still runs: the union of both ranges still retries.
    /// assert_eq!(mmu.handle_fault(&mut vcpu, read(8), &mut ()), Ok(FaultOutcome::Retry));
    /// mmu.write().invalidate_range_end()?;
    /// assert_eq!(mmu.handle_fault(&mut vcpu, read(8), &mut ()), Ok(FaultOutcome::Fixed));
    /// assert_eq!(mmu.write().invalidate_range_end(), Err(InvalidateError::NotStarted));
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`InvalidateError::NotStarted`] when no invalidation is in progress; nothing changed.
    pub fn invalidate_range_end(&mut self) -> Result<(), InvalidateError> {
        self.mmu.invalidation.end()
    }

    /// Invalidations in progress (for checkers and tests).
    #[must_use]
    pub fn invalidations_in_progress(&self) -> u64 {
        self.mmu.invalidation.depth()
    }
}
