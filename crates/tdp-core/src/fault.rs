//! The input of the page-fault handler, decoded from what hardware reports: an EPT-violation exit
//! qualification, an EPT misconfiguration, or an AMD nested-page-fault error code.
//!
//! Keeps: I5 for exit data: every bit pattern decodes to a fault or a [`DecodeError`], never a panic.

use crate::addr::{AsId, Gpa};

/// The kind of guest access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read (or a guest page-table walk read).
    Read,
    /// A data write (or a guest page-table A/D update).
    Write,
    /// An instruction fetch.
    Exec,
}

/// Why the hardware exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The translation was missing or did not allow the access (EPT violation; #NPF without RSVD).
    /// `present` says the leaf existed but lacked the permission.
    Violation {
        /// The faulting GPA had a translation that denied the access.
        present: bool,
    },
    /// The walk met an entry hardware rejects as malformed (EPT misconfiguration; #NPF with RSVD). The
    /// MMU installs such entries on purpose for MMIO gfns.
    Misconfig,
}

/// A fault as the MMU's handler takes it.
///
/// ```
/// use tdp_core::addr::{AsId, Gpa};
/// use tdp_core::fault::{AccessKind, Fault, FaultKind};
/// // Bochs reports 0x182 for a write to a GPA with no EPT entry (see recipes/bochs-vmx.md).
/// let f = Fault::from_ept_violation(AsId(0), Gpa(0x5000), 0x182).unwrap();
/// assert_eq!((f.access, f.kind), (AccessKind::Write, FaultKind::Violation { present: false }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fault {
    /// The address space (0 normally, 1 in SMM).
    pub as_id: AsId,
    /// The faulting guest-physical address.
    pub gpa: Gpa,
    /// What the guest tried to do.
    pub access: AccessKind,
    /// Why hardware exited.
    pub kind: FaultKind,
}

/// Exit data that is not a fault the MMU can handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The qualification names no access (none of read, write, fetch).
    #[error("EPT-violation qualification {qualification:#x} names no read, write or fetch")]
    NoAccess {
        /// The raw qualification.
        qualification: u64,
    },
    /// The NPF error code is not for a nested walk (neither final-translation nor guest-walk bit).
    #[error("nested-page-fault error code {error_code:#x} is not for a nested walk")]
    NotNested {
        /// The raw error code.
        error_code: u64,
    },
}

/// EPT-violation exit qualification bits. Source: Intel SDM Vol. 3C, section "Exit Qualification for EPT
/// Violations" (edition 325462-080).
pub mod ept_qual {
    /// Bit 0: the access was a data read.
    pub const READ: u64 = 1 << 0;
    /// Bit 1: the access was a data write.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2: the access was an instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// Bit 3: the GPA was readable (AND of the R bits of the entries used).
    pub const READABLE: u64 = 1 << 3;
    /// Bit 4: the GPA was writable.
    pub const WRITABLE: u64 = 1 << 4;
    /// Bit 5: the GPA was executable.
    pub const EXECUTABLE: u64 = 1 << 5;
    /// Bit 7: the guest-linear-address field is valid.
    pub const LINEAR_VALID: u64 = 1 << 7;
    /// Bit 8 (with bit 7): the access was to the translated GPA, not to a guest paging structure.
    pub const TRANSLATED: u64 = 1 << 8;
}

/// AMD nested-page-fault error-code bits (EXITINFO1). Source: AMD APM Vol. 2, section "Nested versus
/// Guest Page Faults, Fault Ordering" and "Page-Fault Error Code" (publication 24593, revision 3.41).
pub mod npf_code {
    /// Bit 0 (P): the translation was present; the fault is a protection violation.
    pub const PRESENT: u64 = 1 << 0;
    /// Bit 1 (R/W): the access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2 (U/S): a user access; nested walks always set it.
    pub const USER: u64 = 1 << 2;
    /// Bit 3 (RSV): a reserved bit was set in a nested entry.
    pub const RSVD: u64 = 1 << 3;
    /// Bit 4 (I/D): the access was an instruction fetch.
    pub const FETCH: u64 = 1 << 4;
    /// Bit 32: the fault happened on the final guest-physical translation.
    pub const FINAL_TRANSLATION: u64 = 1 << 32;
    /// Bit 33: the fault happened while translating a guest page-table access.
    pub const GUEST_WALK: u64 = 1 << 33;
}

