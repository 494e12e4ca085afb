//! The write side of the object store used by an ingest: dedup against the index, compress,
//! append to this process's pack files, and make each sealed pack known to the index.
//!
//! Durability contract: an object becomes visible in the index only after the pack holding it
//! has been fsynced, so a dedup hit always points at durable data. Objects of an interrupted
//! ingest that reached the index stay valid (a re-run reuses them); unsealed packs are garbage.
//!
//! A full pack is sealed (fsync, then its index rows in one transaction) by the worker that
//! filled it, outside the lock the other workers append under: they go on cutting and
//! compressing while it waits for the disk. Its objects stay in `pending` until they are
//! indexed, so dedup never misses them in between. That worker also creates the next pack
//! file (the spare), also outside the lock: creating a file waits for the filesystem journal,
//! which a concurrent fsync keeps busy (0.46 s seen), and under the lock that wait stopped
//! every worker.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use crate::backend::{Backend, Durability};
use crate::error::{IoContext, Result};
use crate::repo::id::ObjectId;
use crate::repo::index::Index;
use crate::repo::layout;
use crate::repo::object::{self, ObjectKind, RecordHeader};
use crate::repo::pack::PackWriter;
use crate::repo::Repository;

/// Target size of a pack before it is sealed and a new one started.
pub const PACK_TARGET: u64 = 64 << 20;

/// Threads that ask an index too large to be read ahead into memory whether it holds the
/// objects of a batch: each answer may wait on a random read of the index file, and a disk
/// answers many such reads at once sooner than one after another.
const LOOKUP_THREADS: usize = 16;

/// Fewest objects of a batch asked about on those threads rather than one after another.
const PARALLEL_LOOKUPS_MIN: usize = 32;

