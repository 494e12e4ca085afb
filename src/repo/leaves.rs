//! Segment fingerprints computed leaf by leaf. A segment that is one data run (no long zero
//! runs: the common case of a used disk) has a fingerprint input of a 17-byte header and the
//! segment's bytes (see `fingerprint` in the ingest's chunker). BLAKE3 is a tree
//! hash, so that input is hashed here as 64 KiB leaves whose chaining values are merged into the
//! same root. The leaves' chaining values are kept in the index; after a local change only the
//! leaves that hold changed bytes are hashed again, and the fingerprint is the same one a full
//! read gives.

use std::ops::Range;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes of fingerprint input per leaf (a power of two, a multiple of BLAKE3's 1 KiB chunk).
pub const LEAF: usize = 64 << 10;

/// Bytes of fingerprint input before the data of a one-run segment: the segment length, the data
/// tag, the run length.
pub const HEADER: usize = 17;

/// Size of one stored chaining value.
pub const CV_LEN: usize = 32;

/// The fingerprint input header of a one-run segment of `len` bytes.
fn header(len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&(len as u64).to_le_bytes());
    h[8] = 1;
    h[9..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// Leaves of a one-run segment of `len` bytes, or `None` when it is one leaf or less (its
/// fingerprint is hashed whole).
pub fn count(len: usize) -> Option<usize> {
    let n = (len + HEADER).div_ceil(LEAF);
    (n >= 2).then_some(n)
}

/// The segment bytes that leaf `k` of a one-run segment of `len` bytes covers.
pub fn data_range(k: usize, len: usize) -> Range<usize> {
    (k * LEAF).saturating_sub(HEADER)..((k + 1) * LEAF - HEADER).min(len)
}

/// The leaves whose data ranges meet `r` (segment bytes, not empty).
pub fn covering(r: &Range<usize>) -> Range<usize> {
    (r.start + HEADER) / LEAF..(r.end - 1 + HEADER) / LEAF + 1
}

/// Chaining value of leaf `k` of a one-run segment of `len` bytes, given that leaf's data
/// (`data_range(k, len)` of the segment).
pub fn leaf(key: &[u8; 32], k: usize, len: usize, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new_keyed(key);
    h.set_input_offset((k * LEAF) as u64);
    if k == 0 {
        h.update(&header(len));
    }
    h.update(data);
    h.finalize_non_root()
}

/// The chaining values of every leaf of `buf`, a one-run segment of at least two leaves.
pub fn all(key: &[u8; 32], buf: &[u8]) -> Option<Vec<ChainingValue>> {
    let n = count(buf.len())?;
    Some(
        (0..n)
            .map(|k| leaf(key, k, buf.len(), &buf[data_range(k, buf.len())]))
            .collect(),
    )
}

/// The fingerprint (BLAKE3 root) from the chaining values of all leaves of a one-run segment of
/// `len` bytes; `None` if their number is wrong for that length.
pub fn root(key: &[u8; 32], len: usize, cvs: &[ChainingValue]) -> Option<[u8; 32]> {
    if count(len) != Some(cvs.len()) {
        return None;
    }
    let input = (len + HEADER) as u64;
    let split = left_subtree_len(input);
    let left = subtree(key, cvs, 0, split);
    let right = subtree(key, cvs, split, input - split);
    Some(*merge_subtrees_root(&left, &right, Mode::KeyedHash(key)).as_bytes())
}

/// Chaining value of the subtree of the fingerprint input at `start`, `len` bytes long. Every
/// subtree of more than one leaf splits at a multiple of [`LEAF`], so the leaves are its nodes.
fn subtree(key: &[u8; 32], cvs: &[ChainingValue], start: u64, len: u64) -> ChainingValue {
    if len <= LEAF as u64 {
        return cvs[start as usize / LEAF];
    }
    let split = left_subtree_len(len);
    let left = subtree(key, cvs, start, split);
    let right = subtree(key, cvs, start + split, len - split);
    merge_subtrees_non_root(&left, &right, Mode::KeyedHash(key))
}

/// Chaining values as stored in the index: concatenated.
pub fn encode(cvs: &[ChainingValue]) -> Vec<u8> {
    cvs.concat()
}

/// Chaining values from their stored form; `None` if the length is not a whole number of them.
pub fn decode(bytes: &[u8]) -> Option<Vec<ChainingValue>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CV_LEN) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().expect("exact chunk"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::chunker::{fingerprint, noise, Run};

    #[test]
    fn leaves_merge_to_the_fingerprint_of_the_whole_segment() {
        let key = [7u8; 32];
        // Whole segments, a disk's short last segment, lengths around leaf and BLAKE3 chunk
        // boundaries.
        for len in [
            4 << 20,
            (4 << 20) - 512,
            3 << 20,
            LEAF - HEADER + 1,
            LEAF,
            2 * LEAF - HEADER,
            2 * LEAF - HEADER + 1,
            5 * LEAF + 1000,
            (1 << 20) + 17,
        ] {
            let buf = noise(len, len as u64);
            let cvs = all(&key, &buf).expect("more than one leaf");
            let whole = fingerprint(&key, &buf, &[Run::Data(0..len)]);
            assert_eq!(root(&key, len, &cvs), Some(whole), "len {len}");
            assert_eq!(decode(&encode(&cvs)), Some(cvs));
        }
        assert_eq!(count(LEAF - HEADER), None);
    }

    #[test]
    fn a_changed_leaf_recomputed_alone_gives_the_new_fingerprint() {
        let key = [3u8; 32];
        let len = 4 << 20;
        let mut buf = noise(len, 1);
        let mut cvs = all(&key, &buf).unwrap();
        let changed = 1_000_000..1_200_000;
        buf[changed.clone()].copy_from_slice(&noise(changed.len(), 2));
        for k in covering(&changed) {
            cvs[k] = leaf(&key, k, len, &buf[data_range(k, len)]);
        }
        assert_eq!(
            root(&key, len, &cvs),
            Some(fingerprint(&key, &buf, &[Run::Data(0..len)]))
        );
        // The first and last bytes of a leaf's range are in that leaf.
        for k in [0, 1, 5, 64] {
            let r = data_range(k, len);
            assert_eq!(covering(&(r.start..r.start + 1)), k..k + 1);
            assert_eq!(covering(&(r.end - 1..r.end)), k..k + 1);
        }
        assert_eq!(root(&key, len, &cvs[1..]), None);
    }
}
