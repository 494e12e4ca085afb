//! Garbage collection: find the objects no remaining generation references (mark and sweep
//! over metadata only), drop their index rows, delete pack files that hold nothing live, and
//! rewrite pack files whose live fraction is below a threshold so the space returns to the
//! filesystem.
//!
//! Safety: gc runs under the exclusive repository lock, so no ingest can dedup against an object
//! it is about to delete (an ingest waits for gc, or gc for the ingests). Every step is ordered so
//! that a kill at any instant leaves every kept generation complete: copies are sealed (fsynced)
//! before one index transaction moves the rows to them, and old files are unlinked only after
//! that transaction. A killed gc leaves at worst unindexed pack files, which the next gc deletes.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use crate::backend::Durability;
use crate::error::{Error, Result};
use crate::maintain::id_set::Partition;
use crate::maintain::mark::{mark, LiveSet};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::Index;
use crate::repo::object::{EncodedObject, ObjectKind, RecordHeader, RECORD_HEADER_LEN};
use crate::repo::pack::{delete_packs, PackWriter, PACK_HEADER_LEN};
use crate::repo::store::PACK_TARGET;
use crate::repo::Repository;

/// Options of a gc run.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Plan and report only.
    pub dry_run: bool,
    /// Rewrite a pack when its live bytes are below this fraction of its size (0.0..=1.0).
    pub repack_threshold: f64,
    /// Then also rewrite the emptiest packs until the unreferenced bytes left in pack files are
    /// at most this fraction of the live bytes (restic's `--max-unused`).
    pub max_unused: f64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            repack_threshold: 0.2,
            max_unused: 0.05,
        }
    }
}

/// What gc found and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Generations whose objects were kept.
    pub generations: u64,
    /// Objects still referenced.
    pub objects_live: u64,
    /// Objects no generation references.
    pub objects_dead: u64,
    /// Pack bytes (headers included) of those objects.
    pub bytes_dead: u64,
    /// Pack files deleted because nothing in them is live.
    pub packs_deleted: u64,
    /// Pack files rewritten because their live fraction was below the threshold.
    pub packs_rewritten: u64,
    /// New pack files written by the rewrite.
    pub packs_written: u64,
    /// Live bytes copied by the rewrite.
    pub bytes_copied: u64,
    /// Bytes returned to the filesystem (pack files deleted or shrunk).
    pub bytes_freed: u64,
    /// Unreferenced bytes left in pack files that were not worth rewriting.
    pub bytes_left: u64,
    /// Left-over pack files of interrupted runs that were deleted.
    pub orphan_packs: u64,
    /// Their bytes.
    pub orphan_bytes: u64,
    /// Metadata bytes (manifests, disk maps, segments) read to find what is live.
    pub metadata_read: u64,
    /// Generations found in the data files that the index did not list, now listed.
    pub adopted: Vec<String>,
    /// Pack files the index does not know that were kept, and why.
    pub kept_unindexed: Vec<String>,
    /// Indexed pack files left as they are, instead of being deleted or rewritten, because
    /// they hold objects that generations use and the index does not list; and why.
    pub kept_for_unlisted: Vec<String>,
    /// Packs left alone because a live object in them is damaged.
    pub problems: Vec<String>,
    /// Damaged generations whose unreadable parts could not be followed.
    pub damaged_generations: Vec<String>,
    /// The pack descriptions compacted, if they were.
    pub descriptions: Option<crate::maintain::describe::Compaction>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// What gc found in one indexed pack: counts and sizes, not the records themselves, so memory
/// follows the number of packs.
#[derive(Clone, Debug, Default)]
struct PackPlan {
    size: u64,
    live_objects: u64,
    live_bytes: u64,
    dead_objects: u64,
    dead_bytes: u64,
    /// Its dead manifests and segments, whose rows go even when the pack is kept (see
    /// [`kept_pack_rows`]); its other dead records are only counted.
    dead_metadata: Vec<(ObjectId, ObjectKind)>,
}

