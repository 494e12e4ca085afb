//! `vmrepo restore-file`: files and trees copied out of a guest filesystem into a local
//! directory, with their modes, times, symlinks, holes and (as root) owners, never writing
//! outside that directory.
//!
//! Every name is created relative to an opened directory without following links
//! ([`crate::restore::safe_fs`]): a link planted in the destination, where a directory of the
//! tree goes, is refused, never followed. A file is written as `.NAME.vmrepo-partial` and renamed
//! into place when complete, so a name appears only whole. A file that cannot be read (a damaged
//! chunk) is reported by name and left out; the rest of the tree is restored.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::guest::{join, Entry, Filesystem};
use crate::progress::Progress;
use crate::restore::safe_fs::{self, Dir};

/// Directory depth followed at most (a damaged filesystem may loop).
const MAX_DEPTH: usize = 256;

/// How [`restore`] treats names that exist in the destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Replace existing files and links (directories are always merged into).
    pub force: bool,
}

/// What [`restore`] did.
#[derive(Debug, Default, Serialize)]
pub struct RestoreReport {
    /// Regular files written.
    pub files: u64,
    /// Directories made or merged into.
    pub directories: u64,
    /// Symbolic links made.
    pub symlinks: u64,
    /// Bytes of file content (holes included).
    pub bytes: u64,
    /// Whether owners and groups were set (only as root).
    pub owners: bool,
    /// Devices, FIFOs and sockets, which are not restored.
    pub skipped: Vec<String>,
    /// What could not be restored, and why.
    pub failed: Vec<String>,
    /// Of those, the files whose stored data is damaged, with the byte ranges that are.
    pub damaged: Vec<DamagedFile>,
}

/// A file not restored because some of its stored data is damaged.
#[derive(Debug, Serialize)]
pub struct DamagedFile {
    /// `vm@time:volume:path`.
    pub path: String,
    /// The damaged byte ranges, `[start, end)`.
    pub ranges: Vec<[u64; 2]>,
}

struct Restorer<'a> {
    fs: &'a Filesystem,
    opts: RestoreOptions,
    owners: bool,
    progress: &'a dyn Progress,
    report: RestoreReport,
}

/// Restores `path` of `fs` into directory `dest` (made if missing): a file or link as
/// `dest/NAME`, a directory as `dest/NAME/...`, the root as the content of `dest`.
pub fn restore(
    fs: &Filesystem,
    path: &str,
    dest: &Path,
    opts: RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let top = fs.stat(path)?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io("create directory", dest, e))?;
    let dir = Dir::open(dest)?;
    // SAFETY: geteuid has no preconditions.
    let owners = unsafe { libc::geteuid() } == 0;
    let mut r = Restorer {
        fs,
        opts,
        owners,
        progress,
        report: RestoreReport {
            owners,
            ..Default::default()
        },
    };
    progress.start(&format!("restore {}", fs.describe(path)), 0);
    if path.trim_end_matches('/').is_empty() {
        r.children(&dir, "/", 0)?;
    } else {
        let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        r.entry(&dir, path, name, &top, 0)?;
    }
    progress.finish();
    dir.sync_filesystem()?;
    Ok(r.report)
}

