//! The compat VMMs: `compat/kvm-ioctls-{0.19,0.22,0.25}`, each its own workspace pinned to one
//! `kvm-ioctls` version, running a real guest on `/dev/kvm` with `tdp-kvm`'s fd API (dirty ring with
//! ring-full exits handled in the VMM's own loop, and clear-log), every reported page checked exactly.
//! They share one target directory (`target/compat`) so the common crates build once. Also the check
//! that `tdp-kvm` without default features has no `kvm-ioctls` or `kvm-bindings` in its dependency tree.

use anyhow::{Result, bail};

use crate::cmd;

/// The compat crates, by directory under the repository root.
pub const CRATES: &[&str] = &["compat/kvm-ioctls-0.19", "compat/kvm-ioctls-0.22", "compat/kvm-ioctls-0.25"];

/// Formats (`--check` with `check`), lints and runs every compat VMM. Without `/dev/kvm` each prints
/// `SKIPPED`; this step then says so in a banner, so a green run without KVM cannot pass for a real one.
///
/// # Errors
/// The first failing command.
pub fn run(check: bool) -> Result<()> {
    fd_api_has_no_kvm_ioctls()?;
    let target = cmd::repo_root().join("target/compat");
    for dir in CRATES {
        let manifest = format!("{dir}/Cargo.toml");
        let fmt: &[&str] = if check { &["--", "--check"] } else { &[] };
        cmd::run(cmd::cargo().args(["fmt", "--manifest-path", &manifest]).args(fmt))?;
        cmd::run(
            cmd::cargo()
                .args(["clippy", "--locked", "--manifest-path", &manifest, "--target-dir"])
                .arg(&target)
                .args(["--", "-D", "warnings"]),
        )?;
        cmd::run(
            cmd::cargo()
                .args(["run", "-q", "--locked", "--manifest-path", &manifest, "--target-dir"])
                .arg(&target),
        )?;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        println!(
            "\n!!! compat: SKIPPED: no /dev/kvm on this machine: the compat VMMs were built, not run !!!\n"
        );
    }
    Ok(())
}

/// `cargo tree -p tdp-kvm --no-default-features -e normal` must list neither `kvm-ioctls` nor
/// `kvm-bindings`: the fd API ties a VMM to no version of either.
///
/// # Errors
/// If `cargo tree` fails or lists one of them.
pub fn fd_api_has_no_kvm_ioctls() -> Result<()> {
    let mut tree = cmd::cargo();
    tree.args(["tree", "-p", "tdp-kvm", "--no-default-features", "-e", "normal", "--prefix", "none"]);
    println!("$ {}", cmd::display(&tree));
    let out = tree.output()?;
    if !out.status.success() {
        bail!("cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let coupled: Vec<&str> =
        text.lines().filter(|l| l.starts_with("kvm-ioctls") || l.starts_with("kvm-bindings")).collect();
    if !coupled.is_empty() {
        bail!("tdp-kvm without default features depends on {coupled:?}");
    }
    println!(
        "tdp-kvm --no-default-features: no kvm-ioctls, no kvm-bindings ({} crates)",
        text.lines().count()
    );
    Ok(())
}
