//! The `tdp` command's library: everything the binary does, as modules the integration tests and doc
//! examples can call.
//!
//! # The command
//! ```text
//! tdp migrate                         # 256 MiB KVM guest, 2 vCPUs, random writes at 64 MiB/s, dirty ring,
//!                                     # pre-copy over loopback TCP at 128 MiB/s, verified by BLAKE3
//! tdp migrate --mode bitmap --pattern hot-set --dirty-rate 20000pages/s --json
//! tdp receive --listen 0.0.0.0:7788   # a destination; the bound address is printed on stderr
//! tdp migrate --to HOST:7788          # send to it
//! tdp dirty-rate --window-ms 1000     # per-vCPU dirty rate, as QEMU's calc-dirty-rate with the ring
//! tdp dirty-rate --mode sampling      # no logging: hash a random sample of pages (QEMU's page-sampling)
//! ```
//! Without a usable `/dev/kvm` (or with `--backend mock`) the guest runs on the tdp-mock machine, and
//! the output says so. Exit codes: 0 success, 1 failure (the message names what failed), 2 bad arguments.
//!
//! # How a migration goes
//! Round 0 sends every page of every memslot; each later round sends what the tracker harvested (each
//! page under its slot) while the previous one was sent (the harvest re-protects the pages before they
//! are read). After each round the source estimates the downtime from the link's measured throughput and
//! the pages left; at the target, or at `--max-rounds`, it pauses the vCPUs, harvests once more and sends
//! the rest (stop-and-copy), then compares the destination's digest of all its memory, every slot, with
//! its own. When the guest dirties faster than the
//! link moves, vCPUs over their quota sleep at their ring-full exits (bitmap: batch exits), as QEMU's
//! dirty-limit. Pages leave the pending set only when the destination acknowledges their round; a
//! broken connection is re-established (`--retries`) and the destination resumes the session.
//!
//! - [`cli`]: the command line (clap); [`commands`]: running `migrate`, `receive`, `dirty-rate`.
//! - [`migrate`]: the pre-copy loop; [`converge`]: when to stop, how hard to throttle.
//! - [`proto`]: the wire protocol; [`link`]: the source's end; [`receiver`]: the destination.
//! - [`guest`]: what a running guest offers; [`kvm`]: a real KVM guest (tdp-guest + tdp-kvm);
//!   [`mock`]: the tdp-mock machine used when `/dev/kvm` is unusable.
//! - [`deadline`]: reads and writes due by a deadline; [`sanitize`]: peer text made printable;
//!   [`hostmem`]: the host's available memory; [`signals`]: SIGINT/SIGTERM as a stop request.
//! - [`pending`]: pages owed to the destination; [`dirty_rate`]; [`units`]: sizes, rates, addresses;
//!   [`output`]: text and JSON reports; [`progress`]: the live progress on stderr.
//!
//! Keeps: I4 end to end (a harvested page reaches the destination or stays pending; the final digest
//! comparison proves it) and I5 for the command line and the network peer.

#![forbid(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

/// `println!` that ignores a closed stdout (`tdp migrate | head` must not panic).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that ignores a closed stdout.
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

pub mod backend;
pub mod cli;
pub mod commands;
pub mod converge;
pub mod deadline;
pub mod dirty_rate;
pub mod guest;
pub mod hostmem;
pub mod kvm;
pub mod link;
pub mod migrate;
pub mod mock;
pub mod output;
pub mod pending;
pub mod progress;
pub mod proto;
pub mod receiver;
pub mod sanitize;
pub mod signals;
pub mod units;
