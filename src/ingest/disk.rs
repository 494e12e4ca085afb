//! One disk's ingest: its segments in parallel (taken from the base, patched, or read and
//! cut), extent edges, and the read-ahead that keeps the source busy.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::plan::Reuse;
use super::segment::{
    ingest_segment, patch_segment, sampled, verify_unchanged, SegmentContext, SegmentWorkers,
};
#[cfg(test)]
use super::Counters;
use crate::error::{Error, Result};
use crate::repo::config::ChunkerParams;
use crate::repo::disk_map::segment_range;
use crate::repo::id::ObjectId;
use crate::repo::index::CacheRow;
use crate::repo::manifest::{DiskEntry, DiskMap, ExtentFile};
use crate::repo::object::{ObjectKind, MAX_OBJECT_LEN};
use crate::repo::store::Store;
use crate::source::DiskReader;
use crate::vmware::vm::DiskPlan;

/// Ingests disk `d`: every segment worth a visit, in parallel; the others are all zero, or
/// (with `reuse`) taken from the base generation, `verify_share` of them re-read to check.
/// `previous` is the disk's map in the VM's latest generation when there is no `reuse` (new
/// segments are stored against the segments it lists). Returns the disk's entry, its disk
/// map, and the segment-cache rows to add.
pub(super) fn ingest_disk(
    cx: &SegmentContext<'_, '_>,
    d: &DiskPlan,
    reuse: Option<&Reuse>,
    previous: Option<&DiskMap>,
    verify_share: f64,
    workers: &SegmentWorkers,
) -> Result<(DiskEntry, DiskMap, Vec<CacheRow>)> {
    let SegmentContext {
        store,
        params,
        counters,
        ..
    } = cx;
    let size = d.reader.size();
    let seg = params.segment_size as u64;
    let nseg = size.div_ceil(seg);
    // How the errors below name the disk: the file the VM knows it by.
    let disk_file = || -> std::path::PathBuf {
        d.layout
            .as_ref()
            .map(|l| l.file.clone())
            .or_else(|| d.descriptor.clone())
            .unwrap_or_else(|| d.slot.clone())
            .into()
    };
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
    let seed = u64::from_le_bytes(seed) | 1;
    // Segments finished, and whether the workers are done (the prefetcher then stops).
    let done = AtomicU64::new(0);
    let finished = std::sync::atomic::AtomicBool::new(false);
    // One segment: taken unread, patched, or read.
    let previous = reuse.map(|r| &r.segments).or(previous);
    let segment = |i: u64| -> Result<(ObjectId, Option<CacheRow>)> {
        let range = segment_range(i, seg, size);
        let before = previous.map_or(ObjectId::ZERO, |m| m.get(i));
        if let Some(r) = reuse.filter(|r| !r.is_touched(i)) {
            let prev = r.segments.get(i);
            counters.segments_skipped.fetch_add(1, Ordering::Relaxed);
            if sampled(seed, i, verify_share) {
                verify_unchanged(cx, d, range, prev)?;
            }
            return Ok((prev, None));
        }
        if let Some(r) = reuse.filter(|r| r.patchable.contains(&i)) {
            let prev = r.segments.get(i);
            let changed = r.changed_in(&range);
            let preloaded = r.preloaded.get(&i);
            let patched = patch_segment(cx, d, &range, prev, preloaded, changed)?;
            if let Some(p) = patched {
                done.fetch_add(1, Ordering::Relaxed);
                return Ok(p);
            }
        }
        // A touched segment that was all zero before holds data only where it changed since:
        // only that is read.
        if let Some(r) = reuse.filter(|r| r.is_touched(i) && r.segments.get(i) == ObjectId::ZERO) {
            let within = crate::source::Within::new(d.reader.as_ref(), r.changed_in(&range));
            let built = ingest_segment(cx, &within, range, ObjectId::ZERO);
            counters.segments_patched.fetch_add(1, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Relaxed);
            return built;
        }
        let r = ingest_segment(cx, d.reader.as_ref(), range, before);
        done.fetch_add(1, Ordering::Relaxed);
        r
    };
    // Segments are handed out in disk order, one at a time, to whichever worker is free
    // (`par_bridge`): reads then move through the disk as one front, in the order the
    // prefetcher hints them, instead of one stream per worker at distant offsets.
    // Only the segments worth a visit (see `visits`) are handed out; every other one is all
    // zero, so time and memory follow the disk's data, not its virtual size.
    let work = || {
        let mut results = visits(d.reader.as_ref(), reuse, size, seg, seed, verify_share)
            .par_bridge()
            .map(|i| i.and_then(|i| segment(i).map(|r| (i, r))))
            .collect::<Result<Vec<_>>>()?;
        results.sort_unstable_by_key(|(i, _)| *i);
        Ok::<_, Error>(results)
    };
    let results = std::thread::scope(|scope| {
        if let Some(r) = reuse {
            scope.spawn(|| prefetch_touched(d.reader.as_ref(), r, params, size, &done, &finished));
        }
        let results = match workers.pool() {
            Some(pool) => pool.install(work),
            None => work(),
        };
        finished.store(true, Ordering::Relaxed);
        results
    })?;
    // Segments not visited: all zero (a full ingest), or unchanged and zero before.
    let unvisited = nseg - results.len() as u64;
    match reuse {
        None => counters
            .segments_zero
            .fetch_add(unvisited, Ordering::Relaxed),
        Some(_) => counters
            .segments_skipped
            .fetch_add(unvisited, Ordering::Relaxed),
    };
    let mut entries = Vec::with_capacity(results.len());
    let mut rows = Vec::new();
    for (i, (id, row)) in results {
        entries.push((i, id));
        rows.extend(row);
    }
    let map = DiskMap::new(size, params.segment_size, entries);
    // No object may exceed MAX_OBJECT_LEN (readers refuse larger records).
    if map.encoded_len() > MAX_OBJECT_LEN as u64 {
        return Err(Error::Unsupported {
            what: format!(
                "disk {}: {} of its {} MiB segments hold data, and their list (the disk map, \
                 {} MiB) would exceed the largest object, {} MiB; a disk can hold up to about \
                 {} TiB of data",
                d.slot,
                map.nonzero().len(),
                seg >> 20,
                map.encoded_len() >> 20,
                MAX_OBJECT_LEN >> 20,
                ((MAX_OBJECT_LEN as u64 - 24) / 32 * seg) >> 40
            ),
            path: disk_file(),
        });
    }
    let disk_map = store.put_blob(ObjectKind::DiskMap, &map.encode())?;
    let mut extents = Vec::new();
    for e in &d.extents {
        let (head, tail) = match &e.path {
            Some(p) => {
                store_extent_edges(store, p, e.file_offset, e.file_offset + e.len, e.file_size)?
            }
            None => (None, None),
        };
        extents.push(ExtentFile {
            kind: e.kind.clone(),
            start: e.start,
            len: e.len,
            file: e.name.clone(),
            file_offset: e.file_offset,
            file_size: e.file_size,
            head,
            tail,
        });
    }
    Ok((
        DiskEntry {
            slot: d.slot.clone(),
            descriptor: d.descriptor.clone(),
            create_type: d.create_type.clone(),
            virtual_size: size,
            disk_map,
            extents,
            layout: d.layout.clone(),
        },
        map,
        rows,
    ))
}

