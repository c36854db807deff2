//! Text from a peer made safe to print: control characters (ANSI/OSC escapes, CR, LF, NUL, DEL) and the
//! Unicode direction overrides become visible escapes, and long text is cut, so a hostile source or
//! destination cannot rewrite the terminal or forge log lines.
//!
//! Keeps: I5 for the network peer (its text reaches the terminal only escaped).

/// The most characters of peer text printed; the rest is replaced by `…`.
pub const MAX_PRINTED: usize = 300;

/// `text` with every control or direction-override character escaped (`\u{1b}`, `\r`, `\n`, ...) and
/// cut to [`MAX_PRINTED`] characters.
///
/// ```
/// use tdp_cli::sanitize::escape_control;
/// assert_eq!(escape_control("ok\x1b]0;owned\x07\r\nfake"), "ok\\u{1b}]0;owned\\u{7}\\r\\nfake");
/// assert_eq!(escape_control("größe"), "größe");
/// ```
#[must_use]
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_PRINTED));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_PRINTED {
            out.push('…');
            break;
        }
        if c.is_control() || is_direction_override(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// The first bytes of something that is not a frame, for a log line: printable ASCII kept, the rest
/// escaped, at most 32 bytes.
///
/// ```
/// use tdp_cli::sanitize::describe_bytes;
/// assert_eq!(describe_bytes(b"GET / HTTP/1.1\r\n"), "\"GET / HTTP/1.1\\r\\n\"");
/// ```
#[must_use]
pub fn describe_bytes(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(32)];
    let mut s = String::from("\"");
    s.extend(head.escape_ascii().map(char::from));
    s.push('"');
    if bytes.len() > head.len() {
        s.push('…');
    }
    s
}

/// Unicode's bidirectional overrides and isolates (U+202A..U+202E, U+2066..U+2069): they reorder what
/// follows them on a terminal.
fn is_direction_override(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i5_escapes_terminal_controls_and_overrides() {
        let s = escape_control("a\u{202e}b\0c\x7f");
        assert_eq!(s, "a\\u{202e}b\\0c\\u{7f}");
        assert!(!s.chars().any(char::is_control));
    }

    #[test]
    fn i5_long_text_is_cut() {
        let s = escape_control(&"x".repeat(10_000));
        assert_eq!(s.chars().count(), MAX_PRINTED + 1);
    }

    #[test]
    fn bytes_are_escaped_and_cut() {
        assert_eq!(describe_bytes(&[0x16, 0x03, 0x01]), "\"\\x16\\x03\\x01\"");
        assert!(describe_bytes(&[b'a'; 40]).ends_with('…'));
    }
}
