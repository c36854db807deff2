//! [`FakeSvm`]: the instruction layer in software, for host-side tests and runnable doc examples.
//!
//! CPUID and VM_CR come from a recorded Bochs model ([`bochs`]); EFER and VM_HSAVE_PA are kept as
//! written. VMRUN does what the CPU's consistency checks do for the fields this backend sets (the VMRUN
//! intercept, a non-zero ASID, EFER.SVME on host and guest, a host save area, a TLB_CONTROL value the
//! CPU supports), failing with `VMEXIT_INVALID` as hardware does, logs what it was given ([`Entry`]),
//! and then "exits" with the next exit a test queued ([`FakeSvm::push_exit`]), or with HLT when none
//! is queued. Operations hardware would answer with #GP (setting EFER.SVME without SVM or with
//! VM_CR.SVMDIS, a misaligned host save area, a VMRUN before either) are recorded in
//! [`FakeSvm::faults`]: tests assert there are none.

pub mod bochs;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use crate::asid::TlbControl;
use crate::caps::{EXT_ECX_SVM, LEAF_EXT_FEATURES, LEAF_SVM, SvmFeatureBits};
use crate::exit::code;
use crate::instr::{CpuidResult, GuestRegs, SvmInstructions};
use crate::msr;
use crate::raw::HsavePage;
use crate::vmcb::{InterceptMisc2, Vmcb};
use bochs::BochsModel;

/// An exit the fake VMRUN produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FakeExit {
    /// EXITCODE.
    pub code: u64,
    /// EXITINFO1.
    pub info1: u64,
    /// EXITINFO2.
    pub info2: u64,
    /// nRIP (written only when the model has NRIP save).
    pub next_rip: u64,
}

/// What one VMRUN was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The guest's ASID.
    pub asid: u32,
    /// TLB_CONTROL.
    pub tlb_control: u8,
    /// N_CR3, when NP_ENABLE was set.
    pub n_cr3: Option<u64>,
    /// The guest's RIP.
    pub rip: u64,
}

/// Something hardware would have answered with #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// EFER.SVME set on a CPU without SVM or with VM_CR.SVMDIS.
    EnableWithoutSvm,
    /// VM_HSAVE_PA written with a misaligned address.
    MisalignedHsave(u64),
    /// VMRUN with EFER.SVME clear (#UD) or VM_HSAVE_PA 0 (#GP).
    VmrunNotEnabled,
}

#[derive(Debug, Default)]
struct State {
    efer: u64,
    hsave: u64,
    exits: VecDeque<FakeExit>,
    entries: Vec<Entry>,
    faults: Vec<Fault>,
}

/// The instruction layer over a recorded Bochs model.
///
/// ```
/// use tdp_svm::exit::code;
/// use tdp_svm::fake::{bochs, FakeSvm};
/// use tdp_svm::instr::{GuestRegs, SvmInstructions};
/// use tdp_svm::raw::HsavePage;
/// use tdp_svm::vmcb::{InterceptMisc2, Vmcb};
/// static HSAVE: HsavePage = HsavePage::new();
/// let svm = FakeSvm::new(bochs::RYZEN);
/// svm.set_hsave(&HSAVE);
/// svm.enable_svme();
/// let mut vmcb = Vmcb::new();
/// vmcb.save.efer = tdp_svm::msr::EFER_SVME;
/// svm.vmrun(&mut vmcb, &mut GuestRegs::default());
/// assert_eq!(vmcb.control.exit_code, code::INVALID); // no VMRUN intercept, ASID 0
/// vmcb.control.intercept_misc2 = InterceptMisc2::VMRUN;
/// vmcb.control.guest_asid = 1;
/// svm.push_npf(0x1_0000_0006, 0x3008);
/// svm.vmrun(&mut vmcb, &mut GuestRegs::default());
/// assert_eq!((vmcb.control.exit_code, vmcb.control.exit_info2), (code::NPF, 0x3008));
/// assert!(svm.faults().is_empty());
/// ```
#[derive(Debug)]
pub struct FakeSvm {
    model: BochsModel,
    cpuid: BTreeMap<u32, CpuidResult>,
    state: spin::Mutex<State>,
}

impl FakeSvm {
    /// A fake of `model`, in long mode with SVM not yet enabled.
    #[must_use]
    pub fn new(model: BochsModel) -> FakeSvm {
        let cpuid = model
            .cpuid
            .iter()
            .map(|&(leaf, [eax, ebx, ecx, edx])| (leaf, CpuidResult { eax, ebx, ecx, edx }))
            .collect();
        let state = State { efer: bochs::KERNEL_EFER, ..State::default() };
        FakeSvm { model, cpuid, state: spin::Mutex::new(state) }
    }

