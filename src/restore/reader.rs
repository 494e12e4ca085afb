//! Random access to a stored generation without restoring it: the guest bytes of a disk
//! ([`DiskImage`]) and the files of a generation as `extract` would write them ([`FileSource`]),
//! read through a bounded cache of decompressed chunks ([`ReadCache`]).
//!
//! A read fetches only the chunks it touches (records that sit back to back in a pack are read
//! with one `pread`): those it uses whole are decoded straight into its buffer, those it cuts
//! are kept in the cache for the reads next to it; all-zero segments and zero runs are filled
//! without any I/O. Every chunk is verified against its BLAKE3 id before a byte of it is
//! returned, so damage is an error ([`Error::Corrupt`]), never silently wrong or zero data.
//! This is the one read path: the FUSE mount (`mount.rs`) and the NBD server (`nbd.rs`) serve
//! it, and extract writes what it reads (`extract/disk.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::{Deref, Range};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::repo::id::ObjectId;
use crate::repo::manifest::{DiskEntry, DiskMap, Extent, ExtentFile, Segment};
use crate::repo::Repository;

/// Default memory for decompressed chunks and decoded segments, shared by all open files.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A least-recently-used map from object id to a value, bounded by the values' total weight.
struct Lru<V> {
    capacity: usize,
    inner: Mutex<LruInner<V>>,
}

struct LruInner<V> {
    map: HashMap<ObjectId, (V, usize, u64)>,
    order: BTreeMap<u64, ObjectId>,
    weight: usize,
    tick: u64,
}

impl<V: Clone> Lru<V> {
    fn new(capacity: usize) -> Lru<V> {
        Lru {
            capacity,
            inner: Mutex::new(LruInner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                weight: 0,
                tick: 0,
            }),
        }
    }

    fn get(&self, id: &ObjectId) -> Option<V> {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        let (v, _, t) = inner.map.get_mut(id)?;
        inner.order.remove(t);
        *t = tick;
        inner.order.insert(tick, *id);
        Some(v.clone())
    }

    fn insert(&self, id: ObjectId, v: V, weight: usize) {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, w, t)) = inner.map.insert(id, (v, weight, tick)) {
            inner.order.remove(&t);
            inner.weight -= w;
        }
        inner.order.insert(tick, id);
        inner.weight += weight;
        // Keep the newest entry even if it alone exceeds the capacity.
        while inner.weight > self.capacity && inner.order.len() > 1 {
            let (_, old) = inner.order.pop_first().expect("not empty");
            if let Some((_, w, _)) = inner.map.remove(&old) {
                inner.weight -= w;
            }
        }
    }

    fn weight(&self) -> usize {
        self.inner.lock().unwrap().weight
    }
}

/// A decoded segment with the guest offset (relative to the segment) of each extent.
struct SegmentView {
    extents: Vec<Extent>,
    starts: Vec<u64>,
}

impl SegmentView {
    fn new(seg: Segment) -> SegmentView {
        let mut starts = Vec::with_capacity(seg.extents.len());
        let mut pos = 0u64;
        for e in &seg.extents {
            starts.push(pos);
            pos += e.len() as u64;
        }
        SegmentView {
            extents: seg.extents,
            starts,
        }
    }

    fn weight(&self) -> usize {
        64 + self.extents.len() * (std::mem::size_of::<Extent>() + 8)
    }
}

/// The memory shared by readers: decompressed, verified objects and decoded segments, together
/// bounded by the capacity given to [`ReadCache::new`].
pub struct ReadCache {
    /// Decompressed objects; `None` when every byte is read once (extract), so keeping them
    /// would only cost time and memory.
    objects: Option<Lru<Arc<Vec<u8>>>>,
    segments: Lru<Arc<SegmentView>>,
}

impl ReadCache {
    /// A cache holding at most about `bytes` bytes (7/8 for data, 1/8 for segment lists).
    pub fn new(bytes: usize) -> ReadCache {
        ReadCache {
            objects: Some(Lru::new(bytes - bytes / 8)),
            segments: Lru::new(bytes / 8),
        }
    }

