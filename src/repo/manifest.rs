//! The metadata objects that describe a generation: segments (chunk lists, stored whole or as
//! their differences from a base segment), disk maps (segment lists) and the generation manifest
//! (catalog, small files, disks).
//!
//! Segments and disk maps are compact binary objects so that unchanged ones dedup like data;
//! the manifest is JSON so that it stays readable and extensible (see docs/FORMAT.md).

use serde::{Deserialize, Serialize};

use crate::repo::id::ObjectId;

const SEGMENT_MAGIC: &[u8; 4] = b"VRSG";
const ZERO_FLAG: u32 = 1 << 31;

/// One piece of a segment, in disk order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Extent {
    /// `len` bytes of the chunk `id`.
    Data { len: u32, id: ObjectId },
    /// `len` bytes of zeros; nothing stored.
    Zero { len: u32 },
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u32 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len } => len,
        }
    }

    /// True for an empty extent (never produced by the chunker).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The chunk list of one fixed-size segment of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Keyed hash of the segment's content, used to skip re-chunking an unchanged segment.
    pub fingerprint: [u8; 32],
    /// Extents covering the segment exactly.
    pub extents: Vec<Extent>,
}

impl Segment {
    /// Total bytes covered.
    pub fn len(&self) -> u64 {
        self.extents.iter().map(|e| e.len() as u64).sum()
    }

    /// True if the segment covers nothing.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The id and length of each data extent's chunk, in order (repeats included).
    pub fn data_chunks(&self) -> impl Iterator<Item = (ObjectId, u32)> + '_ {
        self.extents.iter().filter_map(|e| match e {
            Extent::Data { id, len } => Some((*id, *len)),
            Extent::Zero { .. } => None,
        })
    }

    /// Binary encoding: `"VRSG" | version u32 | fingerprint [32] | count u32 | entries`, each entry
    /// `u32 (bit 31 = zero run, low bits = length)` followed by a 32-byte chunk id for data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44 + self.extents.len() * 36);
        out.extend_from_slice(SEGMENT_MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for e in &self.extents {
            match e {
                Extent::Data { len, id } => {
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&id.0);
                }
                Extent::Zero { len } => out.extend_from_slice(&(len | ZERO_FLAG).to_le_bytes()),
            }
        }
        out
    }

    /// Parses [`Segment::encode`]'s output.
    pub fn decode(b: &[u8]) -> Result<Segment, String> {
        if b.len() < 44 || &b[..4] != SEGMENT_MAGIC {
            return Err("not a segment object".into());
        }
        match u32_at(b, 4) {
            1 => {}
            DELTA_VERSION => {
                return Err("a segment delta, where a whole segment is needed".into());
            }
            v => return Err(format!("segment version {v} unknown")),
        }
        let fingerprint: [u8; 32] = b[8..40].try_into().unwrap();
        let count = u32_at(b, 40) as usize;
        let mut pos = 44;
        let mut extents = Vec::with_capacity(count.min(1 << 20));
        for _ in 0..count {
            if pos + 4 > b.len() {
                return Err("segment object truncated".into());
            }
            let word = u32_at(b, pos);
            pos += 4;
            if word & ZERO_FLAG != 0 {
                extents.push(Extent::Zero {
                    len: word & !ZERO_FLAG,
                });
            } else {
                let id =
                    ObjectId::from_slice(b.get(pos..pos + 32).ok_or("segment object truncated")?)
                        .unwrap();
                pos += 32;
                extents.push(Extent::Data { len: word, id });
            }
        }
        if pos != b.len() {
            return Err("segment object has trailing bytes".into());
        }
        Ok(Segment {
            fingerprint,
            extents,
        })
    }
}

/// A segment object as stored: its whole extent list (version 1), or its differences from a
/// base segment (version 2, [`SegmentDelta`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredSegment {
    /// Every extent, in order.
    Whole(Segment),
    /// The extents as edits of a whole segment's.
    Delta(SegmentDelta),
}

