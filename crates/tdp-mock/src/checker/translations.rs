//! [`check_translations`]: the I1 checker. Every present leaf of a root is compared with the test's own
//! reference memslots (not the core's) and with what the hardware walker sees at it; every MMIO SPTE
//! must name its own gfn, make hardware exit as misconfigured, and may cover slot memory only when its
//! generation is stale.

use tdp_core::addr::{AsId, Level, Pfn};
use tdp_core::fault::AccessKind;
use tdp_core::host::TableMemory;
use tdp_core::memslot::Memslot;
use tdp_core::mmu::{Mmu, RootRef};
use tdp_core::spte::{Access, SpteFormat};

use super::{EntryRef, Violation, scan_tree};
use crate::host::{MockHost, PageState};
use crate::walker::{Hardware, WalkMode, WalkOutcome, walk};

/// Checks I1 on the tree of `root` against `reference`, the test's model of the memslots. Returns how
/// many leaves and MMIO SPTEs were checked.
///
/// ```
/// use tdp_core::addr::{AsId, Gfn, Gpa, SlotId};
/// use tdp_core::fault::AccessKind;
/// use tdp_core::memslot::SlotFlags;
/// use tdp_core::mmu::MmuConfig;
/// use tdp_mock::{check_translations, HostConfig, Machine, Violation};
///
/// let m = Machine::new(MmuConfig::EPT, HostConfig::default())?;
/// let slot = m.ram_slot(AsId(0), SlotId(0), Gfn(0), 0x400, SlotFlags::empty());
/// m.mmu().write().insert_memslot(slot)?;
/// let mut vcpu = m.new_vcpu(AsId(0));
/// vcpu.access(m.mmu(), Gpa(0x1000), AccessKind::Write)?;
/// let root = vcpu.root().expect("the access loaded a root");
/// assert_eq!(check_translations(m.mmu(), root, &[slot]), Ok(1));
/// // A reference model that never had the slot disagrees with the 2 MiB leaf.
/// let errors = check_translations(m.mmu(), root, &[]).unwrap_err();
/// assert!(matches!(errors[0], Violation::LeafWithoutSlot { .. }));
/// vcpu.release(m.mmu());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// Every [`Violation`] found (all of them I1).
pub fn check_translations(
    mmu: &Mmu<MockHost>,
    root: &RootRef,
    reference: &[Memslot],
) -> Result<usize, Vec<Violation>> {
    check_translations_in(mmu, root.pfn(), root.as_id(), reference)
}

/// [`check_translations`] for a root named by its frame and address space (e.g. from
/// [`Mmu::roots`], for roots no vCPU holds).
///
/// # Errors
/// As [`check_translations`].
pub fn check_translations_in(
    mmu: &Mmu<MockHost>,
    root: Pfn,
    as_id: AsId,
    reference: &[Memslot],
) -> Result<usize, Vec<Violation>> {
    let exclusive = mmu.write();
    let generation = exclusive.memslots().generation();
    let host = mmu.host();
    let _guard = host.begin_walk();
    let ctx = Ctx {
        host,
        fmt: *mmu.format(),
        hw: Hardware::for_config(mmu.config()),
        root,
        root_level: mmu.config().root_level,
        as_id,
        reference,
        generation,
    };
    let mut violations = Vec::new();
    let mut checked = 0;
    scan_tree(host, &ctx.fmt, root, ctx.root_level, &mut |e| {
        if ctx.fmt.is_mmio(e.spte) {
            checked += 1;
            ctx.check_mmio(e, &mut violations);
            return false;
        }
        if !e.spte.is_present() {
            return false;
        }
        if !e.spte.is_leaf(e.level) {
            // Free pages hold poison, which would read as leaves; reporting them is check_tables's job.
            return matches!(host.page_state(e.spte.pfn()), Some(PageState::Live | PageState::Deferred));
        }
        checked += 1;
        ctx.check_leaf(e, &mut violations);
        false
    });
    drop(exclusive);
    if violations.is_empty() { Ok(checked) } else { Err(violations) }
}

