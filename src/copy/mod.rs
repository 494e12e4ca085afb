//! Copying generations from one repository to another (`vmrepo copy`): a local repository to
//! object storage off-site, back, or between two buckets.
//!
//! Each generation is rebuilt in the destination object by object, from the manifest down: its
//! small files, extent edges, disk maps, segments and chunks. Only what the destination lacks is
//! stored (its own dedup decides). When both repositories name objects alike (same id key: both
//! unencrypted, or encrypted with the same master key) a segment or disk map the destination
//! holds already is taken whole, unread, since an object is stored only after everything it
//! references. Otherwise every object is read from the source, verified, and re-hashed (and
//! re-encrypted) under the destination's keys; segment fingerprints are computed again with
//! the destination's fingerprint key. The generation is committed in the destination as an
//! ingest commits one (nothing half-visible), and with `verify` every object it stored is read
//! back and verified afterwards.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::config::{ChunkerParams, CutPoints};
use crate::repo::disk_map::DiskMap;
use crate::repo::id::ObjectId;
use crate::repo::index::{CacheRow, GenerationInfo};
use crate::repo::lock::lock_vm;
use crate::repo::manifest::{Extent, Manifest, Segment};
use crate::repo::object::ObjectKind;
use crate::repo::store::Store;
use crate::repo::Repository;

/// Options of a copy.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Read back and verify every object stored in the destination.
    pub verify: bool,
}

/// One generation copied.
#[derive(Clone, Debug, Serialize)]
pub struct Copied {
    /// `vm@time`.
    pub generation: String,
    /// Objects the destination did not hold, now stored.
    pub objects_new: u64,
    /// Their plaintext bytes.
    pub bytes_new: u64,
    /// Objects read back and verified.
    pub objects_verified: u64,
}

/// What a copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    /// Generations copied.
    pub copied: Vec<Copied>,
    /// Generations the destination holds already (same VM and time): not copied again.
    pub present: Vec<String>,
    /// Generations that could not be copied, and why; the destination holds nothing of them
    /// as a generation.
    pub failed: Vec<(String, String)>,
    /// Plaintext bytes read from the source.
    pub bytes_read: u64,
    /// Bytes appended to the destination's packs.
    pub bytes_stored: u64,
    /// Objects the same in both repositories were taken whole, unread.
    pub same_ids: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Copies `gens` (generations of `src`, oldest first) into `dst`.
pub fn copy(
    src: &Repository,
    dst: &Repository,
    gens: &[GenerationInfo],
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let began = Instant::now();
    if src.config().repository_id == dst.config().repository_id {
        return Err(Error::Usage(format!(
            "{} and {} are the same repository (repository id {}): nothing to copy",
            src.location().display(),
            dst.location().display(),
            src.config().repository_id
        )));
    }
    // Copied segments keep the source's cut points (their chunks are re-named and re-sealed,
    // never re-cut), so only the sizes must agree, not which gear table cut them.
    let (from, to) = (src.config().chunker, dst.config().chunker);
    let sizes = |c: ChunkerParams| ChunkerParams {
        cut_points: CutPoints::Public,
        ..c
    };
    if sizes(from) != sizes(to) {
        return Err(Error::Usage(format!(
            "{} cuts disks with other chunker parameters than {} ({from:?} against {to:?}): \
             copy into a repository made with the same ones",
            dst.location().display(),
            src.location().display()
        )));
    }
    let probe = b"vmrepo copy: do both repositories name objects alike?";
    let mut report = CopyReport {
        same_ids: src.keys().id_of(probe) == dst.keys().id_of(probe),
        ..Default::default()
    };
    // Segments translated in this run (generations of a VM share most of theirs).
    let mut segments: HashMap<ObjectId, (ObjectId, [u8; 32])> = HashMap::new();
    for g in gens {
        let held = dst.with_index(|i| i.generations(Some(&g.vm)))?;
        if held.iter().any(|h| h.time == g.time) {
            report.present.push(g.name.clone());
            continue;
        }
        match copy_one(src, dst, g, opts, &mut report, &mut segments, progress) {
            Ok(c) => report.copied.push(c),
            Err(e) => {
                // What it stored in its last, unsealed pack is gone: forget every translation
                // rather than point a later generation at a segment that is not there.
                segments.clear();
                progress.note(&format!("{} was not copied: {e}", g.name));
                report.failed.push((g.name.clone(), e.to_string()));
            }
        }
    }
    report.seconds = began.elapsed().as_secs_f64();
    Ok(report)
}

