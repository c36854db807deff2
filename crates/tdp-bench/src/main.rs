//! `tdp-bench`: runs every comparison of the benchmark suite in one process, prints the table and the
//! targets, and writes `target/bench/summary.json` (see `docs/benchmarks.md`). Build it in release mode:
//! `cargo run --release -p tdp-bench -- [--quick]`, or `cargo xtask bench [--quick]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use clap::builder::PossibleValuesParser;
use tdp_bench::suite::{self, Config};
use tdp_bench::{plot, report};

/// Benchmarks tdp-core against x86_64's OffsetPageTable, the rtrb queue and memory-sweep limits.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Fewer repetitions (5 instead of 31) and fewer 2 MiB faults per repetition.
    #[arg(long)]
    quick: bool,
    /// Override the number of recorded repetitions per comparison.
    #[arg(long)]
    reps: Option<usize>,
    /// Run only these groups (comma-separated): fault_4k, fault_2m, zap_range, zap_all, metadata, ring,
    /// enable_logging, aging, recover_huge, eager_split, harvest, ...
    #[arg(long, value_delimiter = ',', value_parser = PossibleValuesParser::new(suite::GROUPS))]
    only: Vec<String>,
    /// Where to write the JSON summary [default: <workspace>/target/bench/summary.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to draw the harvest-cost plot when the harvest group runs
    /// [default: <workspace>/docs/img/harvest_vs_memory.svg].
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn workspace() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().nth(2).map_or(manifest.clone(), PathBuf::from)
}

fn default_out() -> PathBuf {
    workspace().join("target").join("bench").join("summary.json")
}

fn default_plot() -> PathBuf {
    workspace().join("docs").join("img").join("harvest_vs_memory.svg")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let start = Instant::now();
    let mut cfg = if args.quick { Config::QUICK } else { Config::FULL };
    if let Some(reps) = args.reps {
        cfg.reps = reps.max(1);
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: tdp-bench built without optimizations; figures mean nothing (use --release)");
    }
    let mode = if args.quick { "quick" } else { "full" };
    eprintln!("tdp-bench: {mode} run, {} rounds per comparison (median), {} warm-up", cfg.reps, cfg.warmup);
    let outcome = suite::run(
        &cfg,
        |group| args.only.is_empty() || args.only.iter().any(|g| g == group),
        |what| eprintln!("  measuring {what} ..."),
    );

    println!();
    print!("{}", report::table(&outcome.rows));
    println!();
    for note in &outcome.notes {
        println!("note: {note}");
    }
    for line in report::targets(&outcome.rows) {
        println!("{line}");
    }
    let out = args.out.unwrap_or_else(default_out);
    if let Err(e) = report::write_json(&outcome.rows, &out) {
        eprintln!("tdp-bench: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    if let Some(series) = &outcome.harvest {
        let plot = args.plot.clone().unwrap_or_else(default_plot);
        if let Err(e) = plot::harvest_vs_memory(series, &plot) {
            eprintln!("tdp-bench: cannot draw {}: {e}", plot.display());
            return ExitCode::FAILURE;
        }
        println!("drew {}", plot.display());
    }
    let plot_dir = args
        .plot
        .as_ref()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| default_plot().parent().map_or_else(|| PathBuf::from("."), PathBuf::from));
    for (name, chart) in &outcome.charts {
        let path = plot_dir.join(name);
        if let Err(e) = plot::lines(chart, &path) {
            eprintln!("tdp-bench: cannot draw {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("drew {}", path.display());
    }
    println!(
        "wrote {} ({} rows) in {:.1} s",
        out.display(),
        outcome.rows.len(),
        start.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
