//! The command line's commands, one module per command (its arguments, help text, run and
//! output), and what they share: the context (repository opening, passphrase), output and
//! argument parsers.

pub mod check;
pub mod complete;
pub mod context;
pub mod copy;
pub mod default_repo;
pub mod docs;
pub mod extract;
pub mod files;
pub mod forget;
pub mod gc;
pub mod import;
pub mod ingest;
pub mod init;
pub mod inspect;
pub mod keys;
pub mod list;
pub mod mount;
pub mod output;
pub mod passphrase;
pub mod prune;
pub mod report;
pub mod run;
pub mod serve_nbd;
pub mod stats;
pub mod upgrade;
pub mod vsphere;

/// Parses `--time`: an RFC 3339 instant (`2026-09-01T01:30:00Z`, or with an offset).
pub fn parse_time(s: &str) -> Result<jiff::Timestamp, String> {
    s.parse::<jiff::Timestamp>().map_err(|e| {
        format!("{s:?} is not a time: give UTC like 2026-09-01T01:30:00Z or an offset like 2026-09-01T03:30:00+02:00 ({e})")
    })
}

pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (e.g. 20%)"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v / 100.0)
}
