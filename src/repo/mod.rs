//! The repository on disk: creating it, opening it (config, lock, index), and reading objects.

// The repository core, bottom up: ids and the object codec, keys, packs and the store, the
// index, locks, and the persisted formats (manifest, disk map, fingerprint leaves).
pub mod compressibility;
pub mod config;
pub mod crypto;
pub mod disk_map;
pub mod fanout;
pub mod fingerprint;
pub mod id;
pub mod index;
pub mod keyfile;
pub mod layout;
pub mod leaves;
pub mod lock;
pub mod manifest;
pub mod object;
pub mod pack;
pub mod pack_index;
pub mod store;

use crate::backend::RemoteOptions;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::backend::{Backend, Durability};
use crate::error::{Error, IoContext, Result};
use crate::repo::config::{ChunkerParams, Config};
use crate::repo::crypto::Keys;
use crate::repo::id::ObjectId;
use crate::repo::index::{Index, Location};
use crate::repo::keyfile::KdfCost;
use crate::repo::lock::{lock_repository, Lock, LockMode};
use crate::repo::manifest::{DiskMap, Manifest, Segment, StoredSegment};
use crate::repo::object::{ObjectKind, RecordHeader, RECORD_HEADER_LEN};
use crate::repo::pack::PackReader;

pub use crate::repo::index::INDEX_FILE;

/// A file of [`RESERVE_BYTES`] kept beside the index so that the commands that free space can
/// work on a full filesystem: SQLite needs room for its write-ahead log before it can delete
/// anything. prune and gc release it when the filesystem is nearly full and gc makes it again
/// when there is room.
pub const RESERVE_FILE: &str = "reserve";

/// Size of the reserve file.
pub const RESERVE_BYTES: u64 = 16 << 20;

/// How an encrypted repository gets its passphrase, and how long to wait for the lock.
pub struct OpenOptions<'a> {
    /// Wait up to this long for the repository lock.
    pub lock_wait: Duration,
    /// Told once when the lock is busy and we wait.
    pub on_wait: &'a dyn Fn(&str),
    /// Asked (at most once) for the passphrase when the repository is encrypted.
    pub passphrase: &'a dyn Fn() -> Result<Zeroizing<String>>,
    /// A repository in an object store: where its index is cached, transfer limits.
    pub remote: &'a RemoteOptions,
}

/// Encryption of a new repository.
pub struct NewEncryption<'a> {
    /// The first key's passphrase.
    pub passphrase: &'a str,
    /// argon2id cost for its key file.
    pub cost: KdfCost,
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    /// Where the index (a cache of what the packs hold) and its reserve file live.
    index_dir: PathBuf,
    config: Config,
    reader: PackReader,
    keys: Arc<Keys>,
    key_id: Option<String>,
    pool: Mutex<Vec<Index>>,
    lock: Lock,
    /// Opened only to read ([`LockMode::Read`]).
    reading: bool,
    /// How long the command may wait for a lock (`--lock-wait`): also for a VM's ingest lock.
    lock_wait: Duration,
    /// The gc epoch once read under the lock: it cannot change while the lock is held (only
    /// gc raises it, under the exclusive lock), so a command reads it once (a round trip in
    /// object storage).
    gc_epoch: Mutex<Option<u64>>,
}

impl Repository {
    /// Creates a repository in `path`, which must not exist or be an empty directory; encrypted
    /// (AES-256-GCM, first key file wrapped with `encryption.passphrase`) if `encryption` is given.
    pub fn init(
        path: &Path,
        chunker: ChunkerParams,
        level: i32,
        encryption: Option<NewEncryption<'_>>,
    ) -> Result<Config> {
        Repository::init_in(
            crate::backend::create(path, &RemoteOptions::default())?,
            crate::repo::config::FORMAT_VERSION,
            chunker,
            level,
            encryption,
        )
    }

