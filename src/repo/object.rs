//! Stored objects: the self-describing record that wraps every object in a pack file, and the
//! encoding of its payload (zstd, raw, or zstd against a base chunk; optionally encrypted).
//!
//! Record layout (little-endian, see docs/FORMAT.md):
//! `magic "vrOB" | kind u8 | codec u8 | cipher u8 | 0u8 | stored_len u32 | raw_len u32 | id [32] |
//! crc32(previous 48 bytes) u32 | payload[stored_len]`.
//!
//! A chunk stored against a base (codec 2, a delta) is a zstd frame compressed with the base
//! chunk's plaintext as its dictionary; its payload starts with the base's id, in the clear, so
//! that gc and an index rebuild learn the dependency without decoding anything. A base is
//! always a chunk stored on its own (codec 0 or 1): a delta is decoded with one more object,
//! never through a chain.

use crate::error::{Error, Result};
use crate::repo::compressibility::looks_incompressible;
use crate::repo::crypto::{Keys, CIPHER_OVERHEAD};
use crate::repo::id::ObjectId;

/// Magic at the start of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"vrOB";
/// Size of a record header in bytes.
pub const RECORD_HEADER_LEN: usize = 52;
/// Largest object payload accepted (plaintext or stored).
pub const MAX_OBJECT_LEN: u32 = 256 << 20;

/// What an object is; recorded so packs can be scanned without the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    /// A piece of disk data cut by the chunker.
    Chunk = 1,
    /// The chunk list of one fixed-size disk segment.
    Segment = 2,
    /// The segment list of one disk.
    DiskMap = 3,
    /// A small file stored verbatim (.vmx, .nvram, log, descriptor).
    File = 4,
    /// A generation manifest (catalog, files, disks).
    Manifest = 5,
    /// A prune record: the manifests of generations that prune removed (see docs/FORMAT.md).
    Tombstone = 6,
    /// A description of pack files (`pack-index/`, never inside a pack).
    PackIndex = 7,
}

impl ObjectKind {
    /// Decodes the kind byte.
    pub fn from_u8(v: u8) -> Option<ObjectKind> {
        Some(match v {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::Segment,
            3 => ObjectKind::DiskMap,
            4 => ObjectKind::File,
            5 => ObjectKind::Manifest,
            6 => ObjectKind::Tombstone,
            7 => ObjectKind::PackIndex,
            _ => return None,
        })
    }

    /// Lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Segment => "segment",
            ObjectKind::DiskMap => "disk map",
            ObjectKind::File => "file",
            ObjectKind::Manifest => "manifest",
            ObjectKind::Tombstone => "tombstone",
            ObjectKind::PackIndex => "pack description",
        }
    }
}

/// Payload encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is (compression did not help).
    Raw = 0,
    /// zstd frame.
    Zstd = 1,
    /// zstd frame compressed with a base chunk's plaintext as dictionary; the payload starts
    /// with the base's id (chunks only).
    Delta = 2,
}

/// Bytes of a delta's payload that name its base, before the (possibly encrypted) frame.
pub const DELTA_BASE_LEN: usize = 32;

/// A decoded record header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Object kind.
    pub kind: ObjectKind,
    /// Payload codec.
    pub codec: Codec,
    /// Stored payload length.
    pub stored_len: u32,
    /// Plaintext length.
    pub raw_len: u32,
    /// Content address of the plaintext.
    pub id: ObjectId,
    /// The payload is AES-256-GCM encrypted (cipher byte 1).
    pub encrypted: bool,
    /// For a delta (codec 2), the chunk it is stored against. Not part of the 52 header bytes:
    /// it is the start of the payload ([`RecordHeader::decode`] leaves it `None`;
    /// [`RecordHeader::with_base_from`] reads it), and the index keeps it with the record's row.
    pub base: Option<ObjectId>,
}

