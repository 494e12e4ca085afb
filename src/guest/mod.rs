//! Files inside a generation's disks, read by vmrepo itself: the volumes of each disk (its
//! partitions, or the whole disk when it has no table) and, on the ones it can read, their
//! directories and files. Only the chunks the guest filesystem touches are fetched and each is
//! verified as in any restore, so one file of a large disk costs a few MiB of reads, needs no
//! root, no FUSE and no loop device, and works on a read-only repository.
//!
//! Volumes are named `disk<N>` (a disk without a partition table), `disk<N>/p<M>` (Linux's
//! partition numbering, see [`partitions`]) or `disk<N>/lvm/<vg>/<lv>`; a file is
//! `VOLUME:/PATH`. What a volume holds is
//! told by [`probe`]; ext2/3/4 is read through the `ext4-view` crate ([`ext`]), NTFS through the
//! `ntfs` crate ([`ntfs`]), FAT through the `fatfs` crate ([`fat`]), XFS and exFAT by vmrepo's
//! own readers ([`xfs`], [`exfat`]), all behind [`GuestFs`]; the
//! logical volumes of LVM2 are found by [`lvm`]. Other filesystems and encrypted volumes are
//! listed as what they are and refused by name, never guessed at.

pub mod diff;
pub mod exfat;
pub mod ext;
pub mod fat;
pub mod history;
pub mod lvm;
pub mod ntfs;
pub mod partitions;
pub mod probe;
pub mod restore_file;
pub mod view;
pub mod xfs;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::restore::reader::{DiskImage, ReadCache, DEFAULT_CACHE_BYTES};

pub use probe::Content;

/// A volume of a generation's disk.
#[derive(Clone, Debug, Serialize)]
pub struct Volume {
    /// `disk0`, `disk0/p2` or `disk0/lvm/vg0/root`.
    pub name: String,
    /// Index of the disk in the generation.
    #[serde(skip)]
    pub disk: usize,
    /// First byte on the disk (for a logical volume: of its physical volume).
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// The partition table's type for it, if it is a partition.
    pub partition_type: Option<String>,
    /// The GPT partition name, if any.
    pub partition_name: Option<String>,
    /// What it holds (`ext2/3/4`, `ntfs`, `luks (encrypted)`, ...).
    pub content: &'static str,
    /// The same, as a value.
    #[serde(skip)]
    pub kind: Content,
    /// Whether `ls`, `cat` and `restore-file` read its files.
    pub readable: bool,
    /// The filesystem label, where it is readable and has one.
    pub label: Option<String>,
    /// Its bytes.
    #[serde(skip)]
    pub io: VolumeIo,
}

