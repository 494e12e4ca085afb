//! Cutting one segment of a disk into extents: all-zero runs (recorded, never hashed or stored)
//! and FastCDC chunks of everything else, plus the segment's content fingerprint.
//!
//! The result depends only on the segment's bytes and the repository's [`ChunkerParams`], never
//! on how the source file is allocated, so the same guest data always yields the same chunks.

use std::ops::Range;

use crate::repo::config::{ChunkerParams, CutPoints};
use crate::repo::crypto::{GearTables, Keys};
use crate::repo::id::ObjectId;
use crate::repo::manifest::Extent;

/// A run of a segment: zeros, or data to be chunked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Run {
    /// All-zero bytes (holes included).
    Zero(Range<usize>),
    /// Bytes that go to the chunker.
    Data(Range<usize>),
}

pub use crate::zero::is_zero;

/// Splits `buf` (one segment) into zero and data runs. `hole(i)` says block `i` is a known hole
/// (already zero in `buf`, not read). Zero runs shorter than `zero_run_min` stay inside data.
pub fn runs(buf: &[u8], params: &ChunkerParams, hole: impl Fn(usize) -> bool) -> Vec<Run> {
    let zb = params.zero_block as usize;
    let min_zero = params.zero_run_min as usize;
    let mut out: Vec<Run> = Vec::new();
    let mut push = |r: Run| match (out.last_mut(), &r) {
        (Some(Run::Data(last)), Run::Data(new)) if last.end == new.start => last.end = new.end,
        _ => out.push(r),
    };
    let nblocks = buf.len().div_ceil(zb);
    let mut zero_start: Option<usize> = None;
    let mut data_start: Option<usize> = None;
    for i in 0..=nblocks {
        let start = i * zb;
        let zero = i < nblocks && (hole(i) || is_zero(&buf[start..(start + zb).min(buf.len())]));
        let end = start.min(buf.len());
        if zero {
            if zero_start.is_none() {
                zero_start = Some(start);
            }
            continue;
        }
        // A non-zero block (or the end): close the zero run, if any.
        if let Some(z) = zero_start.take() {
            if end - z >= min_zero || (z == 0 && end == buf.len() && i == nblocks) {
                if let Some(d) = data_start.take() {
                    push(Run::Data(d..z));
                }
                push(Run::Zero(z..end));
            } else if data_start.is_none() {
                data_start = Some(z);
            }
        }
        if i < nblocks && data_start.is_none() {
            data_start = Some(start);
        }
    }
    if let Some(d) = data_start {
        push(Run::Data(d..buf.len()));
    }
    out
}

pub use crate::repo::fingerprint::key as fingerprint_key;

/// Keyed hash of a segment's runs and data bytes: equal fingerprints mean equal segments.
pub fn fingerprint(key: &[u8; 32], buf: &[u8], runs: &[Run]) -> [u8; 32] {
    use crate::repo::fingerprint::{hash, Piece};
    hash(
        key,
        buf.len() as u64,
        runs.iter().map(|r| match r {
            Run::Zero(z) => Piece::Zero((z.end - z.start) as u64),
            Run::Data(d) => Piece::Data(&buf[d.clone()]),
        }),
    )
}

/// A chunk cut from a data run.
pub struct Cut {
    /// Byte range in the segment buffer.
    pub range: Range<usize>,
    /// BLAKE3 of the bytes.
    pub id: ObjectId,
}

/// FastCDC (the fastcdc crate's v2020 algorithm, normalization level 1) with the repository's
/// gear table: the published one, or an encrypted repository's secret one (keyed cut points).
/// With the published table it cuts exactly where `fastcdc::v2020::FastCDC` cuts.
pub struct Cutter<'a> {
    min: usize,
    avg: usize,
    max: usize,
    /// The stricter mask (before the average size) and the looser one (after).
    mask_s: u64,
    mask_l: u64,
    gear: &'a GearTables,
}