impl RecordHeader {
    /// The bytes an encrypted payload is bound to: kind, codec, cipher, plaintext length, id.
    pub fn aad(&self) -> [u8; 40] {
        let mut a = [0u8; 40];
        a[0] = self.kind as u8;
        a[1] = self.codec as u8;
        a[2] = self.encrypted as u8;
        a[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        a[8..40].copy_from_slice(&self.id.0);
        a
    }

    /// The header of a record whose `payload` follows it: a delta's base read from the payload.
    /// A delta too short to name one is left without (its decode reports it).
    pub fn with_base_from(mut self, payload: &[u8]) -> RecordHeader {
        self.base = delta_base(&self, payload);
        self
    }

    /// [`RecordHeader::aad`] of a delta, followed by the id of its base.
    fn delta_aad(&self, base: &ObjectId) -> [u8; 72] {
        let mut a = [0u8; 72];
        a[..40].copy_from_slice(&self.aad());
        a[40..].copy_from_slice(&base.0);
        a
    }

    /// The codec and cipher packed into one byte, as the index stores them.
    pub fn codec_byte(&self) -> u8 {
        self.codec as u8 | (self.encrypted as u8) << 4
    }

    /// Splits [`RecordHeader::codec_byte`] back.
    pub fn from_codec_byte(b: u8) -> (Codec, bool) {
        (
            match b & 0x0f {
                0 => Codec::Raw,
                1 => Codec::Zstd,
                _ => Codec::Delta,
            },
            b & 0x10 != 0,
        )
    }

    /// Serializes the header, CRC included.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(RECORD_MAGIC);
        h[4] = self.kind as u8;
        h[5] = self.codec as u8;
        h[6] = self.encrypted as u8; // cipher: 0 none, 1 AES-256-GCM
        h[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        h[16..48].copy_from_slice(&self.id.0);
        let crc = crc32fast::hash(&h[0..48]);
        h[48..52].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and validates a header; the error string says what is wrong.
    pub fn decode(h: &[u8]) -> std::result::Result<RecordHeader, String> {
        if h.len() < RECORD_HEADER_LEN {
            return Err("truncated record header".into());
        }
        if &h[0..4] != RECORD_MAGIC {
            return Err("bad record magic".into());
        }
        let crc = u32::from_le_bytes(h[48..52].try_into().unwrap());
        if crc != crc32fast::hash(&h[0..48]) {
            return Err("record header checksum mismatch".into());
        }
        let kind =
            ObjectKind::from_u8(h[4]).ok_or_else(|| format!("unknown object kind {}", h[4]))?;
        let codec = match h[5] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            2 => Codec::Delta,
            c => return Err(format!("unknown codec {c}")),
        };
        let encrypted = match h[6] {
            0 => false,
            1 => true,
            c => return Err(format!("unknown cipher {c}")),
        };
        let stored_len = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let raw_len = u32::from_le_bytes(h[12..16].try_into().unwrap());
        if stored_len > MAX_OBJECT_LEN || raw_len > MAX_OBJECT_LEN {
            return Err("record length out of range".into());
        }
        let overhead = if encrypted { CIPHER_OVERHEAD as u32 } else { 0 };
        if codec == Codec::Raw && stored_len != raw_len + overhead {
            return Err("raw record with differing lengths".into());
        }
        if codec == Codec::Delta
            && (kind != ObjectKind::Chunk
                || (stored_len as usize) < DELTA_BASE_LEN + overhead as usize)
        {
            return Err("a delta record that is not a chunk, or too short to name its base".into());
        }
        Ok(RecordHeader {
            kind,
            codec,
            stored_len,
            raw_len,
            id: ObjectId::from_slice(&h[16..48]).unwrap(),
            encrypted,
            base: None,
        })
    }
}

/// An object ready to be appended to a pack: header plus encoded payload.
pub struct EncodedObject {
    /// Its header.
    pub header: RecordHeader,
    /// The stored payload bytes.
    pub payload: Vec<u8>,
}

impl EncodedObject {
    /// Bytes this object occupies in a pack, header included.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.payload.len() as u64
    }
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses `data` with zstd at `level`, keeping it raw when that is not smaller or when its
/// bytes look random ([`looks_incompressible`]), then encrypts it if `keys` say the repository
/// is encrypted.
pub fn encode(
    kind: ObjectKind,
    id: ObjectId,
    data: &[u8],
    level: i32,
    keys: &Keys,
) -> EncodedObject {
    let compressed = (!looks_incompressible(data)).then(|| {
        COMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().map(|(l, _)| *l) != Some(level) {
                *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
            }
            slot.as_mut().and_then(|(_, c)| c.compress(data).ok())
        })
    });
    let (codec, payload) = match compressed.flatten() {
        Some(c) if c.len() < data.len() => (Codec::Zstd, c),
        _ => (Codec::Raw, data.to_vec()),
    };
    let mut header = RecordHeader {
        kind,
        codec,
        stored_len: payload.len() as u32,
        raw_len: data.len() as u32,
        id,
        encrypted: keys.encrypted(),
        base: None,
    };
    let payload = if header.encrypted {
        let sealed = keys.encrypt(&header.aad(), &payload);
        header.stored_len = sealed.len() as u32;
        sealed
    } else {
        payload
    };
    EncodedObject { header, payload }
}

