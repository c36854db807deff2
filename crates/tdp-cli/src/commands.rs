//! Running each command: start the guest (KVM or the mock), the destination (a loopback receiver on a
//! thread unless `--to` names one), the migration or the measurement, and print the report. Each
//! function returns the process exit code; every failure is printed as one `error:` line naming what
//! failed, with the state it left (for a migration: whether the source guest still runs).

use std::net::TcpListener;
use std::time::Duration;

use crate::backend;
use crate::cli::{DirtyRateArgs, MigrateArgs, ReceiveArgs};
use crate::guest::Guest;
use crate::link::Link;
use crate::migrate::{MigrationFailure, Options, migrate};
use crate::output::{self, Bar, GuestSummary, MigrateJson};
use crate::receiver::{self, ReceiverConfig};

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: the command failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad arguments.
pub const EXIT_USAGE: i32 = 2;

fn usage(e: impl std::fmt::Display) -> i32 {
    eprintln!("error: {e}");
    EXIT_USAGE
}

fn summary(guest: &dyn Guest, fallback: Option<String>, cfg: &crate::guest::GuestConfig) -> GuestSummary {
    GuestSummary {
        backend: guest.backend(),
        fallback,
        machine: guest.describe(),
        memory: cfg.memory,
        slots: guest.slots().to_vec(),
        vcpus: guest.vcpus(),
        pattern: cfg.pattern,
        target_dirty_pages_per_sec: cfg.rate_pages,
        mode: cfg.mode,
        throttle_point: guest.throttle_point(),
    }
}

/// Checks that the host can hold `copies` copies of a KVM guest of `memory` bytes (the mock has its own
/// 1 GiB limit), against `MemAvailable`; when it cannot, the message names the figures.
fn host_can_hold(backend: crate::backend::Backend, memory: u64, copies: u64) -> Result<(), String> {
    if backend == crate::backend::Backend::Mock {
        return Ok(());
    }
    let Some(available) = crate::hostmem::available() else { return Ok(()) };
    let need = memory.saturating_mul(copies);
    if need <= available {
        return Ok(());
    }
    let show = crate::units::human_bytes;
    let what = if copies == 2 {
        format!("the guest and the loopback destination's copy of it need {}", show(need))
    } else {
        format!("the guest needs {}", show(need))
    };
    Err(format!(
        "--memory {}: {what}, but this host has {} available (MemAvailable in /proc/meminfo){}",
        show(memory),
        show(available),
        if copies == 2 { "; send to a destination elsewhere with --to HOST:PORT, or" } else { ";" },
    ) + " use a smaller --memory")
}

