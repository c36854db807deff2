//! The `kvm-ioctls` conveniences (feature `kvm-ioctls`, on by default): the fd API of [`crate::fd`] and the
//! fd constructors of [`DirtyRing`] and [`DirtyTracker`] taking `kvm_ioctls::VmFd` / `VcpuFd` (of the
//! `kvm-ioctls` version this crate pins, 0.25), and opening KVM as a `kvm_ioctls::Kvm`. A VMM on another
//! `kvm-ioctls` version uses the fd API instead: every function here is a one-line wrapper of it.
//!
//! Keeps: nothing of its own; each wrapper only borrows the object's fd for the call (I5 is kept by the
//! fd API underneath).

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use tdp_core::dirty_ring::RingConfig;

use crate::bitmap::{ClearRange, DirtyLogBuffer};
use crate::caps::{KVM_PATH, RingSupport, open_error};
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::ring::DirtyRing;
use crate::tracker::{DirtyTracker, TrackingMode, VcpuHandle};
use crate::{fd, sys};

/// Opens `/dev/kvm` with errors that say what is wrong (absent, or not permitted).
///
/// # Errors
/// [`Error::NoKvm`] if the device does not exist, [`Error::KvmPermissionDenied`] if it cannot be opened
/// for lack of rights, [`Error::Os`] otherwise.
///
/// ```
/// match tdp_kvm::open_kvm() {
///     Ok(kvm) => assert!(kvm.get_api_version() >= 12),
///     Err(e) => println!("SKIPPED: {e}"),
/// }
/// ```
pub fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| open_error(KVM_PATH, e.errno()))
}

/// Opens KVM's device node at `path` (e.g. a `kvm_pvm` node or a test double), with the errors of
/// [`open_kvm`] naming that path.
///
/// # Errors
/// As [`open_kvm`].
///
/// ```
/// let e = tdp_kvm::open_kvm_at(c"/nonexistent/kvm").unwrap_err();
/// assert!(matches!(e, tdp_kvm::Error::NoKvm { ref path } if path == "/nonexistent/kvm"));
/// ```
pub fn open_kvm_at(path: &std::ffi::CStr) -> Result<Kvm> {
    Kvm::new_with_path(path).map_err(|e| open_error(&path.to_string_lossy(), e.errno()))
}

/// [`fd::probe_dirty_ring`](crate::fd::probe_dirty_ring) on a `kvm-ioctls` VM: which dirty ring the VM offers.
///
/// # Errors
/// As [`fd::probe_dirty_ring`](crate::fd::probe_dirty_ring).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = kvm.create_vm()?;
/// if let Ok(s) = tdp_kvm::probe_dirty_ring(&vm) { assert!(s.max_entries() >= 256); }
/// # Ok(()) }
/// ```
pub fn probe_dirty_ring(vm: &VmFd) -> Result<RingSupport> {
    fd::probe_dirty_ring(sys::borrow(vm))
}

/// [`fd::enable_dirty_ring`](crate::fd::enable_dirty_ring) on a `kvm-ioctls` VM: enables a ring of `entries` entries per vCPU, before the first vCPU.
///
/// # Errors
/// As [`fd::enable_dirty_ring`](crate::fd::enable_dirty_ring).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = kvm.create_vm()?;
/// if let Ok((_, cfg)) = tdp_kvm::enable_dirty_ring(&vm, 4096) { assert_eq!(cfg.entries(), 4096); }
/// # Ok(()) }
/// ```
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<(RingSupport, RingConfig)> {
    fd::enable_dirty_ring(sys::borrow(vm), entries)
}

/// [`fd::probe_manual_protect`](crate::fd::probe_manual_protect) on a `kvm-ioctls` VM: the `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags offered.
///
/// # Errors
/// As [`fd::probe_manual_protect`](crate::fd::probe_manual_protect).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let flags = tdp_kvm::probe_manual_protect(&kvm.create_vm()?)?;
/// assert!(flags <= 3, "ENABLE (1) and INITIALLY_SET (2) are the only flags");
/// # Ok(()) }
/// ```
pub fn probe_manual_protect(vm: &VmFd) -> Result<u64> {
    fd::probe_manual_protect(sys::borrow(vm))
}

