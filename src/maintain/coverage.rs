//! Whether the index covers the data files: the proof a command needs before it deletes
//! anything, and the adoption of pack files the index does not know.
//!
//! The index is a cache; the pack files are the truth. A command that deletes data (gc) or
//! drops index rows (repair) first surveys the data directory against the index:
//!
//! * every pack the index names must be there, at least as long as recorded (otherwise the
//!   index is older than the data, or data was lost: nothing is deleted);
//! * every pack the index does not know is read record by record, past any damaged record
//!   header (a manifest behind one is still seen). It is a left-over that may be deleted only
//!   if it holds no damage (a torn write at its end, zero padding or one record cut short, is
//!   not damage), holds no manifest of a generation the index does not list, no tombstone the
//!   index lacks, and no object a generation needs that the index does not hold elsewhere;
//! * every manifest in the data files is a generation unless a tombstone names it: one that
//!   the index does not list (an ingest killed between sealing its last pack and committing, or
//!   an index older than the data) is *adopted*, its pack indexed and its generation listed,
//!   before anything is marked dead.
//!
//! Packs an ingest is writing (it holds their `flock`) are never touched.

use std::collections::{HashMap, HashSet};

use crate::maintain::id_set::IdSet;

use crate::backend::{Backend, Durability};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::repo::fanout;
use crate::repo::id::ObjectId;
use crate::repo::index::Index;
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Tombstone};
use crate::repo::object::{self, Codec, ObjectKind, RecordHeader, RECORD_HEADER_LEN};
use crate::repo::pack::{
    is_being_written, list_packs, pack_len, scan_pack_resyncing, PACK_HEADER_LEN,
};
use crate::repo::pack_index::{Described, Descriptions};
use crate::repo::Repository;

/// A pack file in `data/` that the index does not know and no process is writing.
#[derive(Debug)]
pub struct UnknownPack {
    /// Pack name.
    pub name: String,
    /// File length.
    pub size: u64,
    /// Length up to the end of the last well-formed record.
    pub valid_len: u64,
    /// Its well-formed records: header and offset.
    pub records: Vec<(RecordHeader, u64)>,
    /// Manifests in it whose payload decodes to a valid manifest, with their generation.
    pub manifests: Vec<(ObjectId, Manifest)>,
    /// Manifests in it that do not decode or are not valid (see [`Manifest::validate`]): not
    /// generations; the pack is kept and `check` reports them.
    pub bad_manifests: Vec<(ObjectId, String)>,
    /// Manifests named by the tombstones in it.
    pub tombstoned: Vec<ObjectId>,
    /// Where it is damaged: record headers that do not verify (the stretches read past), or
    /// what follows its last well-formed record when that is not a torn write. What it holds
    /// there is unknown, so it is never a left-over.
    pub damage: Option<String>,
    /// The last pack of an ingest that died before its commit ([`layout::uncommitted_marker`]): its
    /// manifest is not a generation.
    pub uncommitted: bool,
    /// Its records come from its description (`pack-index/`), not from reading it: only its
    /// manifests and tombstones were read.
    pub described: bool,
}

impl UnknownPack {
    fn holds(&self, kind: ObjectKind) -> impl Iterator<Item = &ObjectId> {
        self.records
            .iter()
            .filter(move |(h, _)| h.kind == kind)
            .map(|(h, _)| &h.id)
    }
}

/// What the data directory holds against what the index says.
#[derive(Debug, Default)]
pub struct Survey {
    /// Packs the index names.
    pub indexed_packs: usize,
    /// Indexed packs whose file is gone.
    pub missing: Vec<String>,
    /// Indexed packs whose file is shorter than recorded: (name, recorded, actual).
    pub short: Vec<(String, u64, u64)>,
    /// Packs not in the index, read.
    pub unknown: Vec<UnknownPack>,
    /// Packs a running process is writing.
    pub being_written: Vec<String>,
    /// Generations stored in the data files that the index does not list and no tombstone
    /// removed: (name, manifest, pack name if in an unknown pack).
    pub unlisted: Vec<(String, ObjectId, Option<String>)>,
    /// Manifests in the data files that are not listed because the generation of their name is
    /// listed from another manifest: (name, manifest). Two ingests of a VM in one second
    /// record the same name only when the first was killed before its commit (it was never
    /// reported saved).
    pub shadowed: Vec<(String, ObjectId)>,
    /// Manifests in the data files that are not generations because they cannot be read or
    /// are not valid (hand-made, damaged): (manifest, why).
    pub bad_manifests: Vec<(ObjectId, String)>,
    /// Manifests every tombstone (indexed or not) names.
    pub tombstoned: HashSet<ObjectId>,
    /// The index's gc epoch and the data files', when the index's is lower (it is a copy from
    /// before a gc that deleted or rewrote packs).
    pub stale_epoch: Option<(u64, u64)>,
}

