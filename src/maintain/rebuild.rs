//! Rebuilding the index from the pack files alone: every record read back, manifests and
//! tombstones decoded, generations recovered where everything they reference is there; the old
//! index kept beside the new one. A cache of a repository in object storage is rebuilt from the
//! packs' descriptions instead where they have one (see [`RecordSource`]).

use std::collections::HashSet;

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::maintain::coverage::uncommitted_packs;
use crate::maintain::id_set::{Keyed, Spill};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::{CacheRow, Index, ObjectRow};
use crate::repo::layout;
use crate::repo::manifest::{DiskMap, Extent, Manifest, Segment, StoredSegment, Tombstone};
use crate::repo::object::{self, Codec, ObjectKind, RecordHeader, RECORD_HEADER_LEN};
use crate::repo::pack::{is_being_written, list_packs, scan_pack_resyncing};
use crate::repo::pack_index::{Described, Descriptions};
use crate::repo::Repository;

/// What an index rebuild found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RebuildReport {
    /// Packs indexed.
    pub packs: u64,
    /// Of those, packs taken from their description rather than read.
    pub described: u64,
    /// Objects recovered.
    pub objects: u64,
    /// Generations recovered.
    pub generations: u64,
    /// Generations recovered although something they reference is gone: marked damaged.
    pub incomplete: Vec<String>,
    /// Manifests left out because prune removed their generation (a tombstone names them).
    pub pruned: u64,
    /// Manifests not listed because a generation of the same name was (`vm@time (manifest)`).
    pub shadowed: Vec<String>,
    /// Packs left out because their ingest never committed (a pending marker names them).
    pub uncommitted: u64,
    /// Damaged records and torn pack tails found.
    pub damaged: Vec<String>,
    /// Where the old index was moved, if there was one.
    pub old_index: Option<String>,
    /// The pack descriptions written again from the new index (a rebuild from the pack files).
    pub descriptions: Option<crate::maintain::describe::Compaction>,
    /// What went wrong without making the new index wrong.
    pub notes: Vec<String>,
}

/// Where an index rebuild takes each pack's records from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordSource {
    /// Every pack is read and each record verified; a generation is marked damaged when a
    /// chunk, segment or disk map it references is missing (`check --rebuild-index`).
    PackFiles,
    /// A pack's description (`pack-index/`) where it has a usable one: only its manifests and
    /// tombstones are read, and its segments and disk maps are taken as complete (their ingest
    /// stored what they reference before them). Packs without one are read. For a host's cache
    /// of a repository in object storage, where reading every pack would cost its size in
    /// downloads; the segment cache starts empty (a first ingest of a VM on this host chunks
    /// its disks again, storing nothing new).
    Descriptions,
}

