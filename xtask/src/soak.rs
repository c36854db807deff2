//! `cargo xtask soak`: every fuzz target of [`fuzz::PROJECTS`] and the multi-threaded host stress
//! (`crates/tdp-mock/tests/host_stress.rs`, release build) for a number of minutes each, then a summary:
//! executions, CPU time, coverage, corpus size and findings per target, printed as a table and written to
//! `target/soak/summary.json`.
//!
//! The fuzz runs go through [`fuzz`]'s machinery (same toolchain choice, build directory, corpus and
//! crash directories, libFuzzer flags). A fuzz run that finds a crash stops, as libFuzzer does; the soak
//! records the input and starts the target again for the time left, up to [`MAX_FINDINGS`] inputs per
//! target. The stress test is run again and again until its minutes are up; a failing or hanging run
//! (over [`STRESS_RUN_LIMIT`]) is a finding, its output kept in `target/soak/`.
//!
//! `--jobs J` runs J targets at once; each target's output goes to `target/soak/<target>.log` so that
//! the terminal only shows one line per start and end. CPU time is measured for each target (the
//! shell's `times` after the child, so it counts the fuzzer or test process the child waited for),
//! which tells how much of the machine a target really had when the soak runs under `nice` beside
//! other work. The soak fails at the end if anything was found.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cmd;
use crate::fuzz::{self, Sanitizer, Toolchain};

/// Minutes per target when `--minutes` is not given.
pub const DEFAULT_MINUTES: u64 = 60;
/// The name the stress test has in the summary and for `--target`.
pub const STRESS: &str = "host_stress";
/// Crash inputs recorded per fuzz target before the soak stops running it.
pub const MAX_FINDINGS: usize = 3;
/// A stress run taking longer than this is killed and counted as a hang (a run takes seconds on an idle
/// machine; the limit leaves room for a starved `nice` run).
pub const STRESS_RUN_LIMIT: Duration = Duration::from_secs(20 * 60);
/// A fuzz target is not restarted after a finding with less than this left.
const MIN_RESTART: Duration = Duration::from_secs(10);

/// Parses `--minutes`: a whole number of minutes, at least 1.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_minutes(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("--minutes must be at least 1".to_owned()),
        Ok(n) if n > 7 * 24 * 60 => Err(format!("--minutes {n} is over a week; soak in several runs")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("--minutes takes a whole number of minutes, not `{s}`")),
    }
}

/// Parses `--jobs`: how many targets run at once, 1 to 64.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        Ok(n) => Err(format!("--jobs must be 1 to 64, not {n}")),
        Err(_) => Err(format!("--jobs takes a whole number, not `{s}`")),
    }
}

/// One row of the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Row {
    /// The fuzz target's name, or [`STRESS`].
    pub target: String,
    /// `fuzz` or `stress`.
    pub kind: &'static str,
    /// Wall-clock minutes the target ran (building not counted).
    pub minutes: f64,
    /// CPU minutes the target's processes used (user and system).
    pub cpu_minutes: f64,
    /// Inputs run (fuzz) or test runs (stress).
    pub executions: u64,
    /// libFuzzer's `cov:` at the end (coverage points); none for the stress.
    pub coverage: Option<u64>,
    /// libFuzzer's `ft:` at the end (features); none for the stress.
    pub features: Option<u64>,
    /// Inputs in the corpus at the end (libFuzzer's `corp:`); none for the stress.
    pub corpus: Option<u64>,
    /// Crash, hang, leak or out-of-memory inputs (fuzz), failed or hung runs (stress).
    pub findings: u64,
    /// Where each finding's input or output is.
    pub finding_files: Vec<String>,
}

/// What libFuzzer's output (and the `times` line after it) says about one run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunStats {
    /// `stat::number_of_executed_units`, else the last `#N` line.
    pub executions: Option<u64>,
    /// The last `cov:`.
    pub coverage: Option<u64>,
    /// The last `ft:`.
    pub features: Option<u64>,
    /// The last `corp:` (inputs, not bytes).
    pub corpus: Option<u64>,
    /// The children's user plus system seconds from the shell's `times`.
    pub cpu_seconds: Option<f64>,
}

