//! gc's mark: every object a remaining generation references, found by walking manifests,
//! disk maps and segments (metadata only, each distinct one once). Unreadable metadata stops
//! gc, unless the generation is marked damaged.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::maintain::id_set::{IdSet, IdSpill};
use crate::maintain::walk::{Reference, SegmentPlace, Visitor, Walk};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::{GenerationInfo, Index};
use crate::repo::manifest::{DiskEntry, DiskMap};
use crate::repo::Repository;

/// Everything the remaining generations reference.
pub struct LiveSet {
    /// Live object ids (tombstones are live through their kind, not listed here), on disk
    /// beside the index when there are many.
    pub ids: IdSet,
    /// Generations marked.
    pub generations: u64,
    /// Metadata bytes read.
    pub metadata_read: u64,
    /// Damaged generations whose unreadable metadata was skipped.
    pub damaged: Vec<String>,
}

/// Marks every object referenced by a generation whose manifest is not in `removed`.
///
/// Reads manifests, disk maps and segments (each distinct one once), never chunk data. A
/// generation marked damaged by `check --repair` may have unreadable metadata: its readable
/// parts are marked, the rest skipped. Any other unreadable metadata stops gc: it cannot tell
/// which chunks that generation still needs. Memory stays bounded at any repository size: the
/// live ids go to disk beside the index (see [`IdSpill`]) when the index lists many objects.
pub fn mark(
    repo: &Repository,
    index: &Index,
    removed: &HashSet<ObjectId>,
    progress: &dyn Progress,
) -> Result<LiveSet> {
    let gens: Vec<GenerationInfo> = index
        .generations(None)?
        .into_iter()
        .filter(|g| !removed.contains(&g.manifest))
        .collect();
    let objects = index.object_count_estimate()?;
    let mut marker = Marker {
        repo,
        generation: None,
        live: Mutex::new(IdSpill::new(repo.index_dir(), objects)?),
        metadata_read: AtomicU64::new(0),
        damaged: Vec::new(),
        failed: Mutex::new(None),
    };
    let mut walk = Walk::each_map_once();
    progress.start("gc: mark generations", gens.len() as u64);
    for g in &gens {
        progress.advance(1);
        marker.live.get_mut().unwrap().insert(g.manifest)?;
        let m = match repo.read_object(&g.manifest) {
            Ok(b) => {
                *marker.metadata_read.get_mut() += b.len() as u64;
                crate::repo::manifest::Manifest::decode(&b).map_err(Error::Corrupt)
            }
            Err(e) => Err(e),
        };
        let m = match m {
            Ok(m) => m,
            Err(_) if g.damaged.is_some() => {
                marker.damaged.push(g.name.clone());
                continue;
            }
            Err(e) => return Err(unreadable(g, "manifest", e)),
        };
        marker.generation = Some(g);
        walk.manifest_parallel(&mut marker, &m)?;
    }
    progress.finish();
    if let Some(e) = marker.failed.into_inner().unwrap() {
        return Err(e);
    }
    let mut damaged = marker.damaged;
    damaged.sort();
    damaged.dedup();
    let ids = marker.live.into_inner().unwrap().finish()?;
    Ok(LiveSet {
        ids: with_bases(repo, index, ids, objects)?,
        generations: gens.len() as u64,
        metadata_read: marker.metadata_read.into_inner(),
        damaged,
    })
}

