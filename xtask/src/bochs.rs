//! `cargo xtask bochs`: the bare-metal test hypervisor (`examples/bochs-hv`) under Bochs, compared with
//! the same scenario on `tdp-mock`, plus the must-fail runs of its `broken-*` builds.
//!
//! For each chosen CPU model it installs what is missing (Bochs, its BIOS images, GRUB and xorriso, as
//! Debian packages), builds the kernel and a GRUB multiboot2 ISO, runs Bochs headless (the `rfb` display
//! with no client, the debugger told to continue) with a timeout, and reads the `TDP-RESULT {json}` line
//! the kernel writes to COM1 (a file). It then runs `tdp-vmx`'s `scenario_mock` example for the same
//! models and requires, per model: every check passed on both; the same dirty set at every harvest (the
//! guest's page-table pages, which EPT A/D may report dirty under Bochs, set aside); the same
//! translations of every sampled gfn (slot, slot-relative page, level, permissions, or MMIO / none);
//! the same MMIO emulation; the same pages young at every age step and the same contents of the moved
//! page. Finally it boots each must-fail build ([`BROKEN_VARIANTS`]: `broken-ept` gives W (and D) back
//! to the leaves the core protected for dirty logging, `broken-age` ages without clearing,
//! `broken-remap` moves a page without the MMU notifier) and requires its verdict to be `fail` with the
//! check its variant names among the failures (proof that the checks can fail), and the same
//! observations as the mock run with the same mistake.
//!
//! Everything goes under `target/bochs/` (kernel builds in `target/bochs/cargo`, one directory per
//! variant and model with its `bochsrc.txt`, `serial.txt` and `bochs.log`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cmd, install};

pub mod result;

use result::{RESULT_PREFIX, check_broken};
pub use result::{RunResult, compare, parse_output};

/// The Debian packages a run needs (`shared/recipes/bochs-vmx.md`, "Packages").
pub const APT_PACKAGES: &[&str] =
    &["bochs", "bochsbios", "vgabios", "grub-pc-bin", "grub-common", "xorriso", "mtools"];

/// The models run when none is given: one with EPT A/D and PML, one without A/D (write protection).
pub const DEFAULT_MODELS: &[&str] = &["corei7_skylake_x", "corei7_sandy_bridge_2600k"];

/// The models the comparison knows a dirty-logging mode for (Bochs models with EPT).
pub const KNOWN_MODELS: &[&str] = &[
    "corei7_skylake_x",
    "corei7_icelake_u",
    "tigerlake",
    "corei7_sandy_bridge_2600k",
    "corei7_ivy_bridge_3770k",
    "broadwell_ult",
    "corei7_haswell_4770",
];

/// How long one Bochs run may take; a run takes about 1.5 s.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The must-fail builds: each is the kernel built with `--features broken-<name>`, and the mock run
/// with `--broken <name>` (`tdp_vmx::scenario::Broken`).
pub const BROKEN_VARIANTS: &[&str] = &["ept", "age", "remap"];

/// Which kernel build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The hypervisor as shipped.
    Correct,
    /// Built with `--features broken-<name>`: must fail.
    Broken(&'static str),
}

impl Variant {
    fn dir_name(self) -> String {
        match self {
            Variant::Correct => "correct".to_string(),
            Variant::Broken(name) => format!("broken-{name}"),
        }
    }
}

/// Parses a `--model` value: one of [`KNOWN_MODELS`].
///
/// # Errors
/// A message listing the known models.
pub fn parse_model(s: &str) -> Result<String, String> {
    if KNOWN_MODELS.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!("unknown model `{s}`; known (Bochs models with EPT): {}", KNOWN_MODELS.join(", ")))
    }
}

