//! The crate's one error type: every failure names the operation (or ioctl) and carries the values and the
//! errno that explain it.
//!
//! Keeps: I5 (bad sizes, ranges and slots are refused with the values that broke the rule, before any
//! ioctl when we can tell, and with the kernel's errno translated when only the kernel can).

use std::fmt;
use std::num::NonZeroU16;

use tdp_core::addr::{AsId, RingSlot};
use tdp_core::dirty_bitmap::BitmapError;
use tdp_core::dirty_ring::RingError;

/// A positive `errno` value from the kernel, shown with its name and text.
///
/// ```
/// use tdp_kvm::Errno;
/// assert_eq!(Errno(22).to_string(), "EINVAL (Invalid argument)");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The symbolic name of the errno values KVM's dirty-tracking ioctls return, else `"errno"`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::E2BIG => "E2BIG",
            libc::ENXIO => "ENXIO",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::ENOTTY => "ENOTTY",
            libc::ENOSPC => "ENOSPC",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            _ => "errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        // std appends " (os error N)"; keep only the text.
        let text = text.split(" (os error").next().unwrap_or("");
        if self.name() == "errno" {
            write!(f, "errno {} ({text})", self.0)
        } else {
            write!(f, "{} ({text})", self.name())
        }
    }
}

/// Why a `tdp-kvm` operation failed. Unless a variant says otherwise, nothing was changed: no dirty page
/// was harvested and dropped, no slot or vCPU was half-registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` (or the given path) does not exist: no KVM on this host, or the module is not loaded.
    #[error("cannot open {path}: no such device (is KVM available and its module loaded?)")]
    NoKvm {
        /// The path tried.
        path: String,
    },
    /// `/dev/kvm` exists but this process may not open it.
    #[error("cannot open {path}: permission denied (add the user to the kvm group or run as root)")]
    KvmPermissionDenied {
        /// The path tried.
        path: String,
    },
    /// Opening `/dev/kvm` or creating the VM failed for another reason.
    #[error("{op} failed: {errno}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// A KVM capability this operation needs is not offered by the host's KVM.
    #[error("KVM capability {name} ({number}) is not offered by this host's KVM")]
    CapabilityMissing {
        /// The capability's name, e.g. `KVM_CAP_DIRTY_LOG_RING`.
        name: &'static str,
        /// Its number.
        number: u32,
    },
    /// Neither dirty-ring capability is offered (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, 223, nor
    /// `KVM_CAP_DIRTY_LOG_RING`, 192).
    #[error(
        "this host's KVM offers no dirty ring (neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL nor \
         KVM_CAP_DIRTY_LOG_RING); use the dirty bitmap instead"
    )]
    NoDirtyRing,
    /// The requested ring size breaks KVM's rules (power of two, at least one page and more than the
    /// reserve, at most 65536 entries).
    #[error("bad dirty ring size of {bytes} bytes: {source}")]
    BadRingSize {
        /// The size asked for, in bytes.
        bytes: u64,
        /// The rule it broke.
        source: RingError,
    },
    /// The ring is larger than the most this host's KVM offers (its `KVM_CHECK_EXTENSION` answer).
    #[error("dirty ring of {bytes} bytes exceeds the {max_bytes} bytes this host's KVM offers")]
    RingLargerThanOffered {
        /// The size asked for.
        bytes: u64,
        /// The host's maximum.
        max_bytes: u64,
    },
    /// KVM refused to enable the ring with `EINVAL` for a size that satisfies its rules: the VM already has
    /// vCPUs (the ring must be enabled before the first `KVM_CREATE_VCPU`), or a ring is already enabled.
    #[error(
        "KVM refused to enable a dirty ring of {bytes} bytes (EINVAL): the vm already has vCPUs (enable the \
         ring before KVM_CREATE_VCPU) or already has a dirty ring{pml_note}"
    )]
    RingAfterVcpus {
        /// The size asked for.
        bytes: u64,
        /// A note if the size is also below what a host with PML needs.
        pml_note: &'static str,
    },
    /// KVM refused `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (`EINVAL`).
    #[error(
        "KVM refused KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (EINVAL): enable it after the ring \
         (KVM_CAP_DIRTY_LOG_RING_ACQ_REL) and before any memslot has KVM_MEM_LOG_DIRTY_PAGES"
    )]
    RingWithBitmapRefused,
    /// An operation on a VM's rings was asked of a tracker or VM without a dirty ring.
    #[error("{op}: this vm does not track dirty pages with a dirty ring")]
    RingNotEnabled {
        /// The operation.
        op: &'static str,
    },
    /// An operation on the dirty bitmap was asked of a VM that uses the dirty ring (KVM: `ENXIO`).
    #[error("{op}: this vm tracks dirty pages with the dirty ring, so the dirty bitmap is disabled (ENXIO)")]
    BitmapDisabledByRing {
        /// The operation.
        op: &'static str,
    },
    /// A clear-log (or get-log) request broke KVM's argument rules; found before any ioctl.
    #[error("slot {slot}: {source}")]
    BadLogRange {
        /// The memslot (`as_id << 16 | id`).
        slot: u32,
        /// The rule and the values.
        source: BitmapError,
    },
    /// A memslot name (`as_id << 16 | id`) KVM cannot have: an address space it does not keep, or an id
    /// at or above the user memslot limit (KVM answers `EINVAL`); found before any ioctl.
    #[error(
        "{op}: memslot {slot:#x} (address space {}, id {}) is out of range: address spaces 0 to {}, ids 0 to {} \
         ({limit} user memslots per address space)",
        .slot >> 16,
        .slot & 0xffff,
        AsId::MAX_COUNT - 1,
        .limit.get() - 1
    )]
    SlotOutOfRange {
        /// The operation.
        op: &'static str,
        /// The memslot (`as_id << 16 | id`).
        slot: u32,
        /// How many ids an address space may use.
        limit: NonZeroU16,
    },
    /// The memslot does not exist in KVM, or does not log dirty pages (`KVM_MEM_LOG_DIRTY_PAGES` unset;
    /// KVM answers `ENOENT`).
    #[error("{op}: memslot {slot} does not exist or was registered without KVM_MEM_LOG_DIRTY_PAGES (ENOENT)")]
    SlotNotLogged {
        /// The ioctl.
        op: &'static str,
        /// The memslot (`as_id << 16 | id`).
        slot: u32,
    },
    /// KVM's memslot is larger than the size the caller gave, so its bitmap does not fit the buffer
    /// (the kernel's write hit the buffer's guard page: `EFAULT`).
    #[error(
        "KVM_GET_DIRTY_LOG: memslot {slot} is larger than the {pages} pages registered here (its bitmap hit \
         the buffer's guard page)"
    )]
    SlotLargerThanRegistered {
        /// The memslot.
        slot: u32,
        /// Pages the caller registered.
        pages: u64,
    },
    /// The tracker does not know this slot.
    #[error("memslot {slot:?} is not registered with the tracker")]
    SlotNotRegistered {
        /// The memslot.
        slot: RingSlot,
    },
    /// A slot with this id (or overlapping this guest range) is already registered.
    #[error("memslot {slot:?} conflicts with registered memslot {existing:?}: {why}")]
    SlotConflict {
        /// The slot being registered.
        slot: RingSlot,
        /// The registered slot.
        existing: RingSlot,
        /// Same id, or overlapping guest range.
        why: &'static str,
    },
    /// A slot of zero pages, more pages than KVM's largest memslot
    /// ([`MAX_SLOT_PAGES`](crate::MAX_SLOT_PAGES)), or one whose guest range overflows.
    #[error(
        "memslot {slot:?}: {pages} pages at guest address {guest_base:#x} is not a valid range (1 to \
         2^31 - 1 pages, not past the end of the address space)"
    )]
    BadSlot {
        /// The memslot.
        slot: RingSlot,
        /// Its size.
        pages: u64,
        /// Its guest-physical base.
        guest_base: u64,
    },
    /// Dirty runs (e.g. deserialized) that do not describe a set of the slot's pages.
    #[error("memslot {slot:?}: bad dirty run of {len} pages at page {first}: {why}")]
    BadDirtyRuns {
        /// The memslot.
        slot: RingSlot,
        /// The run's first page.
        first: u64,
        /// The run's length.
        len: u64,
        /// The rule it broke.
        why: &'static str,
    },
    /// A dirty epoch that was committed away, or a checkpoint not taken yet.
    #[error("checkpoint {requested} is not available (kept: {oldest}..={current})")]
    EpochUnavailable {
        /// The checkpoint asked for.
        requested: u64,
        /// The oldest kept.
        oldest: u64,
        /// The latest.
        current: u64,
    },
    /// The operation needs another tracking mode than the tracker's.
    #[error("{op} is not available in tracking mode {mode:?}")]
    WrongMode {
        /// The operation.
        op: &'static str,
        /// The tracker's mode.
        mode: crate::TrackingMode,
    },
    /// A VMM bitmap attached to a slot covers another number of pages than the slot.
    #[error("memslot {slot:?} has {pages} pages but the VMM bitmap attached to it covers {bitmap_pages}")]
    VmmBitmapSize {
        /// The memslot.
        slot: RingSlot,
        /// The slot's pages.
        pages: u64,
        /// The bitmap's pages.
        bitmap_pages: u64,
    },
    /// A guest_memfd memslot (`KVM_MEM_GUEST_MEMFD`): KVM refuses to log its dirty pages (as of Linux
    /// 6.19), so the tracker would silently report none of them.
    #[error("memslot {slot:?} is backed by guest_memfd, whose dirty pages KVM cannot log")]
    GuestMemfdSlot {
        /// The memslot.
        slot: RingSlot,
    },
    /// A slot whose page size is not the one KVM logs in on this architecture.
    #[error(
        "memslot {slot:?}: page size {page_size} is not supported here (KVM logs {supported}-byte pages)"
    )]
    UnsupportedPageSize {
        /// The memslot.
        slot: RingSlot,
        /// The page size asked for.
        page_size: u64,
        /// The one KVM logs in on this host.
        supported: u64,
    },
    /// The vCPU is not attached to the tracker (or its index is out of range).
    #[error("vCPU {index} is not attached to this tracker")]
    VcpuNotAttached {
        /// The index given.
        index: usize,
    },
    /// `KVM_EXIT_DIRTY_RING_FULL` with nothing at the consumer's position: nothing to harvest, nothing to
    /// reset, and nobody harvested this ring since the vCPU entered the guest. Resuming would exit again
    /// forever. On `kvm_pvm` this is what guest code dirtying memory at CPL0 produces: the host emulates it,
    /// the kernel pushes past a full ring (overwriting entries, so pages were lost) and its indices leave
    /// ours; `published_elsewhere` counts the entries marked dirty at other positions. Run such code at
    /// CPL3, or use a larger ring.
    #[error(
        "vCPU {vcpu}: KVM_EXIT_DIRTY_RING_FULL but nothing is published at the ring's next position and KVM \
         reset nothing ({published_elsewhere} entries are published elsewhere: the kernel overflowed the ring \
         and pages were lost); resuming would loop forever (on kvm_pvm, guest code that dirties memory must \
         run at CPL3)"
    )]
    RingFullNothingToHarvest {
        /// The vCPU's index in the tracker.
        vcpu: usize,
        /// Entries flagged dirty elsewhere in the ring (out of order).
        published_elsewhere: u32,
    },
    /// The vCPU fd maps no dirty ring of exactly this size: the VM has no ring, or one of another size
    /// than the configuration given (a smaller one's missing pages would raise `SIGBUS` when read; a larger
    /// one's entries would be looked for in the wrong places).
    #[error(
        "the vCPU has no dirty ring of exactly {entries} entries (the vm has no ring, or one of another size: \
         use the configuration enable_dirty_ring returned)"
    )]
    RingNotMapped {
        /// The entries the configuration claimed.
        entries: u32,
    },
    /// `mmap` (or `mprotect`) failed.
    #[error("mmap of {what} failed: {errno}")]
    Mmap {
        /// What was being mapped.
        what: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// An ioctl failed with an errno this crate has no better explanation for.
    #[error("{ioctl} failed: {errno}")]
    Ioctl {
        /// The ioctl's name.
        ioctl: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// `KVM_RUN` failed (`kvm-ioctls` reported the errno). `EINTR` means a signal kicked the vCPU out:
    /// see [`Error::is_interrupted`].
    #[error("KVM_RUN failed: {errno}")]
    Run {
        /// The kernel's answer.
        errno: Errno,
    },
    /// A lock was poisoned: a thread panicked while holding tracker state. The state may be incomplete.
    #[error("tracker state lock poisoned by a panicking thread ({what})")]
    Poisoned {
        /// Which lock.
        what: &'static str,
    },
}

impl Error {
    /// Whether this is `KVM_RUN` returning `EINTR` (or `EAGAIN`): a signal or `immediate_exit` kicked the
    /// vCPU out; the VMM handles its request and runs the vCPU again.
    ///
    /// ```
    /// use tdp_kvm::{Errno, Error};
    /// assert!(Error::Run { errno: Errno(libc::EINTR) }.is_interrupted());
    /// assert!(!Error::Run { errno: Errno(libc::EFAULT) }.is_interrupted());
    /// ```
    #[must_use]
    pub fn is_interrupted(&self) -> bool {
        matches!(self, Error::Run { errno: Errno(libc::EINTR | libc::EAGAIN) })
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
