//! Integrity check of a repository: index against pack files, every generation's references
//! (through the reference walk), optionally every byte.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::maintain::id_set::{IdSet, IdSpill, Keyed, Sorted, Spill};
use crate::maintain::walk::{Reference, SegmentPlace, Visitor, Walk};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::Index;
use crate::repo::layout;
use crate::repo::manifest::{DiskEntry, DiskMap, Extent, Manifest, Segment, StoredSegment};
use crate::repo::object::{ObjectKind, RecordHeader, DELTA_BASE_LEN, RECORD_HEADER_LEN};
use crate::repo::pack::pack_len;
use crate::repo::pack_index::{Descriptions, PackDescription};
use crate::repo::Repository;

/// A generation with damage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DamagedGeneration {
    /// `vm@time`.
    pub generation: String,
    /// Damaged disks (slot and descriptor) or `manifest`/file names.
    pub parts: Vec<String>,
    /// One line per problem found.
    pub problems: Vec<String>,
}

/// Result of a check.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CheckReport {
    /// Generations checked.
    pub generations: u64,
    /// Objects in the index.
    pub objects: u64,
    /// Stored bytes of those objects.
    pub stored_bytes: u64,
    /// Objects whose bytes were read and verified.
    pub objects_read: u64,
    /// Problems that are not tied to one generation (missing packs, index damage).
    pub problems: Vec<String>,
    /// Damaged generations.
    pub damaged: Vec<DamagedGeneration>,
    /// The index does not cover the data files (generations or objects it lacks).
    pub index_incomplete: bool,
    /// Harmless findings (leftovers of interrupted ingests).
    pub notes: Vec<String>,
    /// Objects in the index whose stored bytes are missing or damaged (for repair).
    #[serde(skip)]
    pub bad_objects: Vec<ObjectId>,
    /// Segments that cannot be read whole (for repair).
    #[serde(skip)]
    pub bad_segments: Vec<ObjectId>,
    /// Packs the index knows whose file is missing (for repair).
    #[serde(skip)]
    pub missing_packs: Vec<String>,
    /// Packs whose file is shorter than the index says, with their real length (for repair).
    #[serde(skip)]
    pub truncated_packs: Vec<(String, u64)>,
}

/// How much stored data a check reads and verifies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReadData {
    /// Headers only: every index row is checked against the record header in its pack.
    None,
    /// Every object is read, decompressed and re-hashed.
    All,
    /// A random selection of pack files holding about this fraction (0..=1) of the bytes.
    Fraction(f64),
    /// Slice `n` of `m` (1-based): the packs whose name hashes to `n-1` modulo `m`, so `m`
    /// runs with n = 1..m read everything once.
    Slice(u32, u32),
}

impl ReadData {
    /// Parses `--read-data-subset` values: `10%` or `n/m`.
    pub fn parse_subset(s: &str) -> std::result::Result<ReadData, String> {
        let bad = || {
            format!("bad read-data subset {s:?}: give a percentage like 10% or a slice like 2/7")
        };
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(bad());
            }
            return Ok(ReadData::Fraction(v / 100.0));
        }
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let m: u32 = m.trim().parse().map_err(|_| bad())?;
        if m == 0 || n == 0 || n > m {
            return Err(bad());
        }
        Ok(ReadData::Slice(n, m))
    }

    fn reads_anything(self) -> bool {
        self != ReadData::None
    }
}

/// Which packs a check reads in full.
fn select_packs(mode: ReadData, packs: &[(String, u64)]) -> HashSet<String> {
    match mode {
        ReadData::None => HashSet::new(),
        ReadData::All => packs.iter().map(|(n, _)| n.clone()).collect(),
        ReadData::Slice(n, m) => packs
            .iter()
            .filter(|(name, _)| {
                let h = u64::from_str_radix(&name[..16.min(name.len())], 16).unwrap_or(0);
                h % m as u64 == (n - 1) as u64
            })
            .map(|(n, _)| n.clone())
            .collect(),
        ReadData::Fraction(f) => {
            let mut order: Vec<(u64, &String, u64)> = packs
                .iter()
                .map(|(n, size)| {
                    let mut r = [0u8; 8];
                    let _ = getrandom::fill(&mut r);
                    (u64::from_le_bytes(r), n, *size)
                })
                .collect();
            order.sort();
            let total: u64 = packs.iter().map(|(_, s)| s).sum();
            let want = (total as f64 * f).ceil() as u64;
            let mut got = 0;
            let mut out = HashSet::new();
            for (_, name, size) in order {
                if got >= want {
                    break;
                }
                got += size;
                out.insert(name.clone());
            }
            out
        }
    }
}

