//! The run loop: enter the guest, then hand the exit to `tdp_vmx::vcpu::handle_exit`, which drains the
//! PML log into the ring and passes EPT violations and misconfigurations to tdp-core's fault handler;
//! then act on what it says: resume, reload the root, emulate MMIO or a write to a tracked page (the
//! faulting `mov`), or handle the scenario's hypercalls (start logging, harvest, age, remap, the host
//! steps of `host_steps::run_step`, done, a failed read). Anything else is the guest's
//! error, reported in the result. The loop stops after `MAX_EXITS` exits (the scenario takes about
//! 1,150 without PML).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use tdp_core::addr::SlotId;
use tdp_core::dirty_ring::DirtyRingConsumer;
use tdp_core::fault::AccessKind;
use tdp_core::mmu::{EmulateReason, Mmu, RootRef, VcpuMmu};
use tdp_metal::scenario::{AS_ID, Broken, Observed, Paging, Scenario, Translation};
use tdp_vmx::caps::EptFeatures;
use tdp_vmx::eptp::Eptp;
use tdp_vmx::exit::VmExit;
use tdp_vmx::instr::{VmxError, VmxInstructions};
use tdp_vmx::pml::Pml;
use tdp_vmx::raw::X86Vmx;
use tdp_vmx::ring_sink::RingSink;
use tdp_vmx::vcpu::{ExitAction, handle_exit, install_root};
use tdp_vmx::vmcs::{VmInstructionError, VmcsField as F};

use crate::host::{HvHost, read_entry};
use crate::vmx::{self, GuestRegs};
use crate::{BROKEN, guest, host_steps};

/// Exits after which the run is declared stuck (the scenario needs well under a hundred).
const MAX_EXITS: u64 = 10_000;

/// VM-exit reasons the loop handles besides EPT and PML ones (Intel SDM Vol. 3D, appendix "VMX Basic
/// Exit Reasons").
const EXIT_EXCEPTION: u16 = 0;
const EXIT_TRIPLE_FAULT: u16 = 2;
const EXIT_HLT: u16 = 12;
const EXIT_VMCALL: u16 = 18;

/// Everything the loop works on.
pub struct Hv<'a, 'v> {
    /// The instructions.
    pub vmx: &'v X86Vmx,
    /// What the CPU offers.
    pub features: EptFeatures,
    /// The scenario.
    pub scenario: &'a Scenario,
    /// The MMU.
    pub mmu: &'a Mmu<HvHost<'v>>,
    /// The vCPU's MMU state: its root, page cache and fault counters.
    pub vcpu: VcpuMmu,
    /// The dirty ring's producer, as the MMU's sink.
    pub sink: RingSink<'static>,
    /// Its consumer.
    pub consumer: DirtyRingConsumer<'static>,
    /// The page-modification log, when the CPU logs.
    pub pml: Option<Pml<'static>>,
    /// Each slot's id, host base address and pages, to decode translations.
    pub bases: Vec<(u16, u64, u64)>,
    /// What the run saw.
    pub seen: Observed,
}

/// Why the loop stopped.
pub(crate) enum Stop {
    /// The guest reached its end.
    Done,
    /// Something went wrong: the message goes into the result.
    Error(String),
}

impl From<VmxError> for Stop {
    fn from(e: VmxError) -> Stop {
        Stop::Error(format!("{e}"))
    }
}

impl Hv<'_, '_> {
    /// Runs the guest to its end or to the first error, recording what it saw.
    pub fn run(&mut self) {
        let mut regs = GuestRegs::default();
        let mut launched = false;
        for _ in 0..MAX_EXITS {
            if vmx::enter(&mut regs, launched).is_err() {
                let error = match self.vmx.vmread(F::VM_INSTRUCTION_ERROR) {
                    Ok(n) => format!("{}", VmInstructionError::from_raw(n as u32)),
                    Err(e) => format!("and reading the VM-instruction error failed: {e}"),
                };
                self.seen.guest_error = Some(format!("VM entry failed: {error}"));
                return;
            }
            launched = true;
            let stop = self.handle_exit(&mut regs).err().or_else(|| {
                self.mmu.host().tlb.take_error().map(|e| Stop::Error(format!("INVEPT for a core flush: {e}")))
            });
            match stop {
                None => {}
                Some(Stop::Done) => return,
                Some(Stop::Error(e)) => {
                    self.seen.guest_error = Some(e);
                    return;
                }
            }
        }
        self.seen.guest_error = Some(format!("no end after {MAX_EXITS} exits"));
    }