/// `tdp migrate`: returns the exit code after printing the report.
///
/// ```
/// use clap::Parser;
/// use tdp_cli::cli::{Cli, Command};
/// let cli = Cli::try_parse_from(["tdp", "migrate", "--backend", "mock", "--memory", "1M", "--json"])?;
/// let Command::Migrate(args) = &cli.command else { return Err("parsed as another command".into()) };
/// assert_eq!(tdp_cli::commands::migrate_cmd(args), tdp_cli::commands::EXIT_OK);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn migrate_cmd(args: &MigrateArgs) -> i32 {
    let (kvm_cfg, mock_cfg) = match args.guest.configs().and_then(|c| args.check().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    // The loopback destination holds a second copy of the guest's memory.
    let copies = if args.to.is_some() { 1 } else { 2 };
    if let Err(e) = host_can_hold(args.guest.backend, kvm_cfg.memory, copies) {
        return usage(e);
    }
    let started =
        match backend::start_with_device(args.guest.backend, &args.guest.kvm_device, kvm_cfg, mock_cfg) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot start the source guest: {e}");
                return EXIT_FAILED;
            }
        };
    let mut guest = started.guest;
    let cfg = if guest.backend() == "mock" { mock_cfg } else { kvm_cfg };
    let summary = summary(guest.as_ref(), started.fallback, &cfg);
    if !args.json {
        if let Some(f) = &summary.fallback {
            crate::say!("note: {f}");
        }
        crate::say!("{}", summary.line(&cfg));
    }

    // The destination: a loopback receiver on a thread, or the one named by --to.
    let bandwidth = args.bandwidth_bytes();
    let (addr, local) = match args.to {
        Some(addr) => (addr, None),
        None => {
            let rcfg = ReceiverConfig {
                log_connections: false,
                ..ReceiverConfig::new(guest.pages() * crate::units::PAGE_SIZE)
            };
            match receiver::spawn_loopback(rcfg) {
                Ok((addr, handle)) => (addr, Some(handle)),
                Err(e) => {
                    eprintln!("error: cannot start the loopback receiver: {e}");
                    return EXIT_FAILED;
                }
            }
        }
    };
    if !args.json {
        let how = if local.is_some() { " (loopback receiver started by this command)" } else { "" };
        crate::say!("destination: {addr}{how}");
        match bandwidth {
            Some(_) if args.bandwidth == crate::cli::DEFAULT_BANDWIDTH => crate::say!(
                "link: capped at {}, the default (QEMU's max-bandwidth); --bandwidth max lifts it",
                args.bandwidth
            ),
            Some(_) => crate::say!("link: capped at {} by --bandwidth", args.bandwidth),
            None => crate::say!("link: not capped (--bandwidth max)"),
        }
    }

    // From here SIGINT and SIGTERM end the migration cleanly instead of killing the process.
    if let Err(e) = crate::signals::install() {
        eprintln!("error: cannot install the SIGINT/SIGTERM handlers: {e}");
        return EXIT_FAILED;
    }
    let mut bar = Bar::new(args.json);
    let opts = Options { policy: args.policy(), retries: args.retries };
    let result = migrate(guest.as_mut(), &mut || Link::connect(addr, bandwidth), opts, &mut bar);
    let notes = bar.finish();
    let dest = addr.to_string();
    match result {
        Ok(report) => {
            let shutdown = guest.shutdown();
            let receiver_result = local.map(|h| h.join());
            if args.json {
                print_migrate_json(&summary, &dest, receiver_result.is_some(), Some(&report), None, &notes);
            } else {
                for n in &notes {
                    crate::say!("{n}");
                }
                crate::say_raw!("{}", output::migration_text(&report));
                if let Some(Ok(Ok(r))) = &receiver_result {
                    crate::say!(
                        "destination: received {} pages in {} rounds into {} pages of memory in {} memslots",
                        r.pages_received,
                        r.rounds,
                        r.pages,
                        r.slots.len()
                    );
                }
            }
            if let Some(Ok(Err(e))) = &receiver_result {
                eprintln!("error: the loopback receiver failed after the migration: {e}");
            }
            if let Err(e) = shutdown {
                eprintln!("error: stopping the source guest after the migration: {e}");
                return EXIT_FAILED;
            }
            if report.verified {
                EXIT_OK
            } else {
                eprintln!("error: the destination's memory differs from the source's (digest mismatch)");
                EXIT_FAILED
            }
        }
        Err(f) => {
            let msg = format!("migration failed: {}", f.error);
            if args.json {
                print_migrate_json(&summary, &dest, local.is_some(), None, Some((&msg, &f)), &notes);
            } else {
                for n in &notes {
                    crate::say!("{n}");
                }
            }
            let shutdown = guest.shutdown();
            // A loopback receiver saw the source's Error frame and ends; it is not waited for.
            drop(local);
            if let crate::migrate::FailureCause::Interrupted(sig) = f.error {
                eprintln!(
                    "error: migration interrupted by {}: the destination was sent an Error frame, the source guest is shut down ({} pages were still owed after {} completed rounds)",
                    sig.name(),
                    f.pending_pages,
                    f.rounds_done
                );
                return sig.exit_code();
            }
            eprintln!("error: {msg}");
            if f.guest_running {
                eprintln!(
                    "the source guest kept running after the failure: its {} vCPUs {} and wrote {} pages in the next 200 ms; {} pages were still owed to the destination, none lost{} (after {} completed rounds); it is now shut down as tdp migrate exits{}",
                    guest.vcpus(),
                    if f.was_paused { "were resumed" } else { "kept running" },
                    f.dirtied_after,
                    f.pending_pages,
                    if f.given_back { ", given back to the dirty tracker" } else { "" },
                    f.rounds_done,
                    if shutdown.is_ok() { "" } else { " (stopping it failed)" }
                );
            } else {
                eprintln!(
                    "the source guest did NOT run again after the failure ({} pages pending); it is now shut down",
                    f.pending_pages
                );
            }
            EXIT_FAILED
        }
    }
}

fn print_migrate_json(
    summary: &GuestSummary,
    dest: &str,
    loopback: bool,
    report: Option<&crate::migrate::MigrationReport>,
    failure: Option<(&str, &MigrationFailure)>,
    notes: &[String],
) {
    output::print_json(&MigrateJson {
        guest: summary,
        destination: dest.to_owned(),
        loopback_receiver: loopback,
        report,
        error: failure.map(|(m, _)| m.to_owned()),
        guest_running: failure.map(|(_, f)| f.guest_running),
        pending_pages: failure.map(|(_, f)| f.pending_pages),
        notes,
    });
}