    /// The model.
    #[must_use]
    pub fn model(&self) -> BochsModel {
        self.model
    }

    /// Queues an exit for a later VMRUN.
    pub fn push_exit(&self, exit: FakeExit) {
        self.state.lock().exits.push_back(exit);
    }

    /// Queues a nested page fault with `error_code` (EXITINFO1) at `gpa` (EXITINFO2).
    pub fn push_npf(&self, error_code: u64, gpa: u64) {
        self.push_exit(FakeExit { code: code::NPF, info1: error_code, info2: gpa, next_rip: 0 });
    }

    /// What every VMRUN was given, oldest first.
    #[must_use]
    pub fn entries(&self) -> Vec<Entry> {
        self.state.lock().entries.clone()
    }

    /// Takes the VMRUN log, leaving it empty.
    pub fn take_entries(&self) -> Vec<Entry> {
        core::mem::take(&mut self.state.lock().entries)
    }

    /// What hardware would have refused with #GP or #UD.
    #[must_use]
    pub fn faults(&self) -> Vec<Fault> {
        self.state.lock().faults.clone()
    }

    fn features(&self) -> SvmFeatureBits {
        SvmFeatureBits::from_bits_retain(self.cpuid(LEAF_SVM, 0).edx)
    }

    fn has_svm(&self) -> bool {
        self.cpuid(LEAF_EXT_FEATURES, 0).ecx & EXT_ECX_SVM != 0
    }

    /// Whether VMRUN would refuse `vmcb` with `VMEXIT_INVALID` (the checks of APM Vol. 2 section
    /// 15.5.1 this backend's fields can break).
    fn invalid(&self, vmcb: &Vmcb) -> bool {
        let c = &vmcb.control;
        !c.intercept_misc2.contains(InterceptMisc2::VMRUN)
            || c.guest_asid == 0
            || vmcb.save.efer & msr::EFER_SVME == 0
            || TlbControl::from_raw(c.tlb_control).is_none_or(|t| !t.supported(self.features()))
    }
}

impl SvmInstructions for FakeSvm {
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> CpuidResult {
        self.cpuid.get(&leaf).copied().unwrap_or_default()
    }

    fn rdmsr(&self, msr: u32) -> u64 {
        let s = self.state.lock();
        match msr {
            msr::EFER => s.efer,
            msr::VM_CR => self.model.vm_cr,
            msr::VM_HSAVE_PA => s.hsave,
            _ => 0,
        }
    }

    fn enable_svme(&self) {
        let ok = self.has_svm() && self.model.vm_cr & msr::VM_CR_SVMDIS == 0;
        let mut s = self.state.lock();
        if ok {
            s.efer |= msr::EFER_SVME;
        } else {
            s.faults.push(Fault::EnableWithoutSvm);
        }
    }

    fn set_hsave(&self, page: &'static HsavePage) {
        let addr = page.addr();
        let mut s = self.state.lock();
        if addr & 0xfff != 0 {
            s.faults.push(Fault::MisalignedHsave(addr));
        } else {
            s.hsave = addr;
        }
    }

    fn vmrun(&self, vmcb: &mut Vmcb, _regs: &mut GuestRegs) {
        let invalid = self.invalid(vmcb);
        let nrip = self.features().contains(SvmFeatureBits::NRIP_SAVE);
        let mut s = self.state.lock();
        if s.efer & msr::EFER_SVME == 0 || s.hsave == 0 {
            s.faults.push(Fault::VmrunNotEnabled);
            return;
        }
        let n_cr3 = vmcb.nested_paging().then_some(vmcb.control.n_cr3);
        let c = &mut vmcb.control;
        s.entries.push(Entry { asid: c.guest_asid, tlb_control: c.tlb_control, n_cr3, rip: vmcb.save.rip });
        let exit = if invalid {
            FakeExit { code: code::INVALID, info1: 0, info2: 0, next_rip: 0 }
        } else {
            s.exits.pop_front().unwrap_or(FakeExit { code: code::HLT, info1: 0, info2: 0, next_rip: 0 })
        };
        c.exit_code = exit.code;
        c.exit_info1 = exit.info1;
        c.exit_info2 = exit.info2;
        if nrip {
            c.next_rip = exit.next_rip;
        }
    }
}
