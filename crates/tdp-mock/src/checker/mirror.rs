//! [`check_mirror`]: the host's external tables equal the mirror roots, entry for entry (every linked
//! table and every leaf, at the same gfn and level), the MMU called them in an order a real external
//! tree accepts, and each leaf is in the right kind of root: private memslots' gfns only in mirror
//! roots, the others only in direct roots.

use std::collections::BTreeMap;

use tdp_core::addr::{AsId, Gfn, Level, Pfn};
use tdp_core::host::{ExternalTables, TableMemory};
use tdp_core::mmu::Mmu;
use tdp_core::spte::{Spte, SpteFormat};

use super::Violation;
use crate::host::{ExternalEntry, MockHost};

/// Checks the external tables against every mirror root, and every leaf's root kind. Does nothing on a
/// host without external tables. Returns how many entries it compared.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, Level, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_mock::{HostConfig, Machine, check_mirror};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig::default())?;
/// m.host().enable_external_tables(Level::L4);
/// m.mmu().write().insert_memslot(m.ram_slot(AsId(0), SlotId(0), Gfn(0), 16, SlotFlags::PRIVATE))?;
/// let mut vcpu = m.new_vcpu(AsId(0));
/// vcpu.write_u64(m.mmu(), Gpa(0x3000), 7)?;
/// // Three tables and the leaf, in the mirror root and in the external tables alike.
/// assert_eq!(check_mirror(m.mmu()), Ok(4));
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Violation::MirrorMismatch`] per entry that differs, [`Violation::ExternalMisuse`] per call made
/// out of order, [`Violation::MisroutedLeaf`] per leaf in the wrong kind of root.
pub fn check_mirror(mmu: &Mmu<MockHost>) -> Result<usize, Vec<Violation>> {
    let host = mmu.host();
    if !host.has_external_tables() {
        return Ok(0);
    }
    let exclusive = mmu.write();
    let slots = exclusive.memslots();
    let _walk = host.begin_walk();
    let fmt = *mmu.format();
    let mut violations = Vec::new();
    let mut mirrored: BTreeMap<(AsId, Gfn, Level), (Pfn, ExternalEntry)> = BTreeMap::new();
    for root in mmu.roots() {
        let kind = if root.mirror { "mirror" } else { "direct" };
        visit(host, &fmt, root.pfn, mmu.config().root_level, Gfn(0), &mut |gfn, level, spte| {
            let entry = match fmt.child_table(spte, level) {
                Some(table) => ExternalEntry::Table(table),
                None => {
                    let private = slots.find(root.as_id, gfn).is_some_and(|s| s.is_private());
                    if private != root.mirror {
                        violations.push(Violation::MisroutedLeaf {
                            root: root.pfn,
                            kind,
                            as_id: root.as_id,
                            gfn,
                            spte,
                        });
                    }
                    ExternalEntry::Leaf(spte.pfn())
                }
            };
            if root.mirror {
                mirrored.insert((root.as_id, gfn, level), (root.pfn, entry));
            }
        });
    }
    let external: BTreeMap<(AsId, Gfn, Level), ExternalEntry> =
        host.external_entries().into_iter().map(|(a, g, l, e)| ((a, g, l), e)).collect();
    let compared = mirrored.len().max(external.len());
    for (&(as_id, gfn, level), &(root, entry)) in &mirrored {
        let held = external.get(&(as_id, gfn, level)).copied();
        if held != Some(entry) {
            violations.push(Violation::MirrorMismatch {
                root,
                as_id,
                gfn,
                level,
                mirror: Some(entry),
                external: held,
            });
        }
    }
    for (&(as_id, gfn, level), &entry) in external.iter().filter(|(k, _)| !mirrored.contains_key(k)) {
        let root = Pfn(0);
        violations.push(Violation::MirrorMismatch {
            root,
            as_id,
            gfn,
            level,
            mirror: None,
            external: Some(entry),
        });
    }
    violations.extend(host.external_misuses().into_iter().map(Violation::ExternalMisuse));
    drop(exclusive);
    if violations.is_empty() { Ok(compared) } else { Err(violations) }
}

/// Calls `f` for every present entry below the table `table` (entries at `level`, the first mapping
/// from `base`), tables before what is below them.
fn visit(
    host: &MockHost,
    fmt: &SpteFormat,
    table: Pfn,
    level: Level,
    base: Gfn,
    f: &mut impl FnMut(Gfn, Level, Spte),
) {
    for (i, entry) in host.table(table).iter().enumerate() {
        let spte = Spte(entry.load(std::sync::atomic::Ordering::Acquire));
        if !spte.is_present() || fmt.is_frozen(spte) {
            continue;
        }
        let gfn = Gfn(base.0 + i as u64 * level.pages());
        f(gfn, level, spte);
        if let (Some(child), Some(lower)) = (fmt.child_table(spte, level), level.lower()) {
            visit(host, fmt, child, lower, gfn, f);
        }
    }
}
