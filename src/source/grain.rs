//! What every grain-table format shares (KDMV, COWD, seSparse, qcow2): a lookup from grain number
//! to "absent / zero / at this file offset / compressed there", turned into a [`Layer`] that
//! coalesces runs of grains stored back to back into single large reads and decompresses the
//! compressed grains of one read in parallel (rayon), plus a bounded cache of loaded tables.

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
    /// Decompresses the grain `index` stored as `Packed(v)` into `out` (the grain's bytes,
    /// shorter than a grain only for the last one).
    fn unpack(&self, index: u64, v: u64, out: &mut [u8]) -> Result<()>;
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
    /// Decompresses `packed` (in guest order, disjoint, inside the read) into `buf`, which holds
    /// the guest bytes from `offset` on. Grains are independent, so they are decompressed in
    /// parallel, each into its own slice of `buf`; a grain the read covers only in part goes
    /// through a buffer of its own. On failure the error of the first bad grain is returned.
    fn unpack_all(&self, packed: Vec<Packed>, buf: &mut [u8], offset: u64) -> Result<()> {
        let gb = self.0.grain_bytes();
        let size = self.0.size();
        let one = |(p, out): (Packed, &mut [u8])| -> Result<()> {
            let start = p.g * gb;
            let glen = gb.min(size - start) as usize;
            if p.range.start == start && out.len() == glen {
                return self.0.unpack(p.g, p.v, out);
            }
            let mut whole = vec![0u8; glen];
            self.0.unpack(p.g, p.v, &mut whole)?;
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
        if jobs.len() <= 1 {
            return jobs.into_iter().try_for_each(one);
        }
        let done: Vec<Result<()>> = jobs.into_par_iter().map(one).collect();
        done.into_iter().collect()
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
        // Uncompressed grains back to back in the file become one hint.
        let mut run: Option<(u64, u64)> = None;
        let _ = self.walk(range.clone(), |g, n, grain| {
            if let Grain::At(fo) = grain {
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
            Ok(())
        });
        if let Some((s, l)) = run {
            file.prefetch(s, l);
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
    /// grain "decompresses" to a pattern of its index, and fails for the grains in `bad`.
    struct Toy {
        file: MemFile,
        bad: Vec<u64>,
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
            file: MemFile::new("toy", data),
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
        fn unpack(&self, g: u64, v: u64, out: &mut [u8]) -> Result<()> {
            assert_eq!(g, v);
            assert_eq!(out.len() as u64, GB.min(SIZE - g * GB), "whole grains only");
            if self.bad.contains(&g) {
                return Err(Error::bad_input("toy", format!("grain {g} is bad")));
            }
            for (i, b) in out.iter_mut().enumerate() {
                *b = byte(g * GB + i as u64);
            }
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
}
