//! NTFS volumes (Windows guests), read through the `ntfs` crate. NTFS has no POSIX modes or
//! owners: directories show as 755, files as 644 (444 when read-only), owned by 0:0. Names are
//! the long (Win32 or POSIX) ones; a path is looked up case-insensitively, as Windows does.
//! Reparse points (symlinks, junctions) are listed as `reparse` and not followed. The metadata
//! files (`$MFT`, `$Bitmap`, ...) are not shown.

use std::cell::RefCell;

use ::ntfs::attribute_value::NtfsAttributeValue;
use ::ntfs::indexes::NtfsFileNameIndex;
use ::ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ::ntfs::NtfsReadSeek;
use ::ntfs::{NtfsError, NtfsFile, NtfsTime};

use crate::error::{Error, Result};
use crate::guest::{pump, read_span, repository_error, Entry, GuestFs, VolumeCursor, VolumeIo};

/// Records below this number are NTFS's own metadata files.
const FIRST_USER_RECORD: u64 = 24;

/// An NTFS filesystem on a volume.
pub struct Ntfs {
    ntfs: ::ntfs::Ntfs,
    io: RefCell<VolumeCursor>,
    /// `vm@time:volume`, for messages.
    at: String,
}

impl Ntfs {
    /// Loads the filesystem on `io` (its boot sector and upcase table).
    pub fn load(io: VolumeIo, at: &str) -> Result<Ntfs> {
        let mut cursor = VolumeCursor::new(io);
        let mut ntfs = ::ntfs::Ntfs::new(&mut cursor).map_err(|e| error(at, e))?;
        ntfs.read_upcase_table(&mut cursor)
            .map_err(|e| error(at, e))?;
        Ok(Ntfs {
            ntfs,
            io: RefCell::new(cursor),
            at: at.to_string(),
        })
    }

    fn what(&self, path: &str) -> String {
        format!("{}:{path}", self.at)
    }

    /// The file at `path`.
    /// Runs `f` on the unnamed data stream of file `path` (`None` when it has none: it reads
    /// as empty), with the volume cursor to read it through. A directory is refused.
    fn with_data<T>(
        &self,
        path: &str,
        f: impl FnOnce(&mut VolumeCursor, Option<&mut NtfsAttributeValue<'_, '_>>) -> Result<T>,
    ) -> Result<T> {
        let file = self.file(path)?;
        let fail = |e| error(&self.what(path), e);
        if file.is_directory() {
            return Err(Error::Usage(format!(
                "{} is a directory (`vmrepo ls` lists it)",
                self.what(path)
            )));
        }
        let io = &mut *self.io.borrow_mut();
        let Some(item) = file.data(io, "") else {
            return f(io, None);
        };
        let item = item.map_err(fail)?;
        let attribute = item.to_attribute().map_err(fail)?;
        let mut value = attribute.value(io).map_err(fail)?;
        f(io, Some(&mut value))
    }