    /// For a reader that reads each byte once, in order (extract): decoded segments are kept
    /// (at most `segment_bytes`), objects are not.
    pub fn single_pass(segment_bytes: usize) -> ReadCache {
        ReadCache {
            objects: None,
            segments: Lru::new(segment_bytes),
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.objects.as_ref().map_or(0, |o| o.weight()) + self.segments.weight()
    }

    /// The plaintext of object `id` (a small file, a head or tail of an extent file).
    pub fn object(&self, repo: &Repository, id: &ObjectId) -> Result<Arc<Vec<u8>>> {
        let Some(objects) = &self.objects else {
            return Ok(Arc::new(repo.read_object(id)?));
        };
        if let Some(v) = objects.get(id) {
            return Ok(v);
        }
        let v = Arc::new(repo.read_object(id)?);
        objects.insert(*id, v.clone(), v.len());
        Ok(v)
    }

    fn segment(&self, repo: &Repository, id: &ObjectId) -> Result<Arc<SegmentView>> {
        if let Some(s) = self.segments.get(id) {
            return Ok(s);
        }
        let view = Arc::new(SegmentView::new(repo.load_segment(id)?));
        self.segments.insert(*id, view.clone(), view.weight());
        Ok(view)
    }

    /// Loads the segments `ids` not held yet with one batch of reads (best effort: a segment
    /// that cannot be read is left for the read that needs it, which reports why).
    fn load_segments(&self, repo: &Repository, ids: &[ObjectId]) {
        let mut missing: Vec<ObjectId> = ids
            .iter()
            .filter(|id| self.segments.get(id).is_none())
            .copied()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return;
        }
        let Ok(bytes) = repo.read_objects(&missing) else {
            return;
        };
        for (id, loaded) in missing.iter().zip(repo.decode_segments(&missing, bytes)) {
            if let Ok(loaded) = loaded {
                let view = Arc::new(SegmentView::new(loaded.segment));
                self.segments.insert(*id, view.clone(), view.weight());
            }
        }
    }

    /// Chunks `ids` (distinct) for one read into `buf`. Chunk `k` with `into[k]` set is wanted
    /// whole at `buf[into[k]]`: it is decoded there, `None` returned for it, unless the cache
    /// holds it (then `into[k]` is cleared and the cached copy returned). Every other chunk
    /// comes from the cache, or is fetched and kept there (a reader that keeps no chunks,
    /// extract, returns it without keeping it).
    fn fetch(
        &self,
        repo: &Repository,
        ids: &[ObjectId],
        into: &mut [Option<Range<usize>>],
        buf: &mut [u8],
    ) -> Result<Vec<Option<Arc<Vec<u8>>>>> {
        let Some(objects) = &self.objects else {
            return Ok(repo
                .read_objects_into(ids, into, buf)?
                .into_iter()
                .map(|c| c.map(Arc::new))
                .collect());
        };
        let mut out: Vec<Option<Arc<Vec<u8>>>> = ids.iter().map(|id| objects.get(id)).collect();
        let mut direct: Vec<InPlace> = Vec::new();
        let mut missing: Vec<ObjectId> = Vec::new();
        for ((id, cached), at) in ids.iter().zip(&out).zip(into.iter_mut()) {
            match (cached, at.clone()) {
                (Some(_), _) => *at = None,
                (None, Some(r)) => direct.push((*id, r)),
                (None, None) => missing.push(*id),
            }
        }
        // The two fetches touch different chunks: wanted whole here, or kept for the neighbours.
        let (decoded, fetched) = rayon::join(
            || decode_in_place(repo, direct, buf),
            || fetch_in_parallel(repo, &missing),
        );
        decoded?;
        let mut fetched = fetched?.into_iter();
        for ((slot, id), at) in out.iter_mut().zip(ids).zip(into.iter()) {
            if slot.is_none() && at.is_none() {
                let data = Arc::new(fetched.next().expect("one result per id"));
                objects.insert(*id, data.clone(), data.len());
                *slot = Some(data);
            }
        }
        Ok(out)
    }
}

/// Fewest chunks a cached read decodes on more than one thread: a large read (a 1 MiB FUSE
/// request, an NBD read) is one request at a time on its thread, so its chunks are split
/// between the cores; a small one is not worth the hand-off.
const PARALLEL_FETCH_CHUNKS: usize = 16;