impl Restorer<'_> {
    /// Restores the entries of guest directory `path` into `dir`.
    fn children(&mut self, dir: &Dir, path: &str, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::GuestFilesystem(format!(
                "{}: directories nested deeper than {MAX_DEPTH} levels (a loop?)",
                self.fs.describe(path)
            )));
        }
        for e in self.fs.list(path)? {
            if path == "/" && e.name == "lost+found" {
                continue;
            }
            let child = join(path, &e.name);
            self.entry(dir, &child, &e.name, &e, depth + 1)?;
        }
        Ok(())
    }

    /// Restores one entry as `name` in `dir`. A file that cannot be read or written is noted
    /// in the report; an error that concerns the destination as a whole stops the restore.
    fn entry(&mut self, dir: &Dir, path: &str, name: &str, e: &Entry, depth: usize) -> Result<()> {
        match e.kind {
            "dir" => {
                let (sub, _) = dir.make_dir(name, "while restoring a directory tree")?;
                self.children(&sub, path, depth)?;
                sub.set_mode(e.mode as u32)?;
                self.attributes(dir, name, e)?;
                self.report.directories += 1;
            }
            "file" => match self.file(dir, path, name, e) {
                Ok(()) => {}
                Err(
                    err @ (Error::Corrupt(_) | Error::GuestFilesystem(_) | Error::Damaged { .. }),
                ) => {
                    // Listed at the end (NOT RESTORED): no note on the way, once is enough.
                    let what = self.fs.describe(path);
                    let mut line = format!("{what}: {err}");
                    if matches!(err, Error::Corrupt(_) | Error::Damaged { .. }) {
                        let ranges = self.fs.damaged_ranges(path);
                        if !ranges.is_empty() {
                            line.push_str(&format!(
                                " (damaged: {})",
                                crate::guest::describe_ranges(&ranges)
                            ));
                            self.report.damaged.push(DamagedFile {
                                path: what,
                                ranges: ranges.iter().map(|&(s, e)| [s, e]).collect(),
                            });
                        }
                    }
                    self.report.failed.push(line);
                }
                Err(err) => return Err(err),
            },
            "symlink" => {
                let target = self.fs.link_bytes(path)?;
                let partial = partial_name(name);
                dir.remove_file(&partial)?;
                dir.symlink(&partial, &target)?;
                self.place(dir, &partial, name)?;
                self.attributes(dir, name, e)?;
                self.report.symlinks += 1;
            }
            other => self
                .report
                .skipped
                .push(format!("{} ({other})", self.fs.describe(path))),
        }
        Ok(())
    }

    /// Copies a regular file: zero blocks become holes; written as a partial file, then
    /// renamed into place.
    fn file(&mut self, dir: &Dir, path: &str, name: &str, e: &Entry) -> Result<()> {
        let partial = partial_name(name);
        let out = dir.create_replacing(&partial, 0o600)?;
        let progress = self.progress;
        let mut at = 0u64;
        let written = self
            .fs
            .read_file(path, &mut |data| {
                if !crate::zero::is_zero(data) {
                    out.write_all_at(data, at)
                        .map_err(|err| Error::io("write", dir.path_of(&partial), err))?;
                }
                at += data.len() as u64;
                progress.advance(data.len() as u64);
                Ok(())
            })
            .and_then(|len| {
                out.set_len(len)
                    .map_err(|err| Error::io("write", dir.path_of(&partial), err))?;
                Ok(len)
            });
        let written = written.map(|len| self.report.bytes += len);
        if let Err(err) = written {
            drop(out);
            let _ = dir.remove_file(&partial);
            return Err(err);
        }
        use std::os::unix::fs::PermissionsExt;
        out.set_permissions(std::fs::Permissions::from_mode(e.mode as u32))
            .map_err(|err| Error::io("set mode of", dir.path_of(&partial), err))?;
        drop(out);
        self.attributes(dir, &partial, e)?;
        self.place(dir, &partial, name)?;
        self.report.files += 1;
        Ok(())
    }

    /// Renames `partial` to `name`; an existing `name` is replaced only with `force`.
    fn place(&self, dir: &Dir, partial: &str, name: &str) -> Result<()> {
        match dir.rename(partial, name, self.opts.force) {
            Ok(()) => Ok(()),
            Err(err) => {
                let _ = dir.remove_file(partial);
                match err {
                    Error::Exists(p) => Err(Error::Usage(format!(
                        "{} exists; pass --force to replace it, or restore into another directory",
                        p.display()
                    ))),
                    other => Err(other),
                }
            }
        }
    }

    /// Sets the owner (as root) and the times of `name` in `dir`.
    fn attributes(&self, dir: &Dir, name: &str, e: &Entry) -> Result<()> {
        if self.owners {
            dir.set_owner(name, e.uid, e.gid)?;
            // chown clears setuid and setgid bits: set the mode again for files.
            if e.kind == "file" && e.mode & 0o6000 != 0 {
                let f = dir.entry(name)?;
                if f == Some(safe_fs::Entry::File) {
                    set_mode_at(dir, name, e.mode)?;
                }
            }
        }
        dir.set_times(name, e.atime, (e.mtime, e.mtime_nanos))
    }
}

/// Sets the mode of the regular file `name` in `dir` (opened without following links).
fn set_mode_at(dir: &Dir, name: &str, mode: u16) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = dir.open_file(name)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode as u32))
        .map_err(|err| Error::io("set mode of", dir.path_of(name), err))
}

/// The partial name a file or link is written under before it is renamed into place.
fn partial_name(name: &str) -> String {
    format!(".{name}.vmrepo-partial")
}
