//! The hardware page walker: translates a guest-physical address through an EPT or NPT tree the way
//! the processor does, reporting the exit hardware would take when it cannot (EPT violation with its
//! exit qualification, EPT misconfiguration, nested page fault with its error code), and setting
//! accessed/dirty flags with locked compare-exchanges.
//!
//! With a [`Pml`] ([`walk_access`]), it is also Intel's Page-Modification Logging: a write that sets a
//! leaf's dirty flag from 0 to 1 logs its GPA, and an access that must set an accessed or dirty flag
//! while the log is full ends in [`WalkOutcome::PmlFull`] with nothing set.
//!
//! Checks: I1 (entries are decoded by [`decode`] from the manuals, independently of the core's
//! `SpteFormat`), I2 (every table frame is checked against the host's page state before it is read;
//! a free page ends the walk with [`WalkOutcome::FreedTable`] instead of reading poison) and I4 at the
//! hardware level (every D 0->1 transition the walk makes is logged when PML is on, and the walk
//! reports the leaf's D state so that a TLB entry serves writes only while D is set). The whole walk
//! holds a walk guard, as hardware walks are covered by the RCU-like deferral of frees.

mod accessed_dirty;
pub mod decode;

use std::sync::atomic::Ordering;

use tdp_core::addr::{Gfn, Gpa, Level, Pfn};
use tdp_core::fault::{AccessKind, ept_qual, npf_code};
use tdp_core::host::TableMemory;
use tdp_core::mmu::MmuConfig;
use tdp_core::spte::{Access, TdpKind};

use crate::host::{MockHost, PageState};
use crate::pml::Pml;
use accessed_dirty::{AdUpdate, Used, set_accessed_dirty};
use decode::{Entry, Rights};

/// What the simulated processor supports: the parts of IA32_VMX_EPT_VPID_CAP / CPUID the walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hardware {
    /// EPT or NPT.
    pub kind: TdpKind,
    /// EPT: accessed/dirty flags enabled in the EPTP. NPT always sets them, whatever this says.
    pub accessed_dirty: bool,
    /// The largest level at which a leaf is architecturally allowed (PS=1 above it is reserved).
    pub max_leaf_level: Level,
    /// MAXPHYADDR: address bits at or above it are reserved.
    pub max_phys_bits: u8,
}

impl Hardware {
    /// The hardware an MMU configuration is built for, with a 48-bit MAXPHYADDR.
    ///
    /// ```
    /// use tdp_core::mmu::MmuConfig;
    /// use tdp_core::spte::TdpKind;
    /// use tdp_mock::Hardware;
    /// let hw = Hardware::for_config(&MmuConfig::NPT);
    /// assert_eq!((hw.kind, hw.max_phys_bits), (TdpKind::Npt, 48));
    /// ```
    #[must_use]
    pub fn for_config(cfg: &MmuConfig) -> Hardware {
        Hardware {
            kind: cfg.format.kind(),
            accessed_dirty: cfg.format.has_accessed_dirty(),
            max_leaf_level: cfg.format.max_leaf_level(),
            max_phys_bits: 48,
        }
    }

    /// Whether walks set accessed/dirty flags.
    #[must_use]
    pub fn sets_accessed_dirty(&self) -> bool {
        self.kind == TdpKind::Npt || self.accessed_dirty
    }
}

/// Whether the walk is the processor's own (sets A/D flags) or a checker's look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkMode {
    /// A guest access: A/D flags are set as hardware sets them.
    Access,
    /// A side-effect-free look, for checkers.
    Peek,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkOutcome {
    /// The access is allowed.
    Translated {
        /// The 4 KiB host frame holding the address.
        pfn: Pfn,
        /// The level of the leaf that mapped it.
        level: Level,
        /// The rights of the whole walk (AND over the entries used).
        rights: Access,
    },
    /// An EPT violation (`exit` is the exit qualification) or a nested page fault without RSVD
    /// (`exit` is the error code, EXITINFO1).
    Violation {
        /// Exit qualification (EPT) or error code (NPT).
        exit: u64,
    },
    /// An EPT misconfiguration, or a nested page fault with RSVD (error code: [`npf_reserved_code`]).
    Misconfig,
    /// A page-modification log-full event (only in [`walk_access`] with a [`Pml`]): the access needed an
    /// accessed or dirty flag set while the PML index was outside 0..=511. No flag was set and the
    /// access did not happen; the VM exit has basic reason [`crate::pml::EXIT_REASON_PML_FULL`].
    PmlFull,
    /// The walk reached a table frame that is free (or not a table page at all): an I2 violation.
    FreedTable {
        /// The frame.
        pfn: Pfn,
    },
}

