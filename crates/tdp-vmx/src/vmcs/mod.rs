//! VMCS field encodings, the VM-execution / exit / entry control bits, and VM-instruction errors.
//!
//! Source: Intel SDM Vol. 3D, appendix "Field Encoding in VMCS" (tables "Encodings for 16-Bit ...",
//! "... 64-Bit ...", "... 32-Bit ..." and "... Natural-Width ... Fields") and Vol. 3C, section
//! "Component Encoding" (edition 325462-080, June 2023). An encoding is: bit 0 access type (high half
//! of a 64-bit field), bits 9:1 index, bits 11:10 type (control, read-only data, guest state, host
//! state), bits 14:13 width (16-bit, 64-bit, 32-bit, natural). `tests` checks every constant's type and
//! width bits against the table it was transcribed from.

mod controls;
mod error;
mod fields;

pub use controls::{EntryControls, ExitControls, PinControls, PrimaryControls, SecondaryControls};
pub use error::VmInstructionError;

use core::fmt;

/// A VMCS field encoding, the operand of VMREAD and VMWRITE.
///
/// ```
/// use tdp_vmx::vmcs::{FieldType, FieldWidth, VmcsField};
/// assert_eq!(VmcsField::PML_ADDRESS.raw(), 0x200e);
/// assert_eq!(VmcsField::GUEST_PML_INDEX.width(), FieldWidth::Bits16);
/// assert_eq!(VmcsField::EXIT_QUALIFICATION.field_type(), FieldType::ReadOnly);
/// assert_eq!(VmcsField::EPT_POINTER.to_string(), "EPT pointer (0x201a)");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[repr(transparent)]
pub struct VmcsField(pub u32);

/// Bits 14:13 of an encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FieldWidth {
    /// 16-bit field.
    Bits16,
    /// 64-bit field (its high half has access type 1).
    Bits64,
    /// 32-bit field.
    Bits32,
    /// Natural width: 64 bits on a 64-bit processor.
    Natural,
}

/// Bits 11:10 of an encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FieldType {
    /// VM-execution, exit and entry control fields.
    Control,
    /// VM-exit information fields (read-only unless the CPU allows writing them).
    ReadOnly,
    /// Guest-state area.
    Guest,
    /// Host-state area.
    Host,
}

impl VmcsField {
    /// The raw encoding.
    #[must_use]
    #[inline]
    pub const fn raw(self) -> u32 {
        self.0
    }
    /// The width bits.
    #[must_use]
    pub const fn width(self) -> FieldWidth {
        match (self.0 >> 13) & 3 {
            0 => FieldWidth::Bits16,
            1 => FieldWidth::Bits64,
            2 => FieldWidth::Bits32,
            _ => FieldWidth::Natural,
        }
    }
    /// The type bits.
    #[must_use]
    pub const fn field_type(self) -> FieldType {
        match (self.0 >> 10) & 3 {
            0 => FieldType::Control,
            1 => FieldType::ReadOnly,
            2 => FieldType::Guest,
            _ => FieldType::Host,
        }
    }
    /// Whether this encodes the high 32 bits of a 64-bit field (access type 1).
    #[must_use]
    pub const fn is_high_half(self) -> bool {
        self.0 & 1 != 0
    }
    /// The SDM's name of the field, if it is one this crate names.
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        fields::ALL.iter().find(|(f, _)| *f == self).map(|(_, n)| *n)
    }
}

impl fmt::Display for VmcsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#x})", self.0),
            None => write!(f, "VMCS field {:#x}", self.0),
        }
    }
}

#[cfg(test)]
mod tests;