fn copy_one(
    src: &Repository,
    dst: &Repository,
    g: &GenerationInfo,
    opts: &CopyOptions,
    report: &mut CopyReport,
    segments: &mut HashMap<ObjectId, (ObjectId, [u8; 32])>,
    progress: &dyn Progress,
) -> Result<Copied> {
    let m = src.load_manifest(&g.manifest)?;
    let _vm_lock = lock_vm(
        &**dst.backend(),
        &m.catalog.vm,
        &dst.keys().name_tag(&m.catalog.vm),
        dst.lock_wait(),
        &|msg| progress.note(msg),
    )?;
    let store = Store::new(dst)?;
    let mut t = Translator {
        src,
        dst,
        store: &store,
        same_ids: report.same_ids,
        fingerprint_key: crate::repo::fingerprint::key(&dst.config().chunker, dst.keys()),
        segments,
        new: Vec::new(),
        bytes_new: 0,
        bytes_read: 0,
        cache: Vec::new(),
    };
    let result = t.manifest(&m, progress).and_then(|m2| {
        let id = store.put_blob(ObjectKind::Manifest, &m2.encode())?;
        store.commit_generation(id, &m2, &t.cache, &[])?;
        Ok(())
    });
    report.bytes_read += t.bytes_read;
    if let Err(e) = result {
        store.abort();
        return Err(e);
    }
    report.bytes_stored += store.bytes_stored();
    let mut done = Copied {
        generation: g.name.clone(),
        objects_new: t.new.len() as u64,
        bytes_new: t.bytes_new,
        objects_verified: 0,
    };
    if opts.verify {
        progress.start(&format!("verify {}", g.name), t.new.len() as u64);
        for chunk in t.new.chunks(256) {
            dst.read_objects(chunk).map_err(|e| {
                Error::Corrupt(format!(
                    "{} was copied, but reading back what was stored failed: {e}; run `vmrepo \
                     check --read-data` on {}",
                    g.name,
                    dst.location().display()
                ))
            })?;
            done.objects_verified += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
        progress.finish();
    }
    Ok(done)
}

/// Rebuilds one generation's objects in the destination.
struct Translator<'a> {
    src: &'a Repository,
    dst: &'a Repository,
    store: &'a Store<'a>,
    same_ids: bool,
    fingerprint_key: [u8; 32],
    /// Source segment → destination segment and its fingerprint.
    segments: &'a mut HashMap<ObjectId, (ObjectId, [u8; 32])>,
    /// Objects stored in the destination by this generation.
    new: Vec<ObjectId>,
    bytes_new: u64,
    bytes_read: u64,
    /// Segment-cache rows of the segments this generation stored or found.
    cache: Vec<CacheRow>,
}

