//! Read-ahead for ranged reads from object storage. A GET costs a round trip however small it
//! is, and a restore asks for a pack's records in order, a few hundred kilobytes at a time, so
//! reading exactly what is asked spends most of its time waiting. Each object's reads are
//! watched: a read that starts where the previous one of that object ended (or a little past
//! it) doubles the next fetch, up to [`MAX_WINDOW`], and what was fetched beyond the request
//! serves the reads that follow. A read elsewhere (a random read through the mount or NBD)
//! fetches only what it asks. At most [`BLOCKS`] fetched blocks are kept.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// The largest fetch a sequential reader grows to.
pub const MAX_WINDOW: u64 = 8 << 20;
/// Fetched blocks kept (at most `BLOCKS × MAX_WINDOW` bytes).
const BLOCKS: usize = 16;
/// How far past the previous read's end a read may start and still count as sequential (the
/// gaps a restore skips: records it does not need).
const SEQUENTIAL_GAP: u64 = 1 << 20;

struct Block {
    key: String,
    start: u64,
    bytes: Arc<Vec<u8>>,
    /// The window the next sequential fetch of this object uses.
    next_window: u64,
}

impl Block {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

/// What a read should fetch: `(start, len)`; `len` ≥ the read's length.
pub struct Plan {
    pub start: u64,
    pub len: u64,
    next_window: u64,
}

/// The blocks recently fetched.
#[derive(Default)]
pub struct ReadAhead {
    blocks: Mutex<VecDeque<Block>>,
}

impl ReadAhead {
    /// Fills `buf` from a kept block if one holds all of `offset..offset + buf.len()`.
    pub fn serve(&self, key: &str, offset: u64, buf: &mut [u8]) -> bool {
        let end = offset + buf.len() as u64;
        let blocks = self.blocks.lock().unwrap();
        for b in blocks.iter().rev() {
            if b.key == key && b.start <= offset && end <= b.end() {
                let at = (offset - b.start) as usize;
                buf.copy_from_slice(&b.bytes[at..at + buf.len()]);
                return true;
            }
        }
        false
    }

    /// What to fetch for a read of `len` bytes at `offset` of `key`, an object of `size` bytes.
    pub fn plan(&self, key: &str, offset: u64, len: u64, size: u64) -> Plan {
        let blocks = self.blocks.lock().unwrap();
        let window = blocks
            .iter()
            .rev()
            .find(|b| b.key == key && b.end() <= offset && offset - b.end() <= SEQUENTIAL_GAP)
            .map_or(0, |b| b.next_window);
        let want = len.max(window).min(size.saturating_sub(offset)).max(len);
        Plan {
            start: offset,
            len: want,
            next_window: (window.max(len) * 2).clamp(256 << 10, MAX_WINDOW),
        }
    }

    /// Keeps what `plan` fetched.
    pub fn keep(&self, key: &str, plan: &Plan, bytes: Vec<u8>) {
        let mut blocks = self.blocks.lock().unwrap();
        blocks.push_back(Block {
            key: key.to_string(),
            start: plan.start,
            bytes: Arc::new(bytes),
            next_window: plan.next_window,
        });
        while blocks.len() > BLOCKS {
            blocks.pop_front();
        }
    }

    /// Forgets the blocks of `key` (deleted, or written again).
    pub fn forget(&self, key: &str) {
        self.blocks.lock().unwrap().retain(|b| b.key != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_grow_the_window_and_random_ones_do_not() {
        let r = ReadAhead::default();
        let size = 64 << 20;
        // The first read of an object fetches what it asks.
        let p = r.plan("a", 0, 100_000, size);
        assert_eq!((p.start, p.len), (0, 100_000));
        r.keep("a", &p, vec![1; 100_000]);
        // The next one, just after it: a larger fetch, which serves what follows.
        let p = r.plan("a", 100_000, 100_000, size);
        assert_eq!(p.len, 256 << 10);
        r.keep("a", &p, vec![2; 256 << 10]);
        let mut buf = vec![0; 50_000];
        assert!(r.serve("a", 200_000, &mut buf));
        assert!(buf.iter().all(|&b| b == 2));
        // Growing on: doubling up to the maximum, never past the object's end.
        let mut at = 100_000 + (256 << 10);
        let mut last = 0;
        for _ in 0..8 {
            let p = r.plan("a", at, 1000, size);
            assert!(p.len >= last.min(MAX_WINDOW) && p.len <= MAX_WINDOW);
            last = p.len;
            at += p.len;
            r.keep("a", &p, vec![0; p.len as usize]);
        }
        assert_eq!(last, MAX_WINDOW);
        let p = r.plan("a", size - 10, 10, size);
        assert_eq!(p.len, 10);
        // A read elsewhere, or in another object, fetches only itself.
        assert_eq!(r.plan("a", 60 << 20, 4096, size).len, 4096);
        assert_eq!(r.plan("b", 0, 4096, size).len, 4096);
        r.forget("a");
        assert!(!r.serve("a", 200_000, &mut buf));
    }
}
