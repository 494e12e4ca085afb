//! What every grain-table format shares (KDMV, COWD, seSparse, qcow2): a lookup from grain number
//! to "absent / zero / at this file offset / compressed there", turned into a [`Layer`] that
//! coalesces runs of grains stored back to back into single large reads, fetches the compressed
//! grains of one read with one request per stretch of the file they lie in and decompresses them
//! in parallel (rayon), plus a bounded cache of loaded tables.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{push_span, Layer, RandomRead, Span, State};
use crate::error::Result;

/// Where a grain's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Not in this layer (the parent's bytes, or zeros without a parent).
    Absent,
    /// Zeros, hiding the parent.
    Zero,
    /// Stored uncompressed at this byte offset of the file.
    At(u64),
    /// Stored compressed; the value is format-specific (a byte offset, or a qcow2 descriptor).
    Packed(u64),
}

/// A grain-table format.
pub trait GrainFormat: Send + Sync {
    /// The file the grains are in.
    fn file(&self) -> &dyn RandomRead;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Grain size in bytes (a power of two).
    fn grain_bytes(&self) -> u64;
    /// The grain `index` and how many grains from `index` on share the same answer (≥ 1): a
    /// run of `Absent`/`Zero` grains (such as a missing grain table), or of `At` grains stored
    /// back to back in the file (the offset is the first one's). `Packed` answers are single.
    fn lookup(&self, index: u64) -> Result<(Grain, u64)>;
    /// The bytes of the file the grain stored as `Packed(v)` lies in: where it starts, and an
    /// end at or after its real end (the largest size the format allows, when the size is
    /// stored with the grain). Compressed grains whose spans are close are read with one
    /// request. Empty (the default) for formats without compressed grains.
    fn packed_span(&self, v: u64) -> Range<u64> {
        v..v
    }
    /// Decompresses the grain `index` stored as `Packed(v)` into `out` (the grain's bytes,
    /// shorter than a grain only for the last one), reading its stored bytes through `src`:
    /// the file, or a stretch of it already read.
    fn unpack(&self, index: u64, v: u64, src: &dyn RandomRead, out: &mut [u8]) -> Result<()>;
}

/// A stretch of the file read with one request, for the compressed grains that lie in it;
/// reads outside it go to the file.
struct Window<'a> {
    file: &'a dyn RandomRead,
    start: u64,
    bytes: Vec<u8>,
}

impl RandomRead for Window<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn len(&self) -> u64 {
        self.file.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inside = offset
            .checked_sub(self.start)
            .and_then(|at| usize::try_from(at).ok())
            .filter(|&at| at.saturating_add(buf.len()) <= self.bytes.len());
        match inside {
            Some(at) => {
                buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
                Ok(())
            }
            None => self.file.read_exact_at(buf, offset),
        }
    }

    fn read_cow(&self, offset: u64, len: u64, what: &str) -> Result<Cow<'_, [u8]>> {
        let inside = offset
            .checked_sub(self.start)
            .and_then(|at| usize::try_from(at).ok())
            .filter(|&at| (at as u64).saturating_add(len) <= self.bytes.len() as u64);
        match inside {
            Some(at) => Ok(Cow::Borrowed(&self.bytes[at..at + len as usize])),
            None => self.file.read_cow(offset, len, what),
        }
    }
}

/// Largest stretch of the file read with one request for compressed grains: a segment's
/// grains come in a few stretches, read in parallel with inflating the others.
const WINDOW_MAX: u64 = 1 << 20;
/// Bytes between two compressed grains' spans up to which one request covers both (read and
/// dropped); at least one stored-size bound of a 64 KiB grain, so an over-estimated span does
/// not end a window.
const WINDOW_GAP: u64 = 256 << 10;

/// Groups `spans` (file byte ranges, in the order the grains are met) into stretches read with
/// one request: each span starts at or after the previous one and within [`WINDOW_GAP`] of the
/// stretch so far, and a stretch stays under [`WINDOW_MAX`]. Returns, per stretch, its file
/// range and the indices of its spans; empty spans belong to none.
fn windows(spans: &[Range<u64>]) -> Vec<(Range<u64>, Vec<usize>)> {
    let mut out: Vec<(Range<u64>, Vec<usize>)> = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        if s.start >= s.end {
            continue;
        }
        match out.last_mut() {
            Some((w, members))
                if s.start >= w.start
                    && s.start <= w.end.saturating_add(WINDOW_GAP)
                    && s.end.max(w.end) - w.start <= WINDOW_MAX =>
            {
                w.end = w.end.max(s.end);
                members.push(i);
            }
            _ => out.push((s.clone(), vec![i])),
        }
    }
    out
}

