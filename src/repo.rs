//! The repository on disk: creating it, opening it (config, lock, index), and reading objects.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::{ChunkerParams, Config};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::sync_dir;
use crate::id::ObjectId;
use crate::index::{Index, Location};
use crate::lock::{lock_repository, Lock, LockMode};
use crate::manifest::{DiskMap, Manifest, Segment};
use crate::object::RECORD_HEADER_LEN;
use crate::pack::PackReader;

/// Name of the index database inside a repository.
pub const INDEX_FILE: &str = "index.sqlite";

/// An open repository.
pub struct Repository {
    root: PathBuf,
    config: Config,
    reader: PackReader,
    pool: Mutex<Vec<Index>>,
    _lock: Lock,
}

impl Repository {
    /// Creates a repository in `path`, which must not exist or be an empty directory.
    pub fn init(path: &Path, chunker: ChunkerParams, level: i32) -> Result<Config> {
        if path.exists() {
            let mut entries = fs::read_dir(path).ctx("read directory", path)?;
            if entries.next().is_some() {
                return Err(Error::NotEmpty(path.to_path_buf()));
            }
        } else {
            fs::create_dir_all(path).ctx("create directory", path)?;
        }
        let config = Config::new(chunker, level)?;
        for dir in ["data", "locks"] {
            fs::create_dir(path.join(dir)).ctx("create directory", path.join(dir))?;
        }
        let index = Index::open(&path.join(INDEX_FILE), true)?;
        index.checkpoint();
        drop(index);
        // The config goes last: a directory without it is not (yet) a repository.
        config.store(path)?;
        sync_dir(path)?;
        Ok(config)
    }

    /// Opens the repository at `path`, taking its lock in `mode`; fails at once if it is held.
    pub fn open(path: &Path, mode: LockMode) -> Result<Repository> {
        Repository::open_waiting(path, mode, std::time::Duration::ZERO, &|_| {})
    }

    /// Opens the repository at `path`, waiting up to `wait` for its lock.
    pub fn open_waiting(
        path: &Path,
        mode: LockMode,
        wait: std::time::Duration,
        on_wait: &dyn Fn(&str),
    ) -> Result<Repository> {
        let config = Config::load(path)?;
        for dir in ["data", "locks"] {
            if !path.join(dir).is_dir() {
                return Err(Error::NotARepository {
                    path: path.to_path_buf(),
                    reason: format!("its {dir}/ directory is missing"),
                });
            }
        }
        let lock = lock_repository(path, mode, wait, on_wait)?;
        Ok(Repository {
            root: path.to_path_buf(),
            reader: PackReader::new(&path.join("data")),
            config,
            pool: Mutex::new(Vec::new()),
            _lock: lock,
        })
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The data directory holding the packs.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Path of the index database.
    pub fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    /// Opens a new connection to the index.
    pub fn open_index(&self) -> Result<Index> {
        Index::open(&self.index_path(), false)
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

    /// The pack reader.
    pub fn packs(&self) -> &PackReader {
        &self.reader
    }

    /// Reads, decompresses and verifies object `id`.
    pub fn read_object(&self, id: &ObjectId) -> Result<Vec<u8>> {
        let loc = self
            .with_index(|i| i.lookup(id))?
            .ok_or_else(|| Error::Corrupt(format!("object {} is not in the index", id.short())))?;
        self.reader.read_object(&loc.pack, loc.offset, &loc.header)
    }

    /// Reads, decompresses and verifies several objects, in order. Records that sit back to
    /// back in one pack (chunks written in sequence) are fetched with one read.
    pub fn read_objects(&self, ids: &[ObjectId]) -> Result<Vec<Vec<u8>>> {
        const MAX_SPAN: u64 = 8 << 20;
        let locs: Vec<Location> = self.with_index(|i| {
            ids.iter()
                .map(|id| {
                    i.lookup(id)?.ok_or_else(|| {
                        Error::Corrupt(format!("object {} is not in the index", id.short()))
                    })
                })
                .collect()
        })?;
        let record_len = |l: &Location| RECORD_HEADER_LEN as u64 + l.header.stored_len as u64;
        let mut out = Vec::with_capacity(ids.len());
        let mut i = 0;
        while i < locs.len() {
            let first = &locs[i];
            let mut end = first.offset + record_len(first);
            let mut j = i + 1;
            while j < locs.len()
                && locs[j].pack == first.pack
                && locs[j].offset == end
                && end - first.offset < MAX_SPAN
            {
                end += record_len(&locs[j]);
                j += 1;
            }
            let span = self.reader.read_span(
                &first.pack,
                first.offset,
                (end - first.offset) as usize,
                &first.header,
            )?;
            for l in &locs[i..j] {
                let rel = (l.offset - first.offset) as usize;
                let record = &span[rel..rel + record_len(l) as usize];
                let payload = self
                    .reader
                    .check_record(&l.pack, l.offset, record, &l.header)?;
                out.push(
                    self.reader
                        .decode_at(&l.pack, l.offset, &l.header, payload)?,
                );
            }
            i = j;
        }
        Ok(out)
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

    /// Loads a segment.
    pub fn load_segment(&self, id: &ObjectId) -> Result<Segment> {
        let b = self.read_object(id)?;
        Segment::decode(&b).map_err(|e| Error::Corrupt(format!("segment {}: {e}", id.short())))
    }
}
