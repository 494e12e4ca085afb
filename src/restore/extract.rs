//! Extract: write a generation back as a VM directory — small files byte for byte, each flat disk
//! in its original layout as sparse files, sparse and chained disks (or any disk, with
//! `--disk-format`) laid out afresh by a [`crate::restore::writer`] — verifying every chunk's hash on the way.
//!
//! Everything is written inside the opened destination directory without following links
//! ([`crate::restore::safe_fs`]): each file first as `.NAME.vmrepo-partial`, created new, then renamed
//! into place once complete and fsynced. A failed extract removes what it created (partial
//! files, files it had already renamed into place, directories it made) and leaves the
//! destination as it found it, except for files `--force` had already replaced.
//!
//! Two disks whose files have the same names (the same VM folder name on two datastores:
//! `/vmfs/volumes/ds1/web01/web01.vmdk` and `/vmfs/volumes/ds2/web01/web01.vmdk`) are both
//! restored: the first under its own name, each later one with all its files in a subdirectory
//! named after the datastore it came from (`ds2/web01.vmdk`, `ds2/web01-flat.vmdk`); see
//! [`place`]. The mount shows the same names.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::maintain::damage::{self, DamagedRange};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::GenerationInfo;
use crate::repo::manifest::{DiskEntry, Extent, ExtentFile, Manifest};
use crate::repo::Repository;
use crate::restore::safe_fs::{link_refused, Dir, Entry};
use crate::restore::writer::{DiskFormat, Output, WritePlan};
use crate::vmware::vm::is_safe_relative;
use crate::vmware::vmx::Vmx;

/// Options of an extract.
#[derive(Debug, Default, Clone)]
pub struct ExtractOptions {
    /// Overwrite existing files.
    pub force: bool,
    /// Only the disks (descriptors and extent files), not the other small files.
    pub disk_only: bool,
    /// Write what is left of a damaged generation: damaged ranges stay holes (zeros) and are
    /// listed in the report, missing small files are skipped and listed.
    pub allow_damaged: bool,
    /// `--datastore-map`: paths to rewrite in the .vmx and the descriptors.
    pub datastore_map: crate::vmware::relocate::DatastoreMap,
    /// Write every disk in this format instead of its original one.
    pub disk_format: Option<DiskFormat>,
}

/// What an extract wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractReport {
    /// `vm@time`.
    pub generation: String,
    /// Destination directory.
    pub destination: String,
    /// Files written.
    pub files: Vec<String>,
    /// Bytes of disk data written (zero runs are left as holes).
    pub bytes_written: u64,
    /// Virtual bytes of the disks.
    pub virtual_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Disk ranges that could not be restored (only with `allow_damaged`).
    pub damaged_ranges: Vec<DamagedRange>,
    /// Small files that could not be restored (only with `allow_damaged`).
    pub damaged_files: Vec<String>,
    /// Disks restored under another name than the one stored, because another disk's files
    /// have the same names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moved_disks: Vec<MovedDisk>,
}

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

/// One file to restore: written as `partial` in `dir`, then renamed to `base`.
struct Target {
    /// Name relative to the destination.
    name: String,
    dir: Arc<Dir>,
    base: String,
    partial: String,
    /// The final name existed before (only with `--force`).
    existed: bool,
    /// The partial file was created (and must go on failure).
    created: AtomicBool,
    /// Renamed into place.
    placed: AtomicBool,
}

impl Target {
    fn partial_path(&self) -> PathBuf {
        self.dir.path_of(&self.partial)
    }

    /// Creates the partial file (replacing a stale one, never following a link).
    fn create(&self) -> Result<(File, PathBuf)> {
        let f = self.dir.create_replacing(&self.partial, 0o666)?;
        self.created.store(true, Ordering::SeqCst);
        Ok((f, self.partial_path()))
    }
}

const IN_DEST: &str = "inside the destination";

/// The directories of the destination, opened without following links, and those extract
/// created (to remove again on failure).
struct DestDirs {
    root: Arc<Dir>,
    /// Directory (relative, "" for the root) → opened handle.
    open: HashMap<String, Arc<Dir>>,
    /// Directories created, in order: (parent, name).
    created: Vec<(Arc<Dir>, String)>,
}