impl StoredSegment {
    /// Parses a segment object of either version.
    pub fn decode(b: &[u8]) -> Result<StoredSegment, String> {
        if b.len() >= 8 && &b[..4] == SEGMENT_MAGIC && u32_at(b, 4) == DELTA_VERSION {
            SegmentDelta::decode(b).map(StoredSegment::Delta)
        } else {
            Segment::decode(b).map(StoredSegment::Whole)
        }
    }

    /// The fingerprint of the segment's content (the same in both forms).
    pub fn fingerprint(&self) -> [u8; 32] {
        match self {
            StoredSegment::Whole(s) => s.fingerprint,
            StoredSegment::Delta(d) => d.fingerprint,
        }
    }

    /// The whole segment a delta is read against.
    pub fn base(&self) -> Option<ObjectId> {
        match self {
            StoredSegment::Whole(_) => None,
            StoredSegment::Delta(d) => Some(d.base),
        }
    }
}

const DELTA_VERSION: u32 = 2;
const OP_COPY: u8 = 0;
const OP_ZERO: u8 = 1;
const OP_DATA: u8 = 2;

/// One edit of a delta: base extents taken over, or an extent of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeltaOp {
    /// `count` extents of the base from extent `start` on.
    Copy { start: u32, count: u32 },
    /// An extent the base does not hold there.
    Own(Extent),
}

/// A segment stored as its differences from a whole segment of the repository, its `base`
/// (usually the segment the same disk held at the same place the night before): a night that
/// changes a few chunks of a segment stores a few dozen bytes of edits instead of its whole
/// chunk list. A base is always a whole segment, so reading a delta takes one more object,
/// never a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentDelta {
    /// Keyed hash of the segment's content, as [`Segment::fingerprint`].
    pub fingerprint: [u8; 32],
    /// The whole segment the edits apply to.
    pub base: ObjectId,
    /// Bytes the resolved segment covers.
    len: u32,
    ops: Vec<DeltaOp>,
}

impl SegmentDelta {
    /// The edits that turn `base_segment` (stored as `base`) into `segment`; `None` when
    /// they would not be smaller than half of `segment`'s whole encoding, which is then
    /// stored instead.
    pub fn diff(base: ObjectId, base_segment: &Segment, segment: &Segment) -> Option<SegmentDelta> {
        let len = u32::try_from(segment.len()).ok()?;
        let b = &base_segment.extents;
        let n = &segment.extents;
        let mut first_at: std::collections::HashMap<&Extent, u32> =
            std::collections::HashMap::with_capacity(b.len());
        for (k, e) in b.iter().enumerate().rev() {
            first_at.insert(e, k as u32);
        }
        let mut ops = Vec::new();
        let budget = (44 + 36 * n.len()) / 2;
        let mut size = 80;
        let (mut i, mut cursor) = (0usize, 0usize);
        while i < n.len() {
            let start = if b.get(cursor) == Some(&n[i]) {
                Some(cursor)
            } else {
                first_at.get(&n[i]).map(|&k| k as usize)
            };
            match start {
                Some(s) => {
                    let mut count = 1;
                    while i + count < n.len() && b.get(s + count) == Some(&n[i + count]) {
                        count += 1;
                    }
                    ops.push(DeltaOp::Copy {
                        start: s as u32,
                        count: count as u32,
                    });
                    size += 9;
                    i += count;
                    cursor = s + count;
                }
                None => {
                    ops.push(DeltaOp::Own(n[i]));
                    size += if matches!(n[i], Extent::Zero { .. }) {
                        5
                    } else {
                        37
                    };
                    i += 1;
                }
            }
            if size > budget {
                return None;
            }
        }
        Some(SegmentDelta {
            fingerprint: segment.fingerprint,
            base,
            len,
            ops,
        })
    }

