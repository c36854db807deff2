//! Choosing the machine that runs the guest: `--backend kvm` (a real KVM guest, or an error), `mock`
//! (the tdp-mock model), or `auto` (KVM when `/dev/kvm` is usable, else the mock, and the output says
//! which and why).

use std::path::Path;

use crate::guest::{Guest, GuestConfig, GuestError};
use crate::kvm::{KvmGuest, KvmStartError};
use crate::mock::MockGuest;

/// Which machine runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// KVM if `/dev/kvm` is usable, else the mock.
    Auto,
    /// A real KVM guest; fail if `/dev/kvm` is unusable.
    Kvm,
    /// The tdp-mock machine.
    Mock,
}

/// The guest that was started, and a note when the mock stands in for KVM.
pub struct Started {
    /// The running guest.
    pub guest: Box<dyn Guest>,
    /// Why the mock is used although KVM was wanted (`auto` fell back), for the output.
    pub fallback: Option<String>,
}

/// Starts a guest on `backend`. With `auto`, `mock_cfg` is what the mock runs when KVM is unusable
/// (smaller memory: the model is slower than hardware).
///
/// ```
/// use tdp_cli::backend::{start, Backend};
/// use tdp_cli::guest::{GuestConfig, Mode, Pattern};
///
/// let cfg = GuestConfig { memory: 1 << 20, vcpus: 1, pattern: Pattern::Sequential, rate_pages: 0,
///     mode: Mode::Bitmap, ring_entries: 256, fill: false };
/// let mut started = start(Backend::Mock, cfg, cfg)?;
/// assert_eq!(started.guest.backend(), "mock");
/// started.guest.shutdown()?;
/// # Ok::<(), tdp_cli::guest::GuestError>(())
/// ```
///
/// # Errors
/// The guest's start failure; with `kvm`, an unusable `/dev/kvm` too.
pub fn start(backend: Backend, cfg: GuestConfig, mock_cfg: GuestConfig) -> Result<Started, GuestError> {
    start_with_device(backend, Path::new(tdp_kvm::KVM_PATH), cfg, mock_cfg)
}

/// As [`start`], with the KVM device at `device` (tests point it at a missing path to see the fallback).
///
/// # Errors
/// As [`start`].
pub fn start_with_device(
    backend: Backend,
    device: &Path,
    cfg: GuestConfig,
    mock_cfg: GuestConfig,
) -> Result<Started, GuestError> {
    match backend {
        Backend::Mock => Ok(Started { guest: Box::new(MockGuest::start(mock_cfg)?), fallback: None }),
        Backend::Kvm => match KvmGuest::start_on(device, cfg) {
            Ok(g) => Ok(Started { guest: Box::new(g), fallback: None }),
            Err(KvmStartError::Unavailable(why)) => Err(GuestError::new("starting the KVM guest", why)),
            Err(KvmStartError::Failed(e)) => Err(e),
        },
        Backend::Auto => match KvmGuest::start_on(device, cfg) {
            Ok(g) => Ok(Started { guest: Box::new(g), fallback: None }),
            Err(KvmStartError::Unavailable(why)) => {
                let note = format!("no usable KVM ({why}): running on the tdp-mock machine instead");
                Ok(Started { guest: Box::new(MockGuest::start(mock_cfg)?), fallback: Some(note) })
            }
            Err(KvmStartError::Failed(e)) => Err(e),
        },
    }
}
