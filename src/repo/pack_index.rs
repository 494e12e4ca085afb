//! Pack descriptions: small objects under `pack-index/` that list the records of pack files, so
//! a host bringing its cache of the index up to date (object storage) reads a few kilobytes per
//! pack instead of the pack.
//!
//! Each sealed pack gets one, `pack-index/<pack name>`, written after the pack is durable and
//! before any index row names it. gc compacts them now and then into
//! `pack-index/<shard>-<16 hex>` objects, each describing up to [`PACKS_PER_OBJECT`] packs whose
//! names start with the two hex digits `<shard>`. A description is stored like one record of a
//! pack (header, then compressed and, in an encrypted repository, encrypted payload), so it is
//! verified the same way. It is a hint, never the truth: one that does not decode, or describes
//! a pack of another length, is ignored and the pack itself is read.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Mutex;

use crate::backend::{Backend, Durability};
use crate::repo::crypto::Keys;
use crate::repo::fanout;
use crate::repo::id::ObjectId;
use crate::repo::layout;
use crate::repo::object::{self, Codec, ObjectKind, RecordHeader, RECORD_HEADER_LEN};
use crate::repo::pack::{PackReader, PACK_HEADER_LEN};

/// Magic at the start of a description's plaintext.
const MAGIC: &[u8; 4] = b"VRPI";
/// Description format version: 2 follows a delta's header with its base's id. A description
/// without deltas is written as version 1, which vmrepo builds before deltas also read.
const VERSION: u32 = 2;
/// Packs described by one compacted object at most (a few MiB of records).
pub const PACKS_PER_OBJECT: usize = 64;
/// zstd level of descriptions.
const LEVEL: i32 = 3;

/// What a pack holds, as its description says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackDescription {
    /// Pack name (32 hex digits).
    pub name: String,
    /// Length of the sealed pack.
    pub len: u64,
    /// Its records: header and offset, in pack order.
    pub records: Vec<(RecordHeader, u64)>,
}

/// The plaintext of a description of `packs`.
pub fn encode(packs: &[PackDescription]) -> Vec<u8> {
    let records: usize = packs.iter().map(|p| p.records.len()).sum();
    let mut out = Vec::with_capacity(16 + packs.len() * 28 + records * (8 + RECORD_HEADER_LEN));
    out.extend_from_slice(MAGIC);
    let deltas = packs
        .iter()
        .any(|p| p.records.iter().any(|(h, _)| h.codec == Codec::Delta));
    out.extend_from_slice(&(if deltas { VERSION } else { 1 }).to_le_bytes());
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        let mut name = [0u8; 16];
        hex::decode_to_slice(&p.name, &mut name).expect("pack names are 32 hex digits");
        out.extend_from_slice(&name);
        out.extend_from_slice(&p.len.to_le_bytes());
        out.extend_from_slice(&(p.records.len() as u32).to_le_bytes());
        for (h, offset) in &p.records {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&h.encode());
            if h.codec == Codec::Delta {
                let base = h.base.expect("a delta's header names its base");
                out.extend_from_slice(&base.0);
            }
        }
    }
    out
}

/// Reads little-endian fields off the front of a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated description".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

/// Parses and checks a description's plaintext: every record lies inside its pack, after the
/// previous one.
pub fn decode(bytes: &[u8]) -> Result<Vec<PackDescription>, String> {
    let mut c = Cursor(bytes);
    if c.take(4)? != MAGIC {
        return Err("not a pack description (bad magic)".into());
    }
    let version = c.u32()?;
    if !(1..=VERSION).contains(&version) {
        return Err(format!("pack description version {version} is not known"));
    }
    let count = c.u32()? as usize;
    // Each pack takes at least 28 bytes: a count that cannot fit is a lie, not an allocation.
    if count > c.0.len() / 28 {
        return Err("truncated description".into());
    }
    let mut packs = Vec::with_capacity(count);
    for _ in 0..count {
        let name = hex::encode(c.take(16)?);
        let len = c.u64()?;
        let n = c.u32()? as usize;
        if n > c.0.len() / (8 + RECORD_HEADER_LEN) {
            return Err("truncated description".into());
        }
        let mut records = Vec::with_capacity(n);
        let mut end = PACK_HEADER_LEN;
        for _ in 0..n {
            let offset = c.u64()?;
            let mut h = RecordHeader::decode(c.take(RECORD_HEADER_LEN)?)
                .map_err(|e| format!("pack {name}: {e}"))?;
            if h.codec == Codec::Delta {
                if version < 2 {
                    return Err(format!("pack {name}: a delta in a version 1 description"));
                }
                h.base = ObjectId::from_slice(c.take(32)?);
            }
            let next = offset
                .checked_add(RECORD_HEADER_LEN as u64 + h.stored_len as u64)
                .filter(|&next| offset >= end && next <= len)
                .ok_or_else(|| format!("pack {name}: a record at offset {offset} overlaps"))?;
            end = next;
            records.push((h, offset));
        }
        packs.push(PackDescription { name, len, records });
    }
    if !c.0.is_empty() {
        return Err("bytes after the end of the description".into());
    }
    Ok(packs)
}