impl CheckReport {
    /// True when nothing is damaged.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.damaged.is_empty()
    }
}

/// Checks `repo`; `read` says which stored objects are also decompressed and re-hashed.
pub fn check(repo: &Repository, read: ReadData, progress: &dyn Progress) -> Result<CheckReport> {
    let index = repo.open_index()?;
    let mut report = CheckReport::default();
    for p in index.integrity_check()? {
        report
            .problems
            .push(format!("index {}: {p}", index.path().display()));
    }
    let backend = &**repo.backend();

    // Packs: the index's list against the files.
    let known = index.packs()?;
    for (name, size) in &known {
        let path = backend.path(&layout::pack(name));
        match pack_len(backend, name) {
            Ok(Some(len)) => {
                if len < *size {
                    report.truncated_packs.push((name.clone(), len));
                    report.problems.push(format!(
                        "pack file {} is truncated: {len} bytes, the index recorded {size}",
                        path.display(),
                    ));
                }
            }
            _ => {
                report.missing_packs.push(name.clone());
                report
                    .problems
                    .push(format!("pack file {} is missing", path.display()))
            }
        }
    }
    // Packs the index does not know, and generations in the data files it does not list.
    let survey = crate::maintain::coverage::survey(repo, &index, progress)?;
    for name in &survey.being_written {
        report
            .notes
            .push(format!("pack {name} is being written by a running ingest"));
    }
    if let Some((have, data)) = survey.stale_epoch {
        report.index_incomplete = true;
        report.problems.push(format!(
            "the index is older than the data files (it has seen {have} gc run(s) that deleted \
             data, the repository {data}): it was restored from a copy made before a gc and may \
             name data that is gone. Ingest, gc and repair refuse it; `vmrepo check \
             --rebuild-index` rebuilds it from the data files"
        ));
    }
    if !survey.unlisted.is_empty() {
        report.index_incomplete = true;
        let first: Vec<&str> = survey
            .unlisted
            .iter()
            .take(3)
            .map(|u| u.0.as_str())
            .collect();
        report.problems.push(format!(
            "{} generation(s) are in the data files but not in the index (first: {}{}): an \
             ingest was killed between writing its last data file and recording it, or the \
             index is older than the data or was emptied. Nothing is lost; {}",
            survey.unlisted.len(),
            first.join(", "),
            if survey.unlisted.len() > 3 {
                ", ..."
            } else {
                ""
            },
            if survey.gaps().is_empty() {
                "`vmrepo check --repair` (or `vmrepo gc`) lists them"
            } else {
                "`vmrepo check --rebuild-index` rebuilds the index from the data files"
            }
        ));
    }
    if !survey.bad_manifests.is_empty() {
        let (id, why) = &survey.bad_manifests[0];
        report.problems.push(format!(
            "{} manifest(s) in the data files are not generations: they cannot be read or are \
             not valid (first: {}: {why}); they were not listed and nothing was restored from \
             them",
            survey.bad_manifests.len(),
            id.short()
        ));
    }
    if let Some((name, id)) = survey.shadowed.first() {
        report.notes.push(format!(
            "{} manifest(s) are not generations because a generation of their name is listed              from another manifest (first: {name}, manifest {}): left by an ingest killed before              its commit, never reported saved (`vmrepo gc` deletes what only they use)",
            survey.shadowed.len(),
            id.short()
        ));
    }
    if !survey.unknown.is_empty() {
        // What the listed generations need, to tell left-overs from data the index lacks.
        // Unknown if their metadata cannot be read: then nothing is called a left-over.
        let needed = match crate::maintain::mark::mark(
            repo,
            &index,
            &HashSet::new(),
            &crate::progress::NoProgress,
        ) {
            Ok(live) => Some(survey.needed(&index, &live.ids)?),
            Err(_) => None,
        };
        let needed = |id: &ObjectId| needed.as_ref().is_none_or(|n| n.contains(id));
        let (mut leftovers, mut leftover_bytes) = (0u64, 0u64);
        // Kept packs grouped by reason: (count, first pack).
        let mut kept: Vec<(String, u64, String)> = Vec::new();
        for (u, verdict) in survey.verdicts(&index, &needed)? {
            match verdict {
                crate::maintain::coverage::Verdict::Leftover => {
                    leftovers += 1;
                    leftover_bytes += u.size;
                }
                crate::maintain::coverage::Verdict::Keep(why) => {
                    match kept.iter_mut().find(|k| k.0 == why) {
                        Some(k) => k.1 += 1,
                        None => kept.push((why, 1, u.name.clone())),
                    }
                }
            }
        }
        for (why, count, first) in kept {
            let line = format!(
                "{count} pack file(s) not in the index must be kept (first: {first}): {}",
                why.trim_start_matches("it ")
            );
            if why.contains("the index lacks") {
                report.index_incomplete = true;
                report.problems.push(format!(
                    "{line}; `vmrepo check --rebuild-index` rebuilds the index from the data files"
                ));
            } else {
                report.notes.push(line);
            }
        }
        if leftovers > 0 {
            report.notes.push(format!(
                "{leftovers} pack file(s), {leftover_bytes} bytes, are left over from \
                 interrupted runs: read to their end, they hold nothing any generation uses \
                 (`vmrepo gc` deletes them)"
            ));
        }
    }

    // Objects: every index row must point at a matching record (and, with read_data, good
    // bytes). The rows come in pack order and are checked a batch of whole packs at a time,
    // so memory holds one batch, not the repository.
    let (rows, stored_bytes) = index.object_totals()?;
    // The bases of the deltas met on the way, filed by id (on disk past a partition's worth):
    // asked about afterwards in the index's own order, once each.
    let mut bases = IdSpill::new(repo.index_dir(), rows)?;
    progress.start(
        if read.reads_anything() {
            "check (reading data)"
        } else {
            "check"
        },
        stored_bytes,
    );
    let mut pass = ObjectPass {
        repo,
        selected: select_packs(read, &known),
        descriptions: Descriptions::list(backend, repo.keys()).map_err(|e| {
            format!(
                "the pack descriptions in {} cannot be listed: {e}",
                backend.path(layout::PACK_INDEX).display()
            )
        }),
        progress,
        bad: Mutex::new(HashMap::new()),
        read_count: std::sync::atomic::AtomicU64::new(0),
        described_wrong: Vec::new(),
        packs_with_rows: HashSet::new(),
        known: known.iter().cloned().collect(),
    };
    let mut batch: Vec<(String, Vec<(u64, RecordHeader)>)> = Vec::new();
    let mut in_batch = 0u64;
    let batch_rows = crate::maintain::batch(CHECK_BATCH);
    index.for_each_object(|loc| {
        report.objects += 1;
        if let Some(base) = loc.header.base {
            bases.insert(base)?;
        }
        report.stored_bytes += RECORD_HEADER_LEN as u64 + loc.header.stored_len as u64;
        match batch.last_mut() {
            Some((p, v)) if *p == loc.pack => v.push((loc.offset, loc.header)),
            _ => {
                // A new pack: those before it are whole, checked once there are enough.
                if in_batch >= batch_rows {
                    pass.check_packs(&batch);
                    batch.clear();
                    in_batch = 0;
                }
                batch.push((loc.pack, vec![(loc.offset, loc.header)]));
            }
        }
        in_batch += 1;
        Ok(())
    })?;
    pass.check_packs(&batch);
    drop(batch);
    // Packs without a single row still have descriptions to agree with.
    for (name, len) in &known {
        if !pass.packs_with_rows.contains(name) {
            pass.check_description(name, *len, &[]);
        }
    }
    progress.finish();
    report.objects_read = pass.read_count.into_inner();
    match &pass.descriptions {
        Err(e) => report.problems.push(e.clone()),
        Ok(_) => {
            if let Some(first) = pass.described_wrong.first() {
                report.problems.push(format!(
                    "{} pack description(s) in {} disagree with the index (first: {first}). No \
                     data is affected, but a host building its cache from them would miss or \
                     misplace objects: delete those objects under pack-index/ (hosts then read \
                     the packs themselves); a gc that compacts the descriptions describes the \
                     packs again",
                    pass.described_wrong.len(),
                    backend.path(layout::PACK_INDEX).display()
                ));
            }
        }
    }
    let mut bad = pass.bad.into_inner().unwrap();
    check_bases(&index, bases.finish()?, &mut bad)?;
    report.bad_objects = bad.keys().copied().collect();

    // Generations: every reference must resolve to a good object. The first walk files the
    // chunks the segments list, with their lengths, to be asked about afterwards in id order
    // (asked as met, each was a random read of the index: 4.2 million at 64 GiB, 67 million at
    // 1 TiB); a second walk, only when some chunk turns out missing or of another length, names
    // the generations and segments that list it.
    let gens = index.generations(None)?;
    report.generations = gens.len() as u64;
    let listed = Mutex::new(Spill::<ListedChunk>::new(repo.index_dir(), report.objects)?);
    let failed = Mutex::new(None);
    let (mut damaged, mut walk) =
        walk_generations(repo, &bad, Chunks::File(&listed, &failed), &gens, progress)?;
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    match wrong_chunks(&index, listed.into_inner().unwrap().finish()?)? {
        Some(wrong) if wrong.is_empty() => {}
        Some(wrong) => {
            (damaged, walk) = walk_generations(repo, &bad, Chunks::Known(&wrong), &gens, progress)?;
        }
        None => {
            (damaged, walk) = walk_generations(repo, &bad, Chunks::Ask, &gens, progress)?;
        }
    }
    report.damaged = damaged;
    report.bad_segments = walk
        .into_verdicts()
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(id, _)| id)
        .collect();
    let unused_bad = bad.len();
    if unused_bad > 0 && report.damaged.is_empty() {
        report.problems.push(format!(
            "{unused_bad} damaged object(s) that no generation uses; first: {}",
            bad.values().next().unwrap()
        ));
    }
    Ok(report)
}

