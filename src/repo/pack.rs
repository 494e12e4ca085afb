//! Pack files: append-only objects under `data/` that hold object records back to back.
//!
//! A pack starts with a 16-byte header: `"VMREPACK" | version u32 | 0u32`, then records
//! (docs/FORMAT.md). It is written by exactly one process, streamed into the backend
//! ([`crate::backend::Backend::create`]), and made durable before any index row points into
//! it; it stays marked as being written until it is indexed ([`PackWriter::seal_then`]), so
//! that a concurrent `check` or gc never takes a sealed but unindexed pack for a left-over.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Backend, Durability, ObjectWriter};
use crate::error::{Error, IoContext, Result};
use crate::repo::crypto::Keys;
use crate::repo::index::SealedPack;
use crate::repo::layout;
use crate::repo::object::{EncodedObject, RecordHeader, RECORD_HEADER_LEN};
use crate::repo::pack_index::{self, PackDescription};

/// Magic at the start of every pack file.
pub const PACK_MAGIC: &[u8; 8] = b"VMREPACK";
/// Pack format version.
pub const PACK_VERSION: u32 = 1;
/// Bytes before the first record.
pub const PACK_HEADER_LEN: u64 = 16;

/// A pack being written.
pub struct PackWriter {
    backend: Arc<dyn Backend>,
    keys: Arc<Keys>,
    name: String,
    sink: Option<Box<dyn ObjectWriter>>,
    len: u64,
}

impl PackWriter {
    /// Starts a new pack with a random name; `keys` encrypt its description.
    pub fn create(backend: &Arc<dyn Backend>, keys: &Arc<Keys>) -> Result<PackWriter> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
        let name = hex::encode(raw);
        let key = layout::pack(&name);
        let mut sink = backend
            .create(&key)
            .ctx("create pack file", backend.path(&key))?;
        let mut header = [0u8; PACK_HEADER_LEN as usize];
        header[..8].copy_from_slice(PACK_MAGIC);
        header[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
        if let Err(e) = sink.write(&header) {
            sink.abandon();
            return Err(Error::io("write pack file", backend.path(&key), e));
        }
        Ok(PackWriter {
            backend: backend.clone(),
            keys: keys.clone(),
            name,
            sink: Some(sink),
            len: PACK_HEADER_LEN,
        })
    }

    /// The pack's name (32 hex digits).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How messages name it.
    pub fn path(&self) -> PathBuf {
        self.backend.path(&layout::pack(&self.name))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before any record was appended.
    pub fn is_empty(&self) -> bool {
        self.len == PACK_HEADER_LEN
    }

    /// Whether the pack is (still) written around the page cache.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.sink.as_ref().is_some_and(|s| s.is_direct())
    }

    /// Appends a record and returns its offset.
    pub fn append(&mut self, obj: &EncodedObject) -> Result<u64> {
        let offset = self.len;
        let sink = self.sink.as_mut().expect("pack open");
        sink.write(&obj.header.encode())
            .and_then(|()| sink.write(&obj.payload))
            .ctx("write pack file", self.path())?;
        self.len += obj.record_len();
        Ok(offset)
    }

    /// Makes the pack durable, writes its description (`records`, the pack's records; see
    /// [`crate::repo::pack_index`]), then runs `index` (which records them in the index) while
    /// the pack is still marked as being written: the one way a pack becomes part of the
    /// repository. If any step fails, the pack is deleted (nothing refers to it).
    pub fn seal_then<T>(
        mut self,
        records: Vec<(RecordHeader, u64)>,
        index: impl FnOnce(&SealedPack) -> Result<T>,
    ) -> Result<T> {
        let path = self.path();
        let sealed = self
            .sink
            .take()
            .expect("pack open")
            .finish()
            .ctx("seal pack file", &path);
        let result = sealed.and_then(|_marked| {
            let description = PackDescription {
                name: self.name.clone(),
                len: self.len,
                records,
            };
            let key = layout::pack_description(&self.name);
            pack_index::write(
                &*self.backend,
                &self.keys,
                &key,
                std::slice::from_ref(&description),
            )
            .ctx("write pack description", self.backend.path(&key))?;
            index(&SealedPack {
                name: description.name,
                size: description.len,
                records: description.records,
            })
        });
        if result.is_err() {
            let _ = self
                .backend
                .delete(&[layout::pack(&self.name)], Durability::Unsynced);
        }
        result
    }

