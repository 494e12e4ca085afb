//! Where objects live: the object tables (recent and main, merged in batches), the packs,
//! and what gc and repair change in them.

use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::repo::id::ObjectId;
use crate::repo::object::{Codec, ObjectKind, RecordHeader};

use super::schema::{forget_gone_segments, MERGE_MIN, MERGE_SHARE};
use super::{bad_row, row_id, Index};

/// One object's row as the main object table holds it: the record header's fields, the row of
/// the pack holding it and its offset there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRow {
    /// Content address.
    pub id: ObjectId,
    /// [`ObjectKind`] as stored.
    pub kind: u8,
    /// [`RecordHeader::codec_byte`].
    pub codec: u8,
    /// Row of its pack in `packs`.
    pub pack: i64,
    /// Offset of its record in the pack.
    pub offset: u64,
    /// Stored payload length.
    pub stored_len: u32,
    /// Plaintext length.
    pub raw_len: u32,
    /// The chunk a delta is stored against.
    pub base: Option<ObjectId>,
}

impl ObjectRow {
    /// The row of the record `h` at `offset` of the pack whose row is `pack`.
    pub fn new(h: &RecordHeader, pack: i64, offset: u64) -> ObjectRow {
        ObjectRow {
            id: h.id,
            kind: h.kind as u8,
            codec: h.codec_byte(),
            pack,
            offset,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
            base: h.base,
        }
    }
}

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

