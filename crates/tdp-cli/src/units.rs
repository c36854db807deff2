//! Parsing of the command line's quantities: memory sizes (`512M`, `1G`, `4096`), dirty rates and link
//! bandwidths (`64MiB/s`, `20000pages/s`, `64M`), durations in milliseconds and socket addresses, each
//! with an error that names the argument, the text and what was expected.
//!
//! Keeps: I5 for the CLI (bad input is an error with the value, never a panic or a silent wrap).

use std::net::{SocketAddr, ToSocketAddrs};

/// Bytes in a guest page: everything `tdp` moves is counted in 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;

/// A quantity on the command line that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnitError {
    /// Not a number with an optional unit.
    #[error("{what}: cannot parse {text:?}: expected {expected}")]
    Syntax {
        /// What the value is for (`memory size`, `dirty rate`, ...).
        what: &'static str,
        /// The text given.
        text: String,
        /// The accepted forms.
        expected: &'static str,
    },
    /// A number too large for the unit it was given in.
    #[error("{what}: {text:?} is too large")]
    Overflow {
        /// What the value is for.
        what: &'static str,
        /// The text given.
        text: String,
    },
    /// A size or rate below zero.
    #[error("{what}: {text:?} is a negative {kind}")]
    Negative {
        /// What the value is for.
        what: &'static str,
        /// `size` or `rate`.
        kind: &'static str,
        /// The text given.
        text: String,
    },
    /// Outside the accepted range.
    #[error("{what}: {value} is out of range: {why}")]
    Range {
        /// What the value is for.
        what: &'static str,
        /// The value, formatted with its unit.
        value: String,
        /// The accepted range.
        why: String,
    },
    /// An address that does not resolve or has a bad port.
    #[error("{what}: bad address {text:?}: {why}")]
    Address {
        /// What the address is for.
        what: &'static str,
        /// The text given.
        text: String,
        /// Why it was rejected.
        why: String,
    },
}

const SIZE_FORMS: &str =
    "a byte count with an optional suffix K, M, G or T (powers of 1024), e.g. 512M or 1G";

/// Parses a size in bytes: a decimal number with an optional binary suffix `K`, `M`, `G`, `T` (also
/// `KiB`, `MB`, ... all meaning powers of 1024) or `B`.
///
/// ```
/// use tdp_cli::units::parse_size;
/// assert_eq!(parse_size("memory size", "512M"), Ok(512 << 20));
/// assert_eq!(parse_size("memory size", "1GiB"), Ok(1 << 30));
/// assert_eq!(parse_size("memory size", "4096"), Ok(4096));
/// assert!(parse_size("memory size", "12X").is_err());
/// ```
///
/// # Errors
/// [`UnitError::Syntax`] for anything else, [`UnitError::Overflow`] past `u64`.
pub fn parse_size(what: &'static str, text: &str) -> Result<u64, UnitError> {
    let syntax = || UnitError::Syntax { what, text: text.to_owned(), expected: SIZE_FORMS };
    let t = text.trim();
    if t.starts_with('-') {
        return Err(UnitError::Negative { what, kind: "size", text: text.to_owned() });
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(syntax());
    }
    let n: u64 = num.parse().map_err(|_| UnitError::Overflow { what, text: text.to_owned() })?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(syntax()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| UnitError::Overflow { what, text: text.to_owned() })
}

/// A rate in pages per second, as the user gave it (bytes/s are converted at 4 KiB per page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Pages per second.
    pub pages_per_sec: u64,
}

impl Rate {
    /// The rate in MiB/s.
    #[must_use]
    pub fn mib_per_sec(self) -> f64 {
        self.pages_per_sec as f64 * PAGE_SIZE as f64 / MIB as f64
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MiB/s ({} pages/s)", self.mib_per_sec(), self.pages_per_sec)
    }
}

const RATE_FORMS: &str = "a rate such as 64MiB/s, 64M, 512K/s or 20000pages/s (sizes per second are bytes)";

/// Parses a rate: `N pages/s` (or `Np/s`, `Npages`), or a size per second as [`parse_size`] reads it
/// (`/s` optional): `64MiB/s`, `64M`, `1G/s`. Byte rates are rounded down to whole pages.
///
/// ```
/// use tdp_cli::units::parse_rate;
/// assert_eq!(parse_rate("dirty rate", "64MiB/s").map(|r| r.pages_per_sec), Ok(16384));
/// assert_eq!(parse_rate("dirty rate", "20000pages/s").map(|r| r.pages_per_sec), Ok(20000));
/// assert!(parse_rate("dirty rate", "fast").is_err());
/// ```
///
/// # Errors
/// [`UnitError::Syntax`] or [`UnitError::Overflow`].
pub fn parse_rate(what: &'static str, text: &str) -> Result<Rate, UnitError> {
    let syntax = || UnitError::Syntax { what, text: text.to_owned(), expected: RATE_FORMS };
    let lower = text.trim().to_ascii_lowercase();
    if lower.starts_with('-') {
        return Err(UnitError::Negative { what, kind: "rate", text: text.to_owned() });
    }
    let body = lower.strip_suffix("/s").or_else(|| lower.strip_suffix("ps")).unwrap_or(&lower).trim();
    for unit in ["pages", "page", "p"] {
        if let Some(num) = body.strip_suffix(unit) {
            let num = num.trim();
            if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            let pages: u64 = num.parse().map_err(|_| UnitError::Overflow { what, text: text.to_owned() })?;
            // Every rate is also used in bytes: it must stay countable in bytes per second.
            if pages.checked_mul(PAGE_SIZE).is_none() {
                return Err(UnitError::Overflow { what, text: text.to_owned() });
            }
            return Ok(Rate { pages_per_sec: pages });
        }
    }
    match parse_size(what, body) {
        Ok(bytes) => Ok(Rate { pages_per_sec: bytes / PAGE_SIZE }),
        Err(UnitError::Syntax { .. }) => Err(syntax()),
        Err(e) => Err(e),
    }
}

