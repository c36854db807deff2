//! The live progress of a migration on stderr, as a [`Progress`]: on a terminal an indicatif bar per
//! round (pages sent of the round's total, percent, rate, ETA); when stderr is not a terminal (a log, a
//! pipe) a plain line about once a second and one per finished round; nothing under `--json`. Notes
//! (throttle changes, reconnections) are kept for the report.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::migrate::{Progress, RoundReport};
use crate::units::PAGE_SIZE;

/// How often a plain progress line is printed when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(1);

/// The progress display of a migration.
pub struct Bar {
    bar: ProgressBar,
    mode: Mode,
    notes: Vec<String>,
    round: Option<u32>,
    round_start: Instant,
    last_line: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Hidden,
    Terminal,
    Lines,
}

impl Bar {
    /// A bar on stderr when it is a terminal, plain lines when it is not, nothing when `hidden`.
    #[must_use]
    pub fn new(hidden: bool) -> Bar {
        let mode = match (hidden, std::io::stderr().is_terminal()) {
            (true, _) => Mode::Hidden,
            (false, true) => Mode::Terminal,
            (false, false) => Mode::Lines,
        };
        let target =
            if mode == Mode::Terminal { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        let template = "{msg} [{wide_bar}] {percent:>3}% {binary_bytes_per_sec} ETA {eta}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        Bar { bar, mode, notes: Vec::new(), round: None, round_start: Instant::now(), last_line: None }
    }

    /// Removes the bar and returns the notes collected.
    pub fn finish(self) -> Vec<String> {
        self.bar.finish_and_clear();
        self.notes
    }
}

/// `round 0 (bulk copy)` or `round 3`.
fn round_name(round: u32) -> String {
    if round == 0 { "round 0 (bulk copy)".to_owned() } else { format!("round {round}") }
}

/// A plain progress line: pages, percent, rate and the time left at that rate.
#[must_use]
pub fn line(round: u32, done: u64, total: u64, elapsed: Duration) -> String {
    let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = if rate > 0.0 {
        crate::output::duration(total.saturating_sub(done) as f64 / rate * 1e3)
    } else {
        "unknown".to_owned()
    };
    format!(
        "tdp migrate: {}: {done}/{total} pages ({percent:.0}%), {:.1} MiB/s, ETA {eta}",
        round_name(round),
        rate * PAGE_SIZE as f64 / (1 << 20) as f64
    )
}

impl Progress for Bar {
    fn sent(&mut self, round: u32, done: u64, total: u64) {
        if self.round != Some(round) {
            self.round = Some(round);
            self.round_start = Instant::now();
            self.bar.reset();
            self.bar.set_length(total.saturating_mul(PAGE_SIZE));
        }
        match self.mode {
            Mode::Hidden => {}
            Mode::Terminal => {
                self.bar.set_message(format!("{}: {done}/{total} pages", round_name(round)));
                self.bar.set_position(done.saturating_mul(PAGE_SIZE));
            }
            Mode::Lines => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if due && done > 0 && done < total {
                    eprintln!("{}", line(round, done, total, self.round_start.elapsed()));
                    self.last_line = Some(Instant::now());
                }
            }
        }
    }

    fn round(&mut self, r: &RoundReport, pending: u64) {
        let text = format!(
            "{} done: {} pages in {}; {pending} dirty pages pending; dirty {:.1} MiB/s, link {:.1} MiB/s",
            round_name(r.round),
            r.pages_sent,
            crate::output::duration(r.ms),
            r.dirty_rate_mib_s,
            r.throughput_mib_s
        );
        match self.mode {
            Mode::Hidden => {}
            Mode::Terminal => self.bar.println(text),
            Mode::Lines => eprintln!("tdp migrate: {text}"),
        }
    }

    fn note(&mut self, text: &str) {
        // Printed with the report (the bar may be hidden); kept in order.
        self.notes.push(text.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_have_pages_percent_rate_and_eta() {
        let l = line(0, 2560, 10240, Duration::from_secs(2));
        assert_eq!(l, "tdp migrate: round 0 (bulk copy): 2560/10240 pages (25%), 5.0 MiB/s, ETA 6000.0 ms");
        assert!(line(3, 0, 10, Duration::ZERO).ends_with("ETA unknown"));
        assert!(line(1, 1000, 21_000, Duration::from_secs(1)).ends_with("ETA 20.0 s"));
    }
}
