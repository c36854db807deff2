//! [`check_tables`]: the I2 checker. Walks every root the MMU lists, valid or not, and checks that each
//! table is reachable exactly once and live, that no entry is frozen at rest, that every present entry
//! passes the format's own check, that the leaf and table counts match the MMU's statistics, and that
//! every live arena page is accounted for (no leak).

use std::collections::HashSet;

use tdp_core::addr::{Level, Pfn};
use tdp_core::host::TableMemory;
use tdp_core::mmu::Mmu;

use super::{Violation, scan_tree};
use crate::host::{MockHost, PageState};

/// What [`check_tables`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableReport {
    /// Roots in the MMU's list.
    pub roots: u64,
    /// Non-root tables reachable from them.
    pub tables: u64,
    /// Present leaves per level: `[4 KiB, 2 MiB, 1 GiB]`.
    pub leaves: [u64; 3],
    /// MMIO SPTEs.
    pub mmio: u64,
    /// Page-cache pages given to the checker.
    pub cache_pages: u64,
    /// Pages freed with deferral and not yet reclaimed (unreachable, as checked).
    pub deferred: u64,
}

/// Checks I2 on every tree of `mmu`. `cache_pages` are the pages of every live page cache (each vCPU's
/// [`tdp_core::mmu::PageCache::pages`]): they must be live and unreachable, and with the trees they must
/// account for every live arena page. Call it when no vCPU is running (page caches change outside the
/// MMU lock).
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_mock::{check_tables, HostConfig, Machine};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig::default())?;
/// m.mmu().write().insert_memslot(m.ram_slot(AsId(0), SlotId(0), Gfn(0), 16, SlotFlags::empty()))?;
/// let mut vcpu = m.new_vcpu(AsId(0));
/// vcpu.access(m.mmu(), Gpa(0x2000), AccessKind::Read)?;
/// let report = check_tables(m.mmu(), vcpu.cache().pages()).map_err(|v| format!("{v:?}"))?;
/// assert_eq!((report.roots, report.tables, report.leaves), (1, 3, [1, 0, 0]));
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// Every [`Violation`] found (all of them I2).
pub fn check_tables(mmu: &Mmu<MockHost>, cache_pages: &[Pfn]) -> Result<TableReport, Vec<Violation>> {
    let exclusive = mmu.write();
    let host = mmu.host();
    let _guard = host.begin_walk();
    let fmt = *mmu.format();
    let root_level = mmu.config().root_level;
    let mut violations = Vec::new();
    let mut report = TableReport::default();
    let mut seen: HashSet<Pfn> = HashSet::new();
    for root in mmu.roots() {
        report.roots += 1;
        if !seen.insert(root.pfn) {
            violations.push(Violation::LinkedTwice { pfn: root.pfn });
            continue;
        }
        if let Some(v) = not_live(host, root.pfn) {
            violations.push(v);
            continue;
        }
        scan_tree(host, &fmt, root.pfn, root_level, &mut |e| {
            if fmt.is_frozen(e.spte) {
                violations.push(Violation::FrozenAtRest { table: e.table, index: e.index, level: e.level });
                return false;
            }
            if fmt.is_mmio(e.spte) {
                report.mmio += 1;
                return false;
            }
            if !e.spte.is_present() {
                return false;
            }
            if let Err(cause) = fmt.check(e.spte, e.level) {
                let (table, index, level, spte) = (e.table, e.index, e.level, e.spte);
                violations.push(Violation::BadSpte { table, index, level, spte, cause });
            }
            if e.spte.is_leaf(e.level) {
                if let Some(count) = report.leaves.get_mut(e.level.idx()) {
                    *count += 1;
                }
                return false;
            }
            let child = e.spte.pfn();
            if !seen.insert(child) {
                violations.push(Violation::LinkedTwice { pfn: child });
                return false;
            }
            report.tables += 1;
            match not_live(host, child) {
                Some(v) => {
                    violations.push(v);
                    false
                }
                None => true,
            }
        });
    }
    let stats = mmu.stats();
    for level in [Level::L1, Level::L2, Level::L3] {
        let (found, stats) = (report.leaves[level.idx()], stats.leaves[level.idx()]);
        if found != stats {
            violations.push(Violation::LeafCount { level, found, stats });
        }
    }
    if report.tables != stats.tables {
        violations.push(Violation::TableCount { found: report.tables, stats: stats.tables });
    }
    for &pfn in cache_pages {
        report.cache_pages += 1;
        if !seen.insert(pfn) {
            violations.push(Violation::CachePageLinked { pfn });
        } else if let Some(v) = not_live(host, pfn) {
            violations.push(v);
        }
    }
    let freed_unflushed = host.tables_freed_before_flush();
    if freed_unflushed > 0 {
        violations.push(Violation::FreedBeforeFlush { pages: freed_unflushed });
    }
    let alloc = host.alloc_stats();
    report.deferred = alloc.deferred;
    let accounted = report.tables + report.roots + report.cache_pages;
    if alloc.live != accounted {
        violations.push(Violation::Leak {
            live: alloc.live,
            tables: report.tables,
            roots: report.roots,
            cache_pages: report.cache_pages,
        });
    }
    drop(exclusive);
    if violations.is_empty() { Ok(report) } else { Err(violations) }
}

/// A violation when the page in `pfn` is not live.
fn not_live(host: &MockHost, pfn: Pfn) -> Option<Violation> {
    match host.page_state(pfn) {
        Some(PageState::Live) => None,
        state => Some(Violation::NotLive { pfn, state }),
    }
}
