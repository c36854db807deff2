//! The CI pipeline: every step, in order, with a header per step; the first failure stops the run and
//! names its step. There are deliberately no switches to skip steps: what CI runs is what
//! `cargo xtask ci` runs on a developer's machine.
//!
//! The house rules (tidy) are a `#[test]` in `xtask/tests/tidy.rs`, so they run in the `test` step.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::{bochs as bochs_hv, cmd, compat, fuzz, hygiene, install, nostd};

/// Proptest cases per property when the caller did not set `PROPTEST_CASES`: half of proptest's default
/// of 256, to keep the test step within CI's time budget on two cores. Export `PROPTEST_CASES` to change.
pub const DEFAULT_PROPTEST_CASES: &str = "128";

/// One CI step.
pub struct Step {
    /// Short name, used in headers and in the failure message.
    pub name: &'static str,
    /// What the step runs, for the header and `--help`.
    pub what: &'static str,
    run: fn() -> Result<()>,
}

/// Every CI step, in the order `cargo xtask ci` runs them.
pub const STEPS: &[Step] = &[
    Step {
        name: "install",
        what: "rustup component add rustfmt clippy (only those missing)",
        run: install::ensure_rust_components,
    },
    Step {
        name: "fmt",
        what: "cargo fmt --all -- --check (and the no_std proof and fuzz crates)",
        run: fmt_check,
    },
    Step {
        name: "clippy",
        what: "cargo clippy --workspace --all-targets -- -D warnings (and tdp-kvm with all and no default features, and the no_std proof crate)",
        run: clippy,
    },
    Step {
        name: "test",
        what: "cargo test --workspace (includes the tidy test), cargo test -p tdp-kvm --all-features --lib --test vm_memory, then cargo run -q -p tdp-examples --example kvm_dirty_ring",
        run: test,
    },
    Step {
        name: "compat",
        what: "cargo tree: tdp-kvm --no-default-features has no kvm-ioctls; fmt, clippy and run the VMMs of compat/kvm-ioctls-{0.19,0.22,0.25} on /dev/kvm (target/compat)",
        run: || compat::run(true),
    },
    Step {
        name: "hygiene",
        what: "publishable crates: dependencies' rust-version <= ours, rustup run <rust-version> cargo check --locked --lib (all features; tdp-kvm also without default features; installs the toolchain, minimal profile; target/msrv), cargo package, cargo hack check --feature-powerset, cargo deny check licenses bans sources (installs cargo-hack and cargo-deny)",
        run: hygiene::run,
    },
    Step {
        name: "bochs",
        what: "fmt and clippy examples/bochs-hv and examples/bochs-svm, boot them under Bochs (skylake_x, sandy_bridge, ryzen, phenom_8650_toliman, each with two processors), compare with tdp-mock (including the NX huge-page, write-tracking and stop-logging steps), require broken-ept/npt, broken-age, broken-remap, broken-nx, broken-track and broken-recover to fail and the two-vCPU run to pass",
        run: bochs,
    },
    Step {
        name: "loom",
        what: "RUSTFLAGS='--cfg loom' cargo test -p tdp-core --test loom_ring --test loom_invalidation --test loom_freeze --release --target-dir target/loom, then the groups' model in --lib",
        run: loom,
    },
    Step {
        name: "doc",
        what: "RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps (and tdp-kvm with all and no default features)",
        run: doc,
    },
    Step {
        name: "nostd",
        what: "build xtask/nostd-proof, check it is a static ELF, run it, require exit 0",
        run: nostd::prove,
    },
    Step {
        name: "fuzz",
        what: "every cargo-fuzz target of crates/tdp-core/fuzz and crates/tdp-cli/fuzz for 20 s (installs cargo-fuzz if missing)",
        run: fuzz::smoke,
    },
];

/// Runs every step in [`STEPS`] in order, stopping at the first failure.
///
/// # Errors
/// The first failing step, named, with the failure as its cause.
pub fn run_all() -> Result<()> {
    let started = Instant::now();
    let total = STEPS.len();
    for (i, step) in STEPS.iter().enumerate() {
        let n = i + 1;
        println!("\n==> ci step {n}/{total}: {} ({})", step.name, step.what);
        let step_started = Instant::now();
        (step.run)().with_context(|| format!("ci step {n}/{total} `{}` failed", step.name))?;
        println!("==> ci step {n}/{total}: {} ok in {:.1?}", step.name, step_started.elapsed());
    }
    println!("\n==> ci: all {total} steps passed in {:.1?}", started.elapsed());
    Ok(())
}