/// Reads objects `ids` with [`Repository::read_objects`], split into one consecutive group
/// per thread of the pool when there are enough of them (in the order of `ids`).
fn fetch_in_parallel(repo: &Repository, ids: &[ObjectId]) -> Result<Vec<Vec<u8>>> {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads().max(1);
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    if ids.len() < PARALLEL_FETCH_CHUNKS || threads == 1 {
        return repo.read_objects(ids);
    }
    let groups: Vec<Vec<Vec<u8>>> = ids
        .par_chunks(ids.len().div_ceil(threads))
        .map(|group| repo.read_objects(group))
        .collect::<Result<_>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// A chunk to decode straight into a read's buffer, and where in it.
type InPlace = (ObjectId, Range<usize>);

/// Decodes each chunk of `jobs` straight into `buf[range]` (the ranges do not overlap), split
/// into one group of neighbouring chunks per thread of the pool when there are enough of them.
fn decode_in_place(repo: &Repository, mut jobs: Vec<InPlace>, buf: &mut [u8]) -> Result<()> {
    use rayon::prelude::*;
    if jobs.is_empty() {
        return Ok(());
    }
    jobs.sort_unstable_by_key(|j| j.1.start);
    let threads = rayon::current_num_threads().max(1);
    let per_group = if jobs.len() < PARALLEL_FETCH_CHUNKS {
        jobs.len()
    } else {
        jobs.len().div_ceil(threads)
    };
    // Each group gets the part of `buf` from the end of the group before it to the end of its
    // own last chunk, so the groups write to disjoint slices.
    let mut groups: Vec<(&[InPlace], &mut [u8], usize)> = Vec::new();
    let (mut rest, mut base) = (buf, 0usize);
    for group in jobs.chunks(per_group) {
        let end = group.last().expect("chunks are not empty").1.end;
        let (window, tail) = std::mem::take(&mut rest).split_at_mut(end - base);
        groups.push((group, window, base));
        (rest, base) = (tail, end);
    }
    groups
        .into_par_iter()
        .try_for_each(|(group, window, base)| {
            let ids: Vec<ObjectId> = group.iter().map(|j| j.0).collect();
            let into: Vec<Option<Range<usize>>> = group
                .iter()
                .map(|j| Some(j.1.start - base..j.1.end - base))
                .collect();
            repo.read_objects_into(&ids, &into, window).map(|_| ())
        })
}

/// The guest-visible bytes of one disk of a generation. `R` is how the repository is held:
/// shared (`Arc`, the default) by the mount's and the NBD server's threads, or borrowed
/// (`&Repository`) for the length of an extract.
pub struct DiskImage<R: Deref<Target = Repository> = Arc<Repository>> {
    repo: R,
    cache: Arc<ReadCache>,
    map: DiskMap,
    slot: String,
}

impl<R: Deref<Target = Repository>> DiskImage<R> {
    /// Opens `disk` (loads its disk map) for reading through `cache`.
    pub fn open(repo: R, disk: &DiskEntry, cache: Arc<ReadCache>) -> Result<Self> {
        let map = repo.load_disk_map(&disk.disk_map)?;
        if map.size != disk.virtual_size {
            return Err(Error::Corrupt(format!(
                "disk {} map says {} bytes, the manifest {}",
                disk.slot, map.size, disk.virtual_size
            )));
        }
        Ok(DiskImage {
            repo,
            cache,
            map,
            slot: disk.slot.clone(),
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.map.size
    }

    /// The controller slot of the disk.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// True when guest bytes `range` are stored as the same segments here and in `other` (a
    /// disk of another generation): then they are the same bytes, known without reading them.
    /// False when that cannot be told (different segment sizes, a range past either end).
    pub fn same_stored<R2: Deref<Target = Repository>>(
        &self,
        other: &DiskImage<R2>,
        range: Range<u64>,
    ) -> bool {
        let seg = self.map.segment_size as u64;
        if seg != other.map.segment_size as u64
            || range.end > self.size()
            || range.end > other.size()
        {
            return false;
        }
        let (first, last) = (range.start / seg, range.end.div_ceil(seg));
        self.map
            .nonzero_in(first, last)
            .eq(other.map.nonzero_in(first, last))
            && self
                .map
                .nonzero_in(first, last)
                .all(|i| self.map.get(i) == other.map.get(i))
    }

    /// The segments that are not all zero, in order.
    pub fn nonzero_segments(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.nonzero().map(|(i, _)| i)
    }

    /// The guest bytes segment `i` covers.
    pub fn segment_range(&self, i: u64) -> Range<u64> {
        let (s, e) = self.map.segment_range(i);
        s..e
    }

    /// The guest ranges of segment `i` that hold stored data: each maximal run of data
    /// extents, or with `per_chunk` each chunk on its own (to tell a damaged chunk from its
    /// neighbours). The rest of the segment is zero. Loads (and checks) the segment's list of
    /// extents, not its data.
    pub fn data_ranges(&self, i: u64, per_chunk: bool) -> Result<Vec<Range<u64>>> {
        let Some(seg) = self.segment_view(i)? else {
            return Ok(Vec::new());
        };
        let base = self.map.segment_range(i).0;
        let mut out: Vec<Range<u64>> = Vec::new();
        for (e, &at) in seg.extents.iter().zip(&seg.starts) {
            if let Extent::Data { len, .. } = e {
                let r = base + at..base + at + *len as u64;
                match out.last_mut() {
                    Some(last) if !per_chunk && last.end == r.start => last.end = r.end,
                    _ => out.push(r),
                }
            }
        }
        Ok(out)
    }

    /// Asks the storage to start fetching segments `segs` (their lists of extents, read now
    /// in one batch, then their chunks), so that reading them later waits on no round trip:
    /// what a restore from object storage does for the segments ahead of its readers.
    /// Advisory: what cannot be read is left for the read that needs it, which reports why.
    pub fn prefetch(&self, segs: &[u64]) {
        let ids: Vec<ObjectId> = segs
            .iter()
            .map(|&i| self.map.get(i))
            .filter(|id| !id.is_zero())
            .collect();
        self.cache.load_segments(&self.repo, &ids);
        let mut seen = HashSet::new();
        let mut chunks = Vec::new();
        for id in &ids {
            if let Some(view) = self.cache.segments.get(id) {
                for e in &view.extents {
                    if let Extent::Data { id, .. } = e {
                        if seen.insert(*id) {
                            chunks.push(*id);
                        }
                    }
                }
            }
        }
        self.repo.hint_objects(&chunks);
    }

    /// Segment `i`'s extents, checked to cover exactly the segment; `None` for a zero segment.
    fn segment_view(&self, i: u64) -> Result<Option<Arc<SegmentView>>> {
        let id = self.map.get(i);
        if id.is_zero() {
            return Ok(None);
        }
        let seg = self.cache.segment(&self.repo, &id)?;
        let (s_start, s_end) = self.map.segment_range(i);
        let covered = seg
            .starts
            .last()
            .map_or(0, |s| s + seg.extents.last().map_or(0, |e| e.len() as u64));
        if covered != s_end - s_start {
            return Err(Error::Corrupt(format!(
                "segment {} of disk {} covers {covered} bytes, expected {}",
                id.short(),
                self.slot,
                s_end - s_start
            )));
        }
        Ok(Some(seg))
    }

    /// Fills `buf` with the guest bytes at `offset`. The range must lie inside the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.map.size)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "read of {} bytes at offset {offset} is outside disk {} ({} bytes)",
                    buf.len(),
                    self.slot,
                    self.map.size
                ))
            })?;
        let seg_size = self.map.segment_size as u64;
        let mut pos = offset;
        while pos < end {
            let i = pos / seg_size;
            let (s_start, s_end) = self.map.segment_range(i);
            let upto = end.min(s_end);
            let out = &mut buf[(pos - offset) as usize..(upto - offset) as usize];
            self.read_in_segment(i, pos - s_start, out)?;
            pos = upto;
        }
        Ok(())
    }

    fn read_in_segment(&self, i: u64, rel: u64, out: &mut [u8]) -> Result<()> {
        let Some(seg) = self.segment_view(i)? else {
            out.fill(0);
            return Ok(());
        };
        let end = rel + out.len() as u64;
        // The extents overlapping [rel, end).
        let first = seg.starts.partition_point(|&s| s <= rel) - 1;
        let last = seg.starts.partition_point(|&s| s < end);
        let extents = &seg.extents[first..last];
        let starts = &seg.starts[first..last];
        // Each distinct chunk once (a run of identical blocks repeats one chunk). A chunk that
        // one extent uses whole within this read is decoded straight into `out` there (`into`
        // says where), unless the cache holds it already: only the chunks cut by the read's
        // ends, which the neighbouring reads need too, go through the cache.
        let mut ids: Vec<ObjectId> = Vec::new();
        let mut into: Vec<Option<Range<usize>>> = Vec::new();
        let mut slot: HashMap<ObjectId, usize> = HashMap::new();
        for (e, &e_start) in extents.iter().zip(starts) {
            if let Extent::Data { id, len } = e {
                let n = *slot.entry(*id).or_insert_with(|| {
                    ids.push(*id);
                    into.push(None);
                    ids.len() - 1
                });
                let e_end = e_start + *len as u64;
                if into[n].is_none() && e_start >= rel && e_end <= end {
                    into[n] = Some((e_start - rel) as usize..(e_end - rel) as usize);
                }
            }
        }
        let fetched = self.cache.fetch(&self.repo, &ids, &mut into, out)?;
        for (e, &e_start) in extents.iter().zip(starts) {
            let e_end = e_start + e.len() as u64;
            let s = e_start.max(rel);
            let t = e_end.min(end);
            let dst = (s - rel) as usize..(t - rel) as usize;
            match e {
                Extent::Zero { .. } => out[dst].fill(0),
                Extent::Data { id, len } => {
                    let n = slot[id];
                    let part = (s - e_start) as usize..(t - e_start) as usize;
                    let sized = |found: usize| {
                        if found == *len as usize {
                            Ok(())
                        } else {
                            Err(Error::Corrupt(format!(
                                "chunk {} has {found} bytes, its segment says {len}",
                                id.short()
                            )))
                        }
                    };
                    match (&fetched[n], &into[n]) {
                        (Some(data), _) => {
                            sized(data.len())?;
                            out[dst].copy_from_slice(&data[part]);
                        }
                        // Decoded in place: this extent itself, or another use of that chunk.
                        (None, Some(at)) => {
                            sized(at.len())?;
                            if at.start != dst.start {
                                out.copy_within(
                                    at.start + part.start..at.start + part.end,
                                    dst.start,
                                );
                            }
                        }
                        (None, None) => unreachable!("a chunk not returned was decoded in place"),
                    }
                }
            }
        }
        Ok(())
    }

    /// The allocation of the guest bytes in `range`: maximal runs, each `(run, zero)` where
    /// `zero` means the run is stored as zeros (a hole), in order and covering the range up to
    /// the first `limit` runs (at least one). Loads segments' lists of extents, not their data.
    pub fn allocation(&self, range: Range<u64>, limit: usize) -> Result<Vec<(Range<u64>, bool)>> {
        let mut runs = Vec::new();
        let mut pos = range.start;
        while pos < range.end && runs.len() < limit.max(1) {
            let hole = self.next_hole(pos)?;
            let (to, zero) = if hole > pos {
                (hole, false)
            } else {
                (self.next_data(pos)?.unwrap_or(self.map.size), true)
            };
            let to = to.min(range.end);
            if to <= pos {
                return Err(Error::Corrupt(format!(
                    "disk {}: an empty extent at offset {pos}",
                    self.slot
                )));
            }
            runs.push((pos..to, zero));
            pos = to;
        }
        Ok(runs)
    }

    /// The first offset at or after `from` that may hold data, at extent granularity (a
    /// conservative answer for `SEEK_DATA`); `None` if only zeros follow.
    pub fn next_data(&self, from: u64) -> Result<Option<u64>> {
        self.seek(from, true)
    }

    /// The first offset at or after `from` where a zero run starts (`SEEK_HOLE`); the disk size
    /// if there is none before the end.
    pub fn next_hole(&self, from: u64) -> Result<u64> {
        Ok(self.seek(from, false)?.unwrap_or(self.map.size))
    }

    fn seek(&self, from: u64, want_data: bool) -> Result<Option<u64>> {
        let seg_size = self.map.segment_size as u64;
        let mut pos = from;
        while pos < self.map.size {
            let i = pos / seg_size;
            let (s_start, s_end) = self.map.segment_range(i);
            let id = self.map.get(i);
            if id.is_zero() {
                if !want_data {
                    return Ok(Some(pos));
                }
                // Straight to the next segment with data: a thin disk's map lists only those.
                match self.map.nonzero_in(i + 1, self.map.count()).next() {
                    Some(next) => pos = self.map.segment_range(next).0,
                    None => return Ok(None),
                }
                continue;
            }
            let seg = self.cache.segment(&self.repo, &id)?;
            let rel = pos - s_start;
            let first = seg.starts.partition_point(|&s| s <= rel).max(1) - 1;
            for (k, e) in seg.extents.iter().enumerate().skip(first) {
                let is_data = matches!(e, Extent::Data { .. });
                if is_data == want_data {
                    return Ok(Some(s_start + seg.starts[k].max(rel)));
                }
            }
            pos = s_end;
        }
        Ok(None)
    }
}