    /// Deletes an unsealed pack (used when an ingest fails).
    pub fn discard(mut self) {
        if let Some(s) = self.sink.take() {
            s.abandon();
        }
    }
}

/// Random-access reader over the packs of a repository.
pub struct PackReader {
    backend: Arc<dyn Backend>,
    keys: Arc<Keys>,
}

impl PackReader {
    /// A reader for the packs in `backend`.
    pub fn new(backend: Arc<dyn Backend>, keys: Arc<Keys>) -> PackReader {
        PackReader { backend, keys }
    }

    /// The keys objects are decoded with.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// How messages name pack `pack`.
    fn path(&self, pack: &str) -> PathBuf {
        self.backend.path(&layout::pack(pack))
    }

    /// Asks the backend to start fetching `len` bytes at `offset` of a pack (advisory: a pack
    /// that cannot be opened is reported by the read that follows).
    pub fn hint(&self, pack: &str, offset: u64, len: u64) {
        self.backend.will_need(&layout::pack(pack), offset, len);
    }

    /// Reads `len` bytes at `offset` of a pack; `what` names the first record for messages.
    pub fn read_span(
        &self,
        pack: &str,
        offset: u64,
        len: usize,
        what: &RecordHeader,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_span_into(pack, offset, &mut buf, what)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset` of a pack; `what` names the first record for messages.
    pub fn read_span_into(
        &self,
        pack: &str,
        offset: u64,
        buf: &mut [u8],
        what: &RecordHeader,
    ) -> Result<()> {
        match self.backend.get_range(&layout::pack(pack), offset, buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Corrupt(format!(
                "pack file {} is missing",
                self.path(pack).display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::Corrupt(format!(
                    "pack file {} is truncated: {} {} at offset {offset} is cut off",
                    self.path(pack).display(),
                    what.kind.name(),
                    what.id.short()
                )))
            }
            Err(e) => Err(Error::io("read pack file", self.path(pack), e)),
        }
    }

    /// Checks that the record header bytes read at `offset` are exactly `expect`.
    pub fn check_header(
        &self,
        pack: &str,
        offset: u64,
        header: &[u8],
        expect: &RecordHeader,
    ) -> Result<()> {
        let path = || self.path(pack).display().to_string();
        let found = RecordHeader::decode(header).map_err(|why| {
            Error::Corrupt(format!(
                "pack file {} offset {offset}: {why} (expected {} {})",
                path(),
                expect.kind.name(),
                expect.id.short()
            ))
        })?;
        // A delta's base is in its payload, checked by check_record.
        if (RecordHeader {
            base: expect.base,
            ..found.clone()
        }) != *expect
        {
            return Err(Error::Corrupt(format!(
                "pack file {} offset {offset} holds {} {}, the index expects {} {}",
                path(),
                found.kind.name(),
                found.id.short(),
                expect.kind.name(),
                expect.id.short()
            )));
        }
        Ok(())
    }

    /// Checks that `record` (header and payload, read at `offset`) is the record `expect`;
    /// returns its payload.
    pub fn check_record<'b>(
        &self,
        pack: &str,
        offset: u64,
        record: &'b [u8],
        expect: &RecordHeader,
    ) -> Result<&'b [u8]> {
        self.check_header(pack, offset, &record[..RECORD_HEADER_LEN], expect)?;
        let payload = &record[RECORD_HEADER_LEN..RECORD_HEADER_LEN + expect.stored_len as usize];
        self.check_base(pack, offset, payload, expect)?;
        Ok(payload)
    }

    /// Checks that the payload read at `offset` (at least its first bytes, where a delta names
    /// its base) names the base the index expects, or none when `expect` is not a delta.
    pub fn check_base(
        &self,
        pack: &str,
        offset: u64,
        payload: &[u8],
        expect: &RecordHeader,
    ) -> Result<()> {
        let base = crate::repo::object::delta_base(expect, payload);
        if base != expect.base {
            return Err(Error::Corrupt(format!(
                "pack file {} offset {offset}: chunk {} is stored against {}, the index expects {}",
                self.path(pack).display(),
                expect.id.short(),
                base.map_or("no base".to_string(), |b| format!("chunk {}", b.short())),
                expect
                    .base
                    .map_or("no base".to_string(), |b| format!("chunk {}", b.short()))
            )));
        }
        Ok(())
    }

    /// Reads the record at `offset` and checks that its header says `expect`; returns the payload.
    pub fn read_record(&self, pack: &str, offset: u64, expect: &RecordHeader) -> Result<Vec<u8>> {
        let buf = self.read_span(
            pack,
            offset,
            RECORD_HEADER_LEN + expect.stored_len as usize,
            expect,
        )?;
        Ok(self.check_record(pack, offset, &buf, expect)?.to_vec())
    }

    /// Decodes a payload read from `pack` at `offset` (a delta with its base's plaintext,
    /// `base`), naming the place on damage.
    pub fn decode_at(
        &self,
        pack: &str,
        offset: u64,
        expect: &RecordHeader,
        payload: &[u8],
        base: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        crate::repo::object::decode(expect, payload, &self.keys, base)
            .map_err(|e| self.placed(e, pack, offset))
    }

    /// Decodes a payload read from `pack` at `offset` straight into `out` (exactly the
    /// object's length), naming the place on damage.
    pub fn decode_at_into(
        &self,
        pack: &str,
        offset: u64,
        expect: &RecordHeader,
        payload: &[u8],
        base: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<()> {
        crate::repo::object::decode_into(expect, payload, &self.keys, base, out)
            .map_err(|e| self.placed(e, pack, offset))
    }

    /// Reads a record stored on its own (not a delta: that is decoded with its base, see
    /// [`crate::repo::Repository::read_record_at`]) and decodes its plaintext.
    pub fn read_object(&self, pack: &str, offset: u64, expect: &RecordHeader) -> Result<Vec<u8>> {
        let payload = self.read_record(pack, offset, expect)?;
        self.decode_at(pack, offset, expect, &payload, None)
    }

    /// Adds the pack file and offset to a damage message.
    pub fn placed(&self, e: Error, pack: &str, offset: u64) -> Error {
        match e {
            Error::Corrupt(m) => Error::Corrupt(format!(
                "{m} (pack file {} offset {offset})",
                self.path(pack).display()
            )),
            other => other,
        }
    }
}

/// One record found by [`scan_pack_resyncing`].
pub struct ScannedRecord {
    /// Its header.
    pub header: RecordHeader,
    /// Offset of the header within the pack.
    pub offset: u64,
    /// The stored payload.
    pub payload: Vec<u8>,
}

/// Reads every well-formed record of pack `name` in order, calling `f` for each, and does not
/// stop at a damaged record header: from there it looks for the next well-formed header
/// (magic, checksum, lengths that fit the file) and goes on reading records from it. Returns
/// the pack's length and each stretch it could not read, described (a torn tail included). A
/// damaged header then costs its own record only, not every record after it (for an index
/// rebuild or gc's survey, that is the generations whose manifests come later in the file). A
/// record found this way is handed to `f` like any other; its payload is checked by whoever
/// decodes it.
pub fn scan_pack_resyncing(
    backend: &dyn Backend,
    name: &str,
    f: impl FnMut(ScannedRecord) -> Result<()>,
) -> Result<(u64, Vec<String>)> {
    scan_resyncing_by(backend, name, 1 << 20, f)
}

/// [`scan_pack_resyncing`], looking for the next header `window` bytes at a time.
fn scan_resyncing_by(
    backend: &dyn Backend,
    name: &str,
    window: u64,
    mut f: impl FnMut(ScannedRecord) -> Result<()>,
) -> Result<(u64, Vec<String>)> {
    let (len, stop) = scan_sequentially(backend, name, &mut f)?;
    let mut damage = Vec::new();
    let Some((mut at, mut why)) = stop else {
        return Ok((len, damage));
    };
    if at < PACK_HEADER_LEN {
        return Ok((len, vec![why]));
    }
    let key = layout::pack(name);
    let path = backend.path(&key);
    loop {
        let Some(next) = next_header(backend, &key, at + 1, len, window)? else {
            damage.push(why);
            return Ok((len, damage));
        };
        damage.push(format!(
            "{why}; {} bytes skipped, reading again from offset {next}",
            next - at
        ));
        let mut offset = next;
        while offset < len {
            let h = match read_header(backend, &key, offset, len)? {
                Ok(h) => h,
                Err(e) => {
                    (at, why) = (offset, format!("{e} at offset {offset}"));
                    break;
                }
            };
            let mut payload = vec![0u8; h.stored_len as usize];
            backend
                .get_range(&key, offset + RECORD_HEADER_LEN as u64, &mut payload)
                .ctx("read pack file", &path)?;
            let next = offset + RECORD_HEADER_LEN as u64 + h.stored_len as u64;
            f(ScannedRecord {
                header: h.with_base_from(&payload),
                offset,
                payload,
            })?;
            offset = next;
        }
        if offset == len {
            return Ok((len, damage));
        }
    }
}

/// `h`, read at `offset` of a pack of `len` bytes, as a well-formed record header whose record
/// fits in the file; or why it is not one.
fn header_at(h: &[u8], offset: u64, len: u64) -> std::result::Result<RecordHeader, String> {
    let header = RecordHeader::decode(h)?;
    if offset + RECORD_HEADER_LEN as u64 + header.stored_len as u64 > len {
        return Err("torn record payload".into());
    }
    Ok(header)
}

/// The well-formed record header at `offset` of a pack of `len` bytes whose record fits in
/// the file, or why there is none.
fn read_header(
    backend: &dyn Backend,
    key: &str,
    offset: u64,
    len: u64,
) -> Result<std::result::Result<RecordHeader, String>> {
    if offset + RECORD_HEADER_LEN as u64 > len {
        return Ok(Err("torn record header".into()));
    }
    let mut h = [0u8; RECORD_HEADER_LEN];
    backend
        .get_range(key, offset, &mut h)
        .ctx("read pack file", backend.path(key))?;
    Ok(header_at(&h, offset, len))
}

/// The first offset at or after `from` where a well-formed record header starts whose record
/// fits in the pack; read `window` bytes (and a header's length more) at a time.
fn next_header(
    backend: &dyn Backend,
    key: &str,
    from: u64,
    len: u64,
    window: u64,
) -> Result<Option<u64>> {
    let magic = crate::repo::object::RECORD_MAGIC;
    let mut buf = Vec::new();
    let mut at = from;
    while at + RECORD_HEADER_LEN as u64 <= len {
        // Each window overlaps the next by a header's length, so no header is missed.
        let n = (len - at).min(window + RECORD_HEADER_LEN as u64) as usize;
        buf.resize(n, 0);
        backend
            .get_range(key, at, &mut buf)
            .ctx("read pack file", backend.path(key))?;
        let found = (0..=n - RECORD_HEADER_LEN).find(|&i| {
            &buf[i..i + magic.len()] == magic
                && header_at(&buf[i..i + RECORD_HEADER_LEN], at + i as u64, len).is_ok()
        });
        if let Some(i) = found {
            return Ok(Some(at + i as u64));
        }
        at += window;
    }
    Ok(None)
}

/// The sequential part of [`scan_pack_resyncing`]: where it stopped (offset and why), if
/// before the end.
fn scan_sequentially(
    backend: &dyn Backend,
    name: &str,
    mut f: impl FnMut(ScannedRecord) -> Result<()>,
) -> Result<(u64, Option<(u64, String)>)> {
    let key = layout::pack(name);
    let (mut r, len) = backend
        .open_sequential(&key)
        .ctx("open pack file", backend.path(&key))?;
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    if r.read_exact(&mut header).is_err() || &header[..8] != PACK_MAGIC {
        return Ok((len, Some((0, "not a pack file (bad header)".into()))));
    }
    let mut offset = PACK_HEADER_LEN;
    loop {
        if offset == len {
            return Ok((len, None));
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        if r.read_exact(&mut h).is_err() {
            return Ok((
                len,
                Some((offset, format!("torn record header at offset {offset}"))),
            ));
        }
        let header = match RecordHeader::decode(&h) {
            Ok(h) => h,
            Err(why) => return Ok((len, Some((offset, format!("{why} at offset {offset}"))))),
        };
        let mut payload = vec![0u8; header.stored_len as usize];
        if r.read_exact(&mut payload).is_err() {
            return Ok((
                len,
                Some((offset, format!("torn record payload at offset {offset}"))),
            ));
        }
        let next = offset + RECORD_HEADER_LEN as u64 + header.stored_len as u64;
        f(ScannedRecord {
            header: header.with_base_from(&payload),
            offset,
            payload,
        })?;
        offset = next;
    }
}

/// Every pack in the backend: name and length, in name order.
pub fn list_packs(backend: &dyn Backend) -> Result<Vec<(String, u64)>> {
    Ok(backend
        .list(layout::DATA)
        .ctx("list", backend.path(layout::DATA))?
        .into_iter()
        .filter_map(|e| layout::pack_name(&e.key).map(|n| (n.to_string(), e.size)))
        .collect())
}

/// The length of pack `name`, or `None` when it is gone.
pub fn pack_len(backend: &dyn Backend, name: &str) -> Result<Option<u64>> {
    let key = layout::pack(name);
    backend.size(&key).ctx("stat pack file", backend.path(&key))
}

/// True if some process is writing pack `name` (an ingest in progress).
pub fn is_being_written(backend: &dyn Backend, name: &str) -> bool {
    backend.is_being_written(&layout::pack(name))
}

/// Deletes packs (those already gone are skipped).
pub fn delete_packs(backend: &dyn Backend, names: &[String], durability: Durability) -> Result<()> {
    let keys: Vec<String> = names.iter().map(|n| layout::pack(n)).collect();
    backend.delete(&keys, durability).map_err(|e| {
        let first = keys.first().map(|k| backend.path(k)).unwrap_or_default();
        Error::io("delete pack file", first, e)
    })
}

/// True if what follows `from` in pack `name` is what an interrupted writer leaves: nothing,
/// zeros (the padding of a direct-I/O write), or one well-formed record header whose record
/// runs past the end of the file. Anything else may hide records a scan cannot reach.
pub fn is_torn_write(backend: &dyn Backend, name: &str, from: u64) -> Result<bool> {
    let key = layout::pack(name);
    let path = backend.path(&key);
    let len = backend
        .size(&key)
        .ctx("stat pack file", &path)?
        .unwrap_or(0);
    if from >= len {
        return Ok(true);
    }
    let mut h = [0u8; RECORD_HEADER_LEN];
    let n = (len - from).min(RECORD_HEADER_LEN as u64) as usize;
    backend
        .get_range(&key, from, &mut h[..n])
        .ctx("read pack file", &path)?;
    if n == RECORD_HEADER_LEN {
        if let Ok(header) = RecordHeader::decode(&h) {
            return Ok(from + RECORD_HEADER_LEN as u64 + header.stored_len as u64 > len);
        }
    }
    // Zeros to the end?
    let mut at = from;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        backend
            .get_range(&key, at, &mut buf[..n])
            .ctx("read pack file", &path)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use crate::repo::id::ObjectId;
    use crate::repo::object::{self, ObjectKind};

    /// Records of awkward sizes: some straddle the local writer's 4 MiB staging buffer's end,
    /// one is bigger than it.
    fn records() -> Vec<EncodedObject> {
        let keys = Keys::none();
        [
            1usize,
            4000,
            70_001,
            (4 << 20) - 100,
            3,
            (4 << 20) + 12_345,
            999,
            4096,
        ]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let data = crate::ingest::chunker::noise(n, i as u64 + 1);
            let id = ObjectId(*blake3::hash(&data).as_bytes());
            object::encode(ObjectKind::Chunk, id, &data, 3, &keys)
        })
        .collect()
    }

    #[test]
    fn a_sealed_pack_holds_exactly_its_records() {
        let t = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::create(t.path()).unwrap());
        let expected = records();
        let keys = Arc::new(Keys::none());
        let mut p = PackWriter::create(&backend, &keys).unwrap();
        let offsets: Vec<u64> = expected.iter().map(|r| p.append(r).unwrap()).collect();
        let name = p.name().to_string();
        let described: Vec<(RecordHeader, u64)> = expected
            .iter()
            .zip(&offsets)
            .map(|(r, o)| (r.header.clone(), *o))
            .collect();
        let len = p
            .seal_then(described.clone(), |sealed| {
                assert!(
                    is_being_written(&*backend, &sealed.name),
                    "marked until indexed"
                );
                Ok(sealed.size)
            })
            .unwrap();
        assert!(!is_being_written(&*backend, &name));
        assert_eq!(pack_len(&*backend, &name).unwrap(), Some(len));
        let mut seen = Vec::new();
        let (scanned_len, damage) = scan_pack_resyncing(&*backend, &name, |r| {
            seen.push(r);
            Ok(())
        })
        .unwrap();
        assert_eq!((scanned_len, damage), (len, vec![]));
        assert_eq!(seen.len(), expected.len());
        for ((r, e), off) in seen.iter().zip(&expected).zip(&offsets) {
            assert_eq!(r.header, e.header);
            assert_eq!(r.payload, e.payload);
            assert_eq!(r.offset, *off);
        }
        // Its description, written at the seal, says the same.
        let d = pack_index::read(&*backend, &keys, &layout::pack_description(&name)).unwrap();
        assert_eq!(
            d,
            vec![PackDescription {
                name: name.clone(),
                len,
                records: described
            }]
        );
        assert_eq!(list_packs(&*backend).unwrap(), vec![(name, len)]);
    }

    /// Damaged record headers (a flipped id bit, an overwritten magic) cost their own records
    /// only: the resyncing scan finds every other record, at its offset, whatever the size of
    /// the window it searches with (small ones put headers across window edges), and says
    /// where it skipped. A torn tail stays one torn tail.
    #[test]
    fn a_resyncing_scan_skips_damaged_headers_only() {
        let t = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::create(t.path()).unwrap());
        let expected = records();
        let keys = Arc::new(Keys::none());
        let mut p = PackWriter::create(&backend, &keys).unwrap();
        let offsets: Vec<u64> = expected.iter().map(|r| p.append(r).unwrap()).collect();
        let name = p.name().to_string();
        p.seal_then(Vec::new(), |_| Ok(())).unwrap();
        let path = t.path().join(layout::pack(&name));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offsets[1] as usize + 20] ^= 8;
        bytes[offsets[4] as usize..offsets[4] as usize + 4].copy_from_slice(b"XXXX");
        bytes[offsets[5] as usize + 30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let kept: Vec<usize> = vec![0, 2, 3, 6, 7];
        for window in [53, 64, 1000, 70_000, 1 << 20] {
            let mut seen = Vec::new();
            let (len, damage) = scan_resyncing_by(&*backend, &name, window, |r| {
                seen.push((r.offset, r.payload));
                Ok(())
            })
            .unwrap();
            assert_eq!(len, bytes.len() as u64);
            let want: Vec<(u64, Vec<u8>)> = kept
                .iter()
                .map(|&k| (offsets[k], expected[k].payload.clone()))
                .collect();
            assert_eq!(seen, want, "window {window}");
            assert_eq!(damage.len(), 2, "window {window}: {damage:?}");
            assert!(damage[0].contains(&format!("offset {}", offsets[1])));
            assert!(damage[0].contains(&format!("reading again from offset {}", offsets[2])));
            assert!(damage[1].contains(&format!("reading again from offset {}", offsets[6])));
        }
        // A pack cut short inside its last record: that record is torn, the rest is read.
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let mut n = 0;
        let (_, damage) = scan_pack_resyncing(&*backend, &name, |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, kept.len() - 1);
        assert_eq!(damage.len(), 3, "{damage:?}");
        assert_eq!(
            damage[2],
            format!("torn record payload at offset {}", offsets[7])
        );
    }

    /// The one rule of sealing: a pack whose indexing fails is deleted, as is a discarded one.
    #[test]
    fn a_pack_that_is_not_indexed_leaves_no_file() {
        let t = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::create(t.path()).unwrap());
        let keys = Arc::new(Keys::none());
        let mut p = PackWriter::create(&backend, &keys).unwrap();
        p.append(&records()[0]).unwrap();
        let r: Result<()> = p.seal_then(Vec::new(), |_| Err(Error::Usage("index says no".into())));
        assert!(r.is_err());
        assert!(list_packs(&*backend).unwrap().is_empty());
        let mut p = PackWriter::create(&backend, &keys).unwrap();
        for r in records() {
            p.append(&r).unwrap();
        }
        assert_eq!(list_packs(&*backend).unwrap().len(), 1);
        p.discard();
        assert!(list_packs(&*backend).unwrap().is_empty());
    }
}
