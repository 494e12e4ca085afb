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
/// most likely to resemble. `None` where only zeros were, and for a chunk not near a previous
/// cut point ([`near_previous_cuts`]): there the guest wrote other content, and reading and
/// decompressing the chunk it replaced only to find that out would be wasted.
pub(super) fn replaced_chunks(
    previous: &Segment,
    cuts: &[crate::ingest::chunker::Cut],
) -> Vec<Option<(ObjectId, i64)>> {
    use crate::repo::manifest::Extent;
    // In one walk of the previous extents: their cut points (0, then each one's end) and the
    // data extents as (start, end, id), in order.
    let mut old_cuts = vec![0usize];
    let mut old: Vec<(usize, usize, ObjectId)> = Vec::new();
    for e in &previous.extents {
        let start = old_cuts[old_cuts.len() - 1];
        let end = start + e.len() as usize;
        old_cuts.push(end);
        if let Extent::Data { id, .. } = *e {
            old.push((start, end, id));
        }
    }
    let near = near_previous_cuts(&old_cuts, cuts);
    let mut first = 0;
    cuts.iter()
        .zip(near)
        .map(|(c, near)| {
            if !near {
                return None;
            }
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

/// How many chunks away from one that meets a previous cut point a new chunk may be and still
/// be tried as an edit ([`near_previous_cuts`]).
const NEAR_CUTS: usize = 2;

/// For each of `cuts` (in order), whether it or a chunk at most [`NEAR_CUTS`] places from it in
/// `cuts` starts or ends at one of `old_cuts` (where the previous segment's chunks and zero runs
/// started and ended, in order). Cut points follow
/// content: a guest that edits a few blocks leaves the cut points around them where they were,
/// so a chunk holding an edit starts or ends at an old cut point, or one of its neighbours does
/// (when the edit moved the cuts near it). A longer run of chunks that meet no old cut point is
/// content the guest wrote anew. On the scattered-changes bench, 171 of a night's 2,444 new
/// chunks proved like what they replaced once that was read and decompressed for each; this
/// rule keeps 142 of those deltas and stores the same bytes. On in-place churn of a real
/// filesystem it stores 0.1% more per night (0.3% with neighbours only one place away); see
/// docs/PERFORMANCE.md.
fn near_previous_cuts(old_cuts: &[usize], cuts: &[crate::ingest::chunker::Cut]) -> Vec<bool> {
    let on_old = |p: usize| old_cuts.binary_search(&p).is_ok();
    let meets: Vec<bool> = cuts
        .iter()
        .map(|c| on_old(c.range.start) || on_old(c.range.end))
        .collect();
    (0..cuts.len())
        .map(|i| {
            meets[i.saturating_sub(NEAR_CUTS)..(i + NEAR_CUTS + 1).min(cuts.len())].contains(&true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::chunker::Cut;
    use crate::repo::manifest::Extent;

    fn id(n: u8) -> ObjectId {
        ObjectId([n; 32])
    }

    fn cut(range: std::ops::Range<usize>) -> Cut {
        Cut {
            range,
            id: id(0xff),
        }
    }

    /// Ten 1,000-byte chunks, then a zero run.
    fn previous() -> Segment {
        let mut extents: Vec<Extent> = (0..10)
            .map(|n| Extent::Data {
                len: 1000,
                id: id(n),
            })
            .collect();
        extents.push(Extent::Zero { len: 2000 });
        Segment {
            fingerprint: [0; 32],
            extents,
        }
    }

    #[test]
    fn chunks_of_an_edit_are_tried_against_what_they_replace() {
        // One chunk edited in place; one edit that moved a cut; one that removed one.
        let cuts = [
            cut(2000..3000),
            cut(4000..4600),
            cut(4600..5000),
            cut(6000..7800),
        ];
        let got = replaced_chunks(&previous(), &cuts);
        assert_eq!(got[0], Some((id(2), 0)));
        assert_eq!(got[1], Some((id(4), 0)));
        assert_eq!(got[2], Some((id(4), 600)));
        assert_eq!(got[3], Some((id(6), 0)));
    }

    #[test]
    fn a_run_of_chunks_far_from_every_old_cut_is_stored_on_its_own() {
        // Bytes 1,000..8,000 rewritten: the new cuts meet the old ones only at the run's ends.
        let cuts = [
            cut(0..1000),
            cut(1000..1500),
            cut(1500..2300),
            cut(2300..3100),
            cut(3100..3900),
            cut(3900..4700),
            cut(4700..5500),
            cut(5500..6300),
            cut(6300..7100),
            cut(7100..8000),
            cut(8000..9000),
        ];
        let got = replaced_chunks(&previous(), &cuts);
        let tried: Vec<bool> = got.iter().map(Option::is_some).collect();
        let far = [
            false, false, false, false, true, true, true, false, false, false, false,
        ];
        assert_eq!(tried, far.map(|f| !f), "{got:?}");
        // Two places from the run's first: what covered most of its bytes, 300 bytes on.
        assert_eq!(got[3], Some((id(2), 300)));
        // A chunk ending where the zero run began meets an old cut; over zeros, nothing.
        let tail = [cut(9500..10_000), cut(10_000..11_000)];
        assert_eq!(
            replaced_chunks(&previous(), &tail),
            [Some((id(9), 500)), None]
        );
    }
}