/// Index rows checked a batch of packs at a time: [`check`] reads about this many rows before
/// checking the whole packs among them (about 60 bytes each in memory).
const CHECK_BATCH: u64 = 1 << 18;

/// check's pass over the index rows, a batch of whole packs at a time: each row against its
/// record in the pack file (and with `--read-data` its bytes), each pack's rows against its
/// description.
struct ObjectPass<'a> {
    repo: &'a Repository,
    /// Packs whose objects are read in full.
    selected: HashSet<String>,
    /// The pack descriptions (`pack-index/`), or why they cannot be listed. A host with an
    /// empty cache takes a described pack's records from its description instead of reading
    /// the pack, so a description must list every record the index knows in that pack, at the
    /// same offset, and the pack's length. One that does not (or cannot be read) is a problem:
    /// nothing is lost (the pack is the truth), but a new host's cache would be wrong. Packs
    /// without a description are fine (they are read whole).
    descriptions: std::result::Result<Descriptions<'a>, String>,
    progress: &'a dyn Progress,
    /// Objects found damaged, with why.
    bad: Mutex<HashMap<ObjectId, String>>,
    read_count: std::sync::atomic::AtomicU64,
    /// Packs whose description disagrees with the index, with why.
    described_wrong: Vec<String>,
    /// Packs that have index rows.
    packs_with_rows: HashSet<String>,
    /// The index's packs with their recorded sizes.
    known: HashMap<String, u64>,
}

