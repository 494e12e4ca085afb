//! How one disk of a VM is opened for reading: a descriptor and its extents, a snapshot chain
//! followed down to its base, or a single image file, each turned into a [`DiskPlan`] behind a
//! [`crate::source::DiskReader`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::repo::manifest::{ChainLink, DiskLayout};
use crate::source::chain::{self, ChainOptions};
use crate::source::confine::Confine;
use crate::source::descriptor::{self, Descriptor};
use crate::source::{ExtentDisk, ExtentSpec, ExtentTarget};

use crate::vmware::vm::{
    relative_name, resolve_in, validate_vm_name, DiskPlan, ExtentPlan, SmallFile, SourcePlan,
};

/// A disk the VM (or the user, `by` = `None`) names by `desc_path`.
pub(super) fn open_descriptor_disk(
    dir: &Path,
    desc_path: &Path,
    slot: &str,
    opts: &ChainOptions,
    confine: &Confine,
    by: Option<&Path>,
) -> Result<DiskPlan> {
    // Sparse extents, snapshot deltas and binary images go through the chain reader; plain
    // flat descriptors keep their file-for-file layout.
    let opened = confine.open(desc_path, by)?;
    let head = opened.head(8, desc_path)?;
    let parsed = if chain::sniff(&head) == chain::Kind::Other {
        descriptor::read_opened(&opened, desc_path).ok()
    } else {
        None
    };
    drop(opened);
    let desc = match parsed {
        Some((_, d))
            if d.parent_hint.is_none()
                && descriptor::FLAT_TYPES
                    .contains(&d.create_type.to_ascii_lowercase().as_str())
                && d.extents
                    .iter()
                    .all(|e| matches!(e.kind.as_str(), "FLAT" | "VMFS" | "ZERO")) =>
        {
            d
        }
        _ => {
            return open_chain_disk(
                dir,
                desc_path,
                relative_name(dir, desc_path),
                slot,
                opts,
                confine,
                None,
            )
        }
    };
    let name = relative_name(dir, desc_path);
    build_extent_disk(dir, desc_path, &desc, slot, name, opts, confine)
}

pub(super) fn build_extent_disk(
    dir: &Path,
    desc_path: &Path,
    desc: &Descriptor,
    slot: &str,
    desc_name: String,
    opts: &ChainOptions,
    confine: &Confine,
) -> Result<DiskPlan> {
    let mut specs = Vec::new();
    let mut plans = Vec::new();
    let mut start = 0u64;
    let mut used_files = HashSet::new();
    for e in &desc.extents {
        let len = e.sectors * 512;
        match e.kind.as_str() {
            "ZERO" => {
                specs.push(ExtentSpec {
                    len,
                    target: ExtentTarget::Zero,
                });
                plans.push(ExtentPlan {
                    kind: e.kind.clone(),
                    start,
                    len,
                    name: None,
                    path: None,
                    file_offset: 0,
                    file_size: 0,
                });
            }
            _ => {
                let fname = e.file.as_deref().unwrap();
                let desc_dir = desc_path.parent().unwrap_or(dir);
                let path = resolve_in(desc_dir, fname, opts);
                if !used_files.insert(path.clone()) {
                    return Err(Error::Unsupported {
                        what: format!("the file {fname:?} used by several extents"),
                        path: desc_path.to_path_buf(),
                    });
                }
                let opened = confine
                    .open(&path, Some(desc_path))
                    .and_then(|o| o.into_flat(&path));
                let file = Arc::new(opened.map_err(chain::missing(
                    &path,
                    desc_path,
                    "extent file",
                    Path::new(fname).is_absolute(),
                ))?);
                let file_offset = e.offset * 512;
                if file_offset > file.len() {
                    return Err(Error::bad_input(
                        &path,
                        format!(
                            "{} says its data starts at byte {file_offset} of this file, which \
                             is only {} bytes: the descriptor and the file do not belong together \
                             (or the file was truncated)",
                            desc_path.display(),
                            file.len()
                        ),
                    ));
                }
                plans.push(ExtentPlan {
                    kind: e.kind.clone(),
                    start,
                    len,
                    name: Some(relative_name(dir, &path)),
                    path: Some(path),
                    file_offset,
                    file_size: file.len(),
                });
                specs.push(ExtentSpec {
                    len,
                    target: ExtentTarget::File {
                        file,
                        offset: file_offset,
                    },
                });
            }
        }
        start += len;
    }
    let reader = ExtentDisk::new(specs, desc_path)?;
    Ok(DiskPlan {
        slot: slot.to_string(),
        descriptor: Some(desc_name),
        create_type: desc.create_type.clone(),
        reader: Box::new(reader),
        extents: plans,
        layout: None,
    })
}

