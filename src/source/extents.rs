//! A disk made of consecutive extents (a VMDK descriptor's extent lines), each mapping a guest
//! range onto a file region, onto zeros, or onto a sparse extent (another [`Layer`]).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::{push_span, DiskReader, FlatFile, Layer, Span, State};
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
    /// A sparse extent (KDMV, COWD, seSparse) whose guest byte 0 is the extent's first byte.
    Layer(Box<dyn Layer>),
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
    descriptor: std::path::PathBuf,
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
            if let ExtentTarget::Layer(l) = &s.target {
                if l.size() < s.len {
                    return Err(Error::bad_input(
                        l.path(),
                        format!(
                            "sparse extent holds {} bytes but the descriptor {} gives it {} sectors; \
                             the descriptor does not belong to this file",
                            l.size(),
                            descriptor.display(),
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
            descriptor: descriptor.to_path_buf(),
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
                ExtentTarget::Layer(l) => l.read(dst, s - e.start)?,
            }
        }
        Ok(())
    }

    fn prefetch(&self, range: Range<u64>) {
        for e in self.overlapping(range.clone()) {
            let s = e.start.max(range.start);
            let t = (e.start + e.len).min(range.end);
            match &e.target {
                ExtentTarget::File { file, offset } => file.prefetch(offset + (s - e.start), t - s),
                ExtentTarget::Layer(l) => l.prefetch(s - e.start..t - e.start),
                ExtentTarget::Zero => {}
            }
        }
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
            if let ExtentTarget::Layer(l) = &e.target {
                for sp in l.map(s - e.start..t - e.start)? {
                    if sp.state == State::Data {
                        let g = sp.range.start + e.start..sp.range.end + e.start;
                        match out.last_mut() {
                            Some(last) if last.end == g.start => last.end = g.end,
                            _ => out.push(g),
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// As a chain link: file data is `Data`, file holes and ZERO extents are `Zero` (a flat extent
/// hides its parent entirely), sparse extents answer for themselves.
impl Layer for ExtentDisk {
    fn path(&self) -> &Path {
        &self.descriptor
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn map(&self, range: Range<u64>) -> Result<Vec<Span>> {
        let range = range.start..range.end.min(self.size);
        let mut out = Vec::new();
        for e in self.overlapping(range.clone()) {
            let s = e.start.max(range.start);
            let t = (e.start + e.len).min(range.end);
            match &e.target {
                ExtentTarget::Zero => push_span(&mut out, s..t, State::Zero),
                ExtentTarget::File { file, offset } => {
                    let mut pos = s;
                    for r in file.data_ranges(offset + (s - e.start)..offset + (t - e.start))? {
                        let g = r.start - offset + e.start..r.end - offset + e.start;
                        push_span(&mut out, pos..g.start, State::Zero);
                        push_span(&mut out, g.clone(), State::Data);
                        pos = g.end;
                    }
                    push_span(&mut out, pos..t, State::Zero);
                }
                ExtentTarget::Layer(l) => {
                    for sp in l.map(s - e.start..t - e.start)? {
                        push_span(
                            &mut out,
                            sp.range.start + e.start..sp.range.end + e.start,
                            sp.state,
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        DiskReader::read_at(self, buf, offset)
    }

    fn prefetch(&self, range: Range<u64>) {
        DiskReader::prefetch(self, range)
    }
}