    fn file(&self, path: &str) -> Result<NtfsFile<'_>> {
        let io = &mut *self.io.borrow_mut();
        let fail = |e| error(&self.what(path), e);
        let mut file = self.ntfs.root_directory(io).map_err(fail)?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !file.is_directory() {
                return Err(Error::Usage(format!(
                    "{}: not a directory",
                    self.what(path)
                )));
            }
            let next = {
                let index = file.directory_index(io).map_err(fail)?;
                let mut finder = index.finder();
                let Some(entry) = NtfsFileNameIndex::find(&mut finder, &self.ntfs, io, part) else {
                    return Err(Error::NotFound(format!(
                        "{}: no such file or directory",
                        self.what(path)
                    )));
                };
                entry.map_err(fail)?.to_file(&self.ntfs, io).map_err(fail)?
            };
            file = next;
        }
        Ok(file)
    }

    /// The entry describing `file`, named `name`.
    fn entry(&self, name: String, file: &NtfsFile<'_>, path: &str) -> Result<Entry> {
        let fail = |e| error(&self.what(path), e);
        let info = file.info().map_err(fail)?;
        let flags = info.file_attributes();
        let dir = file.is_directory();
        let kind = if dir {
            "dir"
        } else if flags.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
            "reparse"
        } else {
            "file"
        };
        let size = if dir {
            0
        } else {
            let io = &mut *self.io.borrow_mut();
            match file.data(io, "") {
                Some(item) => item
                    .map_err(fail)?
                    .to_attribute()
                    .map_err(fail)?
                    .value_length(),
                None => 0,
            }
        };
        let mode = if dir {
            0o755
        } else if flags.contains(NtfsFileAttributeFlags::READ_ONLY) {
            0o444
        } else {
            0o644
        };
        let (mtime, mtime_nanos) = unix_time(info.modification_time());
        Ok(Entry {
            name,
            kind,
            mode,
            uid: 0,
            gid: 0,
            size,
            mtime,
            mtime_nanos,
            atime: unix_time(info.access_time()),
            target: None,
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch of an NTFS time (100 ns units since 1601).
fn unix_time(t: NtfsTime) -> (i64, u32) {
    const UNIX_EPOCH_IN_NT_SECONDS: i64 = 11_644_473_600;
    let t = t.nt_timestamp();
    (
        (t / 10_000_000) as i64 - UNIX_EPOCH_IN_NT_SECONDS,
        (t % 10_000_000) as u32 * 100,
    )
}

/// What went wrong reading `what`: a failed read of the disk (the repository's error) or the
/// filesystem's own fault.
fn error(what: &str, e: NtfsError) -> Error {
    match e {
        NtfsError::Io(e) => match e.into_inner() {
            Some(e) => repository_error(what, e)
                .unwrap_or_else(|e| Error::Corrupt(format!("{what}: cannot be read: {e}"))),
            None => Error::Corrupt(format!("{what}: cannot be read")),
        },
        e => Error::GuestFilesystem(format!("{what}: {e}")),
    }
}

impl GuestFs for Ntfs {
    fn label(&self) -> Option<String> {
        let io = &mut *self.io.borrow_mut();
        let name = self.ntfs.volume_name(io)?.ok()?;
        let name = name.name().to_string_lossy();
        (!name.is_empty()).then_some(name)
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let file = self.file(path)?;
        let name = path.rsplit('/').next().unwrap_or("").to_string();
        self.entry(name, &file, path)
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.file(path)?;
        if !dir.is_directory() {
            return Err(Error::Usage(format!(
                "{}: not a directory",
                self.what(path)
            )));
        }
        let fail = |e| error(&self.what(path), e);
        // Names and records first (the index borrows the reader), then each record's details.
        let mut found = Vec::new();
        {
            let io = &mut *self.io.borrow_mut();
            let index = dir.directory_index(io).map_err(fail)?;
            let mut entries = index.entries();
            while let Some(entry) = entries.next(io) {
                let entry = entry.map_err(fail)?;
                let Some(key) = entry.key() else { continue };
                let key = key.map_err(fail)?;
                // A file with a long name is also listed under its 8.3 name: once is enough.
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let record = entry.file_reference().file_record_number();
                let name = key.name().to_string_lossy();
                if record < FIRST_USER_RECORD || name == "." {
                    continue;
                }
                found.push((name, record));
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (name, record) in found {
            let full = crate::guest::join(path, &name);
            let file = {
                let io = &mut *self.io.borrow_mut();
                self.ntfs
                    .file(io, record)
                    .map_err(|e| error(&self.what(&full), e))?
            };
            out.push(self.entry(name, &file, &full)?);
        }
        Ok(out)
    }

    fn link_target(&self, path: &str) -> Result<Vec<u8>> {
        Err(Error::Usage(format!(
            "{}: NTFS reparse points are not followed by this build",
            self.what(path)
        )))
    }

    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.with_data(path, |io, value| {
            let Some(value) = value else {
                return Ok(Vec::new());
            };
            let fail = |e| error(&self.what(path), e);
            let size = value.len();
            let reader = RefCell::new((value, io));
            read_span(
                size,
                offset,
                len,
                &mut |at| {
                    let (value, io) = &mut *reader.borrow_mut();
                    value
                        .seek(&mut **io, std::io::SeekFrom::Start(at))
                        .map(drop)
                        .map_err(fail)
                },
                &mut |b| {
                    let (value, io) = &mut *reader.borrow_mut();
                    value.read(&mut **io, b).map_err(fail)
                },
            )
        })
    }

    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        self.with_data(path, |io, value| {
            let Some(value) = value else {
                return Ok(0);
            };
            let fail = |e| error(&self.what(path), e);
            pump(&mut |b| value.read(&mut *io, b).map_err(fail), sink)
        })
    }
}