    fn handle_exit(&mut self, regs: &mut GuestRegs) -> Result<(), Stop> {
        let report = handle_exit(self.vmx, self.mmu, &mut self.vcpu, self.pml.as_mut(), &mut self.sink)
            .map_err(|e| Stop::Error(format!("exit: {e}")))?;
        if self.sink.must_exit() {
            // The ring reached its soft limit: a VMM would harvest now, but this scenario harvests only
            // where its steps say, so the ring is too small for it. Stop rather than risk a full ring.
            return Err(Stop::Error(format!(
                "dirty ring soft-full between harvests: {:?}",
                self.sink.stats()
            )));
        }
        match report.exit {
            VmExit::EptViolation(v) => {
                self.seen.ept_violations += 1;
                // A fault that only found the root invalid is no fault of the guest's accesses.
                if report.action != ExitAction::ReloadRoot {
                    let exec = v.fault.access == AccessKind::Exec;
                    self.seen.count_fault(self.scenario, v.fault.gpa.gfn().0, exec);
                }
            }
            VmExit::EptMisconfig(_) => self.seen.ept_misconfigs += 1,
            VmExit::PmlFull => self.seen.pml_full_exits += 1,
            _ => {}
        }
        match report.action {
            ExitAction::Resume => Ok(()),
            ExitAction::ReloadRoot => self.reload_root(),
            ExitAction::Emulate { gpa, reason: EmulateReason::Mmio, .. } => self.emulate_mmio(gpa.0, regs),
            ExitAction::Emulate { gpa, reason: EmulateReason::WriteTracked, .. } => {
                let rip = self.vmx.vmread(F::GUEST_RIP)?;
                let code = guest::CODE..guest::CODE_END;
                let len = host_steps::emulate_tracked_write(code, rip, gpa.0, regs.rax, &mut self.seen)
                    .map_err(Stop::Error)?;
                self.vmx.vmwrite(F::GUEST_RIP, rip + len)?;
                Ok(())
            }
            ExitAction::Emulate { gpa, reason, .. } => {
                Err(Stop::Error(format!("cannot emulate the access at {:#x} ({reason:?})", gpa.0)))
            }
            ExitAction::EntryFailed { reason, qualification } => Err(Stop::Error(format!(
                "VM entry failed with exit reason {:#x} (qualification {qualification:#x})",
                reason.0
            ))),
            ExitAction::Unhandled(reason) => {
                let rip = self.vmx.vmread(F::GUEST_RIP)?;
                match reason.basic() {
                    EXIT_VMCALL => self.hypercall(regs),
                    EXIT_EXCEPTION => {
                        let info = self.vmx.vmread(F::VM_EXIT_INTR_INFO)?;
                        Err(Stop::Error(format!("guest exception {} at rip {rip:#x}", info & 0xff)))
                    }
                    EXIT_TRIPLE_FAULT | EXIT_HLT => {
                        Err(Stop::Error(format!("guest stopped (exit reason {}) at rip {rip:#x}", reason.0)))
                    }
                    other => Err(Stop::Error(format!("unexpected exit reason {other} at rip {rip:#x}"))),
                }
            }
            other => Err(Stop::Error(format!("unexpected exit action {other:?}"))),
        }
    }

    /// The core invalidated the root: take a new one, retire the old EPTP and install the new one.
    fn reload_root(&mut self) -> Result<(), Stop> {
        let old = self.vcpu.root().map(RootRef::pfn);
        // Puts the old root (the vCPU no longer uses it) and takes a new one.
        self.mmu
            .load_root(&mut self.vcpu, AS_ID)
            .map_err(|e| Stop::Error(format!("reloading the root: {e}")))?;
        let tlb = &self.mmu.host().tlb;
        if let Some(Ok(eptp)) = old.map(|pfn| Eptp::new(&self.features, self.mmu.config(), pfn)) {
            tlb.retire_eptp(eptp);
        }
        let root = self.vcpu.root().ok_or_else(|| Stop::Error("no root after a reload".into()))?;
        install_root(self.vmx, tlb, &self.features, self.mmu.config(), root)
            .map_err(|e| Stop::Error(format!("installing the new root: {e}")))?;
        Ok(())
    }

    /// Emulates the two instructions the guest uses for MMIO (`host_steps::emulate_mmio`).
    fn emulate_mmio(&mut self, gpa: u64, regs: &mut GuestRegs) -> Result<(), Stop> {
        let rip = self.vmx.vmread(F::GUEST_RIP)?;
        let code = guest::CODE..guest::CODE_END;
        let (rax, len) =
            host_steps::emulate_mmio(code, rip, gpa, regs.rax, &mut self.seen).map_err(Stop::Error)?;
        regs.rax = rax;
        self.vmx.vmwrite(F::GUEST_RIP, rip + len)?;
        Ok(())
    }