/// The right an access needs.
#[must_use]
pub fn access_right(access: AccessKind) -> Access {
    match access {
        AccessKind::Read => Access::READ,
        AccessKind::Write => Access::WRITE,
        AccessKind::Exec => Access::EXEC,
    }
}

/// The nested-page-fault error code of a reserved-bit fault for `access`: P | RSVD | U, W or ID, and
/// final-translation.
#[must_use]
pub fn npf_reserved_code(access: AccessKind) -> u64 {
    npf_code::PRESENT | npf_code::RSVD | npf_access_bits(access)
}

/// Translates `gpa` for `access` through the tree whose root table (at `root_level`) is in frame
/// `root`, as `hw` would.
///
/// ```
/// use tdp_core::addr::{Gpa, Level};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::host::TableMemory;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_core::spte::Spte;
/// use tdp_mock::{walk, Hardware, HostConfig, MockHost, WalkMode, WalkOutcome};
///
/// let host = MockHost::new(HostConfig::default());
/// let root = host.alloc_table(Spte(1 << 63))?; // every EPT entry not present (suppress #VE)
/// let hw = Hardware::for_config(&MmuConfig::EPT);
/// // Bochs reports 0x182 for a write to a GPA with no EPT entry.
/// let out = walk(&host, hw, root, Level::L4, Gpa(0x5000), AccessKind::Write, WalkMode::Access);
/// assert_eq!(out, WalkOutcome::Violation { exit: 0x182 });
/// host.free_table_now(root);
/// # Ok::<(), tdp_core::host::AllocError>(())
/// ```
pub fn walk(
    host: &MockHost,
    hw: Hardware,
    root: Pfn,
    root_level: Level,
    gpa: Gpa,
    access: AccessKind,
    mode: WalkMode,
) -> WalkOutcome {
    walk_detail(host, hw, Tree { root, level: root_level }, gpa, access, mode, None).outcome
}

/// A walk for a guest access, with what the rest of the processor needs from it besides the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccessWalk {
    /// How the walk ended.
    pub outcome: WalkOutcome,
    /// The leaf's dirty flag is set after the walk (the walk set it for a write, or found it set): a
    /// TLB entry filled from this walk may serve writes without walking again. False when the walk did
    /// not translate, and on hardware that does not set A/D flags.
    pub dirty: bool,
    /// The 4 KiB-aligned GPA the walk wrote to the page-modification log, if it did.
    pub logged: Option<Gpa>,
}

