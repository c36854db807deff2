//! Live migration on real KVM with the `tdp` command: total time and downtime, ring against bitmap, at a
//! few dirty rates (filled in once the command's JSON output is settled).

use crate::suite::{Config, Outcome};

/// Runs the group (nothing yet).
pub fn measure(_cfg: &Config, _out: &mut Outcome) {}