impl<'a> Cutter<'a> {
    /// The cutter of a repository with `params` and `keys`.
    pub fn new(params: &ChunkerParams, keys: &'a Keys) -> Cutter<'a> {
        use fastcdc::v2020 as cdc;
        let bits = cdc::logarithm2(params.avg_size) as usize;
        let gear = match params.cut_points {
            CutPoints::Public => public_gear(),
            // Config::load refuses keyed cut points in a repository without a key.
            CutPoints::Keyed => keys
                .gear()
                .expect("keyed cut points only in encrypted repositories"),
        };
        Cutter {
            min: params.min_size as usize,
            avg: params.avg_size as usize,
            max: params.max_size as usize,
            mask_s: cdc::MASKS[bits + 1],
            mask_l: cdc::MASKS[bits - 1],
            gear,
        }
    }

    /// The length of the first chunk of `data` (not empty): where `fastcdc::v2020::cut_gear`
    /// cuts, found by [`Cutter::search_pairwise`].
    pub fn first_chunk(&self, data: &[u8]) -> usize {
        let mut end = data.len();
        if end <= self.min {
            return end;
        }
        let mut center = self.avg;
        if end > self.max {
            end = self.max;
        } else if end < center {
            center = end;
        }
        // The search runs over byte pairs: from the pair holding `min` to the last whole pair
        // before `end`, with the stricter mask before the pair holding `center`.
        let start = self.min / 2 * 2;
        let looser = (center / 2 * 2).max(start);
        let last = end / 2 * 2;
        match self.search_pairwise(data, start, looser, self.mask_s, 0) {
            Ok(cut) => cut,
            Err(hash) => self
                .search_pairwise(data, looser, last, self.mask_l, hash)
                .unwrap_or(end),
        }
    }

    /// The first cut in `data[from..to)` (`from` and `to` even) with `mask`, the rolling hash
    /// being `hash` before `from`; or the hash at `to`. The gear hash of a position depends on
    /// the 64 bytes before it alone (each byte shifts the older ones one bit further out of 64),
    /// so two stretches of [`LANE`] bytes are searched at once, the second starting from a hash
    /// rebuilt from the 64 bytes before it: two independent chains of additions keep the core
    /// busier than one (1.2-1.4x the throughput of FastCDC's loop in `cargo bench --bench
    /// pipeline`). When either lane meets a cut, the pair of stretches is searched again in
    /// order, one byte pair at a time, so the first cut wins.
    fn search_pairwise(
        &self,
        data: &[u8],
        mut from: usize,
        to: usize,
        mask: u64,
        mut hash: u64,
    ) -> std::result::Result<usize, u64> {
        let (gear, gear_ls) = (&self.gear[0], &self.gear[1]);
        let mask_ls = mask << 1;
        while from + 2 * LANE <= to {
            let second = from + LANE;
            // The second lane's hash before `second`, from the 64 bytes that still count in it.
            let mut h2 = pairs(&data[second - 64..second]).fold(0u64, |h, (a, b)| {
                (h << 2)
                    .wrapping_add(gear_ls[a as usize])
                    .wrapping_add(gear[b as usize])
            });
            let mut h1 = hash;
            let mut met = false;
            for ((a1, b1), (a2, b2)) in
                pairs(&data[from..second]).zip(pairs(&data[second..second + LANE]))
            {
                let x1 = (h1 << 2).wrapping_add(gear_ls[a1 as usize]);
                let x2 = (h2 << 2).wrapping_add(gear_ls[a2 as usize]);
                let y1 = x1.wrapping_add(gear[b1 as usize]);
                let y2 = x2.wrapping_add(gear[b2 as usize]);
                if (x1 & mask_ls == 0) | (y1 & mask == 0) | (x2 & mask_ls == 0) | (y2 & mask == 0) {
                    met = true;
                    break;
                }
                h1 = y1;
                h2 = y2;
            }
            if met {
                let both = self
                    .search_serially(data, from, second, mask, hash)
                    .or_else(|h| self.search_serially(data, second, second + LANE, mask, h));
                match both {
                    Ok(cut) => return Ok(cut),
                    Err(h) => h2 = h,
                }
            }
            hash = h2;
            from = second + LANE;
        }
        self.search_serially(data, from, to, mask, hash)
    }

    /// [`Cutter::search_pairwise`] one byte pair at a time: FastCDC's own loop.
    fn search_serially(
        &self,
        data: &[u8],
        from: usize,
        to: usize,
        mask: u64,
        mut hash: u64,
    ) -> std::result::Result<usize, u64> {
        let (gear, gear_ls) = (&self.gear[0], &self.gear[1]);
        let mask_ls = mask << 1;
        for (i, (a, b)) in pairs(&data[from..to]).enumerate() {
            hash = (hash << 2).wrapping_add(gear_ls[a as usize]);
            if hash & mask_ls == 0 {
                return Ok(from + 2 * i);
            }
            hash = hash.wrapping_add(gear[b as usize]);
            if hash & mask == 0 {
                return Ok(from + 2 * i + 1);
            }
        }
        Err(hash)
    }

    /// The chunks of `data`, in order, as ranges of it.
    pub fn chunks<'d>(&'d self, data: &'d [u8]) -> impl Iterator<Item = Range<usize>> + 'd {
        let mut at = 0;
        std::iter::from_fn(move || {
            if at == data.len() {
                return None;
            }
            let len = self.first_chunk(&data[at..]);
            at += len;
            Some(at - len..at)
        })
    }
}

/// Bytes each of the two lanes of [`Cutter::search_pairwise`] covers per step (at least 64).
const LANE: usize = 512;

/// The byte pairs of `data` (even length).
fn pairs(data: &[u8]) -> impl Iterator<Item = (u8, u8)> + '_ {
    data.chunks_exact(2).map(|p| (p[0], p[1]))
}

