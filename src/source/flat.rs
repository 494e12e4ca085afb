//! A plain file read as a disk (raw image or flat extent), with holes found by SEEK_DATA/SEEK_HOLE.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::DiskReader;
use crate::error::{Error, IoContext, Result};

/// A regular file or block device opened read-only.
pub struct FlatFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl FlatFile {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<FlatFile> {
        let file = File::open(path).ctx("open disk file", path)?;
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
            file,
            path: path.to_path_buf(),
            len,
        })
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
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::bad_input(
                    &self.path,
                    format!("file ended early (shrank while being read?) at offset {offset}"),
                )
            } else {
                Error::io("read disk file", &self.path, e)
            }
        })
    }

    /// Asks the kernel to start reading `len` bytes at `offset` into the page cache, without
    /// waiting. Advisory: errors are ignored (the later read reports them).
    pub fn prefetch(&self, offset: u64, len: u64) {
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is ours.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
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
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Some(d) => d,
                None => {
                    let err = std::io::Error::last_os_error();
                    match err.raw_os_error() {
                        // No data after pos: the rest is a hole.
                        Some(libc::ENXIO) => break,
                        // Filesystem or device without hole support: treat all as data.
                        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                            out.push(pos..end);
                            break;
                        }
                        _ => return Err(Error::io("find data in", &self.path, err)),
                    }
                }
            };
            if data >= end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            out.push(data..hole);
            pos = hole;
        }
        Ok(out)
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
}