impl DestDirs {
    /// Opens (creating if needed) the directory `rel` under the destination.
    fn dir(&mut self, rel: &str) -> Result<Arc<Dir>> {
        if let Some(d) = self.open.get(rel) {
            return Ok(d.clone());
        }
        let (parent, name) = match rel.rfind('/') {
            Some(i) => (self.dir(&rel[..i])?, &rel[i + 1..]),
            None => (self.root.clone(), rel),
        };
        let (d, created) = parent.make_dir(name, IN_DEST)?;
        if created {
            self.created.push((parent, name.to_string()));
        }
        let d = Arc::new(d);
        self.open.insert(rel.to_string(), d.clone());
        Ok(d)
    }

    /// Removes the directories created, deepest first (each only if empty).
    fn remove_created(&self) {
        for (parent, name) in self.created.iter().rev() {
            let _ = parent.remove_dir(name);
        }
    }
}

/// Looks at where `name` will go, following no link: whether it exists, and an error for
/// anything extract must not write through or over.
fn check_target(root: &Dir, name: &str, force: bool) -> Result<bool> {
    let parts: Vec<&str> = name.split('/').collect();
    let (leaf, dirs) = parts.split_last().expect("not empty");
    let mut owned: Option<Dir> = None;
    for d in dirs {
        let cur = owned.as_ref().unwrap_or(root);
        match cur.entry(d)? {
            None => return Ok(false),
            Some(Entry::Dir) => owned = Some(cur.open_dir(d, IN_DEST)?),
            Some(Entry::Link(t)) => return Err(link_refused(&cur.path_of(d), &t, IN_DEST)),
            Some(_) => {
                return Err(Error::io(
                    "write into",
                    cur.path_of(d),
                    io::Error::other(
                        "it is a file, not a directory: remove or rename it, or extract into \
                         another directory",
                    ),
                ))
            }
        }
    }
    let cur = owned.as_ref().unwrap_or(root);
    let path = cur.path_of(leaf);
    match cur.entry(leaf)? {
        None => Ok(false),
        Some(Entry::Dir) => Err(Error::io(
            "restore",
            &path,
            io::Error::other(
                "a directory has this name (even --force replaces only files): remove or rename \
                 it, or extract into another directory",
            ),
        )),
        Some(Entry::Link(t)) if !force => Err(Error::io(
            "restore",
            &path,
            io::Error::other(format!(
                "it is a symbolic link (to {}); pass --force to replace the link itself with the \
                 restored file (what it points to is never written), or extract into another \
                 directory",
                t.display()
            )),
        )),
        Some(_) if !force => Err(Error::Exists(path)),
        Some(_) => Ok(true),
    }
}

