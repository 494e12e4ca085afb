//! exFAT volumes (USB-style data disks, some EFI and camera-card images), read by vmrepo
//! itself from Microsoft's published specification: the boot sector, the FAT, directories as
//! sets of entries (file, stream extension, names), files contiguous or chained. As on FAT,
//! there are no owners or POSIX modes (directories 755, files 644, 444 when read-only, owned by
//! 0:0) and names are found case-insensitively. Times carry their UTC offset where the volume
//! recorded one and are shown as UTC otherwise. Bytes past a file's valid length read as zeros.

use crate::error::{Error, Result};
use crate::guest::{collect_span, join, Entry, GuestFs, VolumeIo};

/// An exFAT filesystem on a volume.
pub struct ExFat {
    io: VolumeIo,
    geometry: Geometry,
    label: Option<String>,
    /// `vm@time:volume`, for messages.
    at: String,
}

/// Where things are on the volume.
struct Geometry {
    fat_offset: u64,
    heap_offset: u64,
    cluster_size: u64,
    cluster_count: u32,
    root_cluster: u32,
}

/// One file or directory, from its directory entry set.
#[derive(Clone, Debug)]
struct Node {
    name: String,
    dir: bool,
    read_only: bool,
    mtime: (i64, u32),
    atime: (i64, u32),
    first_cluster: u32,
    /// Bytes allocated to it, and how many of them hold data (the rest reads as zeros).
    length: u64,
    valid: u64,
    /// Its clusters are consecutive (no FAT chain).
    contiguous: bool,
    /// Its size is its chain's (the root directory, which has no recorded size).
    whole_chain: bool,
}