impl Fault {
    /// Decodes an EPT-violation exit (basic exit reason 48).
    ///
    /// # Errors
    /// [`DecodeError::NoAccess`] when the qualification names no access.
    pub fn from_ept_violation(as_id: AsId, gpa: Gpa, qualification: u64) -> Result<Fault, DecodeError> {
        // A write wins over a read (a locked read-modify-write reports both), a fetch is alone.
        let access = if qualification & ept_qual::WRITE != 0 {
            AccessKind::Write
        } else if qualification & ept_qual::FETCH != 0 {
            AccessKind::Exec
        } else if qualification & ept_qual::READ != 0 {
            AccessKind::Read
        } else {
            return Err(DecodeError::NoAccess { qualification });
        };
        let present = qualification & (ept_qual::READABLE | ept_qual::WRITABLE | ept_qual::EXECUTABLE) != 0;
        Ok(Fault { as_id, gpa, access, kind: FaultKind::Violation { present } })
    }

    /// Decodes an EPT-misconfiguration exit (basic exit reason 49), which carries only the GPA. The
    /// access kind is unknown and reported as a read; the MMIO path does not use it.
    #[must_use]
    pub const fn from_ept_misconfig(as_id: AsId, gpa: Gpa) -> Fault {
        Fault { as_id, gpa, access: AccessKind::Read, kind: FaultKind::Misconfig }
    }

    /// Decodes a nested page fault (#VMEXIT_NPF): EXITINFO1 is `error_code`, EXITINFO2 the GPA.
    ///
    /// # Errors
    /// [`DecodeError::NotNested`] when neither bit 32 nor bit 33 is set.
    pub fn from_npf(as_id: AsId, gpa: Gpa, error_code: u64) -> Result<Fault, DecodeError> {
        if error_code & (npf_code::FINAL_TRANSLATION | npf_code::GUEST_WALK) == 0 {
            return Err(DecodeError::NotNested { error_code });
        }
        let access = if error_code & npf_code::WRITE != 0 {
            AccessKind::Write
        } else if error_code & npf_code::FETCH != 0 {
            AccessKind::Exec
        } else {
            AccessKind::Read
        };
        let kind = if error_code & npf_code::RSVD != 0 {
            FaultKind::Misconfig
        } else {
            FaultKind::Violation { present: error_code & npf_code::PRESENT != 0 }
        };
        Ok(Fault { as_id, gpa, access, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_qualifications_decode_per_the_sdm() {
        let gpa = Gpa(0x1234_5000);
        let read = Fault::from_ept_violation(AsId(0), gpa, ept_qual::READ | ept_qual::LINEAR_VALID).unwrap();
        assert_eq!((read.access, read.kind), (AccessKind::Read, FaultKind::Violation { present: false }));
        let wp = Fault::from_ept_violation(AsId(0), gpa, ept_qual::WRITE | ept_qual::READABLE).unwrap();
        assert_eq!((wp.access, wp.kind), (AccessKind::Write, FaultKind::Violation { present: true }));
        let fetch = Fault::from_ept_violation(AsId(1), gpa, ept_qual::FETCH).unwrap();
        assert_eq!((fetch.as_id, fetch.access), (AsId(1), AccessKind::Exec));
        assert_eq!(
            Fault::from_ept_violation(AsId(0), gpa, 0x180),
            Err(DecodeError::NoAccess { qualification: 0x180 })
        );
    }

    #[test]
    fn npf_error_codes_decode_per_the_apm() {
        let gpa = Gpa(0x8000);
        let w = Fault::from_npf(AsId(0), gpa, npf_code::FINAL_TRANSLATION | npf_code::USER | npf_code::WRITE)
            .unwrap();
        assert_eq!((w.access, w.kind), (AccessKind::Write, FaultKind::Violation { present: false }));
        let mmio =
            Fault::from_npf(AsId(0), gpa, npf_code::FINAL_TRANSLATION | npf_code::PRESENT | npf_code::RSVD)
                .unwrap();
        assert_eq!(mmio.kind, FaultKind::Misconfig);
        let x = Fault::from_npf(AsId(0), gpa, npf_code::GUEST_WALK | npf_code::FETCH | npf_code::PRESENT)
            .unwrap();
        assert_eq!((x.access, x.kind), (AccessKind::Exec, FaultKind::Violation { present: true }));
        assert_eq!(
            Fault::from_npf(AsId(0), gpa, npf_code::WRITE),
            Err(DecodeError::NotNested { error_code: 2 })
        );
    }

    #[test]
    fn i5_every_qualification_decodes_without_panicking() {
        for bits in 0..(1u64 << 10) {
            let _ = Fault::from_ept_violation(AsId(0), Gpa(0), bits);
            let _ = Fault::from_npf(AsId(0), Gpa(0), bits | (bits << 24));
        }
    }
}
