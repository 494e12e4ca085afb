//! A plain file read as a disk (raw image or flat extent), with holes found by SEEK_DATA/SEEK_HOLE.
//! The last hole and data range the kernel reported are remembered, so the many small queries a
//! snapshot chain makes of a thin base (one per run of grains its delta does not hold) cost a
//! system call only when they leave what is already known.
//!
//! The same file may instead live on a remote datastore ([`FlatFile::remote`]): its bytes come
//! from a [`RandomRead`] that fetches them, and all of it counts as data (zeros are found when
//! the bytes are read).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{DiskReader, RandomRead};
use crate::error::{Error, IoContext, Result};

/// A regular file or block device opened read-only, or a file on a remote datastore.
pub struct FlatFile {
    backing: Backing,
    path: PathBuf,
    len: u64,
    /// The last hole and the last data range found (file offsets; empty until found). The
    /// file is read-only input, frozen while it is read, so an answer stays true.
    known: Mutex<Known>,
}

/// Where the bytes are.
enum Backing {
    Local(File),
    Remote(std::sync::Arc<dyn RandomRead>),
}

/// What SEEK_DATA/SEEK_HOLE last said.
#[derive(Default)]
struct Known {
    hole: Range<u64>,
    data: Range<u64>,
}

impl FlatFile {
    /// Opens `path` read-only. A character device, FIFO or socket is refused without blocking
    /// on it; which files an ingest may open at all is [`crate::source::confine`]'s rule (this is for
    /// paths already checked by it).
    pub fn open(path: &Path) -> Result<FlatFile> {
        let file = crate::source::confine::open_read_only(path, false).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidInput {
                Error::bad_input(path, format!("refused: {e}"))
            } else {
                Error::io("open disk file", path, e)
            }
        })?;
        FlatFile::from_file(file, path)
    }

    /// Wraps a file already opened read-only (by [`crate::source::confine::Confine::open`]); `path` names
    /// it in messages.
    pub fn from_file(file: File, path: &Path) -> Result<FlatFile> {
        let meta = file.metadata().ctx("stat disk file", path)?;
        if meta.is_dir() {
            return Err(Error::bad_input(path, "is a directory, not a disk file"));
        }
        let len = if meta.is_file() {
            meta.len()
        } else {
            // Block devices report 0 in metadata; ask the device.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(Error::io(
                    "find the size of",
                    path,
                    std::io::Error::last_os_error(),
                ));
            }
            end as u64
        };
        Ok(FlatFile {
            backing: Backing::Local(file),
            path: path.to_path_buf(),
            len,
            known: Mutex::default(),
        })
    }

    /// A file whose bytes `remote` fetches (a disk on a datastore read over the network).
    pub fn remote(remote: std::sync::Arc<dyn RandomRead>) -> FlatFile {
        FlatFile {
            path: remote.path().to_path_buf(),
            len: remote.len(),
            backing: Backing::Remote(remote),
            known: Mutex::default(),
        }
    }

    /// File length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let file = match &self.backing {
            Backing::Local(file) => file,
            Backing::Remote(remote) => return remote.read_exact_at(buf, offset),
        };
        file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                let end = offset.saturating_add(buf.len() as u64);
                let now = std::fs::metadata(&self.path).map(|m| m.len()).ok();
                let why = if end > self.len {
                    format!(
                        "a read of {} bytes at offset {offset} goes past the end of the file \
                         ({} bytes): a table or header entry points outside it, so the file is \
                         truncated or damaged",
                        buf.len(),
                        self.len
                    )
                } else {
                    format!(
                        "the file shrank while being read: it was {} bytes when opened, {} now \
                         (something is writing it; back it up from a snapshot)",
                        self.len,
                        now.map_or("unknown".to_string(), |n| n.to_string())
                    )
                };
                Error::bad_input(&self.path, why)
            } else {
                Error::io("read disk file", &self.path, e)
            }
        })
    }

    /// Asks the kernel to start reading `len` bytes at `offset` into the page cache, without
    /// waiting. Advisory: errors are ignored (the later read reports them).
    pub fn prefetch(&self, offset: u64, len: u64) {
        match &self.backing {
            Backing::Local(file) => crate::fsutil::will_need(file, offset, len),
            Backing::Remote(remote) => remote.prefetch(offset, len),
        }
    }

    /// Only for a local file (see [`FlatFile::extent_at`]).
    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let Backing::Local(file) = &self.backing else {
            return None;
        };
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            None
        } else {
            Some(r as u64)
        }
    }

    /// Data ranges of the file within `range` (file offsets).
    pub fn data_ranges(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let end = range.end.min(self.len);
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < end {
            let (data, hole) = self.extent_at(pos)?;
            if data >= end {
                break;
            }
            let hole = hole.min(end);
            out.push(data..hole);
            pos = hole;
        }
        Ok(out)
    }

    /// The first data range at or after `pos` (`pos < len`): where it starts and where the
    /// hole after it starts; starts at `len` when only a hole follows. From what is known when
    /// `pos` lies in it, else from the kernel.
    fn extent_at(&self, pos: u64) -> Result<(u64, u64)> {
        if matches!(self.backing, Backing::Remote(_)) {
            // A remote file says nothing of its holes: all of it may be data.
            return Ok((pos, self.len));
        }
        {
            let k = self.known.lock().unwrap();
            if k.data.contains(&pos) {
                return Ok((pos, k.data.end));
            }
            // The hole ends where the data range recorded with it starts.
            if k.hole.contains(&pos) {
                return Ok((k.data.start, k.data.end));
            }
        }
        let data = match self.seek(pos, libc::SEEK_DATA) {
            Some(d) => d.min(self.len),
            None => {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    // No data after pos: the rest is a hole.
                    Some(libc::ENXIO) => self.len,
                    // Filesystem or device without hole support: all data.
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return Ok((pos, self.len)),
                    _ => return Err(Error::io("find data in", &self.path, err)),
                }
            }
        };
        let hole = if data < self.len {
            self.seek(data, libc::SEEK_HOLE)
                .unwrap_or(self.len)
                .clamp(data, self.len)
        } else {
            self.len
        };
        let mut k = self.known.lock().unwrap();
        k.hole = pos..data;
        k.data = data..hole;
        Ok((data, hole))
    }
}