/// Reads `data/` against `index`: missing and short packs, unknown packs (each read to its
/// end), and generations whose manifest the index does not list.
pub fn survey(repo: &Repository, index: &Index, progress: &dyn Progress) -> Result<Survey> {
    let backend = &**repo.backend();
    let mut s = Survey::default();
    // One listing of the data files gives every length (one request per thousand packs in
    // an object store, not one per pack); the gc epoch is read meanwhile (in object storage
    // both are round trips).
    let (data_epoch, listed) = std::thread::scope(|scope| {
        let epoch = scope.spawn(|| repo.gc_epoch());
        let listed = list_packs(backend);
        (epoch.join().expect("gc epoch reader panicked"), listed)
    });
    let (have, data) = (index.gc_epoch()?, data_epoch?);
    if have < data {
        s.stale_epoch = Some((have, data));
    }
    let known = index.packs()?;
    s.indexed_packs = known.len();
    let known_names: HashSet<&str> = known.iter().map(|(n, _)| n.as_str()).collect();
    let listed: HashMap<String, u64> = listed?.into_iter().collect();
    for (name, size) in &known {
        match listed.get(name) {
            Some(&len) if len < *size => s.short.push((name.clone(), *size, len)),
            Some(_) => {}
            None => s.missing.push(name.clone()),
        }
    }
    let mut unknown: Vec<(String, u64)> = listed
        .into_iter()
        .filter(|(n, _)| !known_names.contains(n.as_str()))
        .collect();
    unknown.sort();
    let mut sizes = Vec::new();
    // In an object store a listed object is complete: its listed length is its length.
    let remote = crate::backend::is_remote(backend.location());
    for (name, listed) in unknown {
        if is_being_written(backend, &name) {
            s.being_written.push(name);
        } else if remote {
            sizes.push((name, listed));
        } else {
            // Its length now: it may have grown since it was listed (a writer that finished).
            let size = pack_len(backend, &name)?.unwrap_or(listed);
            sizes.push((name, size));
        }
    }
    if !sizes.is_empty() {
        // The markers of ingests still committing (or killed while committing), listed once.
        let markers = uncommitted_packs(backend, !remote)?;
        // In an object store, packs with a description are known from it (reading them costs
        // their size in downloads); the others, and every pack of a directory (where reading
        // is cheap and verifies each record), are read record by record.
        let described = match remote.then(|| Descriptions::list(backend, repo.keys())) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                progress.note(&format!(
                    "pack descriptions cannot be listed ({e}); reading the packs instead"
                ));
                None
            }
        };
        progress.start(
            "reading pack files the index does not know",
            sizes.iter().map(|(_, n)| n).sum(),
        );
        for batch in sizes.chunks(256) {
            let fetched = match &described {
                Some(d) => d.fetch(repo.packs(), batch),
                None => batch.iter().map(|_| None).collect(),
            };
            for ((name, size), d) in batch.iter().zip(fetched) {
                let mut u = match d {
                    Some(d) => described_unknown(d),
                    None => read_unknown(repo, name, *size)?,
                };
                u.uncommitted = markers.contains(name);
                s.unknown.push(u);
                progress.advance(*size);
            }
        }
        progress.finish();
        for why in described.iter().flat_map(|d| d.take_ignored()) {
            progress.note(&format!("pack description not used: {why}"));
        }
    }

    // Tombstones: indexed ones and those in unknown packs (a prune killed before its commit
    // removed nothing, but what it names is not a generation to adopt either). One per prune
    // ever run: what each names is remembered in the index once read (a tombstone never
    // changes), and those not yet remembered are read many at once.
    let (indexed_manifests, indexed_tombstones) = index.manifests_and_tombstones()?;
    let mut unread = Vec::new();
    for id in indexed_tombstones {
        match index.tombstone_names(&id)? {
            Some(names) => s.tombstoned.extend(names),
            None => unread.push(id),
        }
    }
    let read = fanout::parallel(&unread, |id| {
        repo.read_object(id).and_then(|b| {
            Tombstone::decode(&b)
                .map_err(|e| Error::Corrupt(format!("tombstone {}: {e}", id.short())))
        })
    });
    for (id, t) in unread.iter().zip(read) {
        let names: Vec<ObjectId> = t?.removed.iter().map(|r| r.manifest).collect();
        // Best effort: an index this process may not write is read again next time.
        let _ = index.remember_tombstone(id, &names);
        s.tombstoned.extend(names);
    }
    for u in &s.unknown {
        s.tombstoned.extend(u.tombstoned.iter().copied());
    }

    // Generations: every manifest not tombstoned must be listed, unless the generation of its
    // name is listed from another manifest.
    let generations = index.generations(None)?;
    let listed: HashSet<ObjectId> = generations.iter().map(|g| g.manifest).collect();
    let names: HashSet<&str> = generations.iter().map(|g| g.name.as_str()).collect();
    let unlisted = |s: &mut Survey, name: String, id: ObjectId, pack: Option<String>| {
        if names.contains(name.as_str()) {
            s.shadowed.push((name, id));
        } else {
            s.unlisted.push((name, id, pack));
        }
    };
    for id in indexed_manifests {
        if listed.contains(&id) || s.tombstoned.contains(&id) {
            continue;
        }
        match repo.load_manifest(&id) {
            Ok(m) => unlisted(&mut s, generation_name(&m), id, None),
            Err(e) => s.bad_manifests.push((id, e.to_string())),
        }
    }
    let mut seen: HashSet<ObjectId> = s.unlisted.iter().map(|u| u.1).collect();
    let mut found = Vec::new();
    for u in s.unknown.iter().filter(|u| !u.uncommitted) {
        for (id, m) in &u.manifests {
            if listed.contains(id) || s.tombstoned.contains(id) || !seen.insert(*id) {
                continue;
            }
            found.push((generation_name(m), *id, u.name.clone()));
        }
        for (id, why) in &u.bad_manifests {
            if !listed.contains(id) && !s.tombstoned.contains(id) {
                s.bad_manifests
                    .push((*id, format!("{why} (in pack {})", u.name)));
            }
        }
    }
    for (name, id, pack) in found {
        unlisted(&mut s, name, id, Some(pack));
    }
    s.unlisted.sort();
    Ok(s)
}

