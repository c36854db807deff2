//! The command line: `tdp migrate`, `tdp receive`, `tdp dirty-rate`, their arguments (parsed and
//! range-checked with messages that name the argument) and the code that runs each command and prints
//! its report (text, or one JSON object with `--json`).
//!
//! Exit codes: 0 success; 1 the command failed (migration error, digest mismatch, guest failure);
//! 2 bad arguments.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::backend::Backend;
use crate::guest::{GuestConfig, Mode, Pattern};
use crate::units::{
    MIB, PAGE_SIZE, Rate, UnitError, check_range, human_bytes, parse_addr, parse_rate, parse_size,
};

/// The smallest guest: 16 pages.
pub const MIN_MEMORY: u64 = 16 * PAGE_SIZE;
/// The largest KVM guest: `tdp-guest`'s data region (508 GiB). Below it, what the host can hold is the
/// limit, checked against `MemAvailable` when the command starts (twice the guest with the loopback
/// destination, which holds a copy).
pub const MAX_MEMORY: u64 = tdp_guest::layout::MAX_DATA_PAGES * PAGE_SIZE;
/// Pages each vCPU writes per batch; the guest is paused and paced only between batches.
pub const BATCH_PAGES: u64 = crate::kvm::BATCH;
/// Default KVM guest memory.
pub const DEFAULT_MEMORY: u64 = 256 * MIB;
/// The default link cap, QEMU's default max-bandwidth: 128 MiB/s.
pub const DEFAULT_BANDWIDTH: Rate = Rate { pages_per_sec: 128 * MIB / PAGE_SIZE };
/// Default mock guest memory (the model is far slower than hardware).
pub const DEFAULT_MOCK_MEMORY: u64 = 32 * MIB;

/// `tdp`: live-migrate a guest's memory with KVM's dirty ring or dirty bitmap, measure dirty rates.
#[derive(Debug, Parser)]
#[command(name = "tdp", version, about, long_about = None)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest that dirties memory and live-migrate it by pre-copy to a destination over TCP.
    Migrate(MigrateArgs),
    /// Be a migration destination: serve migrations (one with --once) and verify each.
    Receive(ReceiveArgs),
    /// Measure a guest's dirty rate per vCPU over a window.
    DirtyRate(DirtyRateArgs),
}

/// What guest to run.
#[derive(Debug, Clone, Args)]
pub struct GuestArgs {
    /// Guest memory, e.g. 256M or 2G [default: 256M on KVM, 32M on the mock]. On KVM: 64 KiB to 508
    /// GiB and what the host has available (`tdp migrate` without --to needs twice: the loopback
    /// destination holds a copy); on the mock: 64 KiB to 1 GiB.
    #[arg(long, value_parser = size_arg, allow_hyphen_values = true)]
    pub memory: Option<u64>,
    /// vCPUs (1 to 31).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=31))]
    pub vcpus: u16,
    /// How the guest picks the pages it writes.
    #[arg(long, value_enum, default_value = "random")]
    pub pattern: Pattern,
    /// The guest's dirty rate over all vCPUs: e.g. 64MiB/s or 20000pages/s; `max` for as fast as it can.
    /// At least 64 pages/s per vCPU: each vCPU writes batches of 64 pages and is paused only between
    /// them, so a slower batch would hold a pause past its deadline.
    #[arg(long, default_value = "64MiB/s", value_parser = rate_or_max, allow_hyphen_values = true)]
    pub dirty_rate: Rate,
    /// How dirty pages are tracked: the dirty ring, the bitmap (get-and-clear) or the bitmap with
    /// clear-log; `tdp dirty-rate` also takes `sampling` (no logging: QEMU's page-sampling mode).
    #[arg(long, value_enum, default_value = "ring")]
    pub mode: Mode,
    /// Dirty ring entries per vCPU (a power of two, 512 to 65536). Small rings exit often, which is
    /// where the dirty limit throttles.
    #[arg(long, default_value_t = 1024)]
    pub ring_entries: u32,
    /// Which machine runs the guest: KVM when usable else the mock (auto), KVM only, or the mock.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Write whole pages (every word) instead of the iteration number and the vCPU's tag only.
    #[arg(long)]
    pub fill: bool,
    /// The KVM device (tests name a missing one to exercise the fallback to the mock).
    #[arg(long, hide = true, default_value = "/dev/kvm")]
    pub kvm_device: std::path::PathBuf,
}

/// `tdp migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Send to a running `tdp receive` at HOST:PORT instead of a loopback receiver started here.
    #[arg(long, value_parser = dest_arg)]
    pub to: Option<std::net::SocketAddr>,
    /// The most pre-copy rounds after the bulk copy before stop-and-copy is forced.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub max_rounds: u32,
    /// The downtime target in ms: stop-and-copy once the pages left can be sent within it.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub downtime_ms: u64,
    /// Throttle vCPUs whose dirtying outruns the link (QEMU's dirty-limit).
    #[arg(long, value_enum, default_value = "on")]
    pub dirty_limit: OnOff,
    /// A fixed per-vCPU dirty quota for the throttle (e.g. 4MiB/s) instead of the computed one.
    #[arg(long, value_parser = rate_arg, allow_hyphen_values = true)]
    pub vcpu_dirty_limit: Option<Rate>,
    /// Limit the link to this rate, as QEMU's max-bandwidth (whose default this is); `max` for no limit.
    /// At least 64 pages/s (256 KiB/s), one run of pages a second.
    #[arg(long, default_value = "128MiB/s", value_parser = rate_or_max, allow_hyphen_values = true)]
    pub bandwidth: Rate,
    /// Times a broken connection is re-established before the migration fails (the destination resumes
    /// the session; the pages owed, the failed round's included, are sent again).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `tdp receive`.