    /// [`Repository::init`] in a backend made by [`crate::backend::create`].
    pub fn init_in(
        backend: Arc<dyn Backend>,
        format: u32,
        chunker: ChunkerParams,
        level: i32,
        encryption: Option<NewEncryption<'_>>,
    ) -> Result<Config> {
        let mode = if encryption.is_some() {
            "aes-256-gcm"
        } else {
            "none"
        };
        let config = Config::new(chunker, level, mode)?.with_format(format)?;
        for folder in [layout::DATA, layout::LOCKS] {
            backend
                .make_folder(folder)
                .ctx("create directory", backend.path(folder))?;
        }
        let keys = match &encryption {
            Some(e) => {
                let master = Keys::new_master()?;
                keyfile::create(
                    &*backend,
                    &config.repository_id,
                    &master,
                    e.passphrase,
                    e.cost,
                    "initial",
                )?;
                Arc::new(Keys::from_master(&master))
            }
            None => Arc::new(Keys::none()),
        };
        let index_dir = index_dir(&backend)?;
        let index = Index::open(&crate::repo::index::index_path(index_dir), true, keys)?;
        index.set_repository_id(&config.repository_id)?;
        index.checkpoint();
        drop(index);
        // Best effort: a repository without its reserve works, it just cannot free space on a
        // full filesystem without help; gc makes the reserve when there is room.
        let _ = make_reserve(index_dir);
        // The config goes last: a directory without it is not (yet) a repository.
        config.store(&*backend)?;
        Ok(config)
    }

    /// Opens the unencrypted repository at `path`, taking its lock in `mode`; fails at once if
    /// the lock is held (and with [`Error::NeedPassphrase`] if the repository is encrypted).
    pub fn open(path: &Path, mode: LockMode) -> Result<Repository> {
        Repository::open_with(
            path,
            mode,
            &OpenOptions {
                lock_wait: Duration::ZERO,
                on_wait: &|_| {},
                passphrase: &|| Err(Error::NeedPassphrase(path.to_path_buf())),
                remote: &RemoteOptions::default(),
            },
        )
    }

    /// Opens the repository at `path`: unlocks its keys if it is encrypted (before taking any
    /// lock, so a wrong passphrase changes nothing), then takes its lock in `mode`.
    pub fn open_with(path: &Path, mode: LockMode, opts: &OpenOptions<'_>) -> Result<Repository> {
        Repository::open_backend(crate::backend::open(path, opts.remote)?, mode, opts)
    }

    /// [`Repository::open_with`] for a repository in `backend`.
    pub fn open_backend(
        backend: Arc<dyn Backend>,
        mode: LockMode,
        opts: &OpenOptions<'_>,
    ) -> Result<Repository> {
        let config = Config::load(&*backend)?;
        for folder in [layout::DATA, layout::LOCKS] {
            if !backend.has_folder(folder) {
                return Err(Error::NotARepository {
                    path: backend.location().to_path_buf(),
                    reason: format!("its {folder} directory is missing"),
                });
            }
        }
        let (keys, key_id) = if config.encrypted() {
            let pass = (opts.passphrase)()?;
            let (master, id) = keyfile::unlock(&*backend, &config.repository_id, &pass)?;
            (Arc::new(Keys::from_master(&master)), Some(id))
        } else {
            (Arc::new(Keys::none()), None)
        };
        let lock = lock_repository(&*backend, mode, opts.lock_wait, opts.on_wait)?;
        Ok(Repository {
            index_dir: index_dir(&backend)?.to_path_buf(),
            reader: PackReader::new(backend.clone(), keys.clone()),
            backend,
            keys,
            key_id,
            config,
            pool: Mutex::new(Vec::new()),
            reading: mode == LockMode::Read,
            lock_wait: opts.lock_wait,
            lock,
            gc_epoch: Mutex::new(None),
        })
    }

    /// For the commands that free space (prune, gc; exclusive lock held): when the filesystem
    /// is nearly full, deletes the reserve file so the index can be written. Returns a note
    /// saying so.
    pub fn release_reserve_if_full(&self) -> Option<String> {
        let free = crate::space::free_bytes(&self.index_dir)?;
        let path = self.index_dir.join(RESERVE_FILE);
        if free >= 4 * crate::space::LOW_SPACE || !path.exists() {
            return None;
        }
        std::fs::remove_file(&path).ok()?;
        Some(format!(
            "the filesystem holding {} is full ({free} bytes free): released the repository's \
             {} MiB reserve ({}) so that this command can work; gc makes it again when there is room",
            self.index_dir.display(),
            RESERVE_BYTES >> 20,
            path.display()
        ))
    }