/// The processor's walk for a guest access (mode [`WalkMode::Access`]), with Page-Modification
/// Logging when `pml` is given: a write that sets the leaf's D flag from 0 to 1 logs `gpa` (bits 11:0
/// clear), and an access that must set an A or D flag while the log is full ends in
/// [`WalkOutcome::PmlFull`] having set nothing. Whether the processor has PML is the caller's choice
/// ([`crate::Vcpu`] passes a log only on EPT).
///
/// ```
/// use std::sync::atomic::Ordering;
/// use tdp_core::addr::{Gpa, Level};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::host::TableMemory;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_core::spte::Spte;
/// use tdp_mock::pml::Pml;
/// use tdp_mock::walker::decode::ept;
/// use tdp_mock::{walk_access, Hardware, HostConfig, MockHost, WalkOutcome};
///
/// let host = MockHost::new(HostConfig::default());
/// let nonpresent = Spte(1 << 63);
/// let [l4, l3, l2] = [(); 3].map(|_| host.alloc_table(nonpresent).unwrap());
/// let table = ept::R | ept::W | ept::X | ept::A;
/// host.table(l4)[0].store(table | l3.hpa(), Ordering::SeqCst);
/// host.table(l3)[0].store(table | l2.hpa(), Ordering::SeqCst);
/// // A clean, accessed 2 MiB write-back leaf for GPAs 0..2 MiB at host address 1 GiB.
/// host.table(l2)[0].store(table | ept::PS | (6 << 3) | 0x4000_0000, Ordering::SeqCst);
/// let hw = Hardware::for_config(&MmuConfig::EPT_PML);
/// let mut pml = Pml::new();
/// let w = walk_access(&host, hw, l4, Level::L4, Gpa(0x3008), AccessKind::Write, Some(&mut pml));
/// assert!(matches!(w.outcome, WalkOutcome::Translated { .. }));
/// assert_eq!((w.dirty, w.logged), (true, Some(Gpa(0x3000))));
/// // D is set now: a write elsewhere in the 2 MiB page logs nothing (Bochs shows the same).
/// let again = walk_access(&host, hw, l4, Level::L4, Gpa(0x5000), AccessKind::Write, Some(&mut pml));
/// assert_eq!((again.dirty, again.logged), (true, None));
/// assert_eq!(pml.entries(), [Gpa(0x3000)]);
/// # Ok::<(), tdp_core::host::AllocError>(())
/// ```
pub fn walk_access(
    host: &MockHost,
    hw: Hardware,
    root: Pfn,
    root_level: Level,
    gpa: Gpa,
    access: AccessKind,
    pml: Option<&mut Pml>,
) -> AccessWalk {
    walk_detail(host, hw, Tree { root, level: root_level }, gpa, access, WalkMode::Access, pml)
}

/// The tree a walk starts from: its root table and the root's level (the EPTP / nCR3 in use).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tree {
    pub(crate) root: Pfn,
    pub(crate) level: Level,
}

/// Every walk goes through here; `pml` only matters in [`WalkMode::Access`].
pub(crate) fn walk_detail(
    host: &MockHost,
    hw: Hardware,
    tree: Tree,
    gpa: Gpa,
    access: AccessKind,
    mode: WalkMode,
    mut pml: Option<&mut Pml>,
) -> AccessWalk {
    let _guard = host.begin_walk();
    loop {
        if let Some(outcome) = walk_once(host, &hw, tree, gpa, access, mode, pml.as_deref_mut()) {
            return outcome;
        }
        // An entry changed under the A/D update: walk again, as the processor's locked update does.
    }
}

/// One walk; `None` when an A/D update lost a race and the walk must restart.
fn walk_once(
    host: &MockHost,
    hw: &Hardware,
    tree: Tree,
    gpa: Gpa,
    access: AccessKind,
    mode: WalkMode,
    pml: Option<&mut Pml>,
) -> Option<AccessWalk> {
    let done = |outcome| Some(AccessWalk { outcome, dirty: false, logged: None });
    let gfn = gpa.gfn();
    let reach = tree.level.shift_in_frames() + 9;
    if gfn.0 >> reach != 0 {
        // Beyond the guest-physical address width of the tree: nothing can map it.
        return done(WalkOutcome::Violation { exit: not_present_exit(hw, access) });
    }
    let mut used = [Used::default(); 5];
    let mut depth = 0;
    let mut rights = Rights::ALL;
    let mut table = tree.root;
    let mut level = tree.level;
    let (frame, leaf_level) = loop {
        let index = gfn.index_at(level).get();
        let Some(value) = read_entry(host, table, index) else {
            return done(WalkOutcome::FreedTable { pfn: table });
        };
        used[depth] = Used { table, index, value };
        depth += 1;
        match decode::decode(hw, value, level) {
            Entry::NotPresent => return done(WalkOutcome::Violation { exit: not_present_exit(hw, access) }),
            Entry::Reserved => return done(WalkOutcome::Misconfig),
            Entry::Leaf { frame, rights: r } => {
                rights = rights.and(r);
                break (frame, level);
            }
            Entry::Table { next, rights: r } => {
                rights = rights.and(r);
                table = Pfn(next);
                level = level.lower().expect("decode never returns a table at level 1");
            }
        }
    };
    if let Some(exit) = permission_exit(hw, rights, access) {
        return done(WalkOutcome::Violation { exit });
    }
    let used = &used[..depth];
    let (dirty, logged) = if !hw.sets_accessed_dirty() {
        (false, None)
    } else if mode == WalkMode::Access {
        match set_accessed_dirty(host, hw.kind, used, access == AccessKind::Write, gpa, pml) {
            AdUpdate::Raced => return None,
            AdUpdate::PmlFull => return done(WalkOutcome::PmlFull),
            AdUpdate::Done { dirty, logged } => (dirty, logged),
        }
    } else {
        let (_, d) = decode::accessed_dirty_bits(hw.kind);
        (used[depth - 1].value & d != 0, None)
    };
    let offset = gfn.0 - gfn.align_down(leaf_level).0;
    let outcome =
        WalkOutcome::Translated { pfn: Pfn(frame + offset), level: leaf_level, rights: rights.access };
    Some(AccessWalk { outcome, dirty, logged })
}