/// A [`GrainFormat`] as a [`Layer`].
pub struct GrainLayer<F: GrainFormat>(pub F);

impl<F: GrainFormat> GrainLayer<F> {
    /// Calls `f(first_grain, count, grain)` for consecutive runs of grains covering `range`.
    fn walk(
        &self,
        range: Range<u64>,
        mut f: impl FnMut(u64, u64, Grain) -> Result<()>,
    ) -> Result<()> {
        let gb = self.0.grain_bytes();
        let end = range.end.min(self.0.size());
        if range.start >= end {
            return Ok(());
        }
        let mut g = range.start / gb;
        let last = (end - 1) / gb;
        while g <= last {
            let (grain, n) = self.0.lookup(g)?;
            let n = n.clamp(1, last - g + 1);
            f(g, n, grain)?;
            g += n;
        }
        Ok(())
    }
}

/// A compressed grain to decompress into part of a read buffer.
struct Packed {
    /// Grain number.
    g: u64,
    /// Its [`Grain::Packed`] value.
    v: u64,
    /// The guest bytes of the grain that the read wants.
    range: Range<u64>,
}

impl<F: GrainFormat> GrainLayer<F> {
    /// The stretches of the file ([`windows`]) that hold the compressed grains stored as
    /// `Packed(v)` for each `v` in `vs` (in the order met), their spans cut at the file's end.
    fn stretches(&self, vs: impl Iterator<Item = u64>) -> Vec<(Range<u64>, Vec<usize>)> {
        let flen = self.0.file().len();
        let spans: Vec<Range<u64>> = vs
            .map(|v| {
                let s = self.0.packed_span(v);
                s.start.min(flen)..s.end.min(flen)
            })
            .collect();
        windows(&spans)
    }

    /// Decompresses `packed` (in guest order, disjoint, inside the read) into `buf`, which holds
    /// the guest bytes from `offset` on. Their stored bytes are read first, one request per
    /// stretch of the file they lie in ([`windows`]). Grains are independent, so they are
    /// decompressed in parallel, each into its own slice of `buf`; a grain the read covers only
    /// in part goes through a buffer of its own. On failure the error of the first bad grain is
    /// returned.
    fn unpack_all(&self, packed: Vec<Packed>, buf: &mut [u8], offset: u64) -> Result<()> {
        let gb = self.0.grain_bytes();
        let size = self.0.size();
        let file = self.0.file();
        let stretches = self.stretches(packed.iter().map(|p| p.v));
        let mut source: Vec<Option<usize>> = vec![None; packed.len()];
        for (w, (_, members)) in stretches.iter().enumerate() {
            for &m in members {
                source[m] = Some(w);
            }
        }
        let one = |(p, out): (Packed, &mut [u8]), src: &dyn RandomRead| -> Result<()> {
            let start = p.g * gb;
            let glen = gb.min(size - start) as usize;
            if p.range.start == start && out.len() == glen {
                return self.0.unpack(p.g, p.v, src, out);
            }
            let mut whole = vec![0u8; glen];
            self.0.unpack(p.g, p.v, src, &mut whole)?;
            let from = (p.range.start - start) as usize;
            out.copy_from_slice(&whole[from..from + out.len()]);
            Ok(())
        };
        let mut jobs = Vec::with_capacity(packed.len());
        let mut rest = buf;
        let mut at = offset;
        for p in packed {
            let skip = (p.range.start - at) as usize;
            let len = (p.range.end - p.range.start) as usize;
            let (out, tail) = std::mem::take(&mut rest)[skip..].split_at_mut(len);
            at = p.range.end;
            rest = tail;
            jobs.push((p, out));
        }
        if jobs.len() <= 1 && stretches.is_empty() {
            return jobs.into_iter().try_for_each(|j| one(j, file));
        }
        // One task per stretch: it reads the stretch, then inflates its grains in parallel, so
        // reading one stretch overlaps inflating another. Grains outside every stretch read
        // their own bytes. Results keep the grain's position, for the first error in order.
        let mut groups: Vec<(Option<Range<u64>>, Vec<_>)> = stretches
            .into_iter()
            .map(|(range, _)| (Some(range), Vec::new()))
            .collect();
        for (i, (job, w)) in jobs.into_iter().zip(source).enumerate() {
            match w {
                Some(w) => groups[w].1.push((i, job)),
                None => groups.push((None, vec![(i, job)])),
            }
        }
        let mut done: Vec<(usize, Result<()>)> = groups
            .into_par_iter()
            .flat_map_iter(|(range, jobs)| {
                let window = match range {
                    None => None,
                    Some(r) => {
                        let mut bytes = vec![0u8; (r.end - r.start) as usize];
                        if let Err(e) = file.read_exact_at(&mut bytes, r.start) {
                            return vec![(jobs[0].0, Err(e))];
                        }
                        Some(Window {
                            file,
                            start: r.start,
                            bytes,
                        })
                    }
                };
                let src: &dyn RandomRead = match &window {
                    Some(w) => w,
                    None => file,
                };
                jobs.into_par_iter()
                    .map(|(i, job)| (i, one(job, src)))
                    .collect()
            })
            .collect();
        done.sort_unstable_by_key(|(i, _)| *i);
        done.into_iter().try_for_each(|(_, r)| r)
    }
}