impl ObjectPass<'_> {
    /// Checks whole packs: their rows against the pack files, then against the descriptions.
    fn check_packs(&mut self, packs: &[(String, Vec<(u64, RecordHeader)>)]) {
        let (repo, backend) = (self.repo, &**self.repo.backend());
        let (bad, read_count) = (&self.bad, &self.read_count);
        let (selected, progress) = (&self.selected, self.progress);
        packs.par_iter().for_each(|(pack, objs)| {
            let path = backend.path(&layout::pack(pack));
            let len = pack_len(backend, pack);
            let read_data = selected.contains(pack);
            for (offset, h) in objs {
                progress.advance(RECORD_HEADER_LEN as u64 + h.stored_len as u64);
                let problem = match len {
                    Err(_) | Ok(None) => {
                        Some(format!("its pack file {} is missing", path.display()))
                    }
                    Ok(Some(len)) => {
                        let r = if read_data {
                            repo.read_record_at(pack, *offset, h).map(|_| ())
                        } else if offset + RECORD_HEADER_LEN as u64 + h.stored_len as u64 > len {
                            Err(Error::Corrupt(format!(
                                "pack file {} is truncated at offset {offset}",
                                path.display()
                            )))
                        } else {
                            // A delta's base, at the start of its payload, is read with the
                            // header.
                            let n = RECORD_HEADER_LEN + h.base.map_or(0, |_| DELTA_BASE_LEN);
                            repo.packs().read_span(pack, *offset, n, h).and_then(|b| {
                                let (head, payload) = b.split_at(RECORD_HEADER_LEN);
                                repo.packs().check_header(pack, *offset, head, h)?;
                                repo.packs().check_base(pack, *offset, payload, h)
                            })
                        };
                        read_count
                            .fetch_add(read_data as u64, std::sync::atomic::Ordering::Relaxed);
                        r.err().map(|e| e.to_string())
                    }
                };
                if let Some(p) = problem {
                    bad.lock().unwrap().insert(h.id, p);
                }
            }
        });
        for (pack, objs) in packs {
            self.packs_with_rows.insert(pack.clone());
            // A pack an ingest added after the index's packs were listed was checked against
            // its file above; its description is for the next check.
            if let Some(&size) = self.known.get(pack) {
                self.check_description(pack, size, objs);
            }
        }
    }

    /// Checks pack `name`'s description (if it has one) against its index rows `objs`.
    fn check_description(&mut self, name: &str, len: u64, objs: &[(u64, RecordHeader)]) {
        let Ok(listed) = &self.descriptions else {
            return;
        };
        match listed.stored(name) {
            None => {}
            Some(Err(why)) => self.described_wrong.push(format!(
                "pack {name}: its description cannot be read: {why}"
            )),
            Some(Ok(d)) => {
                if let Some(why) = disagreement(&d, len, objs) {
                    self.described_wrong.push(format!("pack {name}: {why}"));
                }
            }
        }
    }
}