/// Reads libFuzzer's output of one run (with `-print_final_stats=1`) followed by the shell's `times`.
#[must_use]
pub fn parse_run_output(text: &str) -> RunStats {
    let mut stats = RunStats::default();
    let mut last_hash = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.executions = n.trim().parse().ok().or(stats.executions);
        }
        if let Some(rest) = line.strip_prefix('#') {
            let number: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = number.parse::<u64>() {
                last_hash = Some(n);
                if let Some(cov) = field(line, "cov:") {
                    stats.coverage = Some(cov);
                    stats.features = field(line, "ft:").or(stats.features);
                    stats.corpus = field(line, "corp:").or(stats.corpus);
                }
            }
        }
        if let Some(cpu) = parse_times_line(line) {
            stats.cpu_seconds = Some(cpu);
        }
    }
    stats.executions = stats.executions.or(last_hash);
    stats
}

/// The number after `name` in a libFuzzer status line (`corp: 12/345b` gives 12).
fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.split(name).nth(1)?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The seconds in one line of the shell's `times` (`0m1.500s 0m0.250s`: user and system), summed.
fn parse_times_line(line: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut parts = 0;
    for part in line.split_whitespace() {
        let (minutes, seconds) = part.strip_suffix('s')?.split_once('m')?;
        let minutes: u64 = minutes.parse().ok()?;
        let seconds: f64 = seconds.parse().ok()?;
        total += minutes as f64 * 60.0 + seconds;
        parts += 1;
    }
    (parts == 2).then_some(total)
}

/// Whether an artifact libFuzzer wrote is a finding (`crash-`, `timeout-`, `leak-`, `oom-`), not a
/// `slow-unit-` report.
#[must_use]
pub fn is_finding(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    ["crash-", "timeout-", "leak-", "oom-"].iter().any(|p| name.starts_with(p))
}

/// The summary as a table, one row per target.
#[must_use]
pub fn table(rows: &[Row]) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut out = format!(
        "{:<18} {:>7} {:>7} {:>14} {:>7} {:>8} {:>7} {:>8}\n",
        "target", "minutes", "cpu min", "executions", "cov", "features", "corpus", "findings"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<18} {:>7.1} {:>7.1} {:>14} {:>7} {:>8} {:>7} {:>8}",
            r.target,
            r.minutes,
            r.cpu_minutes,
            r.executions,
            opt(r.coverage),
            opt(r.features),
            opt(r.corpus),
            r.findings
        );
    }
    out
}

/// A unit of soak work.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Job {
    Fuzz { project: &'static str, target: String },
    Stress { executable: PathBuf },
}

impl Job {
    fn name(&self) -> &str {
        match self {
            Job::Fuzz { target, .. } => target,
            Job::Stress { .. } => STRESS,
        }
    }
}