/// The threads of [`LOOKUP_THREADS`], started at the first batch that needs them; `None` when
/// they cannot be started (the lookups are then made one after another).
fn lookup_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(LOOKUP_THREADS)
            .thread_name(|i| format!("vmrepo-lookup-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

struct Writer {
    /// The pack being appended to.
    pack: Option<PackWriter>,
    /// An empty pack made ready for when `pack` is full (deleted if unused).
    spare: Option<PackWriter>,
    /// Objects in this process's packs that are not indexed yet (open or being sealed).
    pending: HashSet<ObjectId>,
    /// Records of the open pack.
    records: Vec<(RecordHeader, u64)>,
    bytes_stored: u64,
    /// Packs sealed so far: an object leaves `pending` only when a seal has indexed it, so a
    /// worker that saw neither `pending` nor the index hold an id needs to look in the index
    /// again only if this moved meanwhile.
    seals: u64,
}

/// Whether `new` looks like an edit of `base`, which held the same disk bytes `shift` bytes
/// further on (`new[i]` was at `base[i + shift]`): at least a quarter of 64 places spread over
/// their overlap hold the same byte. A guest that rewrote a few blocks of a chunk leaves most
/// places alone; one that rewrote the whole chunk with other data leaves about 1 in 256 (and
/// then a delta would cost a dictionary's work for nothing).
fn similar(new: &[u8], base: &[u8], shift: i64) -> bool {
    let from = (-shift).max(0);
    let to = (new.len() as i64).min(base.len() as i64 - shift);
    if to <= from {
        return false;
    }
    let step = ((to - from) / 64).max(1);
    let (mut same, mut seen) = (0, 0);
    let mut i = from;
    while i < to {
        seen += 1;
        same += usize::from(new[i as usize] == base[(i + shift) as usize]);
        i += step;
    }
    same * 4 >= seen
}

/// What [`Store::bases`] found: for each chunk asked about, its base's id and the index of the
/// base's plaintext in `plain`.
struct Bases {
    of: Vec<Option<(ObjectId, usize)>>,
    plain: Vec<Vec<u8>>,
}

/// A pack taken out of the writer to be sealed, with its records.
type Full = (PackWriter, Vec<(RecordHeader, u64)>);

/// Shared by the ingest workers of one process.
pub struct Store<'r> {
    repo: &'r Repository,
    level: i32,
    writer: Mutex<Writer>,
    /// The write connection: sealed packs and the final commit, one transaction at a time.
    index: Mutex<Index>,
    /// The index file is too large to be read ahead into memory, so a lookup may wait on the
    /// disk: [`Store::put_all`] then asks about a batch's objects on several threads.
    lookups_may_wait: bool,
}

impl<'r> Store<'r> {
    /// A store writing into `repo`.
    pub fn new(repo: &'r Repository) -> Result<Store<'r>> {
        let index = repo.open_index()?;
        // Deduplicating against an index older than the data would record references to data
        // a gc has deleted.
        repo.check_index_epoch(&index)?;
        let path = index.path().to_path_buf();
        let lookups_may_wait = std::fs::metadata(&path)
            .is_ok_and(|m| !crate::repo::index::small_next_to_memory(m.len()));
        std::thread::spawn(move || crate::repo::index::prefetch_file(&path));
        Ok(Store {
            repo,
            level: repo.config().compression.level,
            writer: Mutex::new(Writer {
                pack: None,
                spare: None,
                pending: HashSet::new(),
                records: Vec::new(),
                bytes_stored: 0,
                seals: 0,
            }),
            index: Mutex::new(index),
            lookups_may_wait,
        })
    }

    /// The repository.
    pub fn repo(&self) -> &Repository {
        self.repo
    }

    /// True if the object is stored already (or being stored by this process).
    #[cfg(test)]
    pub fn exists(&self, id: &ObjectId) -> Result<bool> {
        Ok(self.lookup(id)?.is_none())
    }

    /// [`Store::lookup_all`] for one object.
    #[cfg(test)]
    fn lookup(&self, id: &ObjectId) -> Result<Option<u64>> {
        Ok(self.lookup_all(std::slice::from_ref(id))?.remove(0))
    }

    /// For each of `ids`: `None` if the object is stored already (or being stored by this
    /// process); otherwise the seal count at the time it was found missing. When lookups may
    /// wait on the disk, a large batch is asked about on the lookup threads, many reads of the
    /// index file in flight at once.
    fn lookup_all(&self, ids: &[ObjectId]) -> Result<Vec<Option<u64>>> {
        // The seal count is taken before the index is asked: a seal after it makes
        // `store_missing` ask again.
        let (seals, ask): (u64, Vec<usize>) = {
            let w = self.writer.lock().unwrap();
            let ask = (0..ids.len())
                .filter(|&k| !w.pending.contains(&ids[k]))
                .collect();
            (w.seals, ask)
        };
        let stored = |k: &usize| self.repo.with_index(|i| i.contains(&ids[*k]));
        let known: Vec<bool> = match lookup_pool() {
            Some(pool) if self.lookups_may_wait && ask.len() >= PARALLEL_LOOKUPS_MIN => {
                use rayon::prelude::*;
                pool.install(|| ask.par_iter().map(stored).collect::<Result<_>>())?
            }
            _ => self
                .repo
                .reading_index(|i| ask.iter().map(|k| i.contains(&ids[*k])).collect())?,
        };
        let mut out = vec![None; ids.len()];
        for (&k, known) in ask.iter().zip(known) {
            if !known {
                out[k] = Some(seals);
            }
        }
        Ok(out)
    }

    /// Readers refuse records above [`object::MAX_OBJECT_LEN`]: never write one that no
    /// command could read.
    fn check_size(kind: ObjectKind, data: &[u8]) -> Result<()> {
        if data.len() as u64 > object::MAX_OBJECT_LEN as u64 {
            return Err(crate::error::Error::Usage(format!(
                "a {} object of {} bytes is larger than the largest object a repository can \
                 hold ({} bytes); nothing was recorded",
                kind.name(),
                data.len(),
                object::MAX_OBJECT_LEN
            )));
        }
        Ok(())
    }

    /// Stores `data` under `id` unless it is stored already; returns true if it was new.
    pub fn put(&self, kind: ObjectKind, id: ObjectId, data: &[u8]) -> Result<bool> {
        Ok(self.put_all(kind, &[(id, data)])?[0])
    }

    /// [`Store::put`] for each of `objects` (id, data), in order, the index asked about all of
    /// them first; returns which were new.
    pub fn put_all(&self, kind: ObjectKind, objects: &[(ObjectId, &[u8])]) -> Result<Vec<bool>> {
        self.put_chunks_or(kind, objects, None)
    }

    /// [`Store::put_all`] for chunks, each new one stored as a delta of the chunk `against`
    /// names for it (the chunk it replaces: at the same place of the disk the night before,
    /// starting `shift` bytes before it) when that is worth it ([`object::encode_chunk`]). A
    /// chunk named that is itself a delta stands for its base: a delta is always one step from
    /// a chunk stored on its own. A new chunk that differs from that base at most of the
    /// places sampled ([`similar`]: rewritten, not edited) is stored on its own without trying.
    /// Best effort: a chunk to be stored against whose base cannot be read is stored on its own.
    pub fn put_chunks(
        &self,
        objects: &[(ObjectId, &[u8])],
        against: &[Option<(ObjectId, i64)>],
    ) -> Result<Vec<bool>> {
        debug_assert_eq!(objects.len(), against.len());
        self.put_chunks_or(ObjectKind::Chunk, objects, Some(against))
    }

    fn put_chunks_or(
        &self,
        kind: ObjectKind,
        objects: &[(ObjectId, &[u8])],
        against: Option<&[Option<(ObjectId, i64)>]>,
    ) -> Result<Vec<bool>> {
        for (_, data) in objects {
            Self::check_size(kind, data)?;
        }
        let ids: Vec<ObjectId> = objects.iter().map(|o| o.0).collect();
        let missing = self.lookup_all(&ids)?;
        let against: Vec<Option<(ObjectId, i64)>> = match against {
            Some(against) => missing
                .iter()
                .zip(against)
                .map(|(m, a)| m.and(*a))
                .collect(),
            None => vec![None; objects.len()],
        };
        let wanted: Vec<Option<ObjectId>> = against.iter().map(|a| a.map(|a| a.0)).collect();
        let bases = self.bases(&wanted);
        objects
            .iter()
            .zip(missing)
            .zip(bases.of.iter().zip(&against))
            .map(|((&(id, data), seals), (base, at))| match seals {
                Some(seals) => {
                    let base = base
                        .map(|(b, k)| (b, &bases.plain[k][..]))
                        .filter(|(_, plain)| similar(data, plain, at.map_or(0, |a| a.1)));
                    self.store_missing(kind, id, data, seals, base)
                }
                None => Ok(false),
            })
            .collect()
    }

    /// For each chunk of `wanted`, the chunk stored on its own that it stands for (itself, or
    /// its base when it is a delta), with its plaintext read once however many chunks stand
    /// for it; `None` where there is none or it cannot be read (the object is then stored on
    /// its own).
    fn bases(&self, wanted: &[Option<ObjectId>]) -> Bases {
        let none = || Bases {
            of: vec![None; wanted.len()],
            plain: Vec::new(),
        };
        if wanted.iter().all(Option::is_none) {
            return none();
        }
        let Ok(whole) = self.repo.reading_index(|i| {
            wanted
                .iter()
                .map(|w| {
                    let Some(w) = w else { return Ok(None) };
                    Ok(i.lookup(w)?.and_then(|l| match l.header.base {
                        Some(b) => Some(b),
                        None => (l.header.kind == ObjectKind::Chunk).then_some(*w),
                    }))
                })
                .collect::<Result<Vec<Option<ObjectId>>>>()
        }) else {
            return none();
        };
        let mut unique: Vec<ObjectId> = whole.iter().flatten().copied().collect();
        unique.sort_unstable();
        unique.dedup();
        let Ok(plain) = self.repo.read_bases(&unique) else {
            return none();
        };
        let of = whole
            .iter()
            .map(|w| {
                let w = (*w)?;
                Some((w, unique.binary_search(&w).ok()?))
            })
            .collect();
        Bases { of, plain }
    }

    /// The rest of [`Store::put`] for an object found missing when `seals` packs were sealed;
    /// a chunk given a `base` (id, plaintext) may be stored as a delta of it.
    fn store_missing(
        &self,
        kind: ObjectKind,
        id: ObjectId,
        data: &[u8],
        seals: u64,
        base: Option<(ObjectId, &[u8])>,
    ) -> Result<bool> {
        let encoded = match base {
            Some(_) => object::encode_chunk(id, data, self.level, self.repo.keys(), base),
            None => object::encode(kind, id, data, self.level, self.repo.keys()),
        };
        let full = {
            let mut w = self.writer.lock().unwrap();
            // Another worker may have stored it meanwhile: it is pending, or a seal since the
            // lookup indexed it (rare: the index is probed under the lock only then).
            if w.pending.contains(&id)
                || (w.seals != seals && self.repo.with_index(|i| i.contains(&id))?)
            {
                return Ok(false);
            }
            if w.pack.is_none() {
                w.pack = Some(match w.spare.take() {
                    Some(p) => p,
                    None => PackWriter::create(self.repo.backend(), &self.repo.keys_arc())?,
                });
            }
            let offset = w.pack.as_mut().unwrap().append(&encoded)?;
            w.bytes_stored += encoded.record_len();
            w.pending.insert(id);
            w.records.push((encoded.header, offset));
            if w.pack.as_ref().unwrap().len() >= PACK_TARGET {
                take_full(&mut w)
            } else {
                None
            }
        };
        if let Some(full) = full {
            self.seal(full, true)?;
        }
        Ok(true)
    }

    /// Seals a pack taken out of the writer and records it in the index; its objects then
    /// leave `pending`. On failure the pack file is deleted (nothing refers to it, see
    /// [`PackWriter::seal_then`]). With `spare` (more objects will come), first makes the
    /// next pack file ready.
    fn seal(&self, (pack, records): Full, spare: bool) -> Result<()> {
        if spare {
            // Best effort: without a spare the next append creates its pack itself, and says
            // why if it cannot.
            if let Ok(next) = PackWriter::create(self.repo.backend(), &self.repo.keys_arc()) {
                let mut w = self.writer.lock().unwrap();
                match w.spare {
                    None => w.spare = Some(next),
                    Some(_) => next.discard(),
                }
            }
        }
        let ids: Vec<ObjectId> = records.iter().map(|(h, _)| h.id).collect();
        let result = pack.seal_then(records, |sealed| {
            let mut index = self.index.lock().unwrap();
            index.add_pack(&sealed.name, sealed.size, &sealed.records)?;
            // Best effort: a merge that fails leaves both object tables as they were.
            let _ = index.merge_recent_objects(false);
            Ok(())
        });
        let mut w = self.writer.lock().unwrap();
        for id in &ids {
            w.pending.remove(id);
        }
        w.seals += 1;
        result
    }

    /// Stores a metadata or file object: its id is the hash of `data`.
    pub fn put_blob(&self, kind: ObjectKind, data: &[u8]) -> Result<ObjectId> {
        let id = self.repo.keys().id_of(data);
        self.put(kind, id, data)?;
        Ok(id)
    }

    /// Seals the current pack: afterwards everything put so far is durable and indexed. The
    /// spare pack, if any, is deleted.
    pub fn flush(&self) -> Result<()> {
        let (full, spare) = {
            let mut w = self.writer.lock().unwrap();
            (take_full(&mut w), w.spare.take())
        };
        if let Some(p) = spare {
            p.discard();
        }
        match full {
            Some(full) => self.seal(full, false),
            None => Ok(()),
        }
    }

    /// Bytes appended to packs so far.
    pub fn bytes_stored(&self) -> u64 {
        self.writer.lock().unwrap().bytes_stored
    }

    /// Deletes the unsealed pack after a failure; sealed packs stay (their objects are indexed).
    pub fn abort(&self) {
        let mut w = self.writer.lock().unwrap();
        if let Some(p) = w.pack.take() {
            p.discard();
        }
        if let Some(p) = w.spare.take() {
            p.discard();
        }
        w.pending.clear();
        w.seals += 1;
        w.records.clear();
    }

    /// Commits a generation (consumes the store's index connection for the final transaction).
    pub fn commit_generation(
        &self,
        manifest_id: ObjectId,
        manifest: &crate::repo::manifest::Manifest,
        cache: &[crate::repo::index::CacheRow],
        replaced: &[ObjectId],
    ) -> Result<()> {
        self.repo.ensure_locked()?;
        // The pack holding the manifest is sealed here and recorded in the generation's own
        // transaction (every earlier pack is sealed and indexed already: the workers are done).
        let (full, spare) = {
            let mut w = self.writer.lock().unwrap();
            (take_full(&mut w), w.spare.take())
        };
        if let Some(p) = spare {
            p.discard();
        }
        let mut index = self.index.lock().unwrap();
        // Until the commit, the last pack (which holds the manifest) is marked uncommitted: if
        // this process dies in between, gc and check know that pack for the left-over of a
        // killed ingest rather than a generation the index lost (see layout::uncommitted_marker
        // and maintain/coverage.rs). In a directory the index transaction is the commit and the
        // marker goes after it; in object storage, where the index is this host's cache, the
        // marker's deletion is the commit and the transaction follows.
        let backend = self.repo.backend();
        let remote = crate::backend::is_remote(backend.location());
        let marker = full
            .as_ref()
            .map(|(pack, _)| layout::uncommitted_marker(pack.name(), remote));
        if let Some(m) = &marker {
            backend
                .put(m, b"", Durability::Unsynced)
                .ctx("create", backend.path(m))?;
        }
        let committed = match full {
            None => index.commit_generation(manifest_id, manifest, cache, replaced, None),
            Some((pack, records)) => {
                let ids: Vec<ObjectId> = records.iter().map(|(h, _)| h.id).collect();
                let name = pack.name().to_string();
                let marker = marker.as_deref().expect("a sealed pack has a marker");
                // The pack stays marked as being written until it is indexed (or deleted, when
                // its commit failed).
                let r = pack.seal_then(records, |sealed| {
                    if remote {
                        unmark(&**backend, marker)?;
                    }
                    index.commit_generation(manifest_id, manifest, cache, replaced, Some(sealed))
                });
                let mut w = self.writer.lock().unwrap();
                for id in &ids {
                    w.pending.remove(id);
                }
                drop(w);
                match &r {
                    // Best effort: a marker left behind with its pack indexed is removed by gc.
                    Ok(()) if !remote => {
                        let _ = backend.delete(&[marker.to_string()], Durability::Unsynced);
                    }
                    Ok(()) => {}
                    // The pack was deleted: its marker goes too. A pack that could not be
                    // deleted keeps its marker (put back in object storage, where deleting it
                    // was the commit), so that it stays a left-over, never a generation.
                    Err(_) => match crate::repo::pack::pack_len(&**backend, &name) {
                        Ok(None) => {
                            let _ = backend.delete(&[marker.to_string()], Durability::Unsynced);
                        }
                        _ if remote => {
                            let _ = backend.put(marker, b"", Durability::Synced);
                        }
                        _ => {}
                    },
                }
                r
            }
        };
        self.writer.lock().unwrap().seals += 1;
        committed?;
        // Best effort: the generation is committed; a merge that fails leaves both object
        // tables as they were and is tried again after the next ingest.
        let _ = index.merge_recent_objects(false);
        index.checkpoint();
        Ok(())
    }
}

impl Drop for Store<'_> {
    /// A spare pack left by a run that ended without [`Store::flush`] (an error on the way) is
    /// deleted: it holds nothing.
    fn drop(&mut self) {
        if let Some(p) = self.writer.get_mut().ok().and_then(|w| w.spare.take()) {
            p.discard();
        }
    }
}

impl Store<'_> {
    /// Prune's commit: seals the pack holding the tombstone and, in the same index transaction,
    /// records it and removes `gens`.
    pub fn commit_removal(&self, gens: &[crate::repo::index::GenerationInfo]) -> Result<()> {
        let mut w = self.writer.lock().unwrap();
        let mut index = self.index.lock().unwrap();
        let Some(pack) = w.pack.take() else {
            return index.remove_generations(None, gens);
        };
        let records = std::mem::take(&mut w.records);
        w.pending.clear();
        w.seals += 1;
        let result = pack.seal_then(records, |sealed| {
            index.remove_generations(Some(sealed), gens)
        });
        index.checkpoint();
        result
    }
}

