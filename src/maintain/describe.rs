//! Compacting the pack descriptions (`pack-index/`): gc, which holds the exclusive lock and has
//! just proved that its index covers the data files (or an index rebuild from the pack files,
//! whose index lists what they hold), rewrites the descriptions of every indexed
//! pack from its index as a few objects per shard (keeping the records a previous description
//! lists that the index lost), then deletes the per-pack descriptions they replace and those
//! of packs that are gone. A host building its cache then reads a few objects per shard
//! instead of one per pack, and descriptions of deleted packs do not pile up.

use std::collections::HashSet;

use serde::Serialize;

use crate::backend::Durability;
use crate::error::{Error, IoContext, Result};
use crate::repo::index::Index;
use crate::repo::layout;
use crate::repo::object::{ObjectKind, RECORD_HEADER_LEN};
use crate::repo::pack::list_packs;
use crate::repo::pack_index::{self, Descriptions, PackDescription, PACKS_PER_OBJECT};
use crate::repo::Repository;

/// Per-pack descriptions that make a gc compact even when it deleted nothing.
pub const COMPACT_AFTER: usize = 64;

/// What a compaction did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Compaction {
    /// Compacted objects written.
    pub written: u64,
    /// Packs they describe.
    pub packs: u64,
    /// Description objects deleted (per-pack and older compacted ones).
    pub removed: u64,
}

/// Compacts the descriptions when there are at least [`COMPACT_AFTER`] per-pack ones, or
/// always with `force` (a gc that deleted or rewrote packs). Needs the exclusive lock and an
/// index that covers the data files. `None` when there was nothing to do.
pub fn compact(repo: &Repository, index: &Index, force: bool) -> Result<Option<Compaction>> {
    let backend = &**repo.backend();
    let listed =
        Descriptions::list(backend, repo.keys()).ctx("list", backend.path(layout::PACK_INDEX))?;
    if !force && listed.singles().len() < COMPACT_AFTER {
        return Ok(None);
    }
    let mut done = Compaction::default();
    // Every indexed pack, with the records the index holds for it, one shard at a time.
    let mut shard: Vec<PackDescription> = Vec::new();
    let write_shard = |packs: &mut Vec<PackDescription>, done: &mut Compaction| -> Result<()> {
        for d in packs.iter_mut() {
            keep_unindexed(d, listed.stored(&d.name));
        }
        for part in packs.chunks(PACKS_PER_OBJECT) {
            let key = layout::shard_description(&part[0].name[..2], &random_tag()?);
            pack_index::write(backend, repo.keys(), &key, part)
                .ctx("write pack description", backend.path(&key))?;
            done.written += 1;
            done.packs += part.len() as u64;
        }
        packs.clear();
        Ok(())
    };
    let mut sizes = index.packs()?.into_iter().peekable();
    let mut covered: HashSet<String> = HashSet::new();
    let mut add = |name: String, size: u64, shard: &mut Vec<PackDescription>| {
        covered.insert(name.clone());
        shard.push(PackDescription {
            name,
            len: size,
            records: Vec::new(),
        });
    };
    let mut result = Ok(());
    index.for_each_object(|loc| {
        // Packs before this object's pack (those with no rows) are described empty.
        while let Some((name, size)) = sizes.next_if(|(n, _)| *n <= loc.pack) {
            if shard.first().is_some_and(|d| d.name[..2] != name[..2]) {
                write_shard(&mut shard, &mut done)?;
            }
            add(name, size, &mut shard);
        }
        match shard.last_mut() {
            Some(d) if d.name == loc.pack => d.records.push((loc.header, loc.offset)),
            _ => {
                result = Err(Error::Corrupt(format!(
                    "the index names objects in pack {} that it does not list",
                    loc.pack
                )))
            }
        }
        Ok(())
    })?;
    result?;
    for (name, size) in sizes {
        if shard.first().is_some_and(|d| d.name[..2] != name[..2]) {
            write_shard(&mut shard, &mut done)?;
        }
        add(name, size, &mut shard);
    }
    write_shard(&mut shard, &mut done)?;

    // What the new objects replace: every older compacted object, and the per-pack descriptions
    // of packs they cover or that are gone. A description of a pack the index does not know
    // (one gc kept unindexed) stays.
    let present: HashSet<String> = list_packs(backend)?.into_iter().map(|(n, _)| n).collect();
    let mut old: Vec<String> = listed.compacted().cloned().collect();
    old.extend(
        listed
            .singles()
            .iter()
            .filter(|n| covered.contains(*n) || !present.contains(*n))
            .map(|n| layout::pack_description(n)),
    );
    backend
        .delete(&old, Durability::Unsynced)
        .ctx("delete", backend.path(layout::PACK_INDEX))?;
    done.removed = old.len() as u64;
    Ok(Some(done))
}

/// Adds to `d` (a pack's description made from the index's rows) the records that its stored
/// description, `stored`, lists and the index lacks: chunks, segments, disk maps and files the
/// pack still holds, whose rows an index lost (a damaged or stale copy) or `check --repair`
/// dropped on a read that failed. A description says what its pack holds: gc reads it to find
/// the objects generations need that the index does not list before it rewrites or deletes the
/// pack, so one written from the index alone would let gc drop them. Manifests and tombstones
/// are not added back: gc drops the rows of dead manifests on purpose.
fn keep_unindexed(
    d: &mut PackDescription,
    stored: Option<std::result::Result<PackDescription, String>>,
) {
    let Some(Ok(old)) = stored else {
        return;
    };
    let listed: HashSet<u64> = d.records.iter().map(|(_, offset)| *offset).collect();
    let len = d.len;
    let before = d.records.len();
    d.records
        .extend(old.records.into_iter().filter(|(h, offset)| {
            !listed.contains(offset)
                && matches!(
                    h.kind,
                    ObjectKind::Chunk
                        | ObjectKind::Segment
                        | ObjectKind::DiskMap
                        | ObjectKind::File
                )
                && offset + RECORD_HEADER_LEN as u64 + h.stored_len as u64 <= len
        }));
    if d.records.len() > before {
        d.records.sort_by_key(|(_, offset)| *offset);
    }
}

/// 16 random hex digits.
fn random_tag() -> Result<String> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
    Ok(hex::encode(raw))
}
