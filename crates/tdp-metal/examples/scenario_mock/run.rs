//! The `tdp-mock` runner of [`tdp_metal::scenario::SCENARIO`]: the same memslots, steps, dirty ring and
//! checks as the Bochs hypervisor (`examples/bochs-hv`), on the software hardware model. The mock has no
//! guest page tables, so each step is one access to its guest-physical address; its vCPU drains its PML
//! log into the ring at every exit and, here, before logging starts and before every harvest, as the
//! Bochs hypervisor does at the hypercall's exit.
//!
//! Shared by the `scenario_mock` example (which prints the result line `cargo xtask bochs` compares with
//! Bochs's) and by `tests/scenario_mock.rs`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use tdp_core::addr::{Gfn, Level, Pfn, RingSlot};
use tdp_core::dirty_ring::{DirtyGfn, DirtyRingConsumer, DirtyRingProducer, PML_ENTRIES, RingConfig};
use tdp_core::fault::AccessKind;
use tdp_core::host::TlbFlush;
use tdp_core::host::{DirtySink, DirtySource};
use tdp_core::memslot::{Memslot, SlotFlags};
use tdp_core::mmu::{EmulateReason, MmuConfig};
use tdp_core::spte::{EptOptions, NptOptions, SpteFormat};
use tdp_metal::scenario::report::{RunInfo, write_result_line};
use tdp_metal::scenario::{
    AS_ID, Broken, Check, Observed, Paging, REMAP_POOL_OFFSET, REMAP_POOL_PAGES, REMAP_POOL_SLOT, SCENARIO,
    Step, Translation, age_step, nx_on_step, nx_recover_step, stop_logging_step, track_step, translate,
    unprotect_leaves, untrack_step,
};
use tdp_mock::{AccessResult, HostConfig, Machine, Vcpu, VcpuError};

/// How dirty pages are logged: what the Bochs hypervisor picks for a CPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// EPT A/D bits and PML (`MmuConfig::EPT_PML`): corei7_skylake_x, icelake_u, tigerlake.
    Pml,
    /// Write protection, EPT without A/D, 2 MiB largest leaf: corei7_sandy_bridge_2600k, ivy_bridge.
    WriteProtect,
    /// Write protection with EPT A/D bits on (no PML): broadwell_ult, corei7_haswell_4770.
    AdWriteProtect,
    /// AMD nested paging: write protection (no PML), NPT A/D bits, 40 physical address bits (MMIO
    /// entries by reserved bit 51), leaves up to 2 MiB (the host maps guest RAM with 2 MiB pages):
    /// ryzen, zambezi, trinity_apu, phenom_8650_toliman (`docs/recipes/bochs-svm.md`).
    Npt,
}

impl Mode {
    /// The mode the hypervisor uses on Bochs CPU model `model`, if it is one the recipe lists with EPT.
    pub fn for_model(model: &str) -> Option<Mode> {
        match model {
            "corei7_skylake_x" | "corei7_icelake_u" | "tigerlake" => Some(Mode::Pml),
            "corei7_sandy_bridge_2600k" | "corei7_ivy_bridge_3770k" => Some(Mode::WriteProtect),
            "broadwell_ult" | "corei7_haswell_4770" => Some(Mode::AdWriteProtect),
            "ryzen" | "zambezi" | "trinity_apu" | "phenom_8650_toliman" => Some(Mode::Npt),
            _ => None,
        }
    }

    /// The MMU configuration, as the Bochs hypervisor builds it for this mode.
    pub fn config(self) -> MmuConfig {
        match self {
            Mode::Pml => MmuConfig::EPT_PML,
            Mode::WriteProtect => {
                let format = SpteFormat::ept(EptOptions { accessed_dirty: false, max_leaf_level: Level::L2 });
                MmuConfig { format, ..MmuConfig::EPT }
            }
            Mode::AdWriteProtect => MmuConfig::EPT,
            Mode::Npt => {
                let format = SpteFormat::npt(NptOptions { max_phys_bits: 40, max_leaf_level: Level::L2 });
                MmuConfig { format, ..MmuConfig::NPT }
            }
        }
    }

