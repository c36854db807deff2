//! `KVM_EXIT_DIRTY_RING_FULL` in the VMM's own run loop: [`RingFullHandler`] is the one call a VMM makes
//! when its loop sees exit reason 31, whatever its `kvm-ioctls` version names that exit
//! (`VcpuExit::Unsupported(31)` up to 0.25, a named variant later, or `kvm_run.exit_reason` read by hand).
//! It harvests that vCPU's ring into the tracker's pending set, resets, and calls the throttle hook
//! (the same hook as [`VcpuRunner`](crate::VcpuRunner), which is built on it).
//!
//! # One consumer per ring
//! KVM keeps no consumer index for user space: whoever harvests a ring owns its position. Every harvest of
//! a tracked ring goes through the tracker (collects and this handler take the ring's lock), so a VMM must
//! never map or harvest a tracked vCPU's ring itself, and makes one handler per vCPU thread.
//!
//! Keeps: I4 across ring-full exits (harvested entries are published to the pending set, never dropped,
//! even when the reset fails) and I5 against a stuck ring (a ring-full exit that finds nothing to harvest,
//! nothing reset and no harvest by anyone since the vCPU's last entry is an error, not an endless loop).

use std::sync::atomic::Ordering;
use std::time::Duration;

pub use crate::abi::KVM_EXIT_DIRTY_RING_FULL;
use crate::error::{Error, Result};
use crate::tracker::{Batch, DirtyTracker, VcpuHandle};

/// What the throttle hook learns at each ring-full exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RingFullEvent {
    /// The vCPU.
    pub vcpu: VcpuHandle,
    /// Entries harvested from its ring at this exit.
    pub harvested: usize,
    /// Entries KVM reset (all vCPUs' rings) at this exit.
    pub reset: u32,
    /// Entries harvested from this vCPU's ring so far (collects included).
    pub vcpu_total: u64,
    /// Ring-full exits of this vCPU so far, this one included.
    pub exits: u64,
}

/// What the throttle hook tells the handler after a ring-full exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Throttle {
    /// Resume the vCPU at once.
    Resume,
    /// Sleep this long on the vCPU thread, then resume (QEMU's dirty-limit slows a vCPU this way).
    Sleep(Duration),
}

/// Whether `exit_reason` (`kvm_run.exit_reason`, or the number inside `VcpuExit::Unsupported`) is
/// `KVM_EXIT_DIRTY_RING_FULL`.
///
/// ```
/// assert!(tdp_kvm::is_ring_full_exit(31));
/// assert!(!tdp_kvm::is_ring_full_exit(2)); // KVM_EXIT_IO
/// ```
#[must_use]
pub const fn is_ring_full_exit(exit_reason: u32) -> bool {
    exit_reason == KVM_EXIT_DIRTY_RING_FULL
}

/// Whether a ring-full exit made no progress and none can be made by resuming: this exit harvested
/// nothing, KVM reset nothing, and nobody (a collect) harvested the ring since `mark`, the count at the
/// vCPU's entry into the guest (or, without [`RingFullHandler::before_run`], at the end of the previous
/// exit). A collect racing the exit takes the entries itself; that is progress, not a loop.
pub(crate) const fn ring_full_is_stuck(
    harvested: usize,
    reset: u32,
    harvested_before: u64,
    mark: u64,
) -> bool {
    harvested == 0 && reset == 0 && harvested_before == mark
}

type ThrottleHook<'t> = Box<dyn FnMut(&RingFullEvent) -> Throttle + Send + 't>;

/// Handles `KVM_EXIT_DIRTY_RING_FULL` for one vCPU in a run loop the VMM owns (see the module docs).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::{DirtyTracker, Error, RingFullHandler, Throttle, TrackingMode, fd};
/// let kvm = match fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = fd::create_vm(&kvm)?;
/// let cfg = match fd::enable_dirty_ring(&vm, 4096) {
///     Ok((_, cfg)) => cfg,
///     Err(Error::NoDirtyRing) => { println!("SKIPPED: no ring"); return Ok(()) }
///     Err(e) => return Err(e.into()),
/// };
/// let tracker = DirtyTracker::from_fd(&vm, TrackingMode::Ring(cfg))?;
/// let vcpu = fd::create_vcpu(&vm, 0)?;
/// let mut handler = RingFullHandler::new(&tracker, tracker.attach_vcpu_fd(&vcpu)?)
///     .with_throttle(|ev| if ev.exits > 100 { Throttle::Sleep(std::time::Duration::from_millis(1)) } else { Throttle::Resume });
/// // In the VMM's loop: `VcpuExit::Unsupported(r) if tdp_kvm::is_ring_full_exit(r) => handler.on_ring_full()?`.
/// // Here no guest ran, so a (spurious) call finds nothing and says so instead of looping.
/// handler.before_run()?;
/// assert!(matches!(handler.on_ring_full(), Err(Error::RingFullNothingToHarvest { vcpu: 0, .. })));
/// # Ok(()) }
/// ```
pub struct RingFullHandler<'t> {
    tracker: &'t DirtyTracker,
    handle: VcpuHandle,
    throttle: Option<ThrottleHook<'t>>,
    scratch: Batch,
    /// Entries harvested from this ring by anyone, as counted at the last `before_run` or handled exit.
    mark: Option<u64>,
}