/// Reads entry `index` of the table in `pfn`, or `None` if the page is free or not a table page.
fn read_entry(host: &MockHost, pfn: Pfn, index: usize) -> Option<u64> {
    let readable = |s: Option<PageState>| matches!(s, Some(PageState::Live | PageState::Deferred));
    if !readable(host.page_state(pfn)) {
        return None;
    }
    host.jitter();
    // Acquire pairs with the Release of the compare-exchange that linked the next table, so its
    // initialised entries are visible.
    let value = host.arena_table(pfn)?[index].load(Ordering::Acquire);
    // Freed while we read (only possible if the deferral was broken): the value may be poison.
    readable(host.page_state(pfn)).then_some(value)
}

/// The exit for a walk that met a not-present entry.
fn not_present_exit(hw: &Hardware, access: AccessKind) -> u64 {
    match hw.kind {
        // Bits 5:3 are the AND of the rights of the entries used, which is 0 once a not-present entry
        // is among them; bits 7 and 8 as Bochs reports them for an access to the translated address.
        TdpKind::Ept => ept_access_bit(access) | ept_qual::LINEAR_VALID | ept_qual::TRANSLATED,
        TdpKind::Npt => npf_access_bits(access),
    }
}

/// The exit for a present translation that denies `access`, or `None` when it allows it.
fn permission_exit(hw: &Hardware, rights: Rights, access: AccessKind) -> Option<u64> {
    if rights.user && rights.access.contains(access_right(access)) {
        return None;
    }
    Some(match hw.kind {
        TdpKind::Ept => {
            let mut exit = ept_access_bit(access) | ept_qual::LINEAR_VALID | ept_qual::TRANSLATED;
            if rights.access.contains(Access::READ) {
                exit |= ept_qual::READABLE;
            }
            if rights.access.contains(Access::WRITE) {
                exit |= ept_qual::WRITABLE;
            }
            if rights.access.contains(Access::EXEC) {
                exit |= ept_qual::EXECUTABLE;
            }
            exit
        }
        TdpKind::Npt => npf_code::PRESENT | npf_access_bits(access),
    })
}

fn ept_access_bit(access: AccessKind) -> u64 {
    match access {
        AccessKind::Read => ept_qual::READ,
        AccessKind::Write => ept_qual::WRITE,
        AccessKind::Exec => ept_qual::FETCH,
    }
}

/// U (nested walks are user accesses), W or ID for the access, and final-translation.
fn npf_access_bits(access: AccessKind) -> u64 {
    let kind = match access {
        AccessKind::Read => 0,
        AccessKind::Write => npf_code::WRITE,
        AccessKind::Exec => npf_code::FETCH,
    };
    npf_code::USER | npf_code::FINAL_TRANSLATION | kind
}

/// The first gfn after the page of `level` that holds `gfn`.
pub(crate) fn next_page(gfn: Gfn, level: Level) -> Gfn {
    Gfn(gfn.align_down(level).0 + level.pages())
}