/// `vm@time`: the name of the generation `m` records.
fn generation_name(m: &Manifest) -> String {
    format!("{}@{}", m.catalog.vm, m.catalog.time)
}

/// The packs whose ingest never committed, by their markers (see
/// [`layout::uncommitted_marker`]): those of `pending-` markers, and with `directory_markers`
/// (the index is the repository's own) those of `uncommitted-` markers, which only say so
/// against that index.
pub fn uncommitted_packs(
    backend: &dyn Backend,
    directory_markers: bool,
) -> Result<HashSet<String>> {
    let mut packs = HashSet::new();
    for e in backend
        .list(layout::LOCKS)
        .ctx("list", backend.path(layout::LOCKS))?
    {
        if let Some(p) = e.key.strip_prefix(layout::PENDING) {
            packs.insert(p.to_string());
        } else if let Some(p) = e.key.strip_prefix(layout::UNCOMMITTED) {
            if directory_markers {
                packs.insert(p.to_string());
            }
        }
    }
    Ok(packs)
}

/// An unknown pack known from its description: its records as described, its manifests and
/// tombstones as read (a few range reads instead of the whole pack).
fn described_unknown(d: Described) -> UnknownPack {
    let Described {
        description: d,
        metadata,
    } = d;
    let mut u = unknown_pack(&d.name, d.len);
    u.valid_len = d.len;
    u.described = true;
    for (h, plain) in metadata {
        match h.kind {
            ObjectKind::Manifest => match plain.and_then(|b| Manifest::decode(&b)) {
                Ok(m) => u.manifests.push((h.id, m)),
                Err(e) => u.bad_manifests.push((h.id, e)),
            },
            ObjectKind::Tombstone => {
                if let Ok(t) = plain.and_then(|b| Tombstone::decode(&b)) {
                    u.tombstoned.extend(t.removed.iter().map(|r| r.manifest));
                }
            }
            _ => {}
        }
    }
    u.records = d.records;
    u
}

