//! Where a generation's files are restored: each disk's files under the names they are
//! restored as. Two disks whose files have the same names (the same VM folder name on two
//! datastores) are both kept: the first under its own name, each later one in a subdirectory
//! named after its datastore. Extract, the mount and the NBD server all use [`place`], so they
//! show the same names.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::manifest::{DiskEntry, Manifest};
use crate::repo::Repository;
use crate::restore::writer::DiskFormat;
use crate::vmware::vm::is_safe_relative;
use crate::vmware::vmx::Vmx;

/// A disk restored in a subdirectory because its file names are taken by another disk (or
/// file) of the same generation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MovedDisk {
    /// Controller slot (`scsi0:1`).
    pub slot: String,
    /// The name it was stored under (shared with another disk).
    pub stored_as: String,
    /// The name it is restored as (`ds2/web01.vmdk`).
    pub restored_as: String,
    /// The `fileName` the `.vmx` names it by, if any; the restored `.vmx` keeps it as stored.
    pub vmx_file_name: Option<String>,
    /// True when its descriptor had not been stored (the ingest kept the other disk's under
    /// that name) and was written afresh: same extents and data, a new CID, a default disk
    /// database (adapter type, geometry).
    pub descriptor_written_afresh: bool,
}

impl std::fmt::Display for MovedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disk {} ({}) restored as {}: another disk of this generation has files of the same \
             names",
            self.slot,
            self.vmx_file_name.as_deref().unwrap_or(&self.stored_as),
            self.restored_as
        )?;
        if self.descriptor_written_afresh {
            write!(
                f,
                "; its descriptor was not stored and was written afresh (new CID, default disk \
                 database)"
            )?;
        }
        write!(
            f,
            "; point the .vmx's {}.fileName at {} (or move its files where the .vmx says)",
            self.slot, self.restored_as
        )
    }
}

/// Where a generation's files are restored: its manifest with every disk's files under the
/// names they are restored as, descriptors to write that were not stored, and the disks that
/// moved. Extract and mount both use it, so they show the same names.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The manifest, with renamed disks (and their stored descriptors).
    pub manifest: Manifest,
    /// Descriptors written afresh: (name, bytes).
    pub generated: Vec<(String, Vec<u8>)>,
    /// Disks that were renamed.
    pub moved: Vec<MovedDisk>,
}

/// The stored `.vmx` (or `.vmtx`) of a generation, if it has one and it can be read.
pub fn stored_vmx(repo: &Repository, manifest: &Manifest) -> Option<String> {
    let f = manifest.files.iter().find(|f| {
        let l = f.name.to_ascii_lowercase();
        !l.contains('/') && (l.ends_with(".vmx") || l.ends_with(".vmtx"))
    })?;
    let data = repo.read_object(&f.object).ok()?;
    Some(String::from_utf8_lossy(&data).into_owned())
}

/// The datastore (or, off ESXi, the directory above the VM's folder) an absolute path is on:
/// `ds2` for `/vmfs/volumes/ds2/web01/web01.vmdk` and for `/mnt/ds2/web01/web01.vmdk`.
fn datastore_of(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let c: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let label = if c.len() >= 4 && c[0] == "vmfs" && c[1] == "volumes" {
        c[2]
    } else if c.len() >= 3 {
        c[c.len() - 3]
    } else if c.len() == 2 {
        c[0]
    } else {
        return None;
    };
    (is_safe_relative(label) && !label.starts_with('.') && !label.chars().any(char::is_control))
        .then(|| label.to_string())
}

/// The names a disk's files are restored as (given its placement).
fn disk_names(d: &DiskEntry, format: Option<DiskFormat>) -> Result<Vec<String>> {
    Ok(match crate::restore::writer::plan(d, format)? {
        Some(p) => p.outputs,
        None => d
            .descriptor
            .iter()
            .cloned()
            .chain(d.extents.iter().filter_map(|e| e.file.clone()))
            .collect(),
    })
}

/// `d` with every file name it restores under `prefix` (`ds2/`).
fn prefixed(d: &DiskEntry, prefix: &str) -> DiskEntry {
    let mut n = d.clone();
    if let Some(desc) = &mut n.descriptor {
        *desc = format!("{prefix}{desc}");
    }
    for e in &mut n.extents {
        if let Some(f) = &mut e.file {
            *f = format!("{prefix}{f}");
        }
    }
    if let Some(l) = &mut n.layout {
        l.file = format!("{prefix}{}", l.file);
    }
    n
}

