//! Extract: write a generation back as a VM directory — small files byte for byte, each flat disk
//! in its original layout as sparse files, sparse and chained disks (or any disk, with
//! `--disk-format`) laid out afresh by a [`crate::writer`] — verifying every chunk's hash on the way.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use std::sync::Mutex;

use crate::damage::{self, DamagedRange};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::sync_dir;
use crate::id::ObjectId;
use crate::index::GenerationInfo;
use crate::manifest::{DiskEntry, Extent, ExtentFile};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::vm::is_safe_relative;
use crate::writer::{DiskFormat, WritePlan};

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
    pub datastore_map: crate::relocate::DatastoreMap,
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
}

struct Target {
    name: String,
    final_path: PathBuf,
    tmp_path: PathBuf,
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
    fs::create_dir_all(dest).ctx("create directory", dest)?;

    // Decide every output file first, and refuse before writing anything.
    let plans: Vec<Option<WritePlan>> = manifest
        .disks
        .iter()
        .map(|d| crate::writer::plan(d, opts.disk_format))
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
    for f in &manifest.files {
        if replaced.contains(&&f.name) {
            continue;
        }
        if !opts.disk_only || disk_files.contains(&f.name) {
            names.push(&f.name);
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
    let mut targets = Vec::new();
    for n in &names {
        if !is_safe_relative(n) {
            return Err(Error::Corrupt(format!(
                "generation {} names an unsafe file path {n:?}",
                gen.name
            )));
        }
        let final_path = dest.join(n);
        if final_path.exists() && !opts.force {
            return Err(Error::Exists(final_path));
        }
        let tmp_path = final_path.with_file_name(format!(
            ".{}.vmrepo-partial",
            final_path.file_name().unwrap().to_string_lossy()
        ));
        targets.push(Target {
            name: n.to_string(),
            final_path,
            tmp_path,
        });
    }
    let damaged = Mutex::new(Vec::new());
    let mut damaged_files = Vec::new();
    let result = write_all(
        repo,
        &manifest,
        &plans,
        &targets,
        opts,
        &damaged,
        &mut damaged_files,
        progress,
    );
    if result.is_err() {
        for t in &targets {
            let _ = fs::remove_file(&t.tmp_path);
        }
    }
    let (bytes_written, virtual_bytes) = result.map_err(|e| match e {
        Error::Damaged { detail, .. } => Error::Damaged {
            generation: gen.name.clone(),
            detail,
        },
        e => e,
    })?;
    let mut damaged_ranges = damaged.into_inner().unwrap();
    damaged_ranges.sort_by(|a, b| (&a.disk, a.start).cmp(&(&b.disk, b.start)));
    // Everything is written and fsynced: move into place.
    let mut dirs: Vec<PathBuf> = Vec::new();
    for t in targets.iter().filter(|t| !damaged_files.contains(&t.name)) {
        fs::rename(&t.tmp_path, &t.final_path).ctx("rename into place", &t.final_path)?;
        let dir = t.final_path.parent().unwrap().to_path_buf();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for d in dirs {
        sync_dir(&d)?;
    }
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
    })
}

fn create(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).ctx("create directory", dir)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .ctx("create", path)
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    repo: &Repository,
    manifest: &crate::manifest::Manifest,
    plans: &[Option<WritePlan>],
    targets: &[Target],
    opts: &ExtractOptions,
    damaged: &Mutex<Vec<DamagedRange>>,
    damaged_files: &mut Vec<String>,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let tmp_of = |name: &str| {
        targets
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.tmp_path.clone())
    };
    for f in &manifest.files {
        if plans
            .iter()
            .flatten()
            .any(|p| p.replaces.as_ref() == Some(&f.name))
        {
            continue;
        }
        let Some(tmp) = tmp_of(&f.name) else { continue };
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
        let file = create(&tmp)?;
        file.write_all_at(&data, 0).ctx("write", &tmp)?;
        file.sync_all().ctx("fsync", &tmp)?;
    }
    let total: u64 = manifest.disks.iter().map(|d| d.virtual_size).sum();
    progress.start("extract", total);
    let mut written = 0;
    for (d, plan) in manifest.disks.iter().zip(plans) {
        written += match plan {
            None => write_disk(repo, d, &tmp_of, opts.allow_damaged, damaged, progress)?,
            Some(plan) => write_disk_as(
                repo,
                manifest,
                d,
                plan,
                &tmp_of,
                opts.allow_damaged,
                damaged,
                progress,
            )?,
        };
    }
    progress.finish();
    Ok((written, total))
}

/// Writes a disk through a writer: its bytes first into a sparse raw file (the output itself for
/// raw and flat formats, else a scratch file beside the outputs), then the target format.
#[allow(clippy::too_many_arguments)]
fn write_disk_as(
    repo: &Repository,
    manifest: &crate::manifest::Manifest,
    d: &DiskEntry,
    plan: &WritePlan,
    tmp_of: &dyn Fn(&str) -> Option<PathBuf>,
    allow_damaged: bool,
    damaged: &Mutex<Vec<DamagedRange>>,
    progress: &dyn Progress,
) -> Result<u64> {
    const RAW: &str = "\0raw";
    let outputs: Vec<PathBuf> = plan
        .outputs
        .iter()
        .map(|o| tmp_of(o).expect("every output has a target"))
        .collect();
    let raw = match plan.data_output {
        Some(i) => outputs[i].clone(),
        None => outputs[0].with_file_name(format!(
            "{}.raw",
            outputs[0].file_name().unwrap().to_string_lossy()
        )),
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
    let lookup = |n: &str| {
        if n == RAW {
            Some(raw.clone())
        } else {
            tmp_of(n)
        }
    };
    let source_descriptor = match &d.layout {
        Some(l) => l.chain.iter().find_map(|c| c.descriptor.clone()),
        None => match manifest
            .files
            .iter()
            .find(|f| Some(&f.name) == d.descriptor.as_ref())
        {
            Some(f) => Some(String::from_utf8_lossy(&repo.read_object(&f.object)?).into_owned()),
            None => None,
        },
    };
    let result = write_disk(repo, &flat, &lookup, allow_damaged, damaged, progress).and_then(|n| {
        crate::writer::write(plan, d, &raw, &outputs, source_descriptor.as_deref())?;
        for o in &outputs {
            File::open(o).and_then(|f| f.sync_all()).ctx("fsync", o)?;
        }
        Ok(n)
    });
    if plan.data_output.is_none() {
        let _ = fs::remove_file(&raw);
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
    tmp_of: &dyn Fn(&str) -> Option<PathBuf>,
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
                let tmp = tmp_of(name).expect("every extent file has a target");
                let f = create(&tmp)?;
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
    let written: u64 = (0..map.segments.len())
        .into_par_iter()
        .map(|i| -> Result<u64> {
            let (start, end) = map.segment_range(i);
            let id = map.segments[i];
            if id.is_zero() {
                progress.advance(end - start);
                return Ok(0);
            }
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
    seg: &crate::manifest::Segment,
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
                if !crate::chunker::is_zero(part) {
                    return Err(Error::Corrupt(
                        "non-zero data stored for a ZERO extent".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}
