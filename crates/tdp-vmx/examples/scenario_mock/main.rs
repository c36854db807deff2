//! Runs the shared Bochs / mock scenario ([`tdp_vmx::scenario::SCENARIO`]) on `tdp-mock` and prints its
//! `TDP-RESULT {json}` line, for `cargo xtask bochs` to compare with the Bochs hypervisor's.
//!
//! Usage: `cargo run -p tdp-vmx --example scenario_mock -- [--broken ept|age|remap] [MODEL]...` (default models:
//! corei7_skylake_x and corei7_sandy_bridge_2600k). Each model's run uses the dirty-logging mode the
//! hypervisor picks for it; `--broken NAME` makes the mistake of the hypervisor's `broken-NAME` build
//! (`tdp_vmx::scenario::Broken`), so the checks must fail. Exits 1 when a run's checks fail, 2 on a usage or setup error.

mod run;

use std::process::ExitCode;

use tdp_vmx::scenario::Broken;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut broken = None;
    if let Some(at) = args.iter().position(|a| a == "--broken") {
        let name = if at + 1 < args.len() { args.remove(at + 1) } else { String::new() };
        args.remove(at);
        broken = Broken::from_name(&name);
        if broken.is_none() {
            eprintln!("scenario_mock: --broken takes one of ept, age, remap (got `{name}`)");
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
            eprintln!("scenario_mock: unknown or EPT-less CPU model `{model}`");
            return ExitCode::from(2);
        };
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
