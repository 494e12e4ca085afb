//! Files inside a generation's disks, read by vmrepo itself: the volumes of each disk (its
//! partitions, or the whole disk when it has no table) and, on the ones it can read, their
//! directories and files. Only the chunks the guest filesystem touches are fetched and each is
//! verified as in any restore, so one file of a large disk costs a few MiB of reads, needs no
//! root, no FUSE and no loop device, and works on a read-only repository.
//!
//! Volumes are named `disk<N>` (a disk without a partition table) or `disk<N>/p<M>` (Linux's
//! partition numbering, see [`partitions`]); a file is `VOLUME:/PATH`. What a volume holds is
//! told by [`probe`]; ext2/3/4 is read through the `ext4-view` crate. Other filesystems and
//! encrypted volumes are listed as what they are and refused by name, never guessed at.

pub mod diff;
pub mod history;
pub mod partitions;
pub mod probe;
pub mod restore_file;

use std::io::Write;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::restore::reader::{DiskImage, ReadCache, DEFAULT_CACHE_BYTES};

pub use probe::Content;

/// A volume of a generation's disk.
#[derive(Clone, Debug, Serialize)]
pub struct Volume {
    /// `disk0` or `disk0/p2`.
    pub name: String,
    /// Index of the disk in the generation.
    #[serde(skip)]
    pub disk: usize,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// The partition table's type for it, if it is a partition.
    pub partition_type: Option<String>,
    /// The GPT partition name, if any.
    pub partition_name: Option<String>,
    /// What it holds (`ext2/3/4`, `ntfs`, `luks (encrypted)`, ...).
    pub content: &'static str,
    /// Whether `ls`, `cat` and `restore-file` read its files.
    pub readable: bool,
    /// The filesystem label, where it is readable and has one.
    pub label: Option<String>,
}

/// One entry of a guest directory (or one file).
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// Its name (for a single file, its path).
    pub name: String,
    /// `file`, `dir`, `symlink`, `block`, `char`, `fifo` or `socket`.
    pub kind: &'static str,
    /// Permission bits (the low 12 bits of the mode).
    pub mode: u16,
    /// Owner and group ids.
    pub uid: u32,
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch, and its nanoseconds.
    pub mtime: i64,
    #[serde(skip)]
    pub mtime_nanos: u32,
    /// Access time, as the modification time.
    #[serde(skip)]
    pub atime: (i64, u32),
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The disks of one generation, opened for reading guest volumes.
pub struct Guest {
    generation: String,
    disks: Vec<Arc<DiskImage>>,
}

impl Guest {
    /// Opens the disks of generation `spec` (`VM`, `VM@-N`, `VM@TIME`) in `repo`.
    pub fn open(repo: Arc<Repository>, spec: &str) -> Result<Guest> {
        let gen = repo.with_index(|i| i.resolve(spec))?;
        let manifest = repo.load_manifest(&gen.manifest)?;
        let cache = Arc::new(ReadCache::new(DEFAULT_CACHE_BYTES));
        let disks = manifest
            .disks
            .iter()
            .map(|d| DiskImage::open(repo.clone(), d, cache.clone()).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Guest {
            generation: gen.name,
            disks,
        })
    }

    /// The generation's name (`vm@time`).
    pub fn generation(&self) -> &str {
        &self.generation
    }