/// Writes a description of `packs` under `key`, stored as one record (compressed, encrypted
/// with `keys` when the repository is).
pub fn write(
    backend: &dyn Backend,
    keys: &Keys,
    key: &str,
    packs: &[PackDescription],
) -> io::Result<()> {
    let plain = encode(packs);
    let obj = object::encode(
        ObjectKind::PackIndex,
        keys.id_of(&plain),
        &plain,
        LEVEL,
        keys,
    );
    let mut bytes = Vec::with_capacity(obj.record_len() as usize);
    bytes.extend_from_slice(&obj.header.encode());
    bytes.extend_from_slice(&obj.payload);
    backend.put(key, &bytes, Durability::Unsynced)
}

/// Reads and verifies the description stored under `key`.
pub fn read(backend: &dyn Backend, keys: &Keys, key: &str) -> Result<Vec<PackDescription>, String> {
    let bytes = backend.get(key).map_err(|e| e.to_string())?;
    let h = RecordHeader::decode(&bytes)?;
    if h.kind != ObjectKind::PackIndex
        || bytes.len() as u64 != RECORD_HEADER_LEN as u64 + h.stored_len as u64
    {
        return Err("not a pack description".into());
    }
    let plain =
        object::decode(&h, &bytes[RECORD_HEADER_LEN..], keys, None).map_err(|e| e.to_string())?;
    decode(&plain)
}

/// A pack known from its description, with the plaintext of its manifests and tombstones
/// (read from the pack: generations and prunes are the pack's word, not the description's).
pub struct Described {
    /// The description.
    pub description: PackDescription,
    /// Its manifest and tombstone records: header, and the plaintext or why it cannot be read.
    pub metadata: Vec<(RecordHeader, std::result::Result<Vec<u8>, String>)>,
}

/// What `pack-index/` holds, and the descriptions read from it on demand.
pub struct Descriptions<'a> {
    backend: &'a dyn Backend,
    keys: &'a Keys,
    /// Packs with a description of their own.
    singles: HashSet<String>,
    /// Compacted objects by shard (two hex digits).
    shards: HashMap<String, Vec<String>>,
    /// Compacted descriptions read, by shard, then by pack name.
    loaded: Mutex<HashMap<String, HashMap<String, PackDescription>>>,
    /// Descriptions that could not be used, and why.
    ignored: Mutex<Vec<String>>,
}

