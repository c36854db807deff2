//! `cargo xtask fuzz`: installs `cargo-fuzz` when it is missing, then runs the fuzz targets of every
//! fuzz project ([`PROJECTS`]: `crates/tdp-core/fuzz`, `crates/tdp-cli/fuzz`) for a chosen time each;
//! CI's `fuzz` step runs a short smoke of every target.
//!
//! Everything a run generates lands under `target/`: the build in `target/fuzz`, the corpus in
//! `target/fuzz-corpus/<target>` and crash inputs in `target/fuzz-artifacts/<target>/`, so nothing appears
//! in the repository. A target that fails makes the run fail with the crash input's path and the command
//! that replays it.
//!
//! The `nightly` toolchain is used when rustup has it, as cargo-fuzz expects. Without it, the toolchain
//! that runs xtask is used with `RUSTC_BOOTSTRAP=1`: the default `--sanitizer none` build uses only
//! stable flags, and the variable unlocks `-Z sanitizer` for `--sanitizer address`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Seconds per target when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 60;
/// Seconds per target in CI's smoke run.
pub const SMOKE_SECONDS: u64 = 20;
/// libFuzzer's limit for one input: an input that runs longer is a hang (I5: no endless loop) and fails
/// the run with a `timeout-*` artifact.
pub const INPUT_TIMEOUT_SECONDS: u64 = 10;
/// The `cargo-fuzz` versions `cargo install` may fetch when it is missing (a semver requirement).
pub const CARGO_FUZZ_VERSION: &str = "^0.13";

/// The sanitizer the targets are built with (cargo-fuzz's `--sanitizer`).
///
/// `none` is the default: `tdp-core` denies `unsafe` code, so an out-of-bounds access is already a
/// bounds-check panic, and without AddressSanitizer the targets build faster and run about four times as
/// many inputs per second (measured for `bitmap_clear`: docs/benchmarks.md, "Measurements behind choices
/// in the code"). `address` is there for code that gains `unsafe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sanitizer {
    /// No sanitizer: bounds checks, debug assertions and overflow checks only.
    #[default]
    None,
    /// AddressSanitizer.
    Address,
}

impl Sanitizer {
    /// The value cargo-fuzz's `--sanitizer` takes.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Sanitizer::None => "none",
            Sanitizer::Address => "address",
        }
    }
}

impl FromStr for Sanitizer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Sanitizer::None),
            "address" => Ok(Sanitizer::Address),
            bad => Err(format!("`{bad}` is not a sanitizer this project fuzzes with: `none` or `address`")),
        }
    }
}

impl fmt::Display for Sanitizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which targets to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every target `cargo fuzz list` names.
    All,
    /// One target, by name.
    One(String),
}

impl FromStr for Targets {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Targets::All),
            name if is_target_name(name) => Ok(Targets::One(name.to_owned())),
            bad => Err(format!("`{bad}` is not a fuzz target name (letters, digits, `_` and `-`) or `all`")),
        }
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Targets::All => f.write_str("all"),
            Targets::One(name) => f.write_str(name),
        }
    }
}

/// Parses `--seconds`: a whole number of seconds, at least 1.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_seconds(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("--seconds must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("--seconds takes a whole number of seconds, not `{s}`")),
    }
}

/// The crates with a cargo-fuzz project in their `fuzz/` directory (their targets' names differ).
pub const PROJECTS: [&str; 2] = ["crates/tdp-core", "crates/tdp-cli"];

/// The fuzz project directories.
#[must_use]
pub fn fuzz_dirs() -> Vec<PathBuf> {
    PROJECTS.iter().map(|p| cmd::repo_root().join(p).join("fuzz")).collect()
}

