//! The one walk of the reference graph: a manifest's small files and extent-file edges, its
//! disks' maps, their segments, and the chunks each segment lists. gc's mark, `check` and the
//! damage report all walk it through [`Walk`]; what each makes of a node, and what it does when
//! one cannot be read, is its [`Visitor`].
//!
//! Each distinct segment is evaluated once per walk, however many disks and generations share
//! it (a nightly generation shares almost all of its segments with the night before); what the
//! visitor made of it is then shown at every place it occurs. Only the verdicts are kept, never
//! the segments, so memory follows the number of distinct segments, not their contents.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use rayon::prelude::*;

use crate::error::Result;
use crate::repo::id::ObjectId;
use crate::repo::manifest::{DiskEntry, DiskMap, ExtentFile, FileEntry, Manifest};

/// An object a manifest names directly.
pub enum Reference<'a> {
    /// A small file (.vmx, .nvram, log, descriptor).
    File(&'a FileEntry),
    /// The bytes of an extent file before or after the disk's data in it.
    ExtentEdge {
        /// The disk.
        disk: &'a DiskEntry,
        /// The extent whose file it belongs to.
        extent: &'a ExtentFile,
        /// The object.
        id: ObjectId,
    },
}

/// Where a segment occurs: which disk, which segment of it, which guest bytes.
pub struct SegmentPlace<'a> {
    /// The disk.
    pub disk: &'a DiskEntry,
    /// The segment's number in the disk map.
    pub index: u64,
    /// The guest bytes it covers.
    pub range: Range<u64>,
    /// The segment object.
    pub id: ObjectId,
}

/// What a walk does at each node.
pub trait Visitor {
    /// What is made of one distinct segment (its verdict), computed once per walk.
    type Segment: Send;

    /// An object the manifest names directly.
    fn reference(&mut self, _r: Reference<'_>) -> Result<()> {
        Ok(())
    }

    /// Loads the map of `disk`; `None` skips the disk (the visitor has noted why), an error
    /// stops the walk.
    fn disk_map(&mut self, disk: &DiskEntry) -> Result<Option<DiskMap>>;

    /// Evaluates segment `id`, which must cover `len` bytes (loading it as it sees fit).
    fn segment(&self, id: &ObjectId, len: u64) -> Self::Segment;

    /// Segment `place.id` at one of its places, with its verdict.
    fn segment_at(&mut self, _place: SegmentPlace<'_>, _verdict: &Self::Segment) -> Result<()> {
        Ok(())
    }

    /// Every segment of `disk` has been shown (none when its map was skipped).
    fn disk_done(&mut self, _disk: &DiskEntry) -> Result<()> {
        Ok(())
    }
}

/// One walk over any number of manifests: remembers the verdicts of the segments it has met.
pub struct Walk<S> {
    verdicts: HashMap<ObjectId, S>,
    /// Disk maps already walked, when a map met again is skipped.
    maps_walked: Option<HashSet<ObjectId>>,
}

impl<S: Send> Walk<S> {
    /// A walk that shows every disk of every manifest, even a disk map met before (what
    /// `check` reports per generation).
    pub fn every_place() -> Walk<S> {
        Walk {
            verdicts: HashMap::new(),
            maps_walked: None,
        }
    }

    /// A walk that visits each disk map once (what a mark of everything live needs); a map the
    /// visitor could not load is offered again where it occurs next.
    pub fn each_map_once() -> Walk<S> {
        Walk {
            verdicts: HashMap::new(),
            maps_walked: Some(HashSet::new()),
        }
    }

    /// The verdicts of every distinct segment met so far.
    pub fn into_verdicts(self) -> HashMap<ObjectId, S> {
        self.verdicts
    }

    /// Walks `m`, evaluating the segments it meets first one after another.
    pub fn manifest<V: Visitor<Segment = S>>(&mut self, v: &mut V, m: &Manifest) -> Result<()> {
        self.walk(v, m, |v, new| {
            new.iter().map(|(id, len)| v.segment(id, *len)).collect()
        })
    }

