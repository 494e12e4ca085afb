//! The repository's secrets and what is done with them: object ids, object encryption, sealing
//! of index fields, and name tags.
//!
//! An unencrypted repository has [`Keys::none`]: ids are plain BLAKE3 and nothing is encrypted.
//! An encrypted one derives every subkey from one random 256-bit master key (see
//! docs/SECURITY.md):
//!
//! * object ids are BLAKE3 keyed with the *id key*, so equal plaintexts cannot be confirmed by
//!   anyone without the key;
//! * object payloads (after compression) are AES-256-GCM encrypted under the *data key*; the
//!   associated data binds them to their record header (kind, codec, length, id);
//! * sensitive index fields are sealed (AES-256-GCM under the *index key*) with associated data
//!   binding them to their row;
//! * VM names are looked up by a keyed tag, never stored in the clear.
//!
//! Nonces are 12 bytes: an 8-byte random prefix drawn per thread and process (never persisted,
//! so a crash cannot make one repeat) and a 4-byte counter; the prefix is redrawn before the
//! counter wraps. Two writers can only collide if they draw the same 64-bit prefix.

use std::cell::Cell;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::repo::id::ObjectId;

/// Bytes an encrypted payload adds: nonce and tag.
pub const CIPHER_OVERHEAD: usize = 12 + 16;

/// The master key: 32 random bytes.
pub type MasterKey = Zeroizing<[u8; 32]>;

/// Secrets of an open repository.
pub struct Keys {
    inner: Option<Secret>,
}

struct Secret {
    id_key: Zeroizing<[u8; 32]>,
    fingerprint_key: Zeroizing<[u8; 32]>,
    tag_key: Zeroizing<[u8; 32]>,
    /// The chunker's gear table and its left-shifted twin (see [`Keys::gear`]).
    gear: Box<Zeroizing<GearTables>>,
    data: LessSafeKey,
    index: LessSafeKey,
}

thread_local! {
    static NONCE: Cell<([u8; 8], u32)> = const { Cell::new(([0; 8], u32::MAX)) };
}

fn next_nonce() -> [u8; 12] {
    NONCE.with(|cell| {
        let (mut prefix, mut counter) = cell.get();
        if counter == u32::MAX {
            getrandom::fill(&mut prefix).expect("the operating system provides randomness");
            counter = 0;
        }
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&prefix);
        n[8..].copy_from_slice(&counter.to_le_bytes());
        cell.set((prefix, counter + 1));
        n
    })
}

/// An AES-256-GCM key.
pub(crate) fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"))
}

/// Appends `plain` encrypted under `key` and `nonce`, then its 16-byte tag, to `out`.
pub(crate) fn seal_into(
    key: &LessSafeKey,
    nonce: [u8; 12],
    aad: &[u8],
    plain: &[u8],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.reserve(plain.len() + 16);
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        .expect("AES-GCM encryption of a payload below 64 GiB");
    out.extend_from_slice(tag.as_ref());
}

/// Authenticates and decrypts `sealed` (ciphertext, then tag) under `key` and `nonce`; `None` if
/// it was altered, cut short, or sealed under another key, nonce or associated data.
pub(crate) fn open_detached(
    key: &LessSafeKey,
    nonce: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Vec<u8>> {
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = sealed.to_vec();
    let plain_len = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .ok()?
        .len();
    buf.truncate(plain_len);
    Some(buf)
}

/// `nonce || ciphertext || tag` under a fresh nonce: every encrypted payload and sealed field.
fn seal_with(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce = next_nonce();
    let mut out = Vec::with_capacity(CIPHER_OVERHEAD + plain.len());
    out.extend_from_slice(&nonce);
    seal_into(key, nonce, aad, plain, &mut out);
    out
}

/// Opens what [`seal_with`] made.
fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < CIPHER_OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(12);
    open_detached(key, nonce, aad, ct)
}

fn subkey(context: &str, master: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key(context, master))
}

/// A gear table for FastCDC (256 values, `[0]`) and the same values shifted left by one (`[1]`),
/// which the two-bytes-per-step cutting loop uses.
pub type GearTables = [[u64; 256]; 2];

