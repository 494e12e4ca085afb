//! Change-aware ingest: which byte ranges of each disk may differ from a previous generation.
//!
//! A change list comes from a `--changed-ranges` file (as exported from VMware CBT's
//! `QueryChangedDiskAreas` or a QEMU dirty bitmap). Ingest re-reads only the segments those
//! ranges touch and takes every other segment from the previous generation's disk map; since a
//! segment's objects are a pure function of its bytes, the result is exactly what a full ingest
//! of the same content gives.
//!
//! File format (JSON), either a bare list for a VM with one disk:
//!
//! ```json
//! [ { "offset": 0, "length": 65536 }, { "offset": 10485760, "length": 4096 } ]
//! ```
//!
//! or per disk, keyed by controller slot (`scsi0:0`, or `image` for a disk image), optionally
//! naming the generation the changes are relative to (else `--since` must):
//!
//! ```json
//! { "since": "web01@2026-11-21T01:00:03Z",
//!   "disks": { "scsi0:0": [ { "start": 0, "length": 65536 } ], "scsi0:1": [] } }
//! ```
//!
//! `start` is accepted for `offset` (CBT's name); other keys are ignored. A disk missing from a
//! per-disk file is read in full.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};

#[derive(Deserialize)]
struct Area {
    #[serde(alias = "start")]
    offset: u64,
    length: u64,
}

/// The two forms of a changed-ranges file.
enum FileForm {
    List(Vec<Area>),
    PerDisk {
        since: Option<String>,
        disks: BTreeMap<String, Vec<Area>>,
    },
}

#[derive(Deserialize)]
struct PerDiskForm {
    #[serde(default)]
    since: Option<String>,
    disks: BTreeMap<String, Vec<Area>>,
}

/// Changed ranges of one ingest.
#[derive(Clone, Debug, Default)]
pub struct ChangedRanges {
    /// The generation the changes are relative to, if the file names it.
    pub since: Option<String>,
    /// Ranges for the only disk (bare-list form).
    pub single: Option<Vec<Range<u64>>>,
    /// Ranges per disk slot (per-disk form).
    pub per_disk: BTreeMap<String, Vec<Range<u64>>>,
    /// Where they came from, for messages.
    pub source: String,
}

fn to_ranges(path: &Path, areas: Vec<Area>) -> Result<Vec<Range<u64>>> {
    let mut out = Vec::with_capacity(areas.len());
    for a in areas {
        let end = a.offset.checked_add(a.length).ok_or_else(|| {
            Error::bad_input(path, format!("range at offset {} overflows", a.offset))
        })?;
        if a.length > 0 {
            out.push(a.offset..end);
        }
    }
    out.sort_by_key(|r| r.start);
    Ok(out)
}

impl ChangedRanges {
    /// Reads a changed-ranges file.
    pub fn load(path: &Path) -> Result<ChangedRanges> {
        let text = std::fs::read_to_string(path).ctx("read changed-ranges file", path)?;
        let bad = |why: String| {
            Error::bad_input(
                path,
                format!(
                    "not a changed-ranges file: {why}; expected a JSON list of {{\"offset\", \"length\"}} \
                     or {{\"disks\": {{\"scsi0:0\": [...]}}}} (see docs/NIGHTLY.md)"
                ),
            )
        };
        // Decide the form by the top-level shape, then parse as that form, so that an error
        // says what is wrong in it (an untagged enum only says that no form matched).
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({e})")))?;
        let form = match &value {
            serde_json::Value::Array(_) => serde_json::from_value::<Vec<Area>>(value)
                .map(FileForm::List)
                .map_err(|e| bad(format!("in the list of ranges: {e}")))?,
            serde_json::Value::Object(_) => serde_json::from_value::<PerDiskForm>(value)
                .map(|p| FileForm::PerDisk {
                    since: p.since,
                    disks: p.disks,
                })
                .map_err(|e| bad(format!("in the per-disk form: {e}")))?,
            other => {
                return Err(bad(format!(
                    "the file holds a JSON {}",
                    match other {
                        serde_json::Value::Null => "null",
                        serde_json::Value::Bool(_) => "boolean",
                        serde_json::Value::Number(_) => "number",
                        _ => "string",
                    }
                )))
            }
        };
        let source = path.display().to_string();
        Ok(match form {
            FileForm::List(areas) => ChangedRanges {
                since: None,
                single: Some(to_ranges(path, areas)?),
                per_disk: BTreeMap::new(),
                source,
            },
            FileForm::PerDisk { since, disks } => {
                let mut per_disk = BTreeMap::new();
                for (slot, areas) in disks {
                    per_disk.insert(slot, to_ranges(path, areas)?);
                }
                ChangedRanges {
                    since,
                    single: None,
                    per_disk,
                    source,
                }
            }
        })
    }