/// Why description `d` of a pack of `len` bytes does not fit the index's rows `objs` of that
/// pack (offset, header), if it does not: another length, or a row it does not list as such.
fn disagreement(d: &PackDescription, len: u64, objs: &[(u64, RecordHeader)]) -> Option<String> {
    if d.len != len {
        return Some(format!(
            "its description says {} bytes, the index {len}",
            d.len
        ));
    }
    let described: HashMap<u64, &RecordHeader> =
        d.records.iter().map(|(h, offset)| (*offset, h)).collect();
    let (offset, h) = objs
        .iter()
        .find(|(offset, h)| described.get(offset) != Some(&h))?;
    Some(format!(
        "its description does not list {} {} at offset {offset}, where the index has it",
        h.kind.name(),
        h.id.short()
    ))
}

/// Walks every generation of `gens` with a [`Checker`] asking about chunks through `chunks`;
/// returns the damaged generations and the walk (with each distinct segment's verdict).
fn walk_generations<'a>(
    repo: &'a Repository,
    bad: &'a HashMap<ObjectId, String>,
    chunks: Chunks<'a>,
    gens: &[crate::repo::index::GenerationInfo],
    progress: &dyn Progress,
) -> Result<(Vec<DamagedGeneration>, Walk<Option<String>>)> {
    let mut damaged = Vec::new();
    let mut walk = Walk::every_place();
    let mut checker = Checker {
        repo,
        bad,
        chunks,
        generation: DamagedGeneration::default(),
        disk_problems: HashMap::new(),
        segment_size: 0,
        bad_segments: 0,
        first_bad: None,
    };
    progress.start("check: walk generations", gens.len() as u64);
    for g in gens {
        progress.advance(1);
        checker.generation = DamagedGeneration {
            generation: g.name.clone(),
            parts: Vec::new(),
            problems: Vec::new(),
        };
        match load::<Manifest>(repo, bad, &g.manifest, Manifest::decode) {
            // Each new segment is loaded and its chunks filed on every core.
            Ok(manifest) => walk.manifest_parallel(&mut checker, &manifest)?,
            Err(e) => {
                checker.generation.parts.push("manifest".into());
                checker.generation.problems.push(format!("manifest: {e}"));
            }
        }
        if !checker.generation.problems.is_empty() {
            damaged.push(std::mem::take(&mut checker.generation));
        }
    }
    progress.finish();
    Ok((damaged, walk))
}

