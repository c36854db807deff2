//! [`Pml`]: one vCPU's Intel Page-Modification Log, the 4 KiB buffer of 512 guest-physical addresses
//! that the processor fills when a write sets an EPT leaf's dirty flag, with its 16-bit PML index.
//!
//! Source: Intel SDM Vol. 3C, chapter "VMX Support for Address Translation", section
//! "Page-Modification Logging" (and "Accessed and Dirty Flags for EPT"); chapter "Virtual Machine
//! Control Structures", the "PML index" guest-state field; appendix "VMX Basic Exit Reasons"
//! (edition 325462-080, June 2023). What the model keeps from them:
//! - the log has 512 entries; the index names the next one and starts at 511 (KVM's `PML_HEAD_INDEX`);
//! - before an access the processor may find it must set an EPT accessed or dirty flag; it then checks
//!   the index, and if it is outside 0..=511 a page-modification log-full event causes a VM exit (basic
//!   reason 62): no flag is set and the access does not happen;
//! - otherwise, when the processor changed a dirty flag from 0 to 1, it writes the access's
//!   guest-physical address with bits 11:0 clear at the index and decrements the index (from 0 it wraps
//!   to 0xFFFF, which is "full").
//!
//! Bochs (recipes/bochs-vmx.md) shows the consequence for huge pages: a 2 MiB leaf logs only its first
//! written 4 KiB page, which is why the MMU maps dirty-logged slots at 4 KiB.
//!
//! Checks: I4 at the hardware level. The walker logs exactly the D 0->1 transitions of its own
//! compare-exchanges (never one it lost, never one whose flag it did not set), and an access whose log
//! entry cannot be written does not retire. Draining the log into the dirty sink is the vCPU's part
//! ([`crate::Vcpu::flush_pml`]).

use tdp_core::addr::{Gpa, PAGE_SIZE};

/// Entries in the page-modification log (a 4 KiB page of 8-byte entries).
pub const PML_ENTRIES: usize = 512;

/// The PML index of an empty log: the processor writes entry 511 first (KVM's `PML_HEAD_INDEX`).
pub const PML_HEAD_INDEX: u16 = (PML_ENTRIES - 1) as u16;

/// Basic exit reason of a page-modification log-full VM exit ("VMX Basic Exit Reasons": 62).
pub const EXIT_REASON_PML_FULL: u16 = 62;

/// Counters of one vCPU's log (see [`Pml::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmlStats {
    /// GPAs the processor wrote to the log.
    pub logged: u64,
    /// Page-modification log-full exits taken.
    pub full_exits: u64,
    /// Times the log was drained while it held entries.
    pub drains: u64,
    /// Drained GPAs that became dirty marks.
    pub marked: u64,
    /// Drained GPAs that no memslot holds (dropped, as KVM's `kvm_vcpu_mark_page_dirty` drops them).
    pub dropped_no_slot: u64,
    /// Drained GPAs of a slot that is not dirty-logged now (dropped: KVM marks only tracked slots).
    pub dropped_not_logged: u64,
}

/// A page-modification log and its PML index, as the VMCS and the PML page hold them.
///
/// ```
/// use tdp_core::addr::Gpa;
/// use tdp_mock::pml::{Pml, PML_ENTRIES, PML_HEAD_INDEX};
///
/// let mut pml = Pml::new();
/// assert_eq!((pml.index(), pml.len()), (PML_HEAD_INDEX, 0));
/// for i in 0..PML_ENTRIES as u64 {
///     assert!(pml.try_log(Gpa(0x1234 + (i << 12))));
/// }
/// assert!(pml.is_full());
/// assert_eq!(pml.index(), 0xffff, "the index wrapped below 0");
/// assert!(!pml.try_log(Gpa(0x9000)), "a full log takes nothing");
/// let drained = pml.drain();
/// assert_eq!((drained.len(), drained[0], drained[511]), (512, Gpa(0x1000), Gpa(0x200000)));
/// assert_eq!(pml.index(), PML_HEAD_INDEX);
/// ```
#[derive(Clone)]
pub struct Pml {
    log: Box<[u64; PML_ENTRIES]>,
    index: u16,
    stats: PmlStats,
}

impl std::fmt::Debug for Pml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pml").field("index", &self.index).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Default for Pml {
    fn default() -> Self {
        Pml::new()
    }
}

impl Pml {
    /// An empty log: every entry zero, the index at [`PML_HEAD_INDEX`].
    #[must_use]
    pub fn new() -> Pml {
        Pml { log: Box::new([0; PML_ENTRIES]), index: PML_HEAD_INDEX, stats: PmlStats::default() }
    }

    /// The PML index: the entry the next logged GPA goes to. Outside 0..=511 the log is full.
    #[must_use]
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Whether the next access that needs an EPT accessed or dirty flag set takes a log-full exit.
    #[must_use]
    pub fn is_full(&self) -> bool {
        usize::from(self.index) >= PML_ENTRIES
    }

    /// Entries logged since the last drain.
    #[must_use]
    pub fn len(&self) -> usize {
        if self.is_full() { PML_ENTRIES } else { usize::from(PML_HEAD_INDEX - self.index) }
    }

    /// Whether nothing was logged since the last drain.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> PmlStats {
        self.stats
    }

    /// The logged GPAs in the order the processor wrote them (entry 511 first).
    #[must_use]
    pub fn entries(&self) -> Vec<Gpa> {
        (PML_ENTRIES - self.len()..PML_ENTRIES).rev().map(|i| Gpa(self.log[i])).collect()
    }

    /// What the processor does after it set a dirty flag from 0 to 1: writes `gpa` with bits 11:0 clear
    /// at the index and decrements the index. Returns false, writing nothing, when the log is full (the
    /// walker checks [`Pml::is_full`] before it sets any flag, so that case is a log-full exit).
    pub fn try_log(&mut self, gpa: Gpa) -> bool {
        if self.is_full() {
            return false;
        }
        self.log[usize::from(self.index)] = gpa.0 & !(PAGE_SIZE - 1);
        // From 0 this wraps to 0xFFFF, as the SDM says the 16-bit field does.
        self.index = self.index.wrapping_sub(1);
        self.stats.logged += 1;
        true
    }

    /// Empties the log the way KVM's `vmx_flush_pml_buffer` does: returns every logged GPA (oldest
    /// first) and resets the index to [`PML_HEAD_INDEX`].
    pub fn drain(&mut self) -> Vec<Gpa> {
        let gpas = self.entries();
        if !gpas.is_empty() {
            self.stats.drains += 1;
        }
        self.index = PML_HEAD_INDEX;
        gpas
    }

    /// Counts a log-full exit.
    pub(crate) fn count_full_exit(&mut self) {
        self.stats.full_exits += 1;
    }

    /// Counts what happened to one drained GPA.
    pub(crate) fn count_drained(&mut self, outcome: DrainedGpa) {
        match outcome {
            DrainedGpa::Marked => self.stats.marked += 1,
            DrainedGpa::NoSlot => self.stats.dropped_no_slot += 1,
            DrainedGpa::NotLogged => self.stats.dropped_not_logged += 1,
        }
    }
}

/// What became of one GPA drained from the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DrainedGpa {
    /// It went to the dirty sink.
    Marked,
    /// No memslot holds it.
    NoSlot,
    /// Its slot is not dirty-logged.
    NotLogged,
}