/// Encodes chunk `data` as [`encode`] does, or, given `base` (a chunk stored on its own: its id
/// and plaintext), as a delta of it when that takes at most an eighth of the plaintext or at
/// most half the bytes of the chunk stored on its own (the chunk is compressed on its own only
/// to decide the second). A delta whose base is dropped by a later gc is never left behind: gc
/// keeps the base of every indexed delta (docs/FORMAT.md).
pub fn encode_chunk(
    id: ObjectId,
    data: &[u8],
    level: i32,
    keys: &Keys,
    base: Option<(ObjectId, &[u8])>,
) -> EncodedObject {
    let Some((base_id, base_data)) = base else {
        return encode(ObjectKind::Chunk, id, data, level, keys);
    };
    let Some(frame) = compress_against(data, base_data, level) else {
        return encode(ObjectKind::Chunk, id, data, level, keys);
    };
    let overhead = if keys.encrypted() { CIPHER_OVERHEAD } else { 0 };
    let stored = DELTA_BASE_LEN + frame.len() + overhead;
    if stored * 8 > data.len() {
        let whole = encode(ObjectKind::Chunk, id, data, level, keys);
        if stored * 2 > whole.payload.len() {
            return whole;
        }
    }
    let header = RecordHeader {
        kind: ObjectKind::Chunk,
        codec: Codec::Delta,
        stored_len: stored as u32,
        raw_len: data.len() as u32,
        id,
        encrypted: keys.encrypted(),
        base: Some(base_id),
    };
    let mut payload = Vec::with_capacity(stored);
    payload.extend_from_slice(&base_id.0);
    if header.encrypted {
        payload.extend_from_slice(&keys.encrypt(&header.delta_aad(&base_id), &frame));
    } else {
        payload.extend_from_slice(&frame);
    }
    debug_assert_eq!(payload.len(), stored);
    EncodedObject { header, payload }
}

thread_local! {
    /// This thread's contexts for frames against a dictionary, kept so that each delta does
    /// not allocate (and the kernel zero) a context's tables again.
    static DELTA_CCTX: std::cell::RefCell<Option<zstd::zstd_safe::CCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DELTA_DCTX: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Extends the lifetime of a dictionary handed to a kept zstd context for one frame.
///
/// # Safety
/// The context must drop the reference before `prefix` is freed: the callers below reset it
/// (parameters included, which unloads a prefix) right after the one frame it is used for,
/// whether that frame succeeded or not, and before they return.
unsafe fn for_one_frame(prefix: &[u8]) -> &'static [u8] {
    // SAFETY: see the function's contract.
    unsafe { std::mem::transmute::<&[u8], &'static [u8]>(prefix) }
}

/// `data` compressed into one zstd frame with `base` as its dictionary (raw content).
fn compress_against(data: &[u8], base: &[u8], level: i32) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{CCtx, CParameter, ResetDirective};
    DELTA_CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let cx = match slot.as_mut() {
            Some(cx) => cx,
            None => slot.insert(CCtx::try_create()?),
        };
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        // SAFETY: the reset below unloads the prefix before `base` can be freed.
        let prefix = unsafe { for_one_frame(base) };
        let done = cx
            .set_parameter(CParameter::CompressionLevel(level))
            .and_then(|_| cx.ref_prefix(prefix))
            .and_then(|_| cx.compress2(&mut out, data));
        let reset = cx.reset(ResetDirective::SessionAndParameters);
        if reset.is_err() {
            // A context that cannot be reset is dropped with its reference.
            *slot = None;
        }
        done.ok().map(|_| out)
    })
}