impl DiskReader for FlatFile {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn prefetch(&self, range: Range<u64>) {
        FlatFile::prefetch(self, range.start, range.end - range.start)
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        self.data_ranges(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn holes_are_not_reported_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(&[1u8; 1 << 20]).unwrap();
        drop(f);
        let d = FlatFile::open(&p).unwrap();
        let ranges = d.allocated(0..64 << 20).unwrap();
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!((1 << 20..8 << 20).contains(&total), "{ranges:?}");
        assert!(ranges
            .iter()
            .any(|r| r.start <= 32 << 20 && r.end >= 33 << 20));
    }

    #[test]
    fn remembered_holes_and_data_give_the_answers_a_fresh_query_gives() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("thin.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        for at in [1u64, 9, 10, 30, 63] {
            f.seek(SeekFrom::Start(at << 20)).unwrap();
            f.write_all(&[7u8; 256 << 10]).unwrap();
        }
        drop(f);
        // Queries in an order that goes back, jumps, and starts inside known holes and data.
        let mib = 1u64 << 20;
        let queries = [
            // The second starts in the hole the first found, and ends inside the data after it.
            0..2 * mib,
            4 * mib..9 * mib + mib / 2,
            0..64 * mib,
            2 * mib..3 * mib,
            mib + 4096..9 * mib + 8192,
            12 * mib..31 * mib,
            0..mib,
            9 * mib..10 * mib,
            10 * mib + 100..10 * mib + 200,
            40 * mib..64 * mib,
            63 * mib..70 * mib,
            5 * mib..9 * mib,
            30 * mib + 1..30 * mib + 2,
        ];
        // And segment by segment, as ingest asks: most queries start inside a known hole.
        let segments: Vec<_> = (0..64).map(|i| i * mib..(i + 1) * mib).collect();
        let remembering = FlatFile::open(&p).unwrap();
        for q in segments.iter().chain(&queries).chain(queries.iter().rev()) {
            let fresh = FlatFile::open(&p).unwrap().data_ranges(q.clone()).unwrap();
            assert_eq!(remembering.data_ranges(q.clone()).unwrap(), fresh, "{q:?}");
        }
    }
}
