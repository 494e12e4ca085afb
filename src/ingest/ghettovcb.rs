//! Import of a ghettoVCB backup rotation: the folders `VM-YYYY-MM-DD_HH-MM-SS` (and `.gz`
//! tar archives of such folders, ghettoVCB's compressed mode) become generations of the VM at
//! their folder dates, oldest first, so a user switching from ghettoVCB keeps their history.
//!
//! Folder dates carry no zone; ghettoVCB writes the ESXi host's clock, which is UTC unless
//! changed, so they are read as UTC unless the caller gives another zone. Re-running an import
//! skips generations that are already there.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::ingest::{format_time, ingest, IngestOptions, IngestReport, SegmentWorkers};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::vmware::vm::{is_safe_relative, validate_vm_name};

/// One backup of the rotation.
#[derive(Clone, Debug, Serialize)]
pub struct Backup {
    /// VM name from the folder name (before the date).
    pub vm: String,
    /// The folder date.
    pub time: String,
    /// The folder or archive.
    pub path: PathBuf,
    /// True for a `.gz` / `.tgz` archive.
    pub archive: bool,
    /// Bytes it occupies on disk (allocated blocks; the archive's size).
    pub disk_bytes: u64,
}

/// What happened to one backup.
#[derive(Clone, Debug, Serialize)]
pub struct Imported {
    /// The backup.
    pub backup: Backup,
    /// The ingest, when it ran.
    pub ingest: Option<IngestReport>,
    /// Why it was skipped or failed.
    pub message: Option<String>,
    /// True if it failed.
    pub failed: bool,
}

/// The whole import.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// Every backup found, oldest first.
    pub backups: Vec<Imported>,
    /// Bytes the imported backups occupy in the rotation.
    pub rotation_bytes: u64,
    /// Bytes the repository stored for them.
    pub stored_bytes: u64,
}

/// Splits `web01-2026-11-20_01-00-03` into the VM name and the naive date-time.
fn parse_name(name: &str) -> Option<(String, DateTime)> {
    const DATE_LEN: usize = "2026-11-20_01-00-03".len();
    if name.len() <= DATE_LEN + 1 || !name.is_char_boundary(name.len() - DATE_LEN - 1) {
        return None;
    }
    let (vm, rest) = name.split_at(name.len() - DATE_LEN - 1);
    let date = rest.strip_prefix('-')?;
    let dt = DateTime::strptime("%Y-%m-%d_%H-%M-%S", date).ok()?;
    Some((vm.to_string(), dt))
}

fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

/// Finds the backups in `dir`, oldest first; folder dates are read in `tz`.
pub fn scan(dir: &Path, tz: &TimeZone) -> Result<Vec<Backup>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).ctx("read directory", dir)? {
        let entry = entry.ctx("read directory", dir)?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let is_dir = path.is_dir();
        let stem = if is_dir {
            Some(file_name.as_str())
        } else {
            [".tar.gz", ".tgz", ".gz"]
                .iter()
                .find_map(|ext| file_name.strip_suffix(ext))
        };
        let Some((vm, dt)) = stem.and_then(parse_name) else {
            continue;
        };
        let time = dt
            .to_zoned(tz.clone())
            .map_err(|e| {
                Error::bad_input(&path, format!("its date cannot be placed in time: {e}"))
            })?
            .timestamp();
        out.push(Backup {
            vm,
            time: format_time(time),
            disk_bytes: disk_usage(&path),
            archive: !is_dir,
            path,
        });
    }
    if out.is_empty() {
        return Err(Error::bad_input(
            dir,
            "no ghettoVCB backups in it (folders or .gz archives named VM-YYYY-MM-DD_HH-MM-SS)",
        ));
    }
    out.sort_by(|a, b| (&a.time, &a.vm).cmp(&(&b.time, &b.vm)));
    Ok(out)
}

