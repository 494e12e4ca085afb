//! Disk readers: the guest-visible bytes of a disk, with an allocation map so that ingest never
//! reads holes. Each on-disk format is one reader behind the [`DiskReader`] trait.
//!
//! Formats that can sit in a snapshot chain (hosted sparse KDMV, COWD, seSparse, qcow2, flat
//! extents) are [`Layer`]s: besides data and zeros they can say "not here, ask the parent".
//! [`chain::Chain`] stacks layers into one [`DiskReader`].

pub mod chain;
pub mod confine;
pub mod cowd;
pub mod descriptor;
mod extents;
mod flat;
pub mod grain;
mod in_use;
mod inflate;
mod limited;
pub mod qcow2;
pub mod sesparse;
pub mod sparse;

pub use cowd::Cowd;
pub use extents::{ExtentDisk, ExtentSpec, ExtentTarget};
pub use flat::FlatFile;
pub use grain::{Grain, GrainFormat, GrainLayer};
pub use in_use::{InUse, Within};
pub use limited::Limited;
pub use qcow2::Qcow2;
pub use sesparse::SeSparse;
pub use sparse::Kdmv;

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Random read access to a virtual disk plus where its data may be.
pub trait DiskReader: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the guest bytes at `offset` (holes and unallocated areas read as zeros).
    /// Callers stay within `size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The sub-ranges of `range` that may hold non-zero data, sorted and disjoint. Everything
    /// else in `range` is guaranteed to read as zeros and is never read by ingest.
    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>>;

    /// For a snapshot chain: the guest ranges where link `level` (0 = leaf) itself holds
    /// anything (data or zeros hiding its parent), i.e. where it may differ from the chain below
    /// it. `None` for readers that are not chains.
    fn link_ranges(&self, _level: usize) -> Option<Result<Vec<Range<u64>>>> {
        None
    }

    /// Hints that `range` will be read soon: readers over files ask the kernel to start
    /// reading the file bytes behind it, so that reads of scattered regions (a change-aware
    /// ingest) overlap with the work on earlier ones. Advisory; the default does nothing.
    fn prefetch(&self, _range: Range<u64>) {}
}

/// Byte-addressed, read-only access to one input file: a [`FlatFile`] on disk, or a [`MemFile`]
/// (fuzzing, tests). Every format parser reads through this, so every read is bounds-checked
/// against a known length.
pub trait RandomRead: Send + Sync {
    /// The file's name, for error messages.
    fn path(&self) -> &Path;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// True for an empty file.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads exactly `buf.len()` bytes at `offset`; past the end is an error naming the file.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Hints that `len` bytes at `offset` will be read soon (see [`DiskReader::prefetch`]).
    fn prefetch(&self, _offset: u64, _len: u64) {}

    /// Reads `len` bytes at `offset` into a new buffer, after checking that they lie inside the
    /// file (so a garbled length cannot make us allocate more than the file holds).
    fn read_vec(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => {}
            _ => {
                return Err(Error::bad_input(
                    self.path(),
                    format!(
                        "{what} at byte {offset} ({len} bytes) lies beyond the end of the file ({} bytes); \
                         the file is truncated or its header is damaged",
                        self.len()
                    ),
                ))
            }
        }
        let mut v = vec![0u8; len as usize];
        self.read_exact_at(&mut v, offset)?;
        Ok(v)
    }

    /// [`RandomRead::read_vec`], or the bytes in place when they are in memory already.
    fn read_cow(&self, offset: u64, len: u64, what: &str) -> Result<Cow<'_, [u8]>> {
        self.read_vec(offset, len, what).map(Cow::Owned)
    }
}

impl RandomRead for FlatFile {
    fn path(&self) -> &Path {
        FlatFile::path(self)
    }
    fn len(&self) -> u64 {
        FlatFile::len(self)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        FlatFile::read_exact_at(self, buf, offset)
    }
    fn prefetch(&self, offset: u64, len: u64) {
        FlatFile::prefetch(self, offset, len)
    }
}

/// A file held in memory (fuzz targets and parser tests).
pub struct MemFile {
    path: PathBuf,
    data: Vec<u8>,
}

impl MemFile {
    /// Wraps `data` under the name `path`.
    pub fn new(path: impl Into<PathBuf>, data: Vec<u8>) -> MemFile {
        MemFile {
            path: path.into(),
            data,
        }
    }
}

impl RandomRead for MemFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.data.len() as u64 => {
                buf.copy_from_slice(&self.data[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(Error::bad_input(
                &self.path,
                format!("file ended early at offset {offset}"),
            )),
        }
    }
}

/// What a layer holds for a guest byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Data stored in this layer.
    Data,
    /// Zeros, hiding whatever the parent has (zeroed grain, unmapped, ZERO extent, hole of a
    /// flat file).
    Zero,
    /// Not present here: the parent's bytes show through (zeros without a parent).
    Absent,
}

/// A guest byte range and what a layer holds there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Guest bytes.
    pub range: Range<u64>,
    /// What is there.
    pub state: State,
}

/// Appends a span, merging it into the previous one when adjacent and of the same state.
pub fn push_span(out: &mut Vec<Span>, range: Range<u64>, state: State) {
    if range.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last.range.end == range.start && last.state == state => {
            last.range.end = range.end
        }
        _ => out.push(Span { range, state }),
    }
}

/// One link of a disk: data, zeros, or "ask the parent", per guest range.
pub trait Layer: Send + Sync {
    /// The file (descriptor or image) this layer was opened from.
    fn path(&self) -> &Path;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Spans covering `range ∩ [0, size)` exactly, in order.
    fn map(&self, range: Range<u64>) -> Result<Vec<Span>>;
    /// Reads the bytes at `offset` (within `size`): data where [`Layer::map`] says `Data`,
    /// zeros elsewhere. Runs of data stored back to back in the file are read with one request.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Hints that the data of `range` will be read soon (see [`DiskReader::prefetch`]).
    fn prefetch(&self, _range: Range<u64>) {}
}

/// Bytes of `reader` that may hold data, counted in 1 GiB windows so that memory stays small
/// however fragmented the allocation map is.
pub fn allocated_bytes(reader: &dyn DiskReader) -> Result<u64> {
    const WINDOW: u64 = 1 << 30;
    let size = reader.size();
    let mut total = 0;
    let mut at = 0;
    while at < size {
        let end = (at + WINDOW).min(size);
        total += reader
            .allocated(at..end)?
            .iter()
            .map(|r| r.end - r.start)
            .sum::<u64>();
        at = end;
    }
    Ok(total)
}