    /// The table format of this mode.
    pub fn paging(self) -> Paging {
        if self == Mode::Npt { Paging::Npt } else { Paging::Ept }
    }

    fn names(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Mode::Pml => ("EPT_PML", &["mock", "ept", "ept_4level", "ept_ad", "pml", "ept_2m"]),
            Mode::WriteProtect => ("EPT", &["mock", "ept", "ept_4level", "ept_2m"]),
            Mode::AdWriteProtect => ("EPT", &["mock", "ept", "ept_4level", "ept_ad", "ept_2m"]),
            Mode::Npt => ("NPT", &["mock", "npt", "npt_4level", "npt_ad", "npt_2m"]),
        }
    }
}

/// A finished mock run.
#[derive(Debug)]
pub struct MockRun {
    /// What it saw.
    pub seen: Observed,
    /// The scenario's checks on it.
    pub checks: Vec<Check>,
    /// The `TDP-RESULT` line.
    pub line: String,
}

impl MockRun {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }
}

/// The ring producer as the vCPU's dirty sink, shared with the harvest (which resets it).
pub struct RingSink {
    /// The producer.
    pub producer: DirtyRingProducer<'static>,
    /// Marks a full ring refused.
    pub lost: u64,
}

/// A [`RingSink`] shared between the vCPU (its dirty sink) and the harvest.
#[derive(Clone)]
pub struct SharedSink(pub Arc<Mutex<RingSink>>);

impl DirtySink for SharedSink {
    fn mark_dirty(&mut self, slot: &Memslot, gfn: Gfn, _source: DirtySource) {
        let mut sink = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if sink.producer.push(RingSlot::new(slot.as_id, slot.id), slot.offset_of(gfn)).is_err() {
            sink.lost += 1;
        }
    }
}

