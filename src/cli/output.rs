//! What the commands show: progress (a bar on a terminal, timed lines in a log), sizes in
//! human units, JSON, and standard output that tolerates a reader going away.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmrepo::progress::Progress;

/// indicatif progress on a terminal's stderr; without a terminal, a progress line every minute.
pub struct Bar {
    bar: Option<ProgressBar>,
    /// Without a terminal (cron, a log file): a progress line every so often instead.
    log: Option<LogLines>,
}

/// Progress as plain lines on stderr, at most one per `every`.
struct LogLines {
    every: std::time::Duration,
    state: std::sync::Mutex<LogState>,
}

struct LogState {
    label: String,
    total: u64,
    done: u64,
    began: std::time::Instant,
    last: std::time::Instant,
}

/// Seconds between progress lines when stderr is not a terminal (`VMREPO_PROGRESS_INTERVAL`).
const LOG_INTERVAL_SECONDS: f64 = 60.0;

impl LogLines {
    fn new() -> LogLines {
        let every = std::env::var("VMREPO_PROGRESS_INTERVAL")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .unwrap_or(std::time::Duration::from_secs_f64(LOG_INTERVAL_SECONDS));
        let now = std::time::Instant::now();
        LogLines {
            every,
            state: std::sync::Mutex::new(LogState {
                label: String::new(),
                total: 0,
                done: 0,
                began: now,
                last: now,
            }),
        }
    }

    fn line(s: &LogState) -> String {
        let secs = s.began.elapsed().as_secs_f64().max(1e-3);
        let rate = s.done as f64 / secs;
        let mut line = format!("{}: {} of {}", s.label, human(s.done), human(s.total));
        if s.total > 0 {
            line += &format!(" ({:.0}%)", 100.0 * s.done as f64 / s.total as f64);
        }
        line += &format!(", {}/s", human(rate as u64));
        if rate > 0.0 && s.total > s.done {
            let left = ((s.total - s.done) as f64 / rate) as u64;
            line += &format!(", about {}m{:02}s left", left / 60, left % 60);
        }
        line
    }
}

impl Bar {
    pub fn new(enabled: bool) -> Bar {
        let terminal = std::io::stderr().is_terminal();
        let on = enabled && terminal;
        Bar {
            log: (enabled && !terminal).then(LogLines::new),
            bar: on.then(|| {
                let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .unwrap()
                    .progress_chars("=> "),
                );
                b
            }),
        }
    }
}

impl Progress for Bar {
    fn start(&self, label: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.reset();
            b.set_length(total);
            b.set_position(0);
            b.set_message(label.to_string());
        }
        if let Some(l) = &self.log {
            let now = std::time::Instant::now();
            *l.state.lock().unwrap() = LogState {
                label: label.to_string(),
                total,
                done: 0,
                began: now,
                last: now,
            };
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(l) = &self.log {
            let mut s = l.state.lock().unwrap();
            s.done += n;
            if s.last.elapsed() >= l.every {
                s.last = std::time::Instant::now();
                eprintln!("{}", LogLines::line(&s));
            }
        }
    }
    fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Set once standard output has failed (its reader went away): nothing more is written to it.
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes to standard output. When the reader has gone (a closed pipe), the output is dropped
/// and the command goes on: an ingest still commits and runs its post-command, and the exit
/// code says how the work went, not whether someone read about it.
pub fn stdout_write(args: std::fmt::Arguments<'_>) {
    use std::sync::atomic::Ordering;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out.write_fmt(args).and_then(|_| out.flush()).is_err() {
        STDOUT_GONE.store(true, Ordering::Relaxed);
    }
}

pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}