struct Ctx<'a> {
    host: &'a MockHost,
    fmt: SpteFormat,
    hw: Hardware,
    root: Pfn,
    root_level: Level,
    as_id: AsId,
    reference: &'a [Memslot],
    generation: u64,
}

impl Ctx<'_> {
    fn slot_of(&self, gfn: tdp_core::addr::Gfn) -> Option<&Memslot> {
        self.reference.iter().find(|s| s.as_id == self.as_id && s.contains(gfn))
    }

    fn peek(&self, gfn: tdp_core::addr::Gfn) -> WalkOutcome {
        walk(self.host, self.hw, self.root, self.root_level, gfn.gpa(), AccessKind::Read, WalkMode::Peek)
    }

    fn check_leaf(&self, e: &EntryRef, violations: &mut Vec<Violation>) {
        let (gfn, level, spte) = (e.gfn, e.level, e.spte);
        let Some(slot) = self.slot_of(gfn) else {
            violations.push(Violation::LeafWithoutSlot { as_id: self.as_id, gfn, level, spte });
            return;
        };
        if !slot.contains(tdp_core::addr::Gfn(gfn.0 + level.pages() - 1)) {
            violations.push(Violation::LeafCrossesSlot { gfn, level, spte, slot: slot.id });
        }
        // Where the host page lives now (its default frame unless the host MMU moved it).
        let Some(expected) = self.host.host_frame(slot.host_addr(gfn)) else {
            violations.push(Violation::LeafOfSwappedPage { gfn, level, spte });
            return;
        };
        if spte.pfn() != expected {
            violations.push(Violation::WrongFrame { gfn, level, expected, found: spte.pfn() });
        }
        let mut allowed = Access::READ | Access::EXEC;
        if slot.is_writable()
            && !self.host.any_host_readonly(expected, level.pages())
            && !self.host.is_ksm_shared(slot.host_addr(gfn))
        {
            allowed |= Access::WRITE;
        }
        if self.fmt.is_access_tracked(spte) {
            // Aged without A/D bits: hardware must fault on it (not present) and what the fast path
            // restores (the saved rights, W through MMU-writable) must stay within what the slot allows.
            let mut restorable = self.fmt.access(self.fmt.access_restored(spte));
            if self.fmt.is_mmu_writable(spte) {
                restorable |= Access::WRITE;
            }
            if !allowed.contains(restorable) {
                violations.push(Violation::WritableBeyondSlot { gfn, level, spte });
            }
            let seen = self.peek(gfn);
            if matches!(seen, WalkOutcome::Translated { .. }) {
                let rights = Access::empty();
                violations.push(Violation::HardwareDisagrees { gfn, pfn: spte.pfn(), level, rights, seen });
            }
            return;
        }
        let rights = self.fmt.access(spte);
        if !allowed.contains(rights) {
            violations.push(Violation::WritableBeyondSlot { gfn, level, spte });
        }
        let seen = self.peek(gfn);
        let agrees = matches!(seen, WalkOutcome::Translated { pfn, level: l, rights: r }
            if pfn == spte.pfn() && l == level && r == rights && allowed.contains(r));
        if !agrees {
            violations.push(Violation::HardwareDisagrees { gfn, pfn: spte.pfn(), level, rights, seen });
        }
    }

    fn check_mmio(&self, e: &EntryRef, violations: &mut Vec<Violation>) {
        let (gfn, spte) = (e.gfn, e.spte);
        let named = self.fmt.mmio_gfn(spte);
        if named != gfn {
            violations.push(Violation::MmioWrongGfn { gfn, spte, named });
        }
        if self.slot_of(gfn).is_some() && self.fmt.mmio_generation_matches(spte, self.generation) {
            violations.push(Violation::MmioShadowsSlot { gfn, spte });
        }
        let seen = self.peek(gfn);
        if seen != WalkOutcome::Misconfig {
            violations.push(Violation::MmioNotReserved { gfn, spte, seen });
        }
    }
}