    /// The segment these edits make of `base`, which must be the whole segment [`Self::base`]
    /// names.
    pub fn resolve(&self, base: &Segment) -> Result<Segment, String> {
        let mut extents = Vec::new();
        let mut covered = 0u64;
        let mut take = |e: Extent| -> Result<(), String> {
            if e.is_empty() {
                return Err("segment delta holds an empty extent".into());
            }
            covered += e.len() as u64;
            if covered > self.len as u64 {
                return Err(format!(
                    "segment delta covers more than its {} bytes",
                    self.len
                ));
            }
            extents.push(e);
            Ok(())
        };
        for op in &self.ops {
            match *op {
                DeltaOp::Copy { start, count } => {
                    let (s, c) = (start as usize, count as usize);
                    let Some(from) = base.extents.get(s..s.saturating_add(c)) else {
                        return Err(format!(
                            "segment delta copies extents {s}..{} of a base of {}",
                            s.saturating_add(c),
                            base.extents.len()
                        ));
                    };
                    for e in from {
                        take(*e)?;
                    }
                }
                DeltaOp::Own(e) => take(e)?,
            }
        }
        if covered != self.len as u64 {
            return Err(format!(
                "segment delta covers {covered} bytes, not its {}",
                self.len
            ));
        }
        Ok(Segment {
            fingerprint: self.fingerprint,
            extents,
        })
    }

    /// Binary encoding: `"VRSG" | version u32 = 2 | fingerprint [32] | base [32] | len u32 |
    /// count u32 | ops`, each op `0u8 start u32 count u32` (base extents taken over),
    /// `1u8 len u32` (a zero run) or `2u8 len u32 id [32]` (a chunk).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + self.ops.len() * 16);
        out.extend_from_slice(SEGMENT_MAGIC);
        out.extend_from_slice(&DELTA_VERSION.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.base.0);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        for op in &self.ops {
            match op {
                DeltaOp::Copy { start, count } => {
                    out.push(OP_COPY);
                    out.extend_from_slice(&start.to_le_bytes());
                    out.extend_from_slice(&count.to_le_bytes());
                }
                DeltaOp::Own(Extent::Zero { len }) => {
                    out.push(OP_ZERO);
                    out.extend_from_slice(&len.to_le_bytes());
                }
                DeltaOp::Own(Extent::Data { len, id }) => {
                    out.push(OP_DATA);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&id.0);
                }
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Result<SegmentDelta, String> {
        if b.len() < 80 {
            return Err("segment delta truncated".into());
        }
        let fingerprint: [u8; 32] = b[8..40].try_into().unwrap();
        let base = ObjectId::from_slice(&b[40..72]).unwrap();
        let len = u32_at(b, 72);
        let count = u32_at(b, 76) as usize;
        let mut pos = 80;
        let mut ops = Vec::with_capacity(count.min(1 << 16));
        let truncated = || "segment delta truncated".to_string();
        for _ in 0..count {
            let tag = *b.get(pos).ok_or_else(truncated)?;
            let field = |at: usize| {
                b.get(at..at + 4)
                    .map(|_| u32_at(b, at))
                    .ok_or_else(truncated)
            };
            let op = match tag {
                OP_COPY => DeltaOp::Copy {
                    start: field(pos + 1)?,
                    count: field(pos + 5)?,
                },
                OP_ZERO => DeltaOp::Own(Extent::Zero {
                    len: field(pos + 1)?,
                }),
                OP_DATA => DeltaOp::Own(Extent::Data {
                    len: field(pos + 1)?,
                    id: ObjectId::from_slice(b.get(pos + 5..pos + 37).ok_or_else(truncated)?)
                        .unwrap(),
                }),
                t => return Err(format!("segment delta has an unknown edit {t}")),
            };
            pos += match op {
                DeltaOp::Own(Extent::Data { .. }) => 37,
                DeltaOp::Own(Extent::Zero { .. }) => 5,
                DeltaOp::Copy { .. } => 9,
            };
            ops.push(op);
        }
        if pos != b.len() {
            return Err("segment delta has trailing bytes".into());
        }
        Ok(SegmentDelta {
            fingerprint,
            base,
            len,
            ops,
        })
    }
}

pub use crate::repo::disk_map::DiskMap;

fn u32_at(b: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(b[pos..pos + 4].try_into().unwrap())
}

/// Highest manifest format version this vmrepo reads. Version 2 adds [`DiskEntry::layout`]
/// (disks read from sparse files or chains); ingest writes version 1 when no disk has one, so
/// older vmrepo versions keep reading what they can restore and refuse what they cannot.
pub const MANIFEST_VERSION: u32 = 2;

/// The version a manifest with these disks is written as.
pub fn manifest_version_for(disks: &[DiskEntry]) -> u32 {
    if disks.iter().any(|d| d.layout.is_some()) {
        2
    } else {
        1
    }
}

/// Formats a timestamp as a generation time (UTC, to the second), as generation names and the
/// catalog's times are written.
pub fn format_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What a change-aware ingest did, recorded in the catalog.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Incremental {
    /// The generation unchanged segments were taken from.
    pub since: String,
    /// Where the changed ranges came from.
    pub source: String,
    /// Segments taken from `since` without reading them.
    pub segments_taken: u64,
    /// Of those, segments re-read and compared (`--verify-unchanged`).
    pub segments_verified: u64,
    /// Touched segments built from the previous version and the changed bytes alone.
    #[serde(default)]
    pub segments_patched: u64,
    /// Disks read in full, and why.
    pub full_reads: Vec<String>,
}

/// A generation manifest: everything needed to list, restore and re-index a generation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The catalog.
    pub catalog: Catalog,
    /// Small files stored verbatim, by path relative to the VM directory.
    pub files: Vec<FileEntry>,
    /// Disks in controller-slot order.
    pub disks: Vec<DiskEntry>,
}