impl Translator<'_> {
    /// True when the destination holds `id` and it names the same object there.
    fn held(&self, id: &ObjectId) -> Result<bool> {
        Ok(self.same_ids && self.dst.with_index(|i| i.contains(id))?)
    }

    /// Stores `data` in the destination; returns its id there.
    fn put(&mut self, kind: ObjectKind, data: &[u8]) -> Result<ObjectId> {
        let id = self.dst.keys().id_of(data);
        if self.store.put(kind, id, data)? {
            self.new.push(id);
            self.bytes_new += data.len() as u64;
        }
        Ok(id)
    }

    /// A small file or extent edge.
    fn file(&mut self, id: &ObjectId) -> Result<ObjectId> {
        if self.held(id)? {
            return Ok(*id);
        }
        let data = self.src.read_object(id)?;
        self.bytes_read += data.len() as u64;
        self.put(ObjectKind::File, &data)
    }

    fn manifest(&mut self, m: &Manifest, progress: &dyn Progress) -> Result<Manifest> {
        let mut out = m.clone();
        for f in &mut out.files {
            f.object = self.file(&f.object)?;
        }
        let total = m.disks.iter().map(|d| d.virtual_size).sum();
        progress.start(&format!("copy {}@{}", m.catalog.vm, m.catalog.time), total);
        for d in &mut out.disks {
            for e in &mut d.extents {
                for edge in [&mut e.head, &mut e.tail].into_iter().flatten() {
                    *edge = self.file(edge)?;
                }
            }
            d.disk_map = self.disk_map(&d.disk_map, progress)?;
        }
        progress.finish();
        Ok(out)
    }

    fn disk_map(&mut self, id: &ObjectId, progress: &dyn Progress) -> Result<ObjectId> {
        let map = self.src.load_disk_map(id)?;
        if self.held(id)? {
            progress.advance(map.size);
            return Ok(*id);
        }
        let mut entries = Vec::with_capacity(map.nonzero().len());
        let mut done = 0;
        for (i, seg) in map.nonzero() {
            entries.push((i, self.segment(seg)?));
            let (start, end) = map.segment_range(i);
            progress.advance(end - start);
            done += end - start;
        }
        progress.advance(map.size.saturating_sub(done));
        let out = DiskMap::new(map.size, map.segment_size, entries);
        self.put(ObjectKind::DiskMap, &out.encode())
    }

    fn segment(&mut self, id: &ObjectId) -> Result<ObjectId> {
        if let Some((new, fingerprint)) = self.segments.get(id) {
            self.cache.push(CacheRow {
                fingerprint: *fingerprint,
                segment: *new,
                leaves: None,
            });
            return Ok(*new);
        }
        let s = self.src.load_segment(id)?;
        let (new, fingerprint) = if self.held(id)? {
            (*id, s.fingerprint)
        } else {
            self.store_segment(&s)?
        };
        self.segments.insert(*id, (new, fingerprint));
        self.cache.push(CacheRow {
            fingerprint,
            segment: new,
            leaves: None,
        });
        Ok(new)
    }

    /// Stores a segment's chunks and the segment itself in the destination.
    fn store_segment(&mut self, s: &Segment) -> Result<(ObjectId, [u8; 32])> {
        let chunks: Vec<ObjectId> = s.data_chunks().map(|(id, _)| id).collect();
        // With the same ids, chunks the destination holds need not be read, and the
        // fingerprint stays; otherwise every chunk is read to hash it again.
        let mut wanted = Vec::new();
        for id in &chunks {
            if !self.held(id)? {
                wanted.push(*id);
            }
        }
        let data = self.src.read_objects(&wanted)?;
        let mut by_id: HashMap<ObjectId, Vec<u8>> = wanted.into_iter().zip(data).collect();
        let mut buf = Vec::new();
        let mut extents = Vec::with_capacity(s.extents.len());
        for e in &s.extents {
            match e {
                Extent::Zero { len } => {
                    if !self.same_ids {
                        buf.resize(buf.len() + *len as usize, 0);
                    }
                    extents.push(*e);
                }
                Extent::Data { len, id } => {
                    let new = match by_id.get(id) {
                        Some(bytes) => {
                            if bytes.len() != *len as usize {
                                return Err(Error::Corrupt(format!(
                                    "segment in the source says chunk {} holds {len} bytes; it \
                                     holds {}",
                                    id.short(),
                                    bytes.len()
                                )));
                            }
                            self.bytes_read += bytes.len() as u64;
                            if !self.same_ids {
                                buf.extend_from_slice(bytes);
                            }
                            let bytes = by_id.remove(id).unwrap_or_default();
                            let new = self.put(ObjectKind::Chunk, &bytes)?;
                            // A chunk may occur twice in a segment: keep it for the next one.
                            by_id.insert(*id, bytes);
                            new
                        }
                        None => *id,
                    };
                    extents.push(Extent::Data { len: *len, id: new });
                }
            }
        }
        let fingerprint = if self.same_ids {
            s.fingerprint
        } else {
            crate::repo::fingerprint::of_extents(&self.fingerprint_key, &buf, &s.extents)
        };
        let out = Segment {
            fingerprint,
            extents,
        };
        Ok((self.put(ObjectKind::Segment, &out.encode())?, fingerprint))
    }
}
