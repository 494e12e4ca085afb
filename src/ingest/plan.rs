//! What a change-aware ingest builds on: the base generation (named by `--since`, or the
//! VM's latest when its snapshot chains grew), which segments the changes touch, and the
//! previous versions of those, loaded before the workers start.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use blake3::hazmat::ChainingValue;

use crate::error::{Advice, Error, Result, Setting};
use crate::ingest::changes::ChangedRanges;
use crate::repo::config::ChunkerParams;
use crate::repo::id::ObjectId;
use crate::repo::manifest::{DiskMap, Manifest};
use crate::repo::LoadedSegment;
use crate::repo::Repository;
use crate::vmware::vm::{DiskPlan, SourcePlan};

/// The generation a change-aware ingest builds on, and the changes.
pub(super) struct Base<'a> {
    pub(super) name: String,
    pub(super) manifest: Manifest,
    /// The changed-ranges list, or `None` to compare snapshot chains with `manifest`'s.
    pub(super) changes: Option<&'a ChangedRanges>,
}

/// For a VM with snapshot chains and no changed-ranges list: its latest generation, whose
/// recorded chains tell which links tonight's chains add.
pub(super) fn load_chain_base(
    repo: &Repository,
    plan: &SourcePlan,
) -> Result<Option<Base<'static>>> {
    if !plan.disks.iter().any(|d| d.layout.is_some()) {
        return Ok(None);
    }
    let gen = match repo.with_index(|i| i.resolve(&plan.vm)) {
        Ok(g) => g,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(Base {
        manifest: repo.load_manifest(&gen.manifest)?,
        name: gen.name,
        changes: None,
    }))
}

/// Tonight's chain of `d` against the chain `prev` recorded: if the links `prev` read are
/// unchanged at the bottom of tonight's chain, the ranges the new links on top hold.
pub(super) fn chain_changes(
    d: &DiskPlan,
    prev: &crate::repo::manifest::DiskEntry,
    since: &str,
) -> Result<Option<std::result::Result<Vec<Range<u64>>, String>>> {
    let Some(now) = &d.layout else {
        return Ok(None);
    };
    let Some(before) = &prev.layout else {
        return Ok(Some(Err(format!(
            "disk {}: {since} did not read it as a snapshot chain",
            d.slot
        ))));
    };
    let (now, before) = (&now.chain, &before.chain);
    if now.len() < before.len() {
        return Ok(Some(Err(format!(
            "disk {}: its chain has {} link(s), {} at {since} (snapshots were consolidated)",
            d.slot,
            now.len(),
            before.len()
        ))));
    }
    let k = now.len() - before.len();
    for (a, b) in now[k..].iter().zip(before) {
        let same = a.file == b.file
            && a.format == b.format
            && a.cid == b.cid
            && a.virtual_size == b.virtual_size
            && a.stamp.is_some()
            && a.stamp == b.stamp;
        if !same {
            return Ok(Some(Err(format!(
                "disk {}: link {} changed since {since} (CID, size or modification time)",
                d.slot, a.file
            ))));
        }
    }
    let mut ranges = Vec::new();
    for level in 0..k {
        match d.reader.link_ranges(level) {
            Some(r) => ranges.extend(r?),
            None => return Ok(None),
        }
    }
    ranges.sort_by_key(|r| r.start);
    Ok(Some(Ok(ranges)))
}

pub(super) fn load_base<'a>(
    repo: &Repository,
    plan: &SourcePlan,
    changes: &'a ChangedRanges,
    since: Option<&str>,
) -> Result<Base<'a>> {
    let spec = since.or(changes.since.as_deref()).ok_or_else(|| {
        Error::from(
            Advice::new("")
                .setting(Setting::ChangedRanges)
                .text(format!(
                    " {} needs the generation the changes are relative to: use ",
                    changes.source
                ))
                .setting(Setting::Since)
                .text(" or put \"since\" in the file"),
        )
    })?;
    let gen = repo.with_index(|i| i.resolve(spec))?;
    if gen.vm != plan.vm {
        return Err(Error::Usage(format!(
            "the changes are relative to {}, a generation of another VM than {}",
            gen.name, plan.vm
        )));
    }
    let slots: Vec<&str> = plan.disks.iter().map(|d| d.slot.as_str()).collect();
    let unknown = changes.unknown_slots(&slots);
    if !unknown.is_empty() {
        return Err(Error::BadInput {
            path: changes.source.clone().into(),
            reason: format!(
                "names disk(s) {} that VM {} does not have (its disks: {})",
                unknown.join(", "),
                plan.vm,
                slots.join(", ")
            ),
        });
    }
    Ok(Base {
        manifest: repo.load_manifest(&gen.manifest)?,
        name: gen.name,
        changes: Some(changes),
    })
}

/// Per disk: the previous segment list, which segments the changes touch, the changed ranges
/// (sorted, disjoint), which touched segments can be patched (one data run with its leaves
/// kept), and the previous versions of those, loaded before the workers start (up to
/// [`PRELOAD_MAX`]; the rest are loaded when their turn comes).
pub(super) struct Reuse {
    pub(super) segments: DiskMap,
    pub(super) touched: Vec<Range<u64>>,
    pub(super) changed: Vec<Range<u64>>,
    pub(super) patchable: HashSet<u64>,
    pub(super) preloaded: HashMap<u64, (LoadedSegment, Vec<ChainingValue>)>,
}