/// `cargo xtask soak`: the targets named in `only` (every target when it is empty) for `minutes` each,
/// `jobs` at once, fuzz targets built with `sanitizer`.
///
/// # Errors
/// If a build fails, a target name is unknown, the summary cannot be written, or anything was found
/// (after the summary is printed).
pub fn run(only: &[String], minutes: u64, jobs: usize, sanitizer: Sanitizer) -> Result<()> {
    fuzz::ensure_cargo_fuzz()?;
    let toolchain = Toolchain::detect();
    let known = fuzz::all_targets(&toolchain)?;
    let names: Vec<&str> = known.iter().map(|(_, t)| t.as_str()).chain([STRESS]).collect();
    if let Some(name) = only.iter().find(|n| !names.contains(&n.as_str())) {
        bail!("no soak target `{name}`; the targets are: {}", names.join(", "));
    }
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut queue = Vec::new();
    for project in fuzz::PROJECTS {
        if known.iter().any(|(p, t)| *p == project && wanted(t)) {
            fuzz::build_project(&toolchain, project, sanitizer)?;
        }
    }
    queue.extend(
        known.into_iter().filter(|(_, t)| wanted(t)).map(|(project, target)| Job::Fuzz { project, target }),
    );
    if wanted(STRESS) {
        queue.push(Job::Stress { executable: build_stress()? });
    }
    let dir = cmd::repo_root().join("target/soak");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let summary = dir.join("summary.json");
    let budget = Duration::from_secs(minutes * 60);
    println!(
        "soak: {} targets for {minutes} min each, {jobs} at once; logs in {}",
        queue.len(),
        dir.display()
    );

    let queue = Mutex::new(queue.into_iter().rev().collect::<Vec<_>>());
    let rows: Mutex<Vec<Row>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let Some(job) = queue.lock().expect("not poisoned").pop() else { break };
                    let name = job.name().to_owned();
                    println!("soak: {name} started");
                    let result = match &job {
                        Job::Fuzz { project, target } => {
                            soak_fuzz(&toolchain, (project, target), budget, sanitizer, &dir)
                        }
                        Job::Stress { executable } => soak_stress(executable, budget, &dir),
                    };
                    match result {
                        Ok(row) => {
                            println!(
                                "soak: {name} done: {} executions in {:.1} min ({:.1} CPU min), {} findings",
                                row.executions, row.minutes, row.cpu_minutes, row.findings
                            );
                            let mut rows = rows.lock().expect("not poisoned");
                            rows.push(row);
                            if let Err(e) = write_summary(&summary, &rows) {
                                failures.lock().expect("not poisoned").push(format!("{e:#}"));
                            }
                        }
                        Err(e) => {
                            println!("soak: {name} could not run: {e:#}");
                            failures.lock().expect("not poisoned").push(format!("{name}: {e:#}"));
                        }
                    }
                }
            });
        }
    });
    let rows = rows.into_inner().expect("not poisoned");
    print!("{}", table(&rows));
    println!("summary written to {}", summary.display());
    let mut failures = failures.into_inner().expect("not poisoned");
    for r in rows.iter().filter(|r| r.findings > 0) {
        failures.push(format!("{}: {} findings: {}", r.target, r.findings, r.finding_files.join(", ")));
    }
    if !failures.is_empty() {
        bail!("the soak found problems:\n{}", failures.join("\n"));
    }
    Ok(())
}

fn write_summary(path: &Path, rows: &[Row]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows).context("cannot serialize the summary")?;
    std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// `sh -c` running `inner` with its output appended to `log`, then the shell's `times` (the CPU time of
/// the children it waited for) into the same log; the exit status is `inner`'s.
fn with_cpu_times(inner: &Command, log: &Path) -> Result<Command> {
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(r#""$@"; status=$?; times; exit $status"#).arg("sh");
    sh.arg(inner.get_program()).args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => sh.env(key, value),
            None => sh.env_remove(key),
        };
    }
    if let Some(dir) = inner.get_current_dir() {
        sh.current_dir(dir);
    }
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone().with_context(|| format!("cannot reopen {}", log.display()))?;
    sh.stdin(Stdio::null()).stdout(out).stderr(err);
    Ok(sh)
}