/// One entry of a guest directory (or one file).
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// Its name (for a single file, its path).
    pub name: String,
    /// `file`, `dir`, `symlink`, `block`, `char`, `fifo`, `socket`, or `reparse` (an NTFS
    /// reparse point).
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
        Guest::open_with_cache(repo, spec, Arc::new(ReadCache::new(DEFAULT_CACHE_BYTES)))
    }

    /// [`Guest::open`], reading chunks through `cache` (shared with other readers).
    pub fn open_with_cache(
        repo: Arc<Repository>,
        spec: &str,
        cache: Arc<ReadCache>,
    ) -> Result<Guest> {
        let gen = repo.with_index(|i| i.resolve(spec))?;
        let manifest = repo.load_manifest(&gen.manifest)?;
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

    /// Every volume of every disk, in disk and partition order; the logical volumes of an
    /// LVM2 physical volume follow it.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        for (n, disk) in self.disks.iter().enumerate() {
            let mut read = |at: u64, buf: &mut [u8]| disk.read_at(at, buf);
            let table = partitions::read_table(disk.size(), &mut read)
                .map_err(|e| Error::Corrupt(format!("disk{n}: partition table: {e}")))?;
            let whole = |start, len| VolumeIo {
                disk: Source::Disk(disk.clone()),
                start,
                size: len,
                map: None,
            };
            let parts = match table {
                partitions::Table::None => {
                    let v =
                        self.volume(n, format!("disk{n}"), whole(0, disk.size()), None, None)?;
                    self.push_with_lvs(&mut out, v)?;
                    continue;
                }
                partitions::Table::Mbr(p) | partitions::Table::Gpt(p) => p,
            };
            for p in parts {
                let v = self.volume(
                    n,
                    format!("disk{n}/p{}", p.number),
                    whole(p.start, p.len),
                    Some(p.kind),
                    p.name,
                )?;
                self.push_with_lvs(&mut out, v)?;
            }
        }
        Ok(out)
    }

    /// Adds `v`, and when it is an LVM2 physical volume its logical volumes
    /// (`disk<N>/lvm/<vg>/<lv>`) after it.
    fn push_with_lvs(&self, out: &mut Vec<Volume>, mut v: Volume) -> Result<()> {
        if v.kind != Content::LvmPv {
            out.push(v);
            return Ok(());
        }
        let io = v.io.clone();
        let lvs = match lvm::read_pv(io.size, &mut |at, buf: &mut [u8]| io.read_at(at, buf)) {
            Ok(lvs) => lvs,
            Err(e) => {
                v.label = Some(format!("cannot be read: {e}"));
                out.push(v);
                return Ok(());
            }
        };
        let disk = v.disk;
        let pv = v.name.clone();
        let prefix = pv.split('/').next().unwrap_or(&pv).to_string();
        out.push(v);
        for lv in lvs {
            let name = format!("{prefix}/lvm/{}/{}", lv.vg, lv.name);
            let kind = Some(format!("LVM2 logical volume on {pv}"));
            match lv.map {
                Ok(map) => {
                    let lv_io = VolumeIo {
                        disk: io.disk.clone(),
                        start: io.start,
                        size: lv.size,
                        map: Some(Arc::new(map)),
                    };
                    out.push(self.volume(disk, name, lv_io, kind, None)?);
                }
                Err(why) => out.push(Volume {
                    name,
                    disk,
                    start: io.start,
                    size: lv.size,
                    partition_type: kind,
                    partition_name: None,
                    content: Content::Unknown.name(),
                    kind: Content::Unknown,
                    readable: false,
                    label: Some(format!("cannot be read: {why}")),
                    io: io.clone(),
                }),
            }
        }
        Ok(())
    }

    fn volume(
        &self,
        disk: usize,
        name: String,
        io: VolumeIo,
        partition_type: Option<String>,
        partition_name: Option<String>,
    ) -> Result<Volume> {
        let content = probe::probe_at(0, io.size, &mut |at, buf: &mut [u8]| io.read_at(at, buf))?;
        let mut v = Volume {
            name,
            disk,
            start: io.start,
            size: io.size,
            partition_type,
            partition_name,
            content: content.name(),
            kind: content,
            readable: content.readable(),
            label: None,
            io,
        };
        if content.readable() {
            // A volume that looks readable but does not load is listed, with the reason.
            match self.load(&v, content) {
                Ok(fs) => v.label = fs.label(),
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

    fn load(&self, v: &Volume, content: Content) -> Result<Box<dyn GuestFs>> {
        open_fs(
            v.io.clone(),
            content,
            &format!("{}:{}", self.generation, v.name),
        )
    }

    /// The filesystem of volume `v`, or why it cannot be read.
    pub fn filesystem(&self, v: &Volume) -> Result<Filesystem> {
        if !v.readable {
            if let Some(why) = v
                .label
                .as_deref()
                .and_then(|l| l.strip_prefix("cannot be read: "))
            {
                return Err(Error::GuestFilesystem(format!(
                    "{}: volume {} ({}) cannot be read: {why}",
                    self.generation, v.name, v.content
                )));
            }
            let holds = if v.kind == Content::Unknown {
                "no filesystem this build recognises"
            } else {
                v.content
            };
            return Err(Error::Usage(format!(
                "{}: volume {} holds {holds}: this build reads files on ext2/3/4, XFS, NTFS, FAT and exFAT \
                 volumes only",
                self.generation, v.name,
            )));
        }
        Ok(Filesystem {
            fs: self.load(v, v.kind)?,
            at: format!("{}:{}", self.generation, v.name),
        })
    }
}

/// Opens the filesystem of kind `content` on `io`; `at` names it in messages.
pub fn open_fs(io: VolumeIo, content: Content, at: &str) -> Result<Box<dyn GuestFs>> {
    match content {
        Content::Ext => Ok(Box::new(ext::Ext::load(io, at)?)),
        Content::Ntfs => Ok(Box::new(ntfs::Ntfs::load(io, at)?)),
        Content::Fat => Ok(Box::new(fat::Fat::load(io, at)?)),
        Content::Xfs => Ok(Box::new(xfs::Xfs::load(io, at)?)),
        Content::ExFat => Ok(Box::new(exfat::ExFat::load(io, at)?)),
        other => Err(Error::Usage(format!(
            "{at} holds {}, which this build does not read",
            other.name()
        ))),
    }
}

/// A volume's bytes, read out of the generation's disk.
#[derive(Clone)]
pub struct VolumeIo {
    disk: Source,
    /// Where the volume (or, for a logical volume, its physical volume) starts on the disk.
    start: u64,
    size: u64,
    /// A logical volume's extents: (offset in it, offset in the physical volume, length).
    map: Option<Arc<Vec<(u64, u64, u64)>>>,
}

impl std::fmt::Debug for VolumeIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeIo({} bytes at {})", self.size, self.start)
    }
}

