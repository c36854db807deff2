//! `cargo xtask`: the command-line front end; parses the subcommand and calls into the `xtask` library.
#![forbid(unsafe_code)]

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The tdp task runner. `cargo xtask ci` is the one entry point CI uses (`.ci/run` calls it).
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run every CI step in order, stopping at the first failure.
    ///
    /// Steps: install (rustfmt and clippy, only if missing); fmt (cargo fmt --check); clippy
    /// (-D warnings, all targets); test (cargo test --workspace, which includes the tidy house rules;
    /// PROPTEST_CASES defaults to 128 unless set); doc (cargo doc with -D warnings); nostd (build, check and
    /// run the no_std proof binary). Nothing can be skipped: CI runs exactly this.
    Ci,
    /// Build the no_std proof binary (xtask/nostd-proof), check it is a static executable, and run it.
    ///
    /// The binary is #![no_std] and #![no_main], links tdp-core without std or libc, exercises it, and
    /// exits 0 only if tdp-core gave the expected answers.
    Nostd,
    /// Format the workspace and the no_std proof crate in place.
    Fmt,
    /// Measure tdp beside its peers and limits in one run; print the table and write
    /// target/bench/summary.json (a list of {name, ours, peer, unit, ratio}).
    Bench {
        /// Fewer repetitions: finishes in under three minutes.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Ci => xtask::ci::run_all(),
        Task::Nostd => xtask::nostd::prove(),
        Task::Fmt => xtask::ci::fmt_write(),
        Task::Bench { quick } => xtask::bench::run(quick),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ci_help_states_the_real_proptest_default() {
        let cli = Cli::command();
        let help = cli.find_subcommand("ci").and_then(|ci| ci.get_long_about()).unwrap().to_string();
        let stated = format!("PROPTEST_CASES defaults to {} unless set", xtask::ci::DEFAULT_PROPTEST_CASES);
        assert!(help.contains(&stated), "`cargo xtask ci --help` is out of date: {help}");
    }
}