/// Decompresses `frame` into `out` with `base` as its dictionary; the bytes written.
fn decompress_against(
    frame: &[u8],
    base: &[u8],
    out: &mut [u8],
) -> std::result::Result<usize, &'static str> {
    use zstd::zstd_safe::{DCtx, ResetDirective};
    DELTA_DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dx = match slot.as_mut() {
            Some(dx) => dx,
            None => slot.insert(DCtx::try_create().ok_or("zstd is unavailable")?),
        };
        // SAFETY: the reset below unloads the prefix before `base` can be freed.
        let prefix = unsafe { for_one_frame(base) };
        let done = dx
            .ref_prefix(prefix)
            .and_then(|_| dx.decompress(out, frame));
        if dx.reset(ResetDirective::SessionAndParameters).is_err() {
            *slot = None;
        }
        done.map_err(zstd::zstd_safe::get_error_name)
    })
}

/// The base a record is stored against, when it is a delta: named by the first bytes of its
/// payload, readable without any key.
pub fn delta_base(header: &RecordHeader, payload: &[u8]) -> Option<ObjectId> {
    if header.codec != Codec::Delta {
        return None;
    }
    ObjectId::from_slice(payload.get(..DELTA_BASE_LEN)?)
}

/// Decodes a payload back to plaintext (decrypting it if it is encrypted) and verifies it
/// against the header's id. A delta needs its base's plaintext, `base`.
pub fn decode(
    header: &RecordHeader,
    payload: &[u8],
    keys: &Keys,
    base: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let data = match header.codec {
        Codec::Raw => decrypted(header, payload, keys)?.into_owned(),
        Codec::Zstd => {
            let payload = decrypted(header, payload, keys)?;
            let mut out = Vec::with_capacity(header.raw_len as usize);
            decompress(header, &payload, &mut out)?;
            out
        }
        Codec::Delta => {
            let mut out = vec![0u8; header.raw_len as usize];
            decode_delta(header, payload, keys, base, &mut out)?;
            out
        }
    };
    verify(header, &data, keys)?;
    Ok(data)
}

/// Decodes like [`decode`], straight into `out`, which must be exactly as long as the object's
/// plaintext (`header.raw_len`): a restore writes each chunk where it belongs without a copy.
pub fn decode_into(
    header: &RecordHeader,
    payload: &[u8],
    keys: &Keys,
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<()> {
    if out.len() != header.raw_len as usize {
        return Err(Error::Corrupt(format!(
            "{} {} has {} bytes, where it is used {}",
            header.kind.name(),
            header.id.short(),
            header.raw_len,
            out.len()
        )));
    }
    match header.codec {
        Codec::Raw => {
            let payload = decrypted(header, payload, keys)?;
            if payload.len() != out.len() {
                return Err(wrong_length(header, payload.len()));
            }
            out.copy_from_slice(&payload)
        }
        Codec::Zstd => decompress(header, &decrypted(header, payload, keys)?, out)?,
        Codec::Delta => decode_delta(header, payload, keys, base, out)?,
    }
    verify(header, out, keys)
}

/// Decompresses a delta's frame into `out` (exactly its length) with its base's plaintext.
fn decode_delta(
    header: &RecordHeader,
    payload: &[u8],
    keys: &Keys,
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<()> {
    let what = || format!("{} {}", header.kind.name(), header.id.short());
    let base_id = delta_base(header, payload)
        .ok_or_else(|| Error::Corrupt(format!("{} is too short to name its base", what())))?;
    let base = base.ok_or_else(|| {
        Error::Corrupt(format!(
            "{} is stored against chunk {}, which was not read with it",
            what(),
            base_id.short()
        ))
    })?;
    let frame = &payload[DELTA_BASE_LEN..];
    let frame = match (header.encrypted, keys.encrypted()) {
        (true, true) => std::borrow::Cow::Owned(
            keys.decrypt(&header.delta_aad(&base_id), frame)
                .ok_or_else(|| {
                    Error::Corrupt(format!(
                        "{} fails authentication (altered, damaged, or written with another key)",
                        what()
                    ))
                })?,
        ),
        _ => decrypted(header, frame, keys)?,
    };
    let n = decompress_against(&frame, base, out).map_err(|why| {
        Error::Corrupt(format!(
            "{} does not decompress against its base {}: {why}",
            what(),
            base_id.short()
        ))
    })?;
    if n != header.raw_len as usize {
        return Err(wrong_length(header, n));
    }
    Ok(())
}

/// The payload with its encryption removed (authenticated), or as stored when the repository
/// is not encrypted; an object whose encryption does not match the repository's is damage.
fn decrypted<'p>(
    header: &RecordHeader,
    payload: &'p [u8],
    keys: &Keys,
) -> Result<std::borrow::Cow<'p, [u8]>> {
    let what = || format!("{} {}", header.kind.name(), header.id.short());
    match (header.encrypted, keys.encrypted()) {
        (true, true) => keys
            .decrypt(&header.aad(), payload)
            .map(std::borrow::Cow::Owned)
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "{} fails authentication (altered, damaged, or written with another key)",
                    what()
                ))
            }),
        (false, false) => Ok(std::borrow::Cow::Borrowed(payload)),
        (true, false) => Err(Error::Corrupt(format!(
            "{} is encrypted, but the repository is not",
            what()
        ))),
        (false, true) => Err(Error::Corrupt(format!(
            "{} is not encrypted, but the repository is: it was not written by this repository's owner",
            what()
        ))),
    }
}