/// An unknown pack of which nothing is known yet.
fn unknown_pack(name: &str, size: u64) -> UnknownPack {
    UnknownPack {
        name: name.to_string(),
        size,
        valid_len: PACK_HEADER_LEN,
        records: Vec::new(),
        manifests: Vec::new(),
        bad_manifests: Vec::new(),
        tombstoned: Vec::new(),
        damage: None,
        uncommitted: false,
        described: false,
    }
}

/// Reads an unknown pack record by record. A damaged record header does not end the reading:
/// the records after it are found too ([`scan_pack_resyncing`]), so a manifest behind the
/// damage is still seen (a generation hidden from gc would let it delete that generation's
/// other data files as left-overs). Such a pack has `damage` (never a left-over).
fn read_unknown(repo: &Repository, name: &str, size: u64) -> Result<UnknownPack> {
    let backend = &**repo.backend();
    let mut u = unknown_pack(name, size);
    // A record that does not start where the previous one ended was found past damage.
    let mut skipped = false;
    let (_, damage) = scan_pack_resyncing(backend, name, |rec| {
        skipped |= rec.offset != u.valid_len;
        u.valid_len = rec.offset + RECORD_HEADER_LEN as u64 + rec.header.stored_len as u64;
        match rec.header.kind {
            ObjectKind::Manifest => {
                match object::decode(&rec.header, &rec.payload, repo.keys(), None)
                    .map_err(|e| e.to_string())
                    .and_then(|b| Manifest::decode(&b))
                {
                    Ok(m) => u.manifests.push((rec.header.id, m)),
                    Err(e) => u.bad_manifests.push((rec.header.id, e)),
                }
            }
            ObjectKind::Tombstone => {
                // A tombstone that does not decode names nothing we can honour; it stays
                // in the pack, which is then kept (it holds a tombstone).
                if let Ok(t) = object::decode(&rec.header, &rec.payload, repo.keys(), None)
                    .map_err(|e| e.to_string())
                    .and_then(|b| Tombstone::decode(&b))
                {
                    u.tombstoned.extend(t.removed.iter().map(|r| r.manifest));
                }
            }
            _ => {}
        }
        u.records.push((rec.header, rec.offset));
        Ok(())
    })?;
    // Damage after the last record may be a torn write (a killed ingest): that alone is not.
    let torn_tail_only = !skipped
        && damage.len() == 1
        && crate::repo::pack::is_torn_write(backend, name, u.valid_len)?;
    if !damage.is_empty() && !torn_tail_only {
        u.damage = Some(damage.join("; "));
    }
    Ok(u)
}

/// Most objects [`unindexed_live`] collects before it gives up: beyond that the index is far
/// behind the data files and should be rebuilt rather than worked around.
const MAX_UNINDEXED: usize = 1 << 20;