/// The secret gear table of an encrypted repository: 2 KiB of BLAKE3 output in key-derivation
/// mode from the master key, so nobody without the key can say where a known plaintext is cut.
fn gear_tables(master: &[u8; 32]) -> Box<Zeroizing<GearTables>> {
    let mut bytes = Zeroizing::new([0u8; 256 * 8]);
    blake3::Hasher::new_derive_key("vmrepo 2026-12 chunker gear table")
        .update(master)
        .finalize_xof()
        .fill(&mut bytes[..]);
    let mut t = Box::new(Zeroizing::new([[0u64; 256]; 2]));
    for (i, v) in bytes.chunks_exact(8).enumerate() {
        t[0][i] = u64::from_le_bytes(v.try_into().expect("8 bytes"));
        t[1][i] = t[0][i] << 1;
    }
    t
}

impl Keys {
    /// No encryption: plain BLAKE3 ids, plaintext payloads and index.
    pub fn none() -> Keys {
        Keys { inner: None }
    }

    /// The keys derived from a master key.
    pub fn from_master(master: &[u8; 32]) -> Keys {
        let data = subkey("vmrepo 2026-11 object encryption key", master);
        let index = subkey("vmrepo 2026-11 index sealing key", master);
        Keys {
            inner: Some(Secret {
                id_key: subkey("vmrepo 2026-11 object id key", master),
                fingerprint_key: subkey("vmrepo 2026-11 segment fingerprint key", master),
                tag_key: subkey("vmrepo 2026-11 name tag key", master),
                gear: gear_tables(master),
                data: aead_key(&data),
                index: aead_key(&index),
            }),
        }
    }

