//! [`FakeVmx`]: the instruction layer in software, for host-side tests and runnable doc examples.
//!
//! A VMCS is a map from field encoding to value; MSRs are a table of recorded values ([`bochs`]);
//! invalidations are logged as [`Op`]s and checked the way the CPU checks them (type supported per the
//! recorded IA32_VMX_EPT_VPID_CAP, reserved descriptor bits zero, VPID not 0), failing with
//! VM-instruction error 28 as hardware does. Reads of MSRs the table lacks are recorded, because on
//! hardware they would raise #GP: tests assert there are none.

pub mod bochs;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::caps::EptVpidCap;
use crate::instr::{VmFail, VmxError, VmxInstructions, VmxOp};
use crate::inv::{InveptDescriptor, InveptKind, InvvpidDescriptor, InvvpidKind};
use crate::msr::IA32_VMX_EPT_VPID_CAP;
use crate::vmcs::{FieldType, VmInstructionError, VmcsField};

/// An invalidation the fake executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// INVEPT.
    Invept {
        /// The type.
        kind: InveptKind,
        /// The descriptor's EPTP.
        eptp: u64,
    },
    /// INVVPID.
    Invvpid {
        /// The type.
        kind: InvvpidKind,
        /// The descriptor's VPID.
        vpid: u16,
        /// The descriptor's linear address.
        linear_address: u64,
    },
}

#[derive(Debug, Default)]
struct State {
    vmcs: BTreeMap<u32, u64>,
    ops: Vec<Op>,
    absent_msr_reads: Vec<u32>,
    fail_next_invept: Option<VmFail>,
}

/// The instruction layer over a map VMCS and recorded MSRs.
///
/// ```
/// use tdp_vmx::fake::{bochs, FakeVmx};
/// use tdp_vmx::instr::{VmFail, VmxInstructions};
/// use tdp_vmx::vmcs::{VmInstructionError, VmcsField};
/// let vmx = FakeVmx::with_msrs(bochs::COREI7_SKYLAKE_X);
/// let err = vmx.vmwrite(VmcsField::EXIT_REASON, 48).unwrap_err();
/// assert_eq!(err.fail, VmFail::Valid(VmInstructionError::WRITE_READ_ONLY));
/// vmx.set_field(VmcsField::EXIT_REASON, 48); // what the CPU does at a VM exit
/// assert_eq!(vmx.vmread(VmcsField::EXIT_REASON)?, 48);
/// # Ok::<(), tdp_vmx::instr::VmxError>(())
/// ```
#[derive(Debug, Default)]
pub struct FakeVmx {
    msrs: BTreeMap<u32, u64>,
    state: spin::Mutex<State>,
}

impl FakeVmx {
    /// A fake with no MSRs and an empty VMCS.
    #[must_use]
    pub fn new() -> FakeVmx {
        FakeVmx::default()
    }

    /// A fake whose RDMSR returns `msrs` (e.g. [`bochs::COREI7_SKYLAKE_X`]).
    #[must_use]
    pub fn with_msrs(msrs: &[(u32, u64)]) -> FakeVmx {
        FakeVmx { msrs: msrs.iter().copied().collect(), state: spin::Mutex::default() }
    }

    /// Sets a VMCS field as the CPU would (read-only fields included): an exit's reason and
    /// qualification, the PML index the CPU decremented.
    pub fn set_field(&self, field: VmcsField, value: u64) {
        self.state.lock().vmcs.insert(field.raw(), value);
    }

    /// The value of a VMCS field, `None` if never written.
    #[must_use]
    pub fn field(&self, field: VmcsField) -> Option<u64> {
        self.state.lock().vmcs.get(&field.raw()).copied()
    }

    /// Sets up the exit fields of an EPT violation (reason 48).
    pub fn set_exit_ept_violation(&self, qualification: u64, gpa: u64, linear: u64) {
        self.set_field(VmcsField::EXIT_REASON, 48);
        self.set_field(VmcsField::EXIT_QUALIFICATION, qualification);
        self.set_field(VmcsField::GUEST_PHYSICAL_ADDRESS, gpa);
        self.set_field(VmcsField::GUEST_LINEAR_ADDRESS, linear);
    }

    /// The invalidations executed so far, oldest first.
    #[must_use]
    pub fn ops(&self) -> Vec<Op> {
        self.state.lock().ops.clone()
    }