/// The largest directory exFAT allows.
const MAX_DIR_BYTES: u64 = 256 << 20;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl ExFat {
    /// Loads the filesystem on `io` (its boot sector and root directory).
    pub fn load(io: VolumeIo, at: &str) -> Result<ExFat> {
        let mut boot = vec![0u8; 512.min(io.size()) as usize];
        io.read_at(0, &mut boot)?;
        let geometry = Geometry::parse(&boot, io.size()).ok_or_else(|| {
            Error::GuestFilesystem(format!("{at}: not a readable exFAT boot sector"))
        })?;
        let mut fs = ExFat {
            io,
            geometry,
            label: None,
            at: at.to_string(),
        };
        let root = fs.root();
        let raw = fs.dir_bytes(&root, &fs.what("/"))?;
        fs.label = volume_label(&raw);
        Ok(fs)
    }

    fn what(&self, path: &str) -> String {
        format!("{}:{path}", self.at)
    }

    fn corrupt(what: &str, why: &str) -> Error {
        Error::GuestFilesystem(format!("{what}: {why}"))
    }

    fn root(&self) -> Node {
        Node {
            name: "/".into(),
            dir: true,
            read_only: false,
            mtime: (0, 0),
            atime: (0, 0),
            first_cluster: self.geometry.root_cluster,
            length: 0,
            valid: 0,
            contiguous: false,
            whole_chain: true,
        }
    }

    /// The clusters of `node` as runs (first cluster, count), in order: one run when they are
    /// consecutive, else its FAT chain up to its length (the root: up to the chain's end). A
    /// chain that loops or leaves the volume is an error.
    fn runs(&self, node: &Node, what: &str) -> Result<Vec<(u32, u64)>> {
        let g = &self.geometry;
        let valid = |c: u32| c >= 2 && ((c - 2) as u64) < g.cluster_count as u64;
        let wanted = if node.whole_chain {
            MAX_DIR_BYTES / g.cluster_size
        } else {
            node.length.div_ceil(g.cluster_size)
        };
        if wanted == 0 || node.first_cluster == 0 {
            return Ok(Vec::new());
        }
        if node.contiguous {
            let end = node.first_cluster as u64 + wanted;
            if !valid(node.first_cluster) || end - 2 > g.cluster_count as u64 {
                return Err(Self::corrupt(what, "its clusters lie outside the volume"));
            }
            return Ok(vec![(node.first_cluster, wanted)]);
        }
        let mut runs: Vec<(u32, u64)> = Vec::new();
        let mut seen = 0u64;
        let mut c = node.first_cluster;
        // The FAT is read a page at a time.
        let mut page: (u64, Vec<u8>) = (u64::MAX, vec![0u8; 65536]);
        while seen < wanted {
            if !valid(c) {
                if node.whole_chain && c >= 0xFFFF_FFF8 {
                    break;
                }
                return Err(Self::corrupt(what, "its cluster chain is broken"));
            }
            if seen > g.cluster_count as u64 {
                return Err(Self::corrupt(what, "its cluster chain loops"));
            }
            match runs.last_mut() {
                Some((first, n)) if *first as u64 + *n == c as u64 => *n += 1,
                _ => runs.push((c, 1)),
            }
            seen += 1;
            let at = g.fat_offset + c as u64 * 4;
            let base = at - at % page.1.len() as u64;
            if page.0 != base {
                let len = (page.1.len() as u64).min(self.io.size() - base) as usize;
                page.1.resize(len, 0);
                self.io.read_at(base, &mut page.1)?;
                page.0 = base;
            }
            let off = (at - base) as usize;
            c = le32(&page.1, off);
        }
        Ok(runs)
    }

    /// Hands bytes `[from, end)` of `node`'s clusters to `sink`, at most 1 MiB at a time.
    fn read_clusters(
        &self,
        node: &Node,
        from: u64,
        end: u64,
        what: &str,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let g = &self.geometry;
        let mut buf = Vec::new();
        // Position in the file of the current run's start.
        let mut run_start = 0u64;
        let mut pos = from;
        for (first, count) in self.runs(node, what)? {
            let run_len = count * g.cluster_size;
            let run_end = run_start + run_len;
            while pos < end && pos < run_end {
                let take = (run_end - pos).min(end - pos).min(1 << 20);
                let at = g.heap_offset + (first as u64 - 2) * g.cluster_size + (pos - run_start);
                buf.resize(take as usize, 0);
                self.io.read_at(at, &mut buf)?;
                sink(&buf)?;
                pos += take;
            }
            run_start = run_end;
            if pos >= end {
                return Ok(());
            }
        }
        if pos < end {
            return Err(Self::corrupt(what, "shorter than its recorded size"));
        }
        Ok(())
    }

    /// Hands bytes `[from, end)` of file `n` to `sink`: its clusters up to its valid length,
    /// zeros after.
    fn read_content(
        &self,
        n: &Node,
        from: u64,
        end: u64,
        what: &str,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let stored_end = end.min(n.valid);
        if from < stored_end {
            self.read_clusters(n, from, stored_end, what, sink)?;
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = from.max(stored_end);
        while pos < end {
            let k = (end - pos).min(zeros.len() as u64);
            sink(&zeros[..k as usize])?;
            pos += k;
        }
        Ok(())
    }

    /// The file (not directory) at `path`.
    fn file(&self, path: &str) -> Result<Node> {
        let n = self.find(path)?;
        if n.dir {
            return Err(Error::Usage(format!(
                "{} is a directory (`vmrepo ls` lists it)",
                self.what(path)
            )));
        }
        Ok(n)
    }

    /// A directory's raw entries.
    fn dir_bytes(&self, dir: &Node, what: &str) -> Result<Vec<u8>> {
        let mut raw = Vec::new();
        let len = if dir.whole_chain {
            let clusters: u64 = self.runs(dir, what)?.iter().map(|r| r.1).sum();
            clusters * self.geometry.cluster_size
        } else {
            dir.length.min(MAX_DIR_BYTES)
        };
        self.read_clusters(dir, 0, len, what, &mut |b| {
            raw.extend_from_slice(b);
            Ok(())
        })?;
        Ok(raw)
    }

    fn children(&self, dir: &Node, what: &str) -> Result<Vec<Node>> {
        let raw = self.dir_bytes(dir, what)?;
        entry_sets(&raw).ok_or_else(|| Self::corrupt(what, "bad directory entries"))
    }

    /// The node at `path` (names compared without case).
    fn find(&self, path: &str) -> Result<Node> {
        let mut node = self.root();
        let mut walked = String::from("/");
        for name in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if !node.dir {
                return Err(Error::Usage(format!(
                    "{}: not a directory",
                    self.what(&walked)
                )));
            }
            let children = self.children(&node, &self.what(&walked))?;
            walked = join(&walked, name);
            let key = fold(name);
            node = children
                .into_iter()
                .find(|c| fold(&c.name) == key)
                .ok_or_else(|| {
                    Error::NotFound(format!("{}: no such file or directory", self.what(&walked)))
                })?;
        }
        Ok(node)
    }
}