impl<F: GrainFormat> Layer for GrainLayer<F> {
    fn path(&self) -> &Path {
        self.0.file().path()
    }

    fn size(&self) -> u64 {
        self.0.size()
    }

    fn map(&self, range: Range<u64>) -> Result<Vec<Span>> {
        let gb = self.0.grain_bytes();
        let size = self.0.size();
        let mut out = Vec::new();
        self.walk(range.clone(), |g, n, grain| {
            let r = (g * gb).max(range.start)..((g + n) * gb).min(range.end).min(size);
            let state = match grain {
                Grain::Absent => State::Absent,
                Grain::Zero => State::Zero,
                Grain::At(_) | Grain::Packed(_) => State::Data,
            };
            push_span(&mut out, r, state);
            Ok(())
        })?;
        Ok(out)
    }

    fn prefetch(&self, range: Range<u64>) {
        let gb = self.0.grain_bytes();
        let end = range.end.min(self.0.size());
        let file = self.0.file();
        // Uncompressed grains back to back in the file become one hint, and so do the
        // compressed grains one read would fetch with one request.
        let mut run: Option<(u64, u64)> = None;
        let mut packed = Vec::new();
        let _ = self.walk(range.clone(), |g, n, grain| {
            match grain {
                Grain::At(fo) => {
                    let from = fo.saturating_add(range.start.saturating_sub(g * gb));
                    let len = ((g + n) * gb).min(end) - (g * gb).max(range.start);
                    match &mut run {
                        Some((s, l)) if s.saturating_add(*l) == from => *l += len,
                        _ => {
                            if let Some((s, l)) = run.replace((from, len)) {
                                file.prefetch(s, l);
                            }
                        }
                    }
                }
                Grain::Packed(v) => packed.push(v),
                Grain::Absent | Grain::Zero => {}
            }
            Ok(())
        });
        if let Some((s, l)) = run {
            file.prefetch(s, l);
        }
        for (w, _) in self.stretches(packed.into_iter()) {
            file.prefetch(w.start, w.end - w.start);
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let gb = self.0.grain_bytes();
        let size = self.0.size();
        let end = offset + buf.len() as u64;
        // A pending run of uncompressed grains contiguous in the file: (guest start, file start, len).
        let mut run: Option<(u64, u64, u64)> = None;
        let file = self.0.file();
        let flush = |run: &mut Option<(u64, u64, u64)>, buf: &mut [u8]| -> Result<()> {
            if let Some((gs, fs, len)) = run.take() {
                let at = (gs - offset) as usize;
                file.read_exact_at(&mut buf[at..at + len as usize], fs)?;
            }
            Ok(())
        };
        // Compressed grains met on the way, decompressed together once the walk is done.
        let mut packed = Vec::new();
        self.walk(offset..end, |g, n, grain| {
            let r = (g * gb).max(offset)..((g + n) * gb).min(end).min(size);
            match grain {
                Grain::At(fo) => {
                    let fs = fo.saturating_add(r.start - g * gb);
                    let len = r.end - r.start;
                    match &mut run {
                        Some((gs, rfs, rlen))
                            if *gs + *rlen == r.start && rfs.checked_add(*rlen) == Some(fs) =>
                        {
                            *rlen += len
                        }
                        _ => {
                            flush(&mut run, buf)?;
                            run = Some((r.start, fs, len));
                        }
                    }
                }
                Grain::Absent | Grain::Zero => {
                    flush(&mut run, buf)?;
                    buf[(r.start - offset) as usize..(r.end - offset) as usize].fill(0);
                }
                Grain::Packed(v) => {
                    flush(&mut run, buf)?;
                    packed.push(Packed { g, v, range: r });
                }
            }
            Ok(())
        })?;
        flush(&mut run, buf)?;
        self.unpack_all(packed, buf, offset)?;
        // Past the layer's end (a parent shorter than its child) reads as zeros.
        if end > size {
            let from = size.saturating_sub(offset) as usize;
            buf[from..].fill(0);
        }
        Ok(())
    }
}

/// Loaded tables by key, and their total entry count.
type Tables = (HashMap<u64, Arc<[u64]>>, usize);

/// Loaded grain tables keyed by their file offset. Bounded: when it holds more than `cap`
/// entries it is emptied, so memory stays flat however large the disk.
pub struct TableCache {
    tables: Mutex<Tables>,
    cap: usize,
}

impl TableCache {
    /// A cache holding up to `cap` table entries in total.
    pub fn new(cap: usize) -> TableCache {
        TableCache {
            tables: Mutex::new((HashMap::new(), 0)),
            cap,
        }
    }