#[derive(Debug, Clone, Args)]
pub struct ReceiveArgs {
    /// Address to listen on, HOST:PORT (port 0: any free port; the bound address is printed on stderr).
    #[arg(long, value_parser = listen_arg)]
    pub listen: std::net::SocketAddr,
    /// The most guest memory to accept (each session is also checked against the memory the host has
    /// available when it opens).
    #[arg(long, default_value = "16G", value_parser = size_arg, allow_hyphen_values = true)]
    pub max_memory: u64,
    /// Seconds a session's source has for each message (waiting for it included; a trickle cannot
    /// stretch it), and to reconnect after a lost connection.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout_s: u64,
    /// Seconds a new connection has to send a complete, valid Hello.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub handshake_timeout_s: u64,
    /// The most connections served at once; further ones are closed as soon as they are accepted.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_connections: u16,
    /// Exit after one session (0 if its memory matched the source's, else 1), as a script wants;
    /// without it the receiver serves session after session until it is stopped.
    #[arg(long)]
    pub once: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Test hook: exit abruptly after acknowledging this many rounds, as a killed destination would.
    #[arg(long, hide = true)]
    pub exit_after_rounds: Option<u32>,
    /// Test hook: drop the connection once after acknowledging this many rounds, keeping the session.
    #[arg(long, hide = true)]
    pub drop_after_rounds: Option<u32>,
    /// Test hook: flip a byte of page PAGE of memslot SLOT (`SLOT:PAGE`) before the digest, so the
    /// source must report a mismatch.
    #[arg(long, hide = true, value_parser = slot_page_arg)]
    pub corrupt_page: Option<(u32, u64)>,
}

/// `tdp dirty-rate`.
#[derive(Debug, Clone, Args)]
pub struct DirtyRateArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// The measuring window in ms.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub window_ms: u64,
    /// With `--mode sampling`: pages sampled per GiB of guest memory (QEMU's `sample-pages`, default
    /// 512), at least one per memslot; 262144 samples every page.
    #[arg(long, default_value_t = crate::dirty_rate::DEFAULT_SAMPLE_PAGES_PER_GIB,
          value_parser = clap::value_parser!(u32).range(1..=262_144))]
    pub sample_pages: u32,
    /// With `--mode sampling`: the seed of the sample (default: from the clock), to repeat a measurement.
    #[arg(long)]
    pub sample_seed: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

fn size_arg(s: &str) -> Result<u64, UnitError> {
    parse_size("size", s)
}
fn rate_arg(s: &str) -> Result<Rate, UnitError> {
    let r = parse_rate("rate", s)?;
    if r.pages_per_sec == 0 {
        return Err(UnitError::Range {
            what: "rate",
            value: s.to_owned(),
            why: "must be at least one page (4 KiB) per second".into(),
        });
    }
    Ok(r)
}
fn rate_or_max(s: &str) -> Result<Rate, UnitError> {
    if matches!(s.trim().to_ascii_lowercase().as_str(), "max" | "unlimited") {
        return Ok(Rate { pages_per_sec: 0 });
    }
    rate_arg(s)
}
/// `SLOT:PAGE`, two unsigned decimal numbers.
fn slot_page_arg(s: &str) -> Result<(u32, u64), UnitError> {
    let syntax = || UnitError::Syntax { what: "--corrupt-page", text: s.to_owned(), expected: "SLOT:PAGE" };
    let (slot, page) = s.split_once(':').ok_or_else(syntax)?;
    Ok((slot.trim().parse().map_err(|_| syntax())?, page.trim().parse().map_err(|_| syntax())?))
}
fn dest_arg(s: &str) -> Result<std::net::SocketAddr, UnitError> {
    parse_addr("destination", s, false)
}
fn listen_arg(s: &str) -> Result<std::net::SocketAddr, UnitError> {
    parse_addr("listen address", s, true)
}

