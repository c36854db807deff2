//! Crate hygiene for the publishable crates ([`PUBLISHABLE`]): the stated MSRV, `cargo package` (verified
//! builds of the packaged sources), every feature combination checked (`cargo hack --feature-powerset`),
//! and `cargo deny` on licenses, bans and sources.
//!
//! The MSRV (the workspace's `rust-version`) is checked twice. First every crate in the normal dependency
//! closure of the publishable crates must declare a `rust-version` no newer than ours (which names the
//! culprit when a dependency update raises it). Then the publishable crates' library targets are built
//! with that very toolchain: `rustup run <msrv> cargo check --locked --lib` with all features, and tdp-kvm
//! again without default features (tdp-core is `#![no_std]` unconditionally, so its check is the `no_std`
//! build), in `target/msrv` so that it does not disturb the main build. The toolchain is installed with
//! `rustup toolchain install <msrv> --profile minimal` when missing; without rustup the step fails and
//! says so. This adds about 10 s to a cold CI run (dependencies included) and 2-3 s when only our crates
//! changed.
//! Clippy's `incompatible_msrv` lint, on in the clippy step, flags the same std APIs earlier.
//!
//! What is not checked, and why: `cargo deny`'s advisories need the RustSec database from GitHub, which
//! this machine cannot reach.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cmd;

/// The crates meant for crates.io.
pub const PUBLISHABLE: &[&str] = &["tdp-core", "tdp-mock", "tdp-metal", "tdp-vmx", "tdp-svm", "tdp-kvm"];
/// `cargo install` versions for the tools this step needs when they are missing.
const CARGO_HACK_VERSION: &str = "^0.6";
const CARGO_DENY_VERSION: &str = "^0.20";

/// Runs every hygiene check, installing `cargo-hack` and `cargo-deny` first when missing.
///
/// # Errors
/// The first failing check.
pub fn run() -> Result<()> {
    let msrv = msrv_of_dependencies()?;
    build_with_msrv(&msrv)?;
    let packages: Vec<String> =
        PUBLISHABLE.iter().flat_map(|p| ["-p".to_string(), (*p).to_string()]).collect();
    // Its own target directory, emptied first: cargo takes a registry crate's build for fresh by its
    // version alone, and ours keep version 0.1.0 from commit to commit, so a dependent would otherwise be
    // verified against an earlier commit's build of a sibling (this failed here: tdp-mock against a
    // tdp-core without the APIs it now uses).
    let target = cmd::repo_root().join("target/hygiene-package");
    if target.exists() {
        std::fs::remove_dir_all(&target).with_context(|| format!("cannot remove {}", target.display()))?;
    }
    forget_extracted_packages()?;
    cmd::run(cmd::cargo().args(["package", "--allow-dirty", "--target-dir"]).arg(&target).args(&packages))?;
    ensure_tool("hack", "cargo-hack", CARGO_HACK_VERSION)?;
    cmd::run(cmd::cargo().args(["hack", "check", "--feature-powerset"]).args(&packages))?;
    ensure_tool("deny", "cargo-deny", CARGO_DENY_VERSION)?;
    println!("(cargo deny: advisories not checked: the RustSec database is out of this machine's reach)");
    cmd::run(cmd::cargo().args(["deny", "--all-features", "check", "licenses", "bans", "sources"]))
}

/// Removes the sources cargo extracted from earlier `cargo package` runs' temporary registry
/// (`$CARGO_HOME/registry/src/*/<crate>-<version>`): cargo does not extract a crate again over an
/// existing directory, and ours keep their version between commits. A fresh machine has nothing to
/// remove.
///
/// # Errors
/// A directory that exists but cannot be removed.
fn forget_extracted_packages() -> Result<()> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")));
    let Some(src) = home.map(|h| h.join("registry/src")) else { return Ok(()) };
    let Ok(indexes) = std::fs::read_dir(&src) else { return Ok(()) };
    for index in indexes.flatten() {
        let Ok(crates) = std::fs::read_dir(index.path()) else { continue };
        for krate in crates.flatten() {
            let name = krate.file_name().to_string_lossy().into_owned();
            let ours = PUBLISHABLE.iter().any(|p| {
                name.strip_prefix(p)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
            });
            if ours {
                std::fs::remove_dir_all(krate.path())
                    .with_context(|| format!("cannot remove {}", krate.path().display()))?;
            }
        }
    }
    Ok(())
}

