//! The per-vCPU state a fault needs, in one value: the page cache, the fault counters, the memslot the
//! vCPU faulted in last (a copy, with the memslot generation it was copied at) and the vCPU's root.
//!
//! KVM keeps these in `struct kvm_vcpu_arch` (`mmu_page_header_cache` and friends, `stat.pf_*`,
//! `last_used_slot`, `mmu->root`). Keeping them together lets a fault look its memslot up without the
//! MMU lock: the copy is used only while the generation it was taken at is still current, which the
//! fault checks again under the lock before it installs anything.

use crate::addr::{AsId, Gfn};
use crate::memslot::Memslot;

use super::cache::{FaultCounters, PageCache};
use super::root::RootRef;
use super::walk::WalkHint;

/// One vCPU's MMU state. Create one per vCPU with [`VcpuMmu::new`], load a root with
/// [`super::Mmu::load_root`], handle its faults with [`super::Mmu::handle_fault`], and give everything
/// back with [`super::Mmu::release_vcpu`] before dropping it (a dropped `VcpuMmu` that still holds a root
/// or cached pages leaks them; the mock's checkers count such leaks).
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
/// assert!(vcpu.root().is_none());
/// let root = mmu.load_root(&mut vcpu, AsId(0)).unwrap();
/// assert_eq!(vcpu.root().map(|r| r.pfn()), Some(root));
/// let fault = Fault { as_id: AsId(0), gpa: Gpa(0x5000), access: AccessKind::Read,
///                     kind: FaultKind::Violation { present: false } };
/// assert_eq!(mmu.handle_fault(&mut vcpu, fault, &mut ()), Ok(FaultOutcome::Fixed));
/// assert_eq!(vcpu.counters.fixed, 1);
/// mmu.release_vcpu(&mut vcpu);
/// assert!(vcpu.root().is_none() && vcpu.cache().is_empty());
/// # Ok::<(), tdp_core::memslot::SlotError>(())
/// ```
#[derive(Debug, Default)]
// Its own cache lines (two, for adjacent-line prefetch): every fault writes the counters and the page
// cache, and vCPUs kept side by side (a `Vec<VcpuMmu>`) would otherwise share a line.
#[repr(align(128))]
pub struct VcpuMmu {
    pub(super) cache: PageCache,
    /// What the faults of this vCPU came to (KVM's per-vCPU `pf_*` statistics). Per vCPU, so that no
    /// shared cache line is written per fault.
    pub counters: FaultCounters,
    pub(super) slot: SlotHint,
    /// The level-1 and level-2 tables of the vCPU's last walks (`Mmu::walk_gfn_hinted`), for its root.
    pub(super) walk: WalkHint,
    pub(super) root: Option<RootRef>,
    /// The mirror root, for faults in private memslots (loaded with the root when the host has external
    /// tables).
    pub(super) mirror: Option<RootRef>,
    /// The group whose cache line the vCPU's faults write (their read side of the MMU lock, their leaf
    /// counts); assigned when the vCPU loads its first root (0 until then).
    pub(super) group: u8,
    pub(super) group_assigned: bool,
}

/// The memslot a vCPU faulted in last.
#[derive(Clone, Copy, Debug)]
pub(super) struct SlotHint {
    /// Index of the slot in the set, tried first by a lookup under the lock (KVM's `last_used_slot`).
    pub(super) index: usize,
    /// A copy of the slot, valid while the memslot generation is `generation`.
    pub(super) slot: Memslot,
    /// The generation the copy was taken at; [`SlotHint::NONE`] before the first copy (no memslot set
    /// reaches it: the generation counts changes).
    generation: u64,
}

impl Default for SlotHint {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl SlotHint {
    /// The generation of no copy.
    const NONE: u64 = u64::MAX;
    /// No copy yet.
    pub(super) const EMPTY: SlotHint = SlotHint {
        index: 0,
        slot: Memslot::new(AsId(0), crate::addr::SlotId(0), Gfn(0), 0, 0, crate::memslot::SlotFlags::empty()),
        generation: Self::NONE,
    };

    /// Whether the copy was taken at `generation` and covers `gfn` of `as_id`.
    #[inline]
    pub(super) fn covers(&self, as_id: AsId, gfn: Gfn, generation: u64) -> bool {
        self.generation == generation && self.slot.as_id == as_id && self.slot.contains(gfn)
    }

    /// Keeps a copy of `slot`, current at `generation`.
    pub(super) fn set(&mut self, slot: Memslot, generation: u64) {
        self.slot = slot;
        self.generation = generation;
    }
}

impl VcpuMmu {
    /// A vCPU with no root, an empty page cache and zeroed counters.
    #[must_use]
    pub const fn new() -> Self {
        VcpuMmu {
            cache: PageCache::new(),
            counters: FaultCounters { taken: 0, fixed: 0, fast: 0, spurious: 0, retried: 0, emulated: 0 },
            slot: SlotHint::EMPTY,
            walk: WalkHint::EMPTY,
            root: None,
            mirror: None,
            group: 0,
            group_assigned: false,
        }
    }

    /// The vCPU's root, once [`super::Mmu::load_root`] loaded one.
    #[must_use]
    pub fn root(&self) -> Option<&RootRef> {
        self.root.as_ref()
    }

    /// The vCPU's mirror root, for private memslots: loaded with its root by [`super::Mmu::load_root`]
    /// when the host has external tables ([`crate::host::ExternalTables`]). In a confidential VM the
    /// processor walks the external tables, not this one.
    #[must_use]
    pub fn mirror_root(&self) -> Option<&RootRef> {
        self.mirror.as_ref()
    }

    /// The table pages set aside for this vCPU's faults.
    #[must_use]
    pub fn cache(&self) -> &PageCache {
        &self.cache
    }

    /// The page cache, to top up or release by hand (see [`PageCache`]).
    pub fn cache_mut(&mut self) -> &mut PageCache {
        &mut self.cache
    }
}