impl std::fmt::Debug for RingFullHandler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingFullHandler").field("handle", &self.handle).finish_non_exhaustive()
    }
}

impl<'t> RingFullHandler<'t> {
    /// A handler for the vCPU `handle` (from [`DirtyTracker::attach_vcpu_fd`]).
    #[must_use]
    pub fn new(tracker: &'t DirtyTracker, handle: VcpuHandle) -> Self {
        RingFullHandler { tracker, handle, throttle: None, scratch: Batch::default(), mark: None }
    }

    /// Installs the hook called after each ring-full exit has been harvested and reset, before the vCPU
    /// resumes.
    #[must_use]
    pub fn with_throttle(mut self, hook: impl FnMut(&RingFullEvent) -> Throttle + Send + 't) -> Self {
        self.throttle = Some(Box::new(hook));
        self
    }

    /// The vCPU this handler serves.
    #[must_use]
    pub const fn handle(&self) -> VcpuHandle {
        self.handle
    }

    /// Optional, right before each `KVM_RUN`: notes how much of the ring has been harvested, so that a
    /// stuck ring is reported at its first empty ring-full exit. Without it, a stuck ring is reported at
    /// the latest at its second (a collect between two exits counts as progress once).
    ///
    /// # Errors
    /// [`Error::VcpuNotAttached`], [`Error::Poisoned`].
    pub fn before_run(&mut self) -> Result<()> {
        let state = self.tracker.vcpu(self.handle)?;
        self.mark = Some(state.counters.harvested.load(Ordering::Relaxed));
        Ok(())
    }

    /// Handles one `KVM_EXIT_DIRTY_RING_FULL`: harvests this vCPU's ring into the tracker's pending set
    /// (the next collect returns the pages), resets, calls the throttle hook (sleeping on this thread if it
    /// says so) and returns what happened. Then the VMM runs the vCPU again.
    ///
    /// # Errors
    /// [`Error::RingNotEnabled`] (the tracker has no ring); [`Error::RingFullNothingToHarvest`] if the exit
    /// found nothing to harvest or reset and no one harvested the ring since the mark (resuming would loop
    /// forever); [`Error::VcpuNotAttached`]; an error of `KVM_RESET_DIRTY_RINGS` (the harvested pages are
    /// pending all the same).
    pub fn on_ring_full(&mut self) -> Result<RingFullEvent> {
        let state = self.tracker.vcpu(self.handle)?;
        let (harvested, reset, before) = self.tracker.harvest_ring_full(&state, &mut self.scratch)?;
        let mark = self.mark.take().unwrap_or(before.wrapping_add(1));
        let vcpu_total = state.counters.harvested.load(Ordering::Relaxed);
        self.mark = Some(vcpu_total);
        if ring_full_is_stuck(harvested, reset, before, mark) {
            let published_elsewhere = self.tracker.count_published(&state)?;
            return Err(Error::RingFullNothingToHarvest { vcpu: self.handle.0, published_elsewhere });
        }
        let ev = RingFullEvent {
            vcpu: self.handle,
            harvested,
            reset,
            vcpu_total,
            exits: state.counters.ring_full_exits.load(Ordering::Relaxed),
        };
        if let Some(hook) = &mut self.throttle
            && let Throttle::Sleep(d) = hook(&ev)
        {
            std::thread::sleep(d);
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::ring_full_is_stuck;

    #[test]
    fn i5_ring_full_without_progress_is_stuck_and_any_progress_is_not() {
        assert!(ring_full_is_stuck(0, 0, 10, 10), "nothing harvested, reset or taken by a collect");
        assert!(!ring_full_is_stuck(1, 0, 10, 10), "this exit harvested");
        assert!(!ring_full_is_stuck(0, 3, 10, 10), "KVM reset entries a collect had harvested");
        assert!(!ring_full_is_stuck(0, 0, 12, 10), "a collect harvested and reset the ring meanwhile");
    }
}