/// The log's text from byte `from` on (lossy: libFuzzer may print raw input bytes).
fn read_from(log: &Path, from: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn soak_fuzz(
    toolchain: &Toolchain,
    (project, target): (&str, &str),
    budget: Duration,
    sanitizer: Sanitizer,
    dir: &Path,
) -> Result<Row> {
    let (corpus, artifacts) = fuzz::target_dirs(target)?;
    let log = dir.join(format!("{target}.log"));
    std::fs::write(&log, "").with_context(|| format!("cannot write {}", log.display()))?;
    let before = fuzz::list_files(&artifacts);
    let mut row = Row { target: target.to_owned(), kind: "fuzz", ..Row::default() };
    let started = Instant::now();
    let mut cpu = 0.0;
    loop {
        let left = budget.saturating_sub(started.elapsed());
        let dirs = (corpus.as_path(), artifacts.as_path());
        let inner = fuzz::run_command(
            toolchain,
            (project, target),
            left.as_secs().max(1),
            sanitizer,
            dirs,
            &["-print_final_stats=1"],
        );
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut sh = with_cpu_times(&inner, &log)?;
        let status = sh.status().with_context(|| format!("cannot start `{}`", cmd::display(&inner)))?;
        let stats = parse_run_output(&read_from(&log, from));
        row.executions = row.executions.saturating_add(stats.executions.unwrap_or(0));
        row.coverage = stats.coverage.or(row.coverage);
        row.features = stats.features.or(row.features);
        row.corpus = stats.corpus.or(row.corpus);
        cpu += stats.cpu_seconds.unwrap_or(0.0);
        let found: Vec<PathBuf> = fuzz::list_files(&artifacts)
            .into_iter()
            .filter(|f| !before.contains(f) && is_finding(f))
            .collect();
        row.findings = found.len() as u64;
        row.finding_files = found
            .iter()
            .map(|f| {
                format!(
                    "{} (replay: {})",
                    f.display(),
                    fuzz::replay_line(toolchain, project, target, sanitizer, f)
                )
            })
            .collect();
        if status.success() {
            break;
        }
        if stats.executions.is_none() && found.is_empty() {
            bail!("`{}` failed ({status}) before fuzzing; see {}", cmd::display(&inner), log.display());
        }
        if found.len() >= MAX_FINDINGS || budget.saturating_sub(started.elapsed()) < MIN_RESTART {
            break;
        }
        println!("soak: {target} found {} (restarting for the time left)", found.len());
    }
    row.minutes = started.elapsed().as_secs_f64() / 60.0;
    row.cpu_minutes = cpu / 60.0;
    Ok(row)
}

/// Builds the stress test (release) and returns its executable.
fn build_stress() -> Result<PathBuf> {
    let mut cargo = cmd::cargo();
    cargo.args(["test", "--release", "-p", "tdp-mock", "--test", STRESS, "--no-run"]);
    cargo.arg("--message-format=json-render-diagnostics").stderr(Stdio::inherit());
    let line = cmd::display(&cargo);
    println!("$ {line}");
    let output = cargo.output().with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!("`{line}` failed: {}", output.status);
    }
    stress_executable(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("`{line}` named no executable for the {STRESS} test"))
}

/// The test executable of [`STRESS`] in cargo's JSON messages.
fn stress_executable(messages: &str) -> Option<PathBuf> {
    messages.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find_map(|m| {
        let is_stress = m["reason"] == "compiler-artifact" && m["target"]["name"] == STRESS;
        m["executable"].as_str().filter(|_| is_stress).map(PathBuf::from)
    })
}