/// Of `packs` (indexed packs that gc would delete or rewrite from what the index lists in them:
/// name, length, and how many index rows name the pack), those holding a record the live set
/// `live` needs and the index does not list anywhere, with how many such objects each holds:
/// gc keeps them, since deleting or rewriting them on the index's word would lose that record
/// (an index that lost rows, or a chunk forgotten as damaged that a damaged generation still
/// names). Each pack's records come from its description, or the pack when it has no usable
/// one; only a pack holding more records than rows name it is looked into record by record.
pub fn unindexed_live(
    repo: &Repository,
    index: &Index,
    mut packs: Vec<(String, u64, u64)>,
    live: &IdSet,
    progress: &dyn Progress,
) -> Result<Vec<(String, usize)>> {
    if packs.is_empty() {
        return Ok(Vec::new());
    }
    let backend = &**repo.backend();
    // A pack's description lists its records in a few kilobytes; the pack itself, read only
    // when it has no usable description, is mostly what gc is about to free.
    let described = Descriptions::list(backend, repo.keys()).ok();
    let mut lacking: Vec<(String, ObjectId)> = Vec::new();
    progress.start(
        "gc: checking the data files to change against the index",
        packs.len() as u64,
    );
    // In name order and small batches: the compacted descriptions of a few shards at a time
    // are in memory (see [`Descriptions::fetch`]).
    packs.sort_unstable();
    for batch in packs.chunks(32) {
        let wanted: Vec<(String, u64)> = batch.iter().map(|(n, l, _)| (n.clone(), *l)).collect();
        let fetched: Vec<Option<Described>> = match &described {
            Some(d) => d.fetch(repo.packs(), &wanted),
            None => batch.iter().map(|_| None).collect(),
        };
        for ((name, _, rows), d) in batch.iter().zip(fetched) {
            let ids: Vec<ObjectId> = match d {
                Some(d) => d.description.records.iter().map(|(h, _)| h.id).collect(),
                None => {
                    // Past a damaged record header too: the records after it count.
                    let mut ids = Vec::new();
                    scan_pack_resyncing(backend, name, |rec| {
                        ids.push(rec.header.id);
                        Ok(())
                    })?;
                    ids
                }
            };
            // Every record of the pack has its row unless it holds more records than rows.
            if ids.len() as u64 > *rows {
                for id in ids {
                    if !index.contains(&id)? {
                        lacking.push((name.clone(), id));
                    }
                }
            }
            if lacking.len() > MAX_UNINDEXED {
                return Err(Error::Corrupt(format!(
                    "gc stopped before deleting anything: the data files it would change hold \
                     more than {MAX_UNINDEXED} objects the index does not list (first: {} in \
                     pack {}): the index is far behind the data files. Run `vmrepo check \
                     --rebuild-index` to rebuild it from them",
                    lacking[0].1.short(),
                    lacking[0].0
                )));
            }
            progress.advance(1);
        }
    }
    progress.finish();
    let mut needed: HashSet<ObjectId> = lacking.iter().map(|(_, id)| *id).collect();
    live.retain_members(&mut needed)?;
    let mut held: HashMap<String, usize> = HashMap::new();
    for (pack, id) in &lacking {
        if needed.contains(id) {
            *held.entry(pack.clone()).or_default() += 1;
        }
    }
    let mut out: Vec<(String, usize)> = held.into_iter().collect();
    out.sort();
    Ok(out)
}

/// An unknown pack's fate.
#[derive(Debug)]
pub enum Verdict {
    /// Holds nothing anything needs: may be deleted.
    Leftover,
    /// Must stay; why.
    Keep(String),
}

impl Survey {
    /// Why the index cannot be trusted to say what is dead: packs it names that are gone or
    /// short (it is older than the data, or data was lost). Empty when it can.
    pub fn gaps(&self) -> Vec<String> {
        let mut g = Vec::new();
        if let Some((have, data)) = self.stale_epoch {
            g.push(format!(
                "the index is older than the data files (it has seen {have} gc run(s) that \
                 deleted data, the repository {data}): it is a copy from before a gc"
            ));
        }
        if !self.missing.is_empty() {
            g.push(format!(
                "the index names {} pack file(s) that are not in data/ (first: {}): data was \
                 lost, or the index is older than the data files",
                self.missing.len(),
                self.missing[0]
            ));
        }
        if !self.short.is_empty() {
            let (n, want, got) = &self.short[0];
            g.push(format!(
                "{} pack file(s) are shorter than the index recorded (first: {n}, {got} of \
                 {want} bytes)",
                self.short.len()
            ));
        }
        g
    }

    /// Of the objects in unknown packs that the index lacks (the only ones
    /// [`Survey::verdicts`] asks `needed` about), those in the live set `live`.
    pub fn needed(&self, index: &Index, live: &IdSet) -> Result<HashSet<ObjectId>> {
        let mut out = HashSet::new();
        for u in &self.unknown {
            for (h, _) in &u.records {
                if !index.contains(&h.id)? {
                    out.insert(h.id);
                }
            }
        }
        live.retain_members(&mut out)?;
        // A needed delta needs its base, wherever it is ([`crate::maintain::mark::with_bases`]
        // added the bases of the indexed ones to `live`).
        let mut bases = HashSet::new();
        for u in &self.unknown {
            for (h, _) in &u.records {
                if let Some(b) = h.base {
                    if out.contains(&h.id) && !index.contains(&b)? {
                        bases.insert(b);
                    }
                }
            }
        }
        out.extend(bases);
        Ok(out)
    }

