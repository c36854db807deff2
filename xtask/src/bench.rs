//! `cargo xtask bench`: runs the `tdp-bench` binary in release mode, which measures tdp and its peers in
//! one run, prints the side-by-side table and writes `target/bench/summary.json`. It builds the `tdp`
//! command first: the real-KVM migration group runs it.

use anyhow::Result;

use crate::cmd;

/// Where the summary goes, relative to the repository root.
pub const SUMMARY: &str = "target/bench/summary.json";

/// Runs every benchmark; `quick` cuts repetitions so the run finishes in under three minutes.
///
/// # Errors
/// If the build or the benchmark binary fails.
pub fn run(quick: bool) -> Result<()> {
    // The migration group runs the `tdp` command beside the benchmark binary: build it first.
    cmd::run(cmd::cargo().args(["build", "--release", "--package", "tdp-cli"]))?;
    let mut cargo = cmd::cargo();
    cargo.args(["run", "--release", "--package", "tdp-bench", "--", "--out", SUMMARY]);
    if quick {
        cargo.arg("--quick");
    }
    cmd::run(&mut cargo)
}