fn ensure_tool(sub: &str, krate: &str, version: &str) -> Result<()> {
    if cmd::succeeds(cmd::cargo().args([sub, "--version"])) {
        return Ok(());
    }
    cmd::run(cmd::cargo().args(["install", krate, "--locked", "--version", version]))?;
    if !cmd::succeeds(cmd::cargo().args([sub, "--version"])) {
        bail!("`cargo {sub}` still unavailable after `cargo install {krate}`");
    }
    Ok(())
}

/// Every crate in the normal (non-dev, non-build) dependency closure of [`PUBLISHABLE`], all features
/// on, must declare no `rust-version` newer than the workspace's.
///
/// Returns the workspace's `rust-version`.
///
/// # Errors
/// If `cargo metadata` fails or a dependency needs a newer compiler (all such are named).
pub fn msrv_of_dependencies() -> Result<String> {
    let out = cmd::cargo().args(["metadata", "--format-version", "1", "--all-features"]).output()?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("cargo metadata's JSON")?;
    let (ours, too_new, checked) = check_msrv(&meta)?;
    if !too_new.is_empty() {
        bail!("dependencies need a newer compiler than our rust-version {ours}: {too_new:?}");
    }
    println!(
        "msrv: {checked} crates in the publishable crates' dependency closure declare rust-version <= {ours}"
    );
    Ok(ours)
}

/// The rustup toolchain name for a `rust-version`: `1.88` is `1.88.0` (rustup's `1.88` would mean the
/// newest 1.88 patch release, which is not what `rust-version` promises).
fn toolchain_name(rust_version: &str) -> String {
    if rust_version.split('.').count() == 2 { format!("{rust_version}.0") } else { rust_version.to_string() }
}