/// Like vcbMounter's catalog: what was backed up, from where, when, by which version.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    /// VM name (the generation is `name@time`).
    pub vm: String,
    /// Generation time, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    /// `uuid.bios` from the .vmx, if any.
    pub uuid: Option<String>,
    /// `displayName` from the .vmx, decoded, if any.
    pub display_name: Option<String>,
    /// `vm-directory` or `disk-image`.
    pub source_kind: String,
    /// Absolute path ingested.
    pub source: String,
    /// Ingest start, UTC.
    pub started: String,
    /// Ingest end, UTC.
    pub finished: String,
    /// vmrepo version that wrote it.
    pub vmrepo_version: String,
    /// Statistics of the ingest.
    pub stats: IngestStats,
    /// For a change-aware ingest: what it took from which generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<Incremental>,
    /// A VM read over the vSphere API with changed-block tracking on: each disk's change id
    /// (by slot) as the backup snapshot froze it, which the next ingest asks the host's
    /// changes since.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub change_ids: std::collections::BTreeMap<String, String>,
}

/// Byte counts of one ingest.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestStats {
    /// Virtual size of all disks.
    pub virtual_bytes: u64,
    /// Bytes read from the source files (holes are not read).
    pub bytes_read: u64,
    /// Bytes of non-zero content chunked (read minus zero runs).
    pub bytes_data: u64,
    /// Plaintext bytes of chunks that were new to the repository.
    pub bytes_new: u64,
    /// Bytes written to pack files (compressed, headers included).
    pub bytes_stored: u64,
    /// Chunks cut by the chunker (segments reused from the segment cache are not re-cut).
    pub chunks_total: u64,
    /// Chunks that were new to the repository.
    pub chunks_new: u64,
    /// Segments whose content matched a known segment and were not re-chunked.
    pub segments_reused: u64,
    /// Segments that were all zero (holes or zero bytes): nothing stored.
    #[serde(default)]
    pub segments_zero: u64,
    /// Segments a change-aware ingest took from the previous generation without reading them.
    #[serde(default)]
    pub segments_skipped: u64,
    /// All segments of all disks.
    pub segments_total: u64,
}

/// A small file stored verbatim.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Path relative to the VM directory (`/`-separated, no `..`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The file object.
    pub object: ObjectId,
}

