//! What an ingest reads: a VM directory (via its .vmx) or a single disk file, turned into the
//! small files to store verbatim and the disks to chunk, each behind a [`DiskReader`].
//!
//! Every file a VM's own files name (disks, extents, parents, the nvram, the .vmsd) and every
//! small file found in its directory is opened only where [`Confine`] allows: inside the VM's
//! directory and the datastore roots the user allows, regular files only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Advice, Error, IoContext, Result, Setting};
use crate::repo::manifest::DiskLayout;
use crate::source::chain::ChainOptions;
use crate::source::confine::Confine;
use crate::source::DiskReader;
use crate::vmware::disk::{open_chain_disk, open_descriptor_disk, open_disk_file};
use crate::vmware::vmsd::Vmsd;
use crate::vmware::vmx::Vmx;

/// The most a small file (.vmx, .nvram, a log) may hold: one stored object.
pub const MAX_SMALL_FILE_LEN: u32 = crate::repo::object::MAX_OBJECT_LEN;

/// Extensions of the small files kept from a VM directory.
pub const SMALL_FILE_EXTENSIONS: &[&str] = &["vmx", "vmtx", "vmxf", "vmsd", "nvram", "log"];

/// A small file to store verbatim.
#[derive(Debug, Clone)]
pub struct SmallFile {
    /// Name relative to the VM directory, `/`-separated.
    pub name: String,
    /// Where it is now.
    pub path: PathBuf,
    /// The file, opened when it was checked ([`crate::source::confine::Confine::open`]): ingest reads
    /// this descriptor, never the path again, so the path cannot be swapped for a link to a
    /// host file in between.
    pub file: std::sync::Arc<std::fs::File>,
}

impl SmallFile {
    /// Opens `path` within `confine` (named by `by`, if not found by listing the directory);
    /// it must be a regular file.
    fn open(confine: &Confine, name: String, path: PathBuf, by: Option<&Path>) -> Result<Self> {
        let o = confine.open(&path, by)?;
        if o.remote.is_some() {
            return Err(Error::bad_input(
                &path,
                "is a remote file that was not copied in; a VM's small files are read locally",
            ));
        }
        if !o.meta.is_file() {
            return Err(Error::bad_input(
                &path,
                "is not a regular file; a VM's small files (.vmx, .nvram, logs, descriptors) must be",
            ));
        }
        Ok(SmallFile {
            name,
            path,
            file: std::sync::Arc::new(o.file),
        })
    }
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
    /// Its files (flat disks; empty when `layout` is set).
    pub extents: Vec<ExtentPlan>,
    /// For a sparse or chained disk: what was read and how to restore it.
    pub layout: Option<DiskLayout>,
}

/// How to open a source.
#[derive(Debug, Default, Clone)]
pub struct SourceOptions {
    /// VM name instead of the .vmx displayName / file name.
    pub name: Option<String>,
    /// How paths inside disk files are resolved.
    pub chain: ChainOptions,
    /// Read each disk as this snapshot (`latest` or a name) froze it.
    pub at_snapshot: Option<String>,
    /// A VM staged from a remote host: its placeholders and the disks its snapshot froze.
    pub staged: Option<StagedVm>,
}

/// A VM whose files were staged from a host's datastore for reading (`esxi://`): the small
/// files are local copies, the large ones placeholders for remote files.
#[derive(Clone)]
pub struct StagedVm {
    /// Placeholder (canonical path) → the remote file.
    pub files: std::sync::Arc<crate::source::confine::RemoteFiles>,
    /// For each disk slot (`scsi0:0`), the staged descriptor of the link the host's snapshot
    /// froze: read instead of the link the .vmx names (which the running VM writes).
    pub frozen: Vec<(String, PathBuf)>,
    /// Name of that snapshot, for messages.
    pub snapshot: String,
    /// For disks whose host said which areas are in use (changed-block tracking asked for
    /// everything): the disk's size as the host gave it and those areas, by slot. The rest of
    /// such a disk is not read (unless the sizes differ: then all of it is).
    pub in_use: std::collections::BTreeMap<String, (u64, Vec<std::ops::Range<u64>>)>,
}

