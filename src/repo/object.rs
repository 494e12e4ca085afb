//! Stored objects: the self-describing record that wraps every object in a pack file, and the
//! encoding of its payload (zstd or raw; room for authenticated encryption).
//!
//! Record layout (little-endian, see docs/FORMAT.md):
//! `magic "vrOB" | kind u8 | codec u8 | cipher u8 | 0u8 | stored_len u32 | raw_len u32 | id [32] |
//! crc32(previous 48 bytes) u32 | payload[stored_len]`.

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
}

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

    /// The codec and cipher packed into one byte, as the index stores them.
    pub fn codec_byte(&self) -> u8 {
        self.codec as u8 | (self.encrypted as u8) << 4
    }

    /// Splits [`RecordHeader::codec_byte`] back.
    pub fn from_codec_byte(b: u8) -> (Codec, bool) {
        (
            if b & 0x0f == 0 {
                Codec::Raw
            } else {
                Codec::Zstd
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
        Ok(RecordHeader {
            kind,
            codec,
            stored_len,
            raw_len,
            id: ObjectId::from_slice(&h[16..48]).unwrap(),
            encrypted,
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

/// Decodes a payload back to plaintext (decrypting it if it is encrypted) and verifies it
/// against the header's id.
pub fn decode(header: &RecordHeader, payload: &[u8], keys: &Keys) -> Result<Vec<u8>> {
    let payload = decrypted(header, payload, keys)?;
    let data = match header.codec {
        Codec::Raw => payload.into_owned(),
        Codec::Zstd => {
            let mut out = Vec::with_capacity(header.raw_len as usize);
            decompress(header, &payload, &mut out)?;
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
    let payload = decrypted(header, payload, keys)?;
    match header.codec {
        Codec::Raw if payload.len() == out.len() => out.copy_from_slice(&payload),
        Codec::Raw => return Err(wrong_length(header, payload.len())),
        Codec::Zstd => decompress(header, &payload, out)?,
    }
    verify(header, out, keys)
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
        assert_eq!(decode(&obj.header, &obj.payload, &none).unwrap(), data);
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
        assert!(decode(&obj.header, &payload, &none).is_err());
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
            assert_eq!(decode(&h, &obj.payload, &keys).unwrap(), data);
            assert!(decode(&h, &obj.payload, &Keys::none()).is_err());
            assert!(decode(&h, &obj.payload, &Keys::from_master(&[4; 32])).is_err());
            let mut other = h.clone();
            other.kind = ObjectKind::File;
            assert!(decode(&other, &obj.payload, &keys).is_err());
        }
    }
}