/// Rebuilds `index.sqlite` from the pack files. The repository must be opened exclusively.
pub fn rebuild_index(
    repo: &Repository,
    source: RecordSource,
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    let backend = &**repo.backend();
    let tmp = crate::repo::index::fresh_rebuild_path(repo.index_dir())?;
    let mut report = RebuildReport::default();
    let mut index = Index::open(&tmp, true, repo.keys_arc())?;
    index.set_repository_id(&repo.config().repository_id)?;
    index.set_gc_epoch(repo.gc_epoch()?)?;
    let packs = list_packs(backend)?;
    let total: u64 = packs.iter().map(|(_, len)| len).sum();
    progress.start("rebuild index", total);
    let mut manifests: Vec<(ObjectId, Manifest)> = Vec::new();
    let mut cache = Vec::new();
    // Segments and disk maps read from packs are kept as ids and read again from the new index
    // when needed, and what is there is asked of the new index: memory follows the number of
    // segments and generations, not the objects.
    let mut segments: Vec<ObjectId> = Vec::new();
    let mut maps: HashSet<ObjectId> = HashSet::new();
    let mut tombstoned: HashSet<ObjectId> = HashSet::new();
    // Segments and disk maps known from descriptions only: taken as complete.
    let mut described_maps: HashSet<ObjectId> = HashSet::new();
    let descriptions = match source {
        RecordSource::PackFiles => None,
        RecordSource::Descriptions => Some(
            Descriptions::list(backend, repo.keys())
                .ctx("list", backend.path(layout::PACK_INDEX))?,
        ),
    };
    let mut good_segments: HashSet<ObjectId> = HashSet::new();
    // Every object's row, filed by id on disk beside the index and added to it in id order
    // once every pack is read (see [`Index::append_objects`]). An estimate of one object per
    // 4 KiB of packs sizes the files; more are split when read.
    let mut found = FoundRows::new(repo, total / 4096)?;
    // Packs whose ingest never committed (pending markers) are left-overs, not indexed. An
    // `uncommitted-` marker of a directory says so only against the index being replaced: its
    // pack is indexed, and its generation listed, like any other (which is safe).
    let pending = uncommitted_packs(backend, false)?;
    let packs: Vec<(String, u64)> = packs
        .into_iter()
        .filter(|(name, _)| {
            if is_being_written(backend, name) {
                progress.note(&format!("skipping pack {name}: an ingest is writing it"));
                false
            } else if pending.contains(name) {
                report.uncommitted += 1;
                false
            } else {
                true
            }
        })
        .collect();
    // In batches, so that descriptions are fetched many at a time and a batch's worth is held.
    for batch in packs.chunks(256) {
        let fetched: Vec<Option<Described>> = match &descriptions {
            Some(d) => d.fetch(repo.packs(), batch),
            None => batch.iter().map(|_| None).collect(),
        };
        for ((name, _), d) in batch.iter().zip(fetched) {
            if let Some(Described {
                description: d,
                metadata,
            }) = d
            {
                for (h, plain) in metadata {
                    let what = h.kind.name();
                    match (h.kind, plain) {
                        (_, Err(e)) => report.damaged.push(format!("{what} {}: {e}", h.id.short())),
                        (ObjectKind::Manifest, Ok(b)) => match Manifest::decode(&b) {
                            Ok(m) => manifests.push((h.id, m)),
                            Err(e) => report.damaged.push(format!("{what} {}: {e}", h.id.short())),
                        },
                        (_, Ok(b)) => match Tombstone::decode(&b) {
                            Ok(t) => tombstoned.extend(t.removed.iter().map(|r| r.manifest)),
                            Err(e) => report.damaged.push(format!("{what} {}: {e}", h.id.short())),
                        },
                    }
                }
                for (h, _) in &d.records {
                    match h.kind {
                        ObjectKind::Segment => {
                            good_segments.insert(h.id);
                        }
                        ObjectKind::DiskMap => {
                            described_maps.insert(h.id);
                        }
                        _ => {}
                    }
                }
                progress.advance(d.len);
                report.packs += 1;
                report.described += 1;
                report.objects += d.records.len() as u64;
                found.add(&mut index, name, d.len, &d.records)?;
                continue;
            }
            let mut records = Vec::new();
            let (len, damage) = scan_pack_resyncing(backend, name, |rec| {
                progress.advance(RECORD_HEADER_LEN as u64 + rec.header.stored_len as u64);
                if rec.header.codec == Codec::Delta {
                    // Decoded only with its base, which may sit in a pack not read yet: indexed
                    // as found, as a described pack's records are (`check --read-data` decodes
                    // it; check verifies that its base is indexed and stored on its own).
                    records.push((rec.header, rec.offset));
                    return Ok(());
                }
                match object::decode(&rec.header, &rec.payload, repo.keys(), None) {
                    Err(e) => report
                        .damaged
                        .push(format!("pack {name} offset {}: {e}", rec.offset)),
                    Ok(plain) => {
                        match rec.header.kind {
                            ObjectKind::Manifest => match Manifest::decode(&plain) {
                                Ok(m) => manifests.push((rec.header.id, m)),
                                Err(e) => report
                                    .damaged
                                    .push(format!("manifest {}: {e}", rec.header.id.short())),
                            },
                            ObjectKind::Segment if StoredSegment::decode(&plain).is_ok() => {
                                segments.push(rec.header.id);
                            }
                            ObjectKind::DiskMap if DiskMap::decode(&plain).is_ok() => {
                                maps.insert(rec.header.id);
                            }
                            ObjectKind::Tombstone => match Tombstone::decode(&plain) {
                                Ok(t) => tombstoned.extend(t.removed.iter().map(|r| r.manifest)),
                                Err(e) => report
                                    .damaged
                                    .push(format!("tombstone {}: {e}", rec.header.id.short())),
                            },
                            _ => {}
                        }
                        records.push((rec.header, rec.offset));
                    }
                }
                Ok(())
            })?;
            for d in damage {
                report.damaged.push(format!("pack {name}: {d}"));
            }
            report.packs += 1;
            report.objects += records.len() as u64;
            found.add(&mut index, name, len, &records)?;
        }
    }
    progress.finish();
    found.append_to(&mut index, progress)?;
    report
        .damaged
        .extend(crate::maintain::coverage::drop_baseless_deltas(&mut index)?);
    for why in descriptions.iter().flat_map(|d| d.take_ignored()) {
        progress.note(&format!("pack description not used: {why}"));
    }
    // A segment is usable if all its chunks are there; a manifest if all it references is.
    progress.start("rebuild index: segments", segments.len() as u64);
    for id in &segments {
        progress.advance(1);
        let Some(s) = segment_back(repo, &index, id)? else {
            continue;
        };
        let mut complete = true;
        for e in &s.extents {
            if let Extent::Data { len, id } = e {
                if index.lookup(id)?.map(|l| l.header.raw_len) != Some(*len) {
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            good_segments.insert(*id);
            cache.push(CacheRow {
                fingerprint: s.fingerprint,
                segment: *id,
                leaves: None,
            });
        }
    }
    progress.finish();
    // By name; of two manifests with one name (an ingest killed before its commit and the
    // next one of the same second) the one that finished last is listed.
    manifests.sort_by(|a, b| {
        let key = |(id, m): &(ObjectId, Manifest)| {
            (
                m.catalog.vm.clone(),
                m.catalog.time.clone(),
                std::cmp::Reverse(m.catalog.finished.clone()),
                *id,
            )
        };
        key(a).cmp(&key(b))
    });
    let mut listed_names = HashSet::new();
    for (id, m) in &manifests {
        if tombstoned.contains(id) {
            report.pruned += 1;
            continue;
        }
        let name = format!("{}@{}", m.catalog.vm, m.catalog.time);
        if !listed_names.insert(name.clone()) {
            report
                .shadowed
                .push(format!("{name} (manifest {})", id.short()));
            continue;
        }
        let mut missing = Vec::new();
        for f in &m.files {
            if !index.contains(&f.object)? {
                missing.push(format!("file {}", f.name));
            }
        }
        for d in &m.disks {
            let map = match maps.contains(&d.disk_map) {
                true => {
                    read_back(repo, &index, &d.disk_map)?.and_then(|b| DiskMap::decode(&b).ok())
                }
                false => None,
            };
            match map {
                None if described_maps.contains(&d.disk_map) => {}
                None => missing.push(format!("disk map of {}", d.slot)),
                Some(map) => {
                    let bad = map
                        .nonzero()
                        .filter(|(_, s)| !good_segments.contains(*s))
                        .count();
                    if bad > 0 {
                        missing.push(format!("{bad} segment(s) of disk {}", d.slot));
                    }
                }
            }
            for e in &d.extents {
                for edge in [e.head, e.tail].into_iter().flatten() {
                    if !index.contains(&edge)? {
                        missing.push(format!("extent edge of disk {}", d.slot));
                    }
                }
            }
        }
        let damage = (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")));
        match index.insert_rebuilt_generation(*id, m, damage.as_deref()) {
            Ok(()) => {
                report.generations += 1;
                if let Some(d) = damage {
                    report.incomplete.push(format!("{name}: {d}"));
                }
            }
            Err(e) => report
                .damaged
                .push(format!("manifest {} ({name}): {e}", id.short())),
        }
    }
    index.insert_cache(&cache)?;
    index.vacuum_if_sparse()?;
    index.checkpoint();
    drop(index);
    // Swap the new index in; keep the old one for inspection.
    report.old_index = repo.replace_index(&tmp)?.map(|p| p.display().to_string());
    if source == RecordSource::PackFiles {
        // The new index lists every record the packs hold, also those a gc found dead and left
        // in a pack it did not rewrite, which the descriptions it compacted no longer list: a
        // check would find the two disagreeing. Described again from the new index, they
        // agree; the next gc finds those records dead again. A failure loses nothing (a
        // description is a hint; packs without one are read).
        let described = repo
            .open_index()
            .and_then(|index| crate::maintain::describe::compact(repo, &index, true));
        match described {
            Ok(c) => report.descriptions = c,
            Err(e) => report.notes.push(format!(
                "the pack descriptions were not written again from the new index: {e}; \
                 `vmrepo gc` writes them"
            )),
        }
    }
    Ok(report)
}

/// An object's row as found in a pack, and the order it was found in: of two records of one
/// object (in two packs) the first found is indexed, as when packs were added one by one.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Found {
    row: ObjectRow,
    seq: u64,
}

impl Ord for Found {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.row.id, self.seq).cmp(&(other.row.id, other.seq))
    }
}

