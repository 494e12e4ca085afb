//! The SQLite index (`index.sqlite`, WAL): where every object lives, the segment cache, and the
//! catalog of VMs and generations. Everything in it can be rebuilt from the pack files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blake3::hazmat::ChainingValue;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::crypto::Keys;
use crate::repo::id::ObjectId;
use crate::repo::manifest::Manifest;
use crate::repo::object::{ObjectKind, RecordHeader};

/// How long a writer waits for another process's transaction to end.
const BUSY_TIMEOUT: Duration = Duration::from_secs(600);

/// A segment-cache row an ingest adds: the segment stored for a fingerprint and, for a
/// one-run segment, its leaf chaining values (encoded by [`crate::repo::leaves::encode`]).
#[derive(Clone, Debug)]
pub struct CacheRow {
    pub fingerprint: [u8; 32],
    pub segment: ObjectId,
    pub leaves: Option<Vec<u8>>,
}

mod file;
mod schema;
use schema::forget_gone_segments;

pub use file::{fresh_rebuild_path, index_path, prefetch_file, replace_live, INDEX_FILE};
pub use schema::{MERGE_MIN, MERGE_SHARE, SCHEMA_VERSION};

/// Where an object is stored.
#[derive(Clone, Debug)]
pub struct Location {
    /// Pack name.
    pub pack: String,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// The record header the pack must hold there.
    pub header: RecordHeader,
}

/// A sealed pack and the records in it, ready to be recorded.
#[derive(Clone, Debug)]
pub struct SealedPack {
    /// Pack name.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Each record's header and offset.
    pub records: Vec<(RecordHeader, u64)>,
}

/// A generation as the index lists it.
#[derive(Clone, Debug, Serialize)]
pub struct GenerationInfo {
    /// `vm@time`.
    pub name: String,
    /// VM name.
    pub vm: String,
    /// Generation time.
    pub time: String,
    /// Manifest object id.
    pub manifest: ObjectId,
    /// `uuid.bios`.
    pub uuid: Option<String>,
    /// Source path.
    pub source: String,
    /// Ingest start.
    pub started: String,
    /// Ingest end.
    pub finished: String,
    /// vmrepo version.
    pub vmrepo_version: String,
    /// Virtual size of all disks.
    pub virtual_bytes: u64,
    /// Bytes read at ingest.
    pub bytes_read: u64,
    /// New chunk bytes.
    pub bytes_new: u64,
    /// Bytes written to packs.
    pub bytes_stored: u64,
    /// New chunks.
    pub chunks_new: u64,
    /// Disks.
    pub disks: Vec<DiskInfo>,
    /// Number of small files.
    pub files: u64,
    /// Why the generation is damaged, if `check --repair` found it so (never extracted silently).
    pub damaged: Option<String>,
    #[serde(skip)]
    row: i64,
}

/// A disk as the index lists it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DiskInfo {
    /// Controller slot.
    pub slot: String,
    /// Descriptor file name.
    pub descriptor: Option<String>,
    /// createType.
    pub create_type: String,
    /// Virtual size.
    pub virtual_size: u64,
}

/// A VM with a summary of its generations.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// Number of generations.
    pub generations: u64,
    /// Oldest generation time.
    pub oldest: String,
    /// Newest generation time.
    pub latest: String,
    /// Sum of bytes written by its ingests.
    pub bytes_stored: u64,
}

/// The catalog fields of a generation that an encrypted repository keeps sealed.
#[derive(Serialize, serde::Deserialize)]
struct SealedGeneration {
    vm: String,
    uuid: Option<String>,
    source: String,
    started: String,
    finished: String,
    version: String,
    virtual_bytes: u64,
    bytes_read: u64,
    bytes_new: u64,
    bytes_stored: u64,
    chunks_new: u64,
    files: u64,
    disks: Vec<DiskInfo>,
}

/// The sealed blobs of a generation row: VM name, catalog, damage note.
type SealedColumns = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

/// An open index.
pub struct Index {
    conn: Connection,
    path: PathBuf,
    keys: Arc<Keys>,
    /// Rows of the main object table as last counted (merges add to it), to decide merges
    /// without counting a large table after every pack.
    main_rows: Option<u64>,
}

impl Index {
    /// Opens (creating if `create`) the index at `path`.
    /// `keys` seal the catalog fields of an encrypted repository ([`Keys::none`] otherwise).
    pub fn open(path: &Path, create: bool, keys: Arc<Keys>) -> Result<Index> {
        if !create && !path.exists() {
            return Err(Error::Corrupt(format!(
                "index {} is missing; `vmrepo check --rebuild-index` rebuilds it from the data files",
                path.display()
            )));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| Error::Index {
            path: path.to_path_buf(),
            cause: e,
        })?;
        let idx = Index {
            conn,
            path: path.to_path_buf(),
            keys,
            main_rows: None,
        };
        idx.setup()?;
        Ok(idx)
    }

