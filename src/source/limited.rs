//! A disk reader held to a rate (`--limit-read`): backups must not starve the datastore the VMs
//! run on. Every read of guest data waits its turn on a [`Throttle`] shared by all the disks
//! (and all the VMs) the process reads.

use std::ops::Range;
use std::sync::Arc;

use crate::error::Result;
use crate::throttle::Throttle;

use super::DiskReader;

/// `inner`, read at most at the rate of `limit`.
pub struct Limited {
    inner: Box<dyn DiskReader>,
    limit: Arc<Throttle>,
}

impl Limited {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn DiskReader>, limit: Arc<Throttle>) -> Limited {
        Limited { inner, limit }
    }
}

impl DiskReader for Limited {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.limit.take(buf.len() as u64);
        self.inner.read_at(buf, offset)
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        self.inner.allocated(range)
    }

    fn link_ranges(&self, level: usize) -> Option<Result<Vec<Range<u64>>>> {
        self.inner.link_ranges(level)
    }

    fn prefetch(&self, range: Range<u64>) {
        self.inner.prefetch(range)
    }
}
