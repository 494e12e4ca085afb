//! The notes a long-running reader (the FUSE mount, the NBD server) writes while it serves:
//! one line each, handed to the caller's logger, and errors met again and again (a damaged
//! chunk read on every retry) written once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Receives one-line notes while a mount or server runs.
pub type Logger = Arc<dyn Fn(&str) + Send + Sync>;

/// How many distinct repeated notes are remembered (and so written once); past that, repeats
/// are dropped rather than kept without bound.
const REMEMBERED: usize = 1000;

/// A logger that can also write a note only the first time it is seen.
pub struct ServiceLog {
    log: Logger,
    seen: Mutex<HashSet<String>>,
}

impl ServiceLog {
    /// Notes go to `log`.
    pub fn new(log: Logger) -> ServiceLog {
        ServiceLog {
            log,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Writes `msg`.
    pub fn note(&self, msg: &str) {
        (self.log)(msg);
    }

    /// Writes `msg` unless it was written before.
    pub fn note_once(&self, msg: String) {
        let mut seen = self.seen.lock().unwrap();
        if seen.len() < REMEMBERED && seen.insert(msg.clone()) {
            (self.log)(&msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_notes_are_written_once() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let log = ServiceLog::new(Arc::new(move |m: &str| {
            sink.lock().unwrap().push(m.to_string())
        }));
        log.note_once("damaged chunk".into());
        log.note_once("damaged chunk".into());
        log.note("client connected");
        log.note("client connected");
        assert_eq!(
            *lines.lock().unwrap(),
            ["damaged chunk", "client connected", "client connected"]
        );
    }
}