/// FastCDC's published gear tables, built once.
fn public_gear() -> &'static GearTables {
    static TABLES: std::sync::OnceLock<Box<GearTables>> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let (gear, gear_ls) = fastcdc::v2020::get_gear_with_seed(0);
        Box::new([*gear, *gear_ls])
    })
}

/// Cuts data runs with FastCDC and hashes every chunk (keyed when `keys` say so). Returns the
/// segment's extents and the chunks (in order) so the caller can store the new ones.
pub fn cut(
    buf: &[u8],
    runs: &[Run],
    params: &ChunkerParams,
    keys: &Keys,
) -> (Vec<Extent>, Vec<Cut>) {
    let cutter = Cutter::new(params, keys);
    let mut extents = Vec::new();
    let mut cuts = Vec::new();
    for r in runs {
        match r {
            Run::Zero(z) => extents.push(Extent::Zero {
                len: (z.end - z.start) as u32,
            }),
            Run::Data(d) => {
                for c in cutter.chunks(&buf[d.clone()]) {
                    let range = d.start + c.start..d.start + c.end;
                    let id = keys.id_of(&buf[range.clone()]);
                    extents.push(Extent::Data {
                        len: range.len() as u32,
                        id,
                    });
                    cuts.push(Cut { range, id });
                }
            }
        }
    }
    (extents, cuts)
}