    /// Opens the index at `path` for reading only, for a command that cannot write the
    /// repository (read-only media, a filesystem snapshot, another user's repository): first
    /// read-only, which still shares SQLite's locks with writers; where that fails (a WAL
    /// database whose `-shm` file is absent and cannot be created), as an immutable file,
    /// which takes no locks and is right only when nothing writes the repository meanwhile.
    pub fn open_for_reading(path: &Path, keys: Arc<Keys>) -> Result<Index> {
        if !path.exists() {
            return Index::open(path, false, keys);
        }
        let read_only = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let try_open = |target: &str, flags: OpenFlags| -> rusqlite::Result<Connection> {
            let conn = Connection::open_with_flags(target, flags)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            let v: String = conn.query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )?;
            if v.parse::<i64>().ok() != Some(SCHEMA_VERSION) {
                return Err(rusqlite::Error::InvalidQuery);
            }
            Ok(conn)
        };
        let plain = path.to_string_lossy().into_owned();
        let immutable = format!(
            "file:{}?immutable=1",
            plain
                .replace('%', "%25")
                .replace('?', "%3f")
                .replace('#', "%23")
        );
        let conn = try_open(&plain, read_only).or_else(|first| {
            try_open(&immutable, read_only | OpenFlags::SQLITE_OPEN_URI).map_err(|_| first)
        });
        match conn {
            Ok(conn) => Ok(Index {
                conn,
                path: path.to_path_buf(),
                keys,
                main_rows: None,
            }),
            Err(rusqlite::Error::InvalidQuery) => Err(Error::Corrupt(format!(
                "index {} has another schema version and cannot be upgraded read-only; open \
                 the repository once with write access",
                path.display()
            ))),
            Err(e) => Err(Error::Index {
                path: path.to_path_buf(),
                cause: e,
            }),
        }
    }

    fn err(&self, e: rusqlite::Error) -> Error {
        Error::Index {
            path: self.path.clone(),
            cause: e,
        }
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where object `id` is stored, if the index knows it.
    pub fn lookup(&self, id: &ObjectId) -> Result<Option<Location>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len
                 FROM (SELECT * FROM recent_objects WHERE id = ?1
                       UNION ALL SELECT * FROM objects WHERE id = ?1) o
                 JOIN packs p ON p.id = o.pack LIMIT 1",
            )
            .map_err(|e| self.err(e))?;
        st.query_row([&id.0[..]], |r| row_location(r, *id))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// True if the index knows object `id`.
    pub fn contains(&self, id: &ObjectId) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT 1 FROM recent_objects WHERE id = ?1
                 UNION ALL SELECT 1 FROM objects WHERE id = ?1",
            )
            .map_err(|e| self.err(e))?;
        st.exists([&id.0[..]]).map_err(|e| self.err(e))
    }

    /// Moves the recent objects into the main table once there are enough of them to be worth
    /// it (see [`MERGE_MIN`]); `force` merges whatever there is. One transaction: a failure
    /// leaves both tables as they were. Returns the rows moved.
    pub fn merge_recent_objects(&mut self, force: bool) -> Result<u64> {
        let recent: i64 = self
            .conn
            .query_row("SELECT count(*) FROM recent_objects", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if recent == 0 || (!force && (recent as u64) < MERGE_MIN) {
            return Ok(0);
        }
        let main = match self.main_rows {
            Some(n) => n,
            None => self
                .conn
                .query_row("SELECT count(*) FROM objects", [], |r| r.get::<_, i64>(0))
                .map_err(|e| self.err(e))? as u64,
        };
        self.main_rows = Some(main);
        if !force && (recent as u64) < main / MERGE_SHARE {
            return Ok(0);
        }
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO objects SELECT * FROM recent_objects ORDER BY id",
                [],
            )?;
            tx.execute("DELETE FROM recent_objects", [])?;
            Ok(())
        })?;
        self.main_rows = Some(main + recent as u64);
        Ok(recent as u64)
    }

    /// Runs `f` in one immediate (write) transaction and commits it; errors name the index.
    fn write(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<()> {
        let path = self.path.clone();
        let err = |e| Error::Index {
            path: path.clone(),
            cause: e,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        f(&tx).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Records a sealed pack and the objects in it, in one transaction.
    pub fn add_pack(
        &mut self,
        name: &str,
        size: u64,
        records: &[(RecordHeader, u64)],
    ) -> Result<()> {
        self.write(|tx| {
            insert_pack(tx, name, size, records)?;
            Ok(())
        })
    }

    /// Prune: in one transaction, records the sealed pack holding the tombstone (if any) and
    /// removes the generations with their disks, files and damage notes.
    pub fn remove_generations(
        &mut self,
        tombstone_pack: Option<&SealedPack>,
        gens: &[GenerationInfo],
    ) -> Result<()> {
        self.write(|tx| {
            if let Some(p) = tombstone_pack {
                insert_pack(tx, &p.name, p.size, &p.records)?;
            }
            for g in gens {
                for table in ["disks", "files", "damaged"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE generation = ?1"),
                        [g.row],
                    )?;
                }
                tx.execute("DELETE FROM generations WHERE id = ?1", [g.row])?;
            }
            tx.execute(
                "DELETE FROM vms WHERE id NOT IN (SELECT vm FROM generations)",
                [],
            )?;
            Ok(())
        })
    }

    /// Garbage collection, one step in one transaction: drops `old_packs` with every object row
    /// in them, records `new_packs` (sealed copies of their live records), deletes the rows of
    /// `dead` objects elsewhere, and forgets segment-cache rows whose segment is gone.
    pub fn apply_gc(
        &mut self,
        old_packs: &[String],
        new_packs: &[SealedPack],
        dead: &[ObjectId],
    ) -> Result<()> {
        self.write(|tx| {
            for name in old_packs {
                for table in ["objects", "recent_objects"] {
                    tx.execute(
                        &format!(
                            "DELETE FROM {table} WHERE pack = (SELECT id FROM packs WHERE name = ?1)"
                        ),
                        [name],
                    )?;
                }
                tx.execute("DELETE FROM packs WHERE name = ?1", [name])?;
            }
            for p in new_packs {
                insert_pack(tx, &p.name, p.size, &p.records)?;
            }
            {
                let mut st = tx.prepare_cached("DELETE FROM objects WHERE id = ?1")?;
                let mut recent = tx.prepare_cached("DELETE FROM recent_objects WHERE id = ?1")?;
                for id in dead {
                    st.execute([&id.0[..]])?;
                    recent.execute([&id.0[..]])?;
                }
            }
            forget_gone_segments(tx)?;
            Ok(())
        })
    }

    /// Repair: forgets objects whose stored bytes are missing or damaged, and segment-cache rows
    /// of segments that cannot be fully read (so a later ingest re-chunks and re-stores them).
    pub fn forget_damaged_objects(
        &mut self,
        objects: &[ObjectId],
        segments: &[ObjectId],
    ) -> Result<()> {
        self.write(|tx| {
            for id in objects {
                tx.execute("DELETE FROM objects WHERE id = ?1", [&id.0[..]])?;
                tx.execute("DELETE FROM recent_objects WHERE id = ?1", [&id.0[..]])?;
            }
            for id in segments {
                tx.execute("DELETE FROM segment_cache WHERE segment = ?1", [&id.0[..]])?;
                tx.execute("DELETE FROM segment_leaves WHERE segment = ?1", [&id.0[..]])?;
            }
            forget_gone_segments(tx)?;
            Ok(())
        })
    }

    /// True if any generation is marked damaged (cheap: ingest asks after every run).
    pub fn has_damaged(&self) -> Result<bool> {
        self.conn
            .query_row("SELECT EXISTS(SELECT 1 FROM damaged)", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Marks a generation damaged (`detail` says what is lost), or clears the mark with `None`.
    pub fn set_damaged(&mut self, g: &GenerationInfo, detail: Option<&str>) -> Result<()> {
        match detail {
            Some(d) => {
                let (text, sealed) = self.seal_damage(&g.vm, &g.time, d);
                self.conn.execute(
                    "INSERT OR REPLACE INTO damaged(generation, detail, sealed) VALUES(?1, ?2, ?3)",
                    params![g.row, text, sealed],
                )
            }
            None => self
                .conn
                .execute("DELETE FROM damaged WHERE generation = ?1", [g.row]),
        }
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    /// The segment object recorded for a content fingerprint, if it is still stored.
    pub fn cached_segment(&self, fingerprint: &[u8; 32]) -> Result<Option<ObjectId>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT c.segment, c.mac FROM segment_cache c
                 WHERE c.fingerprint = ?1 AND (
                     EXISTS(SELECT 1 FROM recent_objects WHERE id = c.segment)
                     OR EXISTS(SELECT 1 FROM objects WHERE id = c.segment))",
            )
            .map_err(|e| self.err(e))?;
        let v: Option<(Vec<u8>, Option<Vec<u8>>)> = st
            .query_row([&fingerprint[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(|e| self.err(e))?;
        // A row whose check value does not match (a damaged index) is a miss, never a wrong hit.
        Ok(v.and_then(|(seg, mac)| {
            let seg = ObjectId::from_slice(&seg)?;
            (mac.as_deref() == Some(&self.keys.cache_mac(fingerprint, &seg)[..])).then_some(seg)
        }))
    }

    /// True if `vm` has a generation at exactly `time`.
    pub fn has_generation(&self, vm: &str, time: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT count(*) FROM generations g JOIN vms v ON v.id = g.vm
                 WHERE v.name = ?1 AND g.time = ?2",
                [&self.keys.name_tag(vm), time],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// The newest generation time of `vm`, if it has any.
    pub fn latest_time(&self, vm: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT max(g.time) FROM generations g JOIN vms v ON v.id = g.vm WHERE v.name = ?1",
                [self.keys.name_tag(vm)],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// Makes a generation visible: one transaction adds it, its disks, files and segment cache rows.
    /// Every object it references must already be in the index.
    ///
    /// `last_pack`, the sealed pack holding the manifest, is recorded in the same transaction:
    /// a manifest is never indexed without its generation, so an indexed manifest that no
    /// generation lists is always a sign of a damaged index (see the survey in maintain/coverage.rs).
    pub fn commit_generation(
        &mut self,
        manifest_id: ObjectId,
        m: &Manifest,
        cache: &[CacheRow],
        last_pack: Option<&SealedPack>,
    ) -> Result<()> {
        let path = self.path.clone();
        let err = |e| Error::Index {
            path: path.clone(),
            cause: e,
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        if let Some(p) = last_pack {
            insert_pack(&tx, &p.name, p.size, &p.records).map_err(err)?;
        }
        insert_generation(&tx, &self.keys, manifest_id, m).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Error::Usage(format!(
                    "VM {} already has a generation at {}",
                    m.catalog.vm, m.catalog.time
                ))
            }
            e => err(e),
        })?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO segment_cache(fingerprint, segment, mac) VALUES(?1, ?2, ?3)",
                )
                .map_err(err)?;
            for row in cache {
                let (fp, seg) = (&row.fingerprint, &row.segment);
                st.execute(params![
                    &fp[..],
                    &seg.0[..],
                    &self.keys.cache_mac(fp, seg)[..]
                ])
                .map_err(err)?;
            }
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO segment_leaves(segment, leaves) VALUES(?1, ?2)",
                )
                .map_err(err)?;
            for row in cache {
                if let Some(leaves) = &row.leaves {
                    st.execute(params![&row.segment.0[..], leaves])
                        .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }

    /// The leaf chaining values kept for segment `id` (see [`crate::repo::leaves`]), if any. They are
    /// not authenticated: the caller checks them against the segment's fingerprint.
    pub fn segment_leaves(&self, id: &ObjectId) -> Result<Option<Vec<ChainingValue>>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT leaves FROM segment_leaves WHERE segment = ?1")
            .map_err(|e| self.err(e))?;
        let v: Option<Vec<u8>> = st
            .query_row([&id.0[..]], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|b| crate::repo::leaves::decode(&b)))
    }

    /// True if leaves are kept for segment `id` (the prefetcher of a change-aware ingest asks).
    pub fn has_segment_leaves(&self, id: &ObjectId) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM segment_leaves WHERE segment = ?1")
            .map_err(|e| self.err(e))?;
        st.exists([&id.0[..]]).map_err(|e| self.err(e))
    }

    /// All VMs with a summary, by name.
    pub fn vms(&self) -> Result<Vec<VmInfo>> {
        let mut out: Vec<VmInfo> = Vec::new();
        for g in self.generations(None)? {
            match out.last_mut() {
                Some(v) if v.name == g.vm => {
                    v.generations += 1;
                    v.latest = g.time.clone();
                    v.bytes_stored += g.bytes_stored;
                }
                _ => out.push(VmInfo {
                    name: g.vm.clone(),
                    generations: 1,
                    oldest: g.time.clone(),
                    latest: g.time.clone(),
                    bytes_stored: g.bytes_stored,
                }),
            }
        }
        Ok(out)
    }

    /// Generations, oldest first; of one VM if `vm` is given.
    pub fn generations(&self, vm: Option<&str>) -> Result<Vec<GenerationInfo>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT g.id, v.name, g.time, g.manifest, g.uuid, g.source, g.started, g.finished, g.version,
                        g.virtual_bytes, g.bytes_read, g.bytes_new, g.bytes_stored, g.chunks_new,
                        (SELECT count(*) FROM files f WHERE f.generation = g.id),
                        (SELECT detail FROM damaged d WHERE d.generation = g.id),
                        v.sealed, g.sealed,
                        (SELECT sealed FROM damaged d WHERE d.generation = g.id)
                 FROM generations g JOIN vms v ON v.id = g.vm
                 WHERE ?1 IS NULL OR v.name = ?1 ORDER BY v.name, g.time",
            )
            .map_err(|e| self.err(e))?;
        let tag = vm.map(|v| self.keys.name_tag(v));
        let rows = st
            .query_map([tag], |r| {
                let vm: String = r.get(1)?;
                let time: String = r.get(2)?;
                let manifest: Vec<u8> = r.get(3)?;
                let sealed: SealedColumns = (r.get(16)?, r.get(17)?, r.get(18)?);
                Ok((
                    sealed,
                    GenerationInfo {
                        row: r.get(0)?,
                        name: format!("{vm}@{time}"),
                        vm,
                        time,
                        manifest: row_id(&manifest, "generation's manifest")?,
                        uuid: r.get(4)?,
                        source: r.get(5)?,
                        started: r.get(6)?,
                        finished: r.get(7)?,
                        vmrepo_version: r.get(8)?,
                        virtual_bytes: r.get::<_, i64>(9)? as u64,
                        bytes_read: r.get::<_, i64>(10)? as u64,
                        bytes_new: r.get::<_, i64>(11)? as u64,
                        bytes_stored: r.get::<_, i64>(12)? as u64,
                        chunks_new: r.get::<_, i64>(13)? as u64,
                        files: r.get::<_, i64>(14)? as u64,
                        damaged: r.get(15)?,
                        disks: Vec::new(),
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        let rows: Vec<_> = rows
            .collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))?;
        let mut gens = Vec::with_capacity(rows.len());
        for ((vm_sealed, gen_sealed, damage_sealed), mut g) in rows {
            if let (Some(vs), Some(gs)) = (vm_sealed, gen_sealed) {
                self.unseal_generation(&mut g, &vs, &gs, damage_sealed.as_deref())?;
            }
            gens.push(g);
        }
        if self.keys.encrypted() {
            // Names were tags until unsealed: order by the real names.
            gens.sort_by(|a, b| (&a.vm, &a.time).cmp(&(&b.vm, &b.time)));
        }
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT slot, descriptor, create_type, virtual_size FROM disks WHERE generation = ?1 ORDER BY position",
            )
            .map_err(|e| self.err(e))?;
        for g in gens.iter_mut().filter(|_| !self.keys.encrypted()) {
            g.disks = st
                .query_map([g.row], |r| {
                    Ok(DiskInfo {
                        slot: r.get(0)?,
                        descriptor: r.get(1)?,
                        create_type: r.get(2)?,
                        virtual_size: r.get::<_, i64>(3)? as u64,
                    })
                })
                .map_err(|e| self.err(e))?
                .collect::<rusqlite::Result<_>>()
                .map_err(|e| self.err(e))?;
        }
        Ok(gens)
    }

    /// Resolves `VM`, `VM@latest`, `VM@-N` or `VM@TIME` to one generation.
    pub fn resolve(&self, spec: &str) -> Result<GenerationInfo> {
        let (vm, sel) = match spec.split_once('@') {
            Some((vm, sel)) => (vm, sel),
            None => (spec, "latest"),
        };
        let gens = self.generations(Some(vm))?;
        if gens.is_empty() {
            let known: Vec<String> = self.vms()?.into_iter().map(|v| v.name).collect();
            return Err(Error::NotFound(format!(
                "no VM named {vm:?} in the repository (VMs: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        let pick = if sel == "latest" || sel == "-0" {
            gens.last()
        } else if let Some(n) = sel.strip_prefix('-') {
            let n: usize = n.parse().map_err(|_| {
                Error::Usage(format!("bad generation {spec:?}: after '@-' give a number"))
            })?;
            gens.len().checked_sub(n + 1).and_then(|i| gens.get(i))
        } else {
            gens.iter().find(|g| g.time == sel)
        };
        pick.cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "VM {vm:?} has no generation {sel:?} ({} generations, {} .. {}; see `vmrepo list REPO {vm}`)",
                gens.len(),
                gens[0].time,
                gens[gens.len() - 1].time
            ))
        })
    }

    /// Every pack the index knows, with its recorded size.
    pub fn packs(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT name, size FROM packs ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// The repository this index was built for (`repository_id` of its config.toml), if it
    /// records one (indexes made before vmrepo recorded it do not, until first opened).
    pub fn repository_id(&self) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'repository_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records the repository this index belongs to (see [`Index::repository_id`]).
    pub fn set_repository_id(&self, id: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('repository_id', ?1)",
                [id],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// How many gc runs that deleted or rewrote packs this index has seen (meta `gc_epoch`;
    /// 0 when unset). See [`crate::repo::GC_EPOCH_FILE`].
    pub fn gc_epoch(&self) -> Result<u64> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'gc_epoch'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Records the gc epoch (see [`Index::gc_epoch`]).
    pub fn set_gc_epoch(&self, epoch: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('gc_epoch', ?1)",
                [epoch.to_string()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The ids of every indexed manifest and tombstone (few), in one pass over the objects.
    pub fn manifests_and_tombstones(&self) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        let mut st = self
            .conn
            .prepare("SELECT id, kind FROM all_objects WHERE kind IN (?1, ?2)")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(
                [ObjectKind::Manifest as u8, ObjectKind::Tombstone as u8],
                |r| {
                    Ok((
                        row_id(&r.get::<_, Vec<u8>>(0)?, "object id")?,
                        r.get::<_, u8>(1)?,
                    ))
                },
            )
            .map_err(|e| self.err(e))?;
        let (mut manifests, mut tombstones) = (Vec::new(), Vec::new());
        for r in rows {
            let (id, kind) = r.map_err(|e| self.err(e))?;
            if kind == ObjectKind::Manifest as u8 {
                manifests.push(id);
            } else {
                tombstones.push(id);
            }
        }
        Ok((manifests, tombstones))
    }

    /// Calls `f` for every object in the index, in pack and offset order.
    pub fn for_each_object(&self, mut f: impl FnMut(Location) -> Result<()>) -> Result<()> {
        let mut st = self
            .conn
            .prepare(
                "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len, o.id
                 FROM all_objects o JOIN packs p ON p.id = o.pack ORDER BY p.name, o.offset",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = st.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let id: Vec<u8> = r.get(6).map_err(|e| self.err(e))?;
            let id = row_id(&id, "object id").map_err(|e| self.err(e))?;
            f(row_location(r, id).map_err(|e| self.err(e))?)?;
        }
        Ok(())
    }

    /// Some object of the index, if it has any.
    pub fn first_object(&self) -> Result<Option<Location>> {
        self.conn
            .query_row(
                "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len, o.id
                 FROM all_objects o JOIN packs p ON p.id = o.pack LIMIT 1",
                [],
                |r| {
                    let id: Vec<u8> = r.get(6)?;
                    row_location(r, row_id(&id, "object id")?)
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Runs SQLite's own consistency check; returns its complaints.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("PRAGMA quick_check")
            .map_err(|e| self.err(e))?;
        let rows: Vec<String> = st
            .query_map([], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// Inserts a generation read back from its manifest (index rebuild), marked damaged with
    /// `damage` if something it references is gone.
    pub fn insert_rebuilt_generation(
        &mut self,
        manifest_id: ObjectId,
        m: &Manifest,
        damage: Option<&str>,
    ) -> Result<()> {
        self.commit_generation(manifest_id, m, &[], None)?;
        if let Some(d) = damage {
            let (text, sealed) = self.seal_damage(&m.catalog.vm, &m.catalog.time, d);
            self.conn
                .execute(
                    "INSERT OR REPLACE INTO damaged(generation, detail, sealed)
                     SELECT g.id, ?3, ?4 FROM generations g JOIN vms v ON v.id = g.vm
                     WHERE v.name = ?1 AND g.time = ?2",
                    params![
                        self.keys.name_tag(&m.catalog.vm),
                        m.catalog.time,
                        text,
                        sealed
                    ],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Updates the recorded size of a pack whose file is shorter (repair of a truncated pack).
    pub fn set_pack_size(&mut self, name: &str, size: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE packs SET size = ?2 WHERE name = ?1",
                params![name, size as i64],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Forgets a pack whose file is gone, with every object row in it (repair).
    pub fn forget_pack(&mut self, name: &str) -> Result<()> {
        self.apply_gc(&[name.to_string()], &[], &[])
    }

    /// Inserts segment cache rows (index rebuild).
    pub fn insert_cache(&mut self, cache: &[([u8; 32], ObjectId)]) -> Result<()> {
        let path = self.path.clone();
        let err = |e| Error::Index {
            path: path.clone(),
            cause: e,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO segment_cache(fingerprint, segment, mac) VALUES(?1, ?2, ?3)",
                )
                .map_err(err)?;
            for (fp, seg) in cache {
                st.execute(params![
                    &fp[..],
                    &seg.0[..],
                    &self.keys.cache_mac(fp, seg)[..]
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// The `detail` text and sealed blob stored for a damage note: the text itself when
    /// unencrypted; a placeholder and the sealed text otherwise (it names files and disks).
    fn seal_damage(&self, vm: &str, time: &str, detail: &str) -> (String, Option<Vec<u8>>) {
        if self.keys.encrypted() {
            let aad = format!("damaged|{}|{time}", self.keys.name_tag(vm));
            (
                "damaged (sealed)".into(),
                Some(self.keys.seal(aad.as_bytes(), detail.as_bytes())),
            )
        } else {
            (detail.to_string(), None)
        }
    }

    fn unseal_generation(
        &self,
        g: &mut GenerationInfo,
        vm_sealed: &[u8],
        gen_sealed: &[u8],
        damage_sealed: Option<&[u8]>,
    ) -> Result<()> {
        let tag = g.vm.clone();
        let what = format!("index entry of the generation at {}", g.time);
        let name = self
            .keys
            .open(format!("vm|{tag}").as_bytes(), vm_sealed, &what)?;
        let aad = format!("gen|{tag}|{}|{}", g.time, g.manifest.to_hex());
        let info = self.keys.open(aad.as_bytes(), gen_sealed, &what)?;
        let info: SealedGeneration =
            serde_json::from_slice(&info).map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
        let vm =
            String::from_utf8(name).map_err(|_| Error::Corrupt(format!("{what}: bad name")))?;
        if info.vm != vm {
            return Err(Error::Corrupt(format!("{what}: names another VM")));
        }
        if let Some(d) = damage_sealed {
            let aad = format!("damaged|{tag}|{}", g.time);
            let d = self.keys.open(aad.as_bytes(), d, &what)?;
            g.damaged = Some(String::from_utf8_lossy(&d).into_owned());
        }
        g.name = format!("{vm}@{}", g.time);
        g.vm = vm;
        g.uuid = info.uuid;
        g.source = info.source;
        g.started = info.started;
        g.finished = info.finished;
        g.vmrepo_version = info.version;
        g.virtual_bytes = info.virtual_bytes;
        g.bytes_read = info.bytes_read;
        g.bytes_new = info.bytes_new;
        g.bytes_stored = info.bytes_stored;
        g.chunks_new = info.chunks_new;
        g.files = info.files;
        g.disks = info.disks;
        Ok(())
    }

    /// Rebuilds the database file when more than a quarter of it is free pages (after gc removed
    /// many rows), so the space returns to the filesystem. Needs the repository to itself.
    pub fn vacuum_if_sparse(&self) -> Result<()> {
        let (free, total): (i64, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT freelist_count FROM pragma_freelist_count), \
                        (SELECT page_count FROM pragma_page_count)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        if total > 0 && free * 4 > total {
            self.conn
                .execute_batch("VACUUM;")
                .map_err(|e| self.err(e))?;
            self.checkpoint();
        }
        Ok(())
    }

    /// Folds the WAL into the database file (keeps the repository compact between runs).
    /// Never waits: if another process is reading, the WAL is left for a later checkpoint.
    pub fn checkpoint(&self) {
        let _ = self.conn.busy_timeout(Duration::ZERO);
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
        let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
    }
}

fn insert_pack(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    size: u64,
    records: &[(RecordHeader, u64)],
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO packs(name, size) VALUES(?1, ?2)",
        params![name, size as i64],
    )?;
    let pack = tx.last_insert_rowid();
    // New rows go to the small recent table (cheap to insert into: few pages), never twice.
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO recent_objects(id, kind, codec, pack, offset, stored_len, raw_len)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
         WHERE NOT EXISTS(SELECT 1 FROM objects WHERE id = ?1)",
    )?;
    for (h, offset) in records {
        st.execute(params![
            &h.id.0[..],
            h.kind as u8,
            h.codec_byte(),
            pack,
            *offset as i64,
            h.stored_len,
            h.raw_len
        ])?;
    }
    Ok(())
}

/// A damaged index row, reported as such (never read as something else).
fn bad_row(what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Blob,
        format!(
            "damaged index row: {what}; `vmrepo check --rebuild-index` rebuilds the index from \
             the data files"
        )
        .into(),
    )
}

/// A 32-byte id from an index column.
fn row_id(raw: &[u8], what: &str) -> rusqlite::Result<ObjectId> {
    ObjectId::from_slice(raw)
        .ok_or_else(|| bad_row(format!("a {what} of {} bytes, not 32", raw.len())))
}

fn row_location(r: &rusqlite::Row<'_>, id: ObjectId) -> rusqlite::Result<Location> {
    let kind: u8 = r.get(0)?;
    let codec_byte: u8 = r.get(1)?;
    if codec_byte & !0x1f != 0 || codec_byte & 0x0f > 1 {
        return Err(bad_row(format!(
            "object {} has codec byte {codec_byte:#x}",
            id.short()
        )));
    }
    let (codec, encrypted) = RecordHeader::from_codec_byte(codec_byte);
    let offset: i64 = r.get(3)?;
    if offset < 0 {
        return Err(bad_row(format!("object {} at offset {offset}", id.short())));
    }
    Ok(Location {
        pack: r.get(2)?,
        offset: offset as u64,
        header: RecordHeader {
            kind: ObjectKind::from_u8(kind)
                .ok_or_else(|| bad_row(format!("object {} has kind {kind}", id.short())))?,
            codec,
            encrypted,
            stored_len: r.get(4)?,
            raw_len: r.get(5)?,
            id,
        },
    })
}

fn insert_generation(
    tx: &rusqlite::Transaction<'_>,
    keys: &Keys,
    manifest_id: ObjectId,
    m: &Manifest,
) -> rusqlite::Result<()> {
    let c = &m.catalog;
    let tag = keys.name_tag(&c.vm);
    let vm_sealed = keys
        .encrypted()
        .then(|| keys.seal(format!("vm|{tag}").as_bytes(), c.vm.as_bytes()));
    tx.execute(
        "INSERT OR IGNORE INTO vms(name, sealed) VALUES(?1, ?2)",
        params![tag, vm_sealed],
    )?;
    let vm: i64 = tx.query_row("SELECT id FROM vms WHERE name = ?1", [&tag], |r| r.get(0))?;
    if keys.encrypted() {
        // Only what ordering and lookups need stays in the clear: the VM's keyed tag, the
        // time and the manifest id; the rest is sealed and bound to those.
        let info = SealedGeneration {
            vm: c.vm.clone(),
            uuid: c.uuid.clone(),
            source: c.source.clone(),
            started: c.started.clone(),
            finished: c.finished.clone(),
            version: c.vmrepo_version.clone(),
            virtual_bytes: c.stats.virtual_bytes,
            bytes_read: c.stats.bytes_read,
            bytes_new: c.stats.bytes_new,
            bytes_stored: c.stats.bytes_stored,
            chunks_new: c.stats.chunks_new,
            files: m.files.len() as u64,
            disks: m
                .disks
                .iter()
                .map(|d| DiskInfo {
                    slot: d.slot.clone(),
                    descriptor: d.descriptor.clone(),
                    create_type: d.create_type.clone(),
                    virtual_size: d.virtual_size,
                })
                .collect(),
        };
        let aad = format!("gen|{tag}|{}|{}", c.time, manifest_id.to_hex());
        let sealed = keys.seal(
            aad.as_bytes(),
            &serde_json::to_vec(&info).expect("serializable"),
        );
        tx.execute(
            "INSERT INTO generations(vm, time, manifest, uuid, source, started, finished, version,
                virtual_bytes, bytes_read, bytes_new, bytes_stored, chunks_new, sealed)
             VALUES(?1, ?2, ?3, NULL, '', '', '', '', 0, 0, 0, 0, 0, ?4)",
            params![vm, c.time, &manifest_id.0[..], sealed],
        )?;
        return Ok(());
    }
    tx.execute(
        "INSERT INTO generations(vm, time, manifest, uuid, source, started, finished, version,
            virtual_bytes, bytes_read, bytes_new, bytes_stored, chunks_new)
         VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            vm,
            c.time,
            &manifest_id.0[..],
            c.uuid,
            c.source,
            c.started,
            c.finished,
            c.vmrepo_version,
            c.stats.virtual_bytes as i64,
            c.stats.bytes_read as i64,
            c.stats.bytes_new as i64,
            c.stats.bytes_stored as i64,
            c.stats.chunks_new as i64
        ],
    )?;
    let gen = tx.last_insert_rowid();
    for (i, d) in m.disks.iter().enumerate() {
        tx.execute(
            "INSERT INTO disks(generation, position, slot, descriptor, create_type, virtual_size, disk_map)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![gen, i as i64, d.slot, d.descriptor, d.create_type, d.virtual_size as i64, &d.disk_map.0[..]],
        )?;
    }
    for f in &m.files {
        tx.execute(
            "INSERT INTO files(generation, name, object, size) VALUES(?1, ?2, ?3, ?4)",
            params![gen, f.name, &f.object.0[..], f.size as i64],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closing any descriptor of the database file drops this process's SQLite locks on it
    /// (see [`HELD_DESCRIPTORS`]). Outside this module, the index file may only be named to
    /// hand it to `Index::open`; any other use of its name or path (a read-ahead hint, a size
    /// probe, a copy) must come here and go through `held_descriptor`.
    #[test]
    fn index_file_is_opened_only_by_sqlite_and_here() {
        let mut offenders = Vec::new();
        for f in crate::tests::rust_sources() {
            if f.components().any(|c| c.as_os_str() == "index") {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                let names_index = line.contains("INDEX_FILE")
                    || line.contains("index_path(")
                    || line.contains("\"index.sqlite");
                let allowed = line.contains("Index::open(")
                    || line.contains("Index::open_for_reading(")
                    || line.contains("pub use crate::repo::index::INDEX_FILE")
                    || line.trim_start().starts_with("//")
                    || line.contains("fn index_path(")
                    || line.contains("crate::repo::index::index_path(&self.index_dir)");
                if names_index && !allowed {
                    offenders.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "the index file is named outside Index::open:\n{}",
            offenders.join("\n")
        );
    }

    /// A damaged row is reported as damaged, never read as something else (an unknown kind
    /// used to become a chunk, a short id the all-zero id).
    #[test]
    fn damaged_rows_are_reported_not_coerced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INDEX_FILE);
        let mut idx = Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        let header = RecordHeader {
            kind: ObjectKind::Chunk,
            codec: crate::repo::object::Codec::Raw,
            encrypted: false,
            stored_len: 10,
            raw_len: 10,
            id: ObjectId([7; 32]),
        };
        idx.add_pack("p1", 100, &[(header, 16)]).unwrap();
        let count = |idx: &Index| {
            let mut n = 0;
            idx.for_each_object(|_| {
                n += 1;
                Ok(())
            })
            .map(|()| n)
        };
        assert_eq!(count(&idx).unwrap(), 1);
        for (sql, want) in [
            ("UPDATE recent_objects SET kind = 9", "has kind 9"),
            (
                "UPDATE recent_objects SET kind = 1, id = x'0102'",
                "of 2 bytes, not 32",
            ),
        ] {
            idx.conn.execute_batch(sql).unwrap();
            let e = count(&idx).unwrap_err().to_string();
            assert!(e.contains("damaged index row") && e.contains(want), "{e}");
        }
    }
}
