//! The machine-readable result line both runners print: `TDP-RESULT ` followed by one JSON object.
//!
//! Written with `core::fmt` so the bare-metal kernel can print it over its serial port; `cargo xtask
//! bochs` parses it (with serde) from the Bochs run and from the mock run and compares the two.

use alloc::collections::BTreeSet;
use core::fmt::{self, Write};

use super::{Broken, Check, GUEST_TABLE_GFNS, Mapping, Observed, Translation};

/// The prefix of the result line.
pub const RESULT_PREFIX: &str = "TDP-RESULT ";

/// Who ran the scenario and on what.
#[derive(Clone, Copy, Debug)]
pub struct RunInfo<'a> {
    /// `bochs` or `mock`.
    pub runner: &'a str,
    /// The CPU model (Bochs's name; the mock runs the configuration that model gets).
    pub model: &'a str,
    /// The MMU configuration: `EPT_PML` or `EPT` (write protection).
    pub mmu: &'a str,
    /// Hardware features the run used, e.g. `["ept", "ept_ad", "pml", "ept_2m"]`.
    pub features: &'a [&'a str],
    /// The must-fail variant the run was built as, if any.
    pub broken: Option<Broken>,
}

/// Writes the result line (with a trailing newline) for `info`, `seen` and its `checks`.
///
/// ```
/// use tdp_metal::scenario::report::{RunInfo, write_result_line};
/// use tdp_metal::scenario::{Observed, SCENARIO};
///
/// let seen = Observed::default();
/// let checks = SCENARIO.evaluate(&seen);
/// let info = RunInfo { runner: "mock", model: "m", mmu: "EPT", features: &["ept"], broken: None };
/// let mut line = String::new();
/// write_result_line(&mut line, &info, &seen, &checks)?;
/// assert!(line.starts_with("TDP-RESULT {\"runner\":\"mock\""));
/// assert!(line.trim_end().ends_with("\"verdict\":\"fail\"}"), "an empty run fails: {line}");
/// # Ok::<(), std::fmt::Error>(())
/// ```
///
/// # Errors
/// What `out` returns.
pub fn write_result_line(
    out: &mut impl Write,
    info: &RunInfo<'_>,
    seen: &Observed,
    checks: &[Check],
) -> fmt::Result {
    out.write_str(RESULT_PREFIX)?;
    write!(out, "{{\"runner\":")?;
    json_str(out, info.runner)?;
    write!(out, ",\"model\":")?;
    json_str(out, info.model)?;
    write!(out, ",\"mmu\":")?;
    json_str(out, info.mmu)?;
    write!(out, ",\"broken\":")?;
    match info.broken {
        Some(b) => {
            json_str(out, b.name())?;
            out.write_str(",\"must_fail\":")?;
            json_str(out, b.must_fail())?;
        }
        None => out.write_str("null,\"must_fail\":null")?,
    }
    out.write_str(",\"features\":[")?;
    for (i, f) in info.features.iter().enumerate() {
        sep(out, i)?;
        json_str(out, f)?;
    }
    write!(
        out,
        "],\"steps_completed\":{},\"ept_violations\":{},\"ept_misconfigs\":{},\"pml_full_exits\":{},\"flushes\":{},\"invepts\":{},\
         \"mmio_reads\":{},\"ring_lost\":{},\"guest_error\":",
        seen.steps_completed,
        seen.ept_violations,
        seen.ept_misconfigs,
        seen.pml_full_exits,
        seen.flushes,
        seen.invepts,
        seen.mmio_reads,
        seen.ring_lost
    )?;
    match &seen.guest_error {
        Some(e) => json_str(out, e)?,
        None => out.write_str("null")?,
    }
    out.write_str(",\"mmio_writes\":")?;
    pairs(out, &seen.mmio_writes)?;
    out.write_str(",\"guest_table_gfns\":[")?;
    for (i, gfn) in GUEST_TABLE_GFNS.iter().enumerate() {
        sep(out, i)?;
        write!(out, "{gfn}")?;
    }
    out.write_str("],\"harvests\":")?;
    gfn_sets(out, &seen.harvests)?;
    out.write_str(",\"young\":")?;
    gfn_sets(out, &seen.young)?;
    out.write_str(",\"host_reads\":")?;
    pairs(out, &seen.host_reads)?;
    write!(
        out,
        ",\"slot_faults\":{},\"exec_faults\":{},\"snapshots\":[",
        seen.slot_faults, seen.exec_faults
    )?;
    for (i, snap) in seen.snapshots.iter().enumerate() {
        sep(out, i)?;
        write!(out, "{{\"faults\":{},\"exec_faults\":{},\"translations\":", snap.faults, snap.exec_faults)?;
        translations(out, &snap.translations)?;
        out.write_char('}')?;
    }
    out.write_str("],\"tracked_writes\":")?;
    pairs(out, &seen.tracked_writes)?;
    out.write_str(",\"nx_recovered\":[")?;
    for (i, n) in seen.nx_recovered.iter().enumerate() {
        sep(out, i)?;
        write!(out, "{n}")?;
    }
    out.write_str("],\"translations\":")?;
    translations(out, &seen.translations)?;
    out.write_str(",\"early_translations\":")?;
    translations(out, &seen.early_translations)?;
    out.write_str(",\"checks\":[")?;
    for (i, c) in checks.iter().enumerate() {
        sep(out, i)?;
        out.write_str("{\"name\":")?;
        json_str(out, c.name)?;
        write!(out, ",\"ok\":{},\"detail\":", c.ok)?;
        json_str(out, &c.detail)?;
        out.write_char('}')?;
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    let verdict = if failed == 0 && !checks.is_empty() { "pass" } else { "fail" };
    writeln!(out, "],\"passed\":{},\"failed\":{failed},\"verdict\":\"{verdict}\"}}", checks.len() - failed)
}

fn translations(out: &mut impl Write, list: &[Translation]) -> fmt::Result {
    out.write_char('[')?;
    for (i, t) in list.iter().enumerate() {
        sep(out, i)?;
        write!(out, "{{\"gfn\":{},", t.gfn)?;
        match t.kind {
            Mapping::NotPresent => out.write_str("\"kind\":\"none\"}")?,
            Mapping::Mmio => out.write_str("\"kind\":\"mmio\"}")?,
            Mapping::Leaf { slot, page, level, rwx } => write!(
                out,
                "\"kind\":\"leaf\",\"slot\":{slot},\"page\":{page},\"level\":{level},\"rwx\":{rwx}}}"
            )?,
        }
    }
    out.write_char(']')
}

/// A JSON array of `[address, value]` pairs.
fn pairs(out: &mut impl Write, list: &[(u64, u64)]) -> fmt::Result {
    out.write_char('[')?;
    for (i, (gpa, value)) in list.iter().enumerate() {
        sep(out, i)?;
        write!(out, "[{gpa},{value}]")?;
    }
    out.write_char(']')
}

/// A JSON array of gfn arrays.
fn gfn_sets(out: &mut impl Write, sets: &[BTreeSet<u64>]) -> fmt::Result {
    out.write_char('[')?;
    for (i, set) in sets.iter().enumerate() {
        sep(out, i)?;
        out.write_char('[')?;
        for (j, gfn) in set.iter().enumerate() {
            sep(out, j)?;
            write!(out, "{gfn}")?;
        }
        out.write_char(']')?;
    }
    out.write_char(']')
}

fn sep(out: &mut impl Write, i: usize) -> fmt::Result {
    if i > 0 { out.write_char(',') } else { Ok(()) }
}

/// Writes `s` as a JSON string: quotes, backslashes and control characters escaped.
fn json_str(out: &mut impl Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    out.write_char('"')
}