/// [`fd::max_memslots`](crate::fd::max_memslots) on a `kvm-ioctls` VM: how many user memslots each
/// address space may have.
///
/// # Errors
/// As [`fd::max_memslots`](crate::fd::max_memslots).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let limit = tdp_kvm::max_memslots(&kvm.create_vm()?)?;
/// assert!(limit <= tdp_core::memslot::KVM_USER_MEM_SLOTS);
/// # Ok(()) }
/// ```
pub fn max_memslots(vm: &VmFd) -> Result<std::num::NonZeroU16> {
    fd::max_memslots(sys::borrow(vm))
}

/// [`fd::enable_manual_protect`](crate::fd::enable_manual_protect) on a `kvm-ioctls` VM: turns on manual dirty-log protection.
///
/// # Errors
/// As [`fd::enable_manual_protect`](crate::fd::enable_manual_protect).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = kvm.create_vm()?;
/// if tdp_kvm::probe_manual_protect(&vm)? & 1 != 0 { tdp_kvm::enable_manual_protect(&vm, false)?; }
/// # Ok(()) }
/// ```
pub fn enable_manual_protect(vm: &VmFd, initially_set: bool) -> Result<()> {
    fd::enable_manual_protect(sys::borrow(vm), initially_set)
}

/// [`fd::get_dirty_log`](crate::fd::get_dirty_log) on a `kvm-ioctls` VM: copies slot `slot`'s dirty bitmap into `buf`.
///
/// # Errors
/// As [`fd::get_dirty_log`](crate::fd::get_dirty_log).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::testing::{LogSetup, TestVm};
/// let Some(t) = TestVm::new_or_skip(&[(0, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
/// let mut buf = tdp_kvm::DirtyLogBuffer::new(256)?;
/// tdp_kvm::get_dirty_log(&t.vm, 0, &mut buf)?;
/// assert_eq!(buf.count(), 256); // INITIALLY_SET
/// # Ok(()) }
/// ```
pub fn get_dirty_log(vm: &VmFd, slot: u32, buf: &mut DirtyLogBuffer) -> Result<()> {
    fd::get_dirty_log(sys::borrow(vm), slot, buf)
}

/// [`fd::clear_dirty_log`](crate::fd::clear_dirty_log) on a `kvm-ioctls` VM: clears and re-protects the pages of `range`.
///
/// # Errors
/// As [`fd::clear_dirty_log`](crate::fd::clear_dirty_log).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::testing::{LogSetup, TestVm};
/// use tdp_kvm::ClearRange;
/// let Some(t) = TestVm::new_or_skip(&[(0, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
/// tdp_kvm::clear_dirty_log(&t.vm, &ClearRange { slot: 0, slot_pages: 256, first_page: 0, num_pages: 256, mask: &[u64::MAX; 4] })?;
/// let mut buf = tdp_kvm::DirtyLogBuffer::new(256)?;
/// tdp_kvm::get_dirty_log(&t.vm, 0, &mut buf)?;
/// assert_eq!(buf.count(), 0);
/// # Ok(()) }
/// ```
pub fn clear_dirty_log(vm: &VmFd, range: &ClearRange<'_>) -> Result<()> {
    fd::clear_dirty_log(sys::borrow(vm), range)
}

/// [`fd::reset_dirty_rings`](crate::fd::reset_dirty_rings) on a `kvm-ioctls` VM: re-protects every harvested ring entry of the VM.
///
/// # Errors
/// As [`fd::reset_dirty_rings`](crate::fd::reset_dirty_rings).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = kvm.create_vm()?;
/// if tdp_kvm::enable_dirty_ring(&vm, 4096).is_ok() { assert_eq!(tdp_kvm::reset_dirty_rings(&vm)?, 0); }
/// # Ok(()) }
/// ```
pub fn reset_dirty_rings(vm: &VmFd) -> Result<u32> {
    fd::reset_dirty_rings(sys::borrow(vm))
}

impl DirtyRing {
    /// [`DirtyRing::map_fd`] on a `kvm-ioctls` vCPU.
    ///
    /// # Errors
    /// As [`DirtyRing::map_fd`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
    /// let vm = kvm.create_vm()?;
    /// let Ok((_, cfg)) = tdp_kvm::enable_dirty_ring(&vm, 4096) else { return Ok(()) };
    /// let ring = tdp_kvm::DirtyRing::map(&vm.create_vcpu(0)?, cfg)?;
    /// assert_eq!(ring.fetch_index(), 0);
    /// # Ok(()) }
    /// ```
    pub fn map(vcpu: &VcpuFd, cfg: RingConfig) -> Result<Self> {
        DirtyRing::map_fd(sys::borrow(vcpu), cfg)
    }
}

