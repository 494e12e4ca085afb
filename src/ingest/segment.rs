//! One segment's ingest: read its allocated bytes (holes skipped), cut it into chunks and
//! store the new ones, or patch its previous version around the changes; the worker pool and
//! the per-thread segment buffer.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blake3::hazmat::ChainingValue;

use super::Counters;
use crate::error::{Error, Result};
use crate::ingest::chunker::{self, Run};
use crate::progress::Progress;
use crate::repo::config::ChunkerParams;
use crate::repo::id::ObjectId;
use crate::repo::index::CacheRow;
use crate::repo::leaves;
use crate::repo::manifest::Segment;
use crate::repo::object::ObjectKind;
use crate::repo::store::Store;
use crate::repo::LoadedSegment;
use crate::source::DiskReader;
use crate::vmware::vm::DiskPlan;

/// What every segment of one ingest shares: where new data goes, how disks are cut, the
/// fingerprint key, and where counts and progress go.
pub(super) struct SegmentContext<'a, 's> {
    pub(super) store: &'a Store<'s>,
    pub(super) params: ChunkerParams,
    /// The keyed-hash key of segment fingerprints (see [`chunker::fingerprint_key`]).
    pub(super) key: [u8; 32],
    pub(super) counters: &'a Counters,
    pub(super) progress: &'a dyn Progress,
    /// New segments may be stored as deltas ([`crate::ingest::delta`]).
    pub(super) deltas: bool,
    /// New chunks may be stored as deltas of the chunks they replace.
    pub(super) chunk_deltas: bool,
}

impl<'a, 's> SegmentContext<'a, 's> {
    pub(super) fn new(
        store: &'a Store<'s>,
        counters: &'a Counters,
        progress: &'a dyn Progress,
    ) -> SegmentContext<'a, 's> {
        let params = store.repo().config().chunker;
        SegmentContext {
            store,
            params,
            key: chunker::fingerprint_key(&params, store.repo().keys()),
            counters,
            progress,
            deltas: crate::ingest::delta::enabled(store.repo()),
            chunk_deltas: crate::ingest::delta::chunks_enabled(store.repo()),
        }
    }
}

/// The threads that read and cut segments: twice as many as cores (at least 4), so that while
/// some wait for the disk (a cold datastore, an NFS mount) the others hash and compress, and the
/// disk sees several requests at once; exactly `threads` when given (`vmrepo --threads N`).
/// Each holds one segment buffer. Clones share one pool, started on first use: the ingests of
/// one job share it, so running VMs in parallel does not multiply the threads.
#[derive(Clone, Default)]
pub struct SegmentWorkers {
    threads: Option<usize>,
    pool: Arc<std::sync::OnceLock<Option<rayon::ThreadPool>>>,
    /// `--limit-read`: the most the process reads from the VMs' disks, all together.
    read_limit: Option<Arc<crate::throttle::Throttle>>,
}

impl SegmentWorkers {
    /// Workers of `threads` threads, or the default number when `None`.
    pub fn new(threads: Option<usize>) -> SegmentWorkers {
        SegmentWorkers {
            threads,
            pool: Arc::default(),
            read_limit: None,
        }
    }

    /// The same workers reading the VMs' disks at most `bytes_per_second`, all together.
    pub fn with_read_limit(mut self, bytes_per_second: Option<f64>) -> SegmentWorkers {
        self.read_limit = bytes_per_second.map(|r| Arc::new(crate::throttle::Throttle::new(r)));
        self
    }

    /// The read limit, if any.
    pub(super) fn read_limit(&self) -> Option<&Arc<crate::throttle::Throttle>> {
        self.read_limit.as_ref()
    }

    /// The pool; `None` (the caller's pool is used) when its threads cannot be started.
    pub(super) fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool
            .get_or_init(|| {
                let threads = self
                    .threads
                    .unwrap_or_else(|| (2 * rayon::current_num_threads()).max(4));
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("vmrepo-segment-{i}"))
                    .build()
                    .ok()
            })
            .as_ref()
    }
}

impl std::fmt::Debug for SegmentWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentWorkers")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