/// Runs the scenario on the mock for `model` in `mode`; with `broken`, makes that variant's mistake as
/// `bochs-hv` / `bochs-svm --features broken-<name>` does, so the checks must fail: corrupts the data
/// slot's leaves right after logging starts (`ept` on EPT, `npt` on NPT), ages without clearing (`age`),
/// or moves the remapped page with an MMU notifier that does nothing (`remap`).
///
/// # Errors
/// When the machine or ring cannot be set up; what goes wrong during the steps is recorded in the
/// result (its `guest_error`) instead, as the Bochs hypervisor does.
pub fn run(model: &str, mode: Mode, broken: Option<Broken>) -> Result<MockRun, String> {
    let paging = mode.paging();
    if let Some(b) = broken.filter(|b| b.corrupts().is_some_and(|p| p != paging)) {
        return Err(format!("broken-{} corrupts the other vendor's tables, not {paging:?}", b.name()));
    }
    let m = Machine::new(mode.config(), HostConfig { host_level: Level::L2, ..HostConfig::default() })
        .map_err(|e| format!("mock machine: {e}"))?;
    let mut bases = Vec::new();
    for s in SCENARIO.slots {
        let slot = m.ram_slot(AS_ID, s.id, s.base_gfn, s.pages, SlotFlags::empty());
        m.mmu().write().insert_memslot(slot).map_err(|e| format!("memslot {}: {e}", s.id.0))?;
        bases.push((s.id.0, slot.host_base, s.pages));
    }
    // The remap pool: guest RAM no slot uses, given to the host MMU one frame per remap.
    let pool = m.host().guest_ram_base() + REMAP_POOL_OFFSET;
    bases.push((REMAP_POOL_SLOT, pool, REMAP_POOL_PAGES));
    // As the hypervisor's: room for the largest harvest below the soft limit.
    let cfg = RingConfig::new(2048, PML_ENTRIES).map_err(|e| format!("ring: {e}"))?;
    let ring: &'static [DirtyGfn] = Box::leak((0..cfg.entries()).map(|_| DirtyGfn::zeroed()).collect());
    let producer = DirtyRingProducer::new(ring, cfg).map_err(|e| format!("ring: {e}"))?;
    let mut consumer = DirtyRingConsumer::new(ring, cfg).map_err(|e| format!("ring: {e}"))?;
    let sink = SharedSink(Arc::new(Mutex::new(RingSink { producer, lost: 0 })));
    let mut vcpu = m.new_vcpu(AS_ID);
    vcpu.set_dirty_sink(Box::new(sink.clone()));

    let host = m.host();
    let read = |t: u64, i: usize| {
        host.arena_table(Pfn(t)).map_or(0, |table| table[i].load(std::sync::atomic::Ordering::Relaxed))
    };
    let sample_gfns = |vcpu: &Vcpu, gfns: Vec<u64>| -> Vec<Translation> {
        let root = vcpu.root().map(|r| r.pfn().0).unwrap_or_default();
        gfns.into_iter()
            .map(|gfn| Translation { gfn, kind: translate(paging, read, root, gfn, &bases) })
            .collect()
    };
    let sample = |vcpu: &Vcpu| sample_gfns(vcpu, SCENARIO.sample_gfns());
    let mut seen = Observed::default();
    let corrupt = |vcpu: &Vcpu, first: u64, pages: u64| {
        if broken.and_then(Broken::corrupts).is_some() {
            let root = vcpu.root().map(|r| r.pfn().0).unwrap_or_default();
            let ad = m.mmu().format().has_accessed_dirty();
            unprotect_leaves(paging, |pfn| host.arena_table(Pfn(pfn)), root, first, pages, ad);
            host.flush_all();
        }
    };
    let hooks = Hooks { sample: &sample, sample_gfns: &sample_gfns, corrupt: &corrupt, broken, pool };
    if let Err(e) = steps(&m, &mut vcpu, &sink, &mut consumer, &mut seen, &hooks) {
        seen.guest_error = Some(e);
    }
    seen.pml_full_exits = vcpu.pml().map_or(0, |p| p.stats().full_exits);
    let counters = vcpu.mmu_state().counters;
    seen.ept_violations = counters.fixed + counters.spurious + counters.retried + counters.emulated;
    let flushes = m.host().flush_stats();
    seen.flushes = flushes.all + flushes.range;
    seen.invepts = seen.flushes;
    seen.ring_lost = sink.0.lock().unwrap_or_else(PoisonError::into_inner).lost;
    if seen.translations.is_empty() {
        // Taken at the NX step when the run reached it.
        seen.translations = sample(&vcpu);
    }
    seen.host_reads = SCENARIO
        .expected_host_reads()
        .into_iter()
        .map(|(gpa, _)| (gpa, host.read_hva_u64(host.guest_ram_base() + (gpa & !0xfff), gpa & 0xfff)))
        .collect();
    vcpu.release(m.mmu());

    let checks = SCENARIO.evaluate(&seen);
    let (mmu, features) = mode.names();
    let info = RunInfo { runner: "mock", model, mmu, features, broken };
    let mut line = String::new();
    write_result_line(&mut line, &info, &seen, &checks).map_err(|e| format!("result line: {e}"))?;
    Ok(MockRun { seen, checks, line })
}

/// What the step loop calls back into: the translation sampler, and the broken-ept corruption (a
/// no-op unless the run is that variant), given the logged slot's first gfn and size; and the broken
/// variant and the remap pool's host address, for the host's steps.
struct Hooks<'a> {
    sample: &'a dyn Fn(&Vcpu) -> Vec<Translation>,
    sample_gfns: &'a dyn Fn(&Vcpu, Vec<u64>) -> Vec<Translation>,
    corrupt: &'a dyn Fn(&Vcpu, u64, u64),
    broken: Option<Broken>,
    pool: u64,
}