/// Previous segments a change-aware ingest loads up front, at most (about 12 KiB each). Read
/// before the run writes anything, they cost a few sequential reads; read when their turn
/// comes, each is a random read queued behind the new packs' writeback (0.2 s seen on a
/// shared disk).
pub(super) const PRELOAD_MAX: usize = 4096;

impl Reuse {
    /// Whether the changes touch segment `i`.
    pub(super) fn is_touched(&self, i: u64) -> bool {
        let k = self.touched.partition_point(|t| t.end <= i);
        self.touched.get(k).is_some_and(|t| t.start <= i)
    }

    /// The touched segments, in order.
    pub(super) fn touched(&self) -> impl Iterator<Item = u64> + '_ {
        self.touched.iter().flat_map(|t| t.clone())
    }

    /// The changed ranges that meet `r`.
    pub(super) fn changed_in(&self, r: &Range<u64>) -> &[Range<u64>] {
        let lo = self.changed.partition_point(|c| c.end <= r.start);
        let hi = self.changed.partition_point(|c| c.start < r.end).max(lo);
        &self.changed[lo..hi]
    }

    /// What touched segment `i` (disk bytes `range`) is expected to be read as: the context
    /// around each change when it can be patched, the changes alone when it was all zero,
    /// else all of it.
    pub(super) fn planned_reads(
        &self,
        i: u64,
        range: Range<u64>,
        params: &ChunkerParams,
    ) -> Vec<Range<u64>> {
        if self.segments.get(i) == crate::repo::id::ObjectId::ZERO {
            return self
                .changed_in(&range)
                .iter()
                .map(|c| c.start.max(range.start)..c.end.min(range.end))
                .collect();
        }
        if !self.patchable.contains(&i) {
            return vec![range];
        }
        let (before, after) = crate::ingest::patch::context(params);
        crate::ingest::patch::merged(self.changed_in(&range).iter().map(|c| {
            c.start.saturating_sub(before).max(range.start)..(c.end + after).min(range.end)
        }))
    }
}

pub(super) fn plan_reuse(
    repo: &Repository,
    base: &Base<'_>,
    d: &DiskPlan,
    disks: usize,
    params: &ChunkerParams,
) -> Result<Option<std::result::Result<Reuse, String>>> {
    let size = d.reader.size();
    let Some(prev) = base.manifest.disks.iter().find(|p| p.slot == d.slot) else {
        return Ok(Some(Err(format!(
            "disk {}: {} has no such disk",
            d.slot, base.name
        ))));
    };
    let ranges = match base.changes {
        Some(c) => match c.for_disk(&d.slot, disks, size)? {
            Some(r) => r,
            None => {
                return Ok(Some(Err(format!(
                    "disk {}: no changed ranges given for it",
                    d.slot
                ))))
            }
        },
        None => match chain_changes(d, prev, &base.name)? {
            None => return Ok(None),
            Some(Err(why)) => return Ok(Some(Err(why))),
            Some(Ok(r)) => r,
        },
    };
    if prev.virtual_size != size {
        return Ok(Some(Err(format!(
            "disk {}: its size changed from {} to {size} bytes since {}",
            d.slot, prev.virtual_size, base.name
        ))));
    }
    let map = repo.load_disk_map(&prev.disk_map)?;
    if map.segment_size != params.segment_size {
        return Ok(Some(Err(format!(
            "disk {}: {} was cut in other segments",
            d.slot, base.name
        ))));
    }
    let touched =
        crate::ingest::changes::touched_segments(&ranges, size, params.segment_size as u64);
    let mut leaves = Vec::new();
    let mut patchable = repo.reading_index(|i| {
        let mut patchable = HashSet::new();
        for t in &touched {
            for k in map.nonzero_in(t.start, t.end) {
                let s = map.get(k);
                if leaves.len() < PRELOAD_MAX {
                    if let Some(cvs) = i.segment_leaves(&s)? {
                        leaves.push((k, cvs));
                        patchable.insert(k);
                    }
                } else if i.has_segment_leaves(&s)? {
                    patchable.insert(k);
                }
            }
        }
        Ok(patchable)
    })?;
    // A previous version that cannot be read (or whose base cannot) is not patched: tonight
    // reads that segment whole, and damage in an older generation costs a read, not the backup.
    let ids: Vec<ObjectId> = leaves.iter().map(|(k, _)| map.get(*k)).collect();
    let read: Vec<Result<Vec<u8>>> = match repo.read_objects(&ids) {
        Ok(all) => all.into_iter().map(Ok).collect(),
        Err(_) => ids.iter().map(|id| repo.read_object(id)).collect(),
    };
    let (mut kept, mut kept_ids, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for ((leaf, id), read) in leaves.into_iter().zip(ids).zip(read) {
        match read {
            Ok(b) => {
                kept.push(leaf);
                kept_ids.push(id);
                bytes.push(b);
            }
            Err(_) => {
                patchable.remove(&leaf.0);
            }
        }
    }
    let mut preloaded = HashMap::with_capacity(kept.len());
    for ((k, cvs), segment) in kept.into_iter().zip(repo.decode_segments(&kept_ids, bytes)) {
        match segment {
            Ok(s) => {
                preloaded.insert(k, (s, cvs));
            }
            Err(_) => {
                patchable.remove(&k);
            }
        }
    }
    Ok(Some(Ok(Reuse {
        touched,
        segments: map,
        changed: crate::ingest::patch::merged(ranges),
        patchable,
        preloaded,
    })))
}
