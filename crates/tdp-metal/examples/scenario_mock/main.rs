//! Runs the shared Bochs / mock scenario ([`tdp_metal::scenario::SCENARIO`]) on `tdp-mock` and prints its
//! `TDP-RESULT {json}` line, for `cargo xtask bochs` to compare with the Bochs hypervisors'.
//!
//! Usage: `cargo run -p tdp-metal --example scenario_mock -- [--broken ept|npt|age|remap] [--smp]
//! [MODEL]...` (default models: corei7_skylake_x and corei7_sandy_bridge_2600k; AMD models such as ryzen
//! run under NPT). Each model's run uses the dirty-logging mode the hypervisor picks for it; `--broken
//! NAME` makes the mistake of the hypervisor's `broken-NAME` build (`tdp_metal::scenario::Broken`), so the
//! checks must fail; `--smp` runs the two-vCPU part (`tdp_metal::scenario::smp`) instead and prints its
//! `TDP-SMP {json}` line. Exits 1 when a run's checks fail, 2 on a usage or setup error.

mod run;
mod smp;

use std::process::ExitCode;

use tdp_metal::scenario::Broken;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut broken = None;
    let smp = args.iter().any(|a| a == "--smp");
    args.retain(|a| a != "--smp");
    if let Some(at) = args.iter().position(|a| a == "--broken") {
        let name = if at + 1 < args.len() { args.remove(at + 1) } else { String::new() };
        args.remove(at);
        broken = Broken::from_name(&name);
        if broken.is_none() {
            eprintln!("scenario_mock: --broken takes one of ept, npt, age, remap (got `{name}`)");
            return ExitCode::from(2);
        }
    }
    let models = if args.is_empty() {
        vec!["corei7_skylake_x".to_string(), "corei7_sandy_bridge_2600k".to_string()]
    } else {
        args
    };
    let mut failed = false;
    for model in &models {
        let Some(mode) = run::Mode::for_model(model) else {
            eprintln!("scenario_mock: unknown CPU model, or one without EPT or NPT, `{model}`");
            return ExitCode::from(2);
        };
        if smp {
            match smp::run(mode) {
                Ok(seen) => {
                    let mut line = String::new();
                    if tdp_metal::scenario::smp::write_smp_line(&mut line, "mock", model, &seen).is_err() {
                        return ExitCode::from(2);
                    }
                    print!("{line}");
                    let failures = seen.check();
                    eprintln!("scenario_mock: {model}: two vCPUs, failures {failures:?}");
                    failed |= !failures.is_empty();
                }
                Err(e) => {
                    eprintln!("scenario_mock: {model}: {e}");
                    return ExitCode::from(2);
                }
            }
            continue;
        }
        match run::run(model, mode, broken) {
            Ok(result) => {
                print!("{}", result.line);
                let sizes: Vec<usize> = result.seen.harvests.iter().map(|h| h.len()).collect();
                eprintln!("scenario_mock: {model}: harvest sizes {sizes:?}, passed: {}", result.passed());
                failed |= !result.passed();
            }
            Err(e) => {
                eprintln!("scenario_mock: {model}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