/// Deterministic pseudo-random bytes (xorshift) for unit tests.
#[cfg(test)]
pub(crate) fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ChunkerParams {
        ChunkerParams::default()
    }

    #[test]
    fn public_cut_points_are_fastcdc_s() {
        let none = Keys::none();
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("{i} lines of text\n").into_bytes())
            .collect();
        let lengths = [
            100, 4095, 4096, 4097, 4098, 5000, 16383, 16384, 16385, 65535, 65536, 65537, 70_001,
        ];
        let mut inputs: Vec<Vec<u8>> = vec![noise(3 << 20, 1), text, vec![0; 300_000]];
        for (i, len) in lengths.iter().enumerate() {
            inputs.push(noise(*len, 10 + i as u64));
        }
        for data in &inputs {
            let ours: Vec<_> = Cutter::new(&params(), &none).chunks(data).collect();
            let theirs: Vec<_> = fastcdc::v2020::FastCDC::new(data, 4 << 10, 16 << 10, 64 << 10)
                .map(|c| c.offset..c.offset + c.length)
                .collect();
            assert_eq!(ours, theirs, "{} bytes", data.len());
        }
    }

    /// The two-lane search against FastCDC's own loop, first cut by first cut: random sizes
    /// and bounds (odd ones too), random and repetitive bytes, both gear tables. Every place a
    /// cut can fall relative to the lanes (first pair, last pair, the rebuilt hash's start, the
    /// serial tail, the mask change) is met many times over.
    #[test]
    fn the_two_lane_search_cuts_where_fastcdc_does() {
        use fastcdc::v2020 as cdc;
        let keys = [Keys::none(), Keys::from_master(&[7; 32])];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut cuts = 0;
        for trial in 0..3_000u64 {
            let avg = 1u32 << (8 + next(9));
            let min = (avg / 4 + next(2) as u32).max(2);
            let max = avg * 2 + next(u64::from(avg) * 4) as u32 + 1;
            let keyed = trial % 2 == 1;
            let params = ChunkerParams {
                min_size: min,
                avg_size: avg,
                max_size: max,
                cut_points: if keyed {
                    CutPoints::Keyed
                } else {
                    CutPoints::Public
                },
                ..params()
            };
            let cutter = Cutter::new(&params, &keys[usize::from(keyed)]);
            let len = next(u64::from(max) * 3) as usize;
            let data: Vec<u8> = match trial % 5 {
                // Few distinct bytes: hashes repeat, cuts come rarely or at once.
                0 => (0..len).map(|_| next(3) as u8).collect(),
                1 => (0..len)
                    .map(|i| (i % 7) as u8 ^ (next(50) == 0) as u8)
                    .collect(),
                _ => noise(len, trial),
            };
            let mut at = 0;
            while at < data.len() {
                let rest = &data[at..];
                let (_, theirs) = cdc::cut_gear(
                    rest,
                    min as usize,
                    avg as usize,
                    max as usize,
                    cutter.mask_s,
                    cutter.mask_l,
                    cutter.mask_s << 1,
                    cutter.mask_l << 1,
                    &cutter.gear[0],
                    &cutter.gear[1],
                );
                let ours = cutter.first_chunk(rest);
                assert_eq!(
                    ours,
                    theirs,
                    "trial {trial}: min {min} avg {avg} max {max}, {} bytes left at {at}",
                    rest.len()
                );
                at += ours;
                cuts += 1;
            }
        }
        assert!(cuts > 10_000, "only {cuts} cuts compared");
    }

    #[test]
    fn keyed_cut_points_differ_between_keys_and_keep_the_size_bounds() {
        let keyed = ChunkerParams {
            cut_points: CutPoints::Keyed,
            ..params()
        };
        let data = noise(4 << 20, 9);
        let (a, b) = (Keys::from_master(&[1; 32]), Keys::from_master(&[2; 32]));
        let cuts_a: Vec<_> = Cutter::new(&keyed, &a).chunks(&data).collect();
        let cuts_b: Vec<_> = Cutter::new(&keyed, &b).chunks(&data).collect();
        let public: Vec<_> = Cutter::new(&params(), &a).chunks(&data).collect();
        assert_eq!(
            cuts_a,
            Cutter::new(&keyed, &a).chunks(&data).collect::<Vec<_>>()
        );
        let ends = |c: &[Range<usize>]| {
            c.iter()
                .map(|r| r.end)
                .collect::<std::collections::HashSet<_>>()
        };
        // Random data: a few cut points may coincide by chance, most must not.
        let shared_ab = ends(&cuts_a).intersection(&ends(&cuts_b)).count();
        let shared_pub = ends(&cuts_a).intersection(&ends(&public)).count();
        assert!(
            shared_ab * 10 < cuts_a.len(),
            "{shared_ab} of {}",
            cuts_a.len()
        );
        assert!(
            shared_pub * 10 < cuts_a.len(),
            "{shared_pub} of {}",
            cuts_a.len()
        );
        for c in [&cuts_a, &cuts_b] {
            assert_eq!(c.last().unwrap().end, data.len());
            for r in &c[..c.len() - 1] {
                assert!((4 << 10..=64 << 10).contains(&r.len()), "{r:?}");
            }
            // About the average size the parameters ask for.
            let avg = data.len() / c.len();
            assert!((10 << 10..24 << 10).contains(&avg), "{avg}");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[1000] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn long_zero_runs_split_data_and_short_ones_do_not() {
        let p = params();
        let mut buf = noise(1 << 20, 1);
        buf[100 << 10..300 << 10].fill(0); // 200 KiB: a zero run
        buf[500 << 10..508 << 10].fill(0); // 8 KiB: stays in data
        let r = runs(&buf, &p, |_| false);
        assert_eq!(
            r,
            vec![
                Run::Data(0..100 << 10),
                Run::Zero(100 << 10..300 << 10),
                Run::Data(300 << 10..1 << 20)
            ]
        );
    }

    #[test]
    fn all_zero_and_holes() {
        let p = params();
        let buf = vec![0u8; 1 << 20];
        assert_eq!(runs(&buf, &p, |_| false), vec![Run::Zero(0..1 << 20)]);
        assert_eq!(runs(&buf, &p, |_| true), vec![Run::Zero(0..1 << 20)]);
        // A short zero segment (tail of a disk) is still all zero.
        assert_eq!(runs(&buf[..8192], &p, |_| false), vec![Run::Zero(0..8192)]);
    }

    #[test]
    fn cutting_covers_everything_and_is_deterministic() {
        let p = params();
        let mut buf = noise(3 << 20, 7);
        buf[1 << 20..2 << 20].fill(0);
        let r = runs(&buf, &p, |_| false);
        let (ext, cuts) = cut(&buf, &r, &p, &Keys::none());
        assert_eq!(
            ext.iter().map(|e| e.len() as usize).sum::<usize>(),
            buf.len()
        );
        assert!(cuts.iter().all(|c| c.range.len() <= p.max_size as usize));
        let (ext2, _) = cut(&buf, &r, &p, &Keys::none());
        assert_eq!(ext, ext2);
        let k = fingerprint_key(&p, &Keys::none());
        assert_eq!(
            fingerprint(&k, &buf, &r),
            fingerprint(&k, &buf, &runs(&buf, &p, |_| false))
        );
        let mut other = buf.clone();
        other[5] ^= 1;
        assert_ne!(
            fingerprint(&k, &buf, &r),
            fingerprint(&k, &other, &runs(&other, &p, |_| false))
        );
    }

    #[test]
    fn local_change_keeps_most_chunks() {
        let p = params();
        let a = noise(4 << 20, 3);
        let mut b = a.clone();
        b[2 << 20..(2 << 20) + 4096].copy_from_slice(&noise(4096, 9));
        let ra = runs(&a, &p, |_| false);
        let rb = runs(&b, &p, |_| false);
        let (_, ca) = cut(&a, &ra, &p, &Keys::none());
        let (_, cb) = cut(&b, &rb, &p, &Keys::none());
        let set: std::collections::HashSet<_> = ca.iter().map(|c| c.id).collect();
        let changed = cb.iter().filter(|c| !set.contains(&c.id)).count();
        assert!(changed <= 3, "{changed} chunks changed for a 4 KiB edit");
    }
}