    /// Every volume of every disk, in disk and partition order.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        for (n, disk) in self.disks.iter().enumerate() {
            let mut read = |at: u64, buf: &mut [u8]| disk.read_at(at, buf);
            let table = partitions::read_table(disk.size(), &mut read)
                .map_err(|e| Error::Corrupt(format!("disk{n}: partition table: {e}")))?;
            let parts = match table {
                partitions::Table::None => {
                    out.push(self.volume(n, format!("disk{n}"), 0, disk.size(), None, None)?);
                    continue;
                }
                partitions::Table::Mbr(p) | partitions::Table::Gpt(p) => p,
            };
            for p in parts {
                out.push(self.volume(
                    n,
                    format!("disk{n}/p{}", p.number),
                    p.start,
                    p.len,
                    Some(p.kind),
                    p.name,
                )?);
            }
        }
        Ok(out)
    }

    fn volume(
        &self,
        disk: usize,
        name: String,
        start: u64,
        size: u64,
        partition_type: Option<String>,
        partition_name: Option<String>,
    ) -> Result<Volume> {
        let image = &self.disks[disk];
        let content = probe::probe_at(start, size, &mut |at, buf: &mut [u8]| {
            image.read_at(at, buf)
        })?;
        let mut v = Volume {
            name,
            disk,
            start,
            size,
            partition_type,
            partition_name,
            content: content.name(),
            readable: content.readable(),
            label: None,
        };
        if content.readable() {
            // A volume that looks like ext but does not load is listed, with the reason.
            match self.load(&v) {
                Ok(fs) => {
                    v.label = fs
                        .label()
                        .to_str()
                        .ok()
                        .filter(|l| !l.is_empty())
                        .map(str::to_string);
                }
                Err(e) => {
                    v.readable = false;
                    v.label = Some(format!("cannot be read: {e}"));
                }
            }
        }
        Ok(v)
    }

    /// The volume named `name`, with the names there are when it is not one of them.
    pub fn find(&self, name: &str) -> Result<Volume> {
        let all = self.volumes()?;
        let names: Vec<String> = all.iter().map(|v| v.name.clone()).collect();
        all.into_iter()
            .find(|v| v.name == name.trim_end_matches('/'))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "{} has no volume {name} (its volumes: {})",
                    self.generation,
                    names.join(", ")
                ))
            })
    }

    fn load(&self, v: &Volume) -> std::result::Result<Ext4, Ext4Error> {
        Ext4::load(Box::new(VolumeReader {
            disk: self.disks[v.disk].clone(),
            start: v.start,
            size: v.size,
        }))
    }

    /// The filesystem of volume `v`, or why it cannot be read.
    pub fn filesystem(&self, v: &Volume) -> Result<Filesystem> {
        if !v.readable {
            let holds = if v.content == Content::Unknown.name() {
                "no filesystem this build recognises"
            } else {
                v.content
            };
            return Err(Error::Usage(format!(
                "{}: volume {} holds {holds}{}: this build reads files on ext2/3/4 volumes only",
                self.generation,
                v.name,
                v.label
                    .as_deref()
                    .filter(|l| l.starts_with("cannot be read"))
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default()
            )));
        }
        let fs = self
            .load(v)
            .map_err(|e| guest_error(&format!("{}:{}", self.generation, v.name), e))?;
        Ok(Filesystem {
            fs,
            at: format!("{}:{}", self.generation, v.name),
        })
    }
}

/// Reads a volume's bytes out of the generation's disk for `ext4-view`.
struct VolumeReader {
    disk: Arc<DiskImage>,
    start: u64,
    size: u64,
}

impl Ext4Read for VolumeReader {
    fn read(
        &mut self,
        at: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = at.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(format!(
                "read of {} bytes at byte {at} is past the end of the volume ({} bytes)",
                dst.len(),
                self.size
            )
            .into());
        }
        self.disk
            .read_at(self.start + at, dst)
            .map_err(|e| Box::new(e) as _)
    }
}

/// A readable guest filesystem.
pub struct Filesystem {
    fs: Ext4,
    /// `vm@time:volume`, for messages.
    at: String,
}

/// Splits `VOLUME[:PATH]` into the volume and an absolute path (`/` when none is given).
pub fn split_address(address: &str) -> (&str, String) {
    match address.split_once(':') {
        Some((v, p)) if p.starts_with('/') => (v, p.to_string()),
        Some((v, p)) => (v, format!("/{p}")),
        None => (address, "/".to_string()),
    }
}

impl Filesystem {
    fn err(&self, path: &str, e: Ext4Error) -> Error {
        let what = format!("{}:{path}", self.at);
        match e {
            Ext4Error::NotFound => Error::NotFound(format!("{what}: no such file or directory")),
            Ext4Error::NotADirectory => Error::Usage(format!("{what}: not a directory")),
            Ext4Error::IsADirectory => {
                Error::Usage(format!("{what} is a directory (`vmrepo ls` lists it)"))
            }
            e => guest_error(&what, e),
        }
    }