/// A chunk a segment lists, with the length the segment gives it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ListedChunk {
    id: ObjectId,
    len: u32,
}

impl Keyed for ListedChunk {
    const LEN: usize = 36;
    fn id(&self) -> &ObjectId {
        &self.id
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.len.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        ListedChunk {
            id: ObjectId(b[..32].try_into().expect("32 bytes")),
            len: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
        }
    }
}

/// How [`check_segment`] learns whether a segment's chunks are indexed with its lengths.
#[derive(Clone, Copy)]
enum Chunks<'a> {
    /// The first walk: each segment's chunks are filed here, to be asked about in id order by
    /// [`wrong_chunks`]; a failed write of the set is kept in the second field.
    File(&'a Mutex<Spill<ListedChunk>>, &'a Mutex<Option<Error>>),
    /// The second walk: the chunks [`wrong_chunks`] found listed wrongly, each with the length
    /// the index gives it (`None`: not indexed). Every other chunk is as its segments list it.
    Known(&'a HashMap<ObjectId, Option<u32>>),
    /// The second walk when too many chunks are wrong to be held (an index far behind the
    /// data): each chunk is asked about as it is met.
    Ask,
}

/// Most wrong chunks [`wrong_chunks`] holds (about 60 bytes each); past that, the second walk
/// asks about each chunk instead, so memory stays bounded whatever the index lacks.
const MOST_WRONG: u64 = 1 << 20;