/// Deletes an ingest's uncommitted marker in object storage: the commit of its generation.
fn unmark(backend: &dyn Backend, marker: &str) -> Result<()> {
    backend
        .delete(&[marker.to_string()], Durability::Synced)
        .ctx("delete (commit)", backend.path(marker))
}

/// Takes the open pack and its records out of the writer to be sealed; an empty pack is
/// deleted instead.
fn take_full(w: &mut Writer) -> Option<Full> {
    let pack = w.pack.take()?;
    if pack.is_empty() {
        pack.discard();
        return None;
    }
    Some((pack, std::mem::take(&mut w.records)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_chunk_is_similar_to_its_base_and_a_rewritten_one_is_not() {
        let noise = |seed: u32, n: usize| -> Vec<u8> {
            (0..n as u32)
                .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
                .collect()
        };
        let base = noise(1, 20_000);
        // The same bytes, the cut 3,000 bytes later, with 4 KiB rewritten in the middle.
        let mut edited = base[3_000..].to_vec();
        edited[6_000..10_096].copy_from_slice(&noise(9, 4_096));
        assert!(similar(&edited, &base, 3_000));
        assert!(!similar(&edited, &base, 0), "compared at the wrong place");
        assert!(!similar(&noise(7, 20_000), &base, 0), "other bytes");
        assert!(!similar(&edited, &base, 40_000), "no overlap");
        assert!(similar(&base[..5_000], &base, 0));
    }
    use crate::repo::config::ChunkerParams;
    use crate::repo::lock::LockMode;

    /// A worker finds an object missing; before it appends it, another worker stores it (and,
    /// in the second case, seals the pack, which takes it out of `pending` and into the index).
    /// The first worker must then not append it again.
    #[test]
    fn an_object_stored_by_another_worker_after_the_lookup_is_not_stored_twice() {
        for sealed in [false, true] {
            let t = tempfile::tempdir().unwrap();
            let path = t.path().join("repo");
            Repository::init(&path, ChunkerParams::default(), 3, None).unwrap();
            let repo = Repository::open(&path, LockMode::Shared).unwrap();
            let store = Store::new(&repo).unwrap();
            let data = b"one chunk of guest data".repeat(100);
            let id = repo.keys().id_of(&data);
            let once = object::encode(ObjectKind::Chunk, id, &data, 3, repo.keys()).record_len();

            let seals = store.lookup(&id).unwrap().expect("not stored yet");
            assert!(store.put(ObjectKind::Chunk, id, &data).unwrap());
            if sealed {
                store.flush().unwrap();
            }
            let stored = store
                .store_missing(ObjectKind::Chunk, id, &data, seals, None)
                .unwrap();
            assert!(!stored, "stored again (sealed in between: {sealed})");
            store.flush().unwrap();
            assert_eq!(store.bytes_stored(), once);
            assert!(store.exists(&id).unwrap());
        }
    }

    /// A batch asked about at once, on one thread or on the lookup threads: objects indexed
    /// before, pending in this process, new, and new twice in the batch are each told apart,
    /// and each is stored exactly once.
    #[test]
    fn a_batch_stores_each_missing_object_once_whichever_way_it_is_looked_up() {
        for may_wait in [false, true] {
            let t = tempfile::tempdir().unwrap();
            let path = t.path().join("repo");
            Repository::init(&path, ChunkerParams::default(), 3, None).unwrap();
            let repo = Repository::open(&path, LockMode::Shared).unwrap();
            let mut store = Store::new(&repo).unwrap();
            store.lookups_may_wait = may_wait;
            let data: Vec<Vec<u8>> = (0..200u32)
                .map(|k| format!("chunk {k} ").repeat(50).into_bytes())
                .collect();
            let id = |k: usize| repo.keys().id_of(&data[k]);
            // 0..50 indexed, 50..60 pending.
            for (k, d) in data.iter().enumerate().take(50) {
                store.put(ObjectKind::Chunk, id(k), d).unwrap();
            }
            store.flush().unwrap();
            for (k, d) in data.iter().enumerate().take(60).skip(50) {
                store.put(ObjectKind::Chunk, id(k), d).unwrap();
            }
            let before = store.bytes_stored();
            // The batch: every object, 100..120 twice.
            let batch: Vec<(ObjectId, &[u8])> = (0..200)
                .chain(100..120)
                .map(|k| (id(k), &data[k][..]))
                .collect();
            let new = store.put_all(ObjectKind::Chunk, &batch).unwrap();
            let want: Vec<bool> = (0..200).map(|k| k >= 60).chain([false; 20]).collect();
            assert_eq!(new, want, "lookup threads: {may_wait}");
            let once: u64 = (60..200)
                .map(|k| {
                    object::encode(ObjectKind::Chunk, id(k), &data[k], 3, repo.keys()).record_len()
                })
                .sum();
            assert_eq!(store.bytes_stored() - before, once);
            store.flush().unwrap();
            for (k, d) in data.iter().enumerate() {
                assert_eq!(&repo.read_object(&id(k)).unwrap(), d);
            }
        }
    }

    /// Pack files under `data/`.
    fn pack_files(repo: &Repository) -> usize {
        crate::repo::pack::list_packs(&**repo.backend())
            .unwrap()
            .len()
    }

    /// Filling a pack makes the next pack file ready; it holds the objects that come after, or
    /// is deleted when none come, whether the store is flushed or dropped on an error path.
    #[test]
    fn the_pack_made_ready_at_a_seal_is_used_or_deleted() {
        for (more, flush) in [(true, true), (false, true), (false, false)] {
            let t = tempfile::tempdir().unwrap();
            let path = t.path().join("repo");
            Repository::init(&path, ChunkerParams::default(), 3, None).unwrap();
            let repo = Repository::open(&path, LockMode::Shared).unwrap();
            let store = Store::new(&repo).unwrap();
            // Incompressible 1 MiB objects until one fills the pack (it is then sealed).
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut object = || {
                (0..1 << 17)
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x.to_le_bytes()
                    })
                    .collect::<Vec<u8>>()
            };
            let mut ids = Vec::new();
            while store.bytes_stored() < PACK_TARGET {
                let data = object();
                ids.push(store.put_blob(ObjectKind::Chunk, &data).unwrap());
            }
            assert!(store.writer.lock().unwrap().spare.is_some());
            if more {
                ids.push(store.put_blob(ObjectKind::Chunk, &object()).unwrap());
            }
            if flush {
                store.flush().unwrap();
                assert!(ids.iter().all(|id| store.exists(id).unwrap()));
            }
            drop(store);
            let want = if more { 2 } else { 1 };
            assert_eq!(pack_files(&repo), want, "more: {more}, flush: {flush}");
        }
    }
}
