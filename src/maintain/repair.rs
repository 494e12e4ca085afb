//! Repair: bring the index back in line with what the pack files really hold, mark the
//! generations that lost data as damaged, and notice when later ingests have healed them.
//!
//! * A missing or unreadable index is rebuilt from the pack files first.
//! * Records the packs hold by their descriptions and the index has no row for (rows an
//!   earlier repair dropped on a read that failed, or an index that lost them) are read, and
//!   indexed again when they read back whole.
//! * Every object is read and verified; index rows of missing or corrupt objects are dropped,
//!   with the segment-cache rows of segments that can no longer be read whole. A later ingest
//!   that reads the same data stores those chunks again (nothing tells it they exist).
//! * Packs whose file is gone are forgotten; truncated packs get their real length.
//! * Each generation that references something gone is marked damaged with what is missing:
//!   `list` shows it and `extract` refuses it unless `--allow-damaged`, never writing zeros
//!   silently. A damaged generation whose objects are all present again is unmarked (healed).

use std::collections::HashSet;

use serde::Serialize;

use crate::error::Result;
use crate::maintain::check::{check, CheckReport, ReadData};
use crate::maintain::coverage;
use crate::maintain::damage;
use crate::maintain::rebuild::{rebuild_index, RebuildReport, RecordSource};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::object::ObjectKind;
use crate::repo::pack_index::Descriptions;
use crate::repo::Repository;

/// What repair did.
#[derive(Clone, Debug, Serialize, Default)]
pub struct RepairReport {
    /// The index rebuild, if the index had to be rebuilt.
    pub rebuilt: Option<RebuildReport>,
    /// Why it was rebuilt.
    pub rebuild_reason: Option<String>,
    /// Packs that were in the data files but not in the index, now indexed.
    pub adopted_packs: Vec<String>,
    /// Generations that were in the data files but not in the index, now listed.
    pub adopted: Vec<String>,
    /// Index rows dropped because their data is missing or damaged.
    pub objects_dropped: u64,
    /// Records the packs hold (by their descriptions) that the index had no row for and that
    /// read back whole: indexed again.
    pub objects_reindexed: u64,
    /// Pack files the index knew that are gone.
    pub packs_forgotten: Vec<String>,
    /// Truncated pack files whose recorded length was corrected.
    pub packs_truncated: Vec<String>,
    /// Generations now marked damaged, with what they lost.
    pub damaged: Vec<(String, String)>,
    /// Generations that were marked damaged and are whole again.
    pub healed: Vec<String>,
    /// The check after repair.
    pub check: CheckReport,
}

/// Repairs `repo`, which must be open with the exclusive lock.
pub fn repair(repo: &Repository, progress: &dyn Progress) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let reason = match repo.open_index() {
        Err(e) => Some(format!("{e}")),
        Ok(i) => match i.integrity_check() {
            Ok(p) if p.is_empty() => None,
            Ok(p) => Some(format!("SQLite reports damage: {}", p.join("; "))),
            Err(e) => Some(format!("{e}")),
        },
    };
    // The index is a cache: generations or objects in data files it does not know are
    // brought in before anything is dropped or marked on its word. When it also names packs
    // that are gone, only a full rebuild can tell what the data files hold.
    let reason = match reason {
        Some(r) => Some(r),
        None => {
            let mut index = repo.open_index()?;
            let survey = coverage::survey(repo, &index, progress)?;
            let needed = match crate::maintain::mark::mark(repo, &index, &HashSet::new(), progress)
            {
                Ok(live) => Some(survey.needed(&index, &live.ids)?),
                Err(_) => None,
            };
            let needed = |id: &ObjectId| needed.as_ref().is_none_or(|n| n.contains(id));
            let unknown_matters = survey
                .verdicts(&index, &needed)?
                .iter()
                .any(|(_, v)| !matches!(v, coverage::Verdict::Leftover));
            if !survey.unlisted.is_empty() || unknown_matters {
                if survey.gaps().is_empty() {
                    let done = coverage::adopt(repo, &mut index, &survey, progress)?;
                    report.adopted_packs = done.packs;
                    report.adopted = done.generations.into_iter().map(|g| g.0).collect();
                    None
                } else {
                    Some(format!(
                        "the index does not cover the data files ({} generation(s) it does not \
                         list, {} pack file(s) it does not know) and {}",
                        survey.unlisted.len(),
                        survey.unknown.len(),
                        survey.gaps().join("; ")
                    ))
                }
            } else {
                None
            }
        }
    };
    if let Some(r) = reason {
        progress.note(&format!("rebuilding the index from the data files: {r}"));
        report.rebuilt = Some(rebuild_index(repo, RecordSource::PackFiles, progress)?);
        report.rebuild_reason = Some(r);
    }

    report.objects_reindexed = reindex_described(repo, progress)?;
    let found = check(repo, ReadData::All, progress)?;
    let mut index = repo.open_index()?;
    for name in &found.missing_packs {
        index.forget_pack(name)?;
        report.packs_forgotten.push(name.clone());
    }
    for (name, len) in &found.truncated_packs {
        index.set_pack_size(name, *len)?;
        report.packs_truncated.push(name.clone());
    }
    index.forget_damaged_objects(&found.bad_objects, &found.bad_segments)?;
    report.objects_dropped = found.bad_objects.len() as u64;

    // Mark what is damaged now; unmark what is whole.
    for g in index.generations(None)? {
        let detail = match repo.load_manifest(&g.manifest) {
            Err(e) => Some(format!("manifest unreadable: {e}")),
            Ok(m) => {
                let d = damage::find(repo, &m)?;
                (!d.is_empty()).then(|| d.summary())
            }
        };
        match (&detail, &g.damaged) {
            (Some(d), _) => report.damaged.push((g.name.clone(), d.clone())),
            (None, Some(_)) => report.healed.push(g.name.clone()),
            (None, None) => continue,
        }
        index.set_damaged(&g, detail.as_deref())?;
    }
    index.checkpoint();
    drop(index);
    report.check = check(repo, ReadData::None, progress)?;
    Ok(report)
}

