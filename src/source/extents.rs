//! A disk made of consecutive extents (a VMDK descriptor's FLAT/VMFS/ZERO lines), each mapping a
//! guest range onto a file region or onto zeros.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::{DiskReader, FlatFile};
use crate::error::{Error, Result};

/// What backs one extent.
pub enum ExtentTarget {
    /// Bytes of a file starting at `offset`.
    File {
        /// The file.
        file: Arc<FlatFile>,
        /// Byte offset of the extent's first byte inside the file.
        offset: u64,
    },
    /// Zeros (VMDK `ZERO` extent).
    Zero,
}

/// One extent as the descriptor gives it.
pub struct ExtentSpec {
    /// Length in bytes.
    pub len: u64,
    /// Backing.
    pub target: ExtentTarget,
}

struct Placed {
    start: u64,
    len: u64,
    target: ExtentTarget,
}

/// Extents laid end to end in guest-address order.
pub struct ExtentDisk {
    extents: Vec<Placed>,
    size: u64,
}

impl ExtentDisk {
    /// Builds the disk, checking that every file is long enough for its extent.
    pub fn new(specs: Vec<ExtentSpec>, descriptor: &Path) -> Result<ExtentDisk> {
        let mut start = 0u64;
        let mut extents = Vec::with_capacity(specs.len());
        for s in specs {
            if let ExtentTarget::File { file, offset } = &s.target {
                let need = offset + s.len;
                if file.len() < need {
                    return Err(Error::bad_input(
                        file.path(),
                        format!(
                            "flat extent is {} bytes but the descriptor {} needs {} (offset {} + {} sectors); \
                             the file is truncated or the descriptor is wrong",
                            file.len(),
                            descriptor.display(),
                            need,
                            offset,
                            s.len / 512
                        ),
                    ));
                }
            }
            extents.push(Placed {
                start,
                len: s.len,
                target: s.target,
            });
            start += s.len;
        }
        Ok(ExtentDisk {
            extents,
            size: start,
        })
    }

    fn overlapping(&self, range: Range<u64>) -> impl Iterator<Item = &Placed> {
        let first = self
            .extents
            .partition_point(|e| e.start + e.len <= range.start);
        self.extents[first..]
            .iter()
            .take_while(move |e| e.start < range.end)
    }
}

impl DiskReader for ExtentDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        for e in self.overlapping(offset..end) {
            let s = e.start.max(offset);
            let t = (e.start + e.len).min(end);
            let dst = &mut buf[(s - offset) as usize..(t - offset) as usize];
            match &e.target {
                ExtentTarget::File { file, offset: fo } => {
                    file.read_exact_at(dst, fo + (s - e.start))?
                }
                ExtentTarget::Zero => dst.fill(0),
            }
        }
        Ok(())
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for e in self.overlapping(range.clone()) {
            let s = e.start.max(range.start);
            let t = (e.start + e.len).min(range.end);
            if let ExtentTarget::File { file, offset } = &e.target {
                let base = *offset;
                for r in file.data_ranges(base + (s - e.start)..base + (t - e.start))? {
                    let g = (r.start - base + e.start)..(r.end - base + e.start);
                    match out.last_mut() {
                        Some(last) if last.end == g.start => last.end = g.end,
                        _ => out.push(g),
                    }
                }
            }
        }
        Ok(out)
    }
}