    /// Takes the invalidation log, leaving it empty.
    pub fn take_ops(&self) -> Vec<Op> {
        core::mem::take(&mut self.state.lock().ops)
    }

    /// MSRs read that the table lacks (on hardware each would have raised #GP).
    #[must_use]
    pub fn absent_msr_reads(&self) -> Vec<u32> {
        self.state.lock().absent_msr_reads.clone()
    }

    /// Makes the next INVEPT fail with `fail` (to test error paths).
    pub fn fail_next_invept(&self, fail: VmFail) {
        self.state.lock().fail_next_invept = Some(fail);
    }

    fn ept_cap(&self) -> Option<EptVpidCap> {
        self.msrs.get(&IA32_VMX_EPT_VPID_CAP).map(|&raw| EptVpidCap::from_bits_retain(raw))
    }
}

const fn valid_fail(op: VmxOp, number: VmInstructionError) -> VmxError {
    VmxError { op, fail: VmFail::Valid(number) }
}

impl VmxInstructions for FakeVmx {
    fn rdmsr(&self, msr: u32) -> u64 {
        match self.msrs.get(&msr) {
            Some(&value) => value,
            None => {
                self.state.lock().absent_msr_reads.push(msr);
                0
            }
        }
    }

    fn vmread(&self, field: VmcsField) -> Result<u64, VmxError> {
        if field.name().is_none() {
            return Err(valid_fail(VmxOp::Vmread { field }, VmInstructionError::UNSUPPORTED_COMPONENT));
        }
        // A field never written reads as 0, as after VMCLEAR of a zeroed region in Bochs.
        Ok(self.field(field).unwrap_or(0))
    }

    fn vmwrite(&self, field: VmcsField, value: u64) -> Result<(), VmxError> {
        let op = VmxOp::Vmwrite { field, value };
        if field.name().is_none() {
            return Err(valid_fail(op, VmInstructionError::UNSUPPORTED_COMPONENT));
        }
        if field.field_type() == FieldType::ReadOnly {
            return Err(valid_fail(op, VmInstructionError::WRITE_READ_ONLY));
        }
        self.set_field(field, value);
        Ok(())
    }

    fn invept(&self, kind: InveptKind, desc: &InveptDescriptor) -> Result<(), VmxError> {
        let op = VmxOp::Invept { kind, eptp: desc.eptp };
        let mut state = self.state.lock();
        if let Some(fail) = state.fail_next_invept.take() {
            return Err(VmxError { op, fail });
        }
        let needed = match kind {
            InveptKind::SingleContext => EptVpidCap::INVEPT | EptVpidCap::INVEPT_SINGLE_CONTEXT,
            InveptKind::AllContext => EptVpidCap::INVEPT | EptVpidCap::INVEPT_ALL_CONTEXT,
        };
        let supported = self.ept_cap().is_none_or(|cap| cap.contains(needed));
        let bad_eptp = kind == InveptKind::SingleContext && crate::eptp::Eptp::from_raw(desc.eptp).is_err();
        if !supported || desc.reserved != 0 || bad_eptp {
            return Err(valid_fail(op, VmInstructionError::INVALID_INVEPT_INVVPID_OPERAND));
        }
        state.ops.push(Op::Invept { kind, eptp: desc.eptp });
        Ok(())
    }

    fn invvpid(&self, kind: InvvpidKind, desc: &InvvpidDescriptor) -> Result<(), VmxError> {
        let vpid = desc.vpid as u16;
        let op = VmxOp::Invvpid { kind, vpid };
        let needed = match kind {
            InvvpidKind::IndividualAddress => EptVpidCap::INVVPID_INDIVIDUAL_ADDRESS,
            InvvpidKind::SingleContext => EptVpidCap::INVVPID_SINGLE_CONTEXT,
            InvvpidKind::AllContext => EptVpidCap::INVVPID_ALL_CONTEXT,
            InvvpidKind::SingleContextRetainingGlobals => {
                EptVpidCap::INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS
            }
        };
        let supported = self.ept_cap().is_none_or(|cap| cap.contains(EptVpidCap::INVVPID | needed));
        let vpid_zero = vpid == 0 && kind != InvvpidKind::AllContext;
        if !supported || desc.vpid >> 16 != 0 || vpid_zero {
            return Err(valid_fail(op, VmInstructionError::INVALID_INVEPT_INVVPID_OPERAND));
        }
        self.state.lock().ops.push(Op::Invvpid { kind, vpid, linear_address: desc.linear_address });
        Ok(())
    }
}
