//! A disk reader whose allocation map is narrowed to areas known to hold all its data: those
//! the disk's host says are in use (VMware changed-block tracking asked for every area, change
//! id `*`), so a thick or flat disk read over the network skips what the guest never wrote, as
//! a local read skips holes; or, for a segment that was all zero in the previous generation,
//! the areas that changed since.

use std::ops::Range;

use crate::error::Result;

use super::DiskReader;

/// `inner`, whose data lies only in `areas` (sorted, disjoint).
pub struct InUse {
    inner: Box<dyn DiskReader>,
    areas: Vec<Range<u64>>,
}

impl InUse {
    /// Wraps `inner`; `areas` are sorted and merged here.
    pub fn new(inner: Box<dyn DiskReader>, mut areas: Vec<Range<u64>>) -> InUse {
        areas.retain(|r| r.start < r.end);
        areas.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(areas.len());
        for r in areas {
            match merged.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        InUse {
            inner,
            areas: merged,
        }
    }
}

/// The parts of `a` that also lie in `b` (both sorted and disjoint).
fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end.min(b[j].end);
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// What `inner` allocates in `range` that also lies in `areas` (sorted, disjoint).
fn narrowed(
    inner: &dyn DiskReader,
    areas: &[Range<u64>],
    range: Range<u64>,
) -> Result<Vec<Range<u64>>> {
    let first = areas.partition_point(|a| a.end <= range.start);
    let last = areas.partition_point(|a| a.start < range.end);
    let wanted = &areas[first..last.max(first)];
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    Ok(intersect(&inner.allocated(range)?, wanted))
}

/// A borrowed `inner` whose data lies only in `areas` (sorted, disjoint): one segment's
/// changed areas when the segment was all zero before them.
pub struct Within<'a> {
    inner: &'a dyn DiskReader,
    areas: &'a [Range<u64>],
}

impl<'a> Within<'a> {
    /// `inner` narrowed to `areas`, which must be sorted and disjoint.
    pub fn new(inner: &'a dyn DiskReader, areas: &'a [Range<u64>]) -> Within<'a> {
        debug_assert!(areas.windows(2).all(|w| w[0].end <= w[1].start));
        Within { inner, areas }
    }
}

impl DiskReader for Within<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        narrowed(self.inner, self.areas, range)
    }

    fn prefetch(&self, range: Range<u64>) {
        self.inner.prefetch(range)
    }
}

impl DiskReader for InUse {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        narrowed(self.inner.as_ref(), &self.areas, range)
    }

    fn link_ranges(&self, level: usize) -> Option<Result<Vec<Range<u64>>>> {
        self.inner.link_ranges(level)
    }

    fn prefetch(&self, range: Range<u64>) {
        self.inner.prefetch(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose allocation map is given.
    struct Map(Vec<Range<u64>>, u64);

    impl DiskReader for Map {
        fn size(&self) -> u64 {
            self.1
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> Result<()> {
            buf.fill(1);
            Ok(())
        }
        fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
            Ok(intersect(&self.0, &[range]))
        }
    }

    #[test]
    fn only_what_both_call_data_is_data() {
        // The file says everything may be data; the host says three areas are in use.
        let d = InUse::new(
            Box::new(Map(std::iter::once(0..1000).collect(), 1000)),
            vec![500..600, 0..10, 5..20, 990..2000],
        );
        assert_eq!(
            d.allocated(0..1000).unwrap(),
            vec![0..20, 500..600, 990..1000]
        );
        assert_eq!(d.allocated(15..550).unwrap(), vec![15..20, 500..550]);
        assert_eq!(d.allocated(20..500).unwrap(), Vec::<Range<u64>>::new());
        // A hole of the file stays a hole, even where the host says in use.
        let d = InUse::new(
            Box::new(Map(vec![0..100, 800..900], 1000)),
            std::iter::once(50..850).collect(),
        );
        assert_eq!(d.allocated(0..1000).unwrap(), vec![50..100, 800..850]);
        assert_eq!(
            intersect(&[0..10, 20..30, 40..50], &[5..25, 45..60]),
            vec![5..10, 20..25, 45..50]
        );
    }

    #[test]
    fn a_borrowed_reader_narrowed_to_changed_areas() {
        let disk = Map(std::iter::once(0..1000).collect(), 1000);
        let changed = [100..200, 700..710];
        let w = Within::new(&disk, &changed);
        assert_eq!(w.allocated(0..500).unwrap(), vec![100..200]);
        assert_eq!(w.allocated(150..800).unwrap(), vec![150..200, 700..710]);
        assert_eq!(w.allocated(200..700).unwrap(), Vec::<Range<u64>>::new());
    }
}
