//! The scenario's hypervisor-side work that does not depend on the vendor, shared by both Bochs
//! hypervisors (`examples/bochs-svm` includes this file by path): starting dirty logging, harvesting and
//! resetting the ring, aging a range (`Step::Age`), moving a page to another host frame (`Step::Remap`),
//! emulating the MMIO `mov`s, sampling translations and reading the moved pages after the run, and the
//! host steps of NX huge pages, write tracking, stopping logging and snapshots ([`run_step`], with the
//! emulation of a tracked write, [`emulate_tracked_write`]). Each takes the MMU over any `tdp-core`
//! host, and reports what goes wrong as a message for the result line. The must-fail builds pass
//! `broken`: aging then only tests (`broken-age`), the move skips the MMU notifier (`broken-remap`),
//! the mitigation stays off (`broken-nx`), the page is never tracked (`broken-track`), stopping logging
//! zaps the huge ranges after recovering them (`broken-recover`).

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::{Gfn, Gpa, SlotId};
use tdp_core::dirty_ring::DirtyRingConsumer;
use tdp_core::host::Host;
use tdp_core::memslot::SlotFlags;
use tdp_core::mmu::Mmu;
use tdp_metal::ring_sink::RingSink;
use tdp_metal::scenario::{
    AS_ID, Broken, Observed, Paging, REMAP_POOL_OFFSET, Scenario, Step, Translation, age_step, mmio_value,
    nx_on_step, nx_recover_step, stop_logging_step, track_step, translate, untrack_step,
};
use tdp_metal::translate::IdentityTranslate;

use crate::layout::host_addr;

/// The step a hypercall names by its index.
fn step(scenario: &Scenario, index: u64) -> Result<(usize, Step), String> {
    let at = usize::try_from(index).ok().filter(|&i| i < scenario.steps.len());
    let at = at.ok_or_else(|| format!("hypercall names step {index}, which does not exist"))?;
    Ok((at, scenario.steps[at]))
}

/// Turns dirty logging on for `slot` and runs the flush the write protection owes.
///
/// # Errors
/// No such slot, or the MMU refused the flags.
pub fn start_logging<H: Host>(mmu: &Mmu<H>, slot: SlotId) -> Result<(), String> {
    let mut w = mmu.write();
    let flags = w
        .memslots()
        .get(AS_ID, slot)
        .map(|s| s.flags | SlotFlags::LOG_DIRTY)
        .ok_or_else(|| format!("start logging: no slot {}", slot.0))?;
    let flush = w
        .set_memslot_flags(AS_ID, slot, flags)
        .map_err(|e| format!("start logging on slot {}: {e}", slot.0))?;
    drop(w);
    flush.run(mmu.host());
    Ok(())
}

/// Harvests the ring into a set of gfns of the scenario's slots, then resets it against the MMU (which
/// re-protects what was harvested) and runs the flush the reset owes.
pub fn harvest<H: Host>(
    mmu: &Mmu<H>,
    scenario: &Scenario,
    sink: &mut RingSink<'static>,
    consumer: &mut DirtyRingConsumer<'static>,
) -> BTreeSet<u64> {
    let base = |id: SlotId| scenario.slots.iter().find(|s| s.id == id).map_or(u64::MAX, |s| s.base_gfn.0);
    harvest_slots(mmu, base, sink, consumer)
}

/// [`harvest`] for any slots: `base_gfn` gives a slot's first gfn (`u64::MAX` for an unknown slot).
pub fn harvest_slots<H: Host>(
    mmu: &Mmu<H>,
    base_gfn: impl Fn(SlotId) -> u64,
    sink: &mut RingSink<'static>,
    consumer: &mut DirtyRingConsumer<'static>,
) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    consumer.harvest(usize::MAX, |e| {
        set.insert(base_gfn(e.slot.id()).wrapping_add(e.offset));
    });
    let (_, flush) = sink.reset_by(|ring| mmu.write().reset_dirty_ring(ring));
    flush.run(mmu.host());
    set
}

/// `Step::Age` number `index`: ages the range one gfn at a time and returns the young ones, then flushes
/// so the next access walks the tables (the core's aging never flushes). `broken`: only tests.
///
/// # Errors
/// Step `index` is no age.
pub fn age<H: Host>(
    mmu: &Mmu<H>,
    scenario: &Scenario,
    index: u64,
    broken: bool,
) -> Result<BTreeSet<u64>, String> {
    let (_, Step::Age { gpa, pages }) = step(scenario, index)? else {
        return Err(format!("hypercall age names step {index}, which is no age"));
    };
    Ok(age_step(mmu, gpa.gfn().0, pages, broken))
}

