//! Re-cutting a segment around what changed in it. A change-aware ingest knows which bytes of a
//! segment changed since the previous generation; when that segment was one data run, its
//! previous chunk list and fingerprint leaves (see [`leaves`]) let the new segment be built from
//! the changed bytes and a little context: FastCDC restarts at the last previous cut before each
//! change and runs until it cuts where the previous version cut again (from there on the bytes
//! and so the cuts are the old ones); the fingerprint is recomputed from the changed leaves.
//! The result is exactly the segment a full read gives; whenever that cannot be shown from what
//! is known (zeros in the changed bytes could start a zero run, stored leaves do not match the
//! previous fingerprint, the changes cover most of the segment), [`patch`] answers `None` and
//! the caller reads the whole segment.

use std::ops::Range;

use blake3::hazmat::ChainingValue;

use crate::error::Result;
use crate::ingest::chunker::{is_zero, Cut};
use crate::repo::config::ChunkerParams;
use crate::repo::crypto::Keys;
use crate::repo::leaves;
use crate::repo::manifest::{Extent, Segment};

/// A segment built from its previous version and the changed bytes.
pub struct Patched {
    /// The new segment object.
    pub segment: Segment,
    /// The chunks cut afresh (ranges in the segment buffer), to be stored if new.
    pub cuts: Vec<Cut>,
    /// The new segment's leaf chaining values.
    pub leaves: Vec<ChainingValue>,
    /// Bytes read from the disk.
    pub read: u64,
}

/// The previous version of a segment: its object and its leaves' chaining values.
pub struct Previous<'a> {
    pub segment: &'a Segment,
    pub leaves: &'a [ChainingValue],
}

/// How far around a change a patch reads, at most, in the usual case (no long resync): the
/// previous cut before it and the leaf it starts in, and two maximal chunks and the leaf after
/// it. Used to hint the kernel ahead of the workers.
pub fn context(params: &ChunkerParams) -> (u64, u64) {
    let max = params.max_size as u64;
    let leaf = leaves::LEAF as u64;
    (max.max(leaf), (2 * max).max(leaf))
}