/// Checks that `value` lies in `min..=max`, naming `what` and formatting with `show` on failure.
///
/// # Errors
/// [`UnitError::Range`].
pub fn check_range(
    what: &'static str,
    value: u64,
    min: u64,
    max: u64,
    show: impl Fn(u64) -> String,
) -> Result<u64, UnitError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(UnitError::Range {
            what,
            value: show(value),
            why: format!("must be {} to {}", show(min), show(max)),
        })
    }
}

/// Formats a byte count the way the command prints sizes: `512 MiB`, `4 KiB`, `1.5 GiB`.
#[must_use]
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {name}", bytes / size)
            } else {
                format!("{:.1} {name}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// Resolves `HOST:PORT` to one socket address. Port 0 is accepted only when `allow_port_zero` (a
/// listener that lets the kernel choose); a missing or non-numeric port is an error.
///
/// ```
/// use tdp_cli::units::parse_addr;
/// assert!(parse_addr("destination", "127.0.0.1:4444", false).is_ok());
/// assert!(parse_addr("destination", "127.0.0.1:0", false).is_err());
/// assert!(parse_addr("destination", "127.0.0.1:99999", false).is_err());
/// assert!(parse_addr("listen address", "127.0.0.1:0", true).is_ok());
/// ```
///
/// # Errors
/// [`UnitError::Address`] naming the text and the reason.
pub fn parse_addr(what: &'static str, text: &str, allow_port_zero: bool) -> Result<SocketAddr, UnitError> {
    let bad = |why: &str| UnitError::Address { what, text: text.to_owned(), why: why.to_owned() };
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(bad("expected HOST:PORT, e.g. 127.0.0.1:7788"));
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let port: u16 = port.parse().map_err(|_| bad("the port must be a number from 1 to 65535"))?;
    if port == 0 && !allow_port_zero {
        return Err(bad("port 0 is not a port one can connect to"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = (host, port).to_socket_addrs().map_err(|e| bad(&format!("cannot resolve: {e}")))?;
    addrs.next().ok_or_else(|| bad("the host resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        for (text, want) in [
            ("0", 0),
            ("4096", 4096),
            ("4k", 4096),
            ("512M", 512 << 20),
            ("512 MiB", 512 << 20),
            ("1G", 1 << 30),
            ("2gb", 2 << 30),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size("s", text), Ok(want), "{text}");
        }
    }

    #[test]
    fn sizes_reject_garbage_and_overflow() {
        for text in ["-1", "-1G", " -4096"] {
            assert!(matches!(parse_size("s", text), Err(UnitError::Negative { .. })), "{text}");
        }
        for text in ["", "M", "1.5G", "12X", "1 G B", "0x100"] {
            assert!(matches!(parse_size("s", text), Err(UnitError::Syntax { .. })), "{text}");
        }
        assert!(matches!(parse_size("s", "99999999999999999999"), Err(UnitError::Overflow { .. })));
        assert!(matches!(parse_size("s", "17179869184T"), Err(UnitError::Overflow { .. })));
    }

    #[test]
    fn rates_in_pages_or_bytes() {
        let pps = |t: &str| parse_rate("r", t).map(|r| r.pages_per_sec);
        assert_eq!(pps("100pages/s"), Ok(100));
        assert_eq!(pps("100 p/s"), Ok(100));
        assert_eq!(pps("1M/s"), Ok(256));
        assert_eq!(pps("1MiB/s"), Ok(256));
        assert_eq!(pps("1Mps"), Ok(256));
        assert_eq!(pps("8K"), Ok(2));
        assert_eq!(pps("0"), Ok(0));
        for bad in ["", "/s", "pages/s", "fast", "1.5M/s", "-3p/s"] {
            assert!(pps(bad).is_err(), "{bad}");
        }
        // Rates are used in bytes too: one whose byte count overflows u64 is refused.
        assert!(matches!(parse_rate("r", "18446744073709551615p/s"), Err(UnitError::Overflow { .. })));
        assert_eq!(pps("4503599627370495p/s"), Ok(u64::MAX / PAGE_SIZE));
    }

    #[test]
    fn range_errors_name_the_bounds() {
        let err = check_range("vcpus", 0, 1, 64, |v| v.to_string()).unwrap_err();
        assert_eq!(err.to_string(), "vcpus: 0 is out of range: must be 1 to 64");
        assert_eq!(check_range("vcpus", 2, 1, 64, |v| v.to_string()), Ok(2));
    }

    #[test]
    fn addresses_need_a_valid_port() {
        assert!(parse_addr("a", "localhost:80", false).is_ok());
        assert!(parse_addr("a", "[::1]:80", false).is_ok());
        for bad in ["127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:70000", "127.0.0.1:x", "127.0.0.1:0"] {
            assert!(parse_addr("a", bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(10), "10 B");
    }
}
