//! Whether an object is worth handing to zstd: a guess from a small sample of its bytes.
//!
//! Guest disks hold much data that is already compressed or encrypted (media, packages,
//! compressed filesystems, LUKS volumes). zstd finds nothing in it but still spends as long on
//! it as on text, about a fifth of a first backup's CPU on such a disk. The byte histogram of a
//! few spread windows tells such data apart at a small fraction of that cost: uniformly random
//! bytes carry close to 8 bits each, while text, code, tables and most binaries stay well under
//! 7. An object that looks random is stored raw, as it would have been after zstd failed to
//! shrink it. The guess can miss only one kind of gain: repetition inside an object whose byte
//! values are spread evenly (a random block repeated within one chunk), which in disk images is
//! rare, and whose repeats across chunks deduplication catches anyway.

/// Objects shorter than this are always given to zstd: sampling them saves nothing worth it.
const MIN_SAMPLED_LEN: usize = 4096;
/// Number of windows sampled, spread evenly over the object.
const WINDOWS: usize = 16;
/// Bytes in each window.
const WINDOW_LEN: usize = 128;
/// Bits per byte of the sample above which the object is taken for incompressible. A sample of
/// 2,048 uniformly random bytes measures 7.908 bits on average (the sample's finite size takes
/// about 0.09 off the 8), with a standard deviation of 0.008: the threshold is 7 of those below,
/// so random data is practically never sent to zstd. On an ext4 image of /usr, zstd -3 saved
/// 0.5% of the 16 KiB blocks whose sample measured above 7.85 bits, but 4.5% of those between
/// 7.75 and 7.85 and 8% of those between 7.65 and 7.75.
const RANDOM_BITS_PER_BYTE: f64 = 7.85;

/// True when `data`'s sampled bytes are spread so evenly over all 256 values that compressing
/// it is not worth trying.
pub fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < MIN_SAMPLED_LEN {
        return false;
    }
    let mut counts = [0u32; 256];
    let stride = (data.len() - WINDOW_LEN) / (WINDOWS - 1);
    for w in 0..WINDOWS {
        let start = w * stride;
        for &b in &data[start..start + WINDOW_LEN] {
            counts[b as usize] += 1;
        }
    }
    bits_per_byte(&counts, (WINDOWS * WINDOW_LEN) as f64) > RANDOM_BITS_PER_BYTE
}

/// Shannon entropy of a byte histogram holding `total` bytes.
fn bits_per_byte(counts: &[u32; 256], total: f64) -> f64 {
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_bytes_are_skipped_and_compressible_ones_are_not() {
        assert!(looks_incompressible(&noise(16 << 10, 7)));
        assert!(looks_incompressible(&noise(64 << 10, 9)));
        let text: Vec<u8> = (0..2000)
            .flat_map(|i| format!("line {i}: the quick brown fox\n").into_bytes())
            .collect();
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&vec![0u8; 16 << 10]));
        // Random bytes with a quarter of the object zero, as at the end of a file's last block:
        // zstd gains that quarter, so it is tried.
        let mut tail = noise(16 << 10, 3);
        tail[12 << 10..].fill(0);
        assert!(!looks_incompressible(&tail));
        // Random bytes drawn from only 128 values (7 bits each): zstd's entropy coder gains 1/8.
        let narrow: Vec<u8> = noise(16 << 10, 5).iter().map(|b| b & 0x7f).collect();
        assert!(!looks_incompressible(&narrow));
        // Small objects are always tried.
        assert!(!looks_incompressible(&noise(4095, 11)));
    }

    #[test]
    fn what_is_skipped_would_not_have_shrunk() {
        for seed in 1..20 {
            let data = noise(16 << 10, seed);
            assert!(looks_incompressible(&data));
            let z = zstd::bulk::compress(&data, 3).unwrap();
            assert!(z.len() >= data.len(), "seed {seed}: {} bytes", z.len());
        }
    }
}