/// Indexes again the records that indexed packs hold, by their descriptions, and the index has
/// no row for, each read back whole first: rows an earlier repair dropped when a read failed
/// (the storage answers again), or rows an index lost. A generation that lacked only those
/// heals. Manifests and tombstones are left to the survey (gc drops the rows of dead manifests
/// on purpose). Packs without a usable description are not looked into (`check
/// --rebuild-index` reads every pack). Returns how many rows were added.
fn reindex_described(repo: &Repository, progress: &dyn Progress) -> Result<u64> {
    let backend = &**repo.backend();
    let Ok(described) = Descriptions::list(backend, repo.keys()) else {
        return Ok(0);
    };
    let mut index = repo.open_index()?;
    let packs = index.packs()?;
    let mut added = 0;
    for batch in packs.chunks(32) {
        for ((name, _), d) in batch.iter().zip(described.fetch(repo.packs(), batch)) {
            let Some(d) = d else { continue };
            let candidates =
                d.description.records.iter().filter(|(h, _)| {
                    !matches!(h.kind, ObjectKind::Manifest | ObjectKind::Tombstone)
                });
            // Each read back whole: what is listed was dropped for not doing so.
            let records = coverage::unindexed_whole(repo, &index, name, candidates, false)?;
            if !records.is_empty() {
                let n = index.add_records(name, &records)?;
                progress.note(&format!(
                    "pack {name}: {n} object(s) it holds are indexed again (they read back whole)"
                ));
                added += n;
            }
        }
    }
    if added > 0 {
        for why in coverage::drop_baseless_deltas(&mut index)? {
            added = added.saturating_sub(1);
            progress.note(&why);
        }
    }
    Ok(added)
}

/// Unmarks damaged generations whose objects are all present again (after an ingest re-stored
/// what they had lost). Returns their names.
pub fn heal(repo: &Repository) -> Result<Vec<String>> {
    let mut index = repo.open_index()?;
    let mut healed = Vec::new();
    if !index.has_damaged()? {
        return Ok(healed);
    }
    for g in index.generations(None)? {
        if g.damaged.is_none() {
            continue;
        }
        let Ok(m) = repo.load_manifest(&g.manifest) else {
            continue;
        };
        if damage::find(repo, &m)?.is_empty() {
            index.set_damaged(&g, None)?;
            healed.push(g.name.clone());
        }
    }
    Ok(healed)
}

/// Re-examines damaged generations after an ingest, which may have stored again what they had
/// lost; returns those healed. Run by the ingest's callers once its generation is committed, so
/// the write path does not depend on check and damage. A failure does not fail the ingest; it is
/// reported as a warning.
pub fn heal_after_ingest(repo: &Repository, progress: &dyn Progress) -> Vec<String> {
    match heal(repo) {
        Ok(h) => h,
        Err(e) => {
            progress.note(&format!(
                "warning: could not re-examine damaged generations: {e}"
            ));
            Vec::new()
        }
    }
}