    /// The changed ranges of disk `slot` (one of `disk_count` disks of `disk_size` bytes), or
    /// `None` if it must be read in full. Errors name the file and the reason.
    pub fn for_disk(
        &self,
        slot: &str,
        disk_count: usize,
        disk_size: u64,
    ) -> Result<Option<Vec<Range<u64>>>> {
        let ranges = match (&self.single, self.per_disk.get(slot)) {
            (Some(r), _) if disk_count == 1 => r,
            (Some(_), _) => {
                return Err(Error::BadInput {
                    path: self.source.clone().into(),
                    reason: format!(
                    "a bare list of ranges needs a VM with one disk, this one has {disk_count}; \
                         key the ranges by disk slot ({{\"disks\": {{\"{slot}\": [...]}}}})"
                ),
                })
            }
            (None, Some(r)) => r,
            (None, None) => return Ok(None),
        };
        if let Some(r) = ranges.iter().find(|r| r.end > disk_size) {
            return Err(Error::BadInput {
                path: self.source.clone().into(),
                reason: format!(
                    "range {}..{} of disk {slot} ends past the disk's {disk_size} bytes",
                    r.start, r.end
                ),
            });
        }
        Ok(Some(ranges.clone()))
    }

    /// Slots the file names that the VM does not have.
    pub fn unknown_slots<'a>(&'a self, slots: &[&str]) -> Vec<&'a str> {
        self.per_disk
            .keys()
            .map(|s| s.as_str())
            .filter(|s| !slots.contains(s))
            .collect()
    }
}

/// Which segments of a disk of `size` bytes cut in `segment_size` pieces the ranges touch, as
/// sorted, disjoint ranges of segment indexes (memory follows the ranges, not the disk's size).
pub fn touched_segments(ranges: &[Range<u64>], size: u64, segment_size: u64) -> Vec<Range<u64>> {
    let n = size.div_ceil(segment_size);
    let mut touched: Vec<Range<u64>> = ranges
        .iter()
        .filter(|r| r.start < r.end && r.start < size)
        .map(|r| r.start / segment_size..((r.end - 1) / segment_size + 1).min(n))
        .collect();
    touched.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(touched.len());
    for r in touched {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse_and_bad_files_are_named() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("c.json");
        std::fs::write(
            &f,
            r#"[{"offset": 4096, "length": 10}, {"start": 0, "length": 1}]"#,
        )
        .unwrap();
        let c = ChangedRanges::load(&f).unwrap();
        assert_eq!(
            c.for_disk("image", 1, 1 << 20).unwrap().unwrap(),
            vec![0..1, 4096..4106]
        );
        assert!(c.for_disk("scsi0:0", 2, 1 << 20).is_err());
        std::fs::write(
            &f,
            r#"{"since": "vm@-1", "disks": {"scsi0:0": [{"offset": 0, "length": 512, "x": 1}]}}"#,
        )
        .unwrap();
        let c = ChangedRanges::load(&f).unwrap();
        assert_eq!(c.since.as_deref(), Some("vm@-1"));
        assert!(c.for_disk("scsi0:1", 2, 1 << 20).unwrap().is_none());
        assert!(c.for_disk("scsi0:0", 2, 100).is_err(), "past the end");
        assert_eq!(c.unknown_slots(&["scsi0:1"]), vec!["scsi0:0"]);
        std::fs::write(&f, "{\"nope\": 1}").unwrap();
        let e = ChangedRanges::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("c.json") && e.contains("not a changed-ranges file"),
            "{e}"
        );
        // The error says what is wrong, not that no variant of an enum matched.
        for (text, want) in [
            (r#"[{"offset": 0}]"#, "missing field `length`"),
            (
                r#"{"disks": {"scsi0:0": [{"offset": -1, "length": 1}]}}"#,
                "invalid value",
            ),
            (r#"{"nope": 1}"#, "missing field `disks`"),
            ("17", "holds a JSON number"),
            ("[", "not JSON"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = ChangedRanges::load(&f).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains("untagged"), "{text}: {e}");
        }
    }

    #[test]
    fn touched_segments_cover_range_ends() {
        let t = touched_segments(&[0..1, 8..9, 23..24], 24, 8);
        assert_eq!(t, vec![0..3]);
        let t = touched_segments(&[9..12, 12..16], 40, 8);
        assert_eq!(t, vec![1..2]);
        // Unsorted, overlapping, empty and past-the-end ranges; a petabyte disk costs nothing.
        let t = touched_segments(&[30..33, 5..5, 0..9, 50..60], 40, 8);
        assert_eq!(t, vec![0..2, 3..5]);
        let t = touched_segments(&[0..1, (1 << 50) - 1..1 << 50], 1 << 50, 4 << 20);
        assert_eq!(t, vec![0..1, (1 << 28) - 1..1 << 28]);
    }
}