/// Runs every step; the first failure ends the run with its description.
fn steps(
    m: &Machine,
    vcpu: &mut Vcpu,
    sink: &SharedSink,
    consumer: &mut DirtyRingConsumer<'static>,
    seen: &mut Observed,
    hooks: &Hooks<'_>,
) -> Result<(), String> {
    let mmu = m.mmu();
    for (i, step) in SCENARIO.steps.iter().enumerate() {
        let err = |e: &dyn std::fmt::Display| format!("step {i} ({step:?}): {e}");
        let taken = vcpu.mmu_state().counters.taken;
        match *step {
            Step::Read { gpa } => {
                let got = vcpu.read_u64(mmu, gpa).map_err(|e| err(&e))?;
                let want = SCENARIO.expected_read(i);
                if Some(got) != want {
                    // The read's fault counts, as under Bochs, where the guest's check fails after it.
                    count_faults(seen, vcpu, taken, step);
                    return Err(format!("step {i}: read {got:#x}, expected {want:x?}"));
                }
            }
            Step::Write { .. } | Step::WriteRange { .. } => {
                for (gpa, value) in step.writes() {
                    match vcpu.write_u64(mmu, gpa, value) {
                        Ok(_) => {}
                        Err(VcpuError::Emulate { reason: EmulateReason::WriteTracked, .. }) => {
                            // The host emulates the write into the page's frame.
                            let host = m.host();
                            let frame = host.host_frame(host.guest_ram_base() + (gpa.0 & !0xfff));
                            let frame = frame.ok_or_else(|| err(&"tracked page has no host frame"))?;
                            host.write_u64(frame, gpa.page_offset(), value);
                            seen.tracked_writes.push((gpa.0, value));
                        }
                        Err(e) => return Err(err(&e)),
                    }
                }
            }
            Step::Exec { gpa } => match vcpu.access(mmu, gpa, AccessKind::Exec).map_err(|e| err(&e))? {
                AccessResult::Done { .. } => {}
                other => return Err(err(&format!("fetch gave {other:?}"))),
            },
            Step::MmioRead { gpa } | Step::MmioWrite { gpa, .. } => {
                let write = matches!(step, Step::MmioWrite { .. });
                let kind = if write { AccessKind::Write } else { AccessKind::Read };
                match vcpu.access(mmu, gpa, kind).map_err(|e| err(&e))? {
                    AccessResult::Emulated(EmulateReason::Mmio) => {}
                    other => return Err(err(&format!("MMIO access gave {other:?}"))),
                }
                match *step {
                    Step::MmioWrite { value, .. } => seen.mmio_writes.push((gpa.0, value)),
                    _ => seen.mmio_reads += 1,
                }
            }
            Step::StartLogging { slot } => {
                vcpu.flush_pml(mmu);
                seen.early_translations = (hooks.sample)(vcpu);
                let mut w = mmu.write();
                let flags = w
                    .memslots()
                    .get(AS_ID, slot)
                    .map(|s| s.flags | SlotFlags::LOG_DIRTY)
                    .ok_or_else(|| err(&"no slot"))?;
                let flush = w.set_memslot_flags(AS_ID, slot, flags).map_err(|e| err(&e))?;
                drop(w);
                flush.run(m.host());
                if let Some(s) = SCENARIO.slots.iter().find(|s| s.id == slot) {
                    (hooks.corrupt)(vcpu, s.base_gfn.0, s.pages);
                }
            }
            Step::Harvest => {
                vcpu.flush_pml(mmu);
                let mut set = BTreeSet::new();
                consumer.harvest(usize::MAX, |e| {
                    let base = SCENARIO
                        .slots
                        .iter()
                        .find(|s| s.id == e.slot.id())
                        .map_or(u64::MAX, |s| s.base_gfn.0);
                    set.insert(base.wrapping_add(e.offset));
                });
                let mut ring = sink.0.lock().unwrap_or_else(PoisonError::into_inner);
                let (_stats, flush) = mmu.write().reset_dirty_ring(&mut ring.producer);
                drop(ring);
                flush.run(m.host());
                seen.harvests.push(set);
            }
            Step::Age { gpa, pages } => {
                vcpu.flush_pml(mmu);
                seen.young.push(age_step(m.mmu(), gpa.gfn().0, pages, hooks.broken == Some(Broken::Age)));
            }
            Step::Remap { gpa } => {
                let earlier = SCENARIO.steps[..i].iter().filter(|s| matches!(s, Step::Remap { .. })).count();
                remap(m, gpa.gfn().0, hooks.pool, earlier as u64, hooks.broken == Some(Broken::Remap))
                    .map_err(|e| err(&e))?;
            }
            Step::StopLogging { slot } => {
                vcpu.flush_pml(mmu);
                stop_logging_step(mmu, slot, hooks.broken == Some(Broken::Recover)).map_err(|e| err(&e))?;
            }
            Step::Track { gpa } => {
                track_step(mmu, gpa.gfn(), hooks.broken == Some(Broken::Track)).map_err(|e| err(&e))?;
            }
            Step::Untrack { gpa } => {
                untrack_step(mmu, gpa.gfn(), hooks.broken == Some(Broken::Track)).map_err(|e| err(&e))?;
            }
            Step::NxHugePages => {
                seen.translations = (hooks.sample)(vcpu);
                nx_on_step(mmu, hooks.broken == Some(Broken::Nx));
            }
            Step::NxRecover => seen.nx_recovered.push(nx_recover_step(mmu)),
            Step::Snapshot(snap) => seen.snapshot((hooks.sample_gfns)(vcpu, snap.gfns().collect())),
        }
        count_faults(seen, vcpu, taken, step);
        seen.steps_completed = i + 1;
    }
    Ok(())
}

