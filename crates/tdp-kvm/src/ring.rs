//! One vCPU's dirty ring, mapped from its vCPU fd, harvested with `tdp-core`'s consumer, and the VM-wide
//! reset.
//!
//! KVM maps the ring at page offset `KVM_DIRTY_LOG_PAGE_OFFSET` (64) of the vCPU fd, `entries * 16` bytes,
//! read-write and shared. We trust the kernel's entries (it is the producer) but still treat slot and
//! offset as data to validate where they are used (the tracker does). The consumer's `fetch_index` lives
//! here, across harvests: KVM keeps none for userspace.
//!
//! Keeps: I4 on the consumer side (entries are harvested in order, never skipped, each once; the reset
//! that re-protects them is [`reset_dirty_rings`](crate::fd::reset_dirty_rings), which the caller must issue before reading pages).

use std::os::fd::AsFd;

use tdp_core::dirty_ring::{DirtyEntry, DirtyGfn, DirtyRingConsumer, RingConfig};

use crate::abi::KVM_DIRTY_LOG_PAGE_OFFSET;
use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::sys;

/// A vCPU's dirty ring: owns the mapping (unmapped on drop) and the consumer's position.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tdp_kvm::{DirtyRing, Error};
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// let (_, cfg) = match tdp_kvm::fd::enable_dirty_ring(&vm, 4096) {
///     Ok(x) => x,
///     Err(Error::NoDirtyRing) => { println!("SKIPPED: no dirty ring"); return Ok(()) }
///     Err(e) => return Err(e.into()),
/// };
/// let vcpu = tdp_kvm::fd::create_vcpu(&vm, 0)?;
/// let mut ring = DirtyRing::map_fd(&vcpu, cfg)?;
/// assert_eq!(ring.entries().len(), 4096);
/// // The guest has not run: nothing to harvest, nothing to reset.
/// assert_eq!(ring.harvest(usize::MAX, |_| unreachable!()), 0);
/// assert_eq!(tdp_kvm::fd::reset_dirty_rings(&vm)?, 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DirtyRing {
    map: Mapping,
    cfg: RingConfig,
    fetch_index: u32,
}

impl DirtyRing {
    /// Maps the ring of the vCPU whose fd is `vcpu` (`cfg` as returned by
    /// [`enable_dirty_ring`](crate::fd::enable_dirty_ring)). The ring stays valid after the vCPU fd is
    /// closed: the mapping holds its own reference to the file.
    ///
    /// This is the ring's one consumer: KVM keeps no consumer index for user space, so two consumers of one
    /// ring would each miss what the other harvested. Map a ring once (or let a
    /// [`DirtyTracker`](crate::DirtyTracker) do it) and harvest it only through that mapping.
    ///
    /// # Errors
    /// [`Error::RingNotMapped`] if the VM has no dirty ring, or one of another size than `cfg` says;
    /// [`Error::Mmap`] if the kernel refuses the mapping.
    pub fn map_fd(vcpu: impl AsFd, cfg: RingConfig) -> Result<Self> {
        let fd = vcpu.as_fd();
        let len = cfg.bytes() as usize;
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET * sys::page_size() as i64;
        // One page more than the ring: mmap succeeds whatever the VM's ring size, and a page past the ring
        // raises SIGBUS on first access. Probing through the kernel (which gets EFAULT instead) checks that
        // the ring has exactly `cfg`'s size: its last byte readable (no smaller ring, or none), the byte
        // after it not (no larger ring, whose entries this consumer would look for in the wrong places).
        let page = sys::page_size();
        let map = Mapping::shared(fd, len + page, offset, "the vCPU's dirty ring")?;
        // SAFETY: `len - 1` and `len` are inside the mapping we just made (`len + page` bytes); no reference
        // is formed, the kernel reads the bytes for us.
        let (last, after) = unsafe { (map.as_ptr().add(len - 1), map.as_ptr().add(len)) };
        if !sys::probe_readable(last)? || sys::probe_readable(after)? {
            return Err(Error::RingNotMapped { entries: cfg.entries() });
        }
        Ok(DirtyRing { map, cfg, fetch_index: 0 })
    }

    /// The ring memory, as `tdp-core`'s ABI-identical entries.
    #[must_use]
    pub fn entries(&self) -> &[DirtyGfn] {
        let n = self.cfg.entries() as usize;
        debug_assert!(self.map.len() >= n * size_of::<DirtyGfn>());
        // SAFETY: the mapping starts with the `entries * 16` bytes of page-aligned memory (so aligned for `DirtyGfn`),
        // alive as long as `self`. `DirtyGfn` is `#[repr(C)]` atomics with KVM's layout (asserted in
        // tdp-core), so concurrent kernel writes are atomic accesses on both sides and any bit pattern is a
        // valid value.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<DirtyGfn>(), n) }
    }

    /// Harvests up to `max` published entries in order, calling `f` for each, and returns how many. Marks
    /// each harvested (RESET flag); the kernel frees and re-protects them at the next
    /// [`reset_dirty_rings`](crate::fd::reset_dirty_rings).
    #[inline]
    pub fn harvest(&mut self, max: usize, f: impl FnMut(DirtyEntry)) -> usize {
        let (n, next) = {
            let ring = self.entries();
            // The length matches by construction; a mismatch cannot happen, and harvests nothing if it did.
            let Ok(mut consumer) = DirtyRingConsumer::resume(ring, self.cfg, self.fetch_index) else {
                return 0;
            };
            let n = consumer.harvest(max, f);
            (n, consumer.fetch_index())
        };
        self.fetch_index = next;
        n
    }

    /// The free-running index of the next entry to harvest.
    #[must_use]
    pub const fn fetch_index(&self) -> u32 {
        self.fetch_index
    }

    /// The ring's geometry.
    #[must_use]
    pub const fn config(&self) -> RingConfig {
        self.cfg
    }
}

/// `KVM_RESET_DIRTY_RINGS`: frees every harvested entry of every vCPU ring of the VM and re-protects
/// their pages, so later guest writes are caught again. Returns how many entries KVM reset. Call it after a
/// harvest and before reading the harvested pages.
///
/// # Errors
/// [`Error::RingNotEnabled`] if the VM has no ring (KVM answers `EINVAL`); [`Error::Ioctl`] otherwise
/// (`EINTR` if a signal interrupted a long reset: call it again, the entries stay harvested).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kvm = match tdp_kvm::fd::open_kvm() { Ok(k) => k, Err(e) => { println!("SKIPPED: {e}"); return Ok(()) } };
/// let vm = tdp_kvm::fd::create_vm(&kvm)?;
/// if tdp_kvm::fd::enable_dirty_ring(&vm, 4096).is_ok() {
///     assert_eq!(tdp_kvm::fd::reset_dirty_rings(&vm)?, 0); // nothing harvested yet
/// }
/// # Ok(()) }
/// ```
pub fn reset_dirty_rings(vm: impl AsFd) -> Result<u32> {
    sys::reset_dirty_rings(vm.as_fd()).map_err(|e| match e {
        Error::Ioctl { errno: crate::Errno(libc::EINVAL), .. } => {
            Error::RingNotEnabled { op: "KVM_RESET_DIRTY_RINGS" }
        }
        e => e,
    })
}
