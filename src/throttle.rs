//! Rate limits (`--limit-upload`, `--limit-download` to object storage, `--limit-read` from the
//! VMs' disks): every transfer's bytes are given a start time so that, over any stretch, the
//! process moves at most the limit. A caller whose bytes would go too early waits (its own
//! thread), so a limit also holds back the work that produces or consumes the bytes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One direction's limit.
pub struct Throttle {
    bytes_per_second: f64,
    /// When the bytes reserved so far will have gone.
    next: Mutex<Instant>,
}

impl Throttle {
    /// A limit of `bytes_per_second` (above 0).
    pub fn new(bytes_per_second: f64) -> Throttle {
        Throttle {
            bytes_per_second,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Reserves `n` bytes and returns how long to wait before moving them.
    fn reserve(&self, n: u64) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap();
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_second);
        start - now
    }

    /// Waits until `n` more bytes may move.
    pub fn take(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Waits on `t`, if there is a limit.
pub fn take(t: Option<&Throttle>, n: u64) {
    if let Some(t) = t {
        t.take(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_spaced_by_the_rate() {
        let t = Throttle::new(1e6);
        assert!(t.reserve(500_000) < Duration::from_millis(5));
        let second = t.reserve(500_000);
        assert!(
            second > Duration::from_millis(450) && second <= Duration::from_millis(500),
            "{second:?}"
        );
        let third = t.reserve(1);
        assert!(third > Duration::from_millis(950), "{third:?}");
    }
}
