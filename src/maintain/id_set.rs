//! A set of object ids larger than memory may hold: gc's live set at any repository size.
//!
//! Object ids are hashes, so their leading bits spread them evenly. A set expected to hold more
//! than [`PARTITION_IDS`] ids is cut by those bits into partitions, each an append-only file of
//! ids in a private directory beside the index; a partition is read, sorted and searched on its
//! own, so memory holds one partition (64 MiB), never the set. A smaller set stays in memory.
//! The ids are asked about in order, partition by partition ([`IdSet::partitions`]), which is
//! how the index's rows come when read by id range.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::repo::id::ObjectId;

/// Ids per partition the set aims at (2^21 ids of 32 bytes: 64 MiB when loaded).
pub const PARTITION_IDS: u64 = 1 << 21;

/// Files of partitions start with this; the rest of their directory's name is the pid of the
/// process that made them, so a later run can remove what a killed one left.
const DIR_PREFIX: &str = "idset-";

/// What a failed write of the partition files says (it needs about 32 bytes per object).
const WRITE_OP: &str = "write the temporary id set (32 bytes per object of the repository) in";

/// Ids being added.
pub struct IdSpill {
    /// Leading bits that choose the partition (0: one partition, in memory).
    bits: u32,
    /// The one partition of a set held in memory.
    memory: Vec<ObjectId>,
    /// The partition files of a spilled set.
    files: Vec<BufWriter<File>>,
    dir: Option<SpillDir>,
}

/// A finished set: ids grouped in partitions by their leading bits.
pub struct IdSet {
    bits: u32,
    memory: Vec<ObjectId>,
    dir: Option<SpillDir>,
}

/// The ids of one partition, sorted, each once.
pub struct Partition {
    /// The lowest id the partition can hold.
    pub first: ObjectId,
    /// The lowest id of the next partition (`None` for the last one).
    pub end: Option<ObjectId>,
    ids: Vec<ObjectId>,
}

impl Partition {
    /// Whether `id` (which must fall in this partition's range) is in the set.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.ids.binary_search(id).is_ok()
    }

    /// The ids of the partition, in order.
    pub fn ids(&self) -> &[ObjectId] {
        &self.ids
    }
}

/// A private directory of partition files, removed when dropped.
struct SpillDir(PathBuf);

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn partition_of(bits: u32, id: &ObjectId) -> usize {
    if bits == 0 {
        0
    } else {
        (u32::from_be_bytes(id.0[..4].try_into().expect("4 bytes")) >> (32 - bits)) as usize
    }
}

/// The lowest id of partition `p`, if there is such a partition.
fn first_of(bits: u32, p: usize) -> Option<ObjectId> {
    if p >= 1usize << bits {
        return None;
    }
    let mut id = [0u8; 32];
    if bits > 0 {
        id[..4].copy_from_slice(&((p as u32) << (32 - bits)).to_be_bytes());
    }
    Some(ObjectId(id))
}

impl IdSpill {
    /// A set for about `expected` distinct ids (more are fine: partitions grow). Partition
    /// files go in a new directory under `parent` (the index's directory); left-overs of
    /// killed runs there are removed first.
    pub fn new(parent: &Path, expected: u64) -> Result<IdSpill> {
        let parts = expected
            .div_ceil(crate::maintain::batch(PARTITION_IDS))
            .max(1)
            .next_power_of_two();
        let bits = parts.trailing_zeros().min(16);
        if bits == 0 {
            return Ok(IdSpill {
                bits,
                memory: Vec::new(),
                files: Vec::new(),
                dir: None,
            });
        }
        remove_left_overs(parent);
        let dir = parent.join(format!(
            "{DIR_PREFIX}{}-{:016x}",
            std::process::id(),
            rand_u64()
        ));
        let ctx = |cause: io::Error, p: &Path| Error::Io {
            op: WRITE_OP,
            path: p.to_path_buf(),
            cause,
        };
        fs::create_dir(&dir).map_err(|e| ctx(e, &dir))?;
        let dir = SpillDir(dir);
        let mut files = Vec::with_capacity(1 << bits);
        for p in 0..1usize << bits {
            let path = dir.0.join(format!("{p:05}"));
            let f = File::create(&path).map_err(|e| ctx(e, &path))?;
            files.push(BufWriter::with_capacity(1 << 15, f));
        }
        Ok(IdSpill {
            bits,
            memory: Vec::new(),
            files,
            dir: Some(dir),
        })
    }

    /// Adds `id` (adding one twice is fine).
    pub fn insert(&mut self, id: ObjectId) -> Result<()> {
        if self.bits == 0 {
            self.memory.push(id);
            if self.memory.len() >= 1 << 20 && self.memory.len().is_power_of_two() {
                self.memory.sort_unstable();
                self.memory.dedup();
            }
            return Ok(());
        }
        let p = partition_of(self.bits, &id);
        self.files[p]
            .write_all(&id.0)
            .map_err(|e| self.write_error(e))
    }

    /// Adds every id of `ids`.
    pub fn extend(&mut self, ids: impl IntoIterator<Item = ObjectId>) -> Result<()> {
        ids.into_iter().try_for_each(|id| self.insert(id))
    }