impl DirtyTracker {
    /// A tracker for a VM whose dirty tracking is already set up as `mode` says (ring enabled, or manual
    /// protection enabled, by the caller).
    ///
    /// # Errors
    /// [`Error::Os`] if the VM fd cannot be duplicated.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::ManualInitiallySet)? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::ClearLog)?; // manual protect enabled by TestVm
    /// assert_eq!(tracker.mode(), TrackingMode::ClearLog);
    /// # Ok(()) }
    /// ```
    pub fn new(vm: &VmFd, mode: TrackingMode) -> Result<Self> {
        DirtyTracker::from_fd(sys::borrow(vm), mode)
    }

    /// Enables a dirty ring of `entries` entries per vCPU (before any vCPU exists) and returns a ring tracker.
    ///
    /// # Errors
    /// As [`enable_dirty_ring`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::{DirtyTracker, Error, TrackingMode};
    /// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
    /// let vm = kvm.create_vm()?;
    /// match DirtyTracker::with_ring(&vm, 4096) {
    ///     Ok(t) => assert!(matches!(t.mode(), TrackingMode::Ring(cfg) if cfg.entries() == 4096)),
    ///     Err(Error::NoDirtyRing) => println!("no ring on this host"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn with_ring(vm: &VmFd, entries: u32) -> Result<Self> {
        let (_, cfg) = enable_dirty_ring(vm, entries)?;
        DirtyTracker::new(vm, TrackingMode::Ring(cfg))
    }

    /// A get-and-clear bitmap tracker (nothing to enable).
    ///
    /// # Errors
    /// [`Error::Os`] if the VM fd cannot be duplicated.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::GetAndClear)? else { return Ok(()) };
    /// let tracker = DirtyTracker::with_bitmap(&t.vm)?;
    /// tracker.register_slot(SlotSpec::new(1, 0x10_0000, 256))?;
    /// assert!(tracker.collect()?.is_empty(), "no guest ran, nothing is dirty");
    /// # Ok(()) }
    /// ```
    pub fn with_bitmap(vm: &VmFd) -> Result<Self> {
        DirtyTracker::new(vm, TrackingMode::GetAndClear)
    }

    /// Enables manual dirty-log protection (optionally `INITIALLY_SET`) and returns a clear-log tracker.
    /// Enable it before slots get `KVM_MEM_LOG_DIRTY_PAGES`.
    ///
    /// # Errors
    /// As [`enable_manual_protect`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::{DirtyTracker, Error, TrackingMode};
    /// let kvm = match tdp_kvm::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
    /// let vm = kvm.create_vm()?;
    /// match DirtyTracker::with_clear_log(&vm, true) {
    ///     Ok(t) => assert_eq!(t.mode(), TrackingMode::ClearLog),
    ///     Err(Error::CapabilityMissing { name, .. }) => println!("no {name} on this host"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn with_clear_log(vm: &VmFd, initially_set: bool) -> Result<Self> {
        enable_manual_protect(vm, initially_set)?;
        DirtyTracker::new(vm, TrackingMode::ClearLog)
    }

    /// Attaches a vCPU: maps its ring (ring mode) and gives it per-vCPU statistics. Call once per vCPU,
    /// after creating it and before running it.
    ///
    /// # Errors
    /// [`Error::Mmap`] if the ring cannot be mapped.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tdp_kvm::testing::{LogSetup, TestVm};
    /// use tdp_kvm::{DirtyTracker, SlotSpec, TrackingMode};
    /// let Some(t) = TestVm::new_or_skip(&[(1, 0x10_0000, 256)], LogSetup::Ring(4096))? else { return Ok(()) };
    /// let tracker = DirtyTracker::new(&t.vm, TrackingMode::Ring(t.ring.ok_or("ring")?))?;
    /// let vcpu = t.vm.create_vcpu(0)?;
    /// assert_eq!(tracker.attach_vcpu(&vcpu)?.index(), 0);
    /// assert_eq!(tracker.stats()?.per_vcpu.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn attach_vcpu(&self, vcpu: &VcpuFd) -> Result<VcpuHandle> {
        self.attach_vcpu_fd(sys::borrow(vcpu))
    }
}