/// Decompresses a zstd payload into `out` (a `Vec`'s spare capacity or a slice) with this
/// thread's decompressor; the result must be exactly `header.raw_len` bytes.
fn decompress<W: zstd::zstd_safe::WriteBuf + ?Sized>(
    header: &RecordHeader,
    payload: &[u8],
    out: &mut W,
) -> Result<()> {
    let n = DECOMPRESSOR
        .with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = zstd::bulk::Decompressor::new().ok();
            }
            slot.as_mut()
                .ok_or_else(|| std::io::Error::other("zstd unavailable"))?
                .decompress_to_buffer(payload, out)
        })
        .map_err(|e| {
            Error::Corrupt(format!(
                "{} {} does not decompress: {e}",
                header.kind.name(),
                header.id.short()
            ))
        })?;
    if n != header.raw_len as usize {
        return Err(wrong_length(header, n));
    }
    Ok(())
}

/// The damage of an object whose plaintext is `found` bytes long, not the header's length.
fn wrong_length(header: &RecordHeader, found: usize) -> Error {
    Error::Corrupt(format!(
        "{} {} decodes to {found} bytes, expected {}",
        header.kind.name(),
        header.id.short(),
        header.raw_len
    ))
}

/// Checks decoded bytes against the header: their length and their hash.
fn verify(header: &RecordHeader, data: &[u8], keys: &Keys) -> Result<()> {
    if data.len() != header.raw_len as usize {
        return Err(wrong_length(header, data.len()));
    }
    if keys.id_of(data) != header.id {
        return Err(Error::Corrupt(format!(
            "{} {} does not match its hash",
            header.kind.name(),
            header.id.short()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_crc() {
        let data = vec![7u8; 10_000];
        let none = Keys::none();
        let obj = encode(ObjectKind::Chunk, ObjectId::of(&data), &data, 3, &none);
        assert_eq!(obj.header.codec, Codec::Zstd);
        let mut h = obj.header.encode();
        assert_eq!(RecordHeader::decode(&h).unwrap(), obj.header);
        assert_eq!(
            decode(&obj.header, &obj.payload, &none, None).unwrap(),
            data
        );
        h[20] ^= 1;
        assert!(RecordHeader::decode(&h).unwrap_err().contains("checksum"));
    }

    #[test]
    fn incompressible_stays_raw_and_flips_are_detected() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let none = Keys::none();
        let obj = encode(ObjectKind::File, ObjectId::of(&data), &data, 3, &none);
        let mut payload = obj.payload.clone();
        payload[100] ^= 0x40;
        assert!(decode(&obj.header, &payload, &none, None).is_err());
    }

    #[test]
    fn encrypted_records_round_trip_and_are_bound_to_their_header() {
        let keys = Keys::from_master(&[3; 32]);
        for data in [
            vec![7u8; 10_000],
            (0..5000u32).map(|i| ((i * 7919) >> 5) as u8).collect(),
        ] {
            let obj = encode(ObjectKind::Chunk, keys.id_of(&data), &data, 3, &keys);
            assert!(obj.header.encrypted);
            let h = RecordHeader::decode(&obj.header.encode()).unwrap();
            assert_eq!(h, obj.header);
            assert_eq!(decode(&h, &obj.payload, &keys, None).unwrap(), data);
            assert!(decode(&h, &obj.payload, &Keys::none(), None).is_err());
            assert!(decode(&h, &obj.payload, &Keys::from_master(&[4; 32]), None).is_err());
            let mut other = h.clone();
            other.kind = ObjectKind::File;
            assert!(decode(&other, &obj.payload, &keys, None).is_err());
        }
    }

    /// 40 KB of bytes zstd halves (random words and text), from `seed`.
    fn varied(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::new();
        while out.len() < 40_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x & 1 == 0 {
                out.extend_from_slice(b"log line");
            } else {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out.truncate(40_000);
        out
    }

    /// A chunk much like another: [`varied`] bytes, then the same with 300 bytes changed.
    fn similar_pair() -> (Vec<u8>, Vec<u8>) {
        let base = varied(0x9E37_79B9_7F4A_7C15);
        let mut new = base.clone();
        for b in &mut new[20_000..20_300] {
            *b = b.wrapping_add(7);
        }
        (base, new)
    }

    #[test]
    fn a_chunk_like_its_base_is_stored_as_a_small_delta_and_decodes_only_with_that_base() {
        for keys in [Keys::none(), Keys::from_master(&[5; 32])] {
            let (base, new) = similar_pair();
            let (bid, nid) = (keys.id_of(&base), keys.id_of(&new));
            let whole = encode(ObjectKind::Chunk, nid, &new, 3, &keys);
            let obj = encode_chunk(nid, &new, 3, &keys, Some((bid, &base)));
            assert_eq!(obj.header.codec, Codec::Delta);
            assert!(
                obj.payload.len() * 4 < whole.payload.len(),
                "{} vs {}",
                obj.payload.len(),
                whole.payload.len()
            );
            let h = RecordHeader::decode(&obj.header.encode()).unwrap();
            assert_eq!(h.base, None);
            let h = h.with_base_from(&obj.payload);
            assert_eq!(h, obj.header);
            assert_eq!(delta_base(&h, &obj.payload), Some(bid));
            assert_eq!(decode(&h, &obj.payload, &keys, Some(&base)).unwrap(), new);
            let mut out = vec![0u8; new.len()];
            decode_into(&h, &obj.payload, &keys, Some(&base), &mut out).unwrap();
            assert_eq!(out, new);
            // Without its base, or with another, it is damage, never other bytes.
            let err = decode(&h, &obj.payload, &keys, None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("stored against chunk"), "{err}");
            let unrelated: Vec<u8> = base.iter().rev().copied().collect();
            assert!(decode(&h, &obj.payload, &keys, Some(&unrelated)).is_err());
            // Encrypted, the base named is bound to the ciphertext. (Unencrypted, a reader
            // fetches the base the payload names, and the hash check refuses what another
            // base decodes to.)
            if keys.encrypted() {
                let mut other = obj.payload.clone();
                other[0] ^= 1;
                assert!(decode(&h, &other, &keys, Some(&base)).is_err());
            }
        }
    }

    #[test]
    fn a_chunk_unlike_its_base_is_stored_on_its_own() {
        let keys = Keys::none();
        let (base, _) = similar_pair();
        let other = varied(12345);
        let obj = encode_chunk(
            keys.id_of(&other),
            &other,
            3,
            &keys,
            Some((keys.id_of(&base), &base)),
        );
        assert_ne!(obj.header.codec, Codec::Delta);
        assert_eq!(
            decode(&obj.header, &obj.payload, &keys, None).unwrap(),
            other
        );
    }

    #[test]
    fn only_a_chunk_may_be_a_delta() {
        let keys = Keys::none();
        let (base, new) = similar_pair();
        let obj = encode_chunk(
            keys.id_of(&new),
            &new,
            3,
            &keys,
            Some((keys.id_of(&base), &base)),
        );
        let mut h = obj.header.encode();
        h[4] = ObjectKind::File as u8;
        let crc = crc32fast::hash(&h[0..48]);
        h[48..52].copy_from_slice(&crc.to_le_bytes());
        assert!(RecordHeader::decode(&h).unwrap_err().contains("delta"));
    }
}