/// Writes the generation `spec` (`VM`, `VM@-1`, `VM@TIME`) into directory `dest`.
pub fn extract(
    repo: &Repository,
    spec: &str,
    dest: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    let began = Instant::now();
    let gen: GenerationInfo = repo.with_index(|i| i.resolve(spec))?;
    let manifest = repo.load_manifest(&gen.manifest)?;
    if let Some(why) = &gen.damaged {
        // Known damage: list it all before writing anything.
        let d = damage::find(repo, &manifest)?;
        if !d.is_empty() && !opts.allow_damaged {
            let mut lines: Vec<String> = d.files.iter().map(|f| format!("file {f}")).collect();
            lines.extend(d.ranges.iter().map(|r| r.to_string()));
            return Err(Error::Damaged {
                generation: gen.name.clone(),
                detail: if lines.is_empty() {
                    why.clone()
                } else {
                    lines.join("\n  ")
                },
            });
        }
    }

    // Decide every output file first, and refuse before writing anything.
    let placement = place(
        &manifest,
        stored_vmx(repo, &manifest).as_deref(),
        opts.disk_format,
    )?;
    let Placement {
        manifest,
        generated,
        moved,
    } = placement;
    let plans: Vec<Option<WritePlan>> = manifest
        .disks
        .iter()
        .map(|d| crate::restore::writer::plan(d, opts.disk_format))
        .collect::<Result<_>>()?;
    let replaced: Vec<&String> = plans
        .iter()
        .flatten()
        .filter_map(|p| p.replaces.as_ref())
        .collect();
    let disk_files: Vec<String> = manifest
        .disks
        .iter()
        .flat_map(|d| {
            d.descriptor
                .iter()
                .cloned()
                .chain(d.extents.iter().filter_map(|e| e.file.clone()))
        })
        .collect();
    let mut names: Vec<&str> = Vec::new();
    for f in manifest
        .files
        .iter()
        .map(|f| &f.name)
        .chain(generated.iter().map(|(n, _)| n))
    {
        if replaced.contains(&f) {
            continue;
        }
        if !opts.disk_only || disk_files.contains(f) {
            names.push(f);
        }
    }
    for (d, plan) in manifest.disks.iter().zip(&plans) {
        match plan {
            Some(p) => names.extend(p.outputs.iter().map(String::as_str)),
            None => {
                for e in &d.extents {
                    if let Some(f) = &e.file {
                        names.push(f);
                    }
                }
            }
        }
    }
    let mut seen = HashSet::new();
    for n in &names {
        if !is_safe_relative(n) {
            return Err(Error::Corrupt(format!(
                "generation {} names an unsafe file path {n:?}",
                gen.name
            )));
        }
        if !seen.insert(*n) {
            return Err(Error::Corrupt(format!(
                "generation {} would restore two files as {n:?}",
                gen.name
            )));
        }
    }
    for m in &moved {
        progress.note(&format!("note: {m}"));
    }

    // The destination: created if missing (removed again if the extract fails), then used only
    // through its opened descriptor.
    let dest_existed = fs::symlink_metadata(dest).is_ok();
    fs::create_dir_all(dest).ctx("create directory", dest)?;
    let root = match Dir::open(dest) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            if !dest_existed {
                let _ = fs::remove_dir(dest);
            }
            return Err(e);
        }
    };
    let mut dirs = DestDirs {
        root: root.clone(),
        open: HashMap::from([(String::new(), root.clone())]),
        created: Vec::new(),
    };
    let mut targets: Vec<Target> = Vec::new();
    let prepared = (|| -> Result<()> {
        let mut existed = Vec::new();
        for n in &names {
            existed.push(check_target(&root, n, opts.force)?);
        }
        for (n, existed) in names.iter().zip(existed) {
            let (dir, base) = match n.rfind('/') {
                Some(i) => (dirs.dir(&n[..i])?, n[i + 1..].to_string()),
                None => (root.clone(), n.to_string()),
            };
            targets.push(Target {
                name: n.to_string(),
                dir,
                partial: format!(".{base}.vmrepo-partial"),
                base,
                existed,
                created: AtomicBool::new(false),
                placed: AtomicBool::new(false),
            });
        }
        Ok(())
    })();
    let undo = |targets: &[Target], dirs: &DestDirs| {
        for t in targets {
            if t.created.load(Ordering::SeqCst) {
                let _ = t.dir.remove_file(&t.partial);
            }
            if t.placed.load(Ordering::SeqCst) && !t.existed {
                let _ = t.dir.remove_file(&t.base);
            }
        }
        dirs.remove_created();
        if !dest_existed {
            let _ = fs::remove_dir(dest);
        }
    };
    if let Err(e) = prepared {
        undo(&targets, &dirs);
        return Err(e);
    }

    let damaged = Mutex::new(Vec::new());
    let mut damaged_files = Vec::new();
    let result = write_all(
        repo,
        &manifest,
        &generated,
        &plans,
        &targets,
        opts,
        &damaged,
        &mut damaged_files,
        progress,
    )
    .and_then(|written| {
        // Everything is written and fsynced: move into place.
        for t in targets.iter().filter(|t| !damaged_files.contains(&t.name)) {
            t.dir.rename(&t.partial, &t.base, opts.force)?;
            t.created.store(false, Ordering::SeqCst);
            t.placed.store(true, Ordering::SeqCst);
        }
        for d in dirs.open.values() {
            d.sync()?;
        }
        Ok(written)
    });
    let (bytes_written, virtual_bytes) = match result {
        Ok(w) => w,
        Err(e) => {
            undo(&targets, &dirs);
            return Err(match e {
                Error::Damaged { detail, .. } => Error::Damaged {
                    generation: gen.name.clone(),
                    detail,
                },
                e => e,
            });
        }
    };
    let mut damaged_ranges = damaged.into_inner().unwrap();
    damaged_ranges.sort_by(|a, b| (&a.disk, a.start).cmp(&(&b.disk, b.start)));
    Ok(ExtractReport {
        generation: gen.name,
        destination: dest.display().to_string(),
        files: targets
            .into_iter()
            .map(|t| t.name)
            .filter(|n| !damaged_files.contains(n))
            .collect(),
        bytes_written,
        virtual_bytes,
        seconds: began.elapsed().as_secs_f64(),
        damaged_ranges,
        damaged_files,
        moved_disks: moved,
    })
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    repo: &Repository,
    manifest: &Manifest,
    generated: &[(String, Vec<u8>)],
    plans: &[Option<WritePlan>],
    targets: &[Target],
    opts: &ExtractOptions,
    damaged: &Mutex<Vec<DamagedRange>>,
    damaged_files: &mut Vec<String>,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let target = |name: &str| targets.iter().find(|t| t.name == name);
    let replaced = |name: &String| {
        plans
            .iter()
            .flatten()
            .any(|p| p.replaces.as_ref() == Some(name))
    };
    for f in &manifest.files {
        if replaced(&f.name) {
            continue;
        }
        let Some(t) = target(&f.name) else { continue };
        let data = match repo.read_object(&f.object) {
            Ok(d) => d,
            Err(e) if opts.allow_damaged && is_repository_damage(&e) => {
                progress.note(&format!("damaged: file {} not restored: {e}", f.name));
                damaged_files.push(f.name.clone());
                continue;
            }
            Err(e) => return Err(e),
        };
        let data = opts.datastore_map.apply(manifest, &f.name, data);
        write_small(t, &data)?;
    }
    for (name, data) in generated {
        if replaced(name) {
            continue;
        }
        if let Some(t) = target(name) {
            write_small(t, data)?;
        }
    }
    let total: u64 = manifest.disks.iter().map(|d| d.virtual_size).sum();
    progress.start("extract", total);
    let mut written = 0;
    for (d, plan) in manifest.disks.iter().zip(plans) {
        written += match plan {
            None => {
                let open = |name: &str| {
                    target(name)
                        .expect("every extent file has a target")
                        .create()
                };
                write_disk(repo, d, &open, opts.allow_damaged, damaged, progress)?
            }
            Some(plan) => {
                let source_descriptor = match &d.layout {
                    Some(l) => l.chain.iter().find_map(|c| c.descriptor.clone()),
                    None => match (
                        manifest
                            .files
                            .iter()
                            .find(|f| Some(&f.name) == d.descriptor.as_ref()),
                        generated
                            .iter()
                            .find(|(n, _)| Some(n) == d.descriptor.as_ref()),
                    ) {
                        (Some(f), _) => Some(
                            String::from_utf8_lossy(&repo.read_object(&f.object)?).into_owned(),
                        ),
                        (None, Some((_, g))) => Some(String::from_utf8_lossy(g).into_owned()),
                        (None, None) => None,
                    },
                };
                let outputs: Vec<&Target> = plan
                    .outputs
                    .iter()
                    .map(|o| target(o).expect("every output has a target"))
                    .collect();
                write_disk_as(
                    repo,
                    d,
                    plan,
                    &outputs,
                    source_descriptor.as_deref(),
                    opts.allow_damaged,
                    damaged,
                    progress,
                )?
            }
        };
    }
    progress.finish();
    Ok((written, total))
}

