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
use std::fs::{self};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::maintain::damage::{self, DamagedRange};
use crate::progress::Progress;
use crate::repo::index::GenerationInfo;
use crate::repo::manifest::Manifest;
use crate::repo::Repository;
use crate::restore::safe_fs::Dir;
use crate::restore::writer::{DiskFormat, WritePlan};
use crate::vmware::vm::is_safe_relative;

mod disk;
mod target;

pub use crate::restore::placement::{place, stored_vmx, MovedDisk, Placement};
use disk::{is_repository_damage, write_disk, write_disk_as};
use target::{check_target, DestDirs, Target};

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

/// Writes the generation `spec` (`VM`, `VM@-1`, `VM@TIME`) into directory `dest`.
pub fn extract(
    repo: &Repository,
    spec: &str,
    dest: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    let began = Instant::now();
    crate::repo::refuse_inside(repo.location(), dest, "the destination")?;
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
