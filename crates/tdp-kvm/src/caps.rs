//! Opening KVM, probing and enabling the dirty ring and manual dirty-log protection.
//!
//! KVM's rules (`virt/kvm/kvm_main.c`, `kvm_vm_ioctl_enable_dirty_log_ring`): the ring size is given in
//! bytes, a power of two, at least one page and above the reserve, at most 65536 entries (`E2BIG`), set
//! once, and only before the VM's first vCPU (`EINVAL`). `KVM_CHECK_EXTENSION` on the VM answers the most
//! bytes it offers. The ACQ_REL flavour (223) has the same ABI with acquire/release ordering on the
//! flags, which our consumer always uses, so it is preferred.
//!
//! Keeps: I5 (sizes are validated here, with the values, before KVM sees them).

use std::num::NonZeroU16;
use std::os::fd::AsFd;

use crate::abi::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_NR_MEMSLOTS, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use tdp_core::dirty_ring::{PML_ENTRIES, RESERVED_ENTRIES, RingConfig};

use crate::error::{Errno, Error, Result};
use crate::sys;

/// The path of KVM's device node.
pub const KVM_PATH: &str = "/dev/kvm";

/// What a failed `open` of KVM's device node means.
pub(crate) fn open_error(path: &str, errno: i32) -> Error {
    match errno {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::NoKvm { path: path.to_owned() },
        libc::EACCES | libc::EPERM => Error::KvmPermissionDenied { path: path.to_owned() },
        errno => Error::Os { op: "open the KVM device", errno: Errno(errno) },
    }
}

/// Which dirty-ring capability a host offers.
///
/// ```
/// use tdp_kvm::{RingCap, RingSupport};
/// assert_eq!((RingCap::AcqRel.number(), RingCap::Legacy.number()), (223, 192));
/// assert_eq!(RingCap::AcqRel.name(), "KVM_CAP_DIRTY_LOG_RING_ACQ_REL");
/// assert_eq!(RingSupport::new(RingCap::AcqRel, 1 << 20).max_entries(), 65536);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingCap {
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (223, Linux 6.1+): flags are published and consumed with
    /// acquire/release ordering. Preferred.
    AcqRel,
    /// `KVM_CAP_DIRTY_LOG_RING` (192, Linux 5.11+), the original x86-only flavour.
    Legacy,
}

impl RingCap {
    /// The capability number.
    #[must_use]
    pub const fn number(self) -> u32 {
        match self {
            RingCap::AcqRel => KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            RingCap::Legacy => KVM_CAP_DIRTY_LOG_RING,
        }
    }
    /// The capability name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            RingCap::AcqRel => "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            RingCap::Legacy => "KVM_CAP_DIRTY_LOG_RING",
        }
    }
}

/// What a VM offers for the dirty ring: the capability to enable and the largest ring in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RingSupport {
    /// The capability [`enable_dirty_ring`] will enable.
    pub cap: RingCap,
    /// `KVM_CHECK_EXTENSION`'s answer: the largest ring size, in bytes.
    pub max_bytes: u64,
}

impl RingSupport {
    /// A host's offer, as [`probe_dirty_ring`] finds it (or as a test states it).
    #[must_use]
    pub const fn new(cap: RingCap, max_bytes: u64) -> Self {
        RingSupport { cap, max_bytes }
    }

    /// The largest ring in entries (16 bytes each).
    #[must_use]
    pub const fn max_entries(&self) -> u64 {
        self.max_bytes / 16
    }
}

/// Asks the VM which dirty ring it offers: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` if present, else
/// `KVM_CAP_DIRTY_LOG_RING`.
///
/// # Errors
/// [`Error::NoDirtyRing`] if neither is offered; [`Error::Ioctl`] if `KVM_CHECK_EXTENSION` fails.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// match tdp_kvm::fd::probe_dirty_ring(&vm) {
///     Ok(s) => println!("{} offers up to {} entries", s.cap.name(), s.max_entries()),
///     Err(tdp_kvm::Error::NoDirtyRing) => println!("no dirty ring: use the bitmap"),
///     Err(e) => return Err(e.into()),
/// }
/// # Ok(()) }
/// ```
pub fn probe_dirty_ring(vm: impl AsFd) -> Result<RingSupport> {
    let vm = vm.as_fd();
    for cap in [RingCap::AcqRel, RingCap::Legacy] {
        let max = sys::check_extension(vm.as_fd(), cap.number())?;
        if max > 0 {
            return Ok(RingSupport { cap, max_bytes: u64::from(max.unsigned_abs()) });
        }
    }
    Err(Error::NoDirtyRing)
}

