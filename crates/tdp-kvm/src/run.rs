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

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Errno, Error, Result};
use crate::ring_full::{KVM_EXIT_DIRTY_RING_FULL, RingFullEvent, RingFullHandler, Throttle};
use crate::tracker::{DirtyTracker, TrackingMode, VcpuHandle};

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
    handler: RingFullHandler<'t>,
}

impl std::fmt::Debug for VcpuRunner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner").field("handle", &self.handler.handle()).finish_non_exhaustive()
    }
}

impl<'t> VcpuRunner<'t> {
    /// A runner for the vCPU `handle` (from [`DirtyTracker::attach_vcpu`]).
    #[must_use]
    pub fn new(tracker: &'t DirtyTracker, handle: VcpuHandle) -> Self {
        VcpuRunner { tracker, handler: RingFullHandler::new(tracker, handle) }
    }

    /// Installs the hook called after each ring-full exit has been harvested and reset, before the vCPU
    /// resumes.
    #[must_use]
    pub fn with_throttle(mut self, hook: impl FnMut(&RingFullEvent) -> Throttle + Send + 't) -> Self {
        self.handler = self.handler.with_throttle(hook);
        self
    }

    /// The vCPU this runner drives.
    #[must_use]
    pub const fn handle(&self) -> VcpuHandle {
        self.handler.handle()
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
        // An unattached handle is an error in every mode, before the vCPU runs.
        self.tracker.vcpu(self.handler.handle())?;
        let ring_mode =
            matches!(self.tracker.mode(), TrackingMode::Ring(_) | TrackingMode::RingWithBitmap(_));
        loop {
            // Notes how much of the ring anyone has harvested: if a ring-full exit then finds nothing, this
            // tells a race with a collect (progress) from a stuck ring (none).
            if ring_mode {
                self.handler.before_run()?;
            }
            match vcpu.run() {
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) if ring_mode => {}
                Ok(exit) => return Ok(on_exit(exit)),
                Err(e) => return Err(Error::Run { errno: Errno(e.errno()) }),
            }
            self.handler.on_ring_full()?;
        }
    }
}