fn record_len(h: &RecordHeader) -> u64 {
    RECORD_HEADER_LEN as u64 + h.stored_len as u64
}

/// Whether the record is live: a tombstone (live through its kind) or in the live set.
fn is_live(h: &RecordHeader, part: &Partition<'_, ObjectId>) -> bool {
    h.kind == ObjectKind::Tombstone || part.contains(&h.id)
}

/// Splits every indexed pack into live and dead records, one partition of the live set at a
/// time against the index rows of its id range.
fn sweep(index: &Index, live: &LiveSet) -> Result<HashMap<String, PackPlan>> {
    let mut plans: HashMap<String, PackPlan> = index
        .packs()?
        .into_iter()
        .map(|(name, size)| {
            (
                name,
                PackPlan {
                    size,
                    ..PackPlan::default()
                },
            )
        })
        .collect();
    for part in live.ids.partitions() {
        let part = part?;
        index.for_each_object_in_range(&part.first, part.end.as_ref(), |loc| {
            let plan = plans
                .get_mut(&loc.pack)
                .expect("objects reference known packs");
            let len = record_len(&loc.header);
            if is_live(&loc.header, &part) {
                plan.live_objects += 1;
                plan.live_bytes += len;
            } else {
                plan.dead_objects += 1;
                plan.dead_bytes += len;
                if matches!(loc.header.kind, ObjectKind::Manifest | ObjectKind::Segment) {
                    plan.dead_metadata.push((loc.header.id, loc.header.kind));
                }
            }
            Ok(())
        })?;
    }
    Ok(plans)
}

/// Live records of a pack gc rewrites at most this many at a time (each wave of packs is one
/// more pass over the index; about 100 bytes each in memory).
const REWRITE_WAVE: u64 = 1 << 20;

/// The live records (offset, header) of `packs`, in offset order per pack: another pass over
/// the live set against the index.
fn live_records(
    index: &Index,
    live: &LiveSet,
    packs: &[&String],
) -> Result<HashMap<String, Vec<(u64, RecordHeader)>>> {
    let mut out: HashMap<String, Vec<(u64, RecordHeader)>> =
        packs.iter().map(|n| ((*n).clone(), Vec::new())).collect();
    for part in live.ids.partitions() {
        let part = part?;
        index.for_each_object_in_range(&part.first, part.end.as_ref(), |loc| {
            if let Some(v) = out.get_mut(&loc.pack) {
                if is_live(&loc.header, &part) {
                    v.push((loc.offset, loc.header));
                }
            }
            Ok(())
        })?;
    }
    for v in out.values_mut() {
        v.sort_by_key(|(offset, _)| *offset);
    }
    Ok(out)
}

/// What gc does with each indexed pack: delete it, rewrite its live records into a new pack,
/// or keep it (see [`kept_pack_rows`] for what happens to its dead rows).
struct PackActions<'a> {
    drop: Vec<String>,
    rewrite: Vec<&'a String>,
    keep: Vec<&'a String>,
}

/// Decides per pack: nothing live → delete; live share under `repack_threshold` → rewrite;
/// then, while the garbage left in kept packs exceeds `max_unused` of all live bytes, rewrite
/// the kept packs with the smallest live share too (ties by name, so the plan is the same on
/// every run).
fn plan_packs(
    plans: &HashMap<String, PackPlan>,
    repack_threshold: f64,
    max_unused: f64,
) -> PackActions<'_> {
    let mut names: Vec<&String> = plans.keys().collect();
    names.sort();
    let mut drop = Vec::new();
    let mut rewrite = Vec::new();
    let mut keep = Vec::new();
    for name in names {
        let p = &plans[name];
        if p.live_objects == 0 {
            drop.push(name.clone());
        } else if (p.live_bytes as f64) < repack_threshold * p.size as f64 {
            rewrite.push(name);
        } else {
            keep.push(name);
        }
    }
    let live_total: u64 = plans.values().map(|p| p.live_bytes).sum();
    let mut left: u64 = keep.iter().map(|n| garbage(&plans[*n])).sum();
    keep.sort_by(|a, b| {
        let share = |n: &String| plans[n].live_bytes as f64 / plans[n].size.max(1) as f64;
        share(a).total_cmp(&share(b)).then(a.cmp(b))
    });
    let mut kept = keep.into_iter().peekable();
    // 100% or more turns the bound off, as `--max-unused` says (garbage may exceed live data).
    while max_unused < 1.0 && (left as f64) > max_unused * live_total as f64 {
        let Some(name) = kept.next_if(|n| garbage(&plans[*n]) > 0) else {
            break;
        };
        left -= garbage(&plans[name]);
        rewrite.push(name);
    }
    PackActions {
        drop,
        rewrite,
        keep: kept.collect(),
    }
}