    /// A fresh random master key.
    pub fn new_master() -> Result<MasterKey> {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut k[..]).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
        Ok(k)
    }

    /// True for an encrypted repository.
    pub fn encrypted(&self) -> bool {
        self.inner.is_some()
    }

    /// The secret gear tables an encrypted repository with keyed cut points cuts with; `None`
    /// without encryption.
    pub fn gear(&self) -> Option<&GearTables> {
        self.inner.as_ref().map(|s| &**s.gear)
    }

    /// The id of an object's plaintext.
    pub fn id_of(&self, data: &[u8]) -> ObjectId {
        match &self.inner {
            None => ObjectId::of(data),
            Some(s) => ObjectId(*blake3::keyed_hash(&s.id_key, data).as_bytes()),
        }
    }

    /// Key material mixed into the segment fingerprint key (none when unencrypted).
    pub fn fingerprint_secret(&self) -> Option<&[u8; 32]> {
        self.inner.as_ref().map(|s| &*s.fingerprint_key)
    }

    /// Encrypts an object payload; `aad` binds it to its record header.
    pub fn encrypt(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let s = self
            .inner
            .as_ref()
            .expect("encrypt on an encrypted repository");
        seal_with(&s.data, aad, plain)
    }

    /// Decrypts and authenticates an object payload; `None` if it was altered.
    pub fn decrypt(&self, aad: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
        let s = self.inner.as_ref()?;
        open_with(&s.data, aad, payload)
    }

    /// Seals an index field (random nonce); `aad` names the row it belongs to.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let s = self
            .inner
            .as_ref()
            .expect("seal on an encrypted repository");
        seal_with(&s.index, aad, plain)
    }

    /// Opens a sealed index field; an error names `what` if it was altered or moved.
    pub fn open(&self, aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let s = self.inner.as_ref().ok_or_else(|| {
            Error::Corrupt(format!(
                "{what} is sealed, but the repository is not encrypted"
            ))
        })?;
        if sealed.len() < CIPHER_OVERHEAD {
            return Err(Error::Corrupt(format!("{what}: sealed field is too short")));
        }
        open_with(&s.index, aad, sealed).ok_or_else(|| {
            Error::Corrupt(format!(
                "{what}: the index entry fails authentication (altered or damaged)"
            ))
        })
    }

    /// Check value of a segment-cache row: keyed with a secret when encrypted (so rows cannot be
    /// forged), with a fixed key otherwise (so a damaged row is noticed, not trusted).
    pub fn cache_mac(&self, fingerprint: &[u8; 32], segment: &ObjectId) -> [u8; 16] {
        let key = match &self.inner {
            Some(s) => *s.tag_key,
            None => blake3::derive_key("vmrepo 2026-11 segment cache row check", b""),
        };
        let mut h = blake3::Hasher::new_keyed(&key);
        h.update(fingerprint);
        h.update(&segment.0);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// Check value of a `tombstone_names` row (tombstone id, the manifest ids it names,
    /// concatenated): keyed like [`Keys::cache_mac`], in a domain of its own.
    pub fn tombstone_mac(&self, tombstone: &ObjectId, manifests: &[u8]) -> [u8; 16] {
        let key = match &self.inner {
            Some(s) => *s.tag_key,
            None => blake3::derive_key("vmrepo 2026-12 tombstone row check", b""),
        };
        let mut h = blake3::Hasher::new_keyed(&key);
        h.update(b"tombstone names\0");
        h.update(&tombstone.0);
        h.update(manifests);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    /// The tag under which a VM name is stored and looked up: the name itself when unencrypted,
    /// a keyed hash otherwise.
    pub fn name_tag(&self, name: &str) -> String {
        match &self.inner {
            None => name.to_string(),
            Some(s) => {
                let h = blake3::keyed_hash(&s.tag_key, name.as_bytes());
                format!("vm-{}", &h.to_hex()[..32])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_detect_tampering() {
        let k = Keys::from_master(&[7; 32]);
        let ct = k.encrypt(b"header", b"secret bytes");
        assert_eq!(k.decrypt(b"header", &ct).unwrap(), b"secret bytes");
        assert!(k.decrypt(b"other header", &ct).is_none());
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert!(
                k.decrypt(b"header", &bad).is_none(),
                "flip at {i} undetected"
            );
        }
        assert!(Keys::from_master(&[8; 32])
            .decrypt(b"header", &ct)
            .is_none());
    }

    /// Payloads and index fields are standard AES-256-GCM (`nonce || ciphertext || tag`): what
    /// an independent implementation (the aes-gcm crate, which earlier builds used) seals opens
    /// here, and the other way round, at every length around the cipher's block and batch sizes.
    #[test]
    fn sealed_bytes_match_an_independent_aes_gcm_implementation() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let master = [9u8; 32];
        let k = Keys::from_master(&master);
        let other = |context: &str| {
            aes_gcm::Aes256Gcm::new_from_slice(&subkey(context, &master)[..]).unwrap()
        };
        let data = other("vmrepo 2026-11 object encryption key");
        let index = other("vmrepo 2026-11 index sealing key");
        let mut lengths: Vec<usize> = (0..=300).collect();
        lengths.extend([4095, 4096, 4097, 16 << 10, (64 << 10) + 5, 1 << 20]);
        for len in lengths {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let aad = len.to_le_bytes();
            for (theirs, field) in [(&data, false), (&index, true)] {
                let sealed = if field {
                    k.seal(&aad, &plain)
                } else {
                    k.encrypt(&aad, &plain)
                };
                assert_eq!(sealed.len(), plain.len() + CIPHER_OVERHEAD);
                let (nonce, ct) = sealed.split_at(12);
                let opened = theirs
                    .decrypt(
                        aes_gcm::Nonce::from_slice(nonce),
                        Payload { msg: ct, aad: &aad },
                    )
                    .expect("the other implementation opens ours");
                assert_eq!(opened, plain, "length {len}");

                let nonce = [len as u8; 12];
                let mut theirs_sealed = nonce.to_vec();
                theirs_sealed.extend(
                    theirs
                        .encrypt(
                            aes_gcm::Nonce::from_slice(&nonce),
                            Payload {
                                msg: &plain,
                                aad: &aad,
                            },
                        )
                        .unwrap(),
                );
                let opened = if field {
                    k.open(&aad, &theirs_sealed, "field").unwrap()
                } else {
                    k.decrypt(&aad, &theirs_sealed).unwrap()
                };
                assert_eq!(opened, plain, "length {len}");
            }
        }
    }

    #[test]
    fn nonces_never_repeat_within_a_thread() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(next_nonce()));
        }
    }

    #[test]
    fn ids_are_keyed_when_encrypted() {
        let plain = Keys::none();
        let k = Keys::from_master(&[1; 32]);
        assert_eq!(plain.id_of(b"x"), ObjectId::of(b"x"));
        assert_ne!(k.id_of(b"x"), ObjectId::of(b"x"));
        assert_ne!(k.id_of(b"x"), Keys::from_master(&[2; 32]).id_of(b"x"));
        assert_eq!(k.name_tag("web01"), k.name_tag("web01"));
        assert!(!k.name_tag("web01").contains("web01"));
    }
}