/// `cargo xtask fuzz`: runs `targets` for `seconds` each, built with `sanitizer`, installing
/// `cargo-fuzz` first if needed.
///
/// # Errors
/// If `cargo-fuzz` cannot be installed, a target does not exist, a build fails, or a target finds a
/// crash, a hang or a leak (the message names the input that triggers it).
pub fn run(targets: &Targets, seconds: u64, sanitizer: Sanitizer) -> Result<()> {
    ensure_cargo_fuzz()?;
    let toolchain = Toolchain::detect();
    let known = all_targets(&toolchain)?;
    let chosen: Vec<(&str, String)> = match targets {
        Targets::All => known,
        Targets::One(name) => match known.iter().find(|(_, t)| t == name) {
            Some(k) => vec![k.clone()],
            None => {
                let names: Vec<&str> = known.iter().map(|(_, t)| t.as_str()).collect();
                bail!("no fuzz target `{name}`; the targets are: {}", names.join(", "))
            }
        },
    };
    for (project, target) in &chosen {
        let started = Instant::now();
        run_target(&toolchain, project, target, seconds, sanitizer)?;
        println!(
            "fuzz target {target}: no failure in {:.1?} (build and {seconds} s of fuzzing)",
            started.elapsed()
        );
    }
    Ok(())
}

/// Every target of every project in [`PROJECTS`], with the project it belongs to.
///
/// # Errors
/// If `cargo fuzz list` fails or names no target in a project.
pub fn all_targets(toolchain: &Toolchain) -> Result<Vec<(&'static str, String)>> {
    let mut known = Vec::new();
    for project in PROJECTS {
        known.extend(list_targets(toolchain, project)?.into_iter().map(|t| (project, t)));
    }
    Ok(known)
}

/// CI's smoke run: every target for [`SMOKE_SECONDS`] seconds.
///
/// # Errors
/// As [`run`].
pub fn smoke() -> Result<()> {
    run(&Targets::All, SMOKE_SECONDS, Sanitizer::None)
}

/// Installs `cargo-fuzz` with `cargo install` (into `~/.cargo/bin`) unless `cargo fuzz --version` works.
///
/// # Errors
/// If the install fails, or `cargo fuzz` is still unavailable afterwards.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if cmd::succeeds(cmd::cargo().args(["fuzz", "--version"])) {
        println!("cargo-fuzz present");
        return Ok(());
    }
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
    if !cmd::succeeds(cmd::cargo().args(["fuzz", "--version"])) {
        bail!("`cargo fuzz` still unavailable after `cargo install cargo-fuzz`");
    }
    Ok(())
}

/// How to get a toolchain that accepts libFuzzer's `-Z` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Toolchain {
    /// `rustup run nightly cargo`.
    Nightly,
    /// The toolchain that runs xtask, with `RUSTC_BOOTSTRAP=1`.
    Bootstrapped,
}

impl Toolchain {
    /// `nightly` when rustup has it, else the current toolchain with `RUSTC_BOOTSTRAP=1`.
    #[must_use]
    pub fn detect() -> Toolchain {
        if cmd::succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
            Toolchain::Nightly
        } else {
            println!("no nightly toolchain: fuzzing with the current one and RUSTC_BOOTSTRAP=1");
            Toolchain::Bootstrapped
        }
    }

    /// The cargo command line a developer types for this toolchain.
    fn cargo_for_humans(&self) -> &'static str {
        match self {
            Toolchain::Nightly => "cargo +nightly",
            Toolchain::Bootstrapped => "RUSTC_BOOTSTRAP=1 cargo",
        }
    }

    /// `cargo fuzz <subcommand>`, run in `project` (cargo-fuzz finds `fuzz/` from there), with the
    /// variables of the `cargo run` that started xtask removed so that they cannot pick the toolchain.
    fn cargo_fuzz(&self, project: &str, subcommand: &str) -> Command {
        let mut cargo = match self {
            Toolchain::Nightly => {
                let mut c = Command::new("rustup");
                c.args(["run", "nightly", "cargo"]);
                c
            }
            Toolchain::Bootstrapped => {
                let mut c = cmd::cargo();
                c.env("RUSTC_BOOTSTRAP", "1");
                c
            }
        };
        for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR"] {
            cargo.env_remove(var);
        }
        cargo.current_dir(cmd::repo_root().join(project)).args(["fuzz", subcommand]);
        cargo
    }
}