    /// Whether each unknown pack may be deleted, given which objects the remaining
    /// generations need (`needed`, asked only about objects the index lacks) and what the
    /// index holds.
    pub fn verdicts(
        &self,
        index: &Index,
        needed: &dyn Fn(&ObjectId) -> bool,
    ) -> Result<Vec<(&UnknownPack, Verdict)>> {
        let unlisted: HashSet<ObjectId> = self.unlisted.iter().map(|u| u.1).collect();
        let incomplete = !self.gaps().is_empty();
        let mut out = Vec::new();
        for u in &self.unknown {
            let v = if incomplete {
                Verdict::Keep("the index is not complete (see above)".into())
            } else if let Some(why) = &u.damage {
                Verdict::Keep(format!("it holds damage ({why})"))
            } else if u
                .holds(ObjectKind::Manifest)
                .any(|id| unlisted.contains(id))
            {
                Verdict::Keep("it holds a generation the index does not list".into())
            } else if !u.bad_manifests.is_empty() {
                Verdict::Keep(format!(
                    "it holds a manifest that cannot be used ({})",
                    u.bad_manifests[0].1
                ))
            } else if !unlisted.is_empty() {
                Verdict::Keep("generations the index does not list may use it".into())
            } else if let Some(id) = u
                .holds(ObjectKind::Tombstone)
                .find(|id| !index.contains(id).unwrap_or(false))
            {
                Verdict::Keep(format!(
                    "it holds tombstone {} of a prune that did not finish",
                    id.short()
                ))
            } else {
                let mut lacking = 0usize;
                for (h, _) in &u.records {
                    if !index.contains(&h.id)? && needed(&h.id) {
                        lacking += 1;
                    }
                }
                if lacking > 0 {
                    Verdict::Keep(format!(
                        "it holds {lacking} object(s) that generations use and the index lacks"
                    ))
                } else {
                    Verdict::Leftover
                }
            };
            out.push((u, v));
        }
        Ok(out)
    }

    /// True when every data file is indexed or a proven left-over, every indexed pack is
    /// there, and every generation in the data files is listed.
    pub fn complete(&self) -> bool {
        self.gaps().is_empty() && self.unlisted.is_empty()
    }
}

/// What [`adopt`] did.
#[derive(Debug, Default)]
pub struct Adopted {
    /// Packs added to the index.
    pub packs: Vec<String>,
    /// Generations listed, with what they lack if anything.
    pub generations: Vec<(String, Option<String>)>,
}

/// Makes the index list every generation in the data files: indexes each unknown pack that
/// holds anything the index lacks (its records verified first; a damaged record is left out),
/// then lists each unlisted generation, marked damaged with what it lacks. Needs the exclusive
/// lock. Refuses when indexed packs are missing or short: then only a full rebuild
/// (`check --rebuild-index`) can tell what the data files hold.
pub fn adopt(
    repo: &Repository,
    index: &mut Index,
    survey: &Survey,
    progress: &dyn Progress,
) -> Result<Adopted> {
    let mut done = Adopted::default();
    if survey.unlisted.is_empty() && survey.unknown.is_empty() {
        return Ok(done);
    }
    let gaps = survey.gaps();
    if !gaps.is_empty() {
        return Err(Error::Corrupt(format!(
            "the index does not cover the data files ({} generation(s) it does not list, {} \
             pack file(s) it does not know), and {}. Nothing was changed; `vmrepo check \
             --rebuild-index` rebuilds the index from the data files",
            survey.unlisted.len(),
            survey.unknown.len(),
            gaps.join("; ")
        )));
    }
    let backend = &**repo.backend();
    for u in &survey.unknown {
        // A left-over is not indexed: then nothing can come to depend on it. A pack holding
        // damage is, as an index rebuild does: its verified records, not the damaged stretch.
        if u.uncommitted {
            continue;
        }
        // A described pack's records are taken as described (the description is verified
        // like any record); a pack read whole has each record verified before it is indexed.
        let records = unindexed_whole(repo, index, &u.name, &u.records, u.described)?;
        if records.is_empty() {
            continue;
        }
        // The pack is recorded as long as its last well-formed record; a torn tail beyond
        // that is never read.
        let key = layout::pack(&u.name);
        backend.sync(&key).ctx("fsync", backend.path(&key))?;
        index.add_pack(&u.name, u.valid_len, &records)?;
        progress.note(&format!(
            "indexed pack {} ({} objects the index lacked)",
            u.name,
            records.len()
        ));
        done.packs.push(u.name.clone());
    }
    if !done.packs.is_empty() {
        for why in drop_baseless_deltas(index)? {
            progress.note(&why);
        }
    }
    let by_id: HashMap<ObjectId, &Manifest> = survey
        .unknown
        .iter()
        .flat_map(|u| u.manifests.iter().map(|(id, m)| (*id, m)))
        .collect();
    for (name, id, _) in &survey.unlisted {
        let loaded;
        let m = match by_id.get(id) {
            Some(m) => *m,
            None => match repo.load_manifest(id) {
                Ok(m) => {
                    loaded = m;
                    &loaded
                }
                Err(e) => {
                    progress.note(&format!(
                        "{name}: manifest cannot be read ({e}); not listed"
                    ));
                    continue;
                }
            },
        };
        let lacks = crate::maintain::damage::find(repo, m)?;
        let detail = (!lacks.is_empty()).then(|| lacks.summary());
        if let Err(e) = index.insert_rebuilt_generation(*id, m, detail.as_deref()) {
            progress.note(&format!("{name}: not listed: {e}"));
            continue;
        }
        progress.note(&format!(
            "listed generation {name}, found in the data files{}",
            detail
                .as_deref()
                .map(|d| format!(" (damaged: {d})"))
                .unwrap_or_default()
        ));
        done.generations.push((name.clone(), detail));
    }
    Ok(done)
}

