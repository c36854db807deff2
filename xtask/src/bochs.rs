//! `cargo xtask bochs`: the bare-metal test hypervisors under Bochs (`examples/bochs-hv` on Intel models,
//! VMX and EPT; `examples/bochs-svm` on AMD models, SVM and NPT), each compared with the same scenario
//! on `tdp-mock`, plus the must-fail runs of their `broken-*` builds, plus the two-processor run.
//!
//! For each chosen CPU model it installs what is missing (Bochs, its BIOS images, GRUB and xorriso, as
//! Debian packages), builds the model's kernel and a GRUB multiboot2 ISO, runs Bochs headless (the `rfb`
//! display with no client, the debugger told to continue) with a timeout, and reads the `TDP-RESULT
//! {json}` line the kernel writes to COM1 (a file). It then runs `tdp-metal`'s `scenario_mock` example
//! for the same models (EPT modes for Intel models, NPT for AMD ones) and requires, per model: every
//! check passed on both; the same dirty set at every harvest (the guest's page-table pages, which EPT A/D
//! may report dirty under Bochs, set aside); the same translations of every sampled gfn (slot,
//! slot-relative page, level, permissions, or MMIO / none); the same MMIO emulation; the same pages young
//! at every age step and the same contents of the moved page; the same number of faults (and fetch
//! faults) in the scenario's slots over the run; and for the steps of NX huge pages,
//! write tracking and stopping logging, the same snapshots (faults and fetch faults in the scenario's
//! slots since the previous host step, and the leaves of the snapshot's gfns) and the same emulated
//! writes to the tracked page. AMD models boot with two processors
//! (`cpu: count=2`): after the scenario, `bochs-svm` runs two vCPUs on them at once and its `TDP-SMP`
//! line must say `pass`. Finally it boots each must-fail build ([`Kernel::broken_variants`]:
//! `broken-ept` / `broken-npt` give W (and D) back to the leaves the core protected for dirty logging,
//! `broken-age` ages without clearing, `broken-remap` moves a page without the MMU notifier, `broken-nx`
//! leaves the NX huge-page mitigation off, `broken-track` never tracks the tracked page,
//! `broken-recover` zaps the huge ranges after logging stops) and requires
//! its verdict to be `fail` with the check its variant names among the failures (proof that the checks
//! can fail), and the same observations as the mock run with the same mistake.
//!
//! Everything goes under `target/bochs/` (kernel builds in `target/bochs/cargo`, one directory per
//! kernel, variant and model with its `bochsrc.txt`, `serial.txt` and `bochs.log`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cmd, install};

pub mod result;

use result::{RESULT_PREFIX, SMP_PREFIX, SmpResult, check_broken, check_smp, compare_smp, parse_smp};
pub use result::{RunResult, compare, parse_output};

/// The Debian packages a run needs (`shared/recipes/bochs-vmx.md`, "Packages").
pub const APT_PACKAGES: &[&str] =
    &["bochs", "bochsbios", "vgabios", "grub-pc-bin", "grub-common", "xorriso", "mtools"];

/// The models run when none is given: one with EPT A/D and PML, one without A/D (write protection), and
/// two AMD models with nested paging: one with NRIP save and flush-by-ASID, one with neither (RIP
/// advanced by the hypervisor, TLB_CONTROL 01h).
pub const DEFAULT_MODELS: &[&str] =
    &["corei7_skylake_x", "corei7_sandy_bridge_2600k", "ryzen", "phenom_8650_toliman"];

/// The models the comparison knows a dirty-logging mode for (Bochs models with EPT).
pub const KNOWN_MODELS: &[&str] = &[
    "corei7_skylake_x",
    "corei7_icelake_u",
    "tigerlake",
    "corei7_sandy_bridge_2600k",
    "corei7_ivy_bridge_3770k",
    "broadwell_ult",
    "corei7_haswell_4770",
    "ryzen",
    "zambezi",
    "trinity_apu",
    "phenom_8650_toliman",
];

/// The AMD models among [`KNOWN_MODELS`] (SVM with nested paging, `docs/recipes/bochs-svm.md`).
pub const AMD_MODELS: &[&str] = &["ryzen", "zambezi", "trinity_apu", "phenom_8650_toliman"];

