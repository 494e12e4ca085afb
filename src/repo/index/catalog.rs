//! The catalog: VMs and their generations (sealed when the repository is encrypted), damage
//! notes, and adding and removing generations.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::crypto::Keys;
use crate::repo::id::ObjectId;
use crate::repo::manifest::Manifest;
use crate::repo::object::ObjectKind;

use super::objects::insert_pack;
use super::segments::{forget_leaves, insert_cache_rows};
use super::{row_id, CacheRow, Index, SealedPack};

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

impl Index {
    /// Prune: in one transaction, records the sealed pack holding the tombstone (if any) and
    /// removes the generations with their disks, files and damage notes.
    pub fn remove_generations(
        &mut self,
        tombstone_pack: Option<&SealedPack>,
        gens: &[GenerationInfo],
    ) -> Result<()> {
        self.recent_rows = None;
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

    /// Makes a generation visible: one transaction adds it, its disks, files and segment cache
    /// rows, and forgets the kept leaves of the segments it `replaced` (see
    /// `ingest::superseded`). Every object it references must already be in the index.
    ///
    /// `last_pack`, the sealed pack holding the manifest, is recorded in the same transaction:
    /// a manifest is never indexed without its generation, so an indexed manifest that no
    /// generation lists is always a sign of a damaged index (see the survey in maintain/coverage.rs).
    pub fn commit_generation(
        &mut self,
        manifest_id: ObjectId,
        m: &Manifest,
        cache: &[CacheRow],
        replaced: &[ObjectId],
        last_pack: Option<&SealedPack>,
    ) -> Result<()> {
        let keys = self.keys.clone();
        self.recent_rows = None;
        let duplicate = std::cell::Cell::new(false);
        let written = self.write(|tx| {
            if let Some(p) = last_pack {
                insert_pack(tx, &p.name, p.size, &p.records)?;
            }
            insert_generation(tx, &keys, manifest_id, m).inspect_err(|e| {
                if let rusqlite::Error::SqliteFailure(f, _) = e {
                    duplicate.set(f.code == rusqlite::ErrorCode::ConstraintViolation);
                }
            })?;
            insert_cache_rows(tx, &keys, cache)?;
            forget_leaves(tx, replaced)
        });
        if duplicate.get() {
            return Err(Error::Usage(format!(
                "VM {} already has a generation at {}",
                m.catalog.vm, m.catalog.time
            )));
        }
        written
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

    /// The ids of every indexed manifest and tombstone (few among many objects: read through
    /// the partial indexes on their kinds, not a pass over every object).
    pub fn manifests_and_tombstones(&self) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        // The kinds are literals: a partial index is used only for the condition it was made
        // with, written out (see schema.rs).
        const _: () = assert!(ObjectKind::Manifest as u8 == 5 && ObjectKind::Tombstone as u8 == 6);
        let mut st = self
            .conn
            .prepare(
                "SELECT id, kind FROM objects WHERE kind IN (5, 6)
                 UNION ALL SELECT id, kind FROM recent_objects WHERE kind IN (5, 6)",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    row_id(&r.get::<_, Vec<u8>>(0)?, "object id")?,
                    r.get::<_, u8>(1)?,
                ))
            })
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

    /// The manifests tombstone `id` names, as remembered from an earlier read (a tombstone
    /// never changes: its id is its content's hash); `None` when not remembered, or when the
    /// row's check value does not match (a damaged or forged row is not trusted).
    pub fn tombstone_names(&self, id: &ObjectId) -> Result<Option<Vec<ObjectId>>> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT manifests, mac FROM tombstone_names WHERE tombstone = ?1")
            .and_then(|mut st| {
                st.query_row([&id.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        let Some((manifests, mac)) = row else {
            return Ok(None);
        };
        if manifests.len() % 32 != 0 || mac != self.keys.tombstone_mac(id, &manifests) {
            return Ok(None);
        }
        Ok(Some(
            manifests
                .chunks_exact(32)
                .map(|c| ObjectId(c.try_into().expect("32 bytes")))
                .collect(),
        ))
    }

    /// Remembers the manifests tombstone `id` names (see [`Index::tombstone_names`]).
    pub fn remember_tombstone(&self, id: &ObjectId, manifests: &[ObjectId]) -> Result<()> {
        let joined: Vec<u8> = manifests.iter().flat_map(|m| m.0).collect();
        let mac = self.keys.tombstone_mac(id, &joined);
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO tombstone_names(tombstone, manifests, mac) VALUES(?1, ?2, ?3)",
            )
            .and_then(|mut st| st.execute(params![&id.0[..], joined, &mac[..]]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Inserts a generation read back from its manifest (index rebuild), marked damaged with
    /// `damage` if something it references is gone.
    pub fn insert_rebuilt_generation(
        &mut self,
        manifest_id: ObjectId,
        m: &Manifest,
        damage: Option<&str>,
    ) -> Result<()> {
        self.commit_generation(manifest_id, m, &[], &[], None)?;
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

    /// The `detail` text and sealed blob stored for a damage note: the text itself when
    /// unencrypted; a placeholder and the sealed text otherwise (it names files and disks).
    pub(super) fn seal_damage(
        &self,
        vm: &str,
        time: &str,
        detail: &str,
    ) -> (String, Option<Vec<u8>>) {
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

    pub(super) fn unseal_generation(
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
}

pub(super) fn insert_generation(
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
