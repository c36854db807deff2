//! [`check_write_tracking`]: no leaf, in any root (valid or not: hardware may still use an invalid root
//! until its flush), lets a guest write reach a write-tracked gfn: every leaf mapping one has W and
//! MMU-writable clear (KVM's page-track guarantee to the nested-virtualization code that shadows it).

use tdp_core::mmu::Mmu;

use super::Violation;
use crate::host::MockHost;

/// Checks every write-tracked gfn in every root of its address space.
///
/// # Errors
/// One [`Violation::WritableTrackedGfn`] per leaf that breaks it.
pub fn check_write_tracking(mmu: &Mmu<MockHost>) -> Result<usize, Vec<Violation>> {
    let exclusive = mmu.write();
    let fmt = *mmu.format();
    let tracked: Vec<_> = exclusive.memslots().write_track().iter().collect();
    let mut violations = Vec::new();
    let mut checked = 0;
    for root in mmu.roots() {
        for &(as_id, gfn, _) in tracked.iter().filter(|(as_id, _, _)| *as_id == root.as_id) {
            checked += 1;
            if let Some((spte, level)) = mmu.lookup_in(root.pfn, gfn)
                && (spte.is_writable() || fmt.is_mmu_writable(spte))
            {
                violations.push(Violation::WritableTrackedGfn { as_id, gfn, root: root.pfn, spte, level });
            }
        }
    }
    drop(exclusive);
    if violations.is_empty() { Ok(checked) } else { Err(violations) }
}