impl PartialOrd for Found {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Keyed for Found {
    const LEN: usize = 32 + 8 + 1 + 1 + 8 + 8 + 4 + 4 + 32;
    fn id(&self) -> &ObjectId {
        &self.row.id
    }
    fn put(&self, out: &mut Vec<u8>) {
        let r = &self.row;
        out.extend_from_slice(&r.id.0);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&[r.kind, r.codec]);
        out.extend_from_slice(&r.pack.to_le_bytes());
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.stored_len.to_le_bytes());
        out.extend_from_slice(&r.raw_len.to_le_bytes());
        // The all-zero id names no chunk: it stands for no base.
        out.extend_from_slice(&r.base.unwrap_or(ObjectId::ZERO).0);
    }
    fn get(b: &[u8]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Found {
            row: ObjectRow {
                id: ObjectId(b[..32].try_into().expect("32 bytes")),
                kind: b[40],
                codec: b[41],
                pack: u64_at(42) as i64,
                offset: u64_at(50),
                stored_len: u32_at(58),
                raw_len: u32_at(62),
                base: Some(ObjectId(b[66..98].try_into().expect("32 bytes")))
                    .filter(|b| !b.is_zero()),
            },
            seq: u64_at(32),
        }
    }
}

/// The rows of the index being rebuilt, gathered pack by pack, then added sorted.
struct FoundRows {
    rows: Spill<Found>,
    seq: u64,
}