    fn write_error(&self, cause: io::Error) -> Error {
        Error::Io {
            op: WRITE_OP,
            path: self.dir.as_ref().map(|d| d.0.clone()).unwrap_or_default(),
            cause,
        }
    }

    /// The finished set.
    pub fn finish(mut self) -> Result<IdSet> {
        for f in &mut self.files {
            if let Err(e) = f.flush() {
                return Err(self.write_error(e));
            }
        }
        self.files.clear();
        self.memory.sort_unstable();
        self.memory.dedup();
        Ok(IdSet {
            bits: self.bits,
            memory: std::mem::take(&mut self.memory),
            dir: self.dir.take(),
        })
    }
}

impl IdSet {
    /// The partitions in id order, each loaded when the iterator reaches it.
    pub fn partitions(&self) -> impl Iterator<Item = Result<Partition>> + '_ {
        (0..1usize << self.bits).map(move |p| {
            let ids = match &self.dir {
                None => self.memory.clone(),
                Some(dir) => read_partition(&dir.0.join(format!("{p:05}")))?,
            };
            Ok(Partition {
                first: first_of(self.bits, p).expect("in range"),
                end: first_of(self.bits, p + 1),
                ids,
            })
        })
    }

    /// Keeps in `ids` only those in the set (reading only the partitions they fall in).
    pub fn retain_members(&self, ids: &mut std::collections::HashSet<ObjectId>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let wanted: std::collections::BTreeSet<usize> =
            ids.iter().map(|id| partition_of(self.bits, id)).collect();
        let mut members: std::collections::HashSet<ObjectId> = std::collections::HashSet::new();
        for (p, part) in self.partitions().enumerate() {
            if !wanted.contains(&p) {
                continue;
            }
            let part = part?;
            members.extend(
                ids.iter()
                    .filter(|id| partition_of(self.bits, id) == p && part.contains(id)),
            );
        }
        ids.retain(|id| members.contains(id));
        Ok(())
    }

    /// How many partitions the set has.
    pub fn partition_count(&self) -> usize {
        1 << self.bits
    }
}

fn read_partition(path: &Path) -> Result<Vec<ObjectId>> {
    let ctx = |cause: io::Error| Error::Io {
        op: "read the temporary id set",
        path: path.to_path_buf(),
        cause,
    };
    let mut f = File::open(path).map_err(ctx)?;
    let len = f.metadata().map_err(ctx)?.len() as usize;
    let mut bytes = vec![0u8; len - len % 32];
    f.read_exact(&mut bytes).map_err(ctx)?;
    let mut ids: Vec<ObjectId> = bytes
        .chunks_exact(32)
        .map(|c| ObjectId(c.try_into().expect("32 bytes")))
        .collect();
    drop(bytes);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Removes partition directories whose process no longer runs (a killed gc's).
fn remove_left_overs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
        let gone = unsafe { libc::kill(pid, 0) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ObjectId {
        ObjectId::of(&n.to_le_bytes())
    }

    fn members(set: &IdSet) -> Vec<ObjectId> {
        let mut out = Vec::new();
        for p in set.partitions() {
            let p = p.unwrap();
            for id in p.ids() {
                assert!(*id >= p.first, "an id below its partition");
                assert!(
                    p.end.is_none_or(|end| *id < end),
                    "an id past its partition"
                );
            }
            out.extend_from_slice(p.ids());
        }
        out
    }

    #[test]
    fn a_spilled_set_holds_each_id_once_in_order_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = IdSpill::new(dir.path(), 5 * PARTITION_IDS).unwrap();
        assert_eq!(spill.bits, 3, "5 partitions' worth rounds up to 8");
        for n in 0..20_000 {
            spill.insert(id(n % 15_000)).unwrap();
        }
        let set = spill.finish().unwrap();
        assert_eq!(set.partition_count(), 8);
        let got = members(&set);
        let mut want: Vec<ObjectId> = (0..15_000).map(id).collect();
        want.sort();
        assert_eq!(got, want);
        let mut asked: std::collections::HashSet<ObjectId> =
            [id(3), id(14_999), id(15_000), id(99_999)]
                .into_iter()
                .collect();
        set.retain_members(&mut asked).unwrap();
        assert_eq!(asked, [id(3), id(14_999)].into_iter().collect());
        drop(set);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "files removed"
        );
    }

    #[test]
    fn a_small_set_stays_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = IdSpill::new(dir.path(), 1000).unwrap();
        spill.extend([id(2), id(1), id(2)]).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let set = spill.finish().unwrap();
        let mut want = vec![id(1), id(2)];
        want.sort();
        assert_eq!(members(&set), want);
        let p = set.partitions().next().unwrap().unwrap();
        assert!(p.contains(&id(1)) && !p.contains(&id(3)));
        assert_eq!((p.first, p.end), (ObjectId([0; 32]), None));
    }

    #[test]
    fn a_killed_runs_files_are_removed_and_a_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // No process has pid 2^22 + 1 (above Linux's pid_max limit).
        let dead = dir.path().join(format!("{DIR_PREFIX}4194305-00"));
        let alive = dir
            .path()
            .join(format!("{DIR_PREFIX}{}-00", std::process::id()));
        fs::create_dir(&dead).unwrap();
        fs::create_dir(&alive).unwrap();
        let _spill = IdSpill::new(dir.path(), 4 * PARTITION_IDS).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
    }
}