    /// Makes the reserve file again if it is missing and the filesystem has room for it and
    /// more. Best effort.
    pub fn restore_reserve(&self) {
        if self.index_dir.join(RESERVE_FILE).exists() {
            return;
        }
        match crate::space::free_bytes(&self.index_dir) {
            Some(free) if free > RESERVE_BYTES + 16 * crate::space::LOW_SPACE => {
                let _ = make_reserve(&self.index_dir);
            }
            _ => {}
        }
    }

    /// The gc epoch recorded beside the data files (0 when there is none yet): the number of
    /// gc runs that deleted or rewrote pack files. gc raises it in the index (meta `gc_epoch`)
    /// and then in the repository before it deletes anything; an index whose epoch is lower is
    /// older than the data files (a copy from before a gc): its rows may point into packs that
    /// are gone, so an ingest must not deduplicate against it, and gc must not trust it.
    pub fn gc_epoch(&self) -> Result<u64> {
        if let Some(epoch) = *self.gc_epoch.lock().unwrap() {
            return Ok(epoch);
        }
        let epoch = self.read_gc_epoch()?;
        if self.lock.unguarded().is_none() {
            *self.gc_epoch.lock().unwrap() = Some(epoch);
        }
        Ok(epoch)
    }

    fn read_gc_epoch(&self) -> Result<u64> {
        let path = self.backend.path(layout::GC_EPOCH);
        match self.backend.get(layout::GC_EPOCH) {
            Ok(t) => {
                let t = String::from_utf8_lossy(&t);
                t.trim().parse().map_err(|_| {
                    Error::Corrupt(format!(
                        "{} does not hold a number ({:?}); it counts the gc runs that deleted \
                         data files",
                        path.display(),
                        t.trim()
                    ))
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Before gc deletes or rewrites packs: raises the gc epoch in `index`, then in the file
    /// beside the data (fsynced), so that any older copy of the index is known to be stale.
    pub fn raise_gc_epoch(&self, index: &Index) -> Result<()> {
        let next = self.gc_epoch()?.max(index.gc_epoch()?) + 1;
        index.set_gc_epoch(next)?;
        // Unknown until the write is known to have happened.
        *self.gc_epoch.lock().unwrap() = None;
        self.backend
            .put(
                layout::GC_EPOCH,
                format!("{next}\n").as_bytes(),
                Durability::Synced,
            )
            .ctx("write", self.backend.path(layout::GC_EPOCH))?;
        *self.gc_epoch.lock().unwrap() = Some(next);
        Ok(())
    }

    /// Refuses an index older than the data files (its gc epoch is below the file's): it may
    /// name objects in packs a later gc deleted. What an ingest checks before deduplicating.
    pub fn check_index_epoch(&self, index: &Index) -> Result<()> {
        let (have, data) = (index.gc_epoch()?, self.gc_epoch()?);
        if have < data {
            return Err(Error::Corrupt(format!(
                "index {} is older than the data files (it has seen {have} gc run(s) that \
                 deleted data, the repository {data}): it was restored from an older copy, and \
                 may name data that is gone. Nothing was changed; `vmrepo check --rebuild-index \
                 {}` rebuilds it from the data files",
                index.path().display(),
                self.location().display()
            )));
        }
        Ok(())
    }

    /// When this read-only command could take no lock: what it could not guard against.
    pub fn unguarded(&self) -> Option<&str> {
        self.lock.unguarded()
    }

    /// Fails when the repository lock may have been lost (in object storage: it could not be
    /// renewed in time, so a gc elsewhere may have started): called before a change that is
    /// safe only under the lock (an ingest's commit, gc's deletions).
    pub fn ensure_locked(&self) -> Result<()> {
        if self.lock.is_lost() {
            return Err(Error::Locked(crate::error::Advice::new(format!(
                "the lock on repository {} could not be renewed for too long (the store was \
                 unreachable), so other hosts may have taken it; nothing more was written. Run \
                 the command again",
                self.location().display()
            ))));
        }
        Ok(())
    }

    /// How long this command may wait for a lock (`--lock-wait`).
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// The repository's keys ([`Keys::none`] when unencrypted).
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A shared handle to the keys.
    pub fn keys_arc(&self) -> Arc<Keys> {
        self.keys.clone()
    }

    /// The key file that unlocked the repository, if it is encrypted.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// Where the repository is, as users name it (its directory).
    pub fn location(&self) -> &Path {
        self.backend.location()
    }

    /// The backend holding its objects.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the index and its reserve file live.
    pub fn index_dir(&self) -> &Path {
        &self.index_dir
    }

    /// Path of the index database.
    pub fn index_path(&self) -> PathBuf {
        crate::repo::index::index_path(&self.index_dir)
    }

    /// Threads a restore should read with when more than the cores pay: a repository in object
    /// storage, where each read waits on a round trip, so reads in flight (not cores) set the
    /// speed. `None` for a directory (the global worker pool is right).
    pub fn remote_readers(&self) -> Option<usize> {
        crate::backend::is_remote(self.location()).then_some(8)
    }

    /// Whether the index exists (for a repository in object storage: whether this host has
    /// a cache of it).
    pub fn has_index(&self) -> bool {
        crate::repo::index::index_exists(&self.index_dir)
    }

    /// Opens a new connection to the index. An index built for another repository (its
    /// recorded `repository_id` differs from config.toml's) is refused: its rows describe
    /// other pack files. An index that records no id yet (made by an earlier vmrepo, or
    /// emptied) is given this repository's; whether it covers the data files is
    /// the survey's question (maintain/coverage.rs).
    pub fn open_index(&self) -> Result<Index> {
        let index = match Index::open(&self.index_path(), false, self.keys.clone()) {
            Ok(i) => i,
            // A read-only command on a repository it cannot write.
            Err(Error::Index { ref cause, .. }) if self.reading && is_read_only_failure(cause) => {
                Index::open_for_reading(&self.index_path(), self.keys.clone())?
            }
            Err(e) => return Err(e),
        };
        match index.repository_id()? {
            Some(id) if id != self.config.repository_id => Err(Error::Corrupt(format!(
                "index {} belongs to another repository (id {id}, this one is {}): it was \
                 copied or restored from elsewhere. Nothing was changed; `vmrepo check \
                 --rebuild-index {}` rebuilds the index from this repository's data files",
                index.path().display(),
                self.config.repository_id,
                self.location().display()
            ))),
            Some(_) => Ok(index),
            None => {
                // Best effort (a read-only repository cannot record it; it is checked again
                // the next time).
                let _ = index.set_repository_id(&self.config.repository_id);
                Ok(index)
            }
        }
    }

    /// Makes the index built at `new` the live one (see [`crate::repo::index::replace_live`]) and
    /// drops this process's pooled connections to the old one. Returns where the old index went.
    pub fn replace_index(&self, new: &Path) -> Result<Option<PathBuf>> {
        let old = crate::repo::index::replace_live(&self.index_dir, new)?;
        self.pool.lock().unwrap().clear();
        Ok(old)
    }

    /// Runs `f` with a pooled index connection (for parallel readers).
    pub fn with_index<T>(&self, f: impl FnOnce(&Index) -> Result<T>) -> Result<T> {
        let idx = self.pool.lock().unwrap().pop();
        let idx = match idx {
            Some(i) => i,
            None => self.open_index()?,
        };
        let r = f(&idx);
        self.pool.lock().unwrap().push(idx);
        r
    }

    /// [`Repository::with_index`] for a run of reads: `f` runs inside one read transaction
    /// ([`Index::reading`]).
    pub fn reading_index<T>(&self, f: impl FnOnce(&Index) -> Result<T>) -> Result<T> {
        self.with_index(|i| i.reading(f))
    }

    /// The pack reader.
    pub fn packs(&self) -> &PackReader {
        &self.reader
    }

    /// Reads, decompresses and verifies object `id`.
    pub fn read_object(&self, id: &ObjectId) -> Result<Vec<u8>> {
        Ok(self.read_objects(std::slice::from_ref(id))?.remove(0))
    }

    /// Reads, decompresses and verifies several objects; returned in the order of `ids`.
    /// Records that sit back to back in one pack (chunks written in sequence) are fetched with
    /// one read, in pack and offset order; when that takes several reads, all of them are
    /// hinted to the kernel first, so the device works on them together instead of one
    /// random read at a time (loading the previous versions of a change-aware ingest's
    /// touched segments, scattered over the repository).
    pub fn read_objects(&self, ids: &[ObjectId]) -> Result<Vec<Vec<u8>>> {
        self.read_objects_as(ids, true)
    }

    /// Reads chunks stored on their own, as the bases of deltas are: one stored as a delta, or
    /// an object of another kind, is damage.
    pub fn read_bases(&self, ids: &[ObjectId]) -> Result<Vec<Vec<u8>>> {
        self.read_objects_as(ids, false)
    }

    /// [`Repository::read_objects`]; unless `deltas`, an object stored as a delta is damage
    /// (the bases of deltas are read this way: a base is always stored on its own).
    fn read_objects_as(&self, ids: &[ObjectId], deltas: bool) -> Result<Vec<Vec<u8>>> {
        let mut out = self.read_objects_inner(ids, &vec![None; ids.len()], &mut [], deltas)?;
        Ok(out
            .iter_mut()
            .map(|o| o.take().expect("every object is returned"))
            .collect())
    }

    /// Reads objects `ids` as [`Repository::read_objects`] does, except that object `k` whose
    /// `into[k]` is a range is decoded straight into `out[range]` (the range must be exactly its
    /// length, or that is reported as damage) and `None` is returned for it; the others are
    /// returned. A restore decodes each chunk where it belongs, without a copy.
    pub fn read_objects_into(
        &self,
        ids: &[ObjectId],
        into: &[Option<std::ops::Range<usize>>],
        out: &mut [u8],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        self.read_objects_inner(ids, into, out, true)
    }

    /// [`Repository::read_objects_into`]; `deltas` as in [`Repository::read_objects_as`]. A
    /// delta is decoded once every span is read, with its base read then (bases that several
    /// deltas share, once).
    fn read_objects_inner(
        &self,
        ids: &[ObjectId],
        into: &[Option<std::ops::Range<usize>>],
        out: &mut [u8],
        deltas: bool,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        thread_local! {
            /// This thread's buffer for pack spans, kept so that each read does not allocate
            /// and zero a new one.
            static SPAN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        /// A span buffer above this is given back after its read.
        const KEEP_SPAN: usize = 16 << 20;
        debug_assert_eq!(ids.len(), into.len());
        let locs: Vec<Location> = self.reading_index(|i| {
            ids.iter()
                .map(|id| {
                    i.lookup(id)?.ok_or_else(|| {
                        Error::Corrupt(format!("object {} is not in the index", id.short()))
                    })
                })
                .collect()
        })?;
        let (order, spans) = plan_spans(&locs);
        if spans.len() > 1 {
            for &(i, _, len) in &spans {
                let first = &locs[order[i]];
                self.reader.hint(&first.pack, first.offset, len);
            }
        }
        let mut decoded: Vec<Option<Vec<u8>>> = vec![None; ids.len()];
        // Deltas met in the spans: (object, its base, its payload).
        let mut pending: Vec<(usize, ObjectId, Vec<u8>)> = Vec::new();
        SPAN.with(|cell| -> Result<()> {
            let mut buf = cell.borrow_mut();
            for &(i, j, len) in &spans {
                let first = &locs[order[i]];
                let len = len as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                let span = &mut buf[..len];
                self.reader
                    .read_span_into(&first.pack, first.offset, span, &first.header)?;
                for &k in &order[i..j] {
                    let l = &locs[k];
                    let rel = (l.offset - first.offset) as usize;
                    let record = &span[rel..rel + record_len(l) as usize];
                    let payload = self
                        .reader
                        .check_record(&l.pack, l.offset, record, &l.header)?;
                    if let Some(base) = object::delta_base(&l.header, payload) {
                        if !deltas {
                            return Err(self.reader.placed(
                                Error::Corrupt(format!(
                                    "chunk {} is named as the base of a delta but is a delta \
                                     itself",
                                    l.header.id.short()
                                )),
                                &l.pack,
                                l.offset,
                            ));
                        }
                        pending.push((k, base, payload.to_vec()));
                        continue;
                    }
                    if !deltas && l.header.kind != ObjectKind::Chunk {
                        return Err(self.reader.placed(
                            Error::Corrupt(format!(
                                "{} {} is named as the base of a delta but is not a chunk",
                                l.header.kind.name(),
                                l.header.id.short()
                            )),
                            &l.pack,
                            l.offset,
                        ));
                    }
                    decoded[k] = self.decode_located(l, payload, None, &into[k], out)?;
                }
            }
            if buf.len() > KEEP_SPAN {
                *buf = Vec::new();
            }
            Ok(())
        })?;
        if !pending.is_empty() {
            let mut bases: Vec<ObjectId> = pending.iter().map(|p| p.1).collect();
            bases.sort_unstable();
            bases.dedup();
            let plain = self.read_objects_as(&bases, false)?;
            for (k, base, payload) in pending {
                let b = &plain[bases.binary_search(&base).expect("every base was read")];
                decoded[k] = self.decode_located(&locs[k], &payload, Some(b), &into[k], out)?;
            }
        }
        Ok(decoded)
    }

    /// Decodes the payload of the record at `l` (a delta with its base's plaintext, `base`):
    /// into `out[range]` when `into` is a range (returning `None`), else returned.
    fn decode_located(
        &self,
        l: &Location,
        payload: &[u8],
        base: Option<&[u8]>,
        into: &Option<std::ops::Range<usize>>,
        out: &mut [u8],
    ) -> Result<Option<Vec<u8>>> {
        match into {
            Some(r) => {
                self.reader.decode_at_into(
                    &l.pack,
                    l.offset,
                    &l.header,
                    payload,
                    base,
                    &mut out[r.clone()],
                )?;
                Ok(None)
            }
            None => self
                .reader
                .decode_at(&l.pack, l.offset, &l.header, payload, base)
                .map(Some),
        }
    }

    /// Reads and decodes the record `expect` at `offset` of `pack` (a delta with its base, read
    /// through the index).
    pub fn read_record_at(
        &self,
        pack: &str,
        offset: u64,
        expect: &RecordHeader,
    ) -> Result<Vec<u8>> {
        let payload = self.reader.read_record(pack, offset, expect)?;
        self.decode_record_at(pack, offset, expect, &payload)
    }

    /// Decodes the payload of record `expect` read at `offset` of `pack` (a delta with its base,
    /// read through the index).
    pub fn decode_record_at(
        &self,
        pack: &str,
        offset: u64,
        expect: &RecordHeader,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        let base = match object::delta_base(expect, payload) {
            Some(b) => Some(
                self.read_bases(&[b])
                    .map_err(|e| {
                        self.reader.placed(
                            Error::Corrupt(format!(
                                "chunk {} is stored against chunk {}, which cannot be read: {e}",
                                expect.id.short(),
                                b.short()
                            )),
                            pack,
                            offset,
                        )
                    })?
                    .remove(0),
            ),
            None => None,
        };
        self.reader
            .decode_at(pack, offset, expect, payload, base.as_deref())
    }

    /// Asks the storage to start fetching objects `ids` ahead of their reads (the records of
    /// the segments a restore reaches next), in the spans [`Repository::read_objects`] will
    /// read them with. Advisory: objects the index does not know are skipped (their read
    /// reports it).
    pub fn hint_objects(&self, ids: &[ObjectId]) {
        let Ok(locs) = self.reading_index(|i| {
            Ok(ids
                .iter()
                .filter_map(|id| i.lookup(id).ok().flatten())
                .collect::<Vec<Location>>())
        }) else {
            return;
        };
        let (order, spans) = plan_spans(&locs);
        for (i, _, len) in spans {
            let first = &locs[order[i]];
            self.reader.hint(&first.pack, first.offset, len);
        }
    }

    /// Loads a generation manifest.
    pub fn load_manifest(&self, id: &ObjectId) -> Result<Manifest> {
        let b = self.read_object(id)?;
        Manifest::decode(&b).map_err(|e| Error::Corrupt(format!("manifest {}: {e}", id.short())))
    }

    /// Loads a disk map.
    pub fn load_disk_map(&self, id: &ObjectId) -> Result<DiskMap> {
        let b = self.read_object(id)?;
        DiskMap::decode(&b).map_err(|e| Error::Corrupt(format!("disk map {}: {e}", id.short())))
    }

    /// Loads a segment, and its base when it is stored as a delta.
    pub fn load_segment(&self, id: &ObjectId) -> Result<Segment> {
        self.decode_segment(id, &self.read_object(id)?)
    }

    /// Loads a segment and names the base it was stored against, if any: an object the
    /// segment needs, which a walk of what generations reference must count.
    pub fn load_segment_with_base(&self, id: &ObjectId) -> Result<(Segment, Option<ObjectId>)> {
        let loaded = self.load_segment_and_base(id)?;
        Ok((loaded.segment, loaded.base.map(|(b, _)| b)))
    }

    /// Loads a segment with the whole segment it was stored against, when it is a delta.
    pub fn load_segment_and_base(&self, id: &ObjectId) -> Result<LoadedSegment> {
        let stored = decode_stored_segment(id, &self.read_object(id)?)?;
        let base = stored.base().map(|b| self.read_object(&b));
        resolve_segment(id, stored, base)
    }

    /// Decodes the bytes of segment object `id` (read with [`Repository::read_object`] or
    /// [`Repository::read_objects`]), reading its base when it is a delta.
    pub fn decode_segment(&self, id: &ObjectId, bytes: &[u8]) -> Result<Segment> {
        let stored = decode_stored_segment(id, bytes)?;
        let base = stored.base().map(|b| self.read_object(&b));
        Ok(resolve_segment(id, stored, base)?.segment)
    }

    /// Decodes segment objects `ids` read together (`bytes`, in the same order), reading the
    /// bases of the deltas among them with one more batch of reads; each result on its own.
    pub fn decode_segments(
        &self,
        ids: &[ObjectId],
        bytes: Vec<Vec<u8>>,
    ) -> Vec<Result<LoadedSegment>> {
        let stored: Vec<Result<StoredSegment>> = ids
            .iter()
            .zip(&bytes)
            .map(|(id, b)| decode_stored_segment(id, b))
            .collect();
        drop(bytes);
        let mut bases: Vec<ObjectId> = stored
            .iter()
            .filter_map(|s| s.as_ref().ok().and_then(StoredSegment::base))
            .collect();
        bases.sort_unstable();
        bases.dedup();
        // One batch; when it fails, each base is read alone, so that only the deltas whose own
        // base cannot be read fail.
        let read: std::collections::HashMap<ObjectId, Result<Vec<u8>>> =
            match self.read_objects(&bases) {
                Ok(all) => bases.iter().copied().zip(all.into_iter().map(Ok)).collect(),
                Err(_) => bases.iter().map(|b| (*b, self.read_object(b))).collect(),
            };
        ids.iter()
            .zip(stored)
            .map(|(id, stored)| {
                let stored = stored?;
                let base = stored.base().map(|b| match &read[&b] {
                    Ok(bytes) => Ok(bytes.clone()),
                    Err(Error::Corrupt(why)) => Err(Error::Corrupt(why.clone())),
                    Err(e) => Err(Error::Corrupt(e.to_string())),
                });
                resolve_segment(id, stored, base)
            })
            .collect()
    }
}

/// Bytes a record takes in its pack (header and stored payload).
fn record_len(l: &Location) -> u64 {
    RECORD_HEADER_LEN as u64 + l.header.stored_len as u64
}

/// How records at `locs` are read: `order` sorts them by pack and offset, and each span
/// `(first, end, bytes)` covers `order[first..end]`, records that sit back to back in one pack
/// (chunks written in sequence), at most 8 MiB, read with one request.
fn plan_spans(locs: &[Location]) -> (Vec<usize>, Vec<(usize, usize, u64)>) {
    const MAX_SPAN: u64 = 8 << 20;
    let mut order: Vec<usize> = (0..locs.len()).collect();
    order.sort_by(|&a, &b| (&locs[a].pack, locs[a].offset).cmp(&(&locs[b].pack, locs[b].offset)));
    let mut spans = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let first = &locs[order[i]];
        let mut end = first.offset + record_len(first);
        let mut j = i + 1;
        while j < order.len()
            && locs[order[j]].pack == first.pack
            && locs[order[j]].offset == end
            && end - first.offset < MAX_SPAN
        {
            end += record_len(&locs[order[j]]);
            j += 1;
        }
        spans.push((i, j, end - first.offset));
        i = j;
    }
    (order, spans)
}

/// A segment as loaded for a reader that may store its next version: its extents, and the whole
/// segment it was stored against when it is a delta.
pub struct LoadedSegment {
    /// The segment's extents.
    pub segment: Segment,
    /// The base's id and extents, for a delta.
    pub base: Option<(ObjectId, Segment)>,
}

impl LoadedSegment {
    /// The whole segment behind segment `id` (this one): itself, or its base.
    pub fn whole<'a>(&'a self, id: &ObjectId) -> (ObjectId, &'a Segment) {
        match &self.base {
            Some((b, s)) => (*b, s),
            None => (*id, &self.segment),
        }
    }
}

/// Segment `id` from its stored form and, for a delta, the bytes read of its base.
fn resolve_segment(
    id: &ObjectId,
    stored: StoredSegment,
    base: Option<Result<Vec<u8>>>,
) -> Result<LoadedSegment> {
    let d = match stored {
        StoredSegment::Whole(segment) => {
            return Ok(LoadedSegment {
                segment,
                base: None,
            })
        }
        StoredSegment::Delta(d) => d,
    };
    let corrupt = |e: String| {
        Error::Corrupt(format!(
            "segment {} (stored against segment {}): {e}",
            id.short(),
            d.base.short()
        ))
    };
    // The base's own damage is told once, inside this segment's.
    let bytes = base
        .unwrap_or_else(|| Err(Error::Corrupt("its base was not read".into())))
        .map_err(|e| match e {
            Error::Corrupt(why) => corrupt(why),
            e => corrupt(e.to_string()),
        })?;
    let base = Segment::decode(&bytes).map_err(corrupt)?;
    let segment = d.resolve(&base).map_err(corrupt)?;
    Ok(LoadedSegment {
        segment,
        base: Some((d.base, base)),
    })
}

/// Refuses `path` as a place to write `what` (restored files, a mount point, an exported key)
/// when it lies inside the repository directory `location`, links resolved: files written
/// there would mix with the repository's own (a restored `index.sqlite` or `*.pack` under
/// `--force` would replace them), and a key written there sits beside the data it opens. A
/// repository in object storage has no such directory.
pub fn refuse_inside(location: &Path, path: &Path, what: &str) -> Result<()> {
    if crate::backend::is_remote(location) || !crate::fsutil::lies_within(path, location) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{what} {} is inside the repository {}: choose a place outside the repository directory",
        path.display(),
        location.display()
    )))
}

/// Parses segment object `id` as stored (whole or a delta).
pub fn decode_stored_segment(id: &ObjectId, bytes: &[u8]) -> Result<StoredSegment> {
    StoredSegment::decode(bytes).map_err(|e| Error::Corrupt(format!("segment {}: {e}", id.short())))
}

/// Checks that `master` (an imported master key) decrypts the repository's data, when it holds
/// any: reads the first object the index lists. No lock is taken.
pub fn verify_master_key(
    path: &Path,
    remote: &RemoteOptions,
    master: &crate::repo::crypto::MasterKey,
) -> Result<()> {
    let backend = crate::backend::open(path, remote)?;
    let keys = Arc::new(Keys::from_master(master));
    let dir = index_dir(&backend)?;
    let index = Index::open(&crate::repo::index::index_path(dir), false, keys.clone())?;
    if let Some(loc) = index.first_object()? {
        PackReader::new(backend, keys).read_object(&loc.pack, loc.offset, &loc.header)?;
    }
    Ok(())
}

/// Where the index of the repository in `backend` lives.
fn index_dir(backend: &Arc<dyn Backend>) -> Result<&Path> {
    backend.local_dir().ok_or_else(|| {
        Error::Usage(format!(
            "repository {} has no local directory for its index",
            backend.location().display()
        ))
    })
}

/// True when SQLite failed because it may not write (read-only file or filesystem, or a WAL
/// index whose `-shm` file it cannot create).
fn is_read_only_failure(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ReadOnly)
            | Some(rusqlite::ErrorCode::CannotOpen)
            | Some(rusqlite::ErrorCode::PermissionDenied)
            | Some(rusqlite::ErrorCode::SystemIoFailure)
    )
}

/// Writes the reserve file (allocated blocks, not a sparse file), atomically.
fn make_reserve(root: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = root.join(RESERVE_FILE);
    let tmp = root.join(format!("{RESERVE_FILE}.tmp-{}", std::process::id()));
    let result = (|| {
        let f = fs::File::create(&tmp).ctx("create", &tmp)?;
        // SAFETY: the descriptor is open; posix_fallocate reads its integer arguments.
        let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, RESERVE_BYTES as libc::off_t) };
        if r != 0 {
            return Err(Error::io(
                "allocate",
                &tmp,
                std::io::Error::from_raw_os_error(r),
            ));
        }
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, &path).ctx("rename into place", &path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