/// Counts the faults `step`'s accesses took (the vCPU's count went from `taken`) in `seen`: MMIO lies
/// outside every slot, and the Bochs hypervisors count only slot faults too. A host step starts a new
/// count for the next snapshot.
fn count_faults(seen: &mut Observed, vcpu: &Vcpu, taken: u64, step: &Step) {
    let faults = vcpu.mmu_state().counters.taken.saturating_sub(taken);
    match *step {
        Step::Read { gpa } | Step::Write { gpa, .. } | Step::WriteRange { gpa, .. } | Step::Exec { gpa } => {
            for _ in 0..faults {
                seen.count_fault(&SCENARIO, gpa.gfn().0, matches!(step, Step::Exec { .. }));
            }
        }
        Step::MmioRead { .. } | Step::MmioWrite { .. } | Step::Snapshot(_) => {}
        _ => seen.host_step(),
    }
}

/// Moves the host page behind `gfn` to frame `index` of the remap pool at host address `pool`, through
/// the host MMU (which brackets the move with the VM's invalidation); `broken`: with a notifier that
/// does nothing first, as a host whose VM missed the notifier.
fn remap(m: &Machine, gfn: u64, pool: u64, index: u64, broken: bool) -> Result<(), String> {
    let host = m.host();
    let target = Pfn((pool >> 12) + index);
    host.add_spare_frames(target, 1);
    if broken {
        host.set_invalidation_hook(Some(Arc::new(|_| 0)));
    }
    // Slots are backed by guest RAM at their gfn's offset (`Machine::ram_slot`).
    let hva = host.guest_ram_base() + gfn * 4096;
    let moved = host.migrate_page(hva).map_err(|e| format!("remap: {e}"))?;
    if moved != target {
        return Err(format!("remap: the host moved gfn {gfn:#x} to {moved:?}, not the pool's {target:?}"));
    }
    Ok(())
}