/// Unpacks a ghettoVCB `.gz` archive (a gzip tar of one backup folder) into `into`, writing
/// zero blocks as holes; returns the folder holding the .vmx.
fn unpack(archive: &Path, into: &Path) -> Result<PathBuf> {
    let file = File::open(archive).ctx("open", archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let bad = |e: std::io::Error| {
        Error::bad_input(archive, format!("not a readable gzip tar archive: {e}"))
    };
    let mut vmx_dir = None;
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let rel = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let rel = rel
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        if rel.is_empty() {
            continue;
        }
        if !is_safe_relative(&rel) {
            return Err(Error::bad_input(
                archive,
                format!("it holds an unsafe path {rel:?}"),
            ));
        }
        let dest = into.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&dest).ctx("create directory", &dest)?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).ctx("create directory", parent)?;
                }
                copy_sparse(&mut entry, &dest).map_err(|e| match e {
                    Error::Io {
                        op: "read", cause, ..
                    } => bad(cause),
                    e => e,
                })?;
                if rel.to_ascii_lowercase().ends_with(".vmx") {
                    vmx_dir = dest.parent().map(|p| p.to_path_buf());
                }
            }
            _ => {} // links and specials are not part of a ghettoVCB backup
        }
    }
    vmx_dir.ok_or_else(|| Error::bad_input(archive, "the archive holds no .vmx file"))
}

fn copy_sparse(from: &mut impl Read, dest: &Path) -> Result<()> {
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .ctx("create", dest)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = from.read(&mut buf[filled..]).ctx("read", dest)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for (i, block) in buf[..filled].chunks(64 << 10).enumerate() {
            if !crate::zero::is_zero(block) {
                out.write_all_at(block, pos + (i as u64) * (64 << 10))
                    .ctx("write", dest)?;
            }
        }
        pos += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    out.set_len(pos).ctx("set the size of", dest)?;
    Ok(())
}

/// Imports the rotation in `dir`: every backup not yet in the repository becomes a generation
/// at its folder date. `name` overrides the VM name of every backup; archives are unpacked
/// under `tmp` one at a time.
pub fn import(
    repo: &Repository,
    dir: &Path,
    name: Option<&str>,
    tz: &TimeZone,
    tmp: &Path,
    workers: &SegmentWorkers,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    if let Some(n) = name {
        validate_vm_name(n)?;
    }
    let backups = scan(dir, tz)?;
    let mut report = ImportReport {
        backups: Vec::new(),
        rotation_bytes: 0,
        stored_bytes: 0,
    };
    for b in backups {
        let vm = name.unwrap_or(&b.vm).to_string();
        let time: Timestamp = b.time.parse().expect("formatted by us");
        if repo.with_index(|i| i.has_generation(&vm, &b.time))? {
            report.backups.push(Imported {
                message: Some(format!("{vm}@{} is already in the repository", b.time)),
                backup: b,
                ingest: None,
                failed: false,
            });
            continue;
        }
        progress.note(&format!(
            "importing {} as {vm}@{}",
            b.path.display(),
            b.time
        ));
        let opts = IngestOptions {
            name: Some(vm.clone()),
            time: Some(time),
            recorded_source: b.archive.then(|| b.path.clone()),
            workers: workers.clone(),
            ..Default::default()
        };
        let result = if b.archive {
            let work = tmp.join(format!(".vmrepo-import-{}", std::process::id()));
            let r = fs::create_dir_all(&work)
                .ctx("create directory", &work)
                .and_then(|_| unpack(&b.path, &work))
                .and_then(|folder| ingest(repo, &folder, &opts, progress));
            let _ = fs::remove_dir_all(&work);
            r
        } else {
            ingest(repo, &b.path, &opts, progress)
        };
        match result {
            Ok(r) => {
                report.rotation_bytes += b.disk_bytes;
                report.stored_bytes += r.stats.bytes_stored;
                report.backups.push(Imported {
                    backup: b,
                    ingest: Some(r),
                    message: None,
                    failed: false,
                });
            }
            Err(e) => {
                progress.note(&format!("failed: {}: {e}", b.path.display()));
                report.backups.push(Imported {
                    backup: b,
                    ingest: None,
                    message: Some(e.to_string()),
                    failed: true,
                });
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_parse() {
        let (vm, dt) = parse_name("web-01-2026-11-20_01-00-03").unwrap();
        assert_eq!(vm, "web-01");
        assert_eq!(dt.to_string(), "2026-11-20T01:00:03");
        assert!(parse_name("web01").is_none());
        assert!(parse_name("web01-2026-13-20_01-00-03").is_none());
        assert!(parse_name("-2026-11-20_01-00-03").is_none());
    }
}
