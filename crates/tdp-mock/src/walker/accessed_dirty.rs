//! The A/D step of a processor walk: accessed flags in every entry used and the dirty flag in the leaf
//! for a write, each set with a locked compare-exchange of the value the walk read (a lost race restarts
//! the walk), and Page-Modification Logging on top: the log-full check before any flag is set, and one
//! log entry for each D 0->1 transition this walk's own exchange made.
//!
//! Source: Intel SDM Vol. 3C, "Accessed and Dirty Flags for EPT" and "Page-Modification Logging"; AMD
//! APM Vol. 2, "Nested Paging" (edition 325462-080 / revision 3.41).
//!
//! Checks: I4 at the hardware level (no D transition unlogged when a log is given, none logged twice,
//! nothing set when the log is full).

use std::sync::atomic::Ordering;

use tdp_core::addr::{Gpa, PAGE_SIZE, Pfn};
use tdp_core::spte::TdpKind;

use super::decode;
use crate::host::MockHost;
use crate::pml::Pml;

/// One entry the walk used, for the A/D update.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Used {
    pub(super) table: Pfn,
    pub(super) index: usize,
    pub(super) value: u64,
}

/// How the A/D step of a walk ended.
pub(super) enum AdUpdate {
    /// An entry changed since it was read: walk again.
    Raced,
    /// A flag had to be set and the page-modification log is full: nothing was set.
    PmlFull,
    /// Every flag the access needs is set.
    Done {
        /// The leaf's D flag is set.
        dirty: bool,
        /// The GPA logged to PML, when this walk set D.
        logged: Option<Gpa>,
    },
}

/// Sets A in every entry used and D in the leaf for a write, each with a compare-exchange of the exact
/// value the walk read; logs `gpa` to `pml` when it is this walk's exchange that set D.
pub(super) fn set_accessed_dirty(
    host: &MockHost,
    kind: TdpKind,
    used: &[Used],
    write: bool,
    gpa: Gpa,
    pml: Option<&mut Pml>,
) -> AdUpdate {
    let (accessed, dirty) = decode::accessed_dirty_bits(kind);
    let last = used.len() - 1;
    let wanted = |i: usize, u: &Used| u.value | accessed | if i == last && write { dirty } else { 0 };
    // SDM "Page-Modification Logging": the index is examined as soon as the processor finds it must set
    // an accessed or dirty flag, before it sets any; a full log means nothing is set at all.
    if pml.as_deref().is_some_and(Pml::is_full)
        && used.iter().enumerate().any(|(i, u)| wanted(i, u) != u.value)
    {
        return AdUpdate::PmlFull;
    }
    for (i, u) in used.iter().enumerate() {
        let new = wanted(i, u);
        if new == u.value {
            continue;
        }
        let Some(table) = host.arena_table(u.table) else {
            return AdUpdate::Raced;
        };
        // AcqRel/Acquire like a locked RMW: pairs with the core's exchanges of the same entry.
        if table[u.index].compare_exchange(u.value, new, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return AdUpdate::Raced;
        }
    }
    let leaf = used[last].value;
    let set_dirty = write && leaf & dirty == 0;
    let mut logged = None;
    // Not full (checked above), so the entry is written: the exchange that set D is the one the log
    // records, exactly once.
    if set_dirty
        && let Some(pml) = pml
        && pml.try_log(gpa)
    {
        logged = Some(Gpa(gpa.0 & !(PAGE_SIZE - 1)));
    }
    AdUpdate::Done { dirty: write || leaf & dirty != 0, logged }
}
