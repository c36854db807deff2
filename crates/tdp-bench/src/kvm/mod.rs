//! Benchmarks on real `/dev/kvm` (issue 4): the harvest cost of `tdp-kvm`'s ring and bitmap paths beside
//! raw `kvm-ioctls`, the guest's dirtying throughput under each kind of logging, and live migration with
//! the `tdp` command, ring against bitmap.
//!
//! Every figure comes from a real guest (`tdp-guest`: 64-bit code at CPL3 writing pages) on the host's
//! KVM; without `/dev/kvm` the groups print SKIPPED and add no rows.

pub mod dirtying;
pub mod harvest;
pub mod migrate;

use tdp_guest::{GuestError, GuestSpec, GuestVm};

/// Opens a guest VM, or tells why the KVM groups are skipped (`Ok(None)` when `/dev/kvm` cannot be opened).
///
/// # Errors
/// Any other failure to build the VM.
pub fn guest_or_skip(spec: GuestSpec) -> Result<Option<GuestVm>, GuestError> {
    match GuestVm::new(spec) {
        Ok(vm) => Ok(Some(vm)),
        Err(GuestError::OpenKvm(e)) => {
            eprintln!("SKIPPED: the KVM benchmarks need /dev/kvm: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