impl Index {
    /// Where object `id` is stored, if the index knows it.
    pub fn lookup(&self, id: &ObjectId) -> Result<Option<Location>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len, o.id, o.base
                 FROM (SELECT * FROM recent_objects WHERE id = ?1
                       UNION ALL SELECT * FROM objects WHERE id = ?1) o
                 JOIN packs p ON p.id = o.pack LIMIT 1",
            )
            .map_err(|e| self.err(e))?;
        st.query_row([&id.0[..]], |r| row_location(r, *id))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The length object `id` decodes to, if the index knows it: all that check's walk of the
    /// references asks of each chunk (check reads every row whole in its pass over them), without
    /// the join of [`Index::lookup`].
    pub fn raw_len(&self, id: &ObjectId) -> Result<Option<u32>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT raw_len FROM recent_objects WHERE id = ?1
                 UNION ALL SELECT raw_len FROM objects WHERE id = ?1 LIMIT 1",
            )
            .map_err(|e| self.err(e))?;
        st.query_row([&id.0[..]], |r| r.get(0))
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
        // A forced merge counts: another process may have added rows since.
        let recent = match self.recent_rows {
            Some(n) if !force => n,
            _ => self.count_recent_rows()?,
        };
        self.recent_rows = Some(recent);
        if recent == 0 || (!force && recent < MERGE_MIN) {
            return Ok(0);
        }
        let main = match self.main_rows {
            Some(n) => n,
            None => self.main_rows_hint()?,
        };
        self.main_rows = Some(main);
        if !force && recent < main / MERGE_SHARE {
            return Ok(0);
        }
        let mut moved = 0;
        self.write(|tx| {
            moved = tx.execute(
                "INSERT OR IGNORE INTO objects SELECT * FROM recent_objects ORDER BY id",
                [],
            )? as u64;
            tx.execute("DELETE FROM recent_objects", [])?;
            set_main_rows(tx, main + moved)
        })?;
        self.main_rows = Some(main + moved);
        self.recent_rows = Some(0);
        Ok(recent)
    }

    /// The rows of `recent_objects`, counted (a read of the whole table).
    fn count_recent_rows(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM recent_objects", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// The rows of `objects` as `meta` remembers them (see [`MAIN_ROWS_KEY`]); counted, and
    /// remembered, when it does not. Counting reads the whole table: at 67 million rows, about
    /// a second with the file in memory, much longer without.
    fn main_rows_hint(&mut self) -> Result<u64> {
        if let Some(n) = self.remembered_main_rows()? {
            return Ok(n);
        }
        let n = self.count_main_rows()?;
        // Best effort: a read-only index counts again next time.
        let _ = self.write(|tx| set_main_rows(tx, n));
        Ok(n)
    }

    /// The rows of `objects` as `meta` remembers them, if it does and the value is possible.
    fn remembered_main_rows(&self) -> Result<Option<u64>> {
        let known: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [MAIN_ROWS_KEY],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        // More rows than the file could hold (a row takes more than its 32-byte id) is a value
        // no merge wrote: counted again, lest the recent rows never merge.
        let most = self
            .conn
            .query_row(
                "SELECT page_count * page_size / 32 FROM pragma_page_count(), pragma_page_size()",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| self.err(e))? as u64;
        Ok(known
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n <= most))
    }

    /// The rows of `objects`, counted (a read of the whole table).
    fn count_main_rows(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM objects", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// About how many objects the index lists, for sizing work (gc's live set), not for
    /// reports: the main table's rows as remembered (counted when they are not) and the recent
    /// rows, without the read of every row that [`Index::object_totals`] makes.
    pub fn object_count_estimate(&self) -> Result<u64> {
        let recent = self.count_recent_rows()?;
        let main = match self.main_rows {
            Some(n) => n,
            None => match self.remembered_main_rows()? {
                Some(n) => n,
                None => self.count_main_rows()?,
            },
        };
        Ok(main + recent)
    }

    /// Records a sealed pack and the objects in it, in one transaction.
    pub fn add_pack(
        &mut self,
        name: &str,
        size: u64,
        records: &[(RecordHeader, u64)],
    ) -> Result<()> {
        let mut added = 0;
        self.write(|tx| {
            added = insert_pack(tx, name, size, records)?;
            Ok(())
        })?;
        if let Some(n) = self.recent_rows.as_mut() {
            *n += added;
        }
        Ok(())
    }

    /// Adds rows for records of pack `name`, which the index lists already: records it had
    /// lost the rows of. An id the index holds already is skipped. Returns how many were
    /// added.
    pub fn add_records(&mut self, name: &str, records: &[(RecordHeader, u64)]) -> Result<u64> {
        let mut added = 0;
        self.write(|tx| {
            let pack: i64 =
                tx.query_row("SELECT id FROM packs WHERE name = ?1", [name], |r| r.get(0))?;
            added = insert_rows(tx, pack, records)?;
            Ok(())
        })?;
        if let Some(n) = self.recent_rows.as_mut() {
            *n += added;
        }
        Ok(added)
    }

    /// Records a pack whose objects come later, sorted, through [`Index::append_objects`]
    /// (an index rebuild); returns its row.
    pub fn add_pack_alone(&mut self, name: &str, size: u64) -> Result<i64> {
        let mut row = 0;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO packs(name, size) VALUES(?1, ?2)",
                params![name, size as i64],
            )?;
            row = tx.last_insert_rowid();
            Ok(())
        })?;
        Ok(row)
    }

    /// Adds `rows`, in ascending id order, straight to the main object table in one
    /// transaction; of rows with one id the first is kept. For an index being rebuilt: rows
    /// that come sorted are appended page after page, where rows in pack order would land on
    /// random pages of a table of millions of rows, each page written again and again. Returns
    /// the rows added.
    pub fn append_objects<'r>(&mut self, rows: impl Iterator<Item = &'r ObjectRow>) -> Result<u64> {
        let main = match self.main_rows {
            Some(n) => n,
            None => self.main_rows_hint()?,
        };
        let mut added = 0;
        self.write(|tx| {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO objects(id, kind, codec, pack, offset, stored_len, raw_len,
                                               base)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for r in rows {
                added += st.execute(params![
                    &r.id.0[..],
                    r.kind,
                    r.codec,
                    r.pack,
                    r.offset as i64,
                    r.stored_len,
                    r.raw_len,
                    r.base.as_ref().map(|b| &b.0[..])
                ])? as u64;
            }
            set_main_rows(tx, main + added)
        })?;
        self.main_rows = Some(main + added);
        Ok(added)
    }

    /// Garbage collection, one step in one transaction: drops `old_packs` with every object row
    /// in them, records `new_packs` (sealed copies of their live records), deletes the rows of
    /// `dead` objects elsewhere, and forgets the segment-cache rows of `uncache` and of segments
    /// that are gone.
    pub fn apply_gc(
        &mut self,
        old_packs: &[String],
        new_packs: &[SealedPack],
        dead: &[ObjectId],
        uncache: &[ObjectId],
    ) -> Result<()> {
        self.main_rows = None;
        self.recent_rows = None;
        self.write(|tx| {
            let mut gone = 0;
            for name in old_packs {
                for table in ["objects", "recent_objects"] {
                    let n = tx.execute(
                        &format!(
                            "DELETE FROM {table} WHERE pack = (SELECT id FROM packs WHERE name = ?1)"
                        ),
                        [name],
                    )?;
                    if table == "objects" {
                        gone += n as u64;
                    }
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
                    gone += st.execute([&id.0[..]])? as u64;
                    recent.execute([&id.0[..]])?;
                }
                less_main_rows(tx, gone)?;
                let mut cache = tx.prepare_cached("DELETE FROM segment_cache WHERE segment = ?1")?;
                let mut leaves =
                    tx.prepare_cached("DELETE FROM segment_leaves WHERE segment = ?1")?;
                for id in uncache {
                    cache.execute([&id.0[..]])?;
                    leaves.execute([&id.0[..]])?;
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
        self.main_rows = None;
        self.recent_rows = None;
        self.write(|tx| {
            let mut gone = 0;
            for id in objects {
                gone += tx.execute("DELETE FROM objects WHERE id = ?1", [&id.0[..]])? as u64;
                tx.execute("DELETE FROM recent_objects WHERE id = ?1", [&id.0[..]])?;
            }
            less_main_rows(tx, gone)?;
            for id in segments {
                tx.execute("DELETE FROM segment_cache WHERE segment = ?1", [&id.0[..]])?;
                tx.execute("DELETE FROM segment_leaves WHERE segment = ?1", [&id.0[..]])?;
            }
            drop_baseless(tx)?;
            forget_gone_segments(tx)?;
            Ok(())
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

    /// How many objects the index lists, and their bytes in the packs (record headers included).
    pub fn object_totals(&self) -> Result<(u64, u64)> {
        self.conn
            .query_row(
                "SELECT count(*), total(stored_len) FROM all_objects",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, f64>(1)? as u64)),
            )
            .map(|(n, stored)| {
                (
                    n,
                    stored + n * crate::repo::object::RECORD_HEADER_LEN as u64,
                )
            })
            .map_err(|e| self.err(e))
    }

    /// Calls `f` for every object in the index, in pack and offset order.
    pub fn for_each_object(&self, mut f: impl FnMut(Location) -> Result<()>) -> Result<()> {
        let mut st = self
            .conn
            .prepare(
                "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len, o.id, o.base
                 FROM all_objects o JOIN packs p ON p.id = o.pack ORDER BY p.name, o.offset",
            )
            .map_err(|e| self.err(e))?;
        let rows = st.query([]).map_err(|e| self.err(e))?;
        self.each_location(rows, &mut f)
    }

    /// Calls `f` with the [`Location`] of every row of an object query (columns kind, codec,
    /// pack name, offset, stored_len, raw_len, id).
    fn each_location(
        &self,
        mut rows: rusqlite::Rows<'_>,
        f: &mut impl FnMut(Location) -> Result<()>,
    ) -> Result<()> {
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let id: Vec<u8> = r.get(6).map_err(|e| self.err(e))?;
            let id = row_id(&id, "object id").map_err(|e| self.err(e))?;
            f(row_location(r, id).map_err(|e| self.err(e))?)?;
        }
        Ok(())
    }

    /// Calls `f` for every object whose id is at least `first` and below `end` (to the last
    /// with `None`), in no particular order.
    pub fn for_each_object_in_range(
        &self,
        first: &ObjectId,
        end: Option<&ObjectId>,
        mut f: impl FnMut(Location) -> Result<()>,
    ) -> Result<()> {
        const COLUMNS: &str =
            "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len, o.id, o.base
                 FROM all_objects o JOIN packs p ON p.id = o.pack WHERE o.id >= ?1";
        let mut st = match end {
            Some(_) => self
                .conn
                .prepare_cached(&format!("{COLUMNS} AND o.id < ?2")),
            None => self.conn.prepare_cached(COLUMNS),
        }
        .map_err(|e| self.err(e))?;
        let rows = match end {
            Some(end) => st.query(params![&first.0[..], &end.0[..]]),
            None => st.query(params![&first.0[..]]),
        }
        .map_err(|e| self.err(e))?;
        self.each_location(rows, &mut f)
    }

    /// Calls `f` with (id, raw length) of every object whose id is at least `first` and below
    /// `end` (to the last with `None`), in id order (an id in both object tables, twice).
    pub fn for_each_raw_len_in_range(
        &self,
        first: &ObjectId,
        end: Option<&ObjectId>,
        mut f: impl FnMut(ObjectId, u32) -> Result<()>,
    ) -> Result<()> {
        self.for_each_row_in_range(
            "SELECT id, raw_len FROM objects WHERE id >= ?1 AND id < ?2
             UNION ALL
             SELECT id, raw_len FROM recent_objects WHERE id >= ?1 AND id < ?2
             ORDER BY 1",
            first,
            end,
            |r| {
                let id: Vec<u8> = r.get(0)?;
                Ok((row_id(&id, "object id")?, r.get(1)?))
            },
            |(id, len)| f(id, len),
        )
    }

    /// Calls `f` with (id, base) of every delta whose id is at least `first` and below `end`
    /// (to the last with `None`), in no particular order.
    pub fn for_each_delta_in_range(
        &self,
        first: &ObjectId,
        end: Option<&ObjectId>,
        mut f: impl FnMut(ObjectId, ObjectId) -> Result<()>,
    ) -> Result<()> {
        self.for_each_row_in_range(
            "SELECT id, base FROM objects WHERE base IS NOT NULL AND id >= ?1 AND id < ?2
             UNION ALL
             SELECT id, base FROM recent_objects
                 WHERE base IS NOT NULL AND id >= ?1 AND id < ?2",
            first,
            end,
            |r| {
                let (id, base): (Vec<u8>, Vec<u8>) = (r.get(0)?, r.get(1)?);
                Ok((row_id(&id, "object id")?, row_id(&base, "base id")?))
            },
            |(id, base)| f(id, base),
        )
    }

    /// Runs `sql` (whose `?1` and `?2` bound the ids: at least `first`, below `end`, to the
    /// last with `None`) and calls `f` with what `decode` makes of each row.
    fn for_each_row_in_range<T>(
        &self,
        sql: &str,
        first: &ObjectId,
        end: Option<&ObjectId>,
        decode: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        mut f: impl FnMut(T) -> Result<()>,
    ) -> Result<()> {
        let mut st = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        // Past the last id: 32 bytes of 0xff sort below a 33-byte blob of them.
        let past = [0xffu8; 33];
        let end: &[u8] = end.map_or(&past[..], |e| &e.0[..]);
        let mut rows = st
            .query(params![&first.0[..], end])
            .map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            f(decode(r).map_err(|e| self.err(e))?)?;
        }
        Ok(())
    }

    /// Drops the rows of deltas whose base is not indexed as a chunk stored on its own, and
    /// returns them (delta, base). An index built from data files (a rebuild, or packs it did
    /// not know adopted) indexes a delta without decoding it, as its base may come from a pack
    /// read later; once every pack is in, a delta still without its base cannot be read, and an
    /// ingest must not deduplicate against it.
    pub fn drop_baseless_deltas(&mut self) -> Result<Vec<(ObjectId, ObjectId)>> {
        let mut gone = Vec::new();
        self.write(|tx| {
            gone = drop_baseless(tx)?;
            Ok(())
        })?;
        if !gone.is_empty() {
            self.main_rows = None;
            self.recent_rows = None;
        }
        Ok(gone)
    }

    /// Some object of the index stored on its own (not a delta), if it has any.
    pub fn first_object(&self) -> Result<Option<Location>> {
        self.conn
            .query_row(
                "SELECT o.kind, o.codec, p.name, o.offset, o.stored_len, o.raw_len, o.id, o.base
                 FROM all_objects o JOIN packs p ON p.id = o.pack WHERE o.base IS NULL LIMIT 1",
                [],
                |r| {
                    let id: Vec<u8> = r.get(6)?;
                    row_location(r, row_id(&id, "object id")?)
                },
            )
            .optional()
            .map_err(|e| self.err(e))
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
        self.apply_gc(&[name.to_string()], &[], &[], &[])
    }
}

/// The `meta` key remembering how many rows `objects` holds, so that deciding whether to merge
/// the recent rows does not count a table of millions of rows at every ingest. Set by each
/// merge, lowered by gc and repair; a hint only (it decides when to merge, nothing else).
const MAIN_ROWS_KEY: &str = "objects_rows";

fn set_main_rows(tx: &rusqlite::Transaction<'_>, n: u64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES(?1, ?2)",
        params![MAIN_ROWS_KEY, n.to_string()],
    )?;
    Ok(())
}

/// [`Index::drop_baseless_deltas`] inside a transaction; also run when repair forgets damaged
/// objects, so that the index never lists a delta it cannot read (a later ingest then stores
/// that chunk again instead of deduplicating against it). (gc keeps every base an indexed
/// delta names, so its deletions never leave one.)
fn drop_baseless(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<(ObjectId, ObjectId)>> {
    let mut gone = Vec::new();
    {
        let mut st = tx.prepare_cached(
            "SELECT d.id, d.base FROM all_objects d WHERE d.base IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM all_objects b
                             WHERE b.id = d.base AND b.base IS NULL AND b.kind = 1)",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: Vec<u8> = r.get(0)?;
            let base: Vec<u8> = r.get(1)?;
            gone.push((row_id(&id, "object id")?, row_id(&base, "base id")?));
        }
    }
    let mut main = 0u64;
    for (id, _) in &gone {
        main += tx.execute("DELETE FROM objects WHERE id = ?1", [&id.0[..]])? as u64;
        tx.execute("DELETE FROM recent_objects WHERE id = ?1", [&id.0[..]])?;
    }
    less_main_rows(tx, main)?;
    Ok(gone)
}

/// Lowers the remembered row count of `objects` by `gone` deleted rows (if it is remembered).
fn less_main_rows(tx: &rusqlite::Transaction<'_>, gone: u64) -> rusqlite::Result<()> {
    if gone > 0 {
        tx.execute(
            "UPDATE meta SET value = CAST(max(0, CAST(value AS INTEGER) - ?2) AS TEXT)
             WHERE key = ?1",
            params![MAIN_ROWS_KEY, gone as i64],
        )?;
    }
    Ok(())
}

pub(super) fn insert_pack(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    size: u64,
    records: &[(RecordHeader, u64)],
) -> rusqlite::Result<u64> {
    tx.execute(
        "INSERT INTO packs(name, size) VALUES(?1, ?2)",
        params![name, size as i64],
    )?;
    let pack = tx.last_insert_rowid();
    insert_rows(tx, pack, records)
}

/// Adds rows for `records` of the pack whose row is `pack`; returns how many were added (an id
/// the index holds already is skipped).
fn insert_rows(
    tx: &rusqlite::Transaction<'_>,
    pack: i64,
    records: &[(RecordHeader, u64)],
) -> rusqlite::Result<u64> {
    // New rows go to the small recent table (cheap to insert into: few pages), never twice.
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO recent_objects(id, kind, codec, pack, offset, stored_len, raw_len,
                                              base)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
         WHERE NOT EXISTS(SELECT 1 FROM objects WHERE id = ?1)",
    )?;
    // In id order: each insert and each probe of the large table then lands next to the last
    // one in their B-trees, on pages already in the cache.
    let mut sorted: Vec<&(RecordHeader, u64)> = records.iter().collect();
    sorted.sort_unstable_by_key(|(h, _)| h.id);
    let mut added = 0;
    for (h, offset) in sorted {
        added += st.execute(params![
            &h.id.0[..],
            h.kind as u8,
            h.codec_byte(),
            pack,
            *offset as i64,
            h.stored_len,
            h.raw_len,
            h.base.as_ref().map(|b| &b.0[..])
        ])? as u64;
    }
    Ok(added)
}