impl GuestArgs {
    /// The guest configuration for KVM and for the mock (which defaults to less memory), after the
    /// range checks clap cannot express.
    ///
    /// ```
    /// use clap::Parser;
    /// use tdp_cli::cli::{Cli, Command};
    /// let cli = Cli::try_parse_from(["tdp", "dirty-rate", "--memory", "64M", "--vcpus", "3"]).unwrap();
    /// let Command::DirtyRate(args) = cli.command else { unreachable!() };
    /// let (kvm, mock) = args.guest.configs().unwrap();
    /// assert_eq!((kvm.memory, kvm.vcpus, mock.memory), (64 << 20, 3, 64 << 20));
    /// ```
    ///
    /// # Errors
    /// [`UnitError::Range`] for memory outside 64 KiB..=508 GiB (1 GiB on the mock), a memory size not
    /// a multiple of 4 KiB, a dirty rate below what the guest can honour, or a bad ring size.
    pub fn configs(&self) -> Result<(GuestConfig, GuestConfig), UnitError> {
        let memory = self.memory.unwrap_or(DEFAULT_MEMORY);
        let mock_memory = self.memory.unwrap_or(DEFAULT_MOCK_MEMORY);
        if self.backend == Backend::Mock {
            let max = crate::mock::MAX_MOCK_MEMORY;
            check_range("--memory (on the mock)", mock_memory, MIN_MEMORY, max, human_bytes)?;
        } else {
            check_range("--memory (on KVM)", memory, MIN_MEMORY, MAX_MEMORY, human_bytes)?;
        }
        if !memory.is_multiple_of(PAGE_SIZE) {
            return Err(UnitError::Range {
                what: "--memory",
                value: human_bytes(memory),
                why: "must be a multiple of 4 KiB".into(),
            });
        }
        let vcpus = u64::from(self.vcpus);
        if memory / PAGE_SIZE < vcpus {
            let why = format!("each of the {vcpus} vCPUs needs at least one page of its own");
            return Err(UnitError::Range { what: "--memory", value: human_bytes(memory), why });
        }
        let rate = self.dirty_rate.pages_per_sec;
        let min_rate = vcpus * BATCH_PAGES;
        if rate != 0 && rate < min_rate {
            let why = format!(
                "must be at least {min_rate} pages/s with {vcpus} vCPUs (or `max`): each vCPU writes \
                 batches of {BATCH_PAGES} pages and can be paused only between batches, so a slower \
                 rate would hold a pause for more than a second; use fewer vCPUs for a lower rate"
            );
            return Err(UnitError::Range { what: "--dirty-rate", value: format!("{rate} pages/s"), why });
        }
        let e = self.ring_entries;
        if !e.is_power_of_two() || !(512..=65536).contains(&e) {
            return Err(UnitError::Range {
                what: "--ring-entries",
                value: e.to_string(),
                why: "must be a power of two from 512 to 65536".into(),
            });
        }
        let cfg = GuestConfig {
            memory,
            vcpus: usize::from(self.vcpus),
            pattern: self.pattern,
            rate_pages: self.dirty_rate.pages_per_sec,
            mode: self.mode,
            ring_entries: e,
            fill: self.fill,
        };
        // With `auto` the mock may stand in for KVM: it refuses memory over its limit when it starts.
        Ok((cfg, GuestConfig { memory: mock_memory, ..cfg }))
    }
}

impl MigrateArgs {
    /// Checks what clap cannot: a migration needs dirty logging (not `--mode sampling`), a fixed vCPU
    /// quota needs the dirty limit on, and a link cap must carry a full run of pages (one frame) every
    /// second.
    ///
    /// # Errors
    /// [`UnitError::Range`] naming the conflicting flags or the value.
    pub fn check(&self) -> Result<(), UnitError> {
        if self.guest.mode == Mode::Sampling {
            return Err(UnitError::Range {
                what: "--mode",
                value: "sampling".into(),
                why: "sampling only measures a dirty rate (tdp dirty-rate): a migration must know every \
                      page dirtied, so use ring, bitmap or clear-log"
                    .into(),
            });
        }
        let run = u64::from(crate::proto::MAX_RUN);
        let bw = self.bandwidth.pages_per_sec;
        if bw != 0 && bw < run {
            return Err(UnitError::Range {
                what: "--bandwidth",
                value: self.bandwidth.to_string(),
                why: format!(
                    "must be at least {run} pages/s (256 KiB/s) or `max`: pages travel in runs of up to \
                     {run}, and a slower link would leave the destination waiting longer than a second \
                     between frames (and past its idle timeout below about 1 page/s)"
                ),
            });
        }
        if self.dirty_limit == OnOff::Off
            && let Some(q) = self.vcpu_dirty_limit
        {
            return Err(UnitError::Range {
                what: "--vcpu-dirty-limit",
                value: q.to_string(),
                why: "conflicts with --dirty-limit off: the quota is what the dirty limit enforces, and \
                      it is off; drop one of the two"
                    .into(),
            });
        }
        Ok(())
    }

    /// The bandwidth cap in bytes/s (`None`: unlimited).
    #[must_use]
    pub fn bandwidth_bytes(&self) -> Option<u64> {
        self.bandwidth.pages_per_sec.checked_mul(PAGE_SIZE).filter(|&b| b > 0)
    }

    /// The convergence policy.
    #[must_use]
    pub fn policy(&self) -> crate::converge::Policy {
        crate::converge::Policy {
            max_rounds: self.max_rounds,
            downtime_target: Duration::from_millis(self.downtime_ms),
            dirty_limit: self.dirty_limit == OnOff::On,
            vcpu_quota: self.vcpu_dirty_limit.map(|r| r.pages_per_sec),
        }
    }
}
