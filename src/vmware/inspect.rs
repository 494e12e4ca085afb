//! `vmrepo inspect`: what an ingest would read, without reading the data — the VM, each disk's
//! chain (file, createType, CID/parentCID, virtual size, allocated bytes), the snapshots in the
//! .vmsd with their age, and warnings an operator should act on (broken chains, old snapshots,
//! deep chains, independent disks, physical RDMs). It opens only what an ingest may
//! ([`Confine`]): a file outside the VM's directory and the allowed roots is a broken chain.

use std::path::Path;

use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::source::chain::{self, ChainOptions};
use crate::source::confine::Confine;
use crate::vmware::vmsd::Vmsd;
use crate::vmware::vmx::Vmx;

/// Snapshots older than this many days are warned about.
pub const OLD_SNAPSHOT_DAYS: f64 = 3.0;
/// Chains with more links than this are warned about.
pub const DEEP_CHAIN: usize = 2;

/// The result of an inspection.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The path inspected.
    pub source: String,
    /// `displayName` (VM directories) or the file name.
    pub vm: String,
    /// The disks, in controller-slot order.
    pub disks: Vec<DiskReport>,
    /// Snapshots from the .vmsd, in slot order.
    pub snapshots: Vec<SnapshotReport>,
    /// Things to act on.
    pub warnings: Vec<String>,
}

/// One disk.
#[derive(Debug, Serialize)]
pub struct DiskReport {
    /// Controller slot, or `image`.
    pub slot: String,
    /// The file the VM names.
    pub file: String,
    /// `.mode` from the .vmx, if set.
    pub mode: Option<String>,
    /// Links from the leaf down (as far as they could be opened).
    pub chain: Vec<LinkReport>,
    /// Why the chain could not be followed to its base, if it could not.
    pub error: Option<String>,
}

/// One link of a chain.
#[derive(Debug, Serialize)]
pub struct LinkReport {
    /// The file (descriptor or image).
    pub file: String,
    /// createType, `qcow2` or `raw`.
    pub create_type: String,
    /// `CID`.
    pub cid: Option<String>,
    /// `parentCID`.
    pub parent_cid: Option<String>,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes this link itself stores.
    pub allocated_bytes: u64,
}

/// One snapshot.
#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    /// `uid`.
    pub uid: u32,
    /// `displayName`.
    pub name: String,
    /// Creation time (UTC), if recorded.
    pub created: Option<String>,
    /// Age in days at inspection time.
    pub age_days: Option<f64>,
    /// True for the snapshot the running state descends from.
    pub current: bool,
    /// (slot, frozen descriptor) per disk.
    pub disks: Vec<(String, String)>,
}

fn disk_report(
    slot: &str,
    file: &str,
    mode: Option<String>,
    leaf: &Path,
    opts: &ChainOptions,
    confine: &Confine,
    by: Option<&Path>,
) -> DiskReport {
    let (links, err) = match by.map(|b| confine.check(leaf, Some(b))) {
        Some(Err(e)) => (Vec::new(), Some(e)),
        _ => chain::walk(leaf, opts, confine),
    };
    let mut chain = Vec::new();
    let mut error = err.map(|e| e.to_string());
    for l in &links {
        let allocated_bytes = match l.allocated_bytes() {
            Ok(n) => n,
            Err(e) => {
                error.get_or_insert(e.to_string());
                0
            }
        };
        chain.push(LinkReport {
            file: l.path.display().to_string(),
            create_type: l.format.clone(),
            cid: l.cid.map(|c| format!("{c:08x}")),
            parent_cid: l.parent_cid.map(|c| format!("{c:08x}")),
            virtual_size: l.layer.size(),
            allocated_bytes,
        });
    }
    DiskReport {
        slot: slot.to_string(),
        file: file.to_string(),
        mode,
        chain,
        error,
    }
}