/// The targets `cargo fuzz list` names in `project`.
fn list_targets(toolchain: &Toolchain, project: &str) -> Result<Vec<String>> {
    let mut list = toolchain.cargo_fuzz(project, "list");
    let line = cmd::display(&list);
    let output = list.output().with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!("`{line}` failed: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    let targets = parse_target_list(&String::from_utf8_lossy(&output.stdout));
    if targets.is_empty() {
        bail!("`{line}` named no fuzz target");
    }
    Ok(targets)
}

/// The target names in `cargo fuzz list`'s output, one per line.
fn parse_target_list(stdout: &str) -> Vec<String> {
    stdout.lines().map(str::trim).filter(|l| is_target_name(l)).map(str::to_owned).collect()
}

fn is_target_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Where a target's corpus and crash inputs live: `target/fuzz-corpus/<target>` and
/// `target/fuzz-artifacts/<target>`, created if missing.
///
/// # Errors
/// If a directory cannot be created.
pub fn target_dirs(target: &str) -> Result<(PathBuf, PathBuf)> {
    let root = cmd::repo_root();
    let corpus = root.join("target/fuzz-corpus").join(target);
    let artifacts = root.join("target/fuzz-artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok((corpus, artifacts))
}

/// `cargo fuzz build` of every target of `project` into `target/fuzz`, so that runs started afterwards
/// (several at once in `cargo xtask soak`) only check that the build is fresh.
///
/// # Errors
/// If the build fails.
pub fn build_project(toolchain: &Toolchain, project: &str, sanitizer: Sanitizer) -> Result<()> {
    let mut cargo = toolchain.cargo_fuzz(project, "build");
    cargo.args(["--sanitizer", sanitizer.as_str()]);
    cargo.arg("--target-dir").arg(cmd::repo_root().join("target/fuzz"));
    cmd::run(&mut cargo)
}

/// The `cargo fuzz run` command for `target` of `project`, fuzzing for `seconds` with the corpus and
/// crash directories of [`target_dirs`] (`extra` libFuzzer flags appended).
#[must_use]
pub fn run_command(
    toolchain: &Toolchain,
    (project, target): (&str, &str),
    seconds: u64,
    sanitizer: Sanitizer,
    (corpus, artifacts): (&Path, &Path),
    extra: &[&str],
) -> Command {
    let mut cargo = toolchain.cargo_fuzz(project, "run");
    cargo.args(["--sanitizer", sanitizer.as_str()]);
    cargo.arg(target).arg("--target-dir").arg(cmd::repo_root().join("target/fuzz")).arg(corpus).arg("--");
    cargo.args(libfuzzer_args(seconds, artifacts));
    cargo.args(extra);
    cargo
}

/// How to replay crash `input` of `target` by hand.
#[must_use]
pub fn replay_line(
    toolchain: &Toolchain,
    project: &str,
    target: &str,
    sanitizer: Sanitizer,
    input: &Path,
) -> String {
    format!(
        "cd {project} && {} fuzz run --sanitizer {sanitizer} --target-dir ../../target/fuzz {target} {}",
        toolchain.cargo_for_humans(),
        input.display()
    )
}

fn run_target(
    toolchain: &Toolchain,
    project: &str,
    target: &str,
    seconds: u64,
    sanitizer: Sanitizer,
) -> Result<()> {
    let (corpus, artifacts) = target_dirs(target)?;
    let before = list_files(&artifacts);
    let mut cargo = run_command(toolchain, (project, target), seconds, sanitizer, (&corpus, &artifacts), &[]);
    if let Err(err) = cmd::run(&mut cargo) {
        let new: Vec<PathBuf> = list_files(&artifacts).into_iter().filter(|f| !before.contains(f)).collect();
        let Some(input) = new.last() else {
            return Err(err.context(format!("fuzz target `{target}` failed (no crash input was written)")));
        };
        let replay = replay_line(toolchain, project, target, sanitizer, input);
        return Err(err.context(format!(
            "fuzz target `{target}` failed on input {}; replay it with `{replay}`",
            input.display()
        )));
    }
    Ok(())
}

/// libFuzzer's arguments: stop after `seconds`, treat an input running longer than
/// [`INPUT_TIMEOUT_SECONDS`] as a hang, and write crash inputs to `artifacts`.
fn libfuzzer_args(seconds: u64, artifacts: &Path) -> Vec<String> {
    vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECONDS}"),
        // libFuzzer prepends the prefix to the file name as is: the trailing separator makes it a directory.
        format!("-artifact_prefix={}/", artifacts.display()),
    ]
}