/// Where the bytes of one file of a generation come from.
pub enum FileSource {
    /// A small file stored verbatim (.vmx, .nvram, log, descriptor).
    Object {
        /// The file object.
        id: ObjectId,
        /// Its size.
        size: u64,
    },
    /// An extent file of a disk: its head and tail objects around a range of guest bytes.
    Extent {
        /// The disk, opened on first use.
        disk: Arc<LazyDisk>,
        /// How the extent maps onto the file.
        extent: ExtentFile,
    },
}

/// A [`DiskImage`] opened on first use, so that listing a generation loads no disk map.
pub struct LazyDisk {
    repo: Arc<Repository>,
    cache: Arc<ReadCache>,
    entry: DiskEntry,
    image: OnceLock<Arc<DiskImage>>,
}

impl LazyDisk {
    /// A disk to open when first read.
    pub fn new(repo: Arc<Repository>, entry: DiskEntry, cache: Arc<ReadCache>) -> LazyDisk {
        LazyDisk {
            repo,
            cache,
            entry,
            image: OnceLock::new(),
        }
    }

    /// The opened disk (its disk map is loaded the first time).
    pub fn image(&self) -> Result<Arc<DiskImage>> {
        if let Some(i) = self.image.get() {
            return Ok(i.clone());
        }
        let img = Arc::new(DiskImage::open(
            self.repo.clone(),
            &self.entry,
            self.cache.clone(),
        )?);
        Ok(self.image.get_or_init(|| img).clone())
    }
}

