//! The index schema and its migrations: the tables, the version stored in `meta`, and the
//! in-place upgrades from earlier versions.

use rusqlite::OptionalExtension;

use super::{Index, BUSY_TIMEOUT};
use crate::error::{Error, Result};

/// Drops segment-cache and segment-leaves rows whose segment object is gone, and what the
/// index remembers of tombstones that are gone.
///
/// Each row is looked up in both object tables by primary key. (`NOT IN (SELECT id FROM
/// all_objects)` had SQLite copy every object id of the index into a temporary B-tree first:
/// 31% of a gc that deleted nothing at 64 GiB, and 2 GB of temporary storage at 1 TiB.)
pub(super) fn forget_gone_segments(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for (table, column) in [
        ("tombstone_names", "tombstone"),
        ("segment_cache", "segment"),
        ("segment_leaves", "segment"),
    ] {
        tx.execute(
            &format!(
                "DELETE FROM {table} WHERE
                     NOT EXISTS (SELECT 1 FROM objects WHERE id = {table}.{column})
                     AND NOT EXISTS (SELECT 1 FROM recent_objects WHERE id = {table}.{column})"
            ),
            [],
        )?;
    }
    Ok(())
}

/// Schema version stored in `meta`. Versions 1 (no `damaged` table), 2 (no sealed columns,
/// no segment-cache check), 3 (no recent objects, no segment leaves), 4 (no index of
/// manifests and tombstones, no `tombstone_names`) and 5 (no `base` of an object row) are
/// upgraded in place.
pub const SCHEMA_VERSION: i64 = 6;

/// The object index is two tables. Each ingest inserts into `recent_objects`, which stays small
/// so an ingest dirties few pages; inserting random ids straight into the large `objects`
/// table would rewrite a page of it for almost every new object. The recent rows move into
/// `objects` in one sorted pass once they are at least [`MERGE_MIN`] and at least
/// 1/[`MERGE_SHARE`] of the main table, so each page of it is rewritten once per such batch.
pub const MERGE_MIN: u64 = 1 << 16;
/// See [`MERGE_MIN`].
pub const MERGE_SHARE: u64 = 8;