/// Stores the bytes of an extent file that lie outside the extent (before its offset, after its
/// end) so that restore gives back the file byte for byte.
pub(super) fn store_extent_edges(
    store: &Store<'_>,
    path: &std::path::Path,
    data_start: u64,
    data_end: u64,
    file_size: u64,
) -> Result<(Option<ObjectId>, Option<ObjectId>)> {
    let read = |r: Range<u64>| -> Result<Option<ObjectId>> {
        if r.is_empty() {
            return Ok(None);
        }
        if r.end - r.start > MAX_OBJECT_LEN as u64 {
            return Err(Error::Unsupported {
                what: format!("{} bytes outside the extent's data", r.end - r.start),
                path: path.to_path_buf(),
            });
        }
        let f = crate::source::FlatFile::open(path)?;
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        f.read_exact_at(&mut buf, r.start)?;
        Ok(Some(store.put_blob(ObjectKind::File, &buf)?))
    };
    Ok((read(0..data_start)?, read(data_end..file_size)?))
}

/// Segments planned together by [`visits`]: one call of `allocated` covers this many.
pub(super) const VISIT_WINDOW: u64 = 4096;

/// The segments of a disk an ingest must visit, in disk order: where the source may hold data
/// (a full ingest), or, for a change-aware one, the segments the changes touch, those that held
/// data in the base generation (taken unread) and the sample `--verify-unchanged` re-reads
/// among those the source may hold data in. Every other segment is all zero. Planned one window
/// of [`VISIT_WINDOW`] segments at a time, so memory stays small on a huge thin disk.
pub(super) fn visits<'a>(
    reader: &'a dyn DiskReader,
    reuse: Option<&'a Reuse>,
    size: u64,
    seg: u64,
    seed: u64,
    verify_share: f64,
) -> impl Iterator<Item = Result<u64>> + Send + 'a {
    let nseg = size.div_ceil(seg);
    (0..nseg.div_ceil(VISIT_WINDOW)).flat_map(move |w| {
        let (from, to) = (w * VISIT_WINDOW, ((w + 1) * VISIT_WINDOW).min(nseg));
        let window = || -> Result<Vec<u64>> {
            let mut v = Vec::new();
            if reuse.is_none() || verify_share > 0.0 {
                for a in reader.allocated(from * seg..(to * seg).min(size))? {
                    if a.start < a.end {
                        v.extend(a.start / seg..=(a.end - 1) / seg);
                    }
                }
            }
            if let Some(r) = reuse {
                v.retain(|&i| sampled(seed, i, verify_share));
                let first = r.touched.partition_point(|t| t.end <= from);
                let touched = r.touched[first..].iter().take_while(|t| t.start < to);
                v.extend(touched.flat_map(|t| t.start.max(from)..t.end.min(to)));
                v.extend(r.segments.nonzero_in(from, to));
            }
            v.sort_unstable();
            v.dedup();
            Ok(v)
        };
        match window() {
            Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        }
    })
}

