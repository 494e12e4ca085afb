//! Rate limits (`--limit-upload`, `--limit-download` to object storage, `--limit-read` from the
//! VMs' disks): every transfer's bytes are given a slot of time, `n / rate` long, after the
//! slots already given, and the caller waits (its own thread) until its slot has passed. So from
//! the first transfer on, the process has moved at most `rate × elapsed` bytes: `N` bytes take at
//! least `N / rate`, however large each transfer is. A limit also holds back the work that
//! produces or consumes the bytes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One direction's limit.
pub struct Throttle {
    bytes_per_second: f64,
    /// When the slots given so far end.
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

    /// Gives `n` bytes the next slot and returns how long to wait until it has passed.
    fn reserve(&self, n: u64) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap();
        let end = (*next).max(now) + Duration::from_secs_f64(n as f64 / self.bytes_per_second);
        *next = end;
        end - now
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
        let first = t.reserve(500_000);
        assert!(
            first > Duration::from_millis(450) && first <= Duration::from_millis(500),
            "{first:?}"
        );
        let second = t.reserve(500_000);
        assert!(
            second > Duration::from_millis(950) && second <= Duration::from_millis(1000),
            "{second:?}"
        );
        let third = t.reserve(1);
        assert!(third > Duration::from_millis(950), "{third:?}");
    }
}