/// One disk of the generation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskEntry {
    /// Controller slot from the .vmx (`scsi0:0`), or `image` for a disk given directly.
    pub slot: String,
    /// The descriptor's file name (a [`FileEntry`]) or `None` for a raw image.
    pub descriptor: Option<String>,
    /// `createType` from the descriptor, or `raw`.
    pub create_type: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// The disk map object.
    pub disk_map: ObjectId,
    /// Files that hold the disk, in guest-address order (empty when `layout` is set).
    pub extents: Vec<ExtentFile>,
    /// For a disk read from sparse files or a snapshot chain: what it was and how to restore
    /// it (absent for flat disks, which restore file for file from `extents`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<DiskLayout>,
}

/// How a disk that was not a plain flat file set was stored, and how to restore it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DiskLayout {
    /// Format restored by default: the leaf's createType (`qcow2`, `raw`), or the base link's
    /// when the leaf is an ESXi delta (vmfsSparse, seSparse) that cannot stand alone.
    pub format: String,
    /// Name the VM refers to the disk by, relative to the VM directory; restored under it.
    pub file: String,
    /// The links that were read, leaf first (one for a disk without snapshots).
    pub chain: Vec<ChainLink>,
}

/// One link of a disk's chain as it was read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChainLink {
    /// File name (relative to the VM directory when inside it).
    pub file: String,
    /// createType, `qcow2` or `raw`.
    pub format: String,
    /// `CID`, 8 hex digits (VMDK only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// `parentCID`, 8 hex digits (VMDK only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_cid: Option<String>,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes this link itself held.
    pub allocated: u64,
    /// The link's descriptor text (separate or embedded), verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor: Option<String>,
    /// Identity of the link's files when read: a hash of each file's name, size and
    /// modification time. Equal stamps mean an unchanged (frozen) link, which lets the next
    /// ingest read only the links above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<String>,
}

/// How one extent of a disk maps onto a file (or onto nothing, for ZERO extents).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExtentFile {
    /// Extent type from the descriptor (`FLAT`, `VMFS`, `ZERO`) or `RAW`.
    pub kind: String,
    /// Guest byte offset where the extent starts.
    pub start: u64,
    /// Length in guest bytes.
    pub len: u64,
    /// File name relative to the VM directory (`None` for ZERO).
    pub file: Option<String>,
    /// Byte offset inside the file where the extent's data starts.
    pub file_offset: u64,
    /// Size of the file as it was.
    pub file_size: u64,
    /// Bytes of the file before `file_offset`, stored as a file object, if any.
    pub head: Option<ObjectId>,
    /// Bytes of the file after the extent's data, stored as a file object, if any.
    pub tail: Option<ObjectId>,
}

impl Manifest {
    /// JSON bytes as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parses a stored manifest.
    pub fn decode(b: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(b).map_err(|e| format!("manifest is not valid: {e}"))?;
        if m.version > MANIFEST_VERSION {
            return Err(format!(
                "manifest version {} is newer than this vmrepo understands",
                m.version
            ));
        }
        m.validate()?;
        Ok(m)
    }

