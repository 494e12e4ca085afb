//! The SQLite index (`index.sqlite`, WAL): where every object lives (`objects.rs`), the segment
//! cache (`segments.rs`), and the catalog of VMs and generations (`catalog.rs`); the file and its
//! schema (`file.rs`, `schema.rs`). Everything in it can be rebuilt from the pack files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, Result};
use crate::repo::crypto::Keys;
use crate::repo::id::ObjectId;

/// How long a writer waits for another process's transaction to end.
const BUSY_TIMEOUT: Duration = Duration::from_secs(600);

mod catalog;
mod file;
mod objects;
mod schema;
mod segments;

pub use catalog::{DiskInfo, GenerationInfo, VmInfo};
pub use file::{
    fresh_rebuild_path, index_exists, index_path, prefetch_file, replace_live,
    small_next_to_memory, INDEX_FILE,
};
pub use objects::{Location, ObjectRow, SealedPack};
pub use schema::{MERGE_MIN, MERGE_SHARE, SCHEMA_VERSION};
pub use segments::CacheRow;

/// An open index.
pub struct Index {
    conn: Connection,
    path: PathBuf,
    keys: Arc<Keys>,
    /// Rows of the main object table as last counted (merges add to it), to decide merges
    /// without counting a large table after every pack.
    main_rows: Option<u64>,
    /// Rows of the recent object table as last counted, plus what this process inserted since:
    /// a rebuild adds thousands of packs, and counting the table after each one read it whole
    /// each time (the rebuild's time grew with the square of the repository).
    recent_rows: Option<u64>,
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
            recent_rows: None,
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
                recent_rows: None,
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

    pub(super) fn err(&self, e: rusqlite::Error) -> Error {
        Error::Index {
            path: self.path.clone(),
            cause: e,
        }
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one immediate (write) transaction and commits it; errors name the index.
    pub(super) fn write(
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

    /// Runs `f`, a run of reads, inside one read transaction: its queries share one snapshot
    /// and one lock instead of each starting and ending its own (a lookup of a chunk spent a
    /// quarter of its time there). Inside a transaction already, `f` just runs in it.
    pub fn reading<T>(&self, f: impl FnOnce(&Index) -> Result<T>) -> Result<T> {
        if !self.conn.is_autocommit() {
            return f(self);
        }
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .map_err(|e| self.err(e))?;
        let result = f(self);
        // Ends a read transaction: nothing to write, so it cannot lose anything. A connection
        // must never go back to the pool inside one, where every later read would see this
        // snapshot.
        let ended = self.conn.execute_batch("COMMIT").map_err(|e| self.err(e));
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let value = result?;
        ended?;
        Ok(value)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::object::{ObjectKind, RecordHeader};

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
            base: None,
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
