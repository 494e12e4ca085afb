//! Which kept segment leaves a new generation makes useless.
//!
//! The index keeps the leaf chaining values of every one-run segment an ingest stores (about
//! 2 KiB each, [`crate::repo::leaves`]), so that the next change-aware ingest of the same disk
//! can patch the segment around its changes. Only the VM's latest generation is patched that
//! way: once tonight's generation replaces a segment, the leaves of the one it replaced would
//! stay in the index for as long as that segment is stored, a megabyte a night on a disk with
//! scattered writes. They are forgotten in the generation's own commit instead. The leaves are
//! a cache: a segment that comes back (a clone of the VM, a reverted disk) gets them again the
//! next time an ingest meets it, and a change-aware ingest that finds none reads the segment
//! whole.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::repo::id::ObjectId;
use crate::repo::manifest::{DiskEntry, DiskMap, Manifest};
use crate::repo::Repository;

/// The segments of `vm`'s latest generation (`latest`, when the caller has it loaded already)
/// that tonight's disks (`disks`, with their maps) no longer hold anywhere; a disk left out
/// tonight counts as replaced. Empty when tonight's generation, at `time`, is not the newest
/// (one put in before the latest, with `--time`, replaces nothing).
pub(super) fn replaced_segments(
    repo: &Repository,
    vm: &str,
    time: &str,
    latest: Option<(&str, &Manifest)>,
    disks: &[(&DiskEntry, &DiskMap)],
) -> Result<Vec<ObjectId>> {
    let gen = match repo.with_index(|i| i.resolve(vm)) {
        Ok(g) => g,
        Err(Error::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if gen.time.as_str() >= time {
        return Ok(Vec::new());
    }
    let loaded;
    let before = match latest {
        Some((name, m)) if name == gen.name => m,
        _ => {
            loaded = repo.load_manifest(&gen.manifest)?;
            &loaded
        }
    };
    let kept: HashSet<ObjectId> = disks
        .iter()
        .flat_map(|(_, map)| map.nonzero().map(|(_, s)| *s))
        .collect();
    let mut replaced = HashSet::new();
    for prev in &before.disks {
        if disks.iter().any(|(d, _)| d.disk_map == prev.disk_map) {
            continue;
        }
        let map = repo.load_disk_map(&prev.disk_map)?;
        replaced.extend(map.nonzero().map(|(_, s)| *s).filter(|s| !kept.contains(s)));
    }
    Ok(replaced.into_iter().collect())
}
