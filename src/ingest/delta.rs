//! Which whole segment a new segment is stored against, and in which form; and which chunk
//! each of its new chunks may be stored against.
//!
//! A night that changes a few chunks of a 4 MiB segment used to store the segment's whole chunk
//! list again (about 9 KiB of ids that do not compress). In a repository of format 3 a new
//! segment is instead stored as its differences from the segment the same disk held at the
//! same place in the VM's latest generation ([`SegmentDelta`]), or from that segment's own base
//! when it is a delta itself: every delta is one step from a whole segment. It is stored whole
//! when it has no such segment, when that one cannot be read, or when the edits would not be
//! smaller than half of the whole list.

use crate::repo::id::ObjectId;
use crate::repo::manifest::{DiskMap, Segment, SegmentDelta};
use crate::repo::Repository;
use crate::vmware::vm::DiskPlan;

/// Whether new segments of this repository may be stored as deltas (format 3 and later).
pub(super) fn enabled(repo: &Repository) -> bool {
    repo.config().format_version >= crate::repo::config::DELTA_SEGMENTS_SINCE
}

/// Whether new chunks of this repository may be stored as deltas of the chunks they replace
/// (format 4 and later).
pub(super) fn chunks_enabled(repo: &Repository) -> bool {
    repo.config().format_version >= crate::repo::config::DELTA_CHUNKS_SINCE
}

/// For each of `cuts` (byte ranges of a new segment), the chunk of `previous` (the segment
/// the disk held at the same place) that covered most of the same bytes, and how many bytes
/// before the cut it started: what a guest's write there replaced, and what a new chunk is
/// most likely to resemble. `None` where only zeros were.
pub(super) fn replaced_chunks(
    previous: &Segment,
    cuts: &[crate::ingest::chunker::Cut],
) -> Vec<Option<(ObjectId, i64)>> {
    use crate::repo::manifest::Extent;
    // The previous data extents as (start, end, id), in order.
    let mut at = 0usize;
    let old: Vec<(usize, usize, ObjectId)> = previous
        .extents
        .iter()
        .filter_map(|e| {
            let start = at;
            at += e.len() as usize;
            match *e {
                Extent::Data { id, .. } => Some((start, at, id)),
                Extent::Zero { .. } => None,
            }
        })
        .collect();
    let mut first = 0;
    cuts.iter()
        .map(|c| {
            while first < old.len() && old[first].1 <= c.range.start {
                first += 1;
            }
            old[first..]
                .iter()
                .take_while(|o| o.0 < c.range.end)
                .map(|o| (o.1.min(c.range.end) - o.0.max(c.range.start), o))
                .max_by_key(|(overlap, _)| *overlap)
                .map(|(_, o)| (o.2, c.range.start as i64 - o.0 as i64))
        })
        .collect()
}

/// For each disk of tonight's plan without a map of its own to go by (`known[k]` is `false`),
/// the map of the disk of the same slot in `vm`'s latest generation, if it was cut in segments
/// of `segment_size`. Best effort: a previous generation that cannot be read costs tonight's
/// segments their deltas, never the backup.
pub(super) fn previous_maps(
    repo: &Repository,
    vm: &str,
    disks: &[DiskPlan],
    known: &[bool],
    segment_size: u32,
) -> Vec<Option<DiskMap>> {
    let mut maps: Vec<Option<DiskMap>> = disks.iter().map(|_| None).collect();
    if !enabled(repo) || known.iter().all(|k| *k) {
        return maps;
    }
    let latest = match repo.with_index(|i| i.resolve(vm)) {
        Ok(g) => g,
        Err(_) => return maps,
    };
    let Ok(manifest) = repo.load_manifest(&latest.manifest) else {
        return maps;
    };
    for ((d, known), map) in disks.iter().zip(known).zip(&mut maps) {
        if *known {
            continue;
        }
        let Some(prev) = manifest.disks.iter().find(|p| p.slot == d.slot) else {
            continue;
        };
        *map = repo
            .load_disk_map(&prev.disk_map)
            .ok()
            .filter(|m| m.segment_size == segment_size);
    }
    maps
}

/// The bytes to store for `segment`, new at a place where the disk held segment `prev` before
/// (the all-zero id when it held none): its differences from `prev`'s whole form (`whole`, when
/// the caller has it loaded; else it is read now) when that is worth it, else the whole segment.
pub(super) fn encode(
    repo: &Repository,
    deltas: bool,
    prev: &ObjectId,
    whole: Option<(ObjectId, &Segment)>,
    segment: &Segment,
) -> Vec<u8> {
    if !deltas || prev.is_zero() {
        return segment.encode();
    }
    let loaded;
    let (base, base_segment) = match whole {
        Some(w) => w,
        None => match repo.load_segment_and_base(prev) {
            Ok(l) => {
                loaded = l;
                loaded.whole(prev)
            }
            Err(_) => return segment.encode(),
        },
    };
    match SegmentDelta::diff(base, base_segment, segment) {
        Some(d) => d.encode(),
        None => segment.encode(),
    }
}
