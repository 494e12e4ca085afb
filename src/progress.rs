//! Progress reporting as a trait, so the library has no terminal code; the CLI implements it
//! with indicatif.

/// Receives progress of long operations. Implementations must be cheap and thread-safe.
pub trait Progress: Sync {
    /// Starts a phase of `total` units (bytes) with a short label.
    fn start(&self, label: &str, total: u64);
    /// Adds `n` units done.
    fn advance(&self, n: u64);
    /// Prints a note without disturbing the progress display.
    fn note(&self, msg: &str);
    /// Ends the current phase.
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn note(&self, _: &str) {}
    fn finish(&self) {}
}