/// Writes a small file's partial file and fsyncs it.
fn write_small(t: &Target, data: &[u8]) -> Result<()> {
    let (file, path) = t.create()?;
    file.write_all_at(data, 0).ctx("write", &path)?;
    file.sync_all().ctx("fsync", &path)
}

/// Writes a disk through a writer: its bytes first into a sparse raw file (the output itself for
/// raw and flat formats, else a scratch file beside the outputs), then the target format.
#[allow(clippy::too_many_arguments)]
fn write_disk_as(
    repo: &Repository,
    d: &DiskEntry,
    plan: &WritePlan,
    outputs: &[&Target],
    source_descriptor: Option<&str>,
    allow_damaged: bool,
    damaged: &Mutex<Vec<DamagedRange>>,
    progress: &dyn Progress,
) -> Result<u64> {
    const RAW: &str = "\0raw";
    let files: Vec<(File, PathBuf)> = outputs.iter().map(|t| t.create()).collect::<Result<_>>()?;
    // The scratch raw file, when the output is not the raw data itself.
    let scratch = match plan.data_output {
        Some(_) => None,
        None => {
            let t = outputs[0];
            let name = format!("{}.raw", t.partial);
            let f = t.dir.create_replacing(&name, 0o600)?;
            Some((t.dir.clone(), name, f))
        }
    };
    let result = (|| {
        let (raw_file, raw_path): (&File, PathBuf) = match (&scratch, plan.data_output) {
            (Some((dir, name, f)), _) => (f, dir.path_of(name)),
            (None, Some(i)) => (&files[i].0, files[i].1.clone()),
            (None, None) => unreachable!("a scratch file when there is no data output"),
        };
        let flat = DiskEntry {
            extents: vec![ExtentFile {
                kind: "RAW".into(),
                start: 0,
                len: d.virtual_size,
                file: Some(RAW.into()),
                file_offset: 0,
                file_size: d.virtual_size,
                head: None,
                tail: None,
            }],
            layout: None,
            ..d.clone()
        };
        let open = |n: &str| -> Result<(File, PathBuf)> {
            debug_assert_eq!(n, RAW);
            Ok((
                raw_file.try_clone().ctx("reopen", &raw_path)?,
                raw_path.clone(),
            ))
        };
        let n = write_disk(repo, &flat, &open, allow_damaged, damaged, progress)?;
        let outs: Vec<Output<'_>> = files
            .iter()
            .map(|(file, path)| Output { file, path })
            .collect();
        let raw = Output {
            file: raw_file,
            path: &raw_path,
        };
        crate::restore::writer::write(plan, d, raw, &outs, source_descriptor)?;
        for (f, path) in &files {
            f.sync_all().ctx("fsync", path)?;
        }
        Ok(n)
    })();
    if let Some((dir, name, _)) = &scratch {
        let _ = dir.remove_file(name);
    }
    result
}