impl FileSource {
    /// The file's size.
    pub fn size(&self) -> u64 {
        match self {
            FileSource::Object { size, .. } => *size,
            FileSource::Extent { extent, .. } => extent.file_size,
        }
    }

    /// Fills `out` with the file's bytes at `offset`, exactly as `vmrepo extract` would have
    /// written them, and returns how many there are: fewer than `out.len()` at the end of the
    /// file, none past it. Every byte returned is written, whatever `out` held before, so a
    /// caller may hand in the same buffer again without clearing it.
    pub fn read_into(
        &self,
        repo: &Repository,
        cache: &ReadCache,
        offset: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let end = size.min(offset.saturating_add(out.len() as u64));
        let out = &mut out[..(end - offset) as usize];
        match self {
            FileSource::Object { id, .. } => {
                out.fill(0);
                let data = cache.object(repo, id)?;
                copy_overlap(&data, 0, offset, out);
            }
            FileSource::Extent { disk, extent: e } => {
                // The extent's data, then around it the head and tail (zeros where neither
                // reaches), as extract writes them.
                let s = offset.max(e.file_offset).min(end);
                let t = end.min(e.file_offset + e.len).max(s);
                let (before, rest) = out.split_at_mut((s - offset) as usize);
                let (inside, after) = rest.split_at_mut((t - s) as usize);
                if !inside.is_empty() {
                    disk.image()?
                        .read_at(e.start + (s - e.file_offset), inside)?;
                }
                before.fill(0);
                after.fill(0);
                if let Some(id) = e.head {
                    if offset < e.file_offset {
                        copy_overlap(&cache.object(repo, &id)?, 0, offset, before);
                    }
                }
                if let Some(id) = e.tail {
                    let at = e.file_offset + e.len;
                    if end > at {
                        copy_overlap(&cache.object(repo, &id)?, at, t, after);
                    }
                }
            }
        }
        Ok(out.len())
    }