/// Runs everything for `models` ([`DEFAULT_MODELS`] when empty): with `broken_only`, only the
/// must-fail runs.
///
/// # Errors
/// The first thing that is missing, fails to build or run, fails a check, or disagrees with the mock;
/// or a broken run that does not fail.
pub fn run(models: &[String], broken_only: bool) -> Result<()> {
    let models: Vec<String> = if models.is_empty() {
        DEFAULT_MODELS.iter().map(|m| (*m).to_string()).collect()
    } else {
        models.to_vec()
    };
    install::ensure_apt(APT_PACKAGES)?;
    for file in [BIOS, VGABIOS] {
        if !Path::new(file).is_file() {
            bail!("{file} is missing although the packages {APT_PACKAGES:?} are installed");
        }
    }
    let started = Instant::now();
    let mut report = String::new();
    if !broken_only {
        let iso = build_iso(Variant::Correct)?;
        let mock = mock_results(&models, None)?;
        for model in &models {
            let (bochs, secs) = boot(Variant::Correct, model, &iso)?;
            let mock = mock
                .iter()
                .find(|r| &r.model == model)
                .with_context(|| format!("no mock result for {model}"))?;
            let differences = compare(&bochs, mock);
            writeln!(
                report,
                "{model}: bochs {} ({}/{} checks, {} EPT violations, {} misconfigs, {} PML-full exits, {} flushes = {} INVEPTs, {secs:.1} s), \
                 mock {} ({} faults); harvests {:?}",
                bochs.verdict,
                bochs.passed,
                bochs.passed + bochs.failed,
                bochs.ept_violations,
                bochs.ept_misconfigs,
                bochs.pml_full_exits,
                bochs.flushes,
                bochs.invepts,
                mock.verdict,
                mock.ept_violations,
                bochs.harvests.iter().map(Vec::len).collect::<Vec<_>>(),
            )?;
            if bochs.verdict != "pass" || mock.verdict != "pass" || !differences.is_empty() {
                println!("{report}");
                bail!(
                    "{model}: bochs verdict {}, mock verdict {}; failed checks: bochs {:?}, mock {:?}; \
                     differences: {differences:?}",
                    bochs.verdict,
                    mock.verdict,
                    bochs.failed_checks(),
                    mock.failed_checks()
                );
            }
        }
    }
    for &name in BROKEN_VARIANTS {
        let variant = Variant::Broken(name);
        let iso = build_iso(variant)?;
        let mock = mock_results(&models, Some(name))?;
        for model in &models {
            let (broken, secs) = boot(variant, model, &iso)?;
            let mock = mock
                .iter()
                .find(|r| &r.model == model)
                .with_context(|| format!("no mock result for {model}"))?;
            let differences = compare(&broken, mock);
            if !differences.is_empty() {
                bail!("{model}: broken-{name} on Bochs and the broken mock run disagree: {differences:?}");
            }
            let failed = broken.failed_checks();
            writeln!(
                report,
                "{model} broken-{name}: verdict {} as required and as on the broken mock run ({secs:.1} s), failed: {failed:?}",
                broken.verdict
            )?;
            check_broken(&broken, name)
                .with_context(|| format!("{model}: the broken-{name} build did not fail as it must"))?;
        }
    }
    print!("{report}");
    println!("bochs: all runs as required in {:.1?}", started.elapsed());
    Ok(())
}

/// A cargo command run inside the kernel's directory (its `.cargo/config.toml` then applies), with
/// rustflags from the environment removed (they would replace the config's).
#[must_use]
pub fn kernel_cargo() -> Command {
    let mut cargo = cmd::cargo();
    cargo.current_dir(cmd::repo_root().join("examples/bochs-hv"));
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        cargo.env_remove(var);
    }
    cargo
}

/// `cargo fmt --check` and `cargo clippy -D warnings` of the kernel, in both its builds (the kernel is
/// its own workspace, outside the workspace-wide steps).
///
/// # Errors
/// A formatting difference or a lint.
pub fn lint() -> Result<()> {
    cmd::run(kernel_cargo().args(["fmt", "--", "--check"]))?;
    let features = BROKEN_VARIANTS.iter().map(|name| Some(format!("broken-{name}")));
    for feature in std::iter::once(None).chain(features) {
        let mut cargo = kernel_cargo();
        cargo.args(["clippy", "--release", "--target-dir"]).arg(work_dir().join("cargo"));
        if let Some(feature) = feature {
            cargo.args(["--features", &feature]);
        }
        cmd::run(cargo.args(["--", "-D", "warnings"]))?;
    }
    Ok(())
}

const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";

fn work_dir() -> PathBuf {
    cmd::repo_root().join("target/bochs")
}

/// Builds the kernel for `variant` and its ISO; returns the ISO's path.
fn build_iso(variant: Variant) -> Result<PathBuf> {
    let mut cargo = kernel_cargo();
    cargo.args(["build", "--release", "--target-dir"]).arg(work_dir().join("cargo"));
    if let Variant::Broken(name) = variant {
        cargo.args(["--features", &format!("broken-{name}")]);
    }
    cmd::run(&mut cargo)?;
    let elf = work_dir().join("cargo/x86_64-unknown-linux-gnu/release/bochs-hv");
    let out = work_dir().join(variant.dir_name());
    let boot = out.join("iso/boot");
    std::fs::create_dir_all(boot.join("grub"))
        .with_context(|| format!("cannot create {}", boot.display()))?;
    std::fs::copy(&elf, boot.join("kernel.elf"))
        .with_context(|| format!("cannot copy {} into the ISO tree", elf.display()))?;
    std::fs::write(boot.join("grub/grub.cfg"), GRUB_CFG).context("cannot write grub.cfg")?;
    if !cmd::succeeds(Command::new("grub-file").arg("--is-x86-multiboot2").arg(boot.join("kernel.elf"))) {
        bail!("{} is not a multiboot2 kernel (grub-file --is-x86-multiboot2)", elf.display());
    }
    let iso = out.join("kernel.iso");
    let mut mkrescue = Command::new("grub-mkrescue");
    mkrescue.arg("-o").arg(&iso).arg(out.join("iso")).stderr(Stdio::null());
    cmd::run(&mut mkrescue)?;
    Ok(iso)
}