/// `Step::Remap` number `index`: the host moves the page to the next frame of the remap pool, as Linux
/// migrates a page: invalidation start over the page's 2 MiB host block (the core zaps and flushes),
/// copy, the old frame freed (zeroed here), the new frame recorded in `translate`, invalidation end.
/// `broken`: without the start and end.
///
/// # Errors
/// Step `index` is no remap, or the MMU or `translate` refused.
pub fn remap<H: Host>(
    mmu: &Mmu<H>,
    translate: &IdentityTranslate<'_>,
    scenario: &Scenario,
    index: u64,
    broken: bool,
) -> Result<(), String> {
    let (at, Step::Remap { gpa }) = step(scenario, index)? else {
        return Err(format!("hypercall remap names step {index}, which is no remap"));
    };
    let earlier = scenario.steps[..at].iter().filter(|s| matches!(s, Step::Remap { .. })).count();
    let from = host_addr(gpa.0 & !0xfff);
    let to = host_addr(REMAP_POOL_OFFSET + earlier as u64 * 4096);
    let first = gpa.gfn().0 & !511;
    if !broken {
        mmu.write()
            .invalidate_range_start(AS_ID, Gfn(first), Gfn(first + 512))
            .map_err(|e| format!("remap: {e}"))?;
    }
    // SAFETY: `from` and `to` are distinct 4 KiB pages of guest RAM (the data slot's page and a pool
    // page past every slot, `tdp_metal::scenario::REMAP_POOL_OFFSET`), identity-mapped, and the guest
    // is stopped at this exit.
    unsafe {
        core::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, 4096);
        core::ptr::write_bytes(from as *mut u8, 0, 4096);
    }
    let moved = translate.move_page(from, to);
    if !broken {
        mmu.write().invalidate_range_end().map_err(|e| format!("remap: {e}"))?;
    }
    moved.map_err(|e| format!("remap: {e}"))
}

/// Emulates the MMIO access at guest `rip` to `gpa`: the two `moffs` forms the guest generator emits
/// (REX.W A1 `mov rax, [moffs64]`, REX.W A3 `mov [moffs64], rax`, 10 bytes each), with the guest's RAX
/// in `rax`. Records the access in `seen` and returns RAX after the instruction and its length.
///
/// # Errors
/// `rip` outside the guest code, or an instruction that is neither form for `gpa`.
pub fn emulate_mmio(
    code: core::ops::Range<u64>,
    rip: u64,
    gpa: u64,
    rax: u64,
    seen: &mut Observed,
) -> Result<(u64, u64), String> {
    if !(code.start..code.end.saturating_sub(10)).contains(&rip) {
        return Err(format!("MMIO at {gpa:#x} from rip {rip:#x} outside the guest code"));
    }
    let mut insn = [0u8; 10];
    // SAFETY: `rip` lies in the guest's code area (checked above), backed by identity-mapped guest RAM
    // that nothing else writes while the guest is stopped.
    unsafe { core::ptr::copy_nonoverlapping(host_addr(rip) as *const u8, insn.as_mut_ptr(), 10) };
    let mut moffs = [0u8; 8];
    moffs.copy_from_slice(&insn[2..]);
    if u64::from_le_bytes(moffs) != gpa {
        return Err(format!("MMIO exit at {gpa:#x} but the instruction addresses {moffs:x?}"));
    }
    match insn[..2] {
        [0x48, 0xa1] => {
            seen.mmio_reads += 1;
            Ok((mmio_value(Gpa(gpa)), 10))
        }
        [0x48, 0xa3] => {
            seen.mmio_writes.push((gpa, rax));
            Ok((rax, 10))
        }
        _ => Err(format!("cannot emulate {insn:x?} at rip {rip:#x}")),
    }
}

/// The translations of the scenario's sample gfns in the `paging` tables at `root`, decoded with
/// `read(table_pfn, index)` and the slots' host `bases`.
pub fn sample(
    scenario: &Scenario,
    paging: Paging,
    read: impl FnMut(u64, usize) -> u64,
    root: u64,
    bases: &[(u16, u64, u64)],
) -> Vec<Translation> {
    sample_gfns(scenario.sample_gfns(), paging, read, root, bases)
}