    /// What makes a manifest unusable, checked by [`Manifest::decode`] and so by every reader
    /// (check, index rebuild, extract, mount, gc): a VM name that is not one, a time that is
    /// not a UTC time, file names that would leave the restore directory (`..`, absolute,
    /// empty, `.`) or repeat, and flat extents that do not cover the disk exactly. What it
    /// cannot see without reading more (a disk map of another size) is
    /// [`DiskEntry::check_map`]'s.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.catalog;
        if let Some(why) = vm_name_problem(&c.vm) {
            return Err(format!("manifest names VM {:?}, which {why}", c.vm));
        }
        if c.time.parse::<jiff::Timestamp>().is_err() || !c.time.ends_with('Z') {
            return Err(format!(
                "manifest of VM {:?} has time {:?}, not a UTC time like 2026-11-22T01:00:03Z",
                c.vm, c.time
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut name_ok = |what: &str, name: &str| -> Result<(), String> {
            if !is_safe_relative(name) {
                return Err(format!(
                    "manifest of {}@{} has {what} {name:?}, which is not a relative path inside \
                     the VM's directory",
                    c.vm, c.time
                ));
            }
            if !names.insert(name.to_string()) {
                return Err(format!(
                    "manifest of {}@{} names {what} {name:?} twice",
                    c.vm, c.time
                ));
            }
            Ok(())
        };
        for f in &self.files {
            name_ok("file", &f.name)?;
        }
        for d in &self.disks {
            for e in d.extents.iter().filter_map(|e| e.file.as_deref()) {
                if !is_safe_relative(e) {
                    return Err(format!(
                        "manifest of {}@{}: disk {} has extent file {e:?}, which is not a \
                         relative path inside the VM's directory",
                        c.vm, c.time, d.slot
                    ));
                }
            }
            if let Some(l) = &d.layout {
                if !is_safe_relative(&l.file) {
                    return Err(format!(
                        "manifest of {}@{}: disk {} is restored as {:?}, which is not a \
                         relative path inside the VM's directory",
                        c.vm, c.time, d.slot, l.file
                    ));
                }
            }
            if let Some(desc) = &d.descriptor {
                if !is_safe_relative(desc) {
                    return Err(format!(
                        "manifest of {}@{}: disk {} has descriptor {desc:?}, which is not a \
                         relative path inside the VM's directory",
                        c.vm, c.time, d.slot
                    ));
                }
            }
            if !d.extents.is_empty() {
                let mut at = 0u64;
                for e in &d.extents {
                    if e.start != at || e.len == 0 {
                        return Err(format!(
                            "manifest of {}@{}: the extents of disk {} do not cover it end to \
                             end (one starts at {}, expected {at})",
                            c.vm, c.time, d.slot, e.start
                        ));
                    }
                    at = at.saturating_add(e.len);
                }
                if at != d.virtual_size {
                    return Err(format!(
                        "manifest of {}@{}: the extents of disk {} cover {at} bytes, its size is {}",
                        c.vm, c.time, d.slot, d.virtual_size
                    ));
                }
            }
        }
        Ok(())
    }
}

impl DiskEntry {
    /// Checks that `map` (this disk's disk map) describes a disk of this disk's size.
    pub fn check_map(&self, map: &DiskMap) -> Result<(), String> {
        if map.size != self.virtual_size {
            return Err(format!(
                "disk {}: the manifest says {} bytes, its disk map {}",
                self.slot, self.virtual_size, map.size
            ));
        }
        Ok(())
    }
}

/// Why `name` cannot be a VM name (`None` when it can): empty, `/`, `@` (which separates VM and
/// generation), control characters, a path component, more than 200 bytes.
pub fn vm_name_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some("is empty")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('@') {
        Some("contains '@' (which separates VM and generation)")
    } else if name.chars().any(|c| c.is_control()) {
        Some("contains control characters")
    } else if name == "." || name == ".." {
        Some("is a path component")
    } else if name.len() > 200 {
        Some("is longer than 200 bytes")
    } else {
        None
    }
}

/// True for a stored relative name that is safe to restore under a directory: not empty, only
/// normal components (no `..`, `.`, root).
pub fn is_safe_relative(name: &str) -> bool {
    let p = std::path::Path::new(name);
    !name.is_empty()
        && !name.ends_with('/')
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Written by prune before it removes generations from the index, so that an index rebuilt
/// from the pack files does not bring them back while their manifests still sit in a pack.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Tombstone {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// When prune ran, UTC.
    pub time: String,
    /// The removed generations.
    pub removed: Vec<RemovedGeneration>,
}

/// One generation a prune removed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RemovedGeneration {
    /// `vm@time`.
    pub generation: String,
    /// Its manifest object.
    pub manifest: ObjectId,
}