const GRUB_CFG: &str =
    "set timeout=0\nset default=0\nmenuentry \"bochs-hv\" {\n  multiboot2 /boot/kernel.elf\n  boot\n}\n";

/// The bochsrc for `model`, booting `iso`, with COM1 and the log in `run_dir`.
#[must_use]
pub fn bochsrc(model: &str, iso: &Path, run_dir: &Path) -> String {
    format!(
        "megs: 128\n\
         romimage: file={BIOS}\n\
         vgaromimage: file={VGABIOS}\n\
         cpu: model={model}, count=1, ips=4000000, reset_on_triple_fault=0\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         boot: cdrom\n\
         display_library: rfb, options=\"timeout=0\"\n\
         com1: enabled=1, mode=file, dev={serial}\n\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         mouse: enabled=0\n\
         speaker: enabled=0\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         clock: sync=none, time0=local\n",
        iso = iso.display(),
        serial = run_dir.join("serial.txt").display(),
        log = run_dir.join("bochs.log").display(),
    )
}

/// Boots `iso` on `model` and returns the kernel's result and the run's wall time in seconds.
fn boot(variant: Variant, model: &str, iso: &Path) -> Result<(RunResult, f64)> {
    let run_dir = work_dir().join(variant.dir_name()).join(model);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let serial = run_dir.join("serial.txt");
    let _ = std::fs::remove_file(&serial);
    std::fs::write(run_dir.join("bochsrc.txt"), bochsrc(model, iso, &run_dir))
        .context("cannot write bochsrc")?;
    // Debian's Bochs has its debugger built in and stops before the first instruction; `c` continues.
    std::fs::write(run_dir.join("dbg.rc"), "c\n").context("cannot write dbg.rc")?;
    let out = std::fs::File::create(run_dir.join("bochs.out")).context("cannot create bochs.out")?;
    let mut bochs = Command::new("bochs");
    bochs
        .current_dir(&run_dir)
        .args(["-q", "-f", "bochsrc.txt", "-rc", "dbg.rc"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().context("cannot duplicate bochs.out")?)
        .stderr(out);
    println!("$ (cd {}; {})", run_dir.display(), cmd::display(&bochs));
    let started = Instant::now();
    let mut child = bochs.spawn().context("cannot start bochs")?;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > RUN_TIMEOUT {
            child.kill()?;
            child.wait()?;
            bail!(
                "{model} ({}): Bochs still running after {RUN_TIMEOUT:?}; killed (see {})",
                variant.dir_name(),
                run_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = started.elapsed().as_secs_f64();
    // Bochs exits with 1 after the shutdown port; the run is judged by what the kernel printed.
    let text = std::fs::read_to_string(&serial)
        .with_context(|| format!("no serial output in {}", serial.display()))?;
    let result = parse_output(&text).with_context(|| {
        format!("{model} ({}): see {} and bochs.log there", variant.dir_name(), run_dir.display())
    })?;
    Ok((result, secs))
}

/// Runs `scenario_mock` for `models` (the must-fail variant `broken`, if any) and parses its result lines.
fn mock_results(models: &[String], broken: Option<&str>) -> Result<Vec<RunResult>> {
    let mut cargo = cmd::cargo();
    cargo.args(["run", "-q", "-p", "tdp-vmx", "--example", "scenario_mock", "--"]).args(models);
    if let Some(name) = broken {
        cargo.args(["--broken", name]);
    }
    let line = cmd::display(&cargo);
    println!("$ {line}");
    let output = cargo.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start `{line}`"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let results: Vec<RunResult> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(RESULT_PREFIX))
        .map(|json| {
            serde_json::from_str(json).with_context(|| format!("cannot parse the mock's result: {json}"))
        })
        .collect::<Result<_>>()?;
    if results.len() != models.len() {
        bail!("`{line}` ({}) printed {} results for {} models", output.status, results.len(), models.len());
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochsrc_names_the_model_and_the_run_files() {
        let rc = bochsrc("corei7_skylake_x", Path::new("/t/k.iso"), Path::new("/t/run"));
        assert!(rc.contains("cpu: model=corei7_skylake_x,"));
        assert!(rc.contains("path=/t/k.iso") && rc.contains("dev=/t/run/serial.txt"));
        assert!(parse_model("bx_generic").is_err() && parse_model("tigerlake").is_ok());
    }
}