/// Decides the restored names of a generation's files (`vmx` is its stored .vmx, `format` the
/// `--disk-format`). Files keep their stored names, except a disk whose names are already
/// taken — by an earlier disk (two disks of the same name from two datastores, which ingest
/// stores under the same base name) or by a small file: all its files go into a subdirectory
/// named after the datastore its .vmx `fileName` is on (`ds2/web01.vmdk`,
/// `ds2/web01-flat.vmdk`), or after its slot (`scsi0-1/`) when the .vmx names it by a relative
/// path. Its extent names stay relative to its descriptor, so the descriptor needs no change.
/// A flat disk whose descriptor was not stored (ingest kept the first disk's under the shared
/// name) gets one written afresh from its extents ([`crate::restore::writer::flat_descriptor`]).
pub fn place(
    manifest: &Manifest,
    vmx: Option<&str>,
    format: Option<DiskFormat>,
) -> Result<Placement> {
    let vmx = vmx.map(Vmx::parse);
    // A stored descriptor belongs to the first flat disk that names it (as ingest stored it).
    let mut owner: HashMap<&str, usize> = HashMap::new();
    for (i, d) in manifest.disks.iter().enumerate() {
        if let (None, Some(n)) = (&d.layout, &d.descriptor) {
            if manifest.files.iter().any(|f| &f.name == n) {
                owner.entry(n.as_str()).or_insert(i);
            }
        }
    }
    let mut claimed: HashSet<String> = manifest
        .files
        .iter()
        .filter(|f| !owner.contains_key(f.name.as_str()))
        .map(|f| f.name.clone())
        .collect();
    let mut out = manifest.clone();
    let mut generated = Vec::new();
    let mut moved = Vec::new();
    for (i, d) in manifest.disks.iter().enumerate() {
        let flat = d.layout.is_none() && d.descriptor.is_some();
        let own_descriptor = flat && owner.get(d.descriptor.as_deref().unwrap()) == Some(&i);
        let mut names = disk_names(d, format)?;
        let mut placed = d.clone();
        // A name is taken by the same name, or by a file where it needs a directory (or the
        // other way round).
        let taken = |names: &[String], claimed: &HashSet<String>| {
            names.iter().any(|n| {
                claimed.contains(n)
                    || n.match_indices('/')
                        .any(|(at, _)| claimed.contains(&n[..at]))
                    || claimed.iter().any(|c| {
                        c.len() > n.len()
                            && c.starts_with(n.as_str())
                            && c.as_bytes()[n.len()] == b'/'
                    })
            })
        };
        // Another disk's stored descriptor has this disk's descriptor name.
        let descriptor_elsewhere =
            flat && !own_descriptor && owner.contains_key(d.descriptor.as_deref().unwrap());
        if taken(&names, &claimed) || descriptor_elsewhere {
            let vmx_name = vmx
                .as_ref()
                .and_then(|v| v.get(&format!("{}.fileName", d.slot)))
                .map(str::to_string);
            let slot = d.slot.replace([':', '/'], "-");
            let label = vmx_name.as_deref().and_then(datastore_of);
            let mut candidates: Vec<String> = Vec::new();
            if let Some(l) = &label {
                candidates.push(l.clone());
                candidates.push(format!("{l}-{slot}"));
            }
            candidates.push(slot.clone());
            candidates.extend((2..1000).map(|k| format!("{slot}-{k}")));
            let mut found = false;
            for c in candidates.iter().filter(|c| is_safe_relative(c)) {
                let p = prefixed(d, &format!("{c}/"));
                let n = disk_names(&p, format)?;
                if !taken(&n, &claimed) && !claimed.iter().any(|x| x == c) {
                    (placed, names, found) = (p, n, true);
                    break;
                }
            }
            if !found {
                return Err(Error::Corrupt(format!(
                    "disk {} has the file names of another disk and no free name was found",
                    d.slot
                )));
            }
            let stored = d
                .layout
                .as_ref()
                .map(|l| l.file.clone())
                .or_else(|| d.descriptor.clone())
                .unwrap_or_default();
            let restored = placed
                .layout
                .as_ref()
                .map(|l| l.file.clone())
                .or_else(|| placed.descriptor.clone())
                .unwrap_or_default();
            moved.push(MovedDisk {
                slot: d.slot.clone(),
                stored_as: stored,
                restored_as: restored,
                vmx_file_name: vmx_name,
                descriptor_written_afresh: flat && !own_descriptor,
            });
            if own_descriptor {
                let old = d.descriptor.as_ref().unwrap();
                if let Some(f) = out.files.iter_mut().find(|f| &f.name == old) {
                    f.name = placed.descriptor.clone().unwrap();
                }
            }
        }
        if flat && !own_descriptor {
            generated.push((
                placed.descriptor.clone().unwrap(),
                crate::restore::writer::flat_descriptor(&placed).into_bytes(),
            ));
        }
        claimed.extend(names);
        out.disks[i] = placed;
    }
    Ok(Placement {
        manifest: out,
        generated,
        moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(disks: serde_json::Value, files: serde_json::Value) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "catalog": {"vm": "web01", "time": "t", "uuid": null, "display_name": null,
                "source_kind": "vm-directory", "source": "/s", "started": "t", "finished": "t",
                "vmrepo_version": "0", "stats": {"virtual_bytes": 0, "bytes_read": 0, "bytes_data": 0,
                "bytes_new": 0, "bytes_stored": 0, "chunks_total": 0, "chunks_new": 0,
                "segments_reused": 0, "segments_total": 0}},
            "files": files,
            "disks": disks,
        }))
        .unwrap()
    }

    fn flat_disk(slot: &str, size: u64, map: u8) -> serde_json::Value {
        serde_json::json!({"slot": slot, "descriptor": "web01.vmdk", "create_type": "vmfs",
            "virtual_size": size, "disk_map": format!("{map:02x}").repeat(32),
            "extents": [{"kind": "VMFS", "start": 0, "len": size, "file": "web01-flat.vmdk",
                "file_offset": 0, "file_size": size, "head": null, "tail": null}]})
    }

    #[test]
    fn a_second_disk_of_the_same_name_goes_under_its_datastore() {
        let obj = "11".repeat(32);
        let m = manifest(
            serde_json::json!([
                flat_disk("scsi0:0", 1 << 20, 0x22),
                flat_disk("scsi0:1", 2 << 20, 0x33),
                flat_disk("scsi0:2", 3 << 20, 0x44)
            ]),
            serde_json::json!([
                {"name": "web01.vmx", "size": 1, "object": obj},
                {"name": "web01.vmdk", "size": 1, "object": obj}
            ]),
        );
        let vmx = "scsi0:0.fileName = \"/vmfs/volumes/ds1/web01/web01.vmdk\"\n\
                   scsi0:1.fileName = \"/vmfs/volumes/ds2/web01/web01.vmdk\"\n\
                   scsi0:2.fileName = \"/vmfs/volumes/ds2/other/web01.vmdk\"\n";
        let p = place(&m, Some(vmx), None).unwrap();
        let names: Vec<_> = p
            .manifest
            .disks
            .iter()
            .map(|d| {
                (
                    d.descriptor.clone().unwrap(),
                    d.extents[0].file.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("web01.vmdk".into(), "web01-flat.vmdk".into()),
                ("ds2/web01.vmdk".into(), "ds2/web01-flat.vmdk".into()),
                (
                    "ds2-scsi0-2/web01.vmdk".into(),
                    "ds2-scsi0-2/web01-flat.vmdk".into()
                ),
            ]
        );
        // The stored descriptor stays the first disk's; the others get one written afresh.
        assert_eq!(p.manifest.files, m.files);
        assert_eq!(p.generated.len(), 2);
        let (name, text) = &p.generated[0];
        assert_eq!(name, "ds2/web01.vmdk");
        let text = String::from_utf8(text.clone()).unwrap();
        assert!(
            text.contains("RW 4096 VMFS \"web01-flat.vmdk\"\n"),
            "{text}"
        );
        assert!(text.contains("createType=\"vmfs\""), "{text}");
        // Deterministic: the mount shows the bytes extract writes.
        assert_eq!(place(&m, Some(vmx), None).unwrap().generated, p.generated);
        assert_eq!(p.moved.len(), 2);
        assert!(p.moved.iter().all(|d| d.descriptor_written_afresh));
        // Without a .vmx the slot names the directory; with --disk-format the outputs move too.
        let p = place(&m, None, Some(DiskFormat::Qcow2)).unwrap();
        let plans: Vec<_> = p
            .manifest
            .disks
            .iter()
            .map(|d| {
                crate::restore::writer::plan(d, Some(DiskFormat::Qcow2))
                    .unwrap()
                    .unwrap()
                    .outputs
            })
            .collect();
        assert_eq!(
            plans,
            [
                vec!["web01.qcow2".to_string()],
                vec!["scsi0-1/web01.qcow2".to_string()],
                vec!["scsi0-2/web01.qcow2".to_string()]
            ]
        );
    }

    #[test]
    fn distinct_names_are_left_alone() {
        let obj = "11".repeat(32);
        let mut second = flat_disk("scsi0:1", 2 << 20, 0x33);
        second["descriptor"] = "web01_1.vmdk".into();
        second["extents"][0]["file"] = "web01_1-flat.vmdk".into();
        let m = manifest(
            serde_json::json!([flat_disk("scsi0:0", 1 << 20, 0x22), second]),
            serde_json::json!([
                {"name": "web01.vmx", "size": 1, "object": obj},
                {"name": "web01.vmdk", "size": 1, "object": obj},
                {"name": "web01_1.vmdk", "size": 1, "object": obj}
            ]),
        );
        let p = place(&m, None, None).unwrap();
        assert_eq!(p.manifest, m);
        assert!(p.generated.is_empty() && p.moved.is_empty());
    }

    #[test]
    fn datastore_names() {
        assert_eq!(
            datastore_of("/vmfs/volumes/ds2/web01/web01.vmdk").as_deref(),
            Some("ds2")
        );
        assert_eq!(
            datastore_of("/vmfs/volumes/ds2/web01.vmdk").as_deref(),
            Some("ds2")
        );
        assert_eq!(
            datastore_of("/mnt/ds2/web01/web01.vmdk").as_deref(),
            Some("ds2")
        );
        assert_eq!(datastore_of("web01.vmdk"), None);
        assert_eq!(datastore_of("/web01.vmdk"), None);
        assert_eq!(datastore_of("/a/../b/web01.vmdk"), None);
    }
}
