//! `xtask`: the project's task runner, as a library the `cargo xtask` binary and the tidy test share.
//!
//! Every task a developer or CI runs goes through `cargo xtask` (an alias in `.cargo/config.toml`), so CI
//! is one cargo command that anyone can run locally; `.ci/run` only changes to the repository root and calls
//! `cargo xtask ci`. Map of the modules:
//! - [`bench`](mod@bench): `cargo xtask bench`, the one-run benchmark of tdp beside its peers.
//! - [`bochs`]: `cargo xtask bochs`, the bare-metal hypervisor under Bochs compared with tdp-mock.
//! - [`ci`]: the ordered CI steps and the step runner that fails fast and names the failing step.
//! - [`compat`]: the compat VMMs on kvm-ioctls 0.19, 0.22 and 0.25 (own workspaces under `compat/`), and
//!   the check that tdp-kvm's fd API pulls in no kvm-ioctls.
//! - [`cmd`]: running child commands with their command line echoed, and finding the repository root.
//! - [`hygiene`]: crate hygiene of the publishable crates: the MSRV (dependencies' rust-version, and a
//!   build with that toolchain), `cargo package`, every feature combination, `cargo deny` (licenses, bans,
//!   sources).
//! - [`install`]: idempotent installation of rustup components and Debian packages.
//! - [`nostd`]: building and running the `no_std` proof binary in `xtask/nostd-proof`.
//! - [`elf`]: reading an ELF header to prove a binary is a static executable.
//! - [`fuzz`]: `cargo xtask fuzz` and CI's fuzz smoke: installing cargo-fuzz and running the targets of
//!   `crates/tdp-core/fuzz` and `crates/tdp-cli/fuzz` with their output kept under `target/`.
//! - [`soak`]: `cargo xtask soak`, every fuzz target and the host stress for minutes each, with a summary
//!   of executions, coverage and findings in `target/soak/summary.json`.
//! - [`tidy`]: the house rules (module headers, banned test attributes, SAFETY comments) as a checker
//!   that `tests/tidy.rs` runs over the tree.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bochs;
pub mod ci;
pub mod cmd;
pub mod compat;
pub mod elf;
pub mod fuzz;
pub mod hygiene;
pub mod install;
pub mod nostd;
pub mod soak;
pub mod tidy;