impl<'a> Descriptions<'a> {
    /// Lists `pack-index/`.
    pub fn list(backend: &'a dyn Backend, keys: &'a Keys) -> io::Result<Descriptions<'a>> {
        let mut d = Descriptions {
            backend,
            keys,
            singles: HashSet::new(),
            shards: HashMap::new(),
            loaded: Mutex::default(),
            ignored: Mutex::default(),
        };
        for e in backend.list(layout::PACK_INDEX)? {
            match layout::description_of(&e.key) {
                Some(layout::Described::Pack(name)) => {
                    d.singles.insert(name.to_string());
                }
                Some(layout::Described::Shard(shard)) => {
                    d.shards.entry(shard.to_string()).or_default().push(e.key);
                }
                None => {}
            }
        }
        Ok(d)
    }

    /// Packs described by an object of their own.
    pub fn singles(&self) -> &HashSet<String> {
        &self.singles
    }

    /// Keys of the compacted objects.
    pub fn compacted(&self) -> impl Iterator<Item = &String> {
        self.shards.values().flatten()
    }

    /// Descriptions that could not be used so far, and why (each said once).
    pub fn take_ignored(&self) -> Vec<String> {
        std::mem::take(&mut self.ignored.lock().unwrap())
    }

    fn ignore(&self, why: String) {
        self.ignored.lock().unwrap().push(why);
    }

    /// For each `(pack name, length now)`, its description if it has a usable one (it can be
    /// read and describes a pack of that length), with its manifests and tombstones read
    /// through `packs`; `None` means: read the pack. Fetched [`FETCHERS`] at a time. Callers
    /// going through a repository's packs in name order in batches keep memory to a batch's
    /// worth: the compacted objects of shards before a batch are dropped.
    pub fn fetch(&self, packs: &PackReader, wanted: &[(String, u64)]) -> Vec<Option<Described>> {
        let first = wanted.iter().map(|(n, _)| n.get(..2).unwrap_or("")).min();
        if let Some(first) = first {
            self.loaded
                .lock()
                .unwrap()
                .retain(|shard, _| shard.as_str() >= first);
        }
        // The shards whose compacted objects these packs need, read first.
        let mut shards: Vec<&str> = wanted
            .iter()
            .filter(|(n, _)| !self.singles.contains(n))
            .filter_map(|(n, _)| n.get(..2))
            .filter(|s| self.shards.contains_key(*s))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        shards.retain(|s| !self.loaded.lock().unwrap().contains_key(*s));
        fanout::parallel(&shards, |shard| {
            let mut map = HashMap::new();
            for key in &self.shards[*shard] {
                match read(self.backend, self.keys, key) {
                    Ok(v) => map.extend(v.into_iter().map(|d| (d.name.clone(), d))),
                    Err(e) => self.ignore(format!("{key}: {e}")),
                }
            }
            self.loaded.lock().unwrap().insert(shard.to_string(), map);
        });
        fanout::parallel(wanted, |(name, len)| {
            let d = self.one(name, *len)?;
            let metadata = d
                .records
                .iter()
                .filter(|(h, _)| matches!(h.kind, ObjectKind::Manifest | ObjectKind::Tombstone))
                .map(|(h, offset)| {
                    let plain = packs
                        .read_object(&d.name, *offset, h)
                        .map_err(|e| e.to_string());
                    (h.clone(), plain)
                })
                .collect();
            Some(Described {
                description: d,
                metadata,
            })
        })
    }

    /// The description of pack `name` as stored, not judged: `None` when it has none, else
    /// the description or why it cannot be read. For `vmrepo check`, going through packs in
    /// name order (the compacted objects of earlier shards are dropped as it goes).
    pub fn stored(&self, name: &str) -> Option<std::result::Result<PackDescription, String>> {
        if self.singles.contains(name) {
            let key = layout::pack_description(name);
            return Some(match read(self.backend, self.keys, &key) {
                Ok(mut v) if v.len() == 1 && v[0].name == name => Ok(v.pop().expect("one")),
                Ok(_) => Err(format!("{key} describes other packs than {name}")),
                Err(e) => Err(format!("{key}: {e}")),
            });
        }
        let shard = name.get(..2)?;
        let keys = self.shards.get(shard)?;
        let mut loaded = self.loaded.lock().unwrap();
        loaded.retain(|s, _| s.as_str() >= shard);
        if !loaded.contains_key(shard) {
            let mut map = HashMap::new();
            for key in keys {
                match read(self.backend, self.keys, key) {
                    Ok(v) => map.extend(v.into_iter().map(|d| (d.name.clone(), d))),
                    Err(e) => self.ignore(format!("{key}: {e}")),
                }
            }
            loaded.insert(shard.to_string(), map);
        }
        let found = loaded[shard].get(name).cloned().map(Ok);
        drop(loaded);
        match found {
            Some(d) => Some(d),
            // The shard has objects, but none describes this pack: unless one could not be
            // read, it simply has no description.
            None => {
                let unreadable: Vec<String> = self
                    .ignored
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|w| keys.iter().any(|k| w.starts_with(k.as_str())))
                    .cloned()
                    .collect();
                (!unreadable.is_empty()).then(|| Err(unreadable.join("; ")))
            }
        }
    }

    /// The usable description of pack `name` (`len` bytes now), if there is one.
    fn one(&self, name: &str, len: u64) -> Option<PackDescription> {
        let found = if self.singles.contains(name) {
            let key = layout::pack_description(name);
            match read(self.backend, self.keys, &key) {
                Ok(mut v) if v.len() == 1 && v[0].name == name => v.pop(),
                Ok(_) => {
                    self.ignore(format!("{key}: describes other packs than {name}"));
                    None
                }
                Err(e) => {
                    self.ignore(format!("{key}: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let found = found.or_else(|| {
            let mut loaded = self.loaded.lock().unwrap();
            loaded.get_mut(name.get(..2)?)?.remove(name)
        });
        match found {
            Some(d) if d.len == len => Some(d),
            Some(d) => {
                self.ignore(format!(
                    "the description of pack {name} is for {} bytes, the pack has {len}",
                    d.len
                ));
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::id::ObjectId;
    use crate::repo::object::Codec;

    fn header(kind: ObjectKind, seed: u8, stored_len: u32) -> RecordHeader {
        RecordHeader {
            base: None,
            kind,
            codec: Codec::Zstd,
            stored_len,
            raw_len: stored_len * 2,
            id: ObjectId([seed; 32]),
            encrypted: false,
        }
    }

    fn sample() -> Vec<PackDescription> {
        let a = header(ObjectKind::Chunk, 1, 100);
        let b = header(ObjectKind::Segment, 2, 40);
        let b_at = 16 + 52 + 100;
        vec![
            PackDescription {
                name: "00112233445566778899aabbccddeeff".into(),
                len: b_at + 52 + 40,
                records: vec![(a, 16), (b, b_at)],
            },
            PackDescription {
                name: "ffeeddccbbaa99887766554433221100".into(),
                len: 16,
                records: vec![],
            },
        ]
    }

    #[test]
    fn descriptions_round_trip() {
        let packs = sample();
        assert_eq!(decode(&encode(&packs)).unwrap(), packs);
    }

    /// Records outside their pack, overlapping records, truncation and trailing bytes are
    /// refused, never trusted.
    #[test]
    fn lying_descriptions_are_refused() {
        let mut past_end = sample();
        past_end[0].len -= 1;
        let mut overlap = sample();
        overlap[0].records[1].1 -= 1;
        for bad in [past_end, overlap] {
            assert!(decode(&encode(&bad)).is_err(), "{bad:?}");
        }
        let good = encode(&sample());
        for cut in [0, 5, 12, 40, good.len() - 1] {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        // A count far beyond the bytes is refused before anything is allocated for it.
        let mut huge = good;
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