    fn hypercall(&mut self, regs: &mut GuestRegs) -> Result<(), Stop> {
        let rip = self.vmx.vmread(F::GUEST_RIP)?;
        let len = self.vmx.vmread(F::VM_EXIT_INSTRUCTION_LEN)?;
        match regs.rbx {
            guest::HC_DONE => {
                self.seen.steps_completed = self.scenario.steps.len();
                return Err(Stop::Done);
            }
            guest::HC_FAIL => {
                let step = regs.rdi as usize;
                self.seen.steps_completed = step;
                let want = self.scenario.expected_read(step);
                return Err(Stop::Error(format!("step {step}: read {:#x}, expected {want:x?}", regs.rax)));
            }
            guest::HC_START_LOGGING => {
                let slot = u16::try_from(regs.rdi)
                    .map_err(|_| Stop::Error(format!("start logging: slot {:#x} out of range", regs.rdi)))?;
                self.start_logging(SlotId(slot))?;
            }
            guest::HC_HARVEST => self.harvest(regs.rdi)?,
            guest::HC_AGE => {
                let young = host_steps::age(self.mmu, self.scenario, regs.rdi, BROKEN == Some(Broken::Age))
                    .map_err(Stop::Error)?;
                self.seen.young.push(young);
            }
            guest::HC_REMAP => {
                let translate = &self.mmu.host().translate;
                let broken = BROKEN == Some(Broken::Remap);
                host_steps::remap(self.mmu, translate, self.scenario, regs.rdi, broken)
                    .map_err(Stop::Error)?;
            }
            guest::HC_STEP => {
                let host = self.mmu.host();
                let (root, bases) = (self.vcpu.root().map(|r| r.pfn().0), &self.bases);
                let sample = |gfns: Vec<u64>| match root {
                    Some(root) => {
                        host_steps::sample_gfns(gfns, Paging::Ept, |t, i| read_entry(host, t, i), root, bases)
                    }
                    None => Vec::new(),
                };
                let after =
                    host_steps::run_step(self.mmu, self.scenario, regs.rdi, BROKEN, &mut self.seen, sample)
                        .map_err(Stop::Error)?;
                if after == host_steps::After::ReloadRoot
                    && !self.vcpu.root().is_some_and(|r| self.mmu.root_is_valid(r))
                {
                    self.reload_root()?;
                }
            }
            other => return Err(Stop::Error(format!("unknown hypercall {other} at rip {rip:#x}"))),
        }
        if regs.rbx != guest::HC_STEP {
            // Host steps start a new fault count for the next snapshot (`run_step` does it for its own).
            self.seen.host_step();
        }
        self.vmx.vmwrite(F::GUEST_RIP, rip + len)?;
        Ok(())
    }

    /// The translations of the scenario's sample gfns in the current tables.
    pub fn sample(&self) -> Vec<Translation> {
        let host = self.mmu.host();
        let Some(root) = self.vcpu.root().map(|r| r.pfn().0) else {
            return Vec::new();
        };
        host_steps::sample(self.scenario, Paging::Ept, |t, i| read_entry(host, t, i), root, &self.bases)
    }

    fn start_logging(&mut self, slot: SlotId) -> Result<(), Stop> {
        self.seen.early_translations = self.sample();
        host_steps::start_logging(self.mmu, slot).map_err(Stop::Error)?;
        #[cfg(feature = "broken-ept")]
        crate::broken::unprotect_slot(
            self.vmx,
            &self.features,
            self.mmu,
            self.vcpu.root().ok_or_else(|| Stop::Error("no root".into()))?,
            slot,
        )?;
        Ok(())
    }

    /// Harvests the ring (the PML log was drained at this exit), then resets it, which re-protects
    /// what was harvested, and runs the flush the reset owes.
    fn harvest(&mut self, n: u64) -> Result<(), Stop> {
        if n != self.seen.harvests.len() as u64 {
            return Err(Stop::Error(format!("harvest {n} out of order")));
        }
        let set = host_steps::harvest(self.mmu, self.scenario, &mut self.sink, &mut self.consumer);
        self.seen.harvests.push(set);
        self.seen.ring_lost = self.sink.stats().lost;
        Ok(())
    }
}

/// Lets the broken variant's errors flow through the loop.
#[cfg(feature = "broken-ept")]
impl From<String> for Stop {
    fn from(e: String) -> Stop {
        Stop::Error(e)
    }
}