    /// Walks `m`, evaluating the segments it meets first in parallel.
    pub fn manifest_parallel<V>(&mut self, v: &mut V, m: &Manifest) -> Result<()>
    where
        V: Visitor<Segment = S> + Sync,
    {
        self.walk(v, m, |v, new| {
            new.par_iter()
                .map(|(id, len)| v.segment(id, *len))
                .collect()
        })
    }

    fn walk<V: Visitor<Segment = S>>(
        &mut self,
        v: &mut V,
        m: &Manifest,
        evaluate: impl Fn(&V, &[(ObjectId, u64)]) -> Vec<S>,
    ) -> Result<()> {
        for f in &m.files {
            v.reference(Reference::File(f))?;
        }
        for d in &m.disks {
            for e in &d.extents {
                for id in [e.head, e.tail].into_iter().flatten() {
                    v.reference(Reference::ExtentEdge {
                        disk: d,
                        extent: e,
                        id,
                    })?;
                }
            }
        }
        for d in &m.disks {
            if self
                .maps_walked
                .as_ref()
                .is_some_and(|w| w.contains(&d.disk_map))
            {
                continue;
            }
            let Some(map) = v.disk_map(d)? else {
                // Not remembered as walked: the next disk that names it is judged on its own
                // (gc tolerates an unreadable map only in a generation marked damaged).
                v.disk_done(d)?;
                continue;
            };
            if let Some(walked) = &mut self.maps_walked {
                walked.insert(d.disk_map);
            }
            let mut new: Vec<(ObjectId, u64)> = Vec::new();
            let mut queued = HashSet::new();
            for (i, id) in map.nonzero() {
                if !self.verdicts.contains_key(id) && queued.insert(*id) {
                    let (s, e) = map.segment_range(i);
                    new.push((*id, e - s));
                }
            }
            let verdicts = evaluate(v, &new);
            self.verdicts
                .extend(new.into_iter().map(|(id, _)| id).zip(verdicts));
            for (i, id) in map.nonzero() {
                let (s, e) = map.segment_range(i);
                let place = SegmentPlace {
                    disk: d,
                    index: i,
                    range: s..e,
                    id: *id,
                };
                v.segment_at(place, &self.verdicts[id])?;
            }
            v.disk_done(d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SEG: u32 = 4 << 20;

    fn id(b: u8) -> ObjectId {
        ObjectId([b; 32])
    }

    /// A generation with two disks (maps `maps`), each 3 segments long.
    fn manifest(maps: [u8; 2]) -> Manifest {
        let disk = |slot: &str, map: u8| {
            serde_json::json!({"slot": slot, "descriptor": null, "create_type": "raw",
                "virtual_size": 3 * SEG as u64, "disk_map": format!("{map:02x}").repeat(32),
                "extents": [{"kind": "FLAT", "start": 0, "len": 3 * SEG as u64, "file": slot,
                    "file_offset": 0, "file_size": 3 * SEG as u64, "head": "ee".repeat(32),
                    "tail": null}]})
        };
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "catalog": {"vm": "v", "time": "t", "uuid": null, "display_name": null,
                "source_kind": "image", "source": "/s", "started": "t", "finished": "t",
                "vmrepo_version": "0", "stats": {"virtual_bytes": 0, "bytes_read": 0, "bytes_data": 0,
                "bytes_new": 0, "bytes_stored": 0, "chunks_total": 0, "chunks_new": 0,
                "segments_reused": 0, "segments_total": 0}},
            "files": [{"name": "v.vmx", "object": "ff".repeat(32), "size": 1}],
            "disks": [disk("a", maps[0]), disk("b", maps[1])],
        }))
        .unwrap()
    }