/// Checks a ring of `entries` entries against KVM's rules and the host's maximum, without enabling it.
/// The returned geometry assumes no CPU dirty log (PML) drains into the ring (`reserved` = 64), as on
/// `kvm_pvm` and AMD hosts; on an Intel host with PML, KVM's reserve is 576 and its soft limit lower.
///
/// # Errors
/// [`Error::BadRingSize`] (with the rule), [`Error::RingLargerThanOffered`].
///
/// ```
/// use tdp_kvm::{Error, RingCap, RingSupport, check_ring_size};
/// let host = RingSupport::new(RingCap::AcqRel, 1 << 20);
/// assert_eq!(check_ring_size(&host, 4096)?.soft_limit(), 4096 - 64);
/// assert!(matches!(check_ring_size(&host, 1000), Err(Error::BadRingSize { bytes: 16000, .. })));
/// assert!(matches!(check_ring_size(&host, 128), Err(Error::BadRingSize { .. }))); // below one page
/// let small = RingSupport::new(RingCap::Legacy, 65536);
/// assert!(matches!(check_ring_size(&small, 8192), Err(Error::RingLargerThanOffered { .. })));
/// # Ok::<(), Error>(())
/// ```
pub fn check_ring_size(support: &RingSupport, entries: u32) -> Result<RingConfig> {
    check_ring_size_reserving(support, entries, 0)
}

/// [`check_ring_size`] for a host whose CPUs drain a dirty log of `cpu_log_entries` entries into the ring
/// at each exit (Intel PML: [`PML_ENTRIES`], 512; AMD's posted PML may differ). KVM reserves 64 entries
/// plus that log above the soft limit, and user space cannot ask it how many: a VMM that knows its host
/// says so here, so the soft limit (where ring-full exits happen) is right.
///
/// # Errors
/// As [`check_ring_size`]; also [`Error::BadRingSize`] if the reserve leaves no room.
///
/// ```
/// use tdp_kvm::{RingCap, RingSupport, check_ring_size_reserving};
/// let host = RingSupport::new(RingCap::AcqRel, 1 << 20);
/// let cfg = check_ring_size_reserving(&host, 4096, 512)?;
/// assert_eq!((cfg.reserved(), cfg.soft_limit()), (576, 3520));
/// assert!(check_ring_size_reserving(&host, 512, 512).is_err(), "the reserve fills the ring");
/// # Ok::<(), tdp_kvm::Error>(())
/// ```
pub fn check_ring_size_reserving(
    support: &RingSupport,
    entries: u32,
    cpu_log_entries: u32,
) -> Result<RingConfig> {
    let bytes = u64::from(entries) * 16;
    let cfg =
        RingConfig::new(entries, cpu_log_entries).map_err(|source| Error::BadRingSize { bytes, source })?;
    if bytes > support.max_bytes {
        return Err(Error::RingLargerThanOffered { bytes, max_bytes: support.max_bytes });
    }
    Ok(cfg)
}

/// Enables a dirty ring of `entries` entries per vCPU on a VM that has no vCPU yet, with the best
/// capability offered, and returns its geometry for [`DirtyRing::map_fd`](crate::DirtyRing::map_fd).
///
/// # Errors
/// [`Error::NoDirtyRing`]; [`Error::BadRingSize`] / [`Error::RingLargerThanOffered`] (checked before the
/// ioctl); [`Error::RingAfterVcpus`] when KVM answers `EINVAL` to a valid size (vCPUs exist already, or a
/// ring is already enabled); [`Error::Ioctl`] for any other errno. On error nothing was enabled.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::Error;
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// let (support, cfg) = match tdp_kvm::fd::enable_dirty_ring(&vm, 4096) {
///     Ok(x) => x,
///     Err(Error::NoDirtyRing) => { println!("SKIPPED: no dirty ring on this host"); return Ok(()) }
///     Err(e) => return Err(e.into()),
/// };
/// assert_eq!(cfg.entries(), 4096);
/// assert!(u64::from(cfg.bytes()) <= support.max_bytes);
/// // Once vCPUs exist, a second enable is refused with a clear error.
/// let _vcpu = tdp_kvm::fd::create_vcpu(&vm, 0)?;
/// assert!(matches!(tdp_kvm::fd::enable_dirty_ring(&vm, 4096), Err(Error::RingAfterVcpus { .. })));
/// # Ok(()) }
/// ```
pub fn enable_dirty_ring(vm: impl AsFd, entries: u32) -> Result<(RingSupport, RingConfig)> {
    enable_dirty_ring_reserving(vm, entries, 0)
}

