//! `vmrepo ls` and `vmrepo cat`: the volumes and files inside a generation's disks, read
//! straight from the repository (see `vmrepo::guest`).

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use vmrepo::guest::{split_address, Entry, Guest, Volume};
use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};

pub const LS_HELP: &str = "List what is inside a generation's disks, read straight from the \
repository: no root, no FUSE, no loop device, and only the chunks the guest filesystem touches \
are read.\n\nWithout WHERE: the volumes of every disk, `disk0` for a disk without a partition \
table or `disk0/p2` for its partitions (MBR, with logical partitions from p5, or GPT), then \
`disk0/lvm/VG/LV` for the linear logical volumes of an LVM2 physical volume, each with \
its size, what it holds (ext2/3/4, xfs, ntfs, fat, exfat, luks, bitlocker, lvm2, swap or \
unknown) and its label. With WHERE = VOLUME or VOLUME:/PATH on an ext2/3/4, XFS, NTFS, FAT or exFAT volume: the entries \
of that directory (mode, owner, group, size, modification time in UTC, name, and a symlink's \
target), or the one entry when PATH is not a directory. Symlinks are shown, never followed. \
Other filesystems are named and refused; encrypted volumes are never guessed at.\n\nExamples: \
`vmrepo ls /backup web01`, `vmrepo ls /backup web01@-1 disk0/p2:/etc`.";

pub const CAT_HELP: &str = "Write one file from inside a generation's disk to standard output, \
read straight from the repository (see `vmrepo ls` for volume names): `vmrepo cat /backup \
web01@-1 disk0/p2:/etc/nginx/nginx.conf > nginx.conf`. Symlinks are followed inside the guest \
filesystem. Only the chunks holding the file and the filesystem metadata that leads to it are \
read, each verified against its hash; a damaged chunk stops the output with an error naming \
the file.";

pub const RESTORE_FILE_HELP: &str = "Restore a file, a symlink or a whole directory tree from \
inside a generation's disk into DEST, read straight from the repository (see `vmrepo ls` for \
volume names): `vmrepo restore-file /backup web01@-1 disk0/p2:/etc/nginx /tmp/restore` makes \
/tmp/restore/nginx/...; a PATH of / restores the volume's whole tree into DEST.\n\nModes, \
modification and access times, symlinks (as links, never followed) and holes are kept; owners and \
groups too when run as root. Devices, FIFOs and sockets are listed and skipped; hard links become \
separate copies. DEST is made if missing; nothing is ever written outside it: a symbolic link \
found in DEST where the tree needs a directory is refused, never followed. Each file is written \
as .NAME.vmrepo-partial and renamed into place when complete. Existing files are refused unless \
--force; existing directories are merged into. A file whose chunks are damaged is named and left \
out, the rest is restored, and the exit status is 1.";

