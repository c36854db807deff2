//! Installing what CI needs, idempotently and cheaply: each helper first probes for what it would
//! install and does nothing when everything is there, so `cargo xtask ci` can run it every time.
//!
//! CI runs on a machine where nothing installed by hand is guaranteed to survive, so everything the
//! project needs beyond the Rust toolchain itself is installed from here.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

use crate::cmd;

/// The rustup components CI needs, each with the cargo subcommand that proves it is installed.
pub const RUST_COMPONENTS: &[(&str, &str)] = &[("rustfmt", "fmt"), ("clippy", "clippy")];

/// Adds the rustup components in [`RUST_COMPONENTS`] that are missing; a no-op when all are present.
///
/// # Errors
/// If `rustup component add` fails, or a component is still missing afterwards.
pub fn ensure_rust_components() -> Result<()> {
    let missing: Vec<&str> = RUST_COMPONENTS
        .iter()
        .filter(|(_, subcommand)| !cmd::succeeds(cmd::cargo().args([subcommand, "--version"])))
        .map(|(component, _)| *component)
        .collect();
    if missing.is_empty() {
        println!("rustup components present: {}", component_names().join(", "));
        return Ok(());
    }
    cmd::run(Command::new("rustup").args(["component", "add"]).args(&missing))?;
    for (component, subcommand) in RUST_COMPONENTS {
        if !cmd::succeeds(cmd::cargo().args([subcommand, "--version"])) {
            bail!("`cargo {subcommand}` still unavailable after `rustup component add {component}`");
        }
    }
    Ok(())
}

fn component_names() -> Vec<&'static str> {
    RUST_COMPONENTS.iter().map(|(component, _)| *component).collect()
}

/// Set once `apt-get update` has run in this process, so several `ensure_apt` calls update only once.
///
/// Relaxed is enough: the flag orders nothing else, and a lost race costs one redundant update.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Installs the Debian packages in `packages` that `dpkg -s` does not report as installed; a no-op (no
/// `apt-get update` either) when all are present.
///
/// Runs `apt-get update` at most once per process, then `apt-get install -y --no-install-recommends` for
/// the missing packages only, non-interactively. CI runs as root, so no `sudo`.
///
/// # Errors
/// If `apt-get` fails, or a package is still not installed afterwards.
pub fn ensure_apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("apt packages present: {}", packages.join(", "));
        return Ok(());
    }
    if !APT_UPDATED.swap(true, Ordering::Relaxed) {
        cmd::run(apt_get().arg("update"))?;
    }
    cmd::run(apt_get().args(["install", "-y", "--no-install-recommends"]).args(&missing))?;
    let still_missing: Vec<&str> = missing.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if !still_missing.is_empty() {
        bail!("apt-get install left packages missing: {}", still_missing.join(", "));
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Whether `dpkg -s` reports `package` as installed. A package that was removed but not purged still
/// has a `dpkg -s` entry, so the status line is checked rather than the exit code alone.
fn dpkg_installed(package: &str) -> bool {
    let Ok(output) = Command::new("dpkg").args(["-s", package]).output() else {
        return false;
    };
    output.status.success() && is_installed_status(&String::from_utf8_lossy(&output.stdout))
}

/// Whether `dpkg -s` output says the package is installed (`Status: install ok installed`).
fn is_installed_status(dpkg_output: &str) -> bool {
    dpkg_output.lines().any(|line| {
        line.strip_prefix("Status:")
            .is_some_and(|status| status.split_whitespace().last() == Some("installed"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_installed_only_when_the_last_word_says_so() {
        assert!(is_installed_status("Package: bochs\nStatus: install ok installed\nPriority: optional\n"));
        // Removed but not purged: dpkg still knows the package.
        assert!(!is_installed_status("Package: bochs\nStatus: deinstall ok config-files\n"));
        assert!(!is_installed_status("Package: bochs\nStatus: install ok half-installed\n"));
        assert!(!is_installed_status(""));
    }

    #[test]
    fn ensure_apt_with_nothing_to_install_runs_nothing() {
        // An empty list never reaches apt-get, so this passes without root or network.
        ensure_apt(&[]).unwrap();
        assert!(!APT_UPDATED.load(Ordering::Relaxed));
    }
}
