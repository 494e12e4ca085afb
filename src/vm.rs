//! What an ingest reads: a VM directory (via its .vmx) or a single disk file, turned into the
//! small files to store verbatim and the disks to chunk, each behind a [`DiskReader`].

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::descriptor::{self, Descriptor};
use crate::error::{Error, IoContext, Result};
use crate::source::{DiskReader, ExtentDisk, ExtentSpec, ExtentTarget, FlatFile};
use crate::vmx::Vmx;

/// Extensions of the small files kept from a VM directory.
pub const SMALL_FILE_EXTENSIONS: &[&str] = &["vmx", "vmtx", "vmxf", "vmsd", "nvram", "log"];

/// A small file to store verbatim.
#[derive(Debug, Clone)]
pub struct SmallFile {
    /// Name relative to the VM directory, `/`-separated.
    pub name: String,
    /// Where it is now.
    pub path: PathBuf,
}

/// One extent file of a disk, for the catalog and for restore.
#[derive(Debug, Clone)]
pub struct ExtentPlan {
    /// `FLAT`, `VMFS`, `ZERO` or `RAW`.
    pub kind: String,
    /// Guest offset.
    pub start: u64,
    /// Guest length.
    pub len: u64,
    /// File name relative to the VM directory.
    pub name: Option<String>,
    /// Where it is now.
    pub path: Option<PathBuf>,
    /// Offset of the extent's data in the file.
    pub file_offset: u64,
    /// File size.
    pub file_size: u64,
}

/// A disk to ingest.
pub struct DiskPlan {
    /// Controller slot or `image`.
    pub slot: String,
    /// Descriptor name (also among the small files), if any.
    pub descriptor: Option<String>,
    /// createType or `raw`.
    pub create_type: String,
    /// The guest-visible bytes.
    pub reader: Box<dyn DiskReader>,
    /// Its files.
    pub extents: Vec<ExtentPlan>,
}

/// Everything an ingest will read.
pub struct SourcePlan {
    /// `vm-directory` or `disk-image`.
    pub kind: &'static str,
    /// Absolute path given by the user.
    pub source: PathBuf,
    /// VM name for the generation.
    pub vm: String,
    /// `uuid.bios`.
    pub uuid: Option<String>,
    /// `displayName`, decoded.
    pub display_name: Option<String>,
    /// Small files.
    pub files: Vec<SmallFile>,
    /// Disks.
    pub disks: Vec<DiskPlan>,
    /// Things worth telling the user (independent disks, ...).
    pub warnings: Vec<String>,
}

/// Checks a VM name: not empty, no `/`, `@` or control characters, at most 200 bytes.
pub fn validate_vm_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.trim().is_empty() {
        return bad("it is empty");
    }
    if name.contains('/') {
        return bad("it contains '/'");
    }
    if name.contains('@') {
        return bad("it contains '@' (which separates VM and generation)");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("it contains control characters");
    }
    if name == "." || name == ".." {
        return bad("it is a path component");
    }
    if name.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    Ok(())
}

/// Checks that a stored relative name is safe to restore under a directory.
pub fn is_safe_relative(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Opens what `path` names: a VM directory, a .vmx file, a VMDK descriptor or a raw image.
pub fn open_source(path: &Path, name: Option<&str>) -> Result<SourcePlan> {
    let abs = std::path::absolute(path).ctx("resolve", path)?;
    let meta = std::fs::metadata(&abs).ctx("open", &abs)?;
    if meta.is_dir() {
        let vmx = find_vmx(&abs)?;
        return open_vm(&vmx, &abs, name);
    }
    let ext = abs
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("vmx") | Some("vmtx") => open_vm(&abs, &abs, name),
        _ => open_disk_file(&abs, name),
    }
}