/// `vmrepo restore-file` arguments.
#[derive(Args)]
pub struct RestoreFileArgs {
    /// Repository directory.
    repo: PathBuf,
    /// VM, VM@-N or VM@TIME.
    generation: String,
    /// VOLUME:/PATH of the file or directory (`disk0/p2:/etc/nginx`).
    #[arg(value_name = "WHAT")]
    address: String,
    /// Directory to restore into (made if missing).
    dest: PathBuf,
    /// Replace existing files and links in DEST.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub const DIFF_HELP: &str = "Show the files added, removed and changed between two generations \
inside their disks, read straight from the repository: `vmrepo diff /backup web01@-3 web01` \
compares every readable (ext2/3/4, XFS, NTFS, FAT, exFAT) volume the two have in common; `vmrepo diff /backup web01@-1 web01 \
disk0/p2:/etc` only that directory. A file is changed when its kind, size, modification time, \
mode, owner or symlink target differs (contents are not compared); a directory added or removed \
is one line with the number of entries under it. Lines start with + (added), - (removed) or M \
(changed, with what differs).";

pub const LOG_HELP: &str = "List the generations of VM in which one guest file appeared, \
changed or disappeared, oldest first, with its size and modification time: `vmrepo log /backup \
web01 disk0/p2:/etc/nginx/nginx.conf`. A change is a different kind, size, modification time, \
mode, owner or symlink target. Each generation's disk is read straight from the repository; \
only the chunks leading to the file are fetched.";

/// `vmrepo diff` arguments.
#[derive(Args)]
pub struct DiffArgs {
    /// Repository directory.
    repo: PathBuf,
    /// The older generation (VM, VM@-N or VM@TIME).
    old: String,
    /// The newer generation.
    new: String,
    /// VOLUME or VOLUME:/PATH to compare (default: every readable volume both have).
    #[arg(value_name = "WHERE")]
    address: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `vmrepo log` arguments.
#[derive(Args)]
pub struct LogArgs {
    /// Repository directory.
    repo: PathBuf,
    /// The VM.
    vm: String,
    /// VOLUME:/PATH of the file (`disk0/p2:/etc/hosts`).
    #[arg(value_name = "FILE")]
    address: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `vmrepo ls` arguments.
#[derive(Args)]
pub struct LsArgs {
    /// Repository directory.
    repo: PathBuf,
    /// VM, VM@-N or VM@TIME.
    generation: String,
    /// VOLUME or VOLUME:/PATH (`disk0/p2:/etc`); without it, the volumes.
    #[arg(value_name = "WHERE")]
    address: Option<String>,
    /// List subdirectories too, all the way down (JSON: one list, names as paths below WHERE).
    #[arg(short = 'r', long)]
    recursive: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `vmrepo cat` arguments.
#[derive(Args)]
pub struct CatArgs {
    /// Repository directory.
    repo: PathBuf,
    /// VM, VM@-N or VM@TIME.
    generation: String,
    /// VOLUME:/PATH of the file (`disk0/p2:/etc/hosts`).
    #[arg(value_name = "FILE")]
    address: String,
}

fn open(repo: &std::path::Path, generation: &str, ctx: &Context) -> anyhow::Result<Guest> {
    let r = Arc::new(ctx.open_repo(repo, LockMode::Read, &Bar::new(false))?);
    Guest::open(r, generation).with_context(|| format!("cannot open generation {generation}"))
}

/// Runs `vmrepo ls`.
pub fn ls(a: LsArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let guest = open(&a.repo, &a.generation, ctx)?;
    let Some(address) = a.address else {
        let volumes = guest
            .volumes()
            .with_context(|| format!("cannot list the volumes of {}", guest.generation()))?;
        if a.json {
            print_json(&volumes);
        } else {
            for v in &volumes {
                println!("{}", volume_line(v));
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let (volume, path) = split_address(&address);
    let v = guest.find(volume)?;
    let fs = guest.filesystem(&v)?;
    let top = fs.stat(&path)?;
    let stdout = std::io::stdout();
    let mut out = PipeWriter {
        inner: std::io::BufWriter::new(stdout.lock()),
        closed: false,
    };
    let written: anyhow::Result<()> = if top.kind != "dir" {
        print_entries(&mut out, a.json, &[top]).map_err(anyhow::Error::from)
    } else if a.recursive {
        let mut all = Vec::new();
        let walked = list_tree(&fs, &path, "", 0, &mut |dir, entries| {
            if a.json {
                all.extend(entries.iter().cloned().map(|mut e| {
                    e.name = vmrepo::guest::join(dir, &e.name)
                        .trim_start_matches('/')
                        .to_string();
                    e
                }));
                Ok(())
            } else {
                let here = match dir.trim_start_matches('/') {
                    "" => path.clone(),
                    below => vmrepo::guest::join(&path, below),
                };
                writeln!(out, "{here}:")
                    .and_then(|_| print_entries(&mut out, false, entries))
                    .and_then(|_| writeln!(out))
                    .map_err(anyhow::Error::from)
            }
        });
        walked.and_then(|_| {
            if a.json {
                print_entries(&mut out, true, &all)?;
            }
            Ok(())
        })
    } else {
        fs.list(&path)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(print_entries(&mut out, a.json, &l)?))
    };
    match written.and_then(|_| Ok(out.flush()?)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader went away (`| head`): stop quietly, as a process killed by SIGPIPE would.
        Err(_) if out.closed => Ok(ExitCode::from(141)),
        Err(e) if e.downcast_ref::<std::io::Error>().is_some() => {
            Err(e.context("cannot write the listing to standard output"))
        }
        Err(e) => Err(e),
    }
}

/// Lists `path` of `fs` and every directory below it, depth first, handing each directory's
/// entries to `each` with the directory's path relative to the start.
fn list_tree(
    fs: &vmrepo::guest::Filesystem,
    path: &str,
    rel: &str,
    depth: usize,
    each: &mut dyn FnMut(&str, &[Entry]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if depth > 256 {
        anyhow::bail!(
            "{}: directories nested deeper than 256 levels (a loop?)",
            fs.describe(path)
        );
    }
    let entries = fs.list(path)?;
    each(rel, &entries)?;
    for e in entries.iter().filter(|e| e.kind == "dir") {
        list_tree(
            fs,
            &vmrepo::guest::join(path, &e.name),
            &vmrepo::guest::join(rel, &e.name),
            depth + 1,
            each,
        )?;
    }
    Ok(())
}

/// Writes entries as JSON or as `ls -l` lines.
fn print_entries(out: &mut dyn Write, json: bool, entries: &[Entry]) -> std::io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, entries)?;
        writeln!(out)
    } else {
        entries
            .iter()
            .try_for_each(|e| writeln!(out, "{}", entry_line(e)))
    }
}

/// Runs `vmrepo cat`.
pub fn cat(a: CatArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let guest = open(&a.repo, &a.generation, ctx)?;
    let (volume, path) = split_address(&a.address);
    let v = guest.find(volume)?;
    let fs = guest.filesystem(&v)?;
    let stdout = std::io::stdout();
    let mut out = PipeWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, stdout.lock()),
        closed: false,
    };
    let done = fs
        .copy_to(&path, &mut out)
        .map_err(anyhow::Error::from)
        .and_then(|_| out.flush().context("write standard output"));
    match done {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader went away (`| head`): stop quietly, as a process killed by SIGPIPE would.
        Err(_) if out.closed => Ok(ExitCode::from(141)),
        Err(e) => {
            let damaged = matches!(
                e.downcast_ref::<vmrepo::Error>(),
                Some(vmrepo::Error::Corrupt(_) | vmrepo::Error::Damaged { .. })
            );
            let ranges = if damaged {
                fs.damaged_ranges(&path)
            } else {
                Vec::new()
            };
            if ranges.is_empty() {
                return Err(e);
            }
            Err(anyhow::anyhow!(
                "{e:#}\n  damaged in {}: {}; the rest of the file reads (`vmrepo restore-file` \
                 names each damaged file of a tree)",
                fs.describe(&path),
                vmrepo::guest::describe_ranges(&ranges)
            ))
        }
    }
}

/// Standard output that remembers whether the reader closed it.
struct PipeWriter<W: Write> {
    inner: W,
    closed: bool,
}

impl<W: Write> PipeWriter<W> {
    fn note<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        if r.as_ref().is_err_and(|e| e.kind() == ErrorKind::BrokenPipe) {
            self.closed = true;
        }
        r
    }
}

impl<W: Write> Write for PipeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write(buf);
        self.note(r)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.note(r)
    }
}

