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
    /// PROPTEST_CASES defaults to 128 unless set); compat (tdp-kvm's fd API without kvm-ioctls, and the VMMs
    /// of compat/ on kvm-ioctls 0.19, 0.22 and 0.25 run on /dev/kvm); hygiene (the MSRV: dependencies'
    /// rust-version and a build with the rust-version toolchain, installed if missing; cargo package, every
    /// feature combination, cargo deny, for the publishable crates); bochs (the bare-metal hypervisors under Bochs on two
    /// Intel and two AMD models, with two processors, compared with tdp-mock, and their broken-ept/npt, broken-age and broken-remap builds required to fail; installs Bochs);
    /// loom (the dirty ring's loom models: --cfg loom, release,
    /// target/loom); doc (cargo doc with -D warnings); nostd (build, check and run the no_std proof binary);
    /// fuzz (every fuzz target for a short smoke run). Nothing can be skipped: CI runs exactly this.
    Ci,
    /// Build the no_std proof binary (xtask/nostd-proof), check it is a static executable, and run it.
    ///
    /// The binary is #![no_std] and #![no_main], links tdp-core without std or libc, exercises it, and
    /// exits 0 only if tdp-core gave the expected answers.
    Nostd,
    /// Lint and run the compat VMMs (compat/kvm-ioctls-*) on /dev/kvm, after checking that tdp-kvm without
    /// default features has no kvm-ioctls.
    Compat,
    /// Crate hygiene of the publishable crates: the MSRV (dependencies' rust-version, and cargo check with
    /// the rust-version toolchain, installed with rustup if missing), cargo package, every feature
    /// combination (cargo hack), cargo deny (licenses, bans, sources).
    Hygiene,
    /// Format the workspace, the no_std proof crate and the Bochs kernels (examples/bochs-hv, bochs-svm) in place.
    Fmt,
    /// Measure tdp beside its peers and limits in one run; print the table and write
    /// target/bench/summary.json (a list of {name, ours, peer, unit, ratio}).
    Bench {
        /// Fewer repetitions: finishes in under three minutes.
        #[arg(long)]
        quick: bool,
    },
    /// Boot the bare-metal test hypervisors (examples/bochs-hv on Intel models, examples/bochs-svm on AMD
    /// models, the latter with two processors) under Bochs for each CPU model, compare with the same
    /// scenario on tdp-mock, require the broken-ept (broken-npt), broken-age and broken-remap builds to
    /// fail and the two-vCPU run to pass.
    ///
    /// Installs the Debian packages it needs when missing (bochs, bochsbios, vgabios, grub-pc-bin,
    /// grub-common, xorriso, mtools). Results and logs go under target/bochs/.
    Bochs {
        /// A Bochs CPU model with EPT or NPT (repeatable); default: corei7_skylake_x,
        /// corei7_sandy_bridge_2600k, ryzen and phenom_8650_toliman.
        #[arg(long = "model", value_parser = xtask::bochs::parse_model)]
        models: Vec<String>,
        /// Only the must-fail runs of the broken-* builds.
        #[arg(long)]
        broken: bool,
    },
    /// Run the cargo-fuzz targets of crates/tdp-core/fuzz and crates/tdp-cli/fuzz (installs cargo-fuzz if
    /// it is missing).
    ///
    /// Corpus, crash inputs and the build go under target/ (fuzz-corpus/, fuzz-artifacts/, fuzz/). A
    /// crash, a hang (one input running over 10 s) or a leak fails the run and prints the input's path.
    Fuzz {
        /// A target name, or `all` for every target.
        #[arg(long, default_value = "all")]
        target: xtask::fuzz::Targets,
        /// Seconds of fuzzing per target (building not counted).
        #[arg(long, default_value_t = xtask::fuzz::DEFAULT_SECONDS, value_parser = xtask::fuzz::parse_seconds)]
        seconds: u64,
        /// `none` (bounds checks and debug assertions only; tdp-core has one `unsafe` block, in
        /// `mmu::groups`) or `address`.
        #[arg(long, default_value_t)]
        sanitizer: xtask::fuzz::Sanitizer,
    },
    /// Soak: every fuzz target and the multi-threaded host stress (crates/tdp-mock/tests/host_stress.rs,
    /// release, run again and again) for N minutes each, then a summary table (minutes, CPU minutes,
    /// executions, libFuzzer coverage and features, corpus size, findings) also written to
    /// target/soak/summary.json. Not part of CI (CI runs the fuzz smoke).
    ///
    /// Each target's output goes to target/soak/<target>.log. A fuzz target that finds a crash is
    /// started again for the time left (up to 3 inputs); a failed or hung stress run is kept as
    /// target/soak/host_stress.failure-N.log. Exits non-zero if anything was found.
    Soak {
        /// Minutes per target (building not counted).
        #[arg(long, default_value_t = xtask::soak::DEFAULT_MINUTES, value_parser = xtask::soak::parse_minutes)]
        minutes: u64,
        /// Targets run at once.
        #[arg(long, default_value_t = 1, value_parser = xtask::soak::parse_jobs)]
        jobs: usize,
        /// A target to run (a fuzz target or `host_stress`; repeatable); default: every target.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// `none` or `address`, as for `cargo xtask fuzz`.
        #[arg(long, default_value_t)]
        sanitizer: xtask::fuzz::Sanitizer,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Ci => xtask::ci::run_all(),
        Task::Nostd => xtask::nostd::prove(),
        Task::Compat => xtask::compat::run(true),
        Task::Hygiene => xtask::hygiene::run(),
        Task::Fmt => xtask::ci::fmt_write(),
        Task::Bench { quick } => xtask::bench::run(quick),
        Task::Bochs { models, broken } => xtask::bochs::run(&models, broken),
        Task::Fuzz { target, seconds, sanitizer } => xtask::fuzz::run(&target, seconds, sanitizer),
        Task::Soak { minutes, jobs, targets, sanitizer } => {
            xtask::soak::run(&targets, minutes, jobs, sanitizer)
        }
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
    fn fuzz_arguments_default_to_all_targets_for_a_minute_each() {
        use xtask::fuzz::{Sanitizer, Targets};
        let parse = |args: &[&str]| match Cli::try_parse_from(["cargo xtask", "fuzz"].iter().chain(args)) {
            Ok(Cli { task: Task::Fuzz { target, seconds, sanitizer } }) => Ok((target, seconds, sanitizer)),
            Ok(_) => panic!("`fuzz` parsed as another task"),
            Err(e) => Err(e),
        };
        assert_eq!(parse(&[]).unwrap(), (Targets::All, 60, Sanitizer::None));
        let args = ["--target", "bitmap_clear", "--seconds", "5", "--sanitizer", "address"];
        assert_eq!(parse(&args).unwrap(), (Targets::One("bitmap_clear".into()), 5, Sanitizer::Address));
        for bad in
            [&["--seconds", "0"][..], &["--seconds", "soon"], &["--target", "../x"], &["--sanitizer", "msan"]]
        {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn soak_arguments_default_to_an_hour_per_target_one_at_a_time() {
        use xtask::fuzz::Sanitizer;
        let parse = |args: &[&str]| match Cli::try_parse_from(["cargo xtask", "soak"].iter().chain(args)) {
            Ok(Cli { task: Task::Soak { minutes, jobs, targets, sanitizer } }) => {
                Ok((minutes, jobs, targets, sanitizer))
            }
            Ok(_) => panic!("`soak` parsed as another task"),
            Err(e) => Err(e),
        };
        assert_eq!(parse(&[]).unwrap(), (60, 1, vec![], Sanitizer::None));
        let args = ["--minutes", "5", "--jobs", "2", "--target", "host_stress", "--target", "mmu_ops"];
        let targets = vec!["host_stress".to_owned(), "mmu_ops".to_owned()];
        assert_eq!(parse(&args).unwrap(), (5, 2, targets, Sanitizer::None));
        for bad in [&["--minutes", "0"][..], &["--minutes", "1h"], &["--jobs", "0"], &["--jobs", "-1"]] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ci_help_states_the_real_proptest_default() {
        let cli = Cli::command();
        let help = cli.find_subcommand("ci").and_then(|ci| ci.get_long_about()).unwrap().to_string();
        let stated = format!("PROPTEST_CASES defaults to {} unless set", xtask::ci::DEFAULT_PROPTEST_CASES);
        assert!(help.contains(&stated), "`cargo xtask ci --help` is out of date: {help}");
    }
}