/// A name folded for comparison without case.
fn fold(name: &str) -> String {
    name.chars().flat_map(char::to_uppercase).collect()
}

/// The volume label, from the root's label entry.
fn volume_label(raw: &[u8]) -> Option<String> {
    for e in raw.chunks_exact(32) {
        match e[0] {
            0x00 => return None,
            0x83 => {
                let n = (e[1] as usize).min(11);
                let units: Vec<u16> = (0..n).map(|i| le16(e, 2 + i * 2)).collect();
                let l = String::from_utf16_lossy(&units);
                return (!l.is_empty()).then_some(l);
            }
            _ => {}
        }
    }
    None
}

/// The files and directories a directory's entries describe. Deleted and unknown entries are
/// skipped; a set that is cut short or names no stream is an error.
fn entry_sets(raw: &[u8]) -> Option<Vec<Node>> {
    let entries: Vec<&[u8]> = raw.chunks_exact(32).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let e = entries[i];
        match e[0] {
            0x00 => break,
            0x85 => {
                let secondary = e[1] as usize;
                if secondary < 2 || i + secondary >= entries.len() {
                    return None;
                }
                let stream = entries[i + 1];
                if stream[0] != 0xC0 {
                    return None;
                }
                let name_len = stream[3] as usize;
                let mut units = Vec::with_capacity(name_len);
                for n in entries[i + 2..=i + secondary]
                    .iter()
                    .filter(|n| n[0] == 0xC1)
                {
                    units.extend((0..15).map(|k| le16(n, 2 + k * 2)));
                }
                if units.len() < name_len {
                    return None;
                }
                units.truncate(name_len);
                let attributes = le16(e, 4);
                out.push(Node {
                    name: String::from_utf16_lossy(&units),
                    dir: attributes & 0x10 != 0,
                    read_only: attributes & 0x01 != 0,
                    mtime: timestamp(le32(e, 12), e[21], e[23]),
                    atime: timestamp(le32(e, 16), 0, e[24]),
                    first_cluster: le32(stream, 20),
                    length: le64(stream, 24),
                    valid: le64(stream, 8).min(le64(stream, 24)),
                    contiguous: stream[1] & 0x02 != 0,
                    whole_chain: false,
                });
                i += 1 + secondary;
            }
            _ => i += 1,
        }
    }
    Some(out)
}