/// Builds the publishable crates' library targets with the MSRV toolchain, installing it first when
/// rustup lacks it.
///
/// # Errors
/// rustup missing or unable to install the toolchain, or a crate that does not build with it.
pub fn build_with_msrv(rust_version: &str) -> Result<()> {
    let toolchain = toolchain_name(rust_version);
    if !cmd::succeeds(Command::new("rustup").arg("--version")) {
        bail!(
            "the MSRV check needs rustup to install and run toolchain {toolchain} (the workspace's \
             rust-version), and `rustup --version` failed: install rustup (https://rustup.rs)"
        );
    }
    if !cmd::succeeds(Command::new("rustup").args(["run", &toolchain, "rustc", "--version"])) {
        cmd::run(Command::new("rustup").args(["toolchain", "install", &toolchain, "--profile", "minimal"]))
            .with_context(|| {
            format!("cannot install toolchain {toolchain} (the workspace's rust-version) with rustup")
        })?;
    }
    let target = cmd::repo_root().join("target/msrv");
    let packages: Vec<&str> = PUBLISHABLE.iter().flat_map(|p| ["-p", p]).collect();
    let start = std::time::Instant::now();
    cmd::run(
        msrv_cargo(&toolchain)
            .args(["check", "--locked", "--lib", "--all-features", "--target-dir"])
            .arg(&target)
            .args(&packages),
    )
    .with_context(|| format!("the publishable crates do not build with their rust-version {rust_version}"))?;
    cmd::run(
        msrv_cargo(&toolchain)
            .args(["check", "--locked", "--lib", "--no-default-features", "--target-dir"])
            .arg(&target)
            .args(["-p", "tdp-kvm"]),
    )
    .with_context(|| format!("tdp-kvm without default features does not build with {rust_version}"))?;
    println!("msrv: the publishable crates build with {toolchain} ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

/// `rustup run <toolchain> cargo` in the repository root, with the variables of the `cargo run` that
/// started xtask removed so that they cannot pick another toolchain.
fn msrv_cargo(toolchain: &str) -> Command {
    let mut cargo = Command::new("rustup");
    cargo.args(["run", toolchain, "cargo"]).current_dir(cmd::repo_root());
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR", "RUSTC_WRAPPER"] {
        cargo.env_remove(var);
    }
    cargo
}

/// (our MSRV, the dependencies declaring a newer one, how many crates were checked).
fn check_msrv(meta: &Value) -> Result<(String, Vec<String>, usize)> {
    let packages = meta["packages"].as_array().context("packages")?;
    let by_id: BTreeMap<&str, &Value> =
        packages.iter().filter_map(|p| Some((p["id"].as_str()?, p))).collect();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "tdp-core")
        .and_then(|p| p["rust_version"].as_str())
        .context("tdp-core's rust-version")?
        .to_string();
    let nodes: BTreeMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .context("resolve")?
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let mut todo: Vec<&str> = packages
        .iter()
        .filter(|p| PUBLISHABLE.iter().any(|n| p["name"] == *n))
        .filter_map(|p| p["id"].as_str())
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes.get(id).and_then(|n| n["deps"].as_array()).into_iter().flatten() {
            let normal = dep["dep_kinds"].as_array().is_some_and(|k| k.iter().any(|k| k["kind"].is_null()));
            if normal && let Some(pkg) = dep["pkg"].as_str() {
                todo.push(pkg);
            }
        }
    }
    let too_new = seen
        .iter()
        .filter_map(|id| by_id.get(id))
        .filter_map(|p| Some((p["name"].as_str()?, p["version"].as_str()?, p["rust_version"].as_str()?)))
        .filter(|(_, _, rv)| newer(rv, &ours))
        .map(|(n, v, rv)| format!("{n} {v} (rust-version {rv})"))
        .collect();
    Ok((ours, too_new, seen.len()))
}

/// Whether version `a` (`major.minor[.patch]`) is newer than `b`.
fn newer(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Vec<u64> { s.split('.').map(|x| x.parse().unwrap_or(0)).collect() };
    let (mut a, mut b) = (parse(a), parse(b));
    a.resize(3, 0);
    b.resize(3, 0);
    a > b
}

#[cfg(test)]
mod tests {
    use super::{check_msrv, newer, toolchain_name};

    #[test]
    fn a_two_part_rust_version_names_its_first_release() {
        assert_eq!(toolchain_name("1.88"), "1.88.0");
        assert_eq!(toolchain_name("1.88.1"), "1.88.1");
    }

    #[test]
    fn versions_compare_by_number_and_a_too_new_dependency_is_named() {
        assert!(
            newer("1.90", "1.88")
                && newer("1.88.1", "1.88")
                && !newer("1.88.0", "1.88")
                && !newer("1.9", "1.88")
        );
        let meta = serde_json::json!({
            "packages": [
                {"id": "core", "name": "tdp-core", "version": "0.1.0", "rust_version": "1.88"},
                {"id": "dep", "name": "fresh", "version": "2.0.0", "rust_version": "1.91"},
                {"id": "dev", "name": "devonly", "version": "1.0.0", "rust_version": "1.99"},
            ],
            "resolve": {"nodes": [
                {"id": "core", "deps": [
                    {"pkg": "dep", "dep_kinds": [{"kind": null}]},
                    {"pkg": "dev", "dep_kinds": [{"kind": "dev"}]},
                ]},
                {"id": "dep", "deps": []},
                {"id": "dev", "deps": []},
            ]},
        });
        let (ours, too_new, checked) = check_msrv(&meta).unwrap();
        assert_eq!((ours.as_str(), checked), ("1.88", 2));
        assert_eq!(too_new, ["fresh 2.0.0 (rust-version 1.91)"], "the dev-only dependency is not counted");
    }
}
