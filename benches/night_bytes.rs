//! Where a night's stored bytes go, and what each chunking choice would make of them: cuts two
//! nights of a flat disk image the way an ingest does (segments, zero runs left out) with
//! each chunk-size setting given, and prints for the second night the chunks no earlier night
//! had (count, plaintext, zstd -3 each as stored, zstd -3 all together, zstd -3 each with the
//! chunk it replaced at the same place as dictionary) and the chunk lists of
//! the segments that changed (36 bytes per chunk), against the floor of exact 4 KiB-block
//! dedup (`fixed/4`: the new aligned 4 KiB blocks, compressed together). Run:
//!
//! `cargo bench --bench night_bytes -- NIGHT1.img NIGHT2.img fixed/4 4/16/64/1 4/8/32/1`
//!
//! A setting is `MIN/AVG/MAX/LEVEL` in KiB with FastCDC's normalization level (vmrepo cuts
//! with level 1), `fixed/KIB` for fixed-size blocks, or `aligned/MIN/AVG/MAX` for cuts made by
//! content but only at 4 KiB-aligned offsets. `seg/MIB` sets the segment size (default 4) for
//! the settings after it.

use std::collections::HashSet;
use std::ops::Range;

use fastcdc::v2020 as cdc;
use rayon::prelude::*;
use vmrepo::ingest::chunker::{runs, Run};
use vmrepo::repo::config::ChunkerParams;

enum Cutting {
    Fixed(usize),
    /// Content-defined, but only at 4 KiB-aligned offsets: a gear hash of 64 bytes sampled
    /// across the 4 KiB block before each candidate decides.
    Aligned {
        min: usize,
        avg: usize,
        max: usize,
    },
    Cdc {
        min: usize,
        avg: usize,
        max: usize,
        level: usize,
    },
}

impl Cutting {
    fn parse(spec: &str) -> Cutting {
        let kib = |s: &str| s.parse::<usize>().expect("a size in KiB") << 10;
        let f: Vec<&str> = spec.split('/').collect();
        match f.as_slice() {
            ["fixed", n] => Cutting::Fixed(kib(n)),
            ["aligned", min, avg, max] => Cutting::Aligned {
                min: kib(min),
                avg: kib(avg),
                max: kib(max),
            },
            [min, avg, max, level] => Cutting::Cdc {
                min: kib(min),
                avg: kib(avg),
                max: kib(max),
                level: level.parse().expect("a normalization level"),
            },
            _ => panic!("{spec}: not MIN/AVG/MAX/LEVEL or fixed/KIB"),
        }
    }

    fn cut(&self, data: &[u8]) -> Vec<Range<usize>> {
        match *self {
            Cutting::Fixed(n) => (0..data.len())
                .step_by(n)
                .map(|s| s..(s + n).min(data.len()))
                .collect(),
            Cutting::Aligned { min, avg, max } => {
                const B: usize = 4096;
                let gear = cdc::get_gear_with_seed(0).0;
                let bits = (avg / B).trailing_zeros();
                let hit = |block: &[u8], nbits: u32| {
                    let mut h = 0u64;
                    for i in 0..64 {
                        h = (h << 1).wrapping_add(gear[block[i * 64 + 63] as usize]);
                    }
                    h >> (64 - nbits) == 0
                };
                let mut out = Vec::new();
                let mut at = 0;
                while at < data.len() {
                    let rest = data.len() - at;
                    let mut n = rest.min(max);
                    let mut p = min;
                    while p < rest.min(max) {
                        let nbits = if p < avg { bits + 1 } else { bits.max(2) - 1 };
                        if hit(&data[at + p - B..at + p], nbits) {
                            n = p;
                            break;
                        }
                        p += B;
                    }
                    out.push(at..at + n);
                    at += n;
                }
                out
            }
            Cutting::Cdc {
                min,
                avg,
                max,
                level,
            } => {
                let bits = cdc::logarithm2(avg as u32) as usize;
                let (ms, ml) = (cdc::MASKS[bits + level], cdc::MASKS[bits - level]);
                let (g, gl) = cdc::get_gear_with_seed(0);
                let mut out = Vec::new();
                let mut at = 0;
                while at < data.len() {
                    let (_, n) = cdc::cut_gear(
                        &data[at..],
                        min,
                        avg,
                        max,
                        ms,
                        ml,
                        ms << 1,
                        ml << 1,
                        &g,
                        &gl,
                    );
                    out.push(at..at + n);
                    at += n;
                }
                out
            }
        }
    }