    /// `SEEK_DATA` (`want_data`) or `SEEK_HOLE` from `from`: the next offset of that kind, or
    /// `None` for `SEEK_DATA` when only zeros follow. Head and tail bytes count as data.
    pub fn seek(&self, from: u64, want_data: bool) -> Result<Option<u64>> {
        let size = self.size();
        if from >= size {
            return Ok(None);
        }
        let FileSource::Extent { disk, extent: e } = self else {
            return Ok(Some(if want_data { from } else { size }));
        };
        let data_start = e.file_offset;
        let data_end = e.file_offset + e.len;
        // Bytes of head and tail are data; bytes beyond them (but outside the extent) are holes.
        let head_end = if e.head.is_some() { data_start } else { 0 };
        let tail_start = data_end;
        let tail_end = if e.tail.is_some() { size } else { data_end };
        let is_edge = |p: u64| p < head_end || (p >= tail_start && p < tail_end);
        let mut pos = from;
        while pos < size {
            if pos < data_start || pos >= data_end {
                let edge = is_edge(pos);
                if edge == want_data {
                    return Ok(Some(pos));
                }
                // Move to the next boundary of the edge/gap layout.
                pos = [head_end, data_start, data_end, tail_end, size]
                    .into_iter()
                    .filter(|&b| b > pos)
                    .min()
                    .unwrap_or(size);
                continue;
            }
            let img = disk.image()?;
            let guest = e.start + (pos - data_start);
            let found = if want_data {
                img.next_data(guest)?
            } else {
                Some(img.next_hole(guest)?)
            };
            match found {
                Some(g) if g < e.start + e.len => return Ok(Some(data_start + (g - e.start))),
                _ => pos = data_end,
            }
        }
        Ok(if want_data { None } else { Some(size) })
    }
}