impl Tombstone {
    /// JSON bytes as stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("tombstone serializes")
    }

    /// Parses a stored tombstone.
    pub fn decode(b: &[u8]) -> Result<Tombstone, String> {
        serde_json::from_slice(b).map_err(|e| format!("tombstone is not valid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_round_trip() {
        let s = Segment {
            fingerprint: [9; 32],
            extents: vec![
                Extent::Data {
                    len: 70_000,
                    id: ObjectId::of(b"a"),
                },
                Extent::Zero { len: 1 << 20 },
            ],
        };
        assert_eq!(Segment::decode(&s.encode()).unwrap(), s);
        assert!(Segment::decode(&s.encode()[..50]).is_err());
    }

    fn data(seed: &str, len: u32) -> Extent {
        Extent::Data {
            len,
            id: ObjectId::of(seed.as_bytes()),
        }
    }

    /// A segment of 256 chunks of 16 KiB, and the same with the chunks at `changed` replaced.
    fn nights(changed: &[usize]) -> (Segment, Segment) {
        let base: Vec<Extent> = (0..256).map(|k| data(&k.to_string(), 16384)).collect();
        let mut next = base.clone();
        for &k in changed {
            next[k] = data(&format!("new {k}"), 16384);
        }
        let seg = |extents| Segment {
            fingerprint: [1; 32],
            extents,
        };
        (seg(base), seg(next))
    }

    #[test]
    fn a_delta_resolves_to_the_segment_it_was_made_from() {
        let (base, mut next) = nights(&[0, 17, 18, 200, 255]);
        // A zero run and a moved chunk, as a write that shifts the cuts leaves.
        next.extents[100] = Extent::Zero { len: 8192 };
        next.extents.insert(101, Extent::Zero { len: 8192 });
        next.extents[40] = base.extents[41];
        let id = ObjectId::of(b"base");
        let d = SegmentDelta::diff(id, &base, &next).expect("a few changes make a delta");
        let bytes = d.encode();
        assert!(
            bytes.len() < 600,
            "{} bytes for 8 changed extents",
            bytes.len()
        );
        let StoredSegment::Delta(back) = StoredSegment::decode(&bytes).unwrap() else {
            panic!("decoded as a whole segment");
        };
        assert_eq!(back, d);
        assert_eq!(back.base, id);
        assert_eq!(back.resolve(&base).unwrap(), next);
        assert!(
            Segment::decode(&bytes).is_err(),
            "a delta read as a whole segment"
        );
        for cut in [79, 81, bytes.len() - 1] {
            assert!(
                StoredSegment::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_segment_that_changed_in_half_of_its_chunks_is_stored_whole() {
        let (base, next) = nights(&(0..256).step_by(2).collect::<Vec<_>>());
        assert!(SegmentDelta::diff(ObjectId::of(b"b"), &base, &next).is_none());
        let (base, next) = nights(&(0..256).step_by(8).collect::<Vec<_>>());
        assert!(SegmentDelta::diff(ObjectId::of(b"b"), &base, &next).is_some());
    }

    #[test]
    fn a_delta_that_does_not_fit_its_base_is_refused() {
        let (base, next) = nights(&[3]);
        let d = SegmentDelta::diff(ObjectId::of(b"b"), &base, &next).unwrap();
        // Against a shorter base the copies run past its end.
        let short = Segment {
            fingerprint: [1; 32],
            extents: base.extents[..100].to_vec(),
        };
        let e = d.resolve(&short).unwrap_err();
        assert!(e.contains("copies extents"), "{e}");
        // Against a base whose chunks are of other lengths, the bytes covered differ.
        let mut longer = base.clone();
        longer.extents[10] = data("10", 20000);
        let e = d.resolve(&longer).unwrap_err();
        assert!(e.contains("covers more than"), "{e}");
        let mut shorter = base.clone();
        shorter.extents[10] = data("10", 100);
        let e = d.resolve(&shorter).unwrap_err();
        assert!(e.contains("not its"), "{e}");
        // An empty extent taken over from a base (no cutter makes one) is refused.
        let mut empty = base;
        empty.extents[20] = Extent::Zero { len: 0 };
        let e = d.resolve(&empty).unwrap_err();
        assert!(e.contains("empty extent"), "{e}");
        // An unknown edit.
        let mut bytes = d.encode();
        bytes[80] = 9;
        let e = StoredSegment::decode(&bytes).unwrap_err();
        assert!(e.contains("unknown edit"), "{e}");
    }
}
