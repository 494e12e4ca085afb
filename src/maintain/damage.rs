//! What of a generation the repository no longer holds: small files and disk byte ranges whose
//! objects are missing from the index. Found with index lookups and metadata reads only; no chunk
//! data is read. Used by repair (to describe damage), by ingest (to see whether a damaged
//! generation has healed) and by extract (to list damaged ranges before writing anything).

use std::cell::RefCell;
use std::ops::Range;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::maintain::walk::{Reference, SegmentPlace, Visitor, Walk};
use crate::repo::id::ObjectId;
use crate::repo::index::Index;
use crate::repo::manifest::{DiskEntry, DiskMap, Extent, Manifest};
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
    let mut finder = Finder {
        repo,
        index: &index,
        damage: Damage::default(),
        failed: RefCell::new(None),
    };
    Walk::every_place().manifest(&mut finder, manifest)?;
    Ok(finder.damage)
}

/// What a segment lacks.
enum Lacks {
    /// The segment object itself (why).
    Segment(String),
    /// These chunks: their bytes relative to the segment, and why.
    Chunks(Vec<(Range<u64>, String)>),
}

/// The damage report's visitor of the reference graph: index lookups and metadata reads only.
struct Finder<'a> {
    repo: &'a Repository,
    index: &'a Index,
    damage: Damage,
    /// An index lookup that failed while a segment was evaluated (reported at its place).
    failed: RefCell<Option<Error>>,
}

impl Finder<'_> {
    /// Adds a damaged range, merged with the previous one when adjacent on the same disk.
    fn push(&mut self, disk: &DiskEntry, range: Range<u64>, reason: String) {
        let label = disk_label(disk);
        match self.damage.ranges.last_mut() {
            Some(r) if r.disk == label && r.end == range.start => r.end = range.end,
            _ => self.damage.ranges.push(DamagedRange {
                disk: label,
                start: range.start,
                end: range.end,
                reason,
            }),
        }
    }
}

impl Visitor for Finder<'_> {
    type Segment = Lacks;

    fn reference(&mut self, r: Reference<'_>) -> Result<()> {
        match r {
            Reference::File(f) => {
                if !self.index.contains(&f.object)? {
                    self.damage.files.push(f.name.clone());
                }
            }
            Reference::ExtentEdge { extent, id, .. } => {
                if !self.index.contains(&id)? {
                    self.damage.files.push(format!(
                        "{} (bytes outside the extent)",
                        extent.file.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        Ok(())
    }

    fn disk_map(&mut self, disk: &DiskEntry) -> Result<Option<DiskMap>> {
        match self.repo.load_disk_map(&disk.disk_map) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                self.push(
                    disk,
                    0..disk.virtual_size,
                    format!("disk map unreadable: {e}"),
                );
                Ok(None)
            }
        }
    }

    fn segment(&self, id: &ObjectId, _len: u64) -> Lacks {
        let seg = match self.repo.load_segment(id) {
            Ok(seg) => seg,
            // A delta whose base is gone says so in the error.
            Err(Error::Corrupt(why)) => return Lacks::Segment(why),
            Err(_) => return Lacks::Segment(format!("segment {} missing", id.short())),
        };
        let mut missing = Vec::new();
        let mut pos = 0u64;
        for e in &seg.extents {
            if let Extent::Data { len, id } = e {
                match self.index.lookup(id) {
                    Ok(l) if l.as_ref().is_some_and(|l| l.header.raw_len == *len) => {}
                    Ok(_) => missing.push((
                        pos..pos + *len as u64,
                        format!("chunk {} missing", id.short()),
                    )),
                    Err(err) => {
                        self.failed.borrow_mut().get_or_insert(err);
                    }
                }
            }
            pos += e.len() as u64;
        }
        Lacks::Chunks(missing)
    }

    fn segment_at(&mut self, place: SegmentPlace<'_>, lacks: &Lacks) -> Result<()> {
        if let Some(e) = self.failed.borrow_mut().take() {
            return Err(e);
        }
        match lacks {
            Lacks::Segment(why) => self.push(place.disk, place.range, why.clone()),
            Lacks::Chunks(chunks) => {
                let at = place.range.start;
                for (r, why) in chunks {
                    self.push(place.disk, at + r.start..at + r.end, why.clone());
                }
            }
        }
        Ok(())
    }
}