/// How far (in segments) the prefetcher of a change-aware ingest runs ahead of the workers.
pub(super) const PREFETCH_AHEAD: u64 = 64;

/// A change-aware ingest reads scattered pieces; hinting them to the kernel ahead of the workers
/// (in order, at most [`PREFETCH_AHEAD`] segments ahead of those finished) lets the disk work on
/// several at once while the workers hash and compress. A segment to be patched is hinted as the
/// context around its changes, any other touched segment whole.
pub(super) fn prefetch_touched(
    reader: &dyn DiskReader,
    reuse: &Reuse,
    params: &ChunkerParams,
    size: u64,
    done: &AtomicU64,
    finished: &std::sync::atomic::AtomicBool,
) {
    let seg = params.segment_size as u64;
    for (issued, i) in reuse.touched().enumerate() {
        while issued as u64 >= done.load(Ordering::Relaxed) + PREFETCH_AHEAD {
            if finished.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if finished.load(Ordering::Relaxed) {
            return;
        }
        let range = segment_range(i, seg, size);
        for r in reuse.planned_reads(i, range, params) {
            reader.prefetch(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose reads wait on a parallel loop in the same pool, as the compressed readers
    /// do: while waiting, the worker may run another segment. Segment `i` holds the byte `i + 1`.
    struct Nesting {
        size: u64,
    }

    impl DiskReader for Nesting {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            (0..8u64)
                .into_par_iter()
                .for_each(|_| std::thread::sleep(std::time::Duration::from_millis(2)));
            buf.fill((offset / (4 << 20)) as u8 + 1);
            Ok(())
        }
        fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
            Ok(vec![range])
        }
    }

    #[test]
    fn a_worker_running_another_segment_while_it_reads_keeps_the_buffers_apart() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("repo");
        let params = ChunkerParams::default();
        crate::Repository::init(&path, params, 1, None).unwrap();
        let repo = crate::Repository::open(&path, crate::repo::lock::LockMode::Shared).unwrap();
        let store = Store::new(&repo).unwrap();
        let nseg = 32u64;
        let d = DiskPlan {
            slot: "image".into(),
            descriptor: None,
            create_type: "raw".into(),
            reader: Box::new(Nesting {
                size: nseg * params.segment_size as u64,
            }),
            extents: Vec::new(),
            layout: None,
        };
        let counters = Counters::default();
        let progress = crate::progress::NoProgress;
        let cx = SegmentContext::new(&store, &counters, &progress);
        let (entry, map, _) = ingest_disk(&cx, &d, None, None, 0.0, &SegmentWorkers::default())
            .expect("no worker may trip over another's segment buffer");
        assert_eq!(map.count(), nseg);
        store.flush().unwrap();
        let map = repo.load_disk_map(&entry.disk_map).unwrap();
        // Every segment kept its own bytes: 32 different contents, 32 different segments.
        let distinct: std::collections::HashSet<_> = map.nonzero().map(|(_, s)| s).collect();
        assert_eq!(distinct.len(), nseg as usize);
    }
}