/// A damaged index row, reported as such (never read as something else).
pub(super) fn row_location(r: &rusqlite::Row<'_>, id: ObjectId) -> rusqlite::Result<Location> {
    let kind: u8 = r.get(0)?;
    let codec_byte: u8 = r.get(1)?;
    if codec_byte & !0x1f != 0 || codec_byte & 0x0f > 2 {
        return Err(bad_row(format!(
            "object {} has codec byte {codec_byte:#x}",
            id.short()
        )));
    }
    let (codec, encrypted) = RecordHeader::from_codec_byte(codec_byte);
    let base: Option<Vec<u8>> = r.get(7)?;
    let base = match (codec, base) {
        (Codec::Delta, Some(b)) => Some(row_id(&b, "base id")?),
        (Codec::Delta, None) => {
            return Err(bad_row(format!(
                "object {} is a delta without a base",
                id.short()
            )))
        }
        (_, Some(_)) => {
            return Err(bad_row(format!(
                "object {} names a base but is not a delta",
                id.short()
            )))
        }
        (_, None) => None,
    };
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
            base,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::repo::crypto::Keys;
    use crate::repo::object::ObjectKind;

    /// The header of a small record of `kind` whose id is 32 bytes `b`.
    fn record(kind: ObjectKind, b: u8) -> RecordHeader {
        RecordHeader {
            base: None,
            kind,
            codec: crate::repo::object::Codec::Raw,
            encrypted: false,
            id: ObjectId([b; 32]),
            stored_len: 10,
            raw_len: 10,
        }
    }

    #[test]
    fn a_pack_added_is_found_object_by_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut idx = Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        let header = |b: u8, stored: u32| RecordHeader {
            base: None,
            kind: ObjectKind::Chunk,
            codec: crate::repo::object::Codec::Raw,
            encrypted: false,
            id: ObjectId([b; 32]),
            stored_len: stored,
            raw_len: 4096,
        };
        idx.add_pack("p1", 500, &[(header(1, 100), 16), (header(2, 200), 200)])
            .unwrap();
        let two = idx.lookup(&ObjectId([2; 32])).unwrap().unwrap();
        assert_eq!(
            (two.pack.as_str(), two.offset, two.header.stored_len),
            ("p1", 200, 200)
        );
        assert!(idx.contains(&ObjectId([1; 32])).unwrap());
        assert!(!idx.contains(&ObjectId([3; 32])).unwrap());
        assert_eq!(idx.packs().unwrap(), [("p1".to_string(), 500)]);
        // The same answers from one read transaction, which ends with it (nested: the outer one).
        let lens = idx
            .reading(|i| {
                assert!(!i.conn.is_autocommit());
                let inner = i.reading(|i| i.raw_len(&ObjectId([1; 32])))?;
                Ok((inner, i.raw_len(&ObjectId([3; 32]))?))
            })
            .unwrap();
        assert_eq!(lens, (Some(4096), None));
        assert!(idx.conn.is_autocommit());
        // A failed run of reads ends its transaction too, and the index can be written again.
        let failed: Result<()> = idx.reading(|_| Err(crate::error::Error::Corrupt("stop".into())));
        assert!(failed.is_err());
        assert!(idx.conn.is_autocommit());
        idx.add_pack("p2", 500, &[(header(3, 100), 16)]).unwrap();
        assert_eq!(idx.raw_len(&ObjectId([3; 32])).unwrap(), Some(4096));
    }

    /// Manifests and tombstones are found through their own index, in both object tables;
    /// what a tombstone names is remembered under a check value that a changed row fails.
    #[test]
    fn tombstones_are_found_and_what_they_name_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut idx = Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        idx.add_pack(
            "p1",
            500,
            &[
                (record(ObjectKind::Chunk, 1), 16),
                (record(ObjectKind::Manifest, 2), 100),
                (record(ObjectKind::Tombstone, 3), 200),
            ],
        )
        .unwrap();
        // Into the main table, then one more of each into the recent one.
        idx.merge_recent_objects(true).unwrap();
        idx.add_pack(
            "p2",
            500,
            &[
                (record(ObjectKind::Manifest, 4), 16),
                (record(ObjectKind::Tombstone, 5), 100),
            ],
        )
        .unwrap();
        let (mut m, mut t) = idx.manifests_and_tombstones().unwrap();
        m.sort();
        t.sort();
        assert_eq!(m, [ObjectId([2; 32]), ObjectId([4; 32])]);
        assert_eq!(t, [ObjectId([3; 32]), ObjectId([5; 32])]);
        let plan: String = idx
            .conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id, kind FROM objects WHERE kind IN (5, 6)",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("objects_metadata"), "{plan}");

        let tomb = ObjectId([3; 32]);
        assert_eq!(idx.tombstone_names(&tomb).unwrap(), None);
        let names = [ObjectId([2; 32]), ObjectId([9; 32])];
        idx.remember_tombstone(&tomb, &names).unwrap();
        assert_eq!(
            idx.tombstone_names(&tomb).unwrap().as_deref(),
            Some(&names[..])
        );
        // A row changed behind the index's back is not trusted.
        idx.conn
            .execute(
                "UPDATE tombstone_names SET manifests = ?1",
                [&[7u8; 32][..]],
            )
            .unwrap();
        assert_eq!(idx.tombstone_names(&tomb).unwrap(), None);
    }

    /// A gc forgets the segment-cache rows, kept leaves and tombstone names of objects no longer
    /// stored, whichever table held them, and keeps those of objects still stored.
    #[test]
    fn gc_forgets_what_the_index_kept_of_objects_that_are_gone() {
        use crate::repo::index::CacheRow;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let mut idx = Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        // Segment 1 and tombstone 5 in the main table, segment 2 in the recent one; segment 3
        // and tombstone 6 were never stored.
        idx.add_pack(
            "p1",
            500,
            &[
                (record(ObjectKind::Segment, 1), 16),
                (record(ObjectKind::Tombstone, 5), 100),
            ],
        )
        .unwrap();
        idx.merge_recent_objects(true).unwrap();
        idx.add_pack("p2", 500, &[(record(ObjectKind::Segment, 2), 16)])
            .unwrap();
        let rows: Vec<CacheRow> = [1u8, 2, 3]
            .iter()
            .map(|&b| CacheRow {
                fingerprint: [b + 100; 32],
                segment: ObjectId([b; 32]),
                leaves: Some(vec![b; 64]),
            })
            .collect();
        idx.insert_cache(&rows).unwrap();
        for t in [5u8, 6] {
            idx.remember_tombstone(&ObjectId([t; 32]), &[ObjectId([9; 32])])
                .unwrap();
        }
        let kept = |idx: &Index, table: &str, column: &str| -> Vec<u8> {
            let mut st = idx
                .conn
                .prepare(&format!("SELECT {column} FROM {table} ORDER BY {column}"))
                .unwrap();
            let ids = st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
            ids.map(|id| id.unwrap()[0]).collect()
        };
        idx.apply_gc(&[], &[], &[], &[]).unwrap();
        assert_eq!(kept(&idx, "segment_cache", "segment"), [1, 2]);
        assert_eq!(kept(&idx, "segment_leaves", "segment"), [1, 2]);
        assert_eq!(kept(&idx, "tombstone_names", "tombstone"), [5]);
        // Segment 2 and tombstone 5 deleted by a gc.
        idx.apply_gc(&[], &[], &[ObjectId([2; 32]), ObjectId([5; 32])], &[])
            .unwrap();
        assert_eq!(kept(&idx, "segment_cache", "segment"), [1]);
        assert_eq!(kept(&idx, "segment_leaves", "segment"), [1]);
        assert!(kept(&idx, "tombstone_names", "tombstone").is_empty());
    }

    /// Records of `n` chunks with ids numbered from `from`, each at its own offset.
    fn chunk_records(from: u64, n: u64) -> Vec<(RecordHeader, u64)> {
        (from..from + n)
            .map(|k| {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&k.to_be_bytes());
                let h = RecordHeader {
                    base: None,
                    kind: ObjectKind::Chunk,
                    codec: crate::repo::object::Codec::Raw,
                    encrypted: false,
                    id: ObjectId(id),
                    stored_len: 10,
                    raw_len: 10,
                };
                (h, 16 + k * 100)
            })
            .collect()
    }

    /// A process that adds pack after pack (an index rebuild) counts the recent rows once and
    /// then adds what it inserts: rows already there are not counted again, and the merge comes
    /// when the rows it added reach the threshold. A forced merge counts, so rows another
    /// connection added are merged too.
    #[test]
    fn recent_rows_are_counted_once_then_followed_through_a_process_s_own_inserts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let open = || Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        let mut idx = open();
        idx.add_pack("p1", 1, &chunk_records(0, MERGE_MIN - 2))
            .unwrap();
        assert_eq!(idx.merge_recent_objects(false).unwrap(), 0);
        assert_eq!(idx.recent_rows, Some(MERGE_MIN - 2));
        // The same ids again, in another pack, and one new: one row more.
        idx.add_pack("p2", 1, &chunk_records(0, MERGE_MIN - 1))
            .unwrap();
        assert_eq!(idx.recent_rows, Some(MERGE_MIN - 1));
        assert_eq!(idx.merge_recent_objects(false).unwrap(), 0);
        idx.add_pack("p3", 1, &chunk_records(MERGE_MIN - 1, 1))
            .unwrap();
        assert_eq!(idx.merge_recent_objects(false).unwrap(), MERGE_MIN);
        assert_eq!(idx.recent_rows, Some(0));
        assert_eq!(idx.object_totals().unwrap().0, MERGE_MIN);

        // Rows another connection adds are not in this one's count; a forced merge takes them.
        let mut other = open();
        other
            .add_pack("p4", 1, &chunk_records(MERGE_MIN, 5))
            .unwrap();
        assert_eq!(idx.merge_recent_objects(false).unwrap(), 0);
        assert_eq!(idx.merge_recent_objects(true).unwrap(), 5);
        assert_eq!(idx.count_recent_rows().unwrap(), 0);
        assert_eq!(idx.object_totals().unwrap().0, MERGE_MIN + 5);
    }

    /// Whether to merge is decided on the row count `meta` remembers, not on a count of the
    /// whole main table; merges set it, gc and repair lower it, and it is counted once when
    /// absent.
    #[test]
    fn the_merge_decision_uses_the_remembered_row_count_that_merges_gc_and_repair_keep() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.sqlite");
        let open = || Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        let records = chunk_records;
        let remembered = |idx: &Index| -> Option<String> {
            idx.conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'objects_rows'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .unwrap()
        };
        let mut idx = open();
        idx.add_pack("p1", 1, &records(0, 10)).unwrap();
        assert_eq!(idx.merge_recent_objects(true).unwrap(), 10);
        assert_eq!(remembered(&idx).as_deref(), Some("10"));
        assert_eq!(idx.object_count_estimate().unwrap(), 10);

        // Remembered as 600,000 rows (a file of 20 MB more could hold them): MERGE_MIN recent
        // rows are too few to merge.
        idx.conn
            .execute_batch(
                "UPDATE meta SET value = '600000' WHERE key = 'objects_rows';
                 INSERT INTO meta VALUES('padding', zeroblob(20000000));",
            )
            .unwrap();
        let mut idx = open();
        idx.add_pack("p2", 1, &records(10, MERGE_MIN)).unwrap();
        assert_eq!(idx.merge_recent_objects(false).unwrap(), 0);
        // The estimate takes the remembered count as it is, without reading the table.
        assert_eq!(idx.object_count_estimate().unwrap(), 600_000 + MERGE_MIN);

        // Forgotten, garbled, or more than the file could hold: counted (10 rows), so they
        // merge, and the sum is remembered.
        let all = 10 + MERGE_MIN;
        for bad in [
            "DELETE FROM meta WHERE key = 'objects_rows'",
            "UPDATE meta SET value = 'many' WHERE key = 'objects_rows'",
            "UPDATE meta SET value = '1000000000000' WHERE key = 'objects_rows'",
        ] {
            idx.conn.execute(bad, []).unwrap();
            let mut idx = open();
            assert_eq!(idx.merge_recent_objects(false).unwrap(), MERGE_MIN, "{bad}");
            assert_eq!(remembered(&idx), Some(all.to_string()));
            // Back to recent, for the next case.
            idx.conn
                .execute_batch(
                    "INSERT INTO recent_objects SELECT * FROM objects WHERE offset >= 1016;
                     DELETE FROM objects WHERE offset >= 1016;",
                )
                .unwrap();
        }
        idx.conn
            .execute_batch(
                "INSERT INTO objects SELECT * FROM recent_objects; DELETE FROM recent_objects;",
            )
            .unwrap();

        idx.apply_gc(&["p1".to_string()], &[], &[], &[]).unwrap();
        assert_eq!(remembered(&idx), Some((all - 10).to_string()));
        let damaged = records(10, 1)[0].0.id;
        idx.forget_damaged_objects(&[damaged], &[]).unwrap();
        assert_eq!(remembered(&idx), Some((all - 11).to_string()));
        assert_eq!(
            idx.object_count_estimate().unwrap(),
            idx.object_totals().unwrap().0
        );
        assert_eq!(open().object_count_estimate().unwrap(), all - 11);
    }
}
