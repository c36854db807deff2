//! `cargo xtask bench`: runs the `tdp-bench` binary in release mode, which measures tdp and its peers in
//! one run, prints the side-by-side table and writes `target/bench/summary.json`.

use anyhow::Result;

use crate::cmd;

/// Where the summary goes, relative to the repository root.
pub const SUMMARY: &str = "target/bench/summary.json";

/// Runs every benchmark; `quick` cuts repetitions so the run finishes in under three minutes.
///
/// # Errors
/// If the build or the benchmark binary fails.
pub fn run(quick: bool) -> Result<()> {
    let mut cargo = cmd::cargo();
    cargo.args(["run", "--release", "--package", "tdp-bench", "--", "--out", SUMMARY]);
    if quick {
        cargo.arg("--quick");
    }
    cmd::run(&mut cargo)
}