/// Formats the workspace, the proof crate and the Bochs kernel in place (`cargo xtask fmt`).
///
/// # Errors
/// If `cargo fmt` fails.
pub fn fmt_write() -> Result<()> {
    cmd::run(cmd::cargo().args(["fmt", "--all"]))?;
    for project in fuzz::PROJECTS {
        let manifest = format!("{project}/fuzz/Cargo.toml");
        cmd::run(cmd::cargo().args(["fmt", "--manifest-path", manifest.as_str()]))?;
    }
    cmd::run(nostd::proof_cargo().arg("fmt"))?;
    for dir in compat::CRATES {
        cmd::run(cmd::cargo().args(["fmt", "--manifest-path", &format!("{dir}/Cargo.toml")]))?;
    }
    bochs_hv::fmt_write()
}

fn fmt_check() -> Result<()> {
    cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The fuzz crates are their own workspaces, outside `--all`.
    for project in fuzz::PROJECTS {
        let manifest = format!("{project}/fuzz/Cargo.toml");
        cmd::run(cmd::cargo().args(["fmt", "--manifest-path", manifest.as_str(), "--", "--check"]))?;
    }
    cmd::run(nostd::proof_cargo().args(["fmt", "--", "--check"]))
}

fn clippy() -> Result<()> {
    cmd::run(cmd::cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // tdp-kvm's optional features (vm-memory, serde) and its build without kvm-ioctls.
    for features in ["--all-features", "--no-default-features"] {
        cmd::run(cmd::cargo().args([
            "clippy",
            "-p",
            "tdp-kvm",
            "--all-targets",
            features,
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    cmd::run(
        nostd::proof_cargo()
            .args(["clippy", "--release", "--target-dir"])
            .arg(nostd::target_dir())
            .args(["--", "-D", "warnings"]),
    )
}

fn test() -> Result<()> {
    let mut cargo = cmd::cargo();
    cargo.args(["test", "--workspace"]);
    if std::env::var_os("PROPTEST_CASES").is_none() {
        cargo.env("PROPTEST_CASES", DEFAULT_PROPTEST_CASES);
    }
    cmd::run(&mut cargo)?;
    // tdp-kvm's vm-memory test and serde round trips need non-default features (the README's vm-memory wiring runs above,
    // as a doctest of tdp-examples, which enables it).
    cmd::run(cmd::cargo().args(["test", "-p", "tdp-kvm", "--all-features", "--lib", "--test", "vm_memory"]))?;
    // The /dev/kvm example is the first thing a VMM author runs, so CI runs it too (a few seconds; it
    // prints SKIPPED and succeeds where /dev/kvm cannot be opened).
    cmd::run(cmd::cargo().args(["run", "-q", "-p", "tdp-examples", "--example", "kvm_dirty_ring"]))
}

/// The loom models of the dirty ring protocol (`crates/tdp-core/tests/loom_ring.rs`), of the
/// invalidation retry rule (`crates/tdp-core/tests/loom_invalidation.rs`) and of a removed table's
/// freeze-and-free against the lockless ager (`crates/tdp-core/tests/loom_freeze.rs`), and of the faults'
/// per-group read side against a writer (`loom_model` in `crates/tdp-core/src/mmu/groups.rs`), run on the
/// shipped code: `--cfg loom` swaps `tdp_core::sync` to loom's atomics. Release mode, because loom runs every
/// model hundreds of times; a separate target directory, because `--cfg loom` changes the flags of every
/// crate and would otherwise throw away the normal build.
fn loom() -> Result<()> {
    let loom_test = || {
        let mut cargo = cmd::cargo();
        cargo.args(["test", "-p", "tdp-core", "--release", "--target-dir", "target/loom"]);
        cargo.env("RUSTFLAGS", "--cfg loom");
        cargo
    };
    let mut cargo = loom_test();
    cmd::run(cargo.args(["--test", "loom_ring", "--test", "loom_invalidation", "--test", "loom_freeze"]))?;
    // The group model is a unit test (the groups are private to the MMU); the filter leaves the other
    // unit tests, which are not loom models, out.
    cmd::run(loom_test().args(["--lib", "--", "loom_model"]))
}

/// The kernel's formatting and lints (its own workspace and target), then the Bochs runs with their
/// default models (installs Bochs and GRUB when missing).
fn bochs() -> Result<()> {
    bochs_hv::lint()?;
    bochs_hv::run(&[], false)
}

fn doc() -> Result<()> {
    cmd::run(cmd::cargo().args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings"))?;
    for features in ["--all-features", "--no-default-features"] {
        cmd::run(
            cmd::cargo()
                .args(["doc", "-p", "tdp-kvm", "--no-deps", features])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_runs_every_habit16_step_in_order() {
        let names: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "install", "fmt", "clippy", "test", "compat", "hygiene", "bochs", "loom", "doc", "nostd",
                "fuzz"
            ]
        );
    }
}