/// Seconds since the Unix epoch (and nanoseconds) of an exFAT timestamp: local time in
/// two-second steps, a 10 ms increment, and an offset from UTC in 15-minute steps when its
/// top bit is set (otherwise the time is taken as UTC).
fn timestamp(t: u32, tens_of_ms: u8, offset: u8) -> (i64, u32) {
    let year = 1980 + (t >> 25) as i16;
    let month = ((t >> 21) & 0xf) as i8;
    let day = ((t >> 16) & 0x1f) as i8;
    let hour = ((t >> 11) & 0x1f) as i8;
    let minute = ((t >> 5) & 0x3f) as i8;
    let second = ((t & 0x1f) * 2) as i8;
    let Ok(local) = jiff::civil::DateTime::new(year, month, day, hour, minute, second, 0) else {
        return (0, 0);
    };
    let Ok(z) = local.to_zoned(jiff::tz::TimeZone::UTC) else {
        return (0, 0);
    };
    let extra = (tens_of_ms.min(199) as i64) * 10;
    let mut secs = z.timestamp().as_second() + extra / 1000;
    if offset & 0x80 != 0 {
        // A signed 7-bit count of 15 minutes east of UTC.
        let quarters = ((offset << 1) as i8 >> 1) as i64;
        secs -= quarters * 15 * 60;
    }
    (secs, ((extra % 1000) * 1_000_000) as u32)
}

impl Geometry {
    fn parse(b: &[u8], volume_len: u64) -> Option<Geometry> {
        if b.len() < 512 || &b[3..11] != b"EXFAT   " || b[510..512] != [0x55, 0xAA] {
            return None;
        }
        let sector_shift = b[108] as u32;
        let cluster_shift = b[109] as u32;
        if !(9..=12).contains(&sector_shift) || sector_shift + cluster_shift > 25 {
            return None;
        }
        let sector = 1u64 << sector_shift;
        let g = Geometry {
            fat_offset: le32(b, 80) as u64 * sector,
            heap_offset: le32(b, 88) as u64 * sector,
            cluster_size: sector << cluster_shift,
            cluster_count: le32(b, 92),
            root_cluster: le32(b, 96),
        };
        let heap_end = g.heap_offset + g.cluster_count as u64 * g.cluster_size;
        let fat_end = g.fat_offset + (g.cluster_count as u64 + 2) * 4;
        (g.root_cluster >= 2 && heap_end <= volume_len && fat_end <= volume_len).then_some(g)
    }
}

fn entry(name: String, n: &Node) -> Entry {
    Entry {
        name,
        kind: if n.dir { "dir" } else { "file" },
        mode: if n.dir {
            0o755
        } else if n.read_only {
            0o444
        } else {
            0o644
        },
        uid: 0,
        gid: 0,
        size: if n.dir { 0 } else { n.length },
        mtime: n.mtime.0,
        mtime_nanos: n.mtime.1,
        atime: n.atime,
        target: None,
    }
}

impl GuestFs for ExFat {
    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let n = self.find(path)?;
        Ok(entry(path.to_string(), &n))
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.find(path)?;
        if !dir.dir {
            return Err(Error::Usage(format!(
                "{}: not a directory",
                self.what(path)
            )));
        }
        let children = self.children(&dir, &self.what(path))?;
        Ok(children.iter().map(|c| entry(c.name.clone(), c)).collect())
    }

    fn link_target(&self, path: &str) -> Result<Vec<u8>> {
        Err(Error::Usage(format!(
            "{}: exFAT has no symbolic links",
            self.what(path)
        )))
    }

    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        let n = self.file(path)?;
        self.read_content(&n, 0, n.length, &self.what(path), sink)?;
        Ok(n.length)
    }

    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let n = self.file(path)?;
        collect_span(n.length, offset, len, |from, end, sink| {
            self.read_content(&n, from, end, &self.what(path), sink)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_apply_their_utc_offset() {
        // 2026-12-04 10:30:20 local, +01:00 (4 quarters, valid bit set).
        let t = (46u32 << 25) | (12 << 21) | (4 << 16) | (10 << 11) | (30 << 5) | 10;
        let (utc, _) = timestamp(t, 0, 0x80 | 4);
        let (as_utc, ns) = timestamp(t, 150, 0);
        assert_eq!(as_utc - utc, 3600 + 1);
        assert_eq!(ns, 500_000_000);
    }

    #[test]
    fn a_cut_entry_set_is_refused() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x85;
        raw[1] = 2;
        raw[32] = 0xC0;
        assert!(entry_sets(&raw).is_none());
    }
}