/// The dead records of a pack gc keeps: which index rows to drop and which segment-cache rows
/// to forget.
///
/// The records stay in the pack, so their rows stay in the index: an index describes what the
/// data files hold. Another host's cache of the index still lists them (nothing was deleted, so
/// nothing tells it to rebuild), and an ingest there may deduplicate against them and make them
/// live again. This index must then still know where they are, or a later rewrite of the pack
/// would copy only what it knows and lose them. Only two things go: manifest rows (a tombstone
/// names each, so they are never generations again) and the segment-cache rows of dead segments
/// (a cache hit reuses a segment without storing its chunks, and the chunks of a dead segment
/// may be in a pack this gc deletes).
fn kept_pack_rows(p: &PackPlan, rows: &mut Vec<ObjectId>, segments: &mut Vec<ObjectId>) {
    for (id, kind) in &p.dead_metadata {
        match kind {
            ObjectKind::Manifest => rows.push(*id),
            ObjectKind::Segment => segments.push(*id),
            _ => {}
        }
    }
}

/// Bytes of a pack that hold no live record.
fn garbage(p: &PackPlan) -> u64 {
    p.size.saturating_sub(p.live_bytes + PACK_HEADER_LEN)
}

/// Bytes that removing the generations with manifests `removed` would leave unreferenced.
pub fn unreferenced_after(
    repo: &Repository,
    removed: &HashSet<ObjectId>,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let index = repo.open_index()?;
    let live = mark(repo, &index, removed, progress)?;
    let plans = sweep(&index, &live)?;
    Ok((
        plans.values().map(|p| p.dead_objects).sum(),
        plans.values().map(|p| p.dead_bytes).sum(),
    ))
}