/// Which test hypervisor a model boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `examples/bochs-hv`: VMX and EPT.
    Vmx,
    /// `examples/bochs-svm`: SVM and NPT.
    Svm,
}

impl Kernel {
    /// Both kernels.
    pub const ALL: [Kernel; 2] = [Kernel::Vmx, Kernel::Svm];

    /// The kernel for `model`.
    #[must_use]
    pub fn of(model: &str) -> Kernel {
        if AMD_MODELS.contains(&model) { Kernel::Svm } else { Kernel::Vmx }
    }

    /// The kernel's crate (and directory under `examples/`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Vmx => "bochs-hv",
            Kernel::Svm => "bochs-svm",
        }
    }

    /// Its must-fail builds: each is the kernel built with `--features broken-<name>`, and the mock run
    /// with `--broken <name>` (`tdp_metal::scenario::Broken`).
    #[must_use]
    pub const fn broken_variants(self) -> &'static [&'static str] {
        match self {
            Kernel::Vmx => &["ept", "age", "remap", "nx", "track", "recover"],
            Kernel::Svm => &["npt", "age", "remap", "nx", "track", "recover"],
        }
    }

    /// Emulated processors for the correct build's run: two, where the kernel runs its two-vCPU part
    /// after the scenario (the must-fail builds boot with one).
    #[must_use]
    pub const fn cpus(self) -> u32 {
        match self {
            Kernel::Vmx | Kernel::Svm => 2,
        }
    }
}

/// How long one Bochs run may take; a run takes about 1.5 s.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

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
        Err(format!("unknown model `{s}`; known (Bochs models with EPT or NPT): {}", KNOWN_MODELS.join(", ")))
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
    for kernel in Kernel::ALL {
        let models: Vec<String> = models.iter().filter(|m| Kernel::of(m) == kernel).cloned().collect();
        if !models.is_empty() {
            run_kernel(kernel, &models, broken_only, &mut report)?;
        }
    }
    print!("{report}");
    println!("bochs: all runs as required in {:.1?}", started.elapsed());
    Ok(())
}