impl std::fmt::Debug for StagedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedVm")
            .field("remote_files", &self.files.len())
            .field("frozen", &self.frozen)
            .field("snapshot", &self.snapshot)
            .field("in_use", &self.in_use.keys().collect::<Vec<_>>())
            .finish()
    }
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

/// Checks a VM name: not empty, no `/`, `@` or control characters, at most 200 bytes (the rule
/// is [`crate::repo::manifest::vm_name_problem`]'s, which a stored manifest is held to as well).
pub fn validate_vm_name(name: &str) -> Result<()> {
    match crate::repo::manifest::vm_name_problem(name) {
        None => Ok(()),
        Some(why) => Err(Error::InvalidName {
            name: name.to_string(),
            reason: format!("it {}", why),
        }),
    }
}

/// Checks that a stored relative name is safe to restore under a directory.
pub use crate::repo::manifest::is_safe_relative;

/// Opens what `path` names: a VM directory, a .vmx file, a VMDK descriptor or a raw image.
pub fn open_source(path: &Path, name: Option<&str>) -> Result<SourcePlan> {
    open_source_with(
        path,
        &SourceOptions {
            name: name.map(str::to_string),
            ..SourceOptions::default()
        },
    )
}

/// [`open_source`] with all options.
pub fn open_source_with(path: &Path, opts: &SourceOptions) -> Result<SourcePlan> {
    let abs = std::path::absolute(path).ctx("resolve", path)?;
    let meta = std::fs::metadata(&abs).ctx("open", &abs)?;
    let name = opts.name.as_deref();
    let confine = Confine::for_source(&abs, &opts.chain.datastore_map)?
        .with_remote(opts.staged.as_ref().map(|s| s.files.clone()));
    if meta.is_dir() {
        let vmx = find_vmx(&abs)?;
        return open_vm(&vmx, &abs, opts, &confine);
    }
    let ext = abs
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("vmx") | Some("vmtx") => open_vm(&abs, &abs, opts, &confine),
        _ if opts.at_snapshot.is_some() => Err(Advice::new(format!("{}: ", abs.display()))
            .setting(Setting::AtSnapshot)
            .text(" needs a VM directory or .vmx file (the .vmsd says which links each snapshot froze)")
            .into()),
        _ => open_disk_file(&abs, name, &opts.chain, &confine),
    }
}