/// Indexes of the delta rows alone (a few of all rows), for the passes of gc, check and stats
/// over the deltas' bases; made after the `base` columns exist.
const DELTA_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS objects_deltas ON objects(id) WHERE base IS NOT NULL;
CREATE INDEX IF NOT EXISTS recent_objects_deltas ON recent_objects(id) WHERE base IS NOT NULL;
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects(
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    pack INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    base BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segment_cache(
    fingerprint BLOB PRIMARY KEY,
    segment BLOB NOT NULL,
    mac BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recent_objects(
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    pack INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,
    stored_len INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    base BLOB) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS all_objects AS
    SELECT * FROM objects UNION ALL SELECT * FROM recent_objects;
CREATE INDEX IF NOT EXISTS objects_metadata ON objects(kind) WHERE kind IN (5, 6);
CREATE INDEX IF NOT EXISTS recent_objects_metadata ON recent_objects(kind) WHERE kind IN (5, 6);
CREATE TABLE IF NOT EXISTS tombstone_names(
    tombstone BLOB PRIMARY KEY,
    manifests BLOB NOT NULL,
    mac BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segment_leaves(
    segment BLOB NOT NULL UNIQUE,
    leaves BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vms(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    sealed BLOB);
CREATE TABLE IF NOT EXISTS generations(
    id INTEGER PRIMARY KEY,
    vm INTEGER NOT NULL REFERENCES vms(id),
    time TEXT NOT NULL,
    manifest BLOB NOT NULL,
    uuid TEXT,
    source TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT NOT NULL,
    version TEXT NOT NULL,
    virtual_bytes INTEGER NOT NULL,
    bytes_read INTEGER NOT NULL,
    bytes_new INTEGER NOT NULL,
    bytes_stored INTEGER NOT NULL,
    chunks_new INTEGER NOT NULL,
    sealed BLOB,
    UNIQUE(vm, time));
CREATE TABLE IF NOT EXISTS disks(
    generation INTEGER NOT NULL REFERENCES generations(id),
    position INTEGER NOT NULL,
    slot TEXT NOT NULL,
    descriptor TEXT,
    create_type TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    disk_map BLOB NOT NULL,
    PRIMARY KEY(generation, position));
CREATE TABLE IF NOT EXISTS files(
    generation INTEGER NOT NULL REFERENCES generations(id),
    name TEXT NOT NULL,
    object BLOB NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY(generation, name));
CREATE TABLE IF NOT EXISTS damaged(
    generation INTEGER PRIMARY KEY REFERENCES generations(id),
    detail TEXT NOT NULL,
    sealed BLOB);
";

impl Index {
    pub(super) fn setup(&self) -> Result<()> {
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| self.err(e))?;
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| self.err(e))?;
        self.conn
            .execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(|e| self.err(e))?;
        let version: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .or_else(|e| match e {
                rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => {
                    Ok(None)
                }
                e => Err(e),
            })
            .map_err(|e| self.err(e))?;
        match version {
            None => {
                self.conn.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
                self.conn
                    .execute_batch(DELTA_INDEXES)
                    .map_err(|e| self.err(e))?;
                self.conn
                    .execute(
                        "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?1)",
                        [SCHEMA_VERSION.to_string()],
                    )
                    .map_err(|e| self.err(e))?;
            }
            Some(v) if v.parse::<i64>().ok() == Some(SCHEMA_VERSION) => {}
            Some(v) if ["1", "2", "3", "4", "5"].contains(&v.as_str()) => {
                self.conn
                    .execute_batch("BEGIN IMMEDIATE")
                    .map_err(|e| self.err(e))?;
                let migrated = self.migrate();
                let end = if migrated.is_ok() {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                let ended = self.conn.execute_batch(end).map_err(|e| self.err(e));
                migrated.and(ended)?;
            }
            Some(v) => {
                return Err(Error::Corrupt(format!(
                    "index {} has schema version {v}, this vmrepo knows {SCHEMA_VERSION}",
                    self.path.display()
                )))
            }
        }
        Ok(())
    }

    /// Upgrades an index of an earlier schema version in place (inside the caller's
    /// transaction). Versions 2 to 6 only add tables, indexes and nullable columns. Cache rows
    /// without a check value are dropped: they are re-learned by the next ingest.
    fn migrate(&self) -> Result<()> {
        self.conn.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
        // The view over both object tables is made again once both have their new columns.
        self.conn
            .execute_batch("DROP VIEW IF EXISTS all_objects")
            .map_err(|e| self.err(e))?;
        for (table, column) in [
            ("vms", "sealed"),
            ("generations", "sealed"),
            ("damaged", "sealed"),
            ("segment_cache", "mac"),
            ("objects", "base"),
            ("recent_objects", "base"),
        ] {
            let has: bool = self
                .conn
                .query_row(
                    "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
                    [table, column],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(|e| self.err(e))?
                > 0;
            if !has {
                self.conn
                    .execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} BLOB"))
                    .map_err(|e| self.err(e))?;
            }
        }
        self.conn.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
        self.conn
            .execute_batch(DELTA_INDEXES)
            .map_err(|e| self.err(e))?;
        self.conn
            .execute_batch("DELETE FROM segment_cache WHERE mac IS NULL")
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                [SCHEMA_VERSION.to_string()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rusqlite::Connection;

    use super::*;
    use crate::repo::crypto::Keys;
    use crate::repo::id::ObjectId;

    /// An index as schema version `version` left it: today's tables without what versions 5
    /// and 6 added, and before version 4 without the columns version 4 added, holding one pack
    /// with one object, one generation with a disk and a file, and one segment-cache row.
    fn old_index(path: &std::path::Path, version: &str) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c.execute_batch(
            "DROP INDEX objects_metadata; DROP INDEX recent_objects_metadata;
             DROP TABLE tombstone_names;",
        )
        .unwrap();
        let v4_columns = [
            ("vms", "sealed"),
            ("generations", "sealed"),
            ("damaged", "sealed"),
            ("segment_cache", "mac"),
        ];
        c.execute_batch("DROP VIEW all_objects").unwrap();
        for (table, column) in v4_columns
            .iter()
            .chain(&[("objects", "base"), ("recent_objects", "base")])
        {
            c.execute_batch(&format!("ALTER TABLE {table} DROP COLUMN {column}"))
                .unwrap();
        }
        c.execute_batch(
            "CREATE VIEW all_objects AS SELECT * FROM objects UNION ALL SELECT * FROM recent_objects",
        )
        .unwrap();
        c.execute_batch(&format!(
            "INSERT INTO meta VALUES('schema_version', '{version}');
             INSERT INTO packs VALUES(1, 'aa', 4096);
             INSERT INTO objects VALUES(x'{id}', 1, 1, 1, 16, 100, 200);
             INSERT INTO segment_cache VALUES(x'{fp}', x'{id}');
             INSERT INTO vms VALUES(1, 'web01');
             INSERT INTO generations VALUES(1, 1, '2026-11-01T00:00:00Z', x'{id}', 'u-1',
                 '/vmfs/web01', 's', 'f', '0.1.0', 1000, 900, 800, 700, 6);
             INSERT INTO disks VALUES(1, 0, 'scsi0:0', 'web01.vmdk', 'vmfs', 1000, x'{id}');
             INSERT INTO files VALUES(1, 'web01.vmx', x'{id}', 12);",
            id = "11".repeat(32),
            fp = "22".repeat(32),
        ))
        .unwrap();
        if version == "4" || version == "5" {
            for (table, column) in v4_columns {
                c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} BLOB"))
                    .unwrap();
            }
        }
    }

    #[test]
    fn versions_1_to_5_are_migrated_in_place_and_keep_their_rows() {
        for version in ["1", "2", "3", "4", "5"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("index.sqlite");
            old_index(&path, version);
            let idx = Index::open(&path, false, Arc::new(Keys::none())).unwrap();
            let v: String = idx
                .conn
                .query_row(
                    "SELECT value FROM meta WHERE key='schema_version'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(v, SCHEMA_VERSION.to_string(), "from version {version}");
            // Objects and packs are read as before.
            let loc = idx.lookup(&ObjectId([0x11; 32])).unwrap().unwrap();
            assert_eq!((loc.pack.as_str(), loc.offset), ("aa", 16));
            assert_eq!((loc.header.stored_len, loc.header.raw_len), (100, 200));
            assert_eq!(idx.packs().unwrap(), [("aa".to_string(), 4096)]);
            // The catalog too.
            let gens = idx.generations(None).unwrap();
            assert_eq!(gens.len(), 1);
            let g = &gens[0];
            assert_eq!(g.name, "web01@2026-11-01T00:00:00Z");
            assert_eq!((g.virtual_bytes, g.bytes_stored, g.files), (1000, 700, 1));
            assert_eq!(g.disks[0].slot, "scsi0:0");
            assert!(g.damaged.is_none());
            // Cache rows without a MAC cannot be trusted and are dropped.
            assert_eq!(idx.cached_segment(&[0x22; 32]).unwrap(), None);
            drop(idx);
            // A second open finds the current version and changes nothing.
            let idx = Index::open(&path, false, Arc::new(Keys::none())).unwrap();
            assert_eq!(idx.generations(None).unwrap().len(), 1);
        }
    }

    #[test]
    fn an_index_from_a_newer_vmrepo_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        old_index(&path, "9");
        let e = Index::open(&path, false, Arc::new(Keys::none()))
            .err()
            .expect("version 9 is refused")
            .to_string();
        assert!(
            e.contains("schema version 9") && e.contains("knows 6"),
            "{e}"
        );
        let c = Connection::open(&path).unwrap();
        let has_mac: i64 = c
            .query_row(
                "SELECT count(*) FROM pragma_table_info('segment_cache') WHERE name = 'mac'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(has_mac, 0, "no column was added to a newer index");
    }
}
