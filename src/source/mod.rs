//! Disk readers: the guest-visible bytes of a disk, with an allocation map so that ingest never
//! reads holes. Each on-disk format is one reader behind the [`DiskReader`] trait.

mod extents;
mod flat;

pub use extents::{ExtentDisk, ExtentSpec, ExtentTarget};
pub use flat::FlatFile;

use std::ops::Range;

use crate::error::Result;

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
}