    /// The entry at `path` itself (a symlink is not followed).
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let m = self
            .fs
            .symlink_metadata(path)
            .map_err(|e| self.err(path, e))?;
        let target = if m.is_symlink() {
            Some(self.link_target(path)?)
        } else {
            None
        };
        Ok(entry(path.to_string(), &m, target))
    }

    fn link_target(&self, path: &str) -> Result<String> {
        let t = self.fs.read_link(path).map_err(|e| self.err(path, e))?;
        Ok(String::from_utf8_lossy(t.as_ref()).into_owned())
    }

    /// The entries of directory `path`, sorted by name, without `.` and `..`.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.fs.read_dir(path).map_err(|e| self.err(path, e))?;
        let mut out = Vec::new();
        for e in dir {
            let e = e.map_err(|e| self.err(path, e))?;
            let name = String::from_utf8_lossy(e.file_name().as_ref()).into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let full = join(path, &name);
            let m = e.metadata().map_err(|e| self.err(&full, e))?;
            let target = if m.is_symlink() {
                Some(self.link_target(&full)?)
            } else {
                None
            };
            out.push(entry(name, &m, target));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Opens file `path` (symlinks followed) for reading.
    pub fn open(&self, path: &str) -> Result<ext4_view::File> {
        self.fs.open(path).map_err(|e| self.err(path, e))
    }

    /// Reads from `f`, a file at `path`, into `buf`; 0 at its end.
    pub fn read(&self, f: &mut ext4_view::File, path: &str, buf: &mut [u8]) -> Result<usize> {
        f.read_bytes(buf).map_err(|e| self.err(path, e))
    }

    /// The target of symlink `path`, as stored.
    pub fn link_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let t = self.fs.read_link(path).map_err(|e| self.err(path, e))?;
        Ok(t.as_ref().to_vec())
    }

    /// `vm@time:volume:path`, for messages.
    pub fn describe(&self, path: &str) -> String {
        format!("{}:{path}", self.at)
    }

    /// Writes the content of file `path` (symlinks followed) to `out`; its length.
    pub fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let mut f = self.fs.open(path).map_err(|e| self.err(path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f.read_bytes(&mut buf).map_err(|e| self.err(path, e))?;
            if n == 0 {
                return Ok(total);
            }
            out.write_all(&buf[..n])
                .map_err(|e| Error::io("write", std::path::PathBuf::from("stdout"), e))?;
            total += n as u64;
        }
    }
}

/// What went wrong reading `what` in a guest filesystem: a failed read of the disk (the
/// repository's error, with where it happened) or the filesystem's own fault.
fn guest_error(what: &str, e: Ext4Error) -> Error {
    match e {
        Ext4Error::Io(e) => match e.downcast::<Error>() {
            Ok(inner) => match *inner {
                Error::Corrupt(m) => Error::Corrupt(format!("{what}: {m}")),
                other => other,
            },
            Err(e) => Error::Corrupt(format!("{what}: cannot be read: {e}")),
        },
        e => Error::GuestFilesystem(format!("{what}: {e}")),
    }
}

/// `dir/name` in the guest.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn entry(name: String, m: &ext4_view::Metadata, target: Option<String>) -> Entry {
    let t = m.file_type();
    let kind = if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_regular_file() {
        "file"
    } else if t.is_block_dev() {
        "block"
    } else if t.is_char_dev() {
        "char"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    Entry {
        name,
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.len(),
        mtime: m.modified().seconds(),
        mtime_nanos: m.modified().nanoseconds(),
        atime: (m.accessed().seconds(), m.accessed().nanoseconds()),
        target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_volume_and_absolute_path() {
        assert_eq!(
            split_address("disk0/p2:/etc/hosts"),
            ("disk0/p2", "/etc/hosts".into())
        );
        assert_eq!(split_address("disk0:etc"), ("disk0", "/etc".into()));
        assert_eq!(split_address("disk1/p1"), ("disk1/p1", "/".into()));
        assert_eq!(join("/", "etc"), "/etc");
        assert_eq!(join("/etc", "hosts"), "/etc/hosts");
    }
}
