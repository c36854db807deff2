//! [`check_tlbs`]: the I3 checker. Every translation a vCPU's TLB caches must still be granted by the
//! current tables of its root: same frames, rights at least the cached ones. A cached translation of a
//! gfn that is now unmapped, or of a root the MMU no longer has, is stale. On hardware that sets A/D
//! flags, an entry marked dirty whose current leaf has D clear is stale too: writes through it would
//! retire without setting D, so neither PML nor a D-bit scan would see them (a flush was missed after
//! D was cleared; this is where I3 protects I4).

use tdp_core::addr::{Gfn, Level, Pfn};
use tdp_core::fault::AccessKind;
use tdp_core::mmu::Mmu;

use super::Violation;
use crate::host::MockHost;
use crate::tlb::{Tlb, TlbEntry};
use crate::walker::{Hardware, Tree, WalkMode, WalkOutcome, next_page, walk_detail};

/// Checks I3 for every entry of every TLB in `tlbs` against the current tables. Returns how many
/// entries were checked. Call it after an operation has returned and its flush (if the caller owed
/// one) has run.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_mock::{check_tlbs, HostConfig, Machine, Violation};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig::default())?;
/// m.mmu().write().insert_memslot(m.ram_slot(AsId(0), SlotId(0), Gfn(0), 16, SlotFlags::empty()))?;
/// let mut vcpu = m.new_vcpu(AsId(0));
/// vcpu.access(m.mmu(), Gpa(0x3000), AccessKind::Write)?;
/// assert_eq!(check_tlbs(m.mmu(), &[vcpu.tlb()]), Ok(1));
/// // Zap without running the flush the zap returns: the TLB entry is now stale.
/// m.mmu().write().zap_gfn_range(AsId(0), Gfn(0), Gfn(16)).ignore(); // deliberately broken
/// let errors = check_tlbs(m.mmu(), &[vcpu.tlb()]).unwrap_err();
/// assert!(matches!(errors[0], Violation::StaleTlb { .. }));
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// Every [`Violation`] found (all of them I3), at most one per TLB entry.
pub fn check_tlbs(mmu: &Mmu<MockHost>, tlbs: &[&Tlb]) -> Result<usize, Vec<Violation>> {
    let exclusive = mmu.write();
    let roots = mmu.roots();
    let hw = Hardware::for_config(mmu.config());
    let root_level = mmu.config().root_level;
    let mut violations = Vec::new();
    let mut checked = 0;
    for tlb in tlbs {
        for (root, gfn, level, cached) in tlb.entries() {
            checked += 1;
            if !roots.iter().any(|r| r.pfn == root) {
                violations.push(Violation::TlbRootGone { root, gfn, cached });
                continue;
            }
            let check = EntryCheck { mmu, hw, root, root_level, gfn, level, cached };
            if let Some(v) = check.run() {
                violations.push(v);
            }
        }
    }
    drop(exclusive);
    if violations.is_empty() { Ok(checked) } else { Err(violations) }
}

struct EntryCheck<'a> {
    mmu: &'a Mmu<MockHost>,
    hw: Hardware,
    root: Pfn,
    root_level: Level,
    gfn: Gfn,
    level: Level,
    cached: TlbEntry,
}

impl EntryCheck<'_> {
    /// Walks the entry's range leaf by leaf: one walk when the current leaf is at least as big as the
    /// cached one, else one per current leaf. Stops at the first disagreement.
    fn run(&self) -> Option<Violation> {
        let end = self.gfn.0 + self.level.pages();
        let tree = Tree { root: self.root, level: self.root_level };
        let mut at = self.gfn;
        while at.0 < end {
            let walked =
                walk_detail(self.mmu.host(), self.hw, tree, at.gpa(), AccessKind::Read, WalkMode::Peek, None);
            let current = walked.outcome;
            let WalkOutcome::Translated { pfn, level, rights } = current else {
                match self.aged_leaf(at) {
                    Some(level) => {
                        at = next_page(at, level);
                        continue;
                    }
                    None => return Some(self.stale(at, current)),
                }
            };
            if pfn != self.cached.pfn.add(at.0 - self.gfn.0) || !rights.contains(self.cached.rights) {
                return Some(self.stale(at, current));
            }
            if self.cached.dirty && self.hw.sets_accessed_dirty() && !walked.dirty {
                return Some(Violation::StaleDirtyTlb {
                    root: self.root,
                    gfn: self.gfn,
                    at,
                    cached: self.cached,
                });
            }
            at = next_page(at, level);
        }
        None
    }

    /// When hardware sees no translation at `at` because aging made the leaf access-tracked (EPT without
    /// A/D bits), the cached entry is allowed to outlive it (aging owes no flush, KVM's rule) as long as
    /// it names the same frame and no right the leaf did not save (what the fast path gives back).
    /// Returns the leaf's level then.
    fn aged_leaf(&self, at: Gfn) -> Option<Level> {
        let fmt = self.mmu.format();
        let (spte, level) = self.mmu.lookup_in(self.root, at)?;
        if !fmt.is_access_tracked(spte) {
            return None;
        }
        let restorable = fmt.access(fmt.access_restored(spte));
        let pfn = spte.pfn().add(at.0 - at.align_down(level).0);
        (pfn == self.cached.pfn.add(at.0 - self.gfn.0) && restorable.contains(self.cached.rights))
            .then_some(level)
    }

    fn stale(&self, at: Gfn, current: WalkOutcome) -> Violation {
        Violation::StaleTlb { root: self.root, gfn: self.gfn, at, cached: self.cached, current }
    }
}
