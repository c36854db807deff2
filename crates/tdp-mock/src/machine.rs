//! [`Machine`]: one simulated VM: a [`MockHost`], the `Mmu<MockHost>` that owns a clone of it, and a
//! factory for [`Vcpu`]s, plus [`Machine::check_all`], which runs the I1, I2 and I3 checkers together.
//!
//! Checks: I1-I3 through [`crate::checker`]; it adds no rule of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tdp_core::addr::{AsId, Gfn, PAGE_SIZE, SlotId};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{ConfigError, Mmu, MmuConfig};

use crate::checker::{
    Violation, check_mirror, check_tables, check_tlbs, check_translations_in, check_write_tracking,
};
use crate::host::{HostConfig, MockHost};
use crate::tlb::Tlb;
use crate::vcpu::Vcpu;
use crate::walker::Hardware;

/// A simulated VM.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_mock::{HostConfig, Machine};
///
/// let m = Machine::new(MmuConfig::NPT, HostConfig::default())?;
/// let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0x200), 0x200, SlotFlags::empty());
/// m.mmu().write().insert_memslot(slot)?;
/// let mut vcpu = m.new_vcpu(AsId(0));
/// let frame = vcpu.write_u64(m.mmu(), Gpa(0x20_0040), 7)?;
/// assert_eq!(vcpu.read_u64(m.mmu(), Gpa(0x20_0040))?, 7);
/// assert_eq!(frame.0, (slot.host_base >> 12));
/// m.check_all(&[&vcpu], &[slot]).map_err(|v| format!("{v:?}"))?;
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Machine {
    host: MockHost,
    mmu: Arc<Mmu<MockHost>>,
    hw: Hardware,
    next_vcpu: AtomicU32,
}

impl Machine {
    /// A VM whose MMU uses `cfg` on a host built from `host_cfg`.
    ///
    /// # Errors
    /// [`ConfigError`] when the MMU rejects `cfg`.
    ///
    /// # Panics
    /// As [`MockHost::new`].
    pub fn new(cfg: MmuConfig, host_cfg: HostConfig) -> Result<Machine, ConfigError> {
        let host = MockHost::new(host_cfg);
        let mmu = Arc::new(Mmu::new(host.clone(), cfg)?);
        host.set_invalidation_hook(Some(notifier(Arc::downgrade(&mmu))));
        Ok(Machine { host, mmu, hw: Hardware::for_config(&cfg), next_vcpu: AtomicU32::new(0) })
    }

    /// The host (a clone of the one the MMU owns).
    pub fn host(&self) -> &MockHost {
        &self.host
    }
    /// The MMU, shareable with vCPU threads.
    pub fn mmu(&self) -> &Arc<Mmu<MockHost>> {
        &self.mmu
    }
    /// The simulated hardware.
    pub fn hardware(&self) -> Hardware {
        self.hw
    }

    /// A new vCPU in `as_id`, its TLB registered with the host. Ids count up from 0.
    pub fn new_vcpu(&self, as_id: AsId) -> Vcpu {
        let id = self.next_vcpu.fetch_add(1, Ordering::Relaxed);
        Vcpu::new(id, as_id, &self.mmu)
    }

    /// A memslot of `pages` pages at `base_gfn`, backed by guest RAM at the same offset from the start
    /// of guest RAM as `base_gfn` is from 0 (so huge-page alignment of the gfn carries over). The slot is
    /// not inserted; pass it to `insert_memslot` and keep it in the test's reference model.
    pub fn ram_slot(&self, as_id: AsId, id: SlotId, base_gfn: Gfn, pages: u64, flags: SlotFlags) -> Memslot {
        let host_base = base_gfn.0.saturating_mul(PAGE_SIZE).saturating_add(self.host.guest_ram_base());
        Memslot::new(as_id, id, base_gfn, pages, host_base, flags)
    }

    /// Runs every checker: `check_tables` with the vCPUs' cache pages, `check_translations` on every
    /// valid root of the MMU against `reference`, `check_tlbs` on the vCPUs' TLBs and
    /// `check_write_tracking` over every root, `check_mirror`. Call it when no vCPU is running.
    ///
    /// Invalid roots are left out of the I1 check: a vCPU checks its root under its TLB lock before
    /// every walk, so once the invalidation's flush has run no hardware walks them again, and what they
    /// still hold (say an MMIO SPTE whose generation matches again after a wrap) cannot be seen.
    ///
    /// # Errors
    /// Every violation found, from all checkers.
    pub fn check_all(&self, vcpus: &[&Vcpu], reference: &[Memslot]) -> Result<(), Vec<Violation>> {
        let mut violations = Vec::new();
        let cache_pages: Vec<_> = vcpus.iter().flat_map(|v| v.cache().pages().iter().copied()).collect();
        if let Err(v) = check_tables(&self.mmu, &cache_pages) {
            violations.extend(v);
        }
        for root in self.mmu.roots().into_iter().filter(|r| r.valid) {
            if let Err(v) = check_translations_in(&self.mmu, root.pfn, root.as_id, reference) {
                violations.extend(v);
            }
        }
        let tlbs: Vec<&Tlb> = vcpus.iter().map(|v| v.tlb()).collect();
        if let Err(v) = check_tlbs(&self.mmu, &tlbs) {
            violations.extend(v);
        }
        if let Err(v) = check_write_tracking(&self.mmu) {
            violations.extend(v);
        }
        if let Err(v) = check_mirror(&self.mmu) {
            violations.extend(v);
        }
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }
}

/// The VM's MMU notifier for the host MMU (KVM's `kvm_mmu_notifier_invalidate_range_start/end`): a
/// change of host pages `[hva, hva + pages)` invalidates the gfns of every memslot that maps them, one
/// `invalidate_range_start` per slot (the token counts them) and as many ends. It holds the MMU weakly:
/// the MMU owns the host, which owns this hook.
fn notifier(mmu: std::sync::Weak<Mmu<MockHost>>) -> crate::host::InvalidationHook {
    Arc::new(move |event| {
        let Some(mmu) = mmu.upgrade() else {
            return 0;
        };
        let mut exclusive = mmu.write();
        match event {
            crate::host::HostInvalidation::Start { hva, pages } => {
                let end_hva = hva.saturating_add(pages.saturating_mul(PAGE_SIZE));
                let ranges: Vec<_> = exclusive
                    .memslots()
                    .iter()
                    .filter_map(|slot| {
                        let slot_end = slot.host_base.saturating_add(slot.pages.saturating_mul(PAGE_SIZE));
                        let (lo, hi) = (hva.max(slot.host_base), end_hva.min(slot_end));
                        (lo < hi).then(|| {
                            let first = (lo - slot.host_base) / PAGE_SIZE;
                            let last = (hi - slot.host_base).div_ceil(PAGE_SIZE);
                            (slot.as_id, Gfn(slot.base_gfn.0 + first), Gfn(slot.base_gfn.0 + last))
                        })
                    })
                    .collect();
                for &(as_id, start, end) in &ranges {
                    exclusive.invalidate_range_start(as_id, start, end).expect("a non-empty range");
                }
                ranges.len() as u64
            }
            crate::host::HostInvalidation::End { token } => {
                for _ in 0..token {
                    exclusive.invalidate_range_end().expect("the matching start ran");
                }
                0
            }
        }
    })
}
