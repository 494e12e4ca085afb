//! Segment fingerprints: the keyed hash of a segment's runs (zero runs by length, data runs by
//! length and bytes) that the segment cache is keyed by. Defined here, with the repository's
//! format, because both an ingest (which cuts segments) and a copy between repositories (which
//! re-keys them) compute it, and must agree bit for bit.

use crate::repo::config::ChunkerParams;
use crate::repo::crypto::Keys;
use crate::repo::manifest::Extent;

/// The key for segment fingerprints, derived from the chunker parameters so that a change of
/// parameters can never reuse a segment cut differently, and from the repository's secret
/// fingerprint key when it is encrypted (so fingerprints confirm nothing to an outsider).
pub fn key(params: &ChunkerParams, keys: &Keys) -> [u8; 32] {
    let desc = format!(
        "seg={} min={} avg={} max={} zb={} zmin={}",
        params.segment_size,
        params.min_size,
        params.avg_size,
        params.max_size,
        params.zero_block,
        params.zero_run_min
    );
    match keys.fingerprint_secret() {
        None => blake3::derive_key("vmrepo segment fingerprint v1", desc.as_bytes()),
        Some(secret) => *blake3::keyed_hash(secret, desc.as_bytes()).as_bytes(),
    }
}

/// One run of a segment, in order.
pub enum Piece<'a> {
    /// This many zero bytes.
    Zero(u64),
    /// These bytes (not all zero).
    Data(&'a [u8]),
}

/// The fingerprint of a segment of `len` bytes made of `pieces`.
pub fn hash<'a>(key: &[u8; 32], len: u64, pieces: impl IntoIterator<Item = Piece<'a>>) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&len.to_le_bytes());
    for p in pieces {
        match p {
            Piece::Zero(n) => {
                h.update(&[0]);
                h.update(&n.to_le_bytes());
            }
            Piece::Data(d) => {
                h.update(&[1]);
                h.update(&(d.len() as u64).to_le_bytes());
                h.update(d);
            }
        }
    }
    *h.finalize().as_bytes()
}

/// The fingerprint of a stored segment from its extents and its bytes (`buf`, zero runs
/// included): consecutive data extents are one data run, as the chunker cut them from one.
pub fn of_extents(key: &[u8; 32], buf: &[u8], extents: &[Extent]) -> [u8; 32] {
    let mut pieces = Vec::new();
    let (mut at, mut data_from) = (0usize, None);
    for e in extents {
        match e {
            Extent::Zero { len } => {
                if let Some(from) = data_from.take() {
                    pieces.push(Piece::Data(&buf[from..at]));
                }
                pieces.push(Piece::Zero(*len as u64));
                at += *len as usize;
            }
            Extent::Data { len, .. } => {
                data_from.get_or_insert(at);
                at += *len as usize;
            }
        }
    }
    if let Some(from) = data_from {
        pieces.push(Piece::Data(&buf[from..at]));
    }
    hash(key, buf.len() as u64, pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::chunker::{cut, fingerprint, noise, runs};

    /// A copy computes the fingerprint from a stored segment's extents; it must be the one the
    /// ingest computed from the runs it cut, or the destination's segment cache would never hit.
    #[test]
    fn the_fingerprint_from_extents_is_the_ingests() {
        let p = ChunkerParams::default();
        let keys = Keys::from_master(&[5; 32]);
        let k = key(&p, &keys);
        let mut buf = noise(4 << 20, 3);
        buf[100_000..300_000].fill(0); // a long zero run between two data runs
        buf[(4 << 20) - 70_000..].fill(0); // and one at the end
        let r = runs(&buf, &p, |_| false);
        assert!(r.len() >= 3);
        let (extents, _) = cut(&buf, &r, &p, &keys);
        assert_eq!(of_extents(&k, &buf, &extents), fingerprint(&k, &buf, &r));
        // Another key (another repository), another fingerprint.
        let other = key(&p, &Keys::none());
        assert_ne!(
            of_extents(&other, &buf, &extents),
            of_extents(&k, &buf, &extents)
        );
    }
}