impl FoundRows {
    /// Rows held in memory at a time: 25 MiB of them (twice that for a partition that grew
    /// over its share), less than a set of ids takes, as a rebuild's other memory is small.
    const SHARE: u64 = 1 << 18;

    fn new(repo: &Repository, expected: u64) -> Result<FoundRows> {
        Ok(FoundRows {
            rows: Spill::with_share(
                repo.index_dir(),
                expected,
                crate::maintain::batch(FoundRows::SHARE),
            )?,
            seq: 0,
        })
    }

    /// Records pack `name` in the index and files the rows of its `records`.
    fn add(
        &mut self,
        index: &mut Index,
        name: &str,
        len: u64,
        records: &[(RecordHeader, u64)],
    ) -> Result<()> {
        let pack = index.add_pack_alone(name, len)?;
        for (h, offset) in records {
            self.seq += 1;
            self.rows.insert(Found {
                row: ObjectRow::new(h, pack, *offset),
                seq: self.seq,
            })?;
        }
        Ok(())
    }

    /// Adds every row to `index`, one range of ids at a time.
    fn append_to(self, index: &mut Index, progress: &dyn Progress) -> Result<()> {
        progress.start("rebuild index: objects", self.seq);
        let sorted = self.rows.finish()?;
        for part in sorted.partitions() {
            let part = part?;
            index.append_objects(part.items().iter().map(|f| &f.row))?;
            progress.advance(part.items().len() as u64);
        }
        progress.finish();
        Ok(())
    }
}

/// Segment `id` as the packs indexed so far hold it, its base read too when it is a delta;
/// `None` when it (or its base) cannot be read.
fn segment_back(repo: &Repository, index: &Index, id: &ObjectId) -> Result<Option<Segment>> {
    let Some(b) = read_back(repo, index, id)? else {
        return Ok(None);
    };
    Ok(match StoredSegment::decode(&b) {
        Ok(StoredSegment::Whole(s)) => Some(s),
        Ok(StoredSegment::Delta(d)) => read_back(repo, index, &d.base)?
            .and_then(|b| Segment::decode(&b).ok())
            .and_then(|base| d.resolve(&base).ok()),
        Err(_) => None,
    })
}

/// The plaintext of object `id` as the index being built places it; `None` when it is not
/// there or does not read back.
fn read_back(repo: &Repository, index: &Index, id: &ObjectId) -> Result<Option<Vec<u8>>> {
    Ok(index
        .lookup(id)?
        .and_then(|l| repo.packs().read_object(&l.pack, l.offset, &l.header).ok()))
}
