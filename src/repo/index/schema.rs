//! The index schema and its migrations: the tables, the version stored in `meta`, and the
//! in-place upgrades from earlier versions.

use rusqlite::OptionalExtension;

use super::{Index, BUSY_TIMEOUT};
use crate::error::{Error, Result};

/// Drops segment-cache and segment-leaves rows whose segment object is gone.
pub(super) fn forget_gone_segments(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM segment_cache WHERE segment NOT IN (SELECT id FROM all_objects)",
        [],
    )?;
    tx.execute(
        "DELETE FROM segment_leaves WHERE segment NOT IN (SELECT id FROM all_objects)",
        [],
    )?;
    Ok(())
}

/// Schema version stored in `meta`. Versions 1 (no `damaged` table), 2 (no sealed columns,
/// no segment-cache check) and 3 (no recent objects, no segment leaves) are upgraded in place.
pub const SCHEMA_VERSION: i64 = 4;

/// The object index is two tables. Each ingest inserts into `recent_objects`, which stays small
/// so an ingest dirties few pages; inserting random ids straight into the large `objects`
/// table would rewrite a page of it for almost every new object. The recent rows move into
/// `objects` in one sorted pass once they are at least [`MERGE_MIN`] and at least
/// 1/[`MERGE_SHARE`] of the main table, so each page of it is rewritten once per such batch.
pub const MERGE_MIN: u64 = 1 << 16;
/// See [`MERGE_MIN`].
pub const MERGE_SHARE: u64 = 8;

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
    raw_len INTEGER NOT NULL) WITHOUT ROWID;
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
    raw_len INTEGER NOT NULL) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS all_objects AS
    SELECT * FROM objects UNION ALL SELECT * FROM recent_objects;
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
                    .execute(
                        "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?1)",
                        [SCHEMA_VERSION.to_string()],
                    )
                    .map_err(|e| self.err(e))?;
            }
            Some(v) if v.parse::<i64>().ok() == Some(SCHEMA_VERSION) => {}
            Some(v) if v == "1" || v == "2" || v == "3" => {
                // Versions 2 to 4 only add tables and nullable columns. Cache rows without a
                // check value are dropped: they are re-learned by the next ingest.
                self.conn.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
                for (table, column) in [
                    ("vms", "sealed"),
                    ("generations", "sealed"),
                    ("damaged", "sealed"),
                    ("segment_cache", "mac"),
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
                self.conn
                    .execute_batch("DELETE FROM segment_cache WHERE mac IS NULL")
                    .map_err(|e| self.err(e))?;
                self.conn
                    .execute(
                        "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                        [SCHEMA_VERSION.to_string()],
                    )
                    .map_err(|e| self.err(e))?;
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
}