/// Sorted, disjoint, non-empty ranges covering the same values as `ranges`.
pub fn merged<T: Copy + Ord>(ranges: impl IntoIterator<Item = Range<T>>) -> Vec<Range<T>> {
    let mut v: Vec<Range<T>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<T>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// [`merged`] ranges of `ranges` (segment offsets) clipped to `len`.
fn normalize(ranges: &[Range<usize>], len: usize) -> Vec<Range<usize>> {
    merged(ranges.iter().map(|r| r.start.min(len)..r.end.min(len)))
}

/// Which zero blocks of the segment buffer hold disk bytes, and reading the missing ones.
struct Filled<'a, 'r> {
    buf: &'a mut [u8],
    zb: usize,
    have: Vec<bool>,
    read: u64,
    source: &'r mut dyn FnMut(&mut [u8], usize) -> Result<()>,
}

impl Filled<'_, '_> {
    /// Makes sure `r` (widened to zero blocks) is in the buffer, reading what is missing in as
    /// few requests as possible.
    fn ensure(&mut self, r: Range<usize>) -> Result<()> {
        let len = self.buf.len();
        let (first, end) = (r.start / self.zb, r.end.min(len).div_ceil(self.zb));
        let mut i = first;
        while i < end {
            if self.have[i] {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < end && !self.have[j] {
                j += 1;
            }
            let (s, e) = (i * self.zb, (j * self.zb).min(len));
            (self.source)(&mut self.buf[s..e], s)?;
            self.have[i..j].fill(true);
            self.read += (e - s) as u64;
            i = j;
        }
        Ok(())
    }
}

/// Builds the new version of a segment of `buf.len()` bytes whose bytes changed only in
/// `changed` (segment offsets), from `prev`. `source(dst, offset)` reads segment bytes at
/// `offset` into `dst`; only what the patch needs is read, into the same place in `buf`.
/// `key` is the fingerprint key. `None`: read the whole segment instead.
pub fn patch(
    buf: &mut [u8],
    prev: Previous<'_>,
    changed: &[Range<usize>],
    params: &ChunkerParams,
    keys: &Keys,
    key: &[u8; 32],
    source: &mut dyn FnMut(&mut [u8], usize) -> Result<()>,
) -> Result<Option<Patched>> {
    let len = buf.len();
    let changed = normalize(changed, len);
    let one_run = prev
        .segment
        .extents
        .iter()
        .all(|e| matches!(e, Extent::Data { .. }));
    if changed.is_empty()
        || !one_run
        || prev.segment.len() != len as u64
        || leaves::root(key, len, prev.leaves) != Some(prev.segment.fingerprint)
    {
        return Ok(None);
    }
    let old = &prev.segment.extents;
    // bounds[i] is where old extent i starts; bounds[old.len()] == len.
    let mut bounds = Vec::with_capacity(old.len() + 1);
    bounds.push(0usize);
    for e in old {
        bounds.push(bounds.last().unwrap() + e.len() as usize);
    }
    let cutter = crate::ingest::chunker::Cutter::new(params, keys);
    let maxu = params.max_size as usize;

    // What the usual case reads: from the last old cut before each change (and the start of
    // its first leaf) to two maximal chunks after it (and the end of its last leaf).
    let windows: Vec<Range<usize>> = changed
        .iter()
        .map(|r| {
            let i = bounds.partition_point(|&b| b < r.start);
            let cut_before = if i == 0 { 0 } else { bounds[i - 1] };
            let leafs = leaves::covering(r);
            let start = cut_before.min(leaves::data_range(leafs.start, len).start);
            let end = (r.end + 2 * maxu)
                .max(leaves::data_range(leafs.end - 1, len).end)
                .min(len);
            start..end
        })
        .collect();
    let planned: usize = normalize(&windows, len).iter().map(|r| r.len()).sum();
    if planned * 4 > len * 3 {
        return Ok(None);
    }
    let zb = params.zero_block as usize;
    let mut filled = Filled {
        buf,
        zb,
        have: vec![false; len.div_ceil(zb)],
        read: 0,
        source,
    };
    for w in normalize(&windows, len) {
        filled.ensure(w)?;
    }
    // Changed bytes must hold no all-zero block: then every zero run of the new segment lies in
    // unchanged bytes, is no longer than it was, and the segment stays one data run.
    for r in &changed {
        let (first, end) = (r.start / zb, r.end.div_ceil(zb));
        if (first..end).any(|b| is_zero(&filled.buf[b * zb..((b + 1) * zb).min(len)])) {
            return Ok(None);
        }
    }

    let mut extents = Vec::with_capacity(old.len() + 8);
    let mut cuts = Vec::new();
    // `next_old`: the first old extent not yet taken or superseded.
    let mut next_old = 0usize;
    let mut j = 0usize;
    while j < changed.len() {
        // Old chunks ending before the change were cut looking only at unchanged bytes (a cut
        // decision reads the byte at the cut too, hence strictly before).
        while next_old < old.len() && bounds[next_old + 1] < changed[j].start {
            extents.push(old[next_old]);
            next_old += 1;
        }
        let mut at = bounds[next_old];
        let mut until = changed[j].end;
        j += 1;
        loop {
            let end = (at + maxu).min(len);
            filled.ensure(at..end)?;
            let length = cutter.first_chunk(&filled.buf[at..end]);
            let range = at..at + length;
            let id = keys.id_of(&filled.buf[range.clone()]);
            extents.push(Extent::Data {
                len: length as u32,
                id,
            });
            cuts.push(Cut { range, id });
            at += length;
            // A later change this chunk reached is cut in the same run.
            while j < changed.len() && changed[j].start <= at {
                until = until.max(changed[j].end);
                j += 1;
            }
            while bounds[next_old] < at {
                next_old += 1;
            }
            // Past the change and on an old cut: from here on bytes and cuts are the old ones.
            if at == len || (at >= until && bounds[next_old] == at) {
                break;
            }
        }
    }
    extents.extend_from_slice(&old[next_old..]);

    let mut new_leaves = prev.leaves.to_vec();
    let mut done = vec![false; new_leaves.len()];
    for r in &changed {
        for k in leaves::covering(r) {
            if !std::mem::replace(&mut done[k], true) {
                let d = leaves::data_range(k, len);
                filled.ensure(d.clone())?;
                new_leaves[k] = leaves::leaf(key, k, len, &filled.buf[d]);
            }
        }
    }
    let fingerprint = leaves::root(key, len, &new_leaves).expect("same number of leaves");
    Ok(Some(Patched {
        segment: Segment {
            fingerprint,
            extents,
        },
        cuts,
        leaves: new_leaves,
        read: filled.read,
    }))
}

#[cfg(test)]
// Lists of changed ranges with one range in them are meant.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::ingest::chunker::{cut, fingerprint, fingerprint_key, noise, runs};

    /// The segment a full read of `buf` gives, and its leaves.
    fn full(buf: &[u8], p: &ChunkerParams, key: &[u8; 32]) -> (Segment, Vec<ChainingValue>) {
        full_with(buf, p, &Keys::none(), key)
    }

    fn full_with(
        buf: &[u8],
        p: &ChunkerParams,
        keys: &Keys,
        key: &[u8; 32],
    ) -> (Segment, Vec<ChainingValue>) {
        let r = runs(buf, p, |_| false);
        let (extents, _) = cut(buf, &r, p, keys);
        (
            Segment {
                fingerprint: fingerprint(key, buf, &r),
                extents,
            },
            leaves::all(key, buf).unwrap_or_default(),
        )
    }

    /// Runs [`patch`] from `prev` with the disk reading `after`; the buffer's unread bytes hold
    /// garbage, so a patch that used them would not match.
    fn patch_from(
        prev: &Segment,
        leaves: &[ChainingValue],
        after: &[u8],
        changed: &[Range<usize>],
    ) -> Option<Patched> {
        patch_with(prev, leaves, after, changed, &Keys::none())
    }

    /// [`patch_from`] in a repository with `keys` (keyed cut points when they encrypt).
    fn patch_with(
        prev: &Segment,
        leaves: &[ChainingValue],
        after: &[u8],
        changed: &[Range<usize>],
        keys: &Keys,
    ) -> Option<Patched> {
        let p = params_for(keys);
        let key = fingerprint_key(&p, keys);
        let mut buf = vec![0xA5u8; after.len()];
        let mut source = |dst: &mut [u8], at: usize| {
            dst.copy_from_slice(&after[at..at + dst.len()]);
            Ok(())
        };
        let previous = Previous {
            segment: prev,
            leaves,
        };
        patch(&mut buf, previous, changed, &p, keys, &key, &mut source).unwrap()
    }

    /// The chunker parameters of a repository with `keys`, as `init` makes them.
    fn params_for(keys: &Keys) -> ChunkerParams {
        ChunkerParams {
            cut_points: crate::repo::config::CutPoints::for_encryption(keys.encrypted()),
            ..ChunkerParams::default()
        }
    }

    /// Patches `before` into `after` given `changed`; checks the result against a full read of
    /// `after` and that only what was read was used. Returns the bytes read, or None.
    fn check(before: &[u8], after: &[u8], changed: &[Range<usize>]) -> Option<u64> {
        check_with(before, after, changed, &Keys::none())
    }

    /// [`check`] in a repository with `keys`.
    fn check_with(
        before: &[u8],
        after: &[u8],
        changed: &[Range<usize>],
        keys: &Keys,
    ) -> Option<u64> {
        let p = params_for(keys);
        let key = fingerprint_key(&p, keys);
        let (prev, prev_leaves) = full_with(before, &p, keys, &key);
        let patched = patch_with(&prev, &prev_leaves, after, changed, keys)?;
        let (want, want_leaves) = full_with(after, &p, keys, &key);
        assert_eq!(patched.segment, want, "changed {changed:?}");
        assert_eq!(patched.leaves, want_leaves);
        for c in &patched.cuts {
            assert_eq!(c.id, keys.id_of(&after[c.range.clone()]));
        }
        Some(patched.read)
    }

    fn changed_copy(base: &[u8], ranges: &[Range<usize>], seed: u64) -> Vec<u8> {
        let mut b = base.to_vec();
        for (i, r) in ranges.iter().enumerate() {
            b[r.clone()].copy_from_slice(&noise(r.len(), seed + i as u64));
        }
        b
    }

    #[test]
    fn a_patched_segment_equals_a_full_read_and_reads_little() {
        let len = 4 << 20;
        let base = noise(len, 1);
        let cases: Vec<Vec<Range<usize>>> = vec![
            vec![1_000_000..1_004_096],
            vec![0..4096],
            vec![len - 4096..len],
            vec![len - 1..len],
            vec![0..1],
            vec![65_519..65_520],
            vec![100_000..100_001, 100_500..101_000, 3_000_000..3_065_536],
            vec![2 << 20..(2 << 20) + (1 << 20)],
            vec![10_000..20_000, 30_000..40_000, 50_000..60_000],
        ];
        for (n, ranges) in cases.iter().enumerate() {
            let after = changed_copy(&base, ranges, 100 + n as u64);
            let read = check(&base, &after, ranges).expect("patchable");
            let changed: usize = ranges.iter().map(|r| r.len()).sum();
            assert!(
                read as usize <= changed + 512 * 1024,
                "{ranges:?}: read {read} for {changed} changed"
            );
        }
    }

    #[test]
    fn a_change_that_starts_at_an_old_cut_re_cuts_the_chunk_before_it() {
        // The cut decision at an offset reads the byte there: when that byte changes, the chunk
        // ending there must be cut again.
        let p = ChunkerParams::default();
        let key = fingerprint_key(&p, &Keys::none());
        let base = noise(4 << 20, 11);
        let (prev, _) = full(&base, &p, &key);
        let mut at = 0usize;
        for e in &prev.extents[..40] {
            at += e.len() as usize;
            let ranges = [at..at + 1];
            let after = changed_copy(&base, &ranges, at as u64);
            check(&base, &after, &ranges).expect("patchable");
        }
    }

    #[test]
    fn random_changes_always_give_what_a_full_read_gives() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let mut patched = 0;
        for round in 0..40 {
            // Whole segments and the short last segment of a disk.
            let len = if round % 4 == 3 {
                (4 << 20) - 512 * (1 + rnd(4000))
            } else {
                4 << 20
            };
            let base = noise(len, round);
            let mut ranges = Vec::new();
            for _ in 0..1 + rnd(4) {
                let start = rnd(len);
                let scale = [16, 4096, 100_000, 600_000][rnd(4)];
                let l = 1 + rnd(scale);
                ranges.push(start..(start + l).min(len));
            }
            let after = changed_copy(&base, &ranges, 1000 + round);
            // The listed ranges may also over-state the change (a CBT block map does).
            let mut listed = ranges.clone();
            if round % 2 == 0 {
                let s = rnd(len);
                listed.push(s..(s + 8192).min(len));
            }
            // Every other round in an encrypted repository: keyed cut points, keyed ids.
            let keys = if round % 2 == 1 {
                Keys::from_master(&[round as u8; 32])
            } else {
                Keys::none()
            };
            patched += check_with(&base, &after, &listed, &keys).is_some() as usize;
        }
        assert!(patched >= 30, "only {patched} of 40 patched");
    }

    #[test]
    fn zeros_written_or_too_much_changed_mean_a_whole_read() {
        let len = 4 << 20;
        let base = noise(len, 5);
        // A long zero run written: the segment is no longer one data run.
        let mut after = base.clone();
        after[1 << 20..(1 << 20) + (256 << 10)].fill(0);
        assert_eq!(
            check(&base, &after, &[1 << 20..(1 << 20) + (256 << 10)]),
            None
        );
        // One zeroed block: it could join a short run next to it; not worth proving otherwise.
        let mut after = base.clone();
        after[8192..12288].fill(0);
        assert_eq!(check(&base, &after, &[8192..12288]), None);
        // Most of the segment changed.
        let ranges = [0..len - (256 << 10)];
        let after = changed_copy(&base, &ranges, 9);
        assert_eq!(check(&base, &after, &ranges), None);
    }

    #[test]
    fn leaves_that_do_not_match_the_previous_fingerprint_are_not_used() {
        let p = ChunkerParams::default();
        let key = fingerprint_key(&p, &Keys::none());
        let base = noise(4 << 20, 8);
        let (prev, mut prev_leaves) = full(&base, &p, &key);
        prev_leaves[3][0] ^= 1;
        assert!(patch_from(&prev, &prev_leaves, &base, &[0..10]).is_none());
    }
}
