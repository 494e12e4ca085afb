//! The disk map: which segment object holds each `segment_size` piece of one disk.
//!
//! Only segments that hold data are listed; every other segment is all zero. Memory and the
//! stored object therefore follow a disk's allocated data, not its virtual size: an empty
//! 1 PiB thin disk has an empty map. Version 1 (one id per segment, the all-zero id for a zero
//! segment) is still read; version 2 is written (see docs/FORMAT.md).

use crate::repo::id::ObjectId;

const MAGIC: &[u8; 4] = b"VRDM";
/// Bytes before the first run: magic, version, size, segment size, run count.
const HEADER_LEN: usize = 24;
/// Bytes before a run's ids: its first segment (u64) and its length (u32).
const RUN_HEADER_LEN: usize = 12;

/// The non-zero segments of one disk, in disk order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskMap {
    /// Virtual size of the disk in bytes.
    pub size: u64,
    /// Segment size used to cut it.
    pub segment_size: u32,
    /// `(segment index, segment id)` for every segment that is not all zero, indexes strictly
    /// increasing, ids never [`ObjectId::ZERO`].
    entries: Vec<(u64, ObjectId)>,
}

impl DiskMap {
    /// A map of a disk of `size` bytes cut in `segment_size` pieces, from its non-zero segments
    /// in any order; zero ids are dropped. Panics on an index past the disk's end or a repeated
    /// index (an ingest bug, not an input error).
    pub fn new(
        size: u64,
        segment_size: u32,
        segments: impl IntoIterator<Item = (u64, ObjectId)>,
    ) -> DiskMap {
        let mut entries: Vec<_> = segments.into_iter().filter(|(_, s)| !s.is_zero()).collect();
        entries.sort_unstable_by_key(|(i, _)| *i);
        let count = size.div_ceil(segment_size as u64);
        assert!(entries.last().is_none_or(|(i, _)| *i < count));
        assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        DiskMap {
            size,
            segment_size,
            entries,
        }
    }

    /// How many segments the disk has, zero or not.
    pub fn count(&self) -> u64 {
        self.size.div_ceil(self.segment_size as u64)
    }

    /// The id of segment `i`; [`ObjectId::ZERO`] for an all-zero segment.
    pub fn get(&self, i: u64) -> ObjectId {
        match self.entries.binary_search_by_key(&i, |(k, _)| *k) {
            Ok(pos) => self.entries[pos].1,
            Err(_) => ObjectId::ZERO,
        }
    }

    /// The segments that are not all zero, in disk order.
    pub fn nonzero(&self) -> impl ExactSizeIterator<Item = (u64, &ObjectId)> + '_ {
        self.entries.iter().map(|(i, id)| (*i, id))
    }

    /// Indexes of the non-zero segments in `[from, to)`, in order.
    pub fn nonzero_in(&self, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
        let lo = self.entries.partition_point(|(i, _)| *i < from);
        let hi = self.entries.partition_point(|(i, _)| *i < to).max(lo);
        self.entries[lo..hi].iter().map(|(i, _)| *i)
    }

    /// Byte range `[start, end)` of segment `i`.
    pub fn segment_range(&self, i: u64) -> (u64, u64) {
        let r = segment_range(i, self.segment_size as u64, self.size);
        (r.start, r.end)
    }

    /// Runs of consecutive non-zero segments: `(first index, entries)`.
    fn runs(&self) -> Vec<(u64, &[(u64, ObjectId)])> {
        let mut runs = Vec::new();
        let mut start = 0;
        for k in 1..=self.entries.len() {
            if k == self.entries.len() || self.entries[k].0 != self.entries[k - 1].0 + 1 {
                runs.push((self.entries[start].0, &self.entries[start..k]));
                start = k;
            }
        }
        runs
    }

    /// Length in bytes of [`DiskMap::encode`]'s output, without encoding.
    pub fn encoded_len(&self) -> u64 {
        let runs = self.runs().len() as u64;
        HEADER_LEN as u64 + runs * RUN_HEADER_LEN as u64 + self.entries.len() as u64 * 32
    }

    /// Version 2 encoding: `"VRDM" | 2 u32 | size u64 | segment_size u32 | runs u32`, then per
    /// run of consecutive non-zero segments `first u64 | count u32 | count × id`.
    pub fn encode(&self) -> Vec<u8> {
        let runs = self.runs();
        let mut out = Vec::with_capacity(self.encoded_len() as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.segment_size.to_le_bytes());
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for (first, run) in runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&(run.len() as u32).to_le_bytes());
            for (_, id) in run {
                out.extend_from_slice(&id.0);
            }
        }
        out
    }

    /// Parses a version 1 or 2 disk map and checks it is self-consistent.
    pub fn decode(b: &[u8]) -> Result<DiskMap, String> {
        if b.len() < HEADER_LEN || &b[..4] != MAGIC {
            return Err("not a disk map object".into());
        }
        let version = u32_at(b, 4);
        let size = u64_at(b, 8);
        let segment_size = u32_at(b, 16);
        if segment_size == 0 {
            return Err("disk map segment size is zero".into());
        }
        let count = size.div_ceil(segment_size as u64);
        let n = u32_at(b, 20) as u64;
        let body = &b[HEADER_LEN..];
        let entries = match version {
            1 => {
                if body.len() as u64 != n.saturating_mul(32) {
                    return Err("disk map object has the wrong length".into());
                }
                if n != count {
                    return Err("disk map segment count does not match the disk size".into());
                }
                body.chunks_exact(32)
                    .enumerate()
                    .map(|(i, c)| (i as u64, ObjectId::from_slice(c).unwrap()))
                    .filter(|(_, id)| !id.is_zero())
                    .collect()
            }
            2 => decode_runs(body, n, count)?,
            v => return Err(format!("disk map version {v} unknown")),
        };
        Ok(DiskMap {
            size,
            segment_size,
            entries,
        })
    }
}

