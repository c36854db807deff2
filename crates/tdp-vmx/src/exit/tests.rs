//! Exit decoding: the recipe's 0x182 qualification, misconfigurations, PML-full, entry failures, VMREAD
//! failures, and I5 over every qualification pattern.

use tdp_core::addr::{AsId, Gpa};
use tdp_core::fault::{AccessKind, DecodeError, Fault, FaultKind};

use super::*;
use crate::fake::FakeVmx;

#[test]
fn bochs_write_to_a_missing_entry_decodes_as_a_non_present_write() {
    let vmx = FakeVmx::new();
    vmx.set_exit_ept_violation(0x182, 0x0030_2010, 0x0000_7fff_0000_2010);
    let VmExit::EptViolation(v) = read_exit(&vmx, AsId(0)).unwrap() else {
        panic!("reason 48 must decode as an EPT violation");
    };
    assert_eq!(
        v.fault,
        Fault {
            as_id: AsId(0),
            gpa: Gpa(0x0030_2010),
            access: AccessKind::Write,
            kind: FaultKind::Violation { present: false }
        }
    );
    assert_eq!(v.guest_linear, Some(0x0000_7fff_0000_2010));
    assert!(v.translated_access && !v.nmi_unblocking);
    assert_eq!(v.qualification, 0x182);
}

#[test]
fn the_linear_address_is_ignored_when_the_qualification_says_it_is_invalid() {
    let vmx = FakeVmx::new();
    // A read of a present, not-readable... entry with bit 7 clear (e.g. a walk of the guest's tables
    // with no linear address), plus NMI unblocking.
    vmx.set_exit_ept_violation(0x1 | 0x8 | EPT_QUAL_NMI_UNBLOCKING, 0x9000, 0xdead_beef);
    let VmExit::EptViolation(v) = read_exit(&vmx, AsId(1)).unwrap() else { panic!("not an EPT violation") };
    assert_eq!((v.fault.as_id, v.fault.access), (AsId(1), AccessKind::Read));
    assert_eq!(v.fault.kind, FaultKind::Violation { present: true });
    assert_eq!((v.guest_linear, v.translated_access, v.nmi_unblocking), (None, false, true));
}

#[test]
fn misconfig_pml_full_entry_failure_and_others() {
    let vmx = FakeVmx::new();
    vmx.set_field(VmcsField::EXIT_REASON, u64::from(reason::EPT_MISCONFIG));
    vmx.set_field(VmcsField::GUEST_PHYSICAL_ADDRESS, 0xfee0_0000);
    assert_eq!(
        read_exit(&vmx, AsId(0)),
        Ok(VmExit::EptMisconfig(Fault::from_ept_misconfig(AsId(0), Gpa(0xfee0_0000))))
    );
    vmx.set_field(VmcsField::EXIT_REASON, u64::from(reason::PML_FULL));
    assert_eq!(read_exit(&vmx, AsId(0)), Ok(VmExit::PmlFull));
    vmx.set_field(VmcsField::EXIT_REASON, 0x8000_0000 | u64::from(reason::INVALID_GUEST_STATE));
    vmx.set_field(VmcsField::EXIT_QUALIFICATION, 3);
    assert_eq!(
        read_exit(&vmx, AsId(0)),
        Ok(VmExit::EntryFailure { reason: ExitReason(0x8000_0021), qualification: 3 })
    );
    vmx.set_field(VmcsField::EXIT_REASON, u64::from(reason::HLT));
    assert_eq!(read_exit(&vmx, AsId(0)), Ok(VmExit::Other(ExitReason(12))));
}

#[test]
fn a_qualification_without_an_access_is_an_error_not_a_fault() {
    let vmx = FakeVmx::new();
    vmx.set_exit_ept_violation(0x180, 0x1000, 0);
    assert_eq!(
        read_exit(&vmx, AsId(0)),
        Err(ExitError::Qualification { source: DecodeError::NoAccess { qualification: 0x180 } })
    );
}

#[test]
fn i5_every_qualification_pattern_decodes_without_panicking() {
    for bits in 0..(1u64 << 13) {
        match EptViolation::decode(AsId(0), bits, Gpa(0x1000), Some(0x2000)) {
            Ok(v) => assert_eq!(v.guest_linear.is_some(), bits & 0x80 != 0),
            Err(ExitError::Qualification { .. }) => assert_eq!(bits & 0x7, 0),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
}
