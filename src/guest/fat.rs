//! FAT12/16/32 volumes (EFI system partitions, boot and data partitions), read through the
//! `fatfs` crate. FAT has no owners or POSIX modes: directories show as 755, files as 644 (444
//! when read-only), owned by 0:0. Its times are local times without a zone; they are shown as
//! if they were UTC. Long names are used where the volume has them; lookups ignore case, as on
//! the systems that write FAT.

use ::fatfs::{Date, DateTime, Dir, FileSystem, FsOptions};

use crate::error::{Error, Result};
use std::cell::RefCell;

use crate::guest::{pump, read_span, repository_error, Entry, GuestFs, VolumeCursor, VolumeIo};

/// A FAT filesystem on a volume.
pub struct Fat {
    fs: FileSystem<VolumeCursor>,
    /// `vm@time:volume`, for messages.
    at: String,
}

impl Fat {
    /// Loads the filesystem on `io` (its boot sector).
    pub fn load(io: VolumeIo, at: &str) -> Result<Fat> {
        let fs =
            FileSystem::new(VolumeCursor::new(io), FsOptions::new()).map_err(|e| error(at, e))?;
        Ok(Fat {
            fs,
            at: at.to_string(),
        })
    }

    fn what(&self, path: &str) -> String {
        format!("{}:{path}", self.at)
    }

    fn fail(&self, path: &str, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("{}: no such file or directory", self.what(path)))
            }
            _ => error(&self.what(path), e),
        }
    }

    fn dir(&self, path: &str) -> Result<Dir<'_, VolumeCursor>> {
        let rel = path.trim_matches('/');
        let root = self.fs.root_dir();
        if rel.is_empty() {
            return Ok(root);
        }
        root.open_dir(rel).map_err(|e| self.fail(path, e))
    }
}

/// A failed read of the disk (the repository's error) or the filesystem's own fault.
fn error(what: &str, e: std::io::Error) -> Error {
    match e.into_inner() {
        Some(e) => repository_error(what, e)
            .unwrap_or_else(|e| Error::GuestFilesystem(format!("{what}: {e}"))),
        None => Error::GuestFilesystem(format!("{what}: the FAT filesystem cannot be read")),
    }
}

/// Seconds since the Unix epoch of a FAT date and time (taken as UTC).
fn unix_time(d: Date, h: u16, m: u16, s: u16) -> i64 {
    jiff::civil::date(d.year as i16, d.month as i8, d.day as i8)
        .at(h as i8, m as i8, s as i8, 0)
        .to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp().as_second())
        .unwrap_or(0)
}

fn entry(name: String, e: &::fatfs::DirEntry<'_, VolumeCursor>) -> Entry {
    let DateTime { date, time } = e.modified();
    let mode = if e.is_dir() {
        0o755
    } else if e.attributes().contains(::fatfs::FileAttributes::READ_ONLY) {
        0o444
    } else {
        0o644
    };
    Entry {
        name,
        kind: if e.is_dir() { "dir" } else { "file" },
        mode,
        uid: 0,
        gid: 0,
        size: if e.is_dir() { 0 } else { e.len() },
        mtime: unix_time(date, time.hour, time.min, time.sec),
        mtime_nanos: time.millis as u32 * 1_000_000,
        atime: (unix_time(e.accessed(), 0, 0, 0), 0),
        target: None,
    }
}

impl GuestFs for Fat {
    fn label(&self) -> Option<String> {
        let l = self.fs.volume_label();
        let l = l.trim();
        (!l.is_empty() && l != "NO NAME").then(|| l.to_string())
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let rel = path.trim_matches('/');
        if rel.is_empty() {
            return Ok(Entry {
                name: "/".into(),
                kind: "dir",
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: 0,
                mtime_nanos: 0,
                atime: (0, 0),
                target: None,
            });
        }
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        for e in self.dir(parent)?.iter() {
            let e = e.map_err(|e| self.fail(path, e))?;
            if e.file_name().eq_ignore_ascii_case(name) {
                return Ok(entry(name.to_string(), &e));
            }
        }
        Err(Error::NotFound(format!(
            "{}: no such file or directory",
            self.what(path)
        )))
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        if self.stat(path)?.kind != "dir" {
            return Err(Error::Usage(format!(
                "{}: not a directory",
                self.what(path)
            )));
        }
        let mut out = Vec::new();
        for e in self.dir(path)?.iter() {
            let e = e.map_err(|e| self.fail(path, e))?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            out.push(entry(name, &e));
        }
        Ok(out)
    }

    fn link_target(&self, path: &str) -> Result<Vec<u8>> {
        Err(Error::Usage(format!(
            "{}: FAT has no symbolic links",
            self.what(path)
        )))
    }

    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.stat(path)?.size;
        let f = self
            .fs
            .root_dir()
            .open_file(path.trim_matches('/'))
            .map_err(|e| self.fail(path, e))?;
        let f = RefCell::new(f);
        read_span(
            size,
            offset,
            len,
            &mut |at| {
                std::io::Seek::seek(&mut *f.borrow_mut(), std::io::SeekFrom::Start(at))
                    .map(drop)
                    .map_err(|e| self.fail(path, e))
            },
            &mut |b| std::io::Read::read(&mut *f.borrow_mut(), b).map_err(|e| self.fail(path, e)),
        )
    }

    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        if self.stat(path)?.kind == "dir" {
            return Err(Error::Usage(format!(
                "{} is a directory (`vmrepo ls` lists it)",
                self.what(path)
            )));
        }
        let mut f = self
            .fs
            .root_dir()
            .open_file(path.trim_matches('/'))
            .map_err(|e| self.fail(path, e))?;
        pump(
            &mut |b| std::io::Read::read(&mut f, b).map_err(|e| self.fail(path, e)),
            sink,
        )
    }
}
