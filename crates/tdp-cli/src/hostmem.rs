//! How much memory the host can give: `MemAvailable` from `/proc/meminfo`, which the command checks a
//! guest (and the loopback destination's copy of it) against before allocating, so a guest too big for
//! the host is a clear error naming the figure, not an out-of-memory kill.

/// The host's available memory in bytes (`MemAvailable` in `/proc/meminfo`), or `None` when the file
/// cannot be read or has no such line (not Linux, or a kernel before 3.14).
#[must_use]
pub fn available() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo`.
///
/// ```
/// use tdp_cli::hostmem::parse_meminfo;
/// let text = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
/// assert_eq!(parse_meminfo(text), Some(20_000_000 * 1024));
/// assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
/// ```
#[must_use]
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i5_malformed_meminfo_is_none_not_a_panic() {
        for text in [
            "",
            "MemAvailable:",
            "MemAvailable: x kB",
            "MemAvailable: 99999999999999999999 kB",
            "MemAvailable: 18446744073709551615 kB",
            "MemAvailable: 1 MB",
        ] {
            assert_eq!(parse_meminfo(text), None, "{text:?}");
        }
    }

    #[test]
    fn this_host_reports_some_memory() {
        assert!(available().is_some_and(|b| b > 0), "/proc/meminfo has MemAvailable on Linux");
    }
}
