//! Throughput of each ingest stage on one core: FastCDC cutting, BLAKE3 hashing, zstd
//! compression (levels 1 and 3), zero detection, the whole segment path (runs, fingerprint,
//! cut + hash), and the object codec with and without AES-256-GCM. Run:
//! `cargo bench --bench pipeline`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

use vmrepo::ingest::chunker;
use vmrepo::repo::config::ChunkerParams;

/// 16 MiB of disk-like data: half text-like (compressible), half random.
fn sample() -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut out = Vec::with_capacity(16 << 20);
    let words = b"the quick brown fox jumps over the lazy dog; kernel: ext4-fs mounted filesystem ";
    while out.len() < 16 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (out.len() >> 16) % 2 == 0 {
            let i = (x % (words.len() as u64 - 8)) as usize;
            out.extend_from_slice(&words[i..i + 8]);
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

fn stages(c: &mut Criterion) {
    let data = sample();
    let p = ChunkerParams::default();
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(20);
    g.bench_function("fastcdc_default_params", |b| {
        b.iter(|| {
            fastcdc::v2020::FastCDC::new(black_box(&data), p.min_size, p.avg_size, p.max_size)
                .count()
        })
    });
    // The same cut points through vmrepo's own loop (ingest/chunker.rs), which also serves the
    // keyed gear table of encrypted repositories.
    let none = vmrepo::repo::crypto::Keys::none();
    let cutter = chunker::Cutter::new(&p, &none);
    g.bench_function("cutter_public_gear", |b| {
        b.iter(|| cutter.chunks(black_box(&data)).count())
    });
    g.bench_function("blake3_64k_chunks", |b| {
        b.iter(|| {
            data.chunks(64 << 10)
                .map(|c| blake3::hash(black_box(c)).as_bytes()[0])
                .fold(0u8, |a, x| a ^ x)
        })
    });
    for level in [1, 3] {
        g.bench_with_input(
            BenchmarkId::new("zstd_64k_chunks", level),
            &level,
            |b, &level| {
                let mut z = zstd::bulk::Compressor::new(level).unwrap();
                b.iter(|| {
                    data.chunks(64 << 10)
                        .map(|c| z.compress(black_box(c)).unwrap().len())
                        .sum::<usize>()
                })
            },
        );
    }
    let zeros = vec![0u8; 16 << 20];
    g.bench_function("zero_detect_4k_blocks_zero", |b| {
        b.iter(|| {
            zeros
                .chunks(4096)
                .filter(|c| chunker::is_zero(black_box(c)))
                .count()
        })
    });
    g.bench_function("zero_detect_4k_blocks_data", |b| {
        b.iter(|| {
            data.chunks(4096)
                .filter(|c| chunker::is_zero(black_box(c)))
                .count()
        })
    });
    let key = chunker::fingerprint_key(&p, &vmrepo::repo::crypto::Keys::none());
    g.bench_function("segment_fingerprint", |b| {
        b.iter(|| {
            let runs = chunker::runs(&data, &p, |_| false);
            chunker::fingerprint(&key, black_box(&data), &runs)
        })
    });
    g.bench_function("segment_cut_and_hash", |b| {
        let runs = chunker::runs(&data, &p, |_| false);
        b.iter(|| {
            chunker::cut(
                black_box(&data),
                &runs,
                &p,
                &vmrepo::repo::crypto::Keys::none(),
            )
            .1
            .len()
        })
    });
    // The object codec of a first ingest: zstd 3 alone vs zstd 3 + AES-256-GCM, 16 KiB chunks.
    let plain = vmrepo::repo::crypto::Keys::none();
    let keyed = vmrepo::repo::crypto::Keys::from_master(&[7; 32]);
    for (name, keys) in [
        ("encode_16k_plain", &plain),
        ("encode_16k_aes256gcm", &keyed),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                data.chunks(16 << 10)
                    .map(|c| {
                        vmrepo::repo::object::encode(
                            vmrepo::repo::object::ObjectKind::Chunk,
                            vmrepo::ObjectId::ZERO,
                            black_box(c),
                            3,
                            keys,
                        )
                        .payload
                        .len()
                    })
                    .sum::<usize>()
            })
        });
    }
    g.bench_function("aes256gcm_16k_chunks", |b| {
        b.iter(|| {
            data.chunks(16 << 10)
                .map(|c| keyed.encrypt(b"aad", black_box(c)).len())
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
