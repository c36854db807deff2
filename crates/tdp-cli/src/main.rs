//! The `tdp` binary: parses the command line and runs the command (see the `tdp_cli` library). Exit
//! codes: 0 success, 1 the command failed, 2 bad arguments.

#![forbid(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use clap::Parser;
use tdp_cli::cli::{Cli, Command};
use tdp_cli::commands;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { commands::EXIT_USAGE } else { commands::EXIT_OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match &cli.command {
        Command::Migrate(args) => commands::migrate_cmd(args),
        Command::Receive(args) => commands::receive_cmd(args),
        Command::DirtyRate(args) => commands::dirty_rate_cmd(args),
    };
    std::process::exit(code);
}
