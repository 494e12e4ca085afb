//! Ranges fetched before they are read: [`crate::backend::Backend::will_need`] on an object
//! store. A restore knows which records it will read next (the chunks of the segments ahead of
//! it); it names their byte ranges here, each is fetched by a ranged GET started at once on the
//! client's runtime, and the read that later asks for bytes inside such a range waits for that
//! GET (often already done) instead of making a request of its own. Many GETs are in flight
//! while the readers decompress, so a restore is bound by the store's rate, not by round trips.
//!
//! Held bytes (in flight or fetched, not yet read) are bounded by [`MAX_HELD`]: past it a hint
//! is ignored (hints are advice) and the read fetches for itself. A range is dropped once all
//! of its bytes were read; fetched ranges never read (a restore that failed) are dropped oldest
//! first to make room. A failed fetch is forgotten: the read then makes its own request, which
//! is retried and reports the error.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

/// Bytes held by prefetched ranges at most.
pub const MAX_HELD: u64 = 160 << 20;

/// What became of one prefetched range's GET.
enum State {
    Pending,
    Done(Arc<Vec<u8>>),
    Failed,
}

struct Slot {
    state: Mutex<State>,
    done: Condvar,
}

struct Range {
    key: String,
    start: u64,
    len: u64,
    /// Bytes of it read so far (reads of a range's records do not overlap).
    taken: u64,
    slot: Arc<Slot>,
}

/// The ranges hinted and not yet read.
#[derive(Default)]
pub struct Prefetch {
    ranges: Mutex<VecDeque<Range>>,
}

/// Completes a range's fetch: hands the bytes (or the failure) to whoever waits for them.
pub struct Completion(Arc<Slot>);

impl Completion {
    pub fn finish(self, bytes: Option<Vec<u8>>) {
        let mut s = self.0.state.lock().unwrap();
        *s = match bytes {
            Some(b) => State::Done(Arc::new(b)),
            None => State::Failed,
        };
        self.0.done.notify_all();
    }
}

impl Prefetch {
    /// Registers a fetch of `len` bytes at `start` of `key`, unless one already covers it or
    /// the bound is reached; the caller starts the GET and calls [`Completion::finish`].
    pub fn begin(&self, key: &str, start: u64, len: u64) -> Option<Completion> {
        let mut ranges = self.ranges.lock().unwrap();
        let end = start + len;
        if ranges
            .iter()
            .any(|r| r.key == key && r.start < end && start < r.start + r.len)
        {
            return None;
        }
        let mut held: u64 = ranges.iter().map(|r| r.len - r.taken).sum();
        // Make room by dropping fetched ranges nobody read (oldest first); never one in flight.
        while held + len > MAX_HELD {
            let done = ranges
                .iter()
                .position(|r| !matches!(*r.slot.state.lock().unwrap(), State::Pending));
            match done {
                Some(i) => {
                    let r = ranges.remove(i).expect("index from position");
                    held -= r.len - r.taken;
                }
                None => return None,
            }
        }
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Pending),
            done: Condvar::new(),
        });
        ranges.push_back(Range {
            key: key.to_string(),
            start,
            len,
            taken: 0,
            slot: slot.clone(),
        });
        Some(Completion(slot))
    }

    /// Fills `buf` from a prefetched range holding all of `offset..offset + buf.len()` of
    /// `key`, waiting for its GET if it is still in flight. False when no range holds it, or
    /// its fetch failed (the caller then reads for itself).
    pub fn serve(&self, key: &str, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        let slot = {
            let ranges = self.ranges.lock().unwrap();
            match ranges
                .iter()
                .find(|r| r.key == key && r.start <= offset && end <= r.start + r.len)
            {
                Some(r) => (r.slot.clone(), r.start),
                None => return false,
            }
        };
        let (slot, start) = slot;
        let mut state = slot.state.lock().unwrap();
        while matches!(*state, State::Pending) {
            state = slot.done.wait(state).unwrap();
        }
        let served = match &*state {
            State::Done(bytes) if bytes.len() as u64 >= end - start => {
                let at = (offset - start) as usize;
                buf.copy_from_slice(&bytes[at..at + buf.len()]);
                true
            }
            _ => false,
        };
        drop(state);
        let mut ranges = self.ranges.lock().unwrap();
        if let Some(i) = ranges.iter().position(|r| Arc::ptr_eq(&r.slot, &slot)) {
            let r = &mut ranges[i];
            r.taken += buf.len() as u64;
            if !served || r.taken >= r.len {
                ranges.remove(i);
            }
        }
        served
    }

    /// Forgets the ranges of `key` (deleted, or written again).
    pub fn forget(&self, key: &str) {
        self.ranges.lock().unwrap().retain(|r| r.key != key);
    }

    /// Bytes held now (in flight or fetched, not yet read).
    #[cfg(test)]
    fn held(&self) -> u64 {
        let ranges = self.ranges.lock().unwrap();
        ranges.iter().map(|r| r.len - r.taken).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_inside_a_prefetched_range_waits_for_it_and_the_range_goes_when_read() {
        let p = Arc::new(Prefetch::default());
        let c = p.begin("a", 100, 10).unwrap();
        // Overlapping hints are not fetched twice.
        assert!(p.begin("a", 105, 10).is_none());
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4];
                let served = p.serve("a", 102, &mut buf);
                (served, buf)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.finish(Some((0u8..10).collect()));
        assert_eq!(reader.join().unwrap(), (true, [2, 3, 4, 5]));
        assert_eq!(p.held(), 6);
        let mut rest = [0u8; 6];
        assert!(p.serve("a", 100, &mut rest[..2]));
        assert!(p.serve("a", 106, &mut rest[2..]));
        assert_eq!(rest, [0, 1, 6, 7, 8, 9]);
        assert_eq!(p.held(), 0, "a range read to the end is dropped");
        // Nothing holds it any more: the reader fetches for itself.
        assert!(!p.serve("a", 100, &mut rest));
    }

    #[test]
    fn a_failed_fetch_leaves_the_read_to_the_reader() {
        let p = Prefetch::default();
        p.begin("a", 0, 10).unwrap().finish(None);
        let mut buf = [0u8; 4];
        assert!(!p.serve("a", 0, &mut buf));
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn held_bytes_are_bounded_and_unread_ranges_make_room() {
        let p = Prefetch::default();
        let big = MAX_HELD / 2;
        let a = p.begin("a", 0, big).unwrap();
        let _b = p.begin("b", 0, big).unwrap();
        // Both in flight: no room, the hint is dropped.
        assert!(p.begin("c", 0, 1).is_none());
        // One fetched and never read: it makes room for the next hint.
        a.finish(Some(vec![0; 1]));
        assert!(p.begin("c", 0, 1).is_some());
        let mut buf = [0u8; 1];
        assert!(!p.serve("a", 0, &mut buf), "dropped to make room");
    }
}
