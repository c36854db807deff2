//! The `tdp` command's library: everything the binary does, as modules the integration tests and doc
//! examples can call.
//!
//! - [`cli`]: the command line (clap); [`commands`]: running `migrate`, `receive`, `dirty-rate`.
//! - [`migrate`]: the pre-copy loop; [`converge`]: when to stop, how hard to throttle.
//! - [`proto`]: the wire protocol; [`link`]: the source's end; [`receiver`]: the destination.
//! - [`guest`]: what a running guest offers; [`kvm`]: a real KVM guest (tdp-guest + tdp-kvm);
//!   [`mock`]: the tdp-mock machine used when `/dev/kvm` is unusable.
//! - [`pending`]: pages owed to the destination; [`dirty_rate`]; [`units`]: sizes, rates, addresses;
//!   [`output`]: text and JSON reports.
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
pub mod dirty_rate;
pub mod guest;
pub mod kvm;
pub mod link;
pub mod migrate;
pub mod mock;
pub mod output;
pub mod pending;
pub mod proto;
pub mod receiver;
pub mod units;
