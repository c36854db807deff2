//! The `no_std` proof: build `xtask/nostd-proof` (a `#![no_std]` static binary that uses `tdp-core`), prove
//! from its ELF header that it is a static executable, run it, and require exit code 0.
//!
//! Keeps the architecture invariant "`tdp-core` uses no std": a `std` dependency anywhere in `tdp-core`'s
//! graph makes the link fail (no `std` for `#![no_std]` with `-nostdlib`), and a wrong result from the
//! core's code makes the binary exit non-zero.
//!
//! The proof crate is not a workspace member (its panic strategy, rustflags and target differ), so it has
//! its own `.cargo/config.toml`; cargo reads that file only from the current directory upwards, which is
//! why every cargo command here runs inside `xtask/nostd-proof`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{cmd, elf};

/// How long the proof binary may run; it does a few hundred instructions' worth of work.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The proof crate's directory.
#[must_use]
pub fn proof_dir() -> PathBuf {
    cmd::repo_root().join("xtask/nostd-proof")
}

/// Where the proof is built, apart from the workspace's own artifacts (its flags differ, so sharing the
/// workspace's directory would only cause rebuilds).
#[must_use]
pub fn target_dir() -> PathBuf {
    cmd::repo_root().join("target/nostd-proof")
}

/// A cargo command for the proof crate: run inside its directory so its `.cargo/config.toml` applies,
/// with rustflags from the environment removed (they would replace the config's, and the link needs
/// those).
#[must_use]
pub fn proof_cargo() -> Command {
    let mut cargo = cmd::cargo();
    cargo.current_dir(proof_dir());
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS"] {
        cargo.env_remove(var);
    }
    cargo
}

/// Builds, checks and runs the proof binary.
///
/// # Errors
/// If the build fails, the binary is not a static executable, or it does not exit with code 0.
pub fn prove() -> Result<()> {
    let exe = build()?;
    let image = std::fs::read(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let phnum = elf::check_static_executable(&image)
        .with_context(|| format!("{} is not a static executable", exe.display()))?;
    println!("{}: static ET_EXEC, {phnum} program headers, no PT_INTERP/PT_DYNAMIC", exe.display());
    run_binary(&exe)?;
    println!("no_std proof passed: tdp-core, tdp-svm and tdp-metal link and run without std");
    Ok(())
}

/// Builds the proof in release mode and returns the path of the executable cargo reports.
///
/// # Errors
/// If cargo fails or reports no executable.
pub fn build() -> Result<PathBuf> {
    let manifest = proof_dir().join("Cargo.toml");
    let mut cargo = proof_cargo();
    cargo
        .args(["build", "--release", "--message-format=json-render-diagnostics", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir());
    let line = cmd::display(&cargo);
    println!("$ {line}");
    // Diagnostics and progress go to stderr; stdout carries the JSON messages read below.
    let output = cargo.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!("`{line}` failed: {}", output.status);
    }
    executable_from_messages(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("`{line}` reported no executable"))
}

/// One line of `cargo build --message-format=json`; only artifact messages matter here.
#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    executable: Option<PathBuf>,
}

/// The last executable among the `compiler-artifact` messages in `stdout` (the proof crate's binary is
/// built last, after its dependencies).
fn executable_from_messages(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Message>(line).ok())
        .filter(|msg| msg.reason == "compiler-artifact")
        .filter_map(|msg| msg.executable)
        .next_back()
}

/// Runs `exe` with no arguments and no stdin, and requires exit code 0 within [`RUN_TIMEOUT`].
///
/// # Errors
/// On a non-zero exit, a signal, or a timeout (the process is then killed).
pub fn run_binary(exe: &Path) -> Result<()> {
    println!("$ {}", exe.display());
    let mut child = Command::new(exe)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("{} still running after {RUN_TIMEOUT:?}; killed", exe.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!("{} exited with 1: a tdp-core check in the proof failed", exe.display()),
        Some(2) => bail!("{} exited with 2: it panicked", exe.display()),
        _ => bail!("{} failed: {status}", exe.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_found_among_cargo_messages() {
        let stdout = concat!(
            r#"{"reason":"compiler-artifact","package_id":"tdp-core","executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","executable":"/t/release/tdp-nostd-proof"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
            "\n",
        );
        assert_eq!(executable_from_messages(stdout), Some(PathBuf::from("/t/release/tdp-nostd-proof")));
        assert_eq!(executable_from_messages(r#"{"reason":"build-finished","success":true}"#), None);
    }

    #[test]
    fn run_binary_reports_non_zero_exit() {
        // `false` exits 1, which the runner must not take for success.
        let err = run_binary(Path::new("/bin/false")).unwrap_err();
        assert!(err.to_string().contains("exited with 1"), "{err}");
        run_binary(Path::new("/bin/true")).unwrap();
    }
}