/// `live` with the base of every delta the index lists added. A delta is decoded with its base,
/// so the base lives as long as the delta is indexed, whether or not a generation still lists
/// either: a dead delta in a pack gc keeps stays indexed, and an ingest may deduplicate against
/// it and make it live again (here, or on another host whose cache of the index lists it). Its
/// base is freed by the gc after the one that removes the delta. A base is never a delta itself,
/// so one pass suffices. Only the index's delta rows are read; the set is filed again only when
/// there are any.
pub fn with_bases(repo: &Repository, index: &Index, live: IdSet, objects: u64) -> Result<IdSet> {
    // There are at most as many deltas as objects: sized for that, the set goes to disk from
    // the start when it could outgrow a partition, instead of growing in memory until it does.
    let mut bases = IdSpill::new(repo.index_dir(), objects)?;
    let mut deltas = 0u64;
    index.for_each_delta_in_range(&ObjectId([0; 32]), None, |_, base| {
        deltas += 1;
        bases.insert(base)
    })?;
    if deltas == 0 {
        return Ok(live);
    }
    let bases = bases.finish()?;
    let mut all = IdSpill::new(repo.index_dir(), objects)?;
    for part in live.partitions() {
        all.extend(part?.ids().iter().copied())?;
    }
    for part in bases.partitions() {
        all.extend(part?.ids().iter().copied())?;
    }
    all.finish()
}

/// gc's error for metadata of a (not damaged) generation that cannot be read.
fn unreadable(g: &GenerationInfo, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!(
        "gc stopped before deleting anything: the {what} of generation {} cannot be read ({e}); \
         gc cannot tell which chunks it needs. Run `vmrepo check --repair` first",
        g.name
    ))
}

/// gc's visitor of the reference graph: every object met is live; unreadable metadata is
/// tolerated only in a generation marked damaged.
struct Marker<'a> {
    repo: &'a Repository,
    /// The generation being walked.
    generation: Option<&'a GenerationInfo>,
    live: Mutex<IdSpill>,
    metadata_read: AtomicU64,
    damaged: Vec<String>,
    /// A write of the live set that failed in a parallel segment visit.
    failed: Mutex<Option<Error>>,
}

impl Marker<'_> {
    fn generation(&self) -> &GenerationInfo {
        self.generation.expect("set before each manifest is walked")
    }
}

impl Visitor for Marker<'_> {
    /// Why the segment cannot be read, if it cannot.
    type Segment = Option<String>;

    fn reference(&mut self, r: Reference<'_>) -> Result<()> {
        let id = match r {
            Reference::File(f) => f.object,
            Reference::ExtentEdge { id, .. } => id,
        };
        self.live.get_mut().unwrap().insert(id)
    }

    fn disk_map(&mut self, disk: &DiskEntry) -> Result<Option<DiskMap>> {
        self.live.get_mut().unwrap().insert(disk.disk_map)?;
        match self.repo.load_disk_map(&disk.disk_map) {
            Ok(map) => {
                *self.metadata_read.get_mut() += map.encoded_len();
                Ok(Some(map))
            }
            Err(_) if self.generation().damaged.is_some() => {
                self.damaged.push(self.generation().name.clone());
                Ok(None)
            }
            Err(e) => Err(unreadable(
                self.generation(),
                &format!("disk map {}", disk.disk_map.short()),
                e,
            )),
        }
    }

    fn segment(&self, id: &ObjectId, _len: u64) -> Option<String> {
        match self.repo.load_segment_with_base(id) {
            Ok((s, base)) => {
                // A delta's base segment is live with it (its chunks are listed in the delta).
                let chunks: Vec<ObjectId> = s.data_chunks().map(|(id, _)| id).chain(base).collect();
                self.metadata_read
                    .fetch_add(44 + 36 * chunks.len() as u64, Ordering::Relaxed);
                if let Err(e) = self.live.lock().unwrap().extend(chunks) {
                    self.failed.lock().unwrap().get_or_insert(e);
                }
                None
            }
            Err(e) => Some(e.to_string()),
        }
    }

    fn segment_at(&mut self, place: SegmentPlace<'_>, verdict: &Option<String>) -> Result<()> {
        self.live.get_mut().unwrap().insert(place.id)?;
        if let Some(e) = self.failed.get_mut().unwrap().take() {
            return Err(e);
        }
        match verdict {
            None => Ok(()),
            Some(_) if self.generation().damaged.is_some() => {
                self.damaged.push(self.generation().name.clone());
                Ok(())
            }
            Some(e) => Err(unreadable(
                self.generation(),
                &format!("segment {}", place.id.short()),
                e,
            )),
        }
    }
}