/// The files in `dir`, sorted by modification time (oldest first); empty if it cannot be read.
#[must_use]
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, path)| path).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_all_or_one_plain_name() {
        assert_eq!("all".parse::<Targets>(), Ok(Targets::All));
        assert_eq!("bitmap_clear".parse::<Targets>(), Ok(Targets::One("bitmap_clear".into())));
        assert_eq!("ring-reset2".parse::<Targets>(), Ok(Targets::One("ring-reset2".into())));
        for bad in ["", "../x", "a b", "-x;rm"] {
            assert!(bad.parse::<Targets>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(Targets::One("x".into()).to_string(), "x");
    }

    #[test]
    fn sanitizers_parse_by_cargo_fuzz_name() {
        assert_eq!("none".parse::<Sanitizer>(), Ok(Sanitizer::None));
        assert_eq!("address".parse::<Sanitizer>(), Ok(Sanitizer::Address));
        assert!("asan".parse::<Sanitizer>().unwrap_err().contains("`asan`"));
        assert_eq!(Sanitizer::default().to_string(), "none");
    }

    #[test]
    fn seconds_must_be_a_positive_whole_number() {
        assert_eq!(parse_seconds("20"), Ok(20));
        assert!(parse_seconds("0").unwrap_err().contains("at least 1"));
        assert!(parse_seconds("1.5").unwrap_err().contains("`1.5`"));
        assert!(parse_seconds("-3").is_err());
    }

    #[test]
    fn the_ci_step_states_the_real_smoke_time() {
        let step = crate::ci::STEPS.iter().find(|s| s.name == "fuzz").expect("CI has a fuzz step");
        assert!(step.what.contains(&format!("for {SMOKE_SECONDS} s")), "{}", step.what);
    }

    #[test]
    fn cargo_fuzz_list_output_is_read_line_by_line() {
        let out = "bitmap_clear\nring_reset\n\n";
        assert_eq!(parse_target_list(out), ["bitmap_clear", "ring_reset"]);
        assert!(parse_target_list("warning: something odd\n").is_empty());
    }

    #[test]
    fn libfuzzer_gets_the_time_the_hang_limit_and_an_artifact_directory() {
        let args = libfuzzer_args(7, Path::new("/r/target/fuzz-artifacts/t"));
        assert_eq!(
            args,
            ["-max_total_time=7", "-timeout=10", "-artifact_prefix=/r/target/fuzz-artifacts/t/"]
        );
    }

    #[test]
    fn the_fuzz_projects_stay_out_of_the_workspace_and_their_output_out_of_the_repo() {
        let root = cmd::repo_root();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let ignore = std::fs::read_to_string(root.join(".gitignore")).unwrap();
        for (project, dir) in PROJECTS.iter().zip(fuzz_dirs()) {
            assert!(
                manifest.contains(&format!("\"{project}/fuzz\"")),
                "the root workspace must exclude {project}/fuzz"
            );
            let fuzz = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
            assert!(fuzz.contains("cargo-fuzz = true") && fuzz.contains("[workspace]"), "{project}");
            for pattern in ["fuzz/artifacts", "fuzz/corpus"] {
                let want = format!("/{project}/{pattern}");
                assert!(ignore.lines().any(|l| l == want), ".gitignore does not cover {want}");
            }
        }
    }
}
