//! Running a vCPU with ring-full exits handled: `KVM_RUN`, and at `KVM_EXIT_DIRTY_RING_FULL` harvest that
//! vCPU's ring into the tracker's pending set, reset, call the throttle hook, and run again. Every other
//! exit goes to the caller.
//!
//! `VcpuFd::run` returns a `VcpuExit<'a>` that borrows the vCPU mutably. A loop that returns that exit on
//! one path and calls `run` again on another is rejected by today's borrow checker (the borrow is
//! returned, so it must outlive the loop). The runner hands the exit to a closure instead: the closure's
//! result, which borrows nothing, leaves the loop, and the exit's borrow ends inside the iteration.
//!
//! Keeps: I4 across ring-full exits (harvested entries are published to the pending set, never dropped,
//! even when the reset fails) and I5 against a stuck ring (a ring-full exit with nothing to harvest,
//! nothing reset and no other harvest since the vCPU entered the guest is an error, not an endless loop).

use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Errno, Error, Result};
use crate::tracker::{Batch, DirtyTracker, TrackingMode, VcpuHandle};

/// `KVM_EXIT_DIRTY_RING_FULL`, which `kvm-ioctls` reports as `VcpuExit::Unsupported(31)`.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// What the throttle hook learns at each ring-full exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// What the throttle hook tells the runner after a ring-full exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Throttle {
    /// Resume the vCPU at once.
    Resume,
    /// Sleep this long on the vCPU thread, then resume (QEMU's dirty-limit slows a vCPU this way).
    Sleep(Duration),
}

/// Whether a ring-full exit made no progress and none can be made by resuming: this exit harvested
/// nothing, KVM reset nothing, and nobody (a collect) harvested the ring between the vCPU's entry into the
/// guest and this exit. A collect racing the exit takes the entries itself; that is progress, not a loop.
const fn ring_full_is_stuck(
    harvested: usize,
    reset: u32,
    harvested_before: u64,
    harvested_at_entry: u64,
) -> bool {
    harvested == 0 && reset == 0 && harvested_before == harvested_at_entry
}

type ThrottleHook<'t> = Box<dyn FnMut(&RingFullEvent) -> Throttle + Send + 't>;

/// Runs one vCPU on its own thread, handling ring-full exits with the tracker.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use kvm_ioctls::VcpuExit;
/// use tdp_kvm::{DirtyTracker, Throttle, VcpuRunner};
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = kvm.create_vm()?;
/// let tracker = DirtyTracker::with_bitmap(&vm)?;
/// let mut vcpu = vm.create_vcpu(0)?;
/// let handle = tracker.attach_vcpu(&vcpu)?;
/// let mut runner = VcpuRunner::new(&tracker, handle)
///     .with_throttle(|ev| if ev.exits > 100 { Throttle::Sleep(std::time::Duration::from_millis(1)) } else { Throttle::Resume });
/// // Ask KVM_RUN to return at once (as a signal would): the runner reports EINTR.
/// vcpu.set_kvm_immediate_exit(1);
/// let r = runner.run(&mut vcpu, |exit| matches!(exit, VcpuExit::Hlt));
/// assert!(r.is_err_and(|e| e.is_interrupted()));
/// # Ok(()) }
/// ```
pub struct VcpuRunner<'t> {
    tracker: &'t DirtyTracker,
    handle: VcpuHandle,
    throttle: Option<ThrottleHook<'t>>,
    scratch: Batch,
}

impl std::fmt::Debug for VcpuRunner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner").field("handle", &self.handle).finish_non_exhaustive()
    }
}

impl<'t> VcpuRunner<'t> {
    /// A runner for the vCPU `handle` (from [`DirtyTracker::attach_vcpu`]).
    #[must_use]
    pub fn new(tracker: &'t DirtyTracker, handle: VcpuHandle) -> Self {
        VcpuRunner { tracker, handle, throttle: None, scratch: Batch::default() }
    }

    /// Installs the hook called after each ring-full exit has been harvested and reset, before the vCPU
    /// resumes.
    #[must_use]
    pub fn with_throttle(mut self, hook: impl FnMut(&RingFullEvent) -> Throttle + Send + 't) -> Self {
        self.throttle = Some(Box::new(hook));
        self
    }

    /// The vCPU this runner drives.
    #[must_use]
    pub const fn handle(&self) -> VcpuHandle {
        self.handle
    }

    /// Runs the vCPU until an exit other than `KVM_EXIT_DIRTY_RING_FULL`, and returns what `on_exit` makes
    /// of that exit. Ring-full exits are handled here (harvest into the tracker's pending set, reset,
    /// throttle hook) and never reach `on_exit`. Without a dirty ring a ring-full exit cannot happen; if one
    /// did, it would be passed to `on_exit` as `VcpuExit::Unsupported(31)`.
    ///
    /// # Errors
    /// [`Error::Run`] if `KVM_RUN` fails (`EINTR` when a signal kicked the vCPU: [`Error::is_interrupted`]);
    /// [`Error::RingFullNothingToHarvest`] if a ring-full exit found nothing to harvest or reset and no one
    /// harvested the ring since the vCPU entered the guest (resuming would loop forever);
    /// [`Error::VcpuNotAttached`]; an error of `KVM_RESET_DIRTY_RINGS` (the harvested pages are pending
    /// all the same).
    pub fn run<R>(&mut self, vcpu: &mut VcpuFd, on_exit: impl FnOnce(VcpuExit<'_>) -> R) -> Result<R> {
        let state = self.tracker.vcpu(self.handle)?;
        let ring_mode = matches!(self.tracker.mode(), TrackingMode::Ring(_));
        loop {
            // Entries harvested from this ring by anyone so far: if a ring-full exit finds nothing, this
            // tells a race with a collect (progress) from a stuck ring (none).
            let harvested_at_entry = state.counters.harvested.load(std::sync::atomic::Ordering::Relaxed);
            match vcpu.run() {
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) if ring_mode => {}
                Ok(exit) => return Ok(on_exit(exit)),
                Err(e) => return Err(Error::Run { errno: Errno(e.errno()) }),
            }
            let (harvested, reset, before) = self.tracker.harvest_ring_full(&state, &mut self.scratch)?;
            if ring_full_is_stuck(harvested, reset, before, harvested_at_entry) {
                let published_elsewhere = self.tracker.count_published(&state)?;
                return Err(Error::RingFullNothingToHarvest { vcpu: self.handle.0, published_elsewhere });
            }
            let ev = RingFullEvent {
                vcpu: self.handle,
                harvested,
                reset,
                vcpu_total: state.counters.harvested.load(std::sync::atomic::Ordering::Relaxed),
                exits: state.counters.ring_full_exits.load(std::sync::atomic::Ordering::Relaxed),
            };
            if let Some(hook) = &mut self.throttle
                && let Throttle::Sleep(d) = hook(&ev)
            {
                std::thread::sleep(d);
            }
        }
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