/// Copies the part of `src` (placed at file offset `at`) that overlaps `out` (at `offset`).
fn copy_overlap(src: &[u8], at: u64, offset: u64, out: &mut [u8]) {
    let s = at.max(offset);
    let t = (at + src.len() as u64).min(offset + out.len() as u64);
    if s < t {
        out[(s - offset) as usize..(t - offset) as usize]
            .copy_from_slice(&src[(s - at) as usize..(t - at) as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used_by_weight() {
        let c: Lru<u32> = Lru::new(100);
        let (a, b, d) = (ObjectId::of(b"a"), ObjectId::of(b"b"), ObjectId::of(b"d"));
        c.insert(a, 1, 40);
        c.insert(b, 2, 40);
        assert_eq!(c.get(&a), Some(1)); // a is now the most recent
        c.insert(d, 3, 40); // 120 > 100: evicts b
        assert_eq!(c.get(&b), None);
        assert_eq!(c.get(&a), Some(1));
        assert_eq!(c.get(&d), Some(3));
        assert_eq!(c.weight(), 80);
        // An entry larger than the capacity stays alone.
        c.insert(b, 2, 500);
        assert_eq!(c.weight(), 500);
        assert_eq!(c.get(&a), None);
    }

    #[test]
    fn copy_overlap_clips_both_sides() {
        let mut out = [9u8; 4];
        copy_overlap(b"abcdef", 10, 12, &mut out);
        assert_eq!(&out, b"cdef");
        let mut out = [0u8; 4];
        copy_overlap(b"ab", 14, 12, &mut out);
        assert_eq!(&out, b"\0\0ab");
        let mut out = [7u8; 2];
        copy_overlap(b"ab", 20, 12, &mut out);
        assert_eq!(&out, &[7, 7]);
    }
}