/// `tdp receive`: serves migrations, printing a report for each; with `--once` returns the exit code
/// of the first session (0 when its memory matched the source's). Connections that are not sessions
/// are logged on stderr and never end it.
///
/// ```
/// use clap::Parser;
/// use tdp_cli::cli::{Cli, Command};
/// // A port that is taken cannot be listened on: exit code 1 and a message, no panic.
/// let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let addr = taken.local_addr()?.to_string();
/// let cli = Cli::try_parse_from(["tdp", "receive", "--listen", addr.as_str()])?;
/// let Command::Receive(args) = &cli.command else { return Err("parsed as another command".into()) };
/// assert_eq!(tdp_cli::commands::receive_cmd(args), tdp_cli::commands::EXIT_FAILED);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn receive_cmd(args: &ReceiveArgs) -> i32 {
    let listener = match TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return EXIT_FAILED;
        }
    };
    let cfg = ReceiverConfig {
        max_memory: args.max_memory,
        exit_after_rounds: args.exit_after_rounds,
        drop_after_rounds: args.drop_after_rounds,
        corrupt_page: args.corrupt_page,
        idle_timeout: Duration::from_secs(args.idle_timeout_s),
        handshake_timeout: Duration::from_secs(args.handshake_timeout_s),
        max_connections: usize::from(args.max_connections),
        log_connections: true,
    };
    let bound = listener.local_addr();
    let mut server = match bound.and_then(|a| receiver::Server::new(listener, cfg).map(|s| (a, s))) {
        Ok((addr, server)) => {
            eprintln!("tdp receive: listening on {addr}");
            server
        }
        Err(e) => {
            eprintln!("error: cannot set up the listener: {e}");
            return EXIT_FAILED;
        }
    };
    loop {
        let code = match server.next_session() {
            Ok(r) => {
                if args.json {
                    output::print_json(&r);
                } else {
                    crate::say!(
                        "received {} pages into {} of memory ({} memslots) from {} in {} rounds ({} lost connection(s) resumed), {}; digest {}; source verdict: {}",
                        r.pages_received,
                        crate::units::human_bytes(r.pages * crate::units::PAGE_SIZE),
                        r.slots.len(),
                        r.peer,
                        r.rounds,
                        r.reconnects,
                        output::duration(r.elapsed_ms as f64),
                        r.digest,
                        if r.matched { "memory identical" } else { "MISMATCH" }
                    );
                }
                if r.matched { EXIT_OK } else { EXIT_FAILED }
            }
            Err(e) => {
                eprintln!("error: receiving failed: {}", crate::sanitize::escape_control(&e.to_string()));
                EXIT_FAILED
            }
        };
        if args.once {
            return code;
        }
    }
}

/// `tdp dirty-rate`: returns the exit code after printing the report.
///
/// ```
/// use clap::Parser;
/// use tdp_cli::cli::{Cli, Command};
/// let cli = Cli::try_parse_from(["tdp", "dirty-rate", "--backend", "mock", "--memory", "1M", "--window-ms", "50"])?;
/// let Command::DirtyRate(args) = &cli.command else { return Err("parsed as another command".into()) };
/// assert_eq!(tdp_cli::commands::dirty_rate_cmd(args), tdp_cli::commands::EXIT_OK);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn dirty_rate_cmd(args: &DirtyRateArgs) -> i32 {
    let (kvm_cfg, mock_cfg) = match args.guest.configs() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    if let Err(e) = host_can_hold(args.guest.backend, kvm_cfg.memory, 1) {
        return usage(e);
    }
    let mut started =
        match backend::start_with_device(args.guest.backend, &args.guest.kvm_device, kvm_cfg, mock_cfg) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot start the guest: {e}");
                return EXIT_FAILED;
            }
        };
    let cfg = if started.guest.backend() == "mock" { mock_cfg } else { kvm_cfg };
    let summary = summary(started.guest.as_ref(), started.fallback.take(), &cfg);
    let sampling = crate::dirty_rate::Sampling {
        pages_per_gib: u64::from(args.sample_pages),
        seed: args.sample_seed.unwrap_or_else(crate::dirty_rate::clock_seed),
    };
    let report = crate::dirty_rate::measure_with(
        started.guest.as_mut(),
        cfg.mode,
        Duration::from_millis(args.window_ms),
        sampling,
    );
    let shutdown = started.guest.shutdown();
    match report {
        Ok(r) => {
            if args.json {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    guest: &'a GuestSummary,
                    #[serde(flatten)]
                    rate: &'a crate::dirty_rate::DirtyRateReport,
                }
                output::print_json(&Out { guest: &summary, rate: &r });
            } else {
                if let Some(f) = &summary.fallback {
                    crate::say!("note: {f}");
                }
                crate::say!("{}", summary.line(&cfg));
                crate::say_raw!("{}", output::dirty_rate_text(&r));
            }
            match shutdown {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("error: stopping the guest: {e}");
                    EXIT_FAILED
                }
            }
        }
        Err(e) => {
            eprintln!("error: measuring the dirty rate: {e}");
            EXIT_FAILED
        }
    }
}