    /// The chunks of one segment as (id, range), zero runs left out as an ingest does.
    fn segment(&self, params: &ChunkerParams, seg: &[u8]) -> Vec<([u8; 32], Range<usize>)> {
        let mut out = Vec::new();
        for r in runs(seg, params, |_| false) {
            if let Run::Data(d) = r {
                for c in self.cut(&seg[d.clone()]) {
                    let c = d.start + c.start..d.start + c.end;
                    out.push((*blake3::hash(&seg[c.clone()]).as_bytes(), c));
                }
            }
        }
        out
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.len() < 3 {
        eprintln!("usage: cargo bench --bench night_bytes -- NIGHT1.img NIGHT2.img SETTING...");
        return;
    }
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (before, after) = (read(&args[0]), read(&args[1]));
    let mut params = ChunkerParams::default();
    println!(
        "| setting | mean chunk KiB | new chunks | plaintext MB | stored (zstd -3 each) MB | zstd -3 together MB | against the replaced chunk MB | changed segments | their chunk lists MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for spec in &args[2..] {
        if let Some(mib) = spec.strip_prefix("seg/") {
            params.segment_size = mib.parse::<u32>().expect("a segment size in MiB") << 20;
            println!("| segments of {mib} MiB from here on | | | | | | | | |");
            continue;
        }
        let seg = params.segment_size as usize;
        let cutting = Cutting::parse(spec);
        let old: Vec<_> = before
            .par_chunks(seg)
            .map(|s| cutting.segment(&params, s))
            .collect();
        let known: HashSet<[u8; 32]> = old.iter().flatten().map(|c| c.0).collect();
        let segments: Vec<_> = after
            .par_chunks(seg)
            .map(|s| (s, cutting.segment(&params, s)))
            .collect();
        let (mut chunks, mut bytes) = (0usize, 0usize);
        let mut fresh = HashSet::new();
        let mut new: Vec<&[u8]> = Vec::new();
        let mut against: Vec<Option<&[u8]>> = Vec::new();
        let (mut changed, mut listed) = (0usize, 0usize);
        for (k, (s, cs)) in segments.iter().enumerate() {
            chunks += cs.len();
            bytes += cs.iter().map(|c| c.1.len()).sum::<usize>();
            let mut dirty = false;
            for (id, r) in cs {
                if !known.contains(id) {
                    dirty = true;
                    if fresh.insert(*id) {
                        new.push(&s[r.clone()]);
                        // The previous night's chunk overlapping this one most, at the same
                        // place of the disk.
                        let base = old.get(k).and_then(|prev| {
                            prev.iter()
                                .map(|(_, p)| {
                                    (r.end.min(p.end).saturating_sub(r.start.max(p.start)), p)
                                })
                                .filter(|(o, _)| *o > 0)
                                .max_by_key(|(o, _)| *o)
                                .map(|(_, p)| &before[k * seg + p.start..k * seg + p.end])
                        });
                        against.push(base);
                    }
                }
            }
            if dirty {
                changed += 1;
                listed += 44 + 36 * cs.len();
            }
        }
        let plain: usize = new.iter().map(|c| c.len()).sum();
        let each: usize = new
            .par_iter()
            .map(|c| zstd::bulk::compress(c, 3).unwrap().len())
            .sum();
        let together = zstd::bulk::compress(&new.concat(), 3).unwrap().len();
        // Each new chunk compressed with the chunk it replaced as zstd's dictionary (32 bytes
        // more to name it), or alone where that is not smaller.
        let delta: usize = new
            .par_iter()
            .zip(&against)
            .map(|(c, base)| {
                let alone = zstd::bulk::compress(c, 3).unwrap().len();
                match base {
                    Some(b) => {
                        let mut z = zstd::bulk::Compressor::with_dictionary(3, b).unwrap();
                        (z.compress(c).unwrap().len() + 32).min(alone)
                    }
                    None => alone,
                }
            })
            .sum();
        let mb = |n: usize| n as f64 / 1e6;
        println!(
            "| {spec} | {:.1} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {changed} | {:.2} |",
            bytes as f64 / chunks.max(1) as f64 / 1024.0,
            new.len(),
            mb(plain),
            mb(each),
            mb(together),
            mb(delta),
            mb(listed)
        );
    }
}
