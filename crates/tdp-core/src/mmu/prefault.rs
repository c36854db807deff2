//! Pre-faulting guest memory (KVM's `KVM_PRE_FAULT_MEMORY`, 6.10): map a range ahead of the guest, as
//! the vCPU's own faults would, so that a VM starts (or resumes after migration) without a burst of
//! faults.

use crate::addr::{Gfn, Gpa};
use crate::fault::{AccessKind, Fault, FaultKind};
use crate::host::{AllocError, Host, HostFaultError};

use super::{FaultError, FaultOutcome, Mmu, VcpuMmu};

/// Why [`Mmu::pre_fault_memory`] mapped nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreFaultError {
    /// The range is empty, not page-aligned, or wraps around the address space (KVM: `-EINVAL`).
    #[error("pre-fault range {gpa:?} + {len:#x} is empty, unaligned or wraps")]
    BadRange {
        /// The first address asked for.
        gpa: Gpa,
        /// Its length in bytes.
        len: u64,
    },
    /// The vCPU has no valid root: load one ([`Mmu::load_root`]) and call again.
    #[error("the vCPU has no valid root")]
    NoRoot,
    /// No memslot covers this address (KVM: `-ENOENT`).
    #[error("no memslot covers {0:?}")]
    NoMemslot(Gpa),
    /// An MMU-notifier invalidation covering this address is in progress; call again after it ends
    /// (KVM: `-EAGAIN`).
    #[error("an invalidation covering {0:?} is in progress")]
    Invalidation(Gpa),
    /// The page cache could not be filled (KVM: `-ENOMEM`).
    #[error("no table page: {0}")]
    Alloc(#[from] AllocError),
    /// The host could not provide the page.
    #[error("host translation failed: {0}")]
    Host(#[from] HostFaultError),
    /// A fault kept losing races to other writers; call again.
    #[error("{0:?} kept losing races; call again")]
    Busy(Gpa),
}

/// How many times a page whose fault lost a race is tried again before the call returns.
const TRIES_PER_PAGE: usize = 8;

impl<H: Host, R: lock_api::RawRwLock> Mmu<H, R> {
    /// Maps `[gpa, gpa + len)` in `vcpu`'s root ahead of the guest (KVM's `KVM_PRE_FAULT_MEMORY`), as read
    /// faults would: at the largest level the memslot, the host and the format allow, writable where a
    /// read fault would map writable. Returns how many bytes from `gpa` are now mapped, which may run
    /// past `gpa + len` to the end of a huge leaf, or stop early (a later call continues from there) when
    /// something below stops it after some progress.
    ///
    /// ```
    /// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
    /// use tdp_core::memslot::{Memslot, SlotFlags};
    /// use tdp_core::mmu::{Mmu, MmuConfig, PreFaultError, VcpuMmu};
    /// use tdp_mock::{HostConfig, MockHost};
    ///
    /// let host = MockHost::new(HostConfig::default());
    /// let ram = host.guest_ram_base();
    /// let mmu: Mmu<MockHost> = Mmu::new(host, MmuConfig::EPT).unwrap();
    /// mmu.write().insert_memslot(Memslot::new(AsId(0), SlotId(0), Gfn(0), 1024, ram, SlotFlags::empty()))?;
    /// let mut vcpu = VcpuMmu::new();
    /// mmu.load_root(&mut vcpu, AsId(0)).unwrap();
    /// // 4 MiB: two 2 MiB leaves (the slot is aligned and the mock host maps huge pages).
    /// assert_eq!(mmu.pre_fault_memory(&mut vcpu, Gpa(0), 4 << 20), Ok(4 << 20));
    /// assert_eq!(mmu.stats().leaves[1], 2);
    /// assert_eq!(mmu.pre_fault_memory(&mut vcpu, Gpa(4 << 20), 4096), Err(PreFaultError::NoMemslot(Gpa(4 << 20))));
    /// mmu.release_vcpu(&mut vcpu);
    /// # Ok::<(), tdp_core::memslot::SlotError>(())
    /// ```
    ///
    /// # Errors
    /// [`PreFaultError`] when nothing could be mapped; with some progress the progress is returned and
    /// the next call (from `gpa` plus it) reports the error.
    pub fn pre_fault_memory(&self, vcpu: &mut VcpuMmu, gpa: Gpa, len: u64) -> Result<u64, PreFaultError> {
        let page = crate::addr::PAGE_SIZE;
        let end = gpa
            .0
            .checked_add(len)
            .filter(|_| len > 0 && gpa.0.is_multiple_of(page) && len.is_multiple_of(page));
        let Some(end) = end else {
            return Err(PreFaultError::BadRange { gpa, len });
        };
        let mut at = gpa.0;
        while at < end {
            match self.pre_fault_page(vcpu, Gpa(at)) {
                Ok(next) => at = next,
                Err(e) if at == gpa.0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(at - gpa.0)
    }

    /// Maps the page at `gpa`; returns the address after the leaf that now maps it.
    fn pre_fault_page(&self, vcpu: &mut VcpuMmu, gpa: Gpa) -> Result<u64, PreFaultError> {
        let gfn = gpa.gfn();
        for _ in 0..TRIES_PER_PAGE {
            let Some(root) = vcpu.root.as_ref().filter(|root| root.is_valid()) else {
                return Err(PreFaultError::NoRoot);
            };
            let fault = Fault {
                as_id: root.as_id(),
                gpa,
                access: AccessKind::Read,
                kind: FaultKind::Violation { present: false },
            };
            let outcome = self.handle_fault(vcpu, fault, &mut ()).map_err(|e| match e {
                FaultError::Alloc(e) => PreFaultError::Alloc(e),
                FaultError::Host(e) => PreFaultError::Host(e),
                FaultError::Misconfig { .. } | FaultError::External(_) => PreFaultError::Busy(gpa),
            })?;
            match outcome {
                FaultOutcome::Fixed | FaultOutcome::Spurious => {
                    let root = vcpu.root.as_ref().ok_or(PreFaultError::NoRoot)?;
                    // A private page is mapped in the mirror root.
                    let mapped = self
                        .lookup(root, gfn)
                        .or_else(|| vcpu.mirror.as_ref().and_then(|m| self.lookup(m, gfn)));
                    if let Some((_, level)) = mapped {
                        let next = Gfn(gfn.align_down(level).0 + level.pages());
                        return Ok(next.gpa().0);
                    }
                    // Zapped again before we looked: map it once more.
                }
                FaultOutcome::Retry => {
                    // Under the read lock, which orders the invalidation state.
                    let _shared = self.read();
                    if self.invalidation.in_progress_at(gfn) {
                        return Err(PreFaultError::Invalidation(gpa));
                    }
                }
                FaultOutcome::ReloadRoot => return Err(PreFaultError::NoRoot),
                FaultOutcome::Emulate(_) => return Err(PreFaultError::NoMemslot(gpa)),
            }
        }
        Err(PreFaultError::Busy(gpa))
    }
}