    /// The table at `key`, loading it with `load` when not cached.
    pub fn get(&self, key: u64, load: impl FnOnce() -> Result<Vec<u64>>) -> Result<Arc<[u64]>> {
        if let Some(t) = self.tables.lock().unwrap().0.get(&key) {
            return Ok(t.clone());
        }
        let t: Arc<[u64]> = load()?.into();
        let mut guard = self.tables.lock().unwrap();
        let (map, count) = &mut *guard;
        if *count + t.len() > self.cap {
            map.clear();
            *count = 0;
        }
        *count += t.len();
        map.insert(key, t.clone());
        Ok(t)
    }
}

/// Reads `n` little-endian u32 entries at byte `offset` as u64s.
pub fn read_u32_table(file: &dyn RandomRead, offset: u64, n: u64, what: &str) -> Result<Vec<u64>> {
    let b = file.read_vec(offset, n * 4, what)?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
        .collect())
}

/// Reads `n` u64 entries at byte `offset`, little- or big-endian.
pub fn read_u64_table(
    file: &dyn RandomRead,
    offset: u64,
    n: u64,
    big_endian: bool,
    what: &str,
) -> Result<Vec<u64>> {
    let b = file.read_vec(offset, n * 8, what)?;
    Ok(b.chunks_exact(8)
        .map(|c| {
            let a: [u8; 8] = c.try_into().unwrap();
            if big_endian {
                u64::from_be_bytes(a)
            } else {
                u64::from_le_bytes(a)
            }
        })
        .collect())
}