fn soak_stress(executable: &Path, budget: Duration, dir: &Path) -> Result<Row> {
    let log = dir.join(format!("{STRESS}.run.log"));
    let mut row = Row { target: STRESS.to_owned(), kind: "stress", ..Row::default() };
    let started = Instant::now();
    let mut cpu = 0.0;
    while started.elapsed() < budget {
        std::fs::write(&log, "").with_context(|| format!("cannot write {}", log.display()))?;
        let mut inner = Command::new(executable);
        inner.current_dir(cmd::repo_root().join("crates/tdp-mock"));
        let mut sh = with_cpu_times(&inner, &log)?;
        sh.process_group(0);
        let mut child = sh.spawn().with_context(|| format!("cannot start {}", executable.display()))?;
        let run_started = Instant::now();
        let outcome = loop {
            if let Some(status) = child.try_wait().context("cannot wait for the stress run")? {
                break Some(status);
            }
            if run_started.elapsed() > STRESS_RUN_LIMIT {
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let failed = match outcome {
            Some(status) => (!status.success()).then(|| format!("exit {status}")),
            None => {
                // The shell leads its own process group (below): kill the group, the test with it.
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
                let _ = child.kill();
                let _ = child.wait();
                Some(format!("hung: killed after {} s", STRESS_RUN_LIMIT.as_secs()))
            }
        };
        row.executions = row.executions.saturating_add(1);
        cpu += parse_run_output(&read_from(&log, 0)).cpu_seconds.unwrap_or(0.0);
        if let Some(why) = failed {
            row.findings = row.findings.saturating_add(1);
            let kept = dir.join(format!("{STRESS}.failure-{}.log", row.findings));
            // The run's output, then how it ended and when (a run killed from outside leaves no output
            // of its own, not even the shell's `times`).
            let mut text = std::fs::read(&log).unwrap_or_default();
            let ended =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            text.extend_from_slice(
                format!("\nsoak: run {} ended: {why} (unix time {ended})\n", row.executions).as_bytes(),
            );
            std::fs::write(&kept, text).with_context(|| format!("cannot keep {}", kept.display()))?;
            row.finding_files.push(format!("{} ({why})", kept.display()));
        }
    }
    row.minutes = started.elapsed().as_secs_f64() / 60.0;
    row.cpu_minutes = cpu / 60.0;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_and_jobs_are_checked() {
        assert_eq!(parse_minutes("60"), Ok(60));
        assert!(parse_minutes("0").unwrap_err().contains("at least 1"));
        assert!(parse_minutes("1.5").unwrap_err().contains("`1.5`"));
        assert!(parse_minutes("99999999").unwrap_err().contains("week"));
        assert_eq!(parse_jobs("2"), Ok(2));
        assert!(parse_jobs("0").is_err());
        assert!(parse_jobs("65").unwrap_err().contains("65"));
        assert!(parse_jobs("two").unwrap_err().contains("`two`"));
    }

    const LIBFUZZER: &str = "\
INFO: Seed: 1234
#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb
#4096\tpulse  cov: 250 ft: 800 corp: 90/4Kb lim: 43 exec/s: 2048 rss: 40Mb
#5000\tNEW    cov: 251 ft: 802 corp: 91/4Kb lim: 43 exec/s: 2500 rss: 40Mb L: 7/40 MS: 1 ChangeBit-
#812345\tDONE   cov: 260 ft: 850 corp: 95/5Kb lim: 4096 exec/s: 13539 rss: 60Mb
Done 812345 runs in 61 second(s)
stat::number_of_executed_units: 812346
stat::average_exec_per_sec:     13539
0m0.004s 0m0.001s
1m1.500s 0m2.250s
";

    #[test]
    fn the_final_stats_and_the_last_status_line_are_read() {
        let stats = parse_run_output(LIBFUZZER);
        assert_eq!(stats.executions, Some(812_346));
        assert_eq!((stats.coverage, stats.features, stats.corpus), (Some(260), Some(850), Some(95)));
        let cpu = stats.cpu_seconds.unwrap();
        assert!((cpu - 63.75).abs() < 1e-9, "{cpu}");
    }

    #[test]
    fn a_crash_without_final_stats_counts_the_last_numbered_line() {
        let crashed = "#4096\tpulse  cov: 250 ft: 800 corp: 90/4Kb exec/s: 2048\n\
                       ==1== ERROR: libFuzzer: deadly signal\nMS: 2 ChangeByte-; base unit: 00\n";
        let stats = parse_run_output(crashed);
        assert_eq!(stats.executions, Some(4096));
        assert_eq!(stats.coverage, Some(250));
        assert_eq!(stats.cpu_seconds, None);
        assert_eq!(parse_run_output("error: no such target\n"), RunStats::default());
    }

    #[test]
    fn only_crashes_hangs_leaks_and_ooms_are_findings() {
        for name in ["crash-ab12", "timeout-00", "leak-1", "oom-2"] {
            assert!(is_finding(Path::new(name)), "{name}");
        }
        assert!(!is_finding(Path::new("/t/slow-unit-ab")));
    }

    #[test]
    fn the_table_has_a_row_per_target_and_dashes_for_the_stress() {
        let rows = [
            Row {
                target: "mmu_ops".into(),
                kind: "fuzz",
                minutes: 60.0,
                cpu_minutes: 30.5,
                executions: 1_000_000,
                coverage: Some(2000),
                features: Some(9000),
                corpus: Some(1500),
                findings: 0,
                finding_files: vec![],
            },
            Row { target: STRESS.into(), kind: "stress", executions: 42, findings: 1, ..Row::default() },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].starts_with("mmu_ops") && lines[1].contains("1000000") && lines[1].contains("9000"));
        assert!(lines[2].starts_with(STRESS) && lines[2].contains(" - ") && lines[2].ends_with('1'), "{t}");
        let json = serde_json::to_value(rows).unwrap();
        assert_eq!(json[0]["coverage"], 2000);
        assert!(json[1]["coverage"].is_null());
    }

    #[test]
    fn the_stress_executable_is_found_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"tdp_mock"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"host_stress"},"executable":"/r/target/release/deps/host_stress-1"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(stress_executable(messages), Some(PathBuf::from("/r/target/release/deps/host_stress-1")));
        assert_eq!(stress_executable("{\"reason\":\"build-finished\"}"), None);
    }
}