/// Bytes of segment `i` of a disk of `size` bytes cut in `segment_size` pieces (the last one
/// may be short).
pub fn segment_range(i: u64, segment_size: u64, size: u64) -> std::ops::Range<u64> {
    let start = i * segment_size;
    start..(start + segment_size).min(size)
}

/// The runs of a version 2 map: `runs` of them in `body`, on a disk of `count` segments.
fn decode_runs(body: &[u8], runs: u64, count: u64) -> Result<Vec<(u64, ObjectId)>, String> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    let mut next_free = 0u64;
    for _ in 0..runs {
        if body.len() - pos < RUN_HEADER_LEN {
            return Err("disk map object ends inside a run header".into());
        }
        let first = u64_at(body, pos);
        let len = u32_at(body, pos + 8) as u64;
        pos += RUN_HEADER_LEN;
        if len == 0 {
            return Err(format!("disk map run at segment {first} is empty"));
        }
        if first < next_free {
            return Err(format!(
                "disk map run at segment {first} overlaps or precedes the run before it"
            ));
        }
        if first.checked_add(len).is_none_or(|end| end > count) {
            return Err(format!(
                "disk map run at segment {first} of {len} segments ends past the disk's \
                 {count} segments"
            ));
        }
        if ((body.len() - pos) as u64) < len * 32 {
            return Err("disk map object ends inside a run".into());
        }
        for k in 0..len {
            let id = ObjectId::from_slice(&body[pos..pos + 32]).unwrap();
            if id.is_zero() {
                return Err(format!(
                    "disk map lists segment {} as the zero id",
                    first + k
                ));
            }
            entries.push((first + k, id));
            pos += 32;
        }
        next_free = first + len;
    }
    if pos != body.len() {
        return Err("disk map object has bytes after its last run".into());
    }
    Ok(entries)
}

fn u32_at(b: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(b[pos..pos + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(size: u64, segment_size: u32, ids: &[ObjectId]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&segment_size.to_le_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            out.extend_from_slice(&id.0);
        }
        out
    }

    #[test]
    fn round_trip_keeps_runs_and_zero_segments() {
        let (x, y, z) = (ObjectId::of(b"x"), ObjectId::of(b"y"), ObjectId::of(b"z"));
        let d = DiskMap::new(
            (80 << 20) + 5,
            16 << 20,
            [(5, z), (1, x), (2, y), (3, ObjectId::ZERO)],
        );
        assert_eq!(d.count(), 6);
        assert_eq!(d.get(0), ObjectId::ZERO);
        assert_eq!(d.get(1), x);
        assert_eq!(d.get(3), ObjectId::ZERO);
        assert_eq!(d.get(5), z);
        assert_eq!(d.nonzero_in(2, 6).collect::<Vec<_>>(), vec![2, 5]);
        assert_eq!(d.segment_range(5), (80 << 20, (80 << 20) + 5));
        let bytes = d.encode();
        assert_eq!(bytes.len() as u64, d.encoded_len());
        // Two runs: [1, 2] and [5].
        assert_eq!(bytes.len(), HEADER_LEN + 2 * RUN_HEADER_LEN + 3 * 32);
        assert_eq!(DiskMap::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn an_empty_petabyte_disk_has_an_empty_map() {
        let d = DiskMap::new(1 << 50, 4 << 20, []);
        assert_eq!(d.count(), 1 << 28);
        assert_eq!(d.encode().len(), HEADER_LEN);
        assert_eq!(DiskMap::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn version_1_maps_are_read_without_their_zero_segments() {
        let x = ObjectId::of(b"x");
        let old = v1(40 << 20, 16 << 20, &[ObjectId::ZERO, x, ObjectId::ZERO]);
        let d = DiskMap::decode(&old).unwrap();
        assert_eq!(d, DiskMap::new(40 << 20, 16 << 20, [(1, x)]));
        // A version 1 map whose count disagrees with the size is refused.
        assert!(DiskMap::decode(&v1(10 << 20, 16 << 20, &[x, x, x])).is_err());
        assert!(DiskMap::decode(&old[..old.len() - 1]).is_err());
    }

    #[test]
    fn inconsistent_version_2_maps_are_refused() {
        let (x, y) = (ObjectId::of(b"x"), ObjectId::of(b"y"));
        let good = DiskMap::new(64 << 20, 16 << 20, [(0, x), (2, y)]).encode();
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            DiskMap::decode(&b)
        };
        // Second run (header at 24 + 12 + 32 = 68) moved onto the first.
        assert!(edit(&|b| b[68..76].copy_from_slice(&0u64.to_le_bytes()))
            .unwrap_err()
            .contains("overlaps"));
        // A run past the disk's end.
        assert!(edit(&|b| b[68..76].copy_from_slice(&4u64.to_le_bytes()))
            .unwrap_err()
            .contains("past the disk"));
        // An empty run, a zero id, a truncated object, trailing bytes, an unknown version.
        assert!(edit(&|b| b[76..80].copy_from_slice(&0u32.to_le_bytes())).is_err());
        assert!(edit(&|b| b[36..68].fill(0))
            .unwrap_err()
            .contains("zero id"));
        assert!(edit(&|b| b.truncate(b.len() - 1)).is_err());
        assert!(edit(&|b| b.push(0)).is_err());
        assert!(edit(&|b| b[4] = 3).unwrap_err().contains("version 3"));
        // A run count that promises more runs than there are bytes.
        assert!(edit(&|b| b[20..24].copy_from_slice(&u32::MAX.to_le_bytes())).is_err());
    }
}
