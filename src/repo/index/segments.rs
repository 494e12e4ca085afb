//! The segment cache: which stored segment a fingerprint gives, and the leaf chaining values
//! kept for one-run segments (what lets a nightly ingest patch a segment around its changes).

use blake3::hazmat::ChainingValue;
use rusqlite::{params, OptionalExtension};

use crate::error::Result;
use crate::repo::crypto::Keys;
use crate::repo::id::ObjectId;

use super::Index;

/// A segment-cache row an ingest adds: the segment stored for a fingerprint and, for a
/// one-run segment, its leaf chaining values (encoded by [`crate::repo::leaves::encode`]).
#[derive(Clone, Debug)]
pub struct CacheRow {
    pub fingerprint: [u8; 32],
    pub segment: ObjectId,
    pub leaves: Option<Vec<u8>>,
}

impl Index {
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

    /// Inserts segment cache rows (index rebuild).
    pub fn insert_cache(&mut self, rows: &[CacheRow]) -> Result<()> {
        let keys = self.keys.clone();
        self.write(|tx| insert_cache_rows(tx, &keys, rows))
    }
}

/// Adds segment-cache rows (each with its MAC, so a row planted in the index cannot make an
/// ingest reuse another segment) and the leaves of one-run segments.
pub(super) fn insert_cache_rows(
    tx: &rusqlite::Transaction<'_>,
    keys: &Keys,
    rows: &[CacheRow],
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT OR REPLACE INTO segment_cache(fingerprint, segment, mac) VALUES(?1, ?2, ?3)",
    )?;
    for row in rows {
        let (fp, seg) = (&row.fingerprint, &row.segment);
        st.execute(params![&fp[..], &seg.0[..], &keys.cache_mac(fp, seg)[..]])?;
    }
    let mut st =
        tx.prepare_cached("INSERT OR REPLACE INTO segment_leaves(segment, leaves) VALUES(?1, ?2)")?;
    for row in rows {
        if let Some(leaves) = &row.leaves {
            st.execute(params![&row.segment.0[..], leaves])?;
        }
    }
    Ok(())
}

/// Drops the kept leaves of the segments `replaced` (a cache: see `ingest::superseded`).
pub(super) fn forget_leaves(
    tx: &rusqlite::Transaction<'_>,
    replaced: &[ObjectId],
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached("DELETE FROM segment_leaves WHERE segment = ?1")?;
    for id in replaced {
        st.execute([&id.0[..]])?;
    }
    Ok(())
}