fn find_vmx(dir: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).ctx("list", dir)? {
        let p = e.ctx("list", dir)?.path();
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if matches!(ext.as_deref(), Some("vmx") | Some("vmtx")) && p.is_file() {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 => Err(Error::bad_input(
            dir,
            "no .vmx file in this VM directory; give a VM directory as ESXi or ghettoVCB leaves it, or a disk image with --name",
        )),
        1 => Ok(found.remove(0)),
        _ => Err(Error::bad_input(
            dir,
            format!(
                "several .vmx files ({}); give the path of the one to ingest",
                found.iter().map(|p| p.file_name().unwrap().to_string_lossy()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn open_vm(vmx_path: &Path, source: &Path, name: Option<&str>) -> Result<SourcePlan> {
    let dir = vmx_path.parent().unwrap().to_path_buf();
    let text = std::fs::read(vmx_path).ctx("read", vmx_path)?;
    if text.contains(&0) {
        return Err(Error::bad_input(
            vmx_path,
            "not a .vmx file (contains binary data)",
        ));
    }
    let vmx = Vmx::parse(&String::from_utf8_lossy(&text));
    let display_name = vmx.get("displayName").map(str::to_string);
    let vm = match (name, &display_name) {
        (Some(n), _) => n.to_string(),
        (None, Some(d)) if !d.is_empty() => d.clone(),
        _ => vmx_path.file_stem().unwrap().to_string_lossy().into_owned(),
    };
    validate_vm_name(&vm).map_err(|e| match (name, e) {
        (None, Error::InvalidName { name, reason }) => Error::InvalidName {
            name,
            reason: format!(
                "{reason} (taken from displayName in {}; pass --name)",
                vmx_path.display()
            ),
        },
        (_, e) => e,
    })?;

    let mut files = Vec::new();
    let mut seen = HashSet::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ctx("list", &dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .ctx("list", &dir)?;
    entries.sort();
    for p in entries {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if ext
            .as_deref()
            .is_some_and(|e| SMALL_FILE_EXTENSIONS.contains(&e))
            && p.is_file()
        {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            seen.insert(name.clone());
            files.push(SmallFile { name, path: p });
        }
    }
    if let Some(nv) = vmx.get("nvram").filter(|n| !n.is_empty()) {
        let p = dir.join(nv);
        if p.is_file() {
            let name = relative_name(&dir, &p);
            if seen.insert(name.clone()) {
                files.push(SmallFile { name, path: p });
            }
        }
    }

    let mut disks = Vec::new();
    let mut warnings = Vec::new();
    for d in vmx.disks() {
        if let Some(mode) = d.mode.as_deref().filter(|m| m.starts_with("independent")) {
            warnings.push(format!(
                "disk {} ({}) is {mode}: a VM snapshot does not freeze it, so a copy of a running VM's disk may be inconsistent",
                d.slot, d.file_name
            ));
        }
        let desc_path = resolve_in(&dir, &d.file_name);
        let plan = open_descriptor_disk(&dir, &desc_path, &d.slot)?;
        let desc_name = plan.descriptor.clone().unwrap();
        if seen.insert(desc_name.clone()) {
            files.push(SmallFile {
                name: desc_name,
                path: desc_path,
            });
        }
        disks.push(plan);
    }
    Ok(SourcePlan {
        kind: "vm-directory",
        source: source.to_path_buf(),
        vm,
        uuid: vmx.get("uuid.bios").map(str::to_string),
        display_name,
        files,
        disks,
        warnings,
    })
}

/// Resolves a path from a .vmx or descriptor: relative to `dir`, or absolute. An absolute
/// datastore path that does not exist here falls back to the same file name inside `dir`
/// (a VM directory copied off its datastore).
fn resolve_in(dir: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        if p.exists() {
            return p.to_path_buf();
        }
        if let Some(base) = p.file_name() {
            let local = dir.join(base);
            if local.exists() {
                return local;
            }
        }
        return p.to_path_buf();
    }
    dir.join(p)
}

/// The name a file is stored under: relative to the VM directory when inside it, else its base name.
fn relative_name(dir: &Path, p: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(rel) if is_safe_relative(&rel.to_string_lossy()) => rel.to_string_lossy().into_owned(),
        _ => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn open_descriptor_disk(dir: &Path, desc_path: &Path, slot: &str) -> Result<DiskPlan> {
    let (_, desc) = descriptor::read(desc_path)?;
    let desc_dir = desc_path.parent().unwrap_or(dir).to_path_buf();
    let name = relative_name(dir, desc_path);
    build_extent_disk(dir, &desc_dir, desc_path, &desc, slot, name)
}

fn build_extent_disk(
    dir: &Path,
    desc_dir: &Path,
    desc_path: &Path,
    desc: &Descriptor,
    slot: &str,
    desc_name: String,
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
                let path = resolve_in(desc_dir, fname);
                if !used_files.insert(path.clone()) {
                    return Err(Error::Unsupported {
                        what: format!("the file {fname:?} used by several extents"),
                        path: desc_path.to_path_buf(),
                    });
                }
                let file = Arc::new(FlatFile::open(&path).map_err(|err| match err {
                    Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
                        Error::bad_input(
                            &path,
                            format!("extent file named by {} is missing", desc_path.display()),
                        )
                    }
                    other => other,
                })?);
                let file_offset = e.offset * 512;
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
    })
}

fn open_disk_file(path: &Path, name: Option<&str>) -> Result<SourcePlan> {
    let dir = path.parent().unwrap().to_path_buf();
    let vm = match name {
        Some(n) => n.to_string(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    validate_vm_name(&vm)?;
    let mut head = [0u8; 8];
    let n = {
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .ctx("read", path)?
    };
    if let Some(what) = descriptor::sniff_binary(&head[..n]) {
        return Err(Error::Unsupported {
            what: what.into(),
            path: path.to_path_buf(),
        });
    }
    let is_vmdk = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"));
    let size = std::fs::metadata(path).ctx("stat", path)?.len();
    let base_name = path.file_name().unwrap().to_string_lossy().into_owned();
    let (files, disk) = if is_vmdk && size <= descriptor::MAX_DESCRIPTOR_LEN {
        let disk = open_descriptor_disk(&dir, path, "image")?;
        (
            vec![SmallFile {
                name: base_name,
                path: path.to_path_buf(),
            }],
            disk,
        )
    } else {
        let file = FlatFile::open(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_vm_name("web01").is_ok());
        assert!(validate_vm_name("db 01 (prod)").is_ok());
        for bad in ["", "  ", "a/b", "a@b", "a\nb", "..", "x\u{7f}"] {
            assert!(validate_vm_name(bad).is_err(), "{bad:?}");
        }
        assert!(is_safe_relative("a/b.vmdk"));
        assert!(!is_safe_relative("../x"));
        assert!(!is_safe_relative("/etc/x"));
    }
}