    /// Records what the walk shows it; maps come from `maps`, segment 0x66 is "bad".
    #[derive(Default)]
    struct Recorder {
        maps: HashMap<ObjectId, DiskMap>,
        evaluated: AtomicUsize,
        references: Vec<ObjectId>,
        places: Vec<(String, u64, ObjectId, bool)>,
        done: Vec<String>,
    }

    impl Visitor for Recorder {
        type Segment = bool;
        fn reference(&mut self, r: Reference<'_>) -> Result<()> {
            self.references.push(match r {
                Reference::File(f) => f.object,
                Reference::ExtentEdge { id, .. } => id,
            });
            Ok(())
        }
        fn disk_map(&mut self, disk: &DiskEntry) -> Result<Option<DiskMap>> {
            Ok(self.maps.get(&disk.disk_map).cloned())
        }
        fn segment(&self, segment: &ObjectId, len: u64) -> bool {
            assert_eq!(len, SEG as u64);
            self.evaluated.fetch_add(1, Ordering::SeqCst);
            *segment != id(0x66)
        }
        fn segment_at(&mut self, p: SegmentPlace<'_>, good: &bool) -> Result<()> {
            assert_eq!(p.range.start, p.index * SEG as u64);
            self.places
                .push((p.disk.slot.clone(), p.index, p.id, *good));
            Ok(())
        }
        fn disk_done(&mut self, disk: &DiskEntry) -> Result<()> {
            self.done.push(disk.slot.clone());
            Ok(())
        }
    }

    fn recorder() -> Recorder {
        let size = 3 * SEG as u64;
        let mut r = Recorder::default();
        // Map 1: segments 0 and 2 (a shared one and a bad one); map 2 shares segment 0x55.
        r.maps.insert(
            id(1),
            DiskMap::new(size, SEG, [(0, id(0x55)), (2, id(0x66))]),
        );
        r.maps.insert(
            id(2),
            DiskMap::new(size, SEG, [(1, id(0x55)), (2, id(0x77))]),
        );
        r
    }

    #[test]
    fn every_segment_is_evaluated_once_and_shown_at_each_place() {
        let mut v = recorder();
        let mut walk = Walk::every_place();
        walk.manifest(&mut v, &manifest([1, 2])).unwrap();
        walk.manifest_parallel(&mut v, &manifest([1, 2])).unwrap();
        // Three distinct segments, evaluated once over both walks of both generations.
        assert_eq!(v.evaluated.load(Ordering::SeqCst), 3);
        assert_eq!(v.places.len(), 8);
        assert_eq!(
            v.places[..4],
            [
                ("a".into(), 0, id(0x55), true),
                ("a".into(), 2, id(0x66), false),
                ("b".into(), 1, id(0x55), true),
                ("b".into(), 2, id(0x77), true),
            ]
        );
        assert_eq!(v.references, [id(0xff), id(0xee), id(0xee)].repeat(2));
        assert_eq!(v.done, ["a", "b", "a", "b"]);
        let verdicts = walk.into_verdicts();
        assert_eq!(verdicts.len(), 3);
        assert!(!verdicts[&id(0x66)]);
    }

    #[test]
    fn each_map_once_skips_a_map_walked_before_but_not_one_that_failed() {
        let mut v = recorder();
        let mut walk = Walk::each_map_once();
        // Both disks of the first generation use map 1; the second generation adds map 9,
        // which the visitor cannot load.
        walk.manifest(&mut v, &manifest([1, 1])).unwrap();
        walk.manifest(&mut v, &manifest([1, 9])).unwrap();
        assert_eq!(v.places.len(), 2);
        assert_eq!(v.evaluated.load(Ordering::SeqCst), 2);
        assert_eq!(v.done, ["a", "b"]);
        // A map that could not be loaded is not taken as walked: the next disk naming it asks
        // the visitor again.
        walk.manifest(&mut v, &manifest([9, 9])).unwrap();
        assert_eq!(v.done, ["a", "b", "a", "b"]);
    }
}