thread_local! {
    static SEGMENT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether segment `i` is in the random sample of the given share (a hash of a per-ingest seed
/// and the index, so the choice is spread evenly and differs between runs).
pub(super) fn sampled(seed: u64, i: u64, share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x as f64 / u64::MAX as f64) < share
}

/// Reads the allocated parts of `range` into `buf` (widened to zero blocks, gaps zeroed); returns
/// which zero blocks are holes and how many bytes were read.
pub(super) fn fill_segment(
    buf: &mut [u8],
    reader: &dyn DiskReader,
    range: &Range<u64>,
    alloc: &[Range<u64>],
    zb: usize,
) -> Result<(Vec<bool>, u64)> {
    let len = buf.len();
    let mut hole = vec![true; len.div_ceil(zb)];
    let mut filled = 0usize;
    let mut read = 0u64;
    for r in alloc {
        let s = ((r.start - range.start) as usize / zb * zb).max(filled);
        let e = ((r.end - range.start) as usize)
            .div_ceil(zb)
            .saturating_mul(zb)
            .min(len);
        if s >= e {
            continue;
        }
        buf[filled..s].fill(0);
        reader.read_at(&mut buf[s..e], range.start + s as u64)?;
        hole[s / zb..e.div_ceil(zb)].fill(false);
        read += (e - s) as u64;
        filled = e;
    }
    buf[filled..].fill(0);
    Ok((hole, read))
}

/// `--verify-unchanged`: re-reads a segment the changes say is unchanged and checks it is the
/// segment `prev` of the base generation (same fingerprint, or still all zero).
pub(super) fn verify_unchanged(
    cx: &SegmentContext<'_, '_>,
    d: &DiskPlan,
    range: Range<u64>,
    prev: ObjectId,
) -> Result<()> {
    let SegmentContext {
        store,
        params,
        key,
        counters,
        ..
    } = cx;
    let alloc = d.reader.allocated(range.clone())?;
    let len = (range.end - range.start) as usize;
    let mut buf = vec![0u8; len];
    let (hole, read) = fill_segment(
        &mut buf,
        d.reader.as_ref(),
        &range,
        &alloc,
        params.zero_block as usize,
    )?;
    counters.bytes_read.fetch_add(read, Ordering::Relaxed);
    let runs = chunker::runs(&buf, params, |i| hole[i]);
    let now_zero = matches!(runs.as_slice(), [Run::Zero(_)]);
    let same = if prev.is_zero() {
        now_zero
    } else {
        !now_zero
            && crate::repo::decode_stored_segment(&prev, &store.repo().read_object(&prev)?)?
                .fingerprint()
                == chunker::fingerprint(key, &buf, &runs)
    };
    counters.segments_verified.fetch_add(1, Ordering::Relaxed);
    if !same {
        return Err(Error::ChangedOutsideRanges {
            disk: d.slot.clone(),
            start: range.start,
            end: range.end,
        });
    }
    Ok(())
}

/// Reads, cuts and stores the segment of `reader` at `range`, where the disk held segment
/// `prev` before (the all-zero id when none is known).
pub(super) fn ingest_segment(
    cx: &SegmentContext<'_, '_>,
    reader: &dyn DiskReader,
    range: Range<u64>,
    prev: ObjectId,
) -> Result<(ObjectId, Option<CacheRow>)> {
    let SegmentContext {
        store,
        params,
        key,
        counters,
        progress,
        ..
    } = cx;
    let alloc = reader.allocated(range.clone())?;
    if alloc.is_empty() {
        counters.segments_zero.fetch_add(1, Ordering::Relaxed);
        return Ok((ObjectId::ZERO, None));
    }
    let len = (range.end - range.start) as usize;
    let zb = params.zero_block as usize;
    // The buffer is taken out of the thread-local, not borrowed from it: reading a compressed
    // source decompresses in the same rayon pool, and while this worker waits for that it may
    // run another segment, which then finds no buffer and makes its own.
    let mut owned = SEGMENT_BUF.with(|cell| cell.take());
    owned.resize(len, 0);
    let buf = &mut owned[..len];
    let result = (|| {
        // Read the allocated ranges, widened to zero blocks; zero-fill the gaps, which are holes.
        let (hole, read) = fill_segment(buf, reader, &range, &alloc, zb)?;
        counters.bytes_read.fetch_add(read, Ordering::Relaxed);
        progress.advance(read);

        let runs = chunker::runs(buf, params, |i| hole[i]);
        if let [Run::Zero(_)] = runs.as_slice() {
            counters.segments_zero.fetch_add(1, Ordering::Relaxed);
            return Ok((ObjectId::ZERO, None));
        }
        let data_bytes: u64 = runs
            .iter()
            .map(|r| match r {
                Run::Data(d) => (d.end - d.start) as u64,
                Run::Zero(_) => 0,
            })
            .sum();
        counters.bytes_data.fetch_add(data_bytes, Ordering::Relaxed);
        // A one-run segment's fingerprint is hashed leaf by leaf, and the leaves are kept so a
        // later change-aware ingest can patch it (same value as hashing it whole).
        let cvs = match runs.as_slice() {
            [Run::Data(d)] if d.start == 0 && d.end == len => leaves::all(key, buf),
            _ => None,
        };
        let fp = match &cvs {
            Some(c) => leaves::root(key, len, c).expect("leaves of this segment's length"),
            None => chunker::fingerprint(key, buf, &runs),
        };
        let cached = store.repo().with_index(|i| {
            Ok(match i.cached_segment(&fp)? {
                Some(seg) => Some((seg, cvs.is_none() || i.has_segment_leaves(&seg)?)),
                None => None,
            })
        })?;
        if let Some((seg, has_leaves)) = cached {
            counters.segments_reused.fetch_add(1, Ordering::Relaxed);
            // Chunk count of a reused segment is not known without loading it; count data bytes only.
            // A segment stored before leaves were kept gets them now.
            let row = (!has_leaves).then(|| CacheRow {
                fingerprint: fp,
                segment: seg,
                leaves: cvs.as_deref().map(leaves::encode),
            });
            return Ok((seg, row));
        }
        let (extents, cuts) = chunker::cut(buf, &runs, params, store.repo().keys());
        let segment = Segment {
            fingerprint: fp,
            extents,
        };
        let id = store_segment(cx, buf, &cuts, &segment, &prev, None)?;
        Ok((
            id,
            Some(CacheRow {
                fingerprint: fp,
                segment: id,
                leaves: cvs.as_deref().map(leaves::encode),
            }),
        ))
    })();
    SEGMENT_BUF.with(|cell| cell.replace(owned));
    result
}

/// A touched segment built from its previous version `prev` (with its leaves: `preloaded`, or
/// loaded now) and the bytes around its `changed` ranges (disk offsets) alone
/// ([`crate::ingest::patch`]); `None` when it must be read whole.
pub(super) fn patch_segment(
    cx: &SegmentContext<'_, '_>,
    d: &DiskPlan,
    range: &Range<u64>,
    prev: ObjectId,
    preloaded: Option<&(LoadedSegment, Vec<ChainingValue>)>,
    changed: &[Range<u64>],
) -> Result<Option<(ObjectId, Option<CacheRow>)>> {
    let SegmentContext {
        store,
        params,
        key,
        counters,
        progress,
        ..
    } = cx;
    let loaded;
    let (prev_segment, prev_leaves) = match preloaded {
        Some((segment, leaves)) => (segment, leaves),
        None => {
            let Some(leaves) = store.repo().with_index(|i| i.segment_leaves(&prev))? else {
                return Ok(None);
            };
            // One that cannot be read is read whole instead (see plan_reuse).
            let Ok(segment) = store.repo().load_segment_and_base(&prev) else {
                return Ok(None);
            };
            loaded = (segment, leaves);
            (&loaded.0, &loaded.1)
        }
    };
    let len = (range.end - range.start) as usize;
    let changed: Vec<Range<usize>> = changed
        .iter()
        .map(|c| {
            (c.start.max(range.start) - range.start) as usize
                ..(c.end.min(range.end) - range.start) as usize
        })
        .collect();
    // Taken out of the thread-local for the same reason as in ingest_segment.
    let mut owned = SEGMENT_BUF.with(|cell| cell.take());
    owned.resize(len, 0);
    let result = (|| {
        let mut source = |dst: &mut [u8], at: usize| -> Result<()> {
            d.reader.read_at(dst, range.start + at as u64)?;
            counters
                .bytes_read
                .fetch_add(dst.len() as u64, Ordering::Relaxed);
            progress.advance(dst.len() as u64);
            Ok(())
        };
        let previous = crate::ingest::patch::Previous {
            segment: &prev_segment.segment,
            leaves: prev_leaves,
        };
        let buf = &mut owned[..len];
        let keys = store.repo().keys();
        let Some(p) =
            crate::ingest::patch::patch(buf, previous, &changed, params, keys, key, &mut source)?
        else {
            return Ok(None);
        };
        counters.segments_patched.fetch_add(1, Ordering::Relaxed);
        counters.bytes_data.fetch_add(len as u64, Ordering::Relaxed);
        let fp = p.segment.fingerprint;
        let row = CacheRow {
            fingerprint: fp,
            segment: ObjectId::ZERO,
            leaves: Some(leaves::encode(&p.leaves)),
        };
        if let Some(seg) = store.repo().with_index(|i| i.cached_segment(&fp))? {
            counters.segments_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(Some((
                seg,
                Some(CacheRow {
                    segment: seg,
                    ..row
                }),
            )));
        }
        let id = store_segment(cx, buf, &p.cuts, &p.segment, &prev, Some(prev_segment))?;
        Ok(Some((id, Some(CacheRow { segment: id, ..row }))))
    })();
    SEGMENT_BUF.with(|cell| cell.replace(owned));
    result
}

/// Stores a new segment: the chunks `cuts` cut from `buf` that the repository lacks (each as a
/// delta of the chunk it replaces, when that is worth it), then the segment object (as a delta
/// of `prev`'s whole form, when that is worth it); counts them. `loaded` is `prev` when the
/// caller has it loaded; otherwise it is read now, if deltas need it. Returns the segment's id.
fn store_segment(
    cx: &SegmentContext<'_, '_>,
    buf: &[u8],
    cuts: &[chunker::Cut],
    segment: &Segment,
    prev: &ObjectId,
    loaded: Option<&LoadedSegment>,
) -> Result<ObjectId> {
    let counters = cx.counters;
    counters
        .chunks_total
        .fetch_add(cuts.len() as u64, Ordering::Relaxed);
    let read_now;
    let loaded = match loaded {
        Some(l) => Some(l),
        // Best effort: a previous segment that cannot be read costs tonight's deltas only.
        None if (cx.deltas || cx.chunk_deltas) && !prev.is_zero() => {
            read_now = cx.store.repo().load_segment_and_base(prev).ok();
            read_now.as_ref()
        }
        None => None,
    };
    let chunks: Vec<(ObjectId, &[u8])> =
        cuts.iter().map(|c| (c.id, &buf[c.range.clone()])).collect();
    let new = match loaded {
        Some(l) if cx.chunk_deltas => cx.store.put_chunks(
            &chunks,
            &crate::ingest::delta::replaced_chunks(&l.segment, cuts),
        )?,
        _ => cx.store.put_all(ObjectKind::Chunk, &chunks)?,
    };
    for (c, new) in cuts.iter().zip(new) {
        if new {
            counters.chunks_new.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_new
                .fetch_add(c.range.len() as u64, Ordering::Relaxed);
        }
    }
    let whole = loaded.map(|l| l.whole(prev));
    let bytes = crate::ingest::delta::encode(cx.store.repo(), cx.deltas, prev, whole, segment);
    cx.store.put_blob(ObjectKind::Segment, &bytes)
}

#[cfg(test)]
mod tests {
    use super::SegmentWorkers;

    #[test]
    fn workers_have_the_threads_asked_for_and_clones_share_them() {
        let one = SegmentWorkers::new(Some(1));
        assert_eq!(one.pool().unwrap().current_num_threads(), 1);
        let default = SegmentWorkers::default();
        assert!(default.pool().unwrap().current_num_threads() >= 4);
        let clone = default.clone();
        assert!(std::ptr::eq(default.pool().unwrap(), clone.pool().unwrap()));
    }
}