/// [`enable_dirty_ring`] on a host whose CPUs drain a dirty log of `cpu_log_entries` entries into the ring
/// (see [`check_ring_size_reserving`]); the returned geometry has KVM's reserve and soft limit.
///
/// # Errors
/// As [`enable_dirty_ring`].
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// if let Ok((_, cfg)) = tdp_kvm::fd::enable_dirty_ring_reserving(&vm, 4096, 512) {
///     assert_eq!(cfg.soft_limit(), 4096 - 64 - 512);
/// }
/// # Ok(()) }
/// ```
pub fn enable_dirty_ring_reserving(
    vm: impl AsFd,
    entries: u32,
    cpu_log_entries: u32,
) -> Result<(RingSupport, RingConfig)> {
    let vm = vm.as_fd();
    let support = probe_dirty_ring(vm)?;
    let cfg = check_ring_size_reserving(&support, entries, cpu_log_entries)?;
    let bytes = u64::from(cfg.bytes());
    match sys::enable_cap(vm.as_fd(), support.cap.number(), bytes) {
        Ok(()) => Ok((support, cfg)),
        Err(Errno(libc::EINVAL)) => {
            let pml_min = (RESERVED_ENTRIES + PML_ENTRIES) * 16;
            let pml_note = if bytes <= u64::from(pml_min) {
                ", or the host drains PML into the ring and needs more than 576 entries"
            } else {
                ""
            };
            Err(Error::RingAfterVcpus { bytes, pml_note })
        }
        Err(Errno(libc::E2BIG)) => Err(Error::RingLargerThanOffered { bytes, max_bytes: support.max_bytes }),
        Err(errno) => Err(Error::Ioctl { ioctl: "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)", errno }),
    }
}

/// Enables `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` on a VM whose ring is enabled with
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` and which has no logged memslot yet (KVM's rules), so writes made
/// without a running vCPU are logged in each slot's bitmap; then track with
/// [`TrackingMode::RingWithBitmap`](crate::TrackingMode::RingWithBitmap). arm64 hosts need it; x86 hosts
/// do not offer it.
///
/// # Errors
/// [`Error::CapabilityMissing`] if the host does not offer it; [`Error::RingWithBitmapRefused`] if KVM
/// answers `EINVAL` (no ACQ_REL ring yet, or a logged memslot exists already); [`Error::Ioctl`] otherwise.
/// Nothing was enabled on error.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::{Error, fd};
/// let kvm = match fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = fd::create_vm(&kvm)?;
/// let Ok(_) = fd::enable_dirty_ring(&vm, 4096) else { return Ok(()) };
/// match fd::enable_ring_with_bitmap(&vm) {
///     Ok(()) => println!("writes without a vCPU go to the bitmap: use TrackingMode::RingWithBitmap"),
///     Err(Error::CapabilityMissing { number: 225, .. }) => println!("not offered (x86): TrackingMode::Ring"),
///     Err(e) => return Err(e.into()),
/// }
/// # Ok(()) }
/// ```
pub fn enable_ring_with_bitmap(vm: impl AsFd) -> Result<()> {
    let vm = vm.as_fd();
    let offered = sys::check_extension(vm, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)?;
    with_bitmap_outcome(offered, || sys::enable_cap(vm, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0))
}

/// What enabling ring-with-bitmap means for KVM's answers: `offered` (`KVM_CHECK_EXTENSION`) and the
/// errno of `KVM_ENABLE_CAP`, which runs only if offered.
fn with_bitmap_outcome(offered: i32, enable: impl FnOnce() -> Result<(), Errno>) -> Result<()> {
    if offered <= 0 {
        return Err(Error::CapabilityMissing {
            name: "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
            number: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
        });
    }
    match enable() {
        Ok(()) => Ok(()),
        Err(Errno(libc::EINVAL)) => Err(Error::RingWithBitmapRefused),
        Err(errno) => {
            Err(Error::Ioctl { ioctl: "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)", errno })
        }
    }
}

/// How many user memslots each address space of the VM may have (`KVM_CAP_NR_MEMSLOTS`, KVM's
/// `KVM_USER_MEM_SLOTS`: 32764 on x86 since Linux 5.15, 509 before), the limit to configure a
/// [`MemslotSet`](tdp_core::memslot::MemslotSet) with ([`MemslotSet::with_slot_limit`](tdp_core::memslot::MemslotSet::with_slot_limit)).
///
/// # Errors
/// [`Error::Ioctl`] if `KVM_CHECK_EXTENSION` fails; [`Error::CapabilityMissing`] if KVM answers 0 (an
/// answer above 65535, which no KVM gives, is read as 65535: ids are 16 bits).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// let limit = tdp_kvm::fd::max_memslots(&vm)?;
/// assert!(limit <= tdp_core::memslot::KVM_USER_MEM_SLOTS);
/// let slots = tdp_core::memslot::MemslotSet::with_slot_limit(tdp_core::addr::Gfn(1 << 36), limit);
/// assert_eq!(slots.slot_limit(), limit);
/// # Ok(()) }
/// ```
pub fn max_memslots(vm: impl AsFd) -> Result<NonZeroU16> {
    let answer = sys::check_extension(vm.as_fd(), KVM_CAP_NR_MEMSLOTS)?;
    let clamped = u16::try_from(answer.max(0)).unwrap_or(u16::MAX);
    NonZeroU16::new(clamped)
        .ok_or(Error::CapabilityMissing { name: "KVM_CAP_NR_MEMSLOTS", number: KVM_CAP_NR_MEMSLOTS })
}