/// Runs gc on `repo`, which must be open with the exclusive lock.
pub fn gc(repo: &Repository, opts: &GcOptions, progress: &dyn Progress) -> Result<GcReport> {
    let began = Instant::now();
    if !opts.dry_run {
        if let Some(note) = repo.release_reserve_if_full() {
            progress.note(&note);
        }
    }
    let mut index = repo.open_index()?;
    let backend = &**repo.backend();
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };

    // The index is a cache: before it says what is dead, prove it covers the data files.
    // Generations in the data files that it does not list are adopted first; packs it does
    // not know are deleted only when read and shown to hold nothing anything needs.
    let survey = crate::maintain::coverage::survey(repo, &index, progress)?;
    let gaps = survey.gaps();
    if !gaps.is_empty() {
        return Err(Error::Corrupt(format!(
            "gc stopped before deleting anything: {}. Run `vmrepo check` to see which \
             generations are affected, then `vmrepo check --rebuild-index` to rebuild the index \
             from the data files",
            gaps.join("; ")
        )));
    }
    let survey = if survey.unlisted.is_empty() || opts.dry_run {
        for (name, _, _) in &survey.unlisted {
            report.adopted.push(format!("{name} (would be listed)"));
        }
        survey
    } else {
        let adopted = crate::maintain::coverage::adopt(repo, &mut index, &survey, progress)?;
        report.adopted = adopted.generations.iter().map(|(n, _)| n.clone()).collect();
        let again = crate::maintain::coverage::survey(repo, &index, progress)?;
        if !again.complete() {
            return Err(Error::Corrupt(format!(
                "gc stopped before deleting anything: {} generation(s) in the data files could \
                 not be added to the index (first: {}). `vmrepo check --rebuild-index` rebuilds \
                 the index from the data files",
                again.unlisted.len(),
                again.unlisted.first().map(|u| u.0.as_str()).unwrap_or("?")
            )));
        }
        again
    };

    let live = mark(repo, &index, &HashSet::new(), progress)?;
    report.generations = live.generations;
    report.metadata_read = live.metadata_read;
    report.damaged_generations = live.damaged.clone();
    // Which unknown packs are proven left-overs (none while generations are unlisted: in a
    // dry run, those that would be listed keep what they reference).
    let mut orphans = Vec::new();
    let needed = survey.needed(&index, &live.ids)?;
    for (u, verdict) in survey.verdicts(&index, &|id| needed.contains(id))? {
        match verdict {
            crate::maintain::coverage::Verdict::Leftover => {
                report.orphan_packs += 1;
                report.orphan_bytes += u.size;
                orphans.push(u.name.clone());
            }
            crate::maintain::coverage::Verdict::Keep(why) => report
                .kept_unindexed
                .push(format!("pack {}: {why}", u.name)),
        }
    }
    let plans = sweep(&index, &live)?;

    for p in plans.values() {
        report.objects_live += p.live_objects;
        report.objects_dead += p.dead_objects;
        report.bytes_dead += p.dead_bytes;
    }
    let PackActions {
        drop: mut drop_packs,
        mut rewrite,
        mut keep,
    } = plan_packs(&plans, opts.repack_threshold, opts.max_unused);
    // The index said what in these packs is live; the packs say what they hold. A record that
    // a generation needs and the index does not list keeps its pack as it is.
    let changing: Vec<(String, u64, u64)> = drop_packs
        .iter()
        .chain(rewrite.iter().copied())
        .map(|n| {
            let p = &plans[n];
            (n.clone(), p.size, p.live_objects + p.dead_objects)
        })
        .collect();
    for (name, n) in
        crate::maintain::coverage::unindexed_live(repo, &index, changing, &live.ids, progress)?
    {
        report.kept_for_unlisted.push(format!(
            "pack {name}: it holds {n} object(s) that generations use and the index does not \
             list (`vmrepo check` names the generations; `vmrepo check --rebuild-index` \
             indexes what can be read)"
        ));
        drop_packs.retain(|d| *d != name);
        rewrite.retain(|r| **r != name);
        if let Some((k, _)) = plans.get_key_value(&name) {
            keep.push(k);
        }
    }
    let (mut dead_rows, mut dead_segments) = (Vec::new(), Vec::new());
    for name in keep {
        report.bytes_left += garbage(&plans[name]);
        kept_pack_rows(&plans[name], &mut dead_rows, &mut dead_segments);
    }
    if opts.dry_run {
        report.packs_deleted = drop_packs.len() as u64;
        report.packs_rewritten = rewrite.len() as u64;
        report.bytes_freed = report.orphan_bytes
            + drop_packs.iter().map(|n| plans[n].size).sum::<u64>()
            + rewrite
                .iter()
                .map(|n| plans[*n].size - plans[*n].live_bytes)
                .sum::<u64>();
        report.bytes_copied = rewrite.iter().map(|n| plans[*n].live_bytes).sum();
        report.seconds = began.elapsed().as_secs_f64();
        return Ok(report);
    }

    // Deleting is safe only while no ingest can run: stop if the lock may be lost.
    repo.ensure_locked()?;
    // Any older copy of the index would name what is deleted below: make it known as stale.
    if !drop_packs.is_empty() || !rewrite.is_empty() {
        repo.raise_gc_epoch(&index)?;
    }
    delete_packs(backend, &orphans, Durability::Synced)?;
    report.bytes_freed += report.orphan_bytes;

    // 1. Forget dead rows and packs with nothing live, in one transaction; then unlink those.
    index.apply_gc(&drop_packs, &[], &dead_rows, &dead_segments)?;
    delete_packs(backend, &drop_packs, Durability::Synced)?;
    for name in &drop_packs {
        report.packs_deleted += 1;
        report.bytes_freed += plans[name].size;
    }

    // 2. Rewrite packs that are mostly garbage: copy their live records (verified) into new
    //    packs, seal, move the rows in one transaction, then unlink the old files.
    let total: u64 = rewrite.iter().map(|n| plans[*n].live_bytes).sum();
    progress.start("gc: rewrite packs", total);
    let mut out: Option<PackWriter> = None;
    let mut out_records: Vec<(RecordHeader, u64)> = Vec::new();
    let mut batch: Vec<String> = Vec::new();
    // In waves of packs whose live records fit in memory together.
    let mut waves: Vec<Vec<&String>> = Vec::new();
    let mut in_wave = 0;
    let wave = crate::maintain::batch(REWRITE_WAVE);
    for name in rewrite {
        if waves.is_empty() || in_wave + plans[name].live_objects > wave {
            waves.push(Vec::new());
            in_wave = 0;
        }
        in_wave += plans[name].live_objects;
        waves.last_mut().expect("pushed").push(name);
    }
    for wave in waves {
        let mut records_of = live_records(&index, &live, &wave)?;
        for name in wave {
            let p = &plans[name];
            let live_here = records_of.remove(name).unwrap_or_default();
            let records = match read_live(repo, name, live_here) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(format!(
                        "pack {name} was not rewritten: {e}; run `vmrepo check --repair`"
                    ));
                    progress.advance(p.live_bytes);
                    continue;
                }
            };
            if out.is_none() {
                out = Some(PackWriter::create(repo.backend(), &repo.keys_arc())?);
            }
            let pack = out.as_mut().unwrap();
            for obj in &records {
                let offset = pack.append(obj)?;
                out_records.push((obj.header.clone(), offset));
                report.bytes_copied += obj.record_len();
            }
            progress.advance(p.live_bytes);
            batch.push(name.clone());
            if pack.len() >= PACK_TARGET {
                commit_rewrite(
                    &mut index,
                    repo,
                    out.take().unwrap(),
                    &mut out_records,
                    &mut batch,
                    &plans,
                    &mut report,
                )?;
            }
        }
    }
    drop(live);
    if let Some(pack) = out.take() {
        commit_rewrite(
            &mut index,
            repo,
            pack,
            &mut out_records,
            &mut batch,
            &plans,
            &mut report,
        )?;
    }
    progress.finish();
    crate::maintain::coverage::clean_markers(repo, &index)?;
    // Descriptions of the packs deleted above are now wrong: compact them from the index. A
    // failure here loses nothing (a description is a hint; packs without one are read).
    let changed = report.packs_deleted + report.packs_rewritten + report.orphan_packs > 0;
    match crate::maintain::describe::compact(repo, &index, changed) {
        Ok(c) => report.descriptions = c,
        Err(e) => report
            .problems
            .push(format!("the pack descriptions were not compacted: {e}")),
    }
    index.checkpoint();
    index.vacuum_if_sparse()?;
    repo.restore_reserve();
    report.seconds = began.elapsed().as_secs_f64();
    Ok(report)
}