/// Name, size and modification time of a link's files, hashed (see [`ChainLink::stamp`]).
pub(super) fn link_stamp(l: &chain::Link) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new();
    for f in std::iter::once(&l.path).chain(&l.extent_files) {
        let m = std::fs::metadata(f).ok()?;
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(&m.len().to_le_bytes());
        h.update(&m.mtime().to_le_bytes());
        h.update(&m.mtime_nsec().to_le_bytes());
        h.update(&[0]);
    }
    Some(h.finalize().to_hex()[..32].to_string())
}

/// A disk read through the chain reader (sparse formats, snapshot deltas, qcow2): `read` is the
/// leaf to read (named by the file `by`, if the VM names it), `restore_name` the name the VM
/// refers to the disk by.
pub(super) fn open_chain_disk(
    dir: &Path,
    read: &Path,
    restore_name: String,
    slot: &str,
    opts: &ChainOptions,
    confine: &Confine,
    by: Option<&Path>,
) -> Result<DiskPlan> {
    if by.is_some() {
        // Refused before the walk so that the message names the file that names it.
        confine.check(read, by)?;
    }
    let links = chain::open_chain(read, opts, confine)?;
    let mut info = Vec::with_capacity(links.len());
    for l in &links {
        info.push(ChainLink {
            file: relative_name(dir, &l.path),
            format: l.format.clone(),
            cid: l.cid.map(|c| format!("{c:08x}")),
            parent_cid: l.parent_cid.map(|c| format!("{c:08x}")),
            virtual_size: l.layer.size(),
            allocated: l.allocated_bytes()?,
            descriptor: l
                .descriptor
                .as_ref()
                .map(|d| String::from_utf8_lossy(d).into_owned()),
            stamp: link_stamp(l),
        });
    }
    let leaf_format = links[0].format.clone();
    // Restored in the leaf's format, unless the leaf is an ESXi delta (which cannot stand
    // alone): then in the base's (a vmfs base with seSparse deltas comes back as vmfs).
    let base_format =
        if ["vmfssparse", "sesparse"].contains(&leaf_format.to_ascii_lowercase().as_str()) {
            links.last().expect("a chain has a link").format.clone()
        } else {
            leaf_format.clone()
        };
    let is_vmdk = leaf_format != "qcow2" && leaf_format != "raw";
    Ok(DiskPlan {
        slot: slot.to_string(),
        descriptor: is_vmdk.then(|| restore_name.clone()),
        create_type: leaf_format,
        reader: Box::new(chain::Chain::new(links)),
        extents: Vec::new(),
        layout: Some(DiskLayout {
            format: base_format,
            file: restore_name,
            chain: info,
        }),
    })
}

/// A disk file the user named (trusted, block devices included; what it names is not).
pub(super) fn open_disk_file(
    path: &Path,
    name: Option<&str>,
    opts: &ChainOptions,
    confine: &Confine,
) -> Result<SourcePlan> {
    let dir = path.parent().unwrap().to_path_buf();
    let vm = match name {
        Some(n) => n.to_string(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    validate_vm_name(&vm)?;
    let opened = confine.open(path, None)?;
    let head = opened.head(8, path)?;
    let base_name = path.file_name().unwrap().to_string_lossy().into_owned();
    if descriptor::sniff_binary(&head).is_some() {
        return Ok(SourcePlan {
            kind: "disk-image",
            source: path.to_path_buf(),
            vm,
            uuid: None,
            display_name: None,
            files: Vec::new(),
            disks: vec![open_chain_disk(
                &dir, path, base_name, "image", opts, confine, None,
            )?],
            warnings: Vec::new(),
        });
    }
    let is_vmdk = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"));
    let size = opened.len();
    let (files, disk) = if is_vmdk
        && opened.remote.is_none()
        && opened.is_file()
        && size <= descriptor::MAX_DESCRIPTOR_LEN
    {
        let disk = open_descriptor_disk(&dir, path, "image", opts, confine, None)?;
        let files = if disk.layout.is_none() {
            vec![SmallFile {
                name: base_name,
                path: path.to_path_buf(),
                file: std::sync::Arc::new(opened.file.try_clone().ctx("open", path)?),
            }]
        } else {
            Vec::new()
        };
        (files, disk)
    } else {
        let file = opened.into_flat(path)?;
        if file.is_empty() {
            return Err(Error::bad_input(path, "disk image is empty"));
        }
        let len = file.len();
        let disk = DiskPlan {
            slot: "image".into(),
            descriptor: None,
            create_type: "raw".into(),
            extents: vec![ExtentPlan {
                kind: "RAW".into(),
                start: 0,
                len,
                name: Some(base_name),
                path: Some(path.to_path_buf()),
                file_offset: 0,
                file_size: len,
            }],
            reader: Box::new(file),
            layout: None,
        };
        (Vec::new(), disk)
    };
    Ok(SourcePlan {
        kind: "disk-image",
        source: path.to_path_buf(),
        vm,
        uuid: None,
        display_name: None,
        files,
        disks: vec![disk],
        warnings: Vec::new(),
    })
}