/// Whether the VM offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, and with which flags
/// (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` = 1, `KVM_DIRTY_LOG_INITIALLY_SET` = 2).
///
/// # Errors
/// [`Error::Ioctl`] if `KVM_CHECK_EXTENSION` fails.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// let flags = tdp_kvm::fd::probe_manual_protect(&vm)?;
/// println!("manual protect flags offered: {flags:#x}");
/// # Ok(()) }
/// ```
pub fn probe_manual_protect(vm: impl AsFd) -> Result<u64> {
    let vm = vm.as_fd();
    let answer = sys::check_extension(vm.as_fd(), KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)?;
    Ok(u64::from(answer.unsigned_abs()))
}

/// Enables manual dirty-log protection: `KVM_GET_DIRTY_LOG` then only copies the bitmap, and
/// `KVM_CLEAR_DIRTY_LOG` clears and re-protects chosen pages. With `initially_set`, every page of a slot
/// starts dirty when logging is enabled (no write-protect pass at enable time).
///
/// # Errors
/// [`Error::CapabilityMissing`] if the capability (or `INITIALLY_SET`, when asked) is not offered;
/// [`Error::Ioctl`] if KVM refuses.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::Error;
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// match tdp_kvm::fd::enable_manual_protect(&vm, true) {
///     Ok(()) => println!("KVM_GET_DIRTY_LOG now only copies; KVM_CLEAR_DIRTY_LOG re-protects"),
///     Err(Error::CapabilityMissing { name, .. }) => println!("not offered: {name}"),
///     Err(e) => return Err(e.into()),
/// }
/// # Ok(()) }
/// ```
pub fn enable_manual_protect(vm: impl AsFd, initially_set: bool) -> Result<()> {
    let vm = vm.as_fd();
    let offered = probe_manual_protect(vm)?;
    let missing = |name| Error::CapabilityMissing { name, number: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 };
    if offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return Err(missing("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"));
    }
    let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if initially_set {
        if offered & KVM_DIRTY_LOG_INITIALLY_SET == 0 {
            return Err(missing("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_INITIALLY_SET"));
        }
        flags |= KVM_DIRTY_LOG_INITIALLY_SET;
    }
    sys::enable_cap(vm.as_fd(), KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
        .map_err(|errno| Error::Ioctl { ioctl: "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)", errno })
}

#[cfg(test)]
mod tests {
    use super::{open_error, with_bitmap_outcome};
    use crate::{Errno, Error};

    /// This project's hosts lack the capability, so its logic is checked on KVM's possible answers.
    #[test]
    fn i5_ring_with_bitmap_is_enabled_only_when_offered_and_refusals_are_explained() {
        let mut called = false;
        let absent = with_bitmap_outcome(0, || {
            called = true;
            Ok(())
        });
        assert!(
            matches!(absent, Err(Error::CapabilityMissing { number: 225, .. })) && !called,
            "not enabled"
        );
        assert!(with_bitmap_outcome(1, || Ok(())).is_ok());
        assert!(matches!(
            with_bitmap_outcome(1, || Err(Errno(libc::EINVAL))),
            Err(Error::RingWithBitmapRefused)
        ));
        assert!(matches!(
            with_bitmap_outcome(1, || Err(Errno(libc::EPERM))),
            Err(Error::Ioctl { errno: Errno(libc::EPERM), .. })
        ));
    }

    /// As root on a host with KVM the real failures cannot be produced, so the translation is checked on
    /// the errno values `open(2)` gives for them.
    #[test]
    fn i5_open_failures_say_absent_or_not_permitted() {
        assert!(matches!(open_error("/dev/kvm", libc::ENOENT), Error::NoKvm { .. }));
        let denied = open_error("/dev/kvm", libc::EACCES);
        assert!(matches!(denied, Error::KvmPermissionDenied { .. }));
        assert!(denied.to_string().contains("permission denied"), "{denied}");
        assert!(matches!(
            open_error("/dev/kvm", libc::EMFILE),
            Error::Os { errno: crate::Errno(libc::EMFILE), .. }
        ));
    }
}