/// Of `records` (header, offset) of pack `pack`, those the index has no row for and that may
/// be indexed: each read back whole first, unless `trusted` (taken from a verified
/// description), or a delta, decoded only with its base, which may be in a pack not indexed
/// yet (check verifies that its base is indexed; `check --read-data` decodes it).
pub fn unindexed_whole<'a>(
    repo: &Repository,
    index: &Index,
    pack: &str,
    records: impl IntoIterator<Item = &'a (RecordHeader, u64)>,
    trusted: bool,
) -> Result<Vec<(RecordHeader, u64)>> {
    let mut out = Vec::new();
    for (h, offset) in records {
        if index.contains(&h.id)? {
            continue;
        }
        if trusted || h.codec == Codec::Delta || repo.packs().read_object(pack, *offset, h).is_ok()
        {
            out.push((h.clone(), *offset));
        }
    }
    Ok(out)
}

/// Drops the rows of deltas whose base no data file holds, once rows were added from the data
/// files, and says of each why it is not indexed.
pub fn drop_baseless_deltas(index: &mut Index) -> Result<Vec<String>> {
    Ok(index
        .drop_baseless_deltas()?
        .into_iter()
        .map(|(id, base)| {
            format!(
                "chunk {} is stored against chunk {}, which no data file holds: not indexed",
                id.short(),
                base.short()
            )
        })
        .collect())
}

/// Removes the [`layout::uncommitted_marker`]s that no longer say anything: those whose pack is
/// gone (gc deleted the left-over), `uncommitted-` markers of a directory whose pack is indexed
/// (the commit happened and the process died before removing it), and `uncommitted-` markers in
/// a bucket (left by earlier builds, see [`layout::uncommitted_marker`]). Needs the exclusive
/// lock (no ingest is committing).
pub fn clean_markers(repo: &Repository, index: &Index) -> Result<()> {
    let backend = &**repo.backend();
    let remote = crate::backend::is_remote(backend.location());
    let known: HashSet<String> = index.packs()?.into_iter().map(|(n, _)| n).collect();
    let markers = backend
        .list(layout::LOCKS)
        .ctx("list", backend.path(layout::LOCKS))?;
    let mut done = Vec::new();
    for m in markers {
        let (pack, directory) = if let Some(p) = m.key.strip_prefix(layout::PENDING) {
            (p, false)
        } else if let Some(p) = m.key.strip_prefix(layout::UNCOMMITTED) {
            (p, true)
        } else {
            continue;
        };
        let meaningless = directory && (remote || known.contains(pack));
        if meaningless || crate::repo::pack::pack_len(backend, pack)?.is_none() {
            done.push(m.key.clone());
        }
    }
    let _ = backend.delete(&done, Durability::Unsynced);
    Ok(())
}
