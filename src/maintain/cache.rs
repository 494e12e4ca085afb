//! Keeping this host's index of a repository in object storage up to date. There the index is
//! a cache: other hosts add packs and generations, a gc elsewhere deletes packs, and the cache
//! may be lost. Before a command uses it, [`refresh`] brings it level with the objects: it is
//! built from the data files when absent, rebuilt when a gc has run since it was last brought
//! up to date (or packs it names are gone), and otherwise taught the packs and generations it
//! does not know. A lost or damaged cache therefore costs time, never data.

use crate::error::Result;
use crate::maintain::coverage::{adopt, survey};
use crate::maintain::rebuild::{rebuild_index, RebuildReport, RecordSource};
use crate::progress::Progress;
use crate::repo::Repository;

/// What [`refresh`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// The cache knew every pack already.
    Current,
    /// Packs written by others were added (how many, and how many of those were known from
    /// their descriptions rather than read), with the generations they hold and the
    /// generations their tombstones removed (how many).
    Added {
        packs: usize,
        described: usize,
        generations: usize,
        pruned: usize,
    },
    /// The cache was (re)built from the data files, for the reason given.
    Rebuilt {
        why: String,
        /// Packs indexed, and how many of them from their descriptions.
        packs: u64,
        described: u64,
    },
}

fn rebuilt(r: RebuildReport, why: String) -> Refreshed {
    Refreshed::Rebuilt {
        why,
        packs: r.packs,
        described: r.described,
    }
}

/// Brings the index of `repo` level with its data files (see the module documentation).
pub fn refresh(repo: &Repository, progress: &dyn Progress) -> Result<Refreshed> {
    if !repo.has_index() {
        let r = rebuild_index(repo, RecordSource::Descriptions, progress)?;
        return Ok(rebuilt(
            r,
            "this host had no cache of the repository's index".into(),
        ));
    }
    let mut index = match repo.open_index() {
        Ok(i) => i,
        Err(e) => {
            let r = rebuild_index(repo, RecordSource::Descriptions, progress)?;
            return Ok(rebuilt(r, format!("the cached index was unusable: {e}")));
        }
    };
    let s = survey(repo, &index, progress)?;
    let why = match (&s.stale_epoch, s.gaps()) {
        (Some((have, now)), _) => Some(format!(
            "a gc has run since it was last brought up to date (gc epoch {have}, now {now})"
        )),
        (None, gaps) if !gaps.is_empty() => Some(gaps.join("; ")),
        _ => None,
    };
    if let Some(why) = why {
        drop(index);
        let r = rebuild_index(repo, RecordSource::Descriptions, progress)?;
        return Ok(rebuilt(r, why));
    }
    if s.unknown.is_empty() && s.unlisted.is_empty() {
        return Ok(Refreshed::Current);
    }
    let done = adopt(repo, &mut index, &s, progress)?;
    // A prune elsewhere: its tombstone (now indexed) names generations this cache still lists.
    let pruned: Vec<_> = index
        .generations(None)?
        .into_iter()
        .filter(|g| s.tombstoned.contains(&g.manifest))
        .collect();
    if !pruned.is_empty() {
        index.remove_generations(None, &pruned)?;
    }
    Ok(Refreshed::Added {
        packs: done.packs.len(),
        described: s
            .unknown
            .iter()
            .filter(|u| u.described && done.packs.contains(&u.name))
            .count(),
        generations: done.generations.len(),
        pruned: pruned.len(),
    })
}
