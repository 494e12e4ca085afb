//! What of a generation the repository no longer holds: small files and disk byte ranges whose
//! objects are missing from the index. Found with index lookups and metadata reads only; no chunk
//! data is read. Used by repair (to describe damage), by ingest (to see whether a damaged
//! generation has healed) and by extract (to list damaged ranges before writing anything).

use std::collections::HashMap;

use serde::Serialize;

use crate::error::Result;
use crate::repo::id::ObjectId;
use crate::repo::manifest::{Extent, Manifest, Segment};
use crate::repo::Repository;

/// A byte range of a disk whose data is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedRange {
    /// The disk (`scsi0:0 (web01.vmdk)`).
    pub disk: String,
    /// First damaged byte (guest offset).
    pub start: u64,
    /// One past the last damaged byte.
    pub end: u64,
    /// What is missing.
    pub reason: String,
}

impl std::fmt::Display for DamagedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes {}..{} ({} KiB): {}",
            self.disk,
            self.start,
            self.end,
            (self.end - self.start).div_ceil(1024),
            self.reason
        )
    }
}

/// Everything of one generation that is missing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Damage {
    /// Small files (and extent-file edges) whose object is missing.
    pub files: Vec<String>,
    /// Disk ranges whose data is missing, merged where adjacent.
    pub ranges: Vec<DamagedRange>,
}

impl Damage {
    /// True when nothing is missing.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.ranges.is_empty()
    }

    /// A one-line summary (`2 files, 3 ranges of disk data (1.2 MiB)`).
    pub fn summary(&self) -> String {
        let bytes: u64 = self.ranges.iter().map(|r| r.end - r.start).sum();
        let mut parts = Vec::new();
        if !self.files.is_empty() {
            parts.push(format!("files {}", self.files.join(", ")));
        }
        if !self.ranges.is_empty() {
            parts.push(format!(
                "{} range(s) of disk data, {} bytes; first: {}",
                self.ranges.len(),
                bytes,
                self.ranges[0]
            ));
        }
        parts.join("; ")
    }
}

/// Label of a disk in messages.
pub fn disk_label(d: &crate::repo::manifest::DiskEntry) -> String {
    format!(
        "disk {} ({})",
        d.slot,
        d.descriptor
            .as_deref()
            .or(d.extents.first().and_then(|e| e.file.as_deref()))
            .unwrap_or("?")
    )
}

/// Lists what of `manifest`'s generation is missing from `repo`.
pub fn find(repo: &Repository, manifest: &Manifest) -> Result<Damage> {
    let index = repo.open_index()?;
    let mut damage = Damage::default();
    for f in &manifest.files {
        if !index.contains(&f.object)? {
            damage.files.push(f.name.clone());
        }
    }
    let mut segments: HashMap<ObjectId, Option<Segment>> = HashMap::new();
    for d in &manifest.disks {
        let label = disk_label(d);
        for e in &d.extents {
            for id in [e.head, e.tail].into_iter().flatten() {
                if !index.contains(&id)? {
                    damage.files.push(format!(
                        "{} (bytes outside the extent)",
                        e.file.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        let mut push = |start: u64, end: u64, reason: String| match damage.ranges.last_mut() {
            Some(r) if r.disk == label && r.end == start => r.end = end,
            _ => damage.ranges.push(DamagedRange {
                disk: label.clone(),
                start,
                end,
                reason,
            }),
        };
        let map = match repo.load_disk_map(&d.disk_map) {
            Ok(m) => m,
            Err(e) => {
                push(0, d.virtual_size, format!("disk map unreadable: {e}"));
                continue;
            }
        };
        for (i, id) in map.nonzero() {
            let (start, end) = map.segment_range(i);
            let seg = segments
                .entry(*id)
                .or_insert_with(|| repo.load_segment(id).ok());
            let Some(seg) = seg else {
                push(start, end, format!("segment {} missing", id.short()));
                continue;
            };
            let mut pos = start;
            for e in &seg.extents {
                if let Extent::Data { len, id } = e {
                    let ok = index.lookup(id)?.is_some_and(|l| l.header.raw_len == *len);
                    if !ok {
                        push(
                            pos,
                            pos + *len as u64,
                            format!("chunk {} missing", id.short()),
                        );
                    }
                }
                pos += e.len() as u64;
            }
        }
    }
    Ok(damage)
}