/// [`sample`] for the given `gfns`.
pub fn sample_gfns(
    gfns: Vec<u64>,
    paging: Paging,
    mut read: impl FnMut(u64, usize) -> u64,
    root: u64,
    bases: &[(u16, u64, u64)],
) -> Vec<Translation> {
    gfns.into_iter()
        .map(|gfn| Translation { gfn, kind: translate(paging, &mut read, root, gfn, bases) })
        .collect()
}

/// After the run: for each remap step, its address and the `u64` the page's current host frame holds
/// there.
pub fn host_reads(scenario: &Scenario, translate: &IdentityTranslate<'_>) -> Vec<(u64, u64)> {
    scenario
        .expected_host_reads()
        .into_iter()
        .map(|(gpa, _)| {
            let at = translate.current_address(host_addr(gpa));
            // SAFETY: `at` is an 8-byte aligned address (the scenario validates remap addresses) in
            // identity-mapped guest RAM (the page's current frame); the guest has stopped.
            (gpa, unsafe { core::ptr::read_volatile(at as *const u64) })
        })
        .collect()
}

/// What the vendor's loop must do after [`run_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Resume the guest.
    Resume,
    /// The step may have invalidated every root: load a new one (if so) before resuming.
    ReloadRoot,
}

/// Runs host step `index` (`Step::StopLogging`, `Track`, `Untrack`, `NxHugePages`, `NxRecover` or
/// `Snapshot`) for the build `broken`, recording into `seen`; `sample(gfns)` gives the current
/// translations of `gfns`.
///
/// # Errors
/// Step `index` is none of those, or the MMU refused.
pub fn run_step<H: Host>(
    mmu: &Mmu<H>,
    scenario: &Scenario,
    index: u64,
    broken: Option<Broken>,
    seen: &mut Observed,
    sample: impl Fn(Vec<u64>) -> Vec<Translation>,
) -> Result<After, String> {
    let (_, at) = step(scenario, index)?;
    let mut after = After::Resume;
    match at {
        Step::StopLogging { slot } => stop_logging_step(mmu, slot, broken == Some(Broken::Recover))?,
        Step::Track { gpa } => track_step(mmu, gpa.gfn(), broken == Some(Broken::Track))?,
        Step::Untrack { gpa } => untrack_step(mmu, gpa.gfn(), broken == Some(Broken::Track))?,
        Step::NxHugePages => {
            seen.translations = sample(scenario.sample_gfns());
            nx_on_step(mmu, broken == Some(Broken::Nx));
            after = After::ReloadRoot;
        }
        Step::NxRecover => seen.nx_recovered.push(nx_recover_step(mmu)),
        Step::Snapshot(snap) => {
            seen.snapshot(sample(snap.gfns().collect()));
            return Ok(after);
        }
        other => return Err(format!("hypercall step names step {index} ({other:?}), no host step")),
    }
    seen.host_step();
    Ok(after)
}

/// Emulates the guest's write to a write-tracked page at guest `rip` to `gpa`: the `mov [moffs64], rax`
/// (REX.W A3, 10 bytes) the guest generator emits for a write, with RAX in `rax`. Writes the value into
/// the page's memory, records it in `seen` and returns the instruction's length.
///
/// # Errors
/// `rip` outside the guest code, another instruction, or an unaligned `gpa`.
pub fn emulate_tracked_write(
    code: core::ops::Range<u64>,
    rip: u64,
    gpa: u64,
    rax: u64,
    seen: &mut Observed,
) -> Result<u64, String> {
    let mut scratch = Observed::default();
    let (_, len) = emulate_mmio(code, rip, gpa, rax, &mut scratch)?;
    if scratch.mmio_writes.len() != 1 || !gpa.is_multiple_of(8) {
        return Err(format!(
            "tracked write at {gpa:#x} from rip {rip:#x} is no aligned `mov [moffs64], rax`"
        ));
    }
    // SAFETY: `gpa` is 8-byte aligned (checked) in a memslot the core found tracked, backed by
    // identity-mapped guest RAM at `host_addr(gpa)`; the guest is stopped at this exit.
    unsafe { core::ptr::write_volatile(host_addr(gpa) as *mut u64, rax) };
    seen.tracked_writes.push((gpa, rax));
    Ok(len)
}