/// Finds the one .vmx (or .vmtx) file in a VM directory.
pub fn find_vmx(dir: &Path) -> Result<PathBuf> {
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
        0 => Err(Advice::new(format!(
            "{}: no .vmx file in this VM directory; give a VM directory as ESXi or ghettoVCB \
             leaves it, or a disk image and ",
            dir.display()
        ))
        .setting(Setting::Name)
        .into()),
        1 => Ok(found.remove(0)),
        _ => Err(Error::bad_input(
            dir,
            format!(
                "several .vmx files ({}); give the path of the one to ingest",
                found
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn open_vm(
    vmx_path: &Path,
    source: &Path,
    opts: &SourceOptions,
    confine: &Confine,
) -> Result<SourcePlan> {
    let name = opts.name.as_deref();
    let dir = vmx_path.parent().unwrap().to_path_buf();
    let text = confine.read(
        vmx_path,
        None,
        u64::from(crate::repo::object::MAX_OBJECT_LEN),
    )?;
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
        (None, e @ Error::InvalidName { .. }) => Advice::new(format!(
            "{e} (taken from displayName in {}; use ",
            vmx_path.display()
        ))
        .setting(Setting::Name)
        .text(")")
        .into(),
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
            // A log (or .vmx, .nvram ...) that is a symlink out of the directory is refused.
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            seen.insert(name.clone());
            files.push(SmallFile::open(confine, name, p, None)?);
        }
    }
    if let Some(nv) = vmx.get("nvram").filter(|n| !n.is_empty()) {
        let p = dir.join(nv);
        if p.is_file() {
            let name = relative_name(&dir, &p);
            if seen.insert(name.clone()) {
                files.push(SmallFile::open(confine, name, p, Some(vmx_path))?);
            }
        }
    }

    let mut disks = Vec::new();
    let mut warnings = Vec::new();
    let snapshot = match &opts.at_snapshot {
        None => None,
        Some(which) => {
            let Some((vmsd_path, vmsd)) = Vmsd::find(vmx_path, confine)? else {
                return Err(Advice::new("")
                    .setting(Setting::AtSnapshot)
                    .text(format!(
                        ": {} has no .vmsd file, so the VM has no snapshots to read",
                        dir.display()
                    ))
                    .into());
            };
            Some((vmsd_path.clone(), vmsd.select(which, &vmsd_path)?.clone()))
        }
    };
    for d in vmx.disks() {
        let independent = d.mode.as_deref().filter(|m| m.starts_with("independent"));
        if let Some(mode) = independent {
            warnings.push(format!(
                "disk {} ({}) is {mode}: a VM snapshot does not freeze it, so a copy of a running VM's disk may be inconsistent",
                d.slot, d.file_name
            ));
        }
        let desc_path = resolve_in(&dir, &d.file_name, &opts.chain);
        // With --at-snapshot, read the link the snapshot froze, restored under the VM's name.
        let frozen = match (&snapshot, &opts.staged) {
            (_, Some(staged)) => match staged.frozen.iter().find(|(slot, _)| *slot == d.slot) {
                Some((_, p)) => Some(p.clone()),
                None if independent.is_some() => None,
                None => {
                    return Err(Error::bad_input(
                        vmx_path,
                        format!(
                            "the host's snapshot {:?} lists no disk for {} ({}), which the .vmx \
                             names: the VM changed while it was being snapshotted; run the \
                             backup again",
                            staged.snapshot, d.slot, d.file_name
                        ),
                    ))
                }
            },
            (None, None) => None,
            (Some((vmsd_path, snap)), None) => match snap.disk_for(&d.slot) {
                Some(f) => Some(resolve_in(&dir, f, &opts.chain)),
                None if independent.is_some() => None,
                None => {
                    return Err(Advice::new(format!(
                        "{}: snapshot {:?} has no disk for {} ({}): it was added after the \
                         snapshot; ingest without ",
                        vmsd_path.display(),
                        snap.name,
                        d.slot,
                        d.file_name
                    ))
                    .setting(Setting::AtSnapshot)
                    .into())
                }
            },
        };
        let plan = match frozen {
            Some(read) => open_chain_disk(
                &dir,
                &read,
                relative_name(&dir, &desc_path),
                &d.slot,
                &opts.chain,
                confine,
                snapshot.as_ref().map(|(p, _)| p.as_path()),
            )?,
            None => open_descriptor_disk(
                &dir,
                &desc_path,
                &d.slot,
                &opts.chain,
                confine,
                Some(vmx_path),
            )?,
        };
        if plan.layout.is_none() {
            let desc_name = plan.descriptor.clone().unwrap();
            if seen.insert(desc_name.clone()) {
                files.push(SmallFile::open(
                    confine,
                    desc_name,
                    desc_path,
                    Some(vmx_path),
                )?);
            }
        }
        disks.push(plan);
    }
    if let Some((_, snap)) = &snapshot {
        warnings.push(format!(
            "read the disks as snapshot {:?} (uid {}) froze them",
            snap.name, snap.uid
        ));
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

/// Where the file a .vmx or .vmsd names is on this host: a relative name in `dir`; an
/// absolute (datastore) name through the datastore map, else by its base name in `dir`, else
/// as written. Whether the file may be read is [`Confine`]'s decision.
pub fn resolve_in(dir: &Path, name: &str, opts: &ChainOptions) -> PathBuf {
    crate::source::chain::resolve(dir, name, opts).unwrap_or_else(|| PathBuf::from(name))
}

/// The name a file is stored under: relative to the VM directory when inside it, else its base name.
pub(super) fn relative_name(dir: &Path, p: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(rel) if is_safe_relative(&rel.to_string_lossy()) => rel.to_string_lossy().into_owned(),
        _ => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
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