/// Runs `vmrepo restore-file`.
pub fn restore_file(a: RestoreFileArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    vmrepo::repo::refuse_inside(&a.repo, &a.dest, "the destination")?;
    let guest = open(&a.repo, &a.generation, ctx)?;
    let (volume, path) = split_address(&a.address);
    let v = guest.find(volume)?;
    let fs = guest.filesystem(&v)?;
    let bar = Bar::new(!a.json);
    let r = vmrepo::guest::restore_file::restore(
        &fs,
        &path,
        &a.dest,
        vmrepo::guest::restore_file::RestoreOptions { force: a.force },
        &bar,
    )
    .with_context(|| {
        format!(
            "cannot restore {} into {}",
            fs.describe(&path),
            a.dest.display()
        )
    })?;
    if a.json {
        print_json(&r);
    } else {
        println!(
            "restored {} file(s), {} directory(ies), {} symlink(s), {} into {}{}",
            r.files,
            r.directories,
            r.symlinks,
            human(r.bytes),
            a.dest.display(),
            if r.owners {
                ""
            } else {
                " (owners not set: run as root to set them)"
            }
        );
        for s in &r.skipped {
            println!("  skipped {s}");
        }
        for f in &r.failed {
            println!("  NOT RESTORED {f}");
        }
    }
    Ok(if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `vmrepo diff`.
pub fn diff(a: DiffArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let r = Arc::new(ctx.open_repo(&a.repo, LockMode::Read, &Bar::new(false))?);
    let open = |spec: &str| {
        Guest::open(r.clone(), spec).with_context(|| format!("cannot open generation {spec}"))
    };
    let (old, new) = (open(&a.old)?, open(&a.new)?);
    let pairs: Vec<(String, String)> = match &a.address {
        Some(address) => {
            let (volume, path) = split_address(address);
            vec![(volume.to_string(), path)]
        }
        None => {
            let theirs: Vec<String> = old
                .volumes()?
                .into_iter()
                .filter(|v| v.readable)
                .map(|v| v.name)
                .collect();
            new.volumes()?
                .into_iter()
                .filter(|v| v.readable && theirs.contains(&v.name))
                .map(|v| (v.name, "/".to_string()))
                .collect()
        }
    };
    if pairs.is_empty() {
        anyhow::bail!(
            "{} and {} have no readable (ext2/3/4, XFS, NTFS, FAT or exFAT) volume in common (see `vmrepo ls` for each)",
            old.generation(),
            new.generation()
        );
    }
    let mut all = Vec::new();
    for (volume, path) in pairs {
        let (a_vol, b_vol) = (old.find(&volume)?, new.find(&volume)?);
        if a_vol.io.same_stored(&b_vol.io) {
            // The same stored segments: the same bytes, so nothing in the volume changed.
            if !a.json {
                eprintln!(
                    "vmrepo: {volume}: the same stored data in both generations, nothing changed \
                     (not walked)"
                );
            }
            continue;
        }
        let a_fs = old.filesystem(&a_vol)?;
        let b_fs = new.filesystem(&b_vol)?;
        for c in vmrepo::guest::diff::diff(&a_fs, &b_fs, &path)? {
            all.push((volume.clone(), c));
        }
    }
    if a.json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|(v, c)| {
                serde_json::json!({ "volume": v, "what": c.what, "path": c.path, "detail": c.detail })
            })
            .collect();
        print_json(&rows);
    } else {
        for (v, c) in &all {
            let mark = match c.what {
                "added" => '+',
                "removed" => '-',
                _ => 'M',
            };
            println!("{mark} {v}:{}  ({})", c.path, c.detail);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `vmrepo log`.
pub fn log(a: LogArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let r = Arc::new(ctx.open_repo(&a.repo, LockMode::Read, &Bar::new(false))?);
    let (volume, path) = split_address(&a.address);
    let bar = Bar::new(!a.json);
    let versions = vmrepo::guest::history::history(r, &a.vm, volume, &path, &bar)
        .with_context(|| format!("cannot follow {volume}:{path} through {}", a.vm))?;
    if a.json {
        print_json(&versions);
    } else if versions.is_empty() {
        println!("{volume}:{path} is in no generation of {}", a.vm);
    } else {
        for v in &versions {
            let when = v
                .mtime
                .and_then(|t| jiff::Timestamp::from_second(t).ok())
                .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
            let size = v.size.map(|s| format!("{s} bytes")).unwrap_or_default();
            let detail = if v.detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", v.detail)
            };
            let line = format!("{}  {:<8} {size:>14}  {when}{detail}", v.generation, v.what);
            println!("{}", line.trim_end());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn volume_line(v: &Volume) -> String {
    let mut line = format!("{:<12} {:>10}  {}", v.name, human(v.size), v.content);
    if let Some(l) = &v.label {
        line.push_str(&format!("  label {l:?}"));
    }
    let part: Vec<&str> = [v.partition_type.as_deref(), v.partition_name.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    if !part.is_empty() {
        line.push_str(&format!("  ({})", part.join(", ")));
    }
    line
}

fn entry_line(e: &Entry) -> String {
    let kind = match e.kind {
        "dir" => 'd',
        "symlink" => 'l',
        "block" => 'b',
        "char" => 'c',
        "fifo" => 'p',
        "socket" => 's',
        _ => '-',
    };
    let mtime = jiff::Timestamp::from_second(e.mtime)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| e.mtime.to_string());
    let target = e
        .target
        .as_deref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!(
        "{kind}{} {:>6} {:>6} {:>12} {mtime} {}{target}",
        mode_text(e.mode),
        e.uid,
        e.gid,
        e.size,
        e.name
    )
}

/// `rwxr-xr-x`, with setuid, setgid and sticky bits as `ls -l` shows them.
fn mode_text(mode: u16) -> String {
    let mut s = String::with_capacity(9);
    for (shift, special, set, unset) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_as_ls_shows_them() {
        assert_eq!(mode_text(0o755), "rwxr-xr-x");
        assert_eq!(mode_text(0o4755), "rwsr-xr-x");
        assert_eq!(mode_text(0o1777), "rwxrwxrwt");
        assert_eq!(mode_text(0o2640), "rw-r-S---");
    }
}