/// The chunks of `listed` that the index lacks or gives another length than some segment does,
/// with the length it gives them (`None`: it lacks them); `None` when there are more than
/// [`MOST_WRONG`]. Each partition of `listed` is met with the index's rows of the same id
/// range, both in id order: one pass over the rows, no question asked per chunk.
fn wrong_chunks(
    index: &Index,
    listed: Sorted<ListedChunk>,
) -> Result<Option<HashMap<ObjectId, Option<u32>>>> {
    let mut wrong = HashMap::new();
    let held = index.reading(|index| {
        for part in listed.partitions() {
            let part = part?;
            let items = part.items();
            let mut k = 0;
            index.for_each_raw_len_in_range(&part.first, part.end.as_ref(), |id, stored| {
                while k < items.len() && items[k].id < id {
                    wrong.insert(items[k].id, None);
                    k += 1;
                }
                while k < items.len() && items[k].id == id {
                    if items[k].len != stored {
                        wrong.insert(id, Some(stored));
                    }
                    k += 1;
                }
                Ok(())
            })?;
            for c in &items[k..] {
                wrong.insert(c.id, None);
            }
            if wrong.len() as u64 > crate::maintain::batch(MOST_WRONG) {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    Ok(held.then_some(wrong))
}

/// check's visitor of the reference graph: every reference must resolve to a good object;
/// what does not is reported per generation and per disk. Segments are loaded and checked on
/// several threads at once; their chunks are judged as [`Chunks`] says.
struct Checker<'a> {
    repo: &'a Repository,
    /// Objects found damaged by the pass over the pack files, with why.
    bad: &'a HashMap<ObjectId, String>,
    /// Where the segments' chunks are filed, or what is known to be wrong with them.
    chunks: Chunks<'a>,
    /// The generation being walked, with what is wrong with it so far.
    generation: DamagedGeneration,
    /// What is wrong with each disk (by slot) of the generation being walked.
    disk_problems: HashMap<String, Vec<String>>,
    /// The segment size of the disk being walked.
    segment_size: u32,
    /// Damaged segments of the disk being walked, and the first of them.
    bad_segments: usize,
    first_bad: Option<String>,
}

impl Visitor for Checker<'_> {
    /// What is wrong with the segment, if anything.
    type Segment = Option<String>;

    fn reference(&mut self, r: Reference<'_>) -> Result<()> {
        match r {
            Reference::File(f) => {
                if let Err(e) = object_ok(self.repo, self.bad, &f.object) {
                    self.generation.parts.push(f.name.clone());
                    self.generation
                        .problems
                        .push(format!("file {}: {e}", f.name));
                }
            }
            Reference::ExtentEdge { disk, id, .. } => {
                if let Err(e) = object_ok(self.repo, self.bad, &id) {
                    self.disk_problems
                        .entry(disk.slot.clone())
                        .or_default()
                        .push(format!("extent file bytes: {e}"));
                }
            }
        }
        Ok(())
    }

    fn disk_map(&mut self, disk: &DiskEntry) -> Result<Option<DiskMap>> {
        let map = load::<DiskMap>(self.repo, self.bad, &disk.disk_map, DiskMap::decode)
            .and_then(|m| disk.check_map(&m).map(|()| m));
        match map {
            Ok(map) => {
                self.segment_size = map.segment_size;
                Ok(Some(map))
            }
            Err(e) => {
                self.disk_problems
                    .entry(disk.slot.clone())
                    .or_default()
                    .push(format!("disk map: {e}"));
                Ok(None)
            }
        }
    }

    fn segment(&self, id: &ObjectId, len: u64) -> Option<String> {
        check_segment(self.repo, self.bad, self.chunks, id, len).err()
    }

    fn segment_at(&mut self, place: SegmentPlace<'_>, verdict: &Option<String>) -> Result<()> {
        if let Some(p) = verdict {
            self.bad_segments += 1;
            if self.first_bad.is_none() {
                let r = &place.range;
                self.first_bad = Some(format!("bytes {}..{}: {p}", r.start, r.end));
            }
        }
        Ok(())
    }

    fn disk_done(&mut self, disk: &DiskEntry) -> Result<()> {
        let mut problems = self.disk_problems.remove(&disk.slot).unwrap_or_default();
        if let Some(first) = self.first_bad.take() {
            problems.push(format!(
                "{} damaged segment(s) of {} MiB; first: {first}",
                self.bad_segments,
                self.segment_size >> 20,
            ));
        }
        self.bad_segments = 0;
        if !problems.is_empty() {
            let label = crate::maintain::damage::disk_label(disk);
            self.generation.parts.push(label.clone());
            self.generation
                .problems
                .extend(problems.into_iter().map(|p| format!("{label}: {p}")));
        }
        Ok(())
    }
}

/// Adds to `bad` every delta whose base is not a chunk stored on its own that is indexed and
/// undamaged: a delta is read only with its base. `bases` holds each delta's base once, in id
/// order, so the index is asked about them in its own order (at 64 GiB of deltas, 3.5 million
/// questions; asked in the deltas' order each one was a random read of the index). The deltas
/// are listed again, to name them, only when a base is wrong.
fn check_bases(index: &Index, bases: IdSet, bad: &mut HashMap<ObjectId, String>) -> Result<()> {
    let mut wrong: HashMap<ObjectId, String> = HashMap::new();
    index.reading(|index| {
        for part in bases.partitions() {
            for base in part?.ids() {
                let problem = match index.lookup(base)? {
                    None => Some("which is missing from the repository".to_string()),
                    Some(l) if l.header.base.is_some() => {
                        Some("which is itself stored as a delta".to_string())
                    }
                    Some(l) if l.header.kind != ObjectKind::Chunk => {
                        Some(format!("which is a {}, not a chunk", l.header.kind.name()))
                    }
                    Some(_) => bad.get(base).map(|p| format!("which is damaged ({p})")),
                };
                if let Some(p) = problem {
                    wrong.insert(*base, p);
                }
            }
        }
        Ok(())
    })?;
    if wrong.is_empty() {
        return Ok(());
    }
    let mut found = Vec::new();
    index.reading(|index| {
        index.for_each_delta_in_range(&ObjectId([0; 32]), None, |id, base| {
            if let Some(p) = wrong.get(&base) {
                found.push((
                    id,
                    format!(
                        "chunk {} is stored against chunk {}, {p}",
                        id.short(),
                        base.short()
                    ),
                ));
            }
            Ok(())
        })
    })?;
    for (id, p) in found {
        bad.entry(id).or_insert(p);
    }
    Ok(())
}

fn object_ok(
    repo: &Repository,
    bad: &HashMap<ObjectId, String>,
    id: &ObjectId,
) -> std::result::Result<(), String> {
    if let Some(p) = bad.get(id) {
        return Err(p.clone());
    }
    match repo.with_index(|i| i.contains(id)) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "object {} is missing from the repository",
            id.short()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn load<T>(
    repo: &Repository,
    bad: &HashMap<ObjectId, String>,
    id: &ObjectId,
    decode: fn(&[u8]) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    object_ok(repo, bad, id)?;
    let b = repo.read_object(id).map_err(|e| e.to_string())?;
    decode(&b)
}

/// What is wrong with chunk `id`, listed with length `len`, given the length the index gives it
/// (`Some(None)`: the index lacks it; `None`: not known to be wrong).
fn wrong_length(id: &ObjectId, len: u32, stored: Option<Option<u32>>) -> Option<String> {
    match stored {
        Some(None) => Some(format!(
            "chunk {} is missing from the repository",
            id.short()
        )),
        Some(Some(stored)) if stored != len => {
            Some(format!("chunk {} has the wrong length", id.short()))
        }
        _ => None,
    }
}

fn check_segment(
    repo: &Repository,
    bad: &HashMap<ObjectId, String>,
    chunks: Chunks<'_>,
    id: &ObjectId,
    len: u64,
) -> std::result::Result<(), String> {
    let seg = match load(repo, bad, id, StoredSegment::decode)? {
        StoredSegment::Whole(seg) => seg,
        StoredSegment::Delta(d) => {
            let against = |e: String| {
                format!(
                    "segment {} (stored against {}): {e}",
                    id.short(),
                    d.base.short()
                )
            };
            let base: Segment = load(repo, bad, &d.base, Segment::decode).map_err(against)?;
            d.resolve(&base).map_err(against)?
        }
    };
    if seg.len() != len {
        return Err(format!("segment {} has the wrong length", id.short()));
    }
    let mut damaged = 0;
    let mut first = None;
    let mut listed = Vec::new();
    // One read transaction for the segment (the fallback of the second walk asks in it).
    repo.reading_index(|index| {
        for e in &seg.extents {
            let Extent::Data { len, id } = e else {
                continue;
            };
            let problem = match chunks {
                Chunks::File(..) => {
                    listed.push(ListedChunk { id: *id, len: *len });
                    None
                }
                Chunks::Known(wrong) => wrong_length(id, *len, wrong.get(id).copied()),
                Chunks::Ask => match index.raw_len(id) {
                    Ok(stored) => wrong_length(id, *len, Some(stored)),
                    Err(e) => Some(e.to_string()),
                },
            };
            if let Some(p) = problem.or_else(|| bad.get(id).cloned()) {
                damaged += 1;
                first.get_or_insert(p);
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    if let Chunks::File(set, failed) = chunks {
        if let Err(e) = set.lock().unwrap().extend(listed) {
            failed.lock().unwrap().get_or_insert(e);
        }
    }
    match first {
        None => Ok(()),
        Some(p) => Err(format!("{damaged} bad chunk(s), first: {p}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::object::{Codec, ObjectKind};

    fn header(kind: ObjectKind, seed: u8) -> RecordHeader {
        RecordHeader {
            base: None,
            kind,
            codec: Codec::Zstd,
            stored_len: 100,
            raw_len: 200,
            id: ObjectId([seed; 32]),
            encrypted: false,
        }
    }

    /// A description must have the pack's length and list every record the index has in the
    /// pack where the index has it; records the index dropped (dead manifests) may remain.
    #[test]
    fn a_description_fits_only_the_index_rows_it_lists_in_place() {
        let (a, b, dead) = (
            header(ObjectKind::Chunk, 1),
            header(ObjectKind::Segment, 2),
            header(ObjectKind::Manifest, 3),
        );
        let d = PackDescription {
            name: "00".repeat(16),
            len: 500,
            records: vec![(a.clone(), 16), (b.clone(), 168), (dead, 320)],
        };
        let rows = vec![(16, a.clone()), (168, b.clone())];
        assert_eq!(disagreement(&d, 500, &rows), None);
        assert_eq!(disagreement(&d, 500, &[]), None);
        let why = disagreement(&d, 400, &rows).unwrap();
        assert!(why.contains("500 bytes, the index 400"), "{why}");
        // A record at another offset, or another record at that offset.
        let why = disagreement(&d, 500, &[(168, a.clone())]).unwrap();
        assert!(why.contains("does not list chunk"), "{why}");
        assert!(why.contains("offset 168"), "{why}");
        let other = header(ObjectKind::Chunk, 9);
        assert!(disagreement(&d, 500, &[(16, other)]).is_some());
    }
}