/// Little-endian field readers over a header buffer.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// See [`le32`].
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Number of entries a grain-table cache may hold (8 Mi entries = 64 MiB).
pub const TABLE_CACHE_ENTRIES: usize = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::source::MemFile;

    const GB: u64 = 4096;
    // The last grain (9, packed) is cut short by the end of the disk.
    const SIZE: u64 = 9 * GB + 1000;

    /// Grain `g` is packed when g % 3 == 0, stored when g % 3 == 1, zero otherwise; a packed
    /// grain "decompresses" to its stored bytes (a pattern of its index, at `g * GB` in the
    /// file), and fails for the grains in `bad`.
    struct Toy {
        file: Counting,
        bad: Vec<u64>,
    }

    /// A file that counts the read requests made of it.
    struct Counting {
        inner: MemFile,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl RandomRead for Counting {
        fn path(&self) -> &Path {
            self.inner.path()
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.read_exact_at(buf, offset)
        }
    }

    fn byte(at: u64) -> u8 {
        let g = at / GB;
        match g % 3 {
            0 => (g * 31 + at % GB * 7) as u8,
            1 => (at % 251) as u8 | 1,
            _ => 0,
        }
    }

    fn toy(bad: Vec<u64>) -> GrainLayer<Toy> {
        let data = (0..SIZE.div_ceil(GB) * GB).map(byte).collect();
        GrainLayer(Toy {
            file: Counting {
                inner: MemFile::new("toy", data),
                reads: Default::default(),
            },
            bad,
        })
    }

    impl GrainFormat for Toy {
        fn file(&self) -> &dyn RandomRead {
            &self.file
        }
        fn size(&self) -> u64 {
            SIZE
        }
        fn grain_bytes(&self) -> u64 {
            GB
        }
        fn lookup(&self, g: u64) -> Result<(Grain, u64)> {
            Ok((
                match g % 3 {
                    0 => Grain::Packed(g),
                    1 => Grain::At(g * GB),
                    _ => Grain::Zero,
                },
                1,
            ))
        }
        fn packed_span(&self, g: u64) -> Range<u64> {
            g * GB..(g + 1) * GB
        }
        fn unpack(&self, g: u64, v: u64, src: &dyn RandomRead, out: &mut [u8]) -> Result<()> {
            assert_eq!(g, v);
            assert_eq!(out.len() as u64, GB.min(SIZE - g * GB), "whole grains only");
            if self.bad.contains(&g) {
                return Err(Error::bad_input("toy", format!("grain {g} is bad")));
            }
            out.copy_from_slice(&src.read_cow(g * GB, out.len() as u64, "grain")?);
            Ok(())
        }
    }

    #[test]
    fn parallel_unpack_fills_every_part_of_the_read() {
        let layer = toy(Vec::new());
        let cuts = [
            0,
            1,
            100,
            GB - 1,
            GB,
            GB + 5,
            3 * GB,
            3 * GB + 17,
            7 * GB - 3,
            SIZE - 1,
        ];
        for &start in &cuts {
            for &end in cuts.iter().chain([SIZE, SIZE + 300].iter()) {
                if end <= start {
                    continue;
                }
                let mut buf = vec![0xAA; (end - start) as usize];
                layer.read(&mut buf, start).unwrap();
                let want: Vec<u8> = (start..end)
                    .map(|a| if a < SIZE { byte(a) } else { 0 })
                    .collect();
                assert!(buf == want, "read {start}..{end}");
            }
        }
    }

    #[test]
    fn parallel_unpack_reports_the_first_bad_grain() {
        let layer = toy(vec![9, 3, 6]);
        let mut buf = vec![0; SIZE as usize];
        for _ in 0..20 {
            let e = layer.read(&mut buf, 0).unwrap_err().to_string();
            assert!(e.contains("grain 3 is bad"), "{e}");
        }
        let e = layer.read(&mut buf[..GB as usize], 9 * GB).unwrap_err();
        assert!(e.to_string().contains("grain 9 is bad"), "{e}");
    }

    #[test]
    fn compressed_grains_of_a_read_are_fetched_with_one_request_per_stretch() {
        let layer = toy(Vec::new());
        let mut buf = vec![0; SIZE as usize];
        layer.read(&mut buf, 0).unwrap();
        assert!(buf.iter().enumerate().all(|(a, &b)| b == byte(a as u64)));
        // Packed grains 0, 3, 6, 9 lie 8 KiB apart: one request. Stored grains 1, 4, 7 are
        // not back to back in the file: one request each.
        let reads = layer
            .0
            .file
            .reads
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reads, 1 + 3);
    }

    #[test]
    fn stretches_follow_the_file_forward_and_stay_bounded() {
        let far = 1u64 << 30;
        let got = windows(&[0..10, 5..20, far..far + 10, 3..4, 7..7, 30..40]);
        let want = vec![
            (0..20, vec![0, 1]),
            (far..far + 10, vec![2]),
            (3..40, vec![3, 5]),
        ];
        assert_eq!(
            got, want,
            "a span going back starts a new stretch; a close one joins; empty ones join none"
        );
        let gap = windows(&[
            0..10,
            10 + WINDOW_GAP..20 + WINDOW_GAP,
            30 + 2 * WINDOW_GAP..31 + 2 * WINDOW_GAP,
        ]);
        assert_eq!(gap.len(), 2, "{gap:?}");
        let half = WINDOW_MAX / 2;
        let cap = windows(&[0..half, half..2 * half, 2 * half..3 * half]);
        assert_eq!(cap.len(), 2, "{cap:?}");
        assert_eq!(cap[0].0, 0..WINDOW_MAX);
    }

    #[test]
    fn a_stretch_serves_what_it_holds_and_sends_the_rest_to_the_file() {
        let file = MemFile::new("f", (0..=255u8).cycle().take(8192).collect());
        let mut bytes = vec![0; 1024];
        file.read_exact_at(&mut bytes, 1000).unwrap();
        let w = Window {
            file: &file,
            start: 1000,
            bytes,
        };
        let inside = w.read_cow(1100, 100, "x").unwrap();
        assert!(matches!(inside, Cow::Borrowed(_)));
        assert_eq!(inside[0], (1100 % 256) as u8);
        let straddling = w.read_cow(1900, 300, "x").unwrap();
        assert!(matches!(straddling, Cow::Owned(_)));
        assert_eq!(straddling[299], (2199 % 256) as u8);
        let mut b = [0u8; 8];
        w.read_exact_at(&mut b, 1016).unwrap();
        assert_eq!(b[0], (1016 % 256) as u8);
        assert!(w.read_exact_at(&mut b, u64::MAX - 2).is_err());
        assert!(w.read_cow(u64::MAX - 2, 8, "x").is_err());
    }
}