/// [`run`] for the models that boot `kernel`.
fn run_kernel(kernel: Kernel, models: &[String], broken_only: bool, report: &mut String) -> Result<()> {
    if !broken_only {
        let iso = build_iso(kernel, Variant::Correct)?;
        let mock = mock_results(models, None)?;
        let mock_smp = if kernel.cpus() > 1 { mock_smp_results(models)? } else { Vec::new() };
        for model in models {
            let (bochs, secs) = boot(kernel, Variant::Correct, model, &iso)?;
            let mock = mock
                .iter()
                .find(|r| &r.model == model)
                .with_context(|| format!("no mock result for {model}"))?;
            let differences = compare(&bochs, mock);
            writeln!(
                report,
                "{model} ({}): bochs {} ({}/{} checks, {} {} exits, {} {}, {} PML-full exits, {} flushes = {} delivered, {secs:.1} s), \
                 mock {} ({} faults); harvests {:?}{}",
                kernel.name(),
                bochs.verdict,
                bochs.passed,
                bochs.passed + bochs.failed,
                bochs.ept_violations,
                if kernel == Kernel::Svm { "#NPF" } else { "EPT-violation" },
                bochs.ept_misconfigs,
                if kernel == Kernel::Svm { "reserved-bit #NPFs" } else { "misconfigs" },
                bochs.pml_full_exits,
                bochs.flushes,
                bochs.invepts,
                mock.verdict,
                mock.ept_violations,
                bochs.harvests.iter().map(Vec::len).collect::<Vec<_>>(),
                match check_smp(&bochs) {
                    Ok(smp) => format!(
                        "; two vCPUs: {}, phase A {} pages, phase B {:?}",
                        smp.verdict,
                        smp.phase_a.len(),
                        smp.phase_b.iter().map(Vec::len).collect::<Vec<_>>()
                    ),
                    Err(_) => String::new(),
                },
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
            if kernel.cpus() > 1 {
                let smp = check_smp(&bochs).with_context(|| format!("{model}: the two-processor run"))?;
                let mock = mock_smp
                    .iter()
                    .find(|r| &r.model == model)
                    .with_context(|| format!("no two-vCPU mock result for {model}"))?;
                let differences = compare_smp(smp, mock);
                if !differences.is_empty() {
                    bail!("{model}: the two-vCPU part on Bochs and on the mock disagree: {differences:?}");
                }
            }
        }
    }
    for &name in kernel.broken_variants() {
        let variant = Variant::Broken(name);
        let iso = build_iso(kernel, variant)?;
        let mock = mock_results(models, Some(name))?;
        for model in models {
            let (broken, secs) = boot(kernel, variant, model, &iso)?;
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
    Ok(())
}

/// A cargo command run inside `examples/bochs-hv` (see [`kernel_cargo_in`]).
#[must_use]
pub fn kernel_cargo() -> Command {
    kernel_cargo_in(Kernel::Vmx)
}

/// `cargo fmt` of both kernels, in place.
///
/// # Errors
/// If `cargo fmt` fails.
pub fn fmt_write() -> Result<()> {
    for kernel in Kernel::ALL {
        cmd::run(kernel_cargo_in(kernel).arg("fmt"))?;
    }
    Ok(())
}

/// A cargo command run inside `kernel`'s directory (its `.cargo/config.toml` then applies), with
/// rustflags from the environment removed (they would replace the config's).
#[must_use]
pub fn kernel_cargo_in(kernel: Kernel) -> Command {
    let mut cargo = cmd::cargo();
    cargo.current_dir(cmd::repo_root().join("examples").join(kernel.name()));
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        cargo.env_remove(var);
    }
    cargo
}

/// `cargo fmt --check` and `cargo clippy -D warnings` of both kernels, in every build of each (the
/// correct one, each `broken-*` one, and `bochs-svm`'s `no-tlb-flush` experiment); each kernel is its
/// own workspace, outside the workspace-wide steps.
///
/// # Errors
/// A formatting difference or a lint.
pub fn lint() -> Result<()> {
    for kernel in Kernel::ALL {
        cmd::run(kernel_cargo_in(kernel).args(["fmt", "--", "--check"]))?;
        let mut features: Vec<Option<String>> = vec![None];
        features.extend(kernel.broken_variants().iter().map(|name| Some(format!("broken-{name}"))));
        if kernel == Kernel::Svm {
            features.push(Some("no-tlb-flush".to_string()));
        }
        for feature in features {
            let mut cargo = kernel_cargo_in(kernel);
            cargo.args(["clippy", "--release", "--target-dir"]).arg(work_dir().join("cargo"));
            if let Some(feature) = feature {
                cargo.args(["--features", &feature]);
            }
            cmd::run(cargo.args(["--", "-D", "warnings"]))?;
        }
    }
    Ok(())
}

const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";

fn work_dir() -> PathBuf {
    cmd::repo_root().join("target/bochs")
}

/// Builds `kernel` for `variant` and its ISO; returns the ISO's path.
fn build_iso(kernel: Kernel, variant: Variant) -> Result<PathBuf> {
    let mut cargo = kernel_cargo_in(kernel);
    cargo.args(["build", "--release", "--target-dir"]).arg(work_dir().join("cargo"));
    if let Variant::Broken(name) = variant {
        cargo.args(["--features", &format!("broken-{name}")]);
    }
    cmd::run(&mut cargo)?;
    let elf = work_dir().join("cargo/x86_64-unknown-linux-gnu/release").join(kernel.name());
    let out = work_dir().join(kernel.name()).join(variant.dir_name());
    let boot = out.join("iso/boot");
    std::fs::create_dir_all(boot.join("grub"))
        .with_context(|| format!("cannot create {}", boot.display()))?;
    std::fs::copy(&elf, boot.join("kernel.elf"))
        .with_context(|| format!("cannot copy {} into the ISO tree", elf.display()))?;
    std::fs::write(boot.join("grub/grub.cfg"), grub_cfg(kernel)).context("cannot write grub.cfg")?;
    if !cmd::succeeds(Command::new("grub-file").arg("--is-x86-multiboot2").arg(boot.join("kernel.elf"))) {
        bail!("{} is not a multiboot2 kernel (grub-file --is-x86-multiboot2)", elf.display());
    }
    let iso = out.join("kernel.iso");
    let mut mkrescue = Command::new("grub-mkrescue");
    mkrescue.arg("-o").arg(&iso).arg(out.join("iso")).stderr(Stdio::null());
    cmd::run(&mut mkrescue)?;
    Ok(iso)
}

fn grub_cfg(kernel: Kernel) -> String {
    format!(
        "set timeout=0\nset default=0\nmenuentry \"{}\" {{\n  multiboot2 /boot/kernel.elf\n  boot\n}}\n",
        kernel.name()
    )
}

/// The bochsrc for `model` with `cpus` processors, booting `iso`, with COM1 and the log in `run_dir`.
#[must_use]
pub fn bochsrc(model: &str, cpus: u32, iso: &Path, run_dir: &Path) -> String {
    format!(
        "megs: 128\n\
         romimage: file={BIOS}\n\
         vgaromimage: file={VGABIOS}\n\
         cpu: model={model}, count={cpus}, ips=4000000, reset_on_triple_fault=0\n\
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

/// Boots `iso` (of `kernel`) on `model` and returns the kernel's result and the run's wall time in
/// seconds.
fn boot(kernel: Kernel, variant: Variant, model: &str, iso: &Path) -> Result<(RunResult, f64)> {
    let run_dir = work_dir().join(kernel.name()).join(variant.dir_name()).join(model);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let serial = run_dir.join("serial.txt");
    let _ = std::fs::remove_file(&serial);
    // The must-fail builds run the scenario only: one processor.
    let cpus = if variant == Variant::Correct { kernel.cpus() } else { 1 };
    std::fs::write(run_dir.join("bochsrc.txt"), bochsrc(model, cpus, iso, &run_dir))
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

/// Runs `scenario_mock --smp` for `models` and parses its two-vCPU result lines.
fn mock_smp_results(models: &[String]) -> Result<Vec<SmpResult>> {
    let mut cargo = cmd::cargo();
    cargo.args(["run", "-q", "-p", "tdp-metal", "--example", "scenario_mock", "--", "--smp"]).args(models);
    let line = cmd::display(&cargo);
    println!("$ {line}");
    let output = cargo.stderr(Stdio::inherit()).output().with_context(|| format!("cannot start `{line}`"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut results = Vec::new();
    for smp in stdout.lines().filter_map(|l| l.strip_prefix(SMP_PREFIX)) {
        match parse_smp(smp)? {
            result::SmpLine::Ran(r) => results.push(r),
            result::SmpLine::Not(what) => bail!("`{line}`: {what}"),
        }
    }
    if results.len() != models.len() {
        bail!("`{line}` ({}) printed {} results for {} models", output.status, results.len(), models.len());
    }
    Ok(results)
}

/// Runs `scenario_mock` for `models` (the must-fail variant `broken`, if any) and parses its result lines.
fn mock_results(models: &[String], broken: Option<&str>) -> Result<Vec<RunResult>> {
    let mut cargo = cmd::cargo();
    cargo.args(["run", "-q", "-p", "tdp-metal", "--example", "scenario_mock", "--"]).args(models);
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
        let rc = bochsrc("corei7_skylake_x", 1, Path::new("/t/k.iso"), Path::new("/t/run"));
        assert!(rc.contains("cpu: model=corei7_skylake_x, count=1,"));
        assert!(bochsrc("ryzen", 2, Path::new("/t/k.iso"), Path::new("/t/run")).contains("count=2,"));
        assert!(rc.contains("path=/t/k.iso") && rc.contains("dev=/t/run/serial.txt"));
        assert!(parse_model("bx_generic").is_err() && parse_model("tigerlake").is_ok());
        assert!(parse_model("turion64_tyler").is_err(), "SVM without nested paging");
        assert_eq!((Kernel::of("ryzen"), Kernel::of("tigerlake")), (Kernel::Svm, Kernel::Vmx));
        assert!(AMD_MODELS.iter().all(|m| KNOWN_MODELS.contains(m)));
    }
}