/// Inspects a VM directory, .vmx file or disk file; `now` dates the snapshots.
pub fn inspect(path: &Path, opts: &ChainOptions, now: jiff::Timestamp) -> Result<Inspection> {
    let abs = std::path::absolute(path).ctx("resolve", path)?;
    let meta = std::fs::metadata(&abs).ctx("open", &abs)?;
    let confine = Confine::for_source(&abs, &opts.datastore_map)?;
    let is_vmx = abs
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vmx") || e.eq_ignore_ascii_case("vmtx"));
    let mut warnings = Vec::new();
    if !meta.is_dir() && !is_vmx {
        let name = abs
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let disk = disk_report("image", &name, None, &abs, opts, &confine, None);
        disk_warnings(&disk, &mut warnings);
        return Ok(Inspection {
            source: abs.display().to_string(),
            vm: abs
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            disks: vec![disk],
            snapshots: Vec::new(),
            warnings,
        });
    }
    let vmx_path = if meta.is_dir() {
        crate::vmware::vm::find_vmx(&abs)?
    } else {
        abs.clone()
    };
    let dir = vmx_path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let text = confine.read(
        &vmx_path,
        None,
        u64::from(crate::repo::object::MAX_OBJECT_LEN),
    )?;
    let vmx = Vmx::parse(&String::from_utf8_lossy(&text));
    let vm = vmx
        .get("displayName")
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| {
            vmx_path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
    let mut disks = Vec::new();
    for d in vmx.disks() {
        let leaf = crate::vmware::vm::resolve_in(&dir, &d.file_name, opts);
        let report = disk_report(
            &d.slot,
            &d.file_name,
            d.mode.clone(),
            &leaf,
            opts,
            &confine,
            Some(&vmx_path),
        );
        if let Some(mode) = d.mode.as_deref().filter(|m| m.starts_with("independent")) {
            warnings.push(format!(
                "disk {} ({}) is {mode}: snapshots do not freeze it, so a backup of the running VM copies it while it changes",
                d.slot, d.file_name
            ));
        }
        disk_warnings(&report, &mut warnings);
        disks.push(report);
    }
    let mut snapshots = Vec::new();
    if let Some((vmsd_path, vmsd)) = Vmsd::find(&vmx_path, &confine)? {
        if vmsd.needs_consolidation {
            warnings.push(format!(
                "{} says the disks need consolidation (a snapshot removal left deltas behind)",
                vmsd_path.display()
            ));
        }
        for s in &vmsd.snapshots {
            let age_days = s
                .created
                .map(|c| (now.as_second() - c.as_second()) as f64 / 86400.0);
            if let Some(age) = age_days.filter(|a| *a > OLD_SNAPSHOT_DAYS) {
                warnings.push(format!(
                    "snapshot {:?} (uid {}) is {:.0} days old: snapshots left behind slow the VM and fill the datastore; delete or consolidate it",
                    s.name, s.uid, age.floor()
                ));
            }
            snapshots.push(SnapshotReport {
                uid: s.uid,
                name: s.name.clone(),
                created: s
                    .created
                    .map(|c| c.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()),
                age_days,
                current: vmsd.current == Some(s.uid),
                disks: s.disks.clone(),
            });
        }
    }
    Ok(Inspection {
        source: abs.display().to_string(),
        vm,
        disks,
        snapshots,
        warnings,
    })
}

fn disk_warnings(d: &DiskReport, warnings: &mut Vec<String>) {
    if let Some(e) = &d.error {
        if e.contains("physical-mode RDM") {
            warnings.push(format!(
                "disk {} ({}) is a physical-mode RDM: its data is on a LUN, not in files, and cannot be backed up from the VM directory",
                d.slot, d.file
            ));
        } else {
            warnings.push(format!("disk {} ({}): broken chain: {e}", d.slot, d.file));
        }
    }
    if d.chain.len() > DEEP_CHAIN {
        warnings.push(format!(
            "disk {} ({}) is a chain of {} links ({} snapshot deltas): snapshots left behind slow the VM and fill the datastore",
            d.slot,
            d.file,
            d.chain.len(),
            d.chain.len() - 1
        ));
    }
}
