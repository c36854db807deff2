//! Checks of the field table: encodings are well formed, unique, and the fields the brief names have the
//! SDM's values, widths and types.

use super::*;
use alloc::string::ToString;

#[test]
fn every_named_field_is_a_well_formed_full_access_encoding() {
    for (field, name) in fields::ALL {
        // Bits 31:15 and 12 are reserved (0); bit 0 is 0 for the full field.
        assert_eq!(field.raw() & !0x6fff, 0, "{name}: reserved bits set");
        assert!(!field.is_high_half(), "{name}: the table names full fields only");
        assert!(!name.is_empty());
    }
    for (i, (a, na)) in fields::ALL.iter().enumerate() {
        for (b, nb) in &fields::ALL[i + 1..] {
            assert_ne!(a, b, "{na} and {nb} share an encoding");
            assert_ne!(na, nb);
        }
    }
}

#[test]
fn the_fields_the_backend_uses_decode_per_the_sdm_appendix() {
    let cases = [
        (VmcsField::VPID, 0x0000, FieldWidth::Bits16, FieldType::Control),
        (VmcsField::GUEST_PML_INDEX, 0x0812, FieldWidth::Bits16, FieldType::Guest),
        (VmcsField::HOST_TR_SELECTOR, 0x0c0c, FieldWidth::Bits16, FieldType::Host),
        (VmcsField::PML_ADDRESS, 0x200e, FieldWidth::Bits64, FieldType::Control),
        (VmcsField::EPT_POINTER, 0x201a, FieldWidth::Bits64, FieldType::Control),
        (VmcsField::GUEST_PHYSICAL_ADDRESS, 0x2400, FieldWidth::Bits64, FieldType::ReadOnly),
        (VmcsField::VMCS_LINK_POINTER, 0x2800, FieldWidth::Bits64, FieldType::Guest),
        (VmcsField::HOST_IA32_EFER, 0x2c02, FieldWidth::Bits64, FieldType::Host),
        (VmcsField::SECONDARY_VM_EXEC_CONTROL, 0x401e, FieldWidth::Bits32, FieldType::Control),
        (VmcsField::VM_INSTRUCTION_ERROR, 0x4400, FieldWidth::Bits32, FieldType::ReadOnly),
        (VmcsField::EXIT_REASON, 0x4402, FieldWidth::Bits32, FieldType::ReadOnly),
        (VmcsField::GUEST_ACTIVITY_STATE, 0x4826, FieldWidth::Bits32, FieldType::Guest),
        (VmcsField::EXIT_QUALIFICATION, 0x6400, FieldWidth::Natural, FieldType::ReadOnly),
        (VmcsField::GUEST_LINEAR_ADDRESS, 0x640a, FieldWidth::Natural, FieldType::ReadOnly),
        (VmcsField::GUEST_RIP, 0x681e, FieldWidth::Natural, FieldType::Guest),
        (VmcsField::HOST_RIP, 0x6c16, FieldWidth::Natural, FieldType::Host),
    ];
    for (field, raw, width, ty) in cases {
        assert_eq!((field.raw(), field.width(), field.field_type()), (raw, width, ty), "{field}");
    }
}

#[test]
fn unknown_fields_and_errors_display_without_a_name() {
    assert_eq!(VmcsField(0x7777).to_string(), "VMCS field 0x7777");
    assert_eq!(VmInstructionError(14).description(), None);
    assert_eq!(VmInstructionError(28).description(), Some("invalid operand to INVEPT/INVVPID"));
}