struct OpenExtent {
    start: u64,
    len: u64,
    file: Option<(File, u64, PathBuf)>,
}

fn write_disk(
    repo: &Repository,
    d: &DiskEntry,
    open: &dyn Fn(&str) -> Result<(File, PathBuf)>,
    allow_damaged: bool,
    damaged: &Mutex<Vec<DamagedRange>>,
    progress: &dyn Progress,
) -> Result<u64> {
    let label = damage::disk_label(d);
    let map = repo.load_disk_map(&d.disk_map)?;
    if map.size != d.virtual_size {
        return Err(Error::Corrupt(format!(
            "disk {} map says {} bytes, the manifest {}",
            d.slot, map.size, d.virtual_size
        )));
    }
    let mut extents = Vec::new();
    for e in &d.extents {
        let file = match &e.file {
            Some(name) => {
                let (f, tmp) = open(name)?;
                f.set_len(e.file_size).ctx("set the size of", &tmp)?;
                for (edge, at) in [(e.head, 0), (e.tail, e.file_offset + e.len)] {
                    if let Some(id) = edge {
                        match repo.read_object(&id) {
                            Ok(data) => f.write_all_at(&data, at).ctx("write", &tmp)?,
                            Err(e) if allow_damaged && is_repository_damage(&e) => {
                                progress.note(&format!(
                                    "damaged: bytes of {name} outside its extent not restored: {e}"
                                ));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Some((f, e.file_offset, tmp))
            }
            None => None,
        };
        extents.push(OpenExtent {
            start: e.start,
            len: e.len,
            file,
        });
    }
    // Zero segments are holes already: count them done, then write the others.
    let nonzero: Vec<(u64, ObjectId)> = map.nonzero().map(|(i, id)| (i, *id)).collect();
    let data_span: u64 = nonzero
        .iter()
        .map(|(i, _)| map.segment_range(*i))
        .map(|(s, e)| e - s)
        .sum();
    progress.advance(map.size - data_span);
    let written: u64 = nonzero
        .into_par_iter()
        .map(|(i, id)| -> Result<u64> {
            let (start, end) = map.segment_range(i);
            let damaged_range = |a: u64, b: u64, e: Error| -> Result<()> {
                let r = DamagedRange {
                    disk: label.clone(),
                    start: a,
                    end: b,
                    reason: e.to_string(),
                };
                if allow_damaged && is_repository_damage(&e) {
                    progress.note(&format!("damaged: {r}"));
                    damaged.lock().unwrap().push(r);
                    Ok(())
                } else if is_repository_damage(&e) {
                    Err(Error::Damaged {
                        generation: String::new(),
                        detail: format!(
                            "{r}\n  run `vmrepo check --repair` to find every damaged range, or pass \
                             --allow-damaged to write what is left"
                        ),
                    })
                } else {
                    Err(e)
                }
            };
            let seg = match repo.load_segment(&id).and_then(|seg| {
                if seg.len() != end - start {
                    return Err(Error::Corrupt(format!(
                        "segment {} covers {} bytes, expected {}",
                        id.short(),
                        seg.len(),
                        end - start
                    )));
                }
                Ok(seg)
            }) {
                Ok(seg) => seg,
                Err(e) => {
                    damaged_range(start, end, e)?;
                    progress.advance(end - start);
                    return Ok(0);
                }
            };
            let ids: Vec<ObjectId> = seg
                .extents
                .iter()
                .filter_map(|e| match e {
                    Extent::Data { id, .. } => Some(*id),
                    Extent::Zero { .. } => None,
                })
                .collect();
            let chunks = match repo.read_objects(&ids) {
                Ok(c) => c,
                Err(e) if allow_damaged && is_repository_damage(&e) => {
                    // Find exactly which chunks are bad; restore the others.
                    let n = write_chunkwise(repo, &seg, start, &extents, &damaged_range)?;
                    progress.advance(end - start);
                    return Ok(n);
                }
                Err(e) => {
                    damaged_range(start, end, e)?;
                    progress.advance(end - start);
                    return Ok(0);
                }
            };
            let mut chunks = chunks.into_iter();
            // Assemble each run of data extents and write it with one call; zero runs stay holes.
            let mut pos = start;
            let mut run_start = start;
            let mut run: Vec<u8> = Vec::new();
            let mut n = 0;
            for e in &seg.extents {
                match e {
                    Extent::Data { len, id } => {
                        let data = chunks.next().expect("one chunk per data extent");
                        if data.len() != *len as usize {
                            return Err(Error::Corrupt(format!(
                                "chunk {} has {} bytes, its segment says {len}",
                                id.short(),
                                data.len()
                            )));
                        }
                        if run.is_empty() {
                            run_start = pos;
                        }
                        run.extend_from_slice(&data);
                        n += *len as u64;
                    }
                    Extent::Zero { .. } => {
                        if !run.is_empty() {
                            write_virtual(&extents, run_start, &run)?;
                            run.clear();
                        }
                    }
                }
                pos += e.len() as u64;
            }
            if !run.is_empty() {
                write_virtual(&extents, run_start, &run)?;
            }
            progress.advance(end - start);
            Ok(n)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))?;
    for e in &extents {
        if let Some((f, _, path)) = &e.file {
            f.sync_all().ctx("fsync", path)?;
        }
    }
    Ok(written)
}

/// True for errors that mean the repository's data is missing or damaged (as opposed to a
/// failure writing the destination).
fn is_repository_damage(e: &Error) -> bool {
    matches!(e, Error::Corrupt(_) | Error::Damaged { .. })
}

/// Restores a segment one chunk at a time, reporting each unreadable chunk's range.
fn write_chunkwise(
    repo: &Repository,
    seg: &crate::repo::manifest::Segment,
    start: u64,
    extents: &[OpenExtent],
    damaged_range: &dyn Fn(u64, u64, Error) -> Result<()>,
) -> Result<u64> {
    let mut pos = start;
    let mut written = 0;
    for e in &seg.extents {
        if let Extent::Data { len, id } = e {
            let got = repo.read_object(id).and_then(|data| {
                if data.len() == *len as usize {
                    Ok(data)
                } else {
                    Err(Error::Corrupt(format!(
                        "chunk {} has {} bytes, its segment says {len}",
                        id.short(),
                        data.len()
                    )))
                }
            });
            match got {
                Ok(data) => {
                    write_virtual(extents, pos, &data)?;
                    written += *len as u64;
                }
                Err(err) => damaged_range(pos, pos + *len as u64, err)?,
            }
        }
        pos += e.len() as u64;
    }
    Ok(written)
}

fn write_virtual(extents: &[OpenExtent], offset: u64, data: &[u8]) -> Result<()> {
    let end = offset + data.len() as u64;
    for e in extents
        .iter()
        .filter(|e| e.start < end && e.start + e.len > offset)
    {
        let s = e.start.max(offset);
        let t = (e.start + e.len).min(end);
        let part = &data[(s - offset) as usize..(t - offset) as usize];
        match &e.file {
            Some((f, file_offset, path)) => f
                .write_all_at(part, file_offset + (s - e.start))
                .ctx("write", path)?,
            None => {
                if !crate::zero::is_zero(part) {
                    return Err(Error::Corrupt(
                        "non-zero data stored for a ZERO extent".into(),
                    ));
                }
            }
        }
    }
    Ok(())
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