/// Reads and verifies the live records `live` (offset order) of a pack (at most one pack's
/// worth of memory).
fn read_live(
    repo: &Repository,
    name: &str,
    live: Vec<(u64, RecordHeader)>,
) -> Result<Vec<EncodedObject>> {
    live.into_iter()
        .map(|(offset, header)| {
            let payload = repo.packs().read_record(name, offset, &header)?;
            repo.decode_record_at(name, offset, &header, &payload)?;
            Ok(EncodedObject { header, payload })
        })
        .collect()
}

fn commit_rewrite(
    index: &mut Index,
    repo: &Repository,
    pack: PackWriter,
    records: &mut Vec<(RecordHeader, u64)>,
    batch: &mut Vec<String>,
    plans: &HashMap<String, PackPlan>,
    report: &mut GcReport,
) -> Result<()> {
    // The rows move to the new pack and the old packs are forgotten in one transaction; the
    // old files are deleted only after it.
    let written = if pack.is_empty() {
        pack.discard();
        index.apply_gc(batch, &[], &[], &[])?;
        0
    } else {
        let written = pack.seal_then(std::mem::take(records), |sealed| {
            index.apply_gc(batch, std::slice::from_ref(sealed), &[], &[])?;
            Ok(sealed.size)
        })?;
        report.packs_written += 1;
        written
    };
    repo.ensure_locked()?;
    delete_packs(&**repo.backend(), batch, Durability::Synced)?;
    let old: u64 = batch.iter().map(|name| plans[name].size).sum();
    report.packs_rewritten += batch.len() as u64;
    report.bytes_freed += old.saturating_sub(written);
    batch.clear();
    records.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pack of `size` bytes holding `live` bytes of live records (one record) and the rest
    /// dead, or nothing live at all when `live` is 0.
    fn pack(size: u64, live: u64) -> PackPlan {
        PackPlan {
            size,
            live_objects: u64::from(live > 0),
            live_bytes: live,
            dead_objects: 1,
            dead_bytes: size - PACK_HEADER_LEN - live,
            dead_metadata: Vec::new(),
        }
    }

    fn plan(packs: &[(&str, u64, u64)], threshold: f64, max_unused: f64) -> [Vec<String>; 3] {
        let plans: HashMap<String, PackPlan> = packs
            .iter()
            .map(|(n, size, live)| (n.to_string(), pack(*size, *live)))
            .collect();
        let a = plan_packs(&plans, threshold, max_unused);
        let names = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>();
        [a.drop, names(a.rewrite), names(a.keep)]
    }

    #[test]
    fn empty_packs_are_deleted_and_mostly_dead_ones_rewritten() {
        let [drop, rewrite, keep] = plan(
            &[
                ("a", 1016, 0),
                ("b", 1016, 100),
                ("c", 1016, 900),
                ("d", 1016, 1000),
            ],
            0.2,
            1.0,
        );
        assert_eq!(drop, ["a"]);
        assert_eq!(rewrite, ["b"]);
        assert_eq!(keep, ["c", "d"]);
    }

    #[test]
    fn garbage_over_the_bound_rewrites_the_emptiest_kept_packs_first() {
        // Live 2500 in all; garbage in kept packs: c 400, d 300, e 100 = 800. With
        // max_unused 0.2 (500 allowed) the emptiest, c, goes; 400 left is under the bound.
        let packs = [
            ("c", 1016, 600),
            ("d", 1016, 700),
            ("e", 1016, 900),
            ("f", 316, 300),
        ];
        let [drop, rewrite, keep] = plan(&packs, 0.2, 0.2);
        assert!(drop.is_empty());
        assert_eq!(rewrite, ["c"]);
        assert_eq!(keep, ["d", "e", "f"]);
        // A tighter bound takes d as well; a bound of 0 takes every pack with any garbage,
        // never one without (f).
        let [_, rewrite, _] = plan(&packs, 0.2, 0.05);
        assert_eq!(rewrite, ["c", "d"]);
        let [_, rewrite, keep] = plan(&packs, 0.2, 0.0);
        assert_eq!(rewrite, ["c", "d", "e"]);
        assert_eq!(keep, ["f"]);
        // 100% turns the bound off, even where the garbage exceeds the live bytes.
        let mostly_dead = [("g", 1016, 300), ("h", 1016, 300)];
        let [_, rewrite, keep] = plan(&mostly_dead, 0.2, 1.0);
        assert!(rewrite.is_empty());
        assert_eq!(keep, ["g", "h"]);
    }
}