/// Where a volume's bytes come from.
#[derive(Clone)]
enum Source {
    /// A generation's disk.
    Disk(Arc<DiskImage>),
    /// Bytes in memory (the fuzzing harness).
    Memory(Arc<Vec<u8>>),
}

impl Source {
    fn read_at(&self, at: u64, dst: &mut [u8]) -> Result<()> {
        match self {
            Source::Disk(d) => d.read_at(at, dst),
            Source::Memory(m) => {
                let at = usize::try_from(at).unwrap_or(usize::MAX);
                let src = m
                    .get(at..at.saturating_add(dst.len()))
                    .ok_or_else(|| Error::GuestFilesystem("read past the end".into()))?;
                dst.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

impl VolumeIo {
    /// A volume made of `bytes` (for the fuzzing harness).
    pub fn in_memory(bytes: Vec<u8>) -> VolumeIo {
        VolumeIo {
            size: bytes.len() as u64,
            disk: Source::Memory(Arc::new(bytes)),
            start: 0,
            map: None,
        }
    }

    /// The volume's length.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when this volume and `other` (the same volume in another generation) are stored
    /// as the same segments, so hold the same bytes: nothing in them changed. Told from the
    /// disk maps alone; false when it cannot be told.
    pub fn same_stored(&self, other: &VolumeIo) -> bool {
        let (Source::Disk(a), Source::Disk(b)) = (&self.disk, &other.disk) else {
            return false;
        };
        if self.start != other.start || self.size != other.size || self.map != other.map {
            return false;
        }
        match &self.map {
            None => a.same_stored(b, self.start..self.start + self.size),
            Some(map) => map.iter().all(|&(_, pv_off, len)| {
                let at = self.start + pv_off;
                a.same_stored(b, at..at + len)
            }),
        }
    }

    /// Fills `dst` from byte `at` of the volume; reading past its end is an error.
    pub fn read_at(&self, at: u64, dst: &mut [u8]) -> Result<()> {
        let end = at.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(Error::GuestFilesystem(format!(
                "read of {} bytes at byte {at} is past the end of the volume ({} bytes)",
                dst.len(),
                self.size
            )));
        }
        let Some(map) = &self.map else {
            return self.disk.read_at(self.start + at, dst);
        };
        let mut done = 0usize;
        while done < dst.len() {
            let pos = at + done as u64;
            let &(lv_at, pv_at, len) = map
                .iter()
                .find(|(lv_at, _, len)| (*lv_at..lv_at + len).contains(&pos))
                .ok_or_else(|| {
                    Error::GuestFilesystem(format!("byte {pos} of the logical volume is unmapped"))
                })?;
            let n = ((lv_at + len - pos) as usize).min(dst.len() - done);
            self.disk
                .read_at(self.start + pv_at + (pos - lv_at), &mut dst[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// `Read + Seek` over a volume, one block held (the filesystem crates read small structures
/// one by one). Writes fail: every reader here is read-only.
pub struct VolumeCursor {
    io: VolumeIo,
    pos: u64,
    block: Option<(u64, Vec<u8>)>,
}

impl Read for VolumeCursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.io.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let start = self.pos / BLOCK * BLOCK;
        if self.block.as_ref().is_none_or(|(at, _)| *at != start) {
            let mut b = vec![0u8; (size - start).min(BLOCK) as usize];
            self.io
                .read_at(start, &mut b)
                .map_err(std::io::Error::other)?;
            self.block = Some((start, b));
        }
        let (_, b) = self.block.as_ref().expect("block just read");
        let from = (self.pos - start) as usize;
        let n = buf.len().min(b.len() - from);
        buf[..n].copy_from_slice(&b[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for VolumeCursor {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.io.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the volume")
        })?;
        Ok(self.pos)
    }
}

impl std::io::Write for VolumeCursor {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "guest volumes are read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl VolumeCursor {
    /// A cursor at the start of `io`.
    pub fn new(io: VolumeIo) -> VolumeCursor {
        VolumeCursor {
            io,
            pos: 0,
            block: None,
        }
    }
}

/// Bytes read from a volume at once by [`VolumeCursor`].
const BLOCK: u64 = 64 << 10;

/// One guest filesystem type, read-only. Paths are absolute guest paths (`/etc/hosts`);
/// errors name `at` and the path.
pub trait GuestFs {
    /// The volume's label, if it has one.
    fn label(&self) -> Option<String>;
    /// The entry at `path` itself (a symlink is not followed).
    fn stat(&self, path: &str) -> Result<Entry>;
    /// The entries of directory `path`, without `.` and `..`, in any order.
    fn list(&self, path: &str) -> Result<Vec<Entry>>;
    /// The target of symlink `path`, as stored.
    fn link_target(&self, path: &str) -> Result<Vec<u8>>;
    /// Hands the content of file `path` (symlinks followed) to `sink` in order; its length.
    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64>;
    /// Up to `len` bytes of file `path` (symlinks followed) from byte `offset`; fewer at its
    /// end, none past it.
    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
}

/// A readable guest filesystem.
pub struct Filesystem {
    fs: Box<dyn GuestFs>,
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
    /// The entry at `path` itself (a symlink is not followed).
    pub fn stat(&self, path: &str) -> Result<Entry> {
        self.fs.stat(path)
    }

    /// The entries of directory `path`, sorted by name, without `.` and `..`.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = self.fs.list(path)?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The target of symlink `path`, as stored.
    pub fn link_bytes(&self, path: &str) -> Result<Vec<u8>> {
        self.fs.link_target(path)
    }

    /// Hands the content of file `path` to `sink` in order; its length.
    pub fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        self.fs.read_file(path, sink)
    }

    /// Up to `len` bytes of file `path` from byte `offset` (fewer at its end).
    pub fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.fs.read_range(path, offset, len)
    }

    /// The byte ranges of regular file `path` that cannot be read (the repository's data
    /// behind them is damaged), found by reading it in steps: 64 KiB, larger for files over
    /// 256 MiB so that a file costs at most 4096 reads. Adjacent ranges are merged; a read
    /// that fails for another reason counts as damaged too. Empty for anything but a file.
    pub fn damaged_ranges(&self, path: &str) -> Vec<(u64, u64)> {
        let size = match self.fs.stat(path) {
            Ok(e) if e.kind == "file" => e.size,
            _ => return Vec::new(),
        };
        let step = (64u64 << 10).max(size.div_ceil(4096).next_multiple_of(4096));
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < size {
            let len = step.min(size - at);
            if self.fs.read_range(path, at, len as usize).is_err() {
                match out.last_mut() {
                    Some((_, end)) if *end == at => *end = at + len,
                    _ => out.push((at, at + len)),
                }
            }
            at += len;
        }
        out
    }

    /// `vm@time:volume:path`, for messages.
    pub fn describe(&self, path: &str) -> String {
        format!("{}:{path}", self.at)
    }

    /// Writes the content of file `path` (symlinks followed) to `out`; its length.
    pub fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        self.fs.read_file(path, &mut |b| {
            out.write_all(b)
                .map_err(|e| Error::io("write", std::path::PathBuf::from("stdout"), e))
        })
    }
}

/// The repository's own error behind a failed read of a volume (a damaged chunk), with `what`
/// (the file or volume being read) added to it; the error itself back when it is not ours.
pub(crate) fn repository_error(
    what: &str,
    e: Box<dyn std::error::Error + Send + Sync>,
) -> std::result::Result<Error, Box<dyn std::error::Error + Send + Sync>> {
    e.downcast::<Error>().map(|inner| match *inner {
        Error::Corrupt(m) => Error::Corrupt(format!("{what}: {m}")),
        other => other,
    })
}

/// Byte ranges as people read them: `bytes 0-65535, 131072-196607 (131072 bytes)`, the last
/// byte of each range included.
pub fn describe_ranges(ranges: &[(u64, u64)]) -> String {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let list: Vec<String> = ranges
        .iter()
        .map(|(s, e)| format!("{s}-{}", e - 1))
        .collect();
    format!("bytes {} ({total} bytes)", list.join(", "))
}

/// Hands everything `read` gives (a file read on from where it is) to `sink`, in pieces of
/// up to 1 MiB, until `read` gives nothing; the bytes handed.
pub(crate) fn pump(
    read: &mut dyn FnMut(&mut [u8]) -> Result<usize>,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        sink(&buf[..n])?;
        total += n as u64;
    }
}

/// Up to `len` bytes from byte `offset` of a file of `size` bytes, none past its end, through
/// a reader that can seek: `seek` (called only when there is something to read) moves it to
/// `offset`, then `read` is called until the buffer is full or it reads nothing.
pub(crate) fn read_span(
    size: u64,
    offset: u64,
    len: usize,
    seek: &mut dyn FnMut(u64) -> Result<()>,
    read: &mut dyn FnMut(&mut [u8]) -> Result<usize>,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; size.saturating_sub(offset).min(len as u64) as usize];
    if buf.is_empty() {
        return Ok(buf);
    }
    seek(offset)?;
    let mut got = 0;
    while got < buf.len() {
        let n = read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Bytes `[offset, offset + len)` of a file of `size` bytes, cut at its end, collected from a
/// reader that streams any span `[from, end)` of it to a sink.
pub(crate) fn collect_span(
    size: u64,
    offset: u64,
    len: usize,
    read: impl FnOnce(u64, u64, &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
) -> Result<Vec<u8>> {
    let from = offset.min(size);
    let end = offset.saturating_add(len as u64).min(size);
    let mut out = Vec::with_capacity((end - from) as usize);
    read(from, end, &mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

/// `dir/name` in the guest.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
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
