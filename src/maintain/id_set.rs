//! Sets of object ids (and of records filed by object id) larger than memory may hold: gc's
//! live set, check's listed chunks and delta bases, what `stats` learns of each object and the
//! object rows of an index being rebuilt, at any repository size.
//!
//! Object ids are hashes, so their leading bits spread them evenly. A set expected to hold more
//! than [`PARTITION_BYTES`] is cut by those bits into partitions, each an append-only file in a
//! private directory beside the index (in the system's temporary directory when the index's
//! cannot be written); a partition is read, sorted and searched on its own, so memory holds
//! one partition (64 MiB, twice that before an overfull one is split), never the set. A smaller
//! set stays in memory. The records are asked about in order, partition by partition
//! ([`Sorted::partitions`]), which is how the index's rows come when read by id range.

use std::borrow::Cow;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::repo::id::ObjectId;

/// Bytes of records per partition a set aims at (2^21 ids of 32 bytes: 64 MiB when loaded).
pub const PARTITION_BYTES: u64 = 64 << 20;

/// Most partition files open at once while adding (2^9).
const MAX_BITS: u32 = 9;

/// A partition file holding more than this many times its share is split by the next 8 bits
/// of the ids when it is read, so a wrong estimate costs time, never memory.
const SPLIT_OVER: u64 = 2;

/// What a failed write of the partition files says (they need 32 to 44 bytes per object).
const WRITE_OP: &str = "write the temporary id set (32-44 bytes per object of the repository) in";

/// Files of partitions start with this; the rest of their directory's name is the pid of the
/// process that made them, so a later run can remove what a killed one left.
const DIR_PREFIX: &str = "idset-";

/// A fixed-size record filed by its object id: an id alone, or an id with what refers to it.
/// Records are sorted and each kept once, in their `Ord`, which must order by id first.
pub trait Keyed: Copy + Ord {
    /// Encoded length.
    const LEN: usize;
    /// The id it is filed by.
    fn id(&self) -> &ObjectId;
    /// Appends its `LEN` bytes.
    fn put(&self, out: &mut Vec<u8>);
    /// Decodes `LEN` bytes.
    fn get(b: &[u8]) -> Self;
}

impl Keyed for ObjectId {
    const LEN: usize = 32;
    fn id(&self) -> &ObjectId {
        self
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn get(b: &[u8]) -> Self {
        ObjectId(b.try_into().expect("32 bytes"))
    }
}

/// Records being added.
pub struct Spill<R: Keyed> {
    /// Leading bits that choose the partition (0: one partition, in memory).
    bits: u32,
    /// Records per partition aimed at.
    share: u64,
    /// The one partition of a set held in memory.
    memory: Vec<R>,
    /// The partition files of a spilled set.
    files: Vec<BufWriter<File>>,
    dir: Option<SpillDir>,
    parent: PathBuf,
    scratch: Vec<u8>,
    /// The index's filesystem lacks the room for the files: the set stays in memory, as large
    /// as it grows (what gc did before it spilled, and how it frees a full disk).
    memory_only: bool,
}

/// Ids being added.
pub type IdSpill = Spill<ObjectId>;

/// A finished set: records grouped in partitions by their ids' leading bits.
pub struct Sorted<R: Keyed> {
    bits: u32,
    share: u64,
    memory: Vec<R>,
    dir: Option<SpillDir>,
}

/// A finished set of ids.
pub type IdSet = Sorted<ObjectId>;

/// The records of one range of ids, sorted, each once.
pub struct Partition<'a, R: Clone> {
    /// The lowest id the partition can hold.
    pub first: ObjectId,
    /// The lowest id past the partition (`None` for the last one).
    pub end: Option<ObjectId>,
    items: Cow<'a, [R]>,
}

impl<R: Keyed> Partition<'_, R> {
    /// The partition's records, in order.
    pub fn items(&self) -> &[R] {
        &self.items
    }
}

impl Partition<'_, ObjectId> {
    /// Whether `id` (which must fall in this partition's range) is in the set.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.items.binary_search(id).is_ok()
    }

    /// The ids of the partition, in order.
    pub fn ids(&self) -> &[ObjectId] {
        &self.items
    }
}

/// A private directory of partition files, removed when dropped.
struct SpillDir(PathBuf);

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The leading `bits` bits of `id` (at most 32).
fn prefix(bits: u32, id: &ObjectId) -> u64 {
    if bits == 0 {
        0
    } else {
        u64::from(u32::from_be_bytes(id.0[..4].try_into().expect("4 bytes")) >> (32 - bits))
    }
}

/// The lowest id whose leading `bits` bits are `p`, if `p` fits in them.
fn first_of(bits: u32, p: u64) -> Option<ObjectId> {
    if p >= 1u64 << bits {
        return None;
    }
    let mut id = [0u8; 32];
    if bits > 0 {
        id[..4].copy_from_slice(&((p << (32 - bits)) as u32).to_be_bytes());
    }
    Some(ObjectId(id))
}

impl<R: Keyed> Spill<R> {
    /// A set for about `expected` records (more are fine: partitions are split when read),
    /// aiming at 64 MiB of records per partition. When the filesystem of `parent` has less
    /// free space than twice the records' size, the set is held in memory instead.
    /// Partition files go in a new directory under `parent` (the index's directory);
    /// left-overs of killed runs there are removed first.
    pub fn new(parent: &Path, expected: u64) -> Result<Spill<R>> {
        Spill::with_share(
            parent,
            expected,
            crate::maintain::batch(PARTITION_BYTES / R::LEN as u64),
        )
    }

    /// [`Spill::new`] aiming at `share` records per partition (so holding that many at a time).
    pub fn with_share(parent: &Path, expected: u64, share: u64) -> Result<Spill<R>> {
        // What killed runs left, whether or not this set goes to disk.
        remove_left_overs(parent);
        let parts = expected.div_ceil(share).max(1).next_power_of_two();
        let mut spill = Spill {
            bits: 0,
            share,
            memory: Vec::new(),
            files: Vec::new(),
            dir: None,
            parent: parent.to_path_buf(),
            scratch: Vec::with_capacity(R::LEN),
            memory_only: false,
        };
        // Twice the records' size: a partition read back may be split into copies.
        let room = crate::space::free_bytes(parent).unwrap_or(u64::MAX);
        spill.memory_only = room < expected.saturating_mul(2 * R::LEN as u64) + (64 << 20);
        let bits = parts.trailing_zeros().min(MAX_BITS);
        if bits > 0 && !spill.memory_only {
            spill.move_to_disk(bits)?;
        }
        Ok(spill)
    }

    /// Moves the set to `2^bits` partition files; keeps it in memory when no directory can be
    /// made for them (see [`new_dir`]).
    fn move_to_disk(&mut self, bits: u32) -> Result<()> {
        let ctx = |cause: io::Error, p: &Path| Error::Io {
            op: WRITE_OP,
            path: p.to_path_buf(),
            cause,
        };
        let dir = match new_dir(&self.parent) {
            Ok(dir) => SpillDir(dir),
            Err((_, cause)) if read_only(&cause) => {
                self.memory_only = true;
                return Ok(());
            }
            Err((path, cause)) => return Err(ctx(cause, &path)),
        };
        for p in 0..1usize << bits {
            let path = dir.0.join(format!("{p:05}"));
            let f = File::create(&path).map_err(|e| ctx(e, &path))?;
            self.files.push(BufWriter::with_capacity(1 << 15, f));
        }
        self.bits = bits;
        self.dir = Some(dir);
        for r in std::mem::take(&mut self.memory) {
            self.insert(r)?;
        }
        Ok(())
    }

    /// Adds `r` (adding one twice is fine).
    pub fn insert(&mut self, r: R) -> Result<()> {
        if self.dir.is_none() {
            self.memory.push(r);
            if self.memory.len() as u64 >= 2 * self.share && self.memory.len().is_power_of_two() {
                self.memory.sort_unstable();
                self.memory.dedup();
                // More distinct records than one partition holds: to disk after all.
                if self.memory.len() as u64 > self.share && !self.memory_only {
                    let parts = (self.memory.len() as u64 * 4).div_ceil(self.share);
                    self.move_to_disk(parts.next_power_of_two().trailing_zeros().min(MAX_BITS))?;
                }
            }
            return Ok(());
        }
        let p = prefix(self.bits, r.id()) as usize;
        self.scratch.clear();
        r.put(&mut self.scratch);
        self.files[p]
            .write_all(&self.scratch)
            .map_err(|e| self.write_error(e))
    }

    /// Adds every record of `items`.
    pub fn extend(&mut self, items: impl IntoIterator<Item = R>) -> Result<()> {
        items.into_iter().try_for_each(|r| self.insert(r))
    }

    fn write_error(&self, cause: io::Error) -> Error {
        Error::Io {
            op: WRITE_OP,
            path: self.dir.as_ref().map(|d| d.0.clone()).unwrap_or_default(),
            cause,
        }
    }

    /// The finished set.
    pub fn finish(mut self) -> Result<Sorted<R>> {
        for f in &mut self.files {
            if let Err(e) = f.flush() {
                return Err(self.write_error(e));
            }
        }
        self.files.clear();
        self.memory.sort_unstable();
        self.memory.dedup();
        Ok(Sorted {
            bits: self.bits,
            share: self.share,
            memory: std::mem::take(&mut self.memory),
            dir: self.dir.take(),
        })
    }
}

impl<R: Keyed> Sorted<R> {
    /// The partitions in id order, each read when the iterator reaches it (a partition file
    /// over its share is split by the next 8 id bits first).
    pub fn partitions(&self) -> impl Iterator<Item = Result<Partition<'_, R>>> + '_ {
        let mut pending: std::collections::VecDeque<(PathBuf, u32, u64)> = match &self.dir {
            None => Default::default(),
            Some(dir) => (0..1u64 << self.bits)
                .map(|p| (dir.0.join(format!("{p:05}")), self.bits, p))
                .collect(),
        };
        let mut memory = self.dir.is_none().then_some(&self.memory[..]);
        std::iter::from_fn(move || {
            if let Some(items) = memory.take() {
                return Some(Ok(Partition {
                    first: ObjectId([0; 32]),
                    end: None,
                    items: Cow::Borrowed(items),
                }));
            }
            loop {
                let (path, bits, p) = pending.pop_front()?;
                let len = match fs::metadata(&path) {
                    Ok(m) => m.len() / R::LEN as u64,
                    Err(cause) => return Some(Err(read_error(&path, cause))),
                };
                if len > SPLIT_OVER * self.share && bits + 8 <= 32 {
                    match split::<R>(&path, bits, p) {
                        Ok(children) => {
                            for c in children.into_iter().rev() {
                                pending.push_front(c);
                            }
                            continue;
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                return Some(read_partition::<R>(&path).map(|items| Partition {
                    first: first_of(bits, p).expect("in range"),
                    end: first_of(bits, p + 1),
                    items: Cow::Owned(items),
                }));
            }
        })
    }

    /// How many partitions the set was filed in.
    pub fn partition_count(&self) -> usize {
        1 << self.bits
    }

    /// Records per partition aimed at.
    pub fn share(&self) -> u64 {
        self.share
    }
}

impl IdSet {
    /// Keeps in `ids` only those in the set (reading every partition once).
    pub fn retain_members(&self, ids: &mut std::collections::HashSet<ObjectId>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut members: std::collections::HashSet<ObjectId> = std::collections::HashSet::new();
        for part in self.partitions() {
            let part = part?;
            members.extend(ids.iter().filter(|id| part.contains(id)));
        }
        ids.retain(|id| members.contains(id));
        Ok(())
    }
}

/// Splits partition file `path` (ids with leading `bits` bits equal to `p`) into 256 files by
/// the next 8 bits (made again at each pass over the set; the directory goes as a whole).
fn split<R: Keyed>(path: &Path, bits: u32, p: u64) -> Result<Vec<(PathBuf, u32, u64)>> {
    let children: Vec<(PathBuf, u32, u64)> = (0..256u64)
        .map(|c| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{c:03}"));
            (PathBuf::from(name), bits + 8, (p << 8) | c)
        })
        .collect();
    let mut out = Vec::with_capacity(256);
    for (child, _, _) in &children {
        let f = File::create(child).map_err(|cause| Error::Io {
            op: WRITE_OP,
            path: child.clone(),
            cause,
        })?;
        out.push(BufWriter::with_capacity(1 << 14, f));
    }
    let mut f =
        io::BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| read_error(path, e))?);
    let mut rec = vec![0u8; R::LEN];
    loop {
        match f.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(read_error(path, e)),
        }
        let id = R::get(&rec);
        let c = (prefix(bits + 8, id.id()) & 0xff) as usize;
        out[c].write_all(&rec).map_err(|cause| Error::Io {
            op: WRITE_OP,
            path: children[c].0.clone(),
            cause,
        })?;
    }
    for (w, (child, _, _)) in out.iter_mut().zip(&children) {
        w.flush().map_err(|cause| Error::Io {
            op: WRITE_OP,
            path: child.clone(),
            cause,
        })?;
    }
    Ok(children)
}

fn read_error(path: &Path, cause: io::Error) -> Error {
    Error::Io {
        op: "read the temporary id set",
        path: path.to_path_buf(),
        cause,
    }
}

fn read_partition<R: Keyed>(path: &Path) -> Result<Vec<R>> {
    let mut f = File::open(path).map_err(|e| read_error(path, e))?;
    let len = f.metadata().map_err(|e| read_error(path, e))?.len() as usize;
    let mut bytes = vec![0u8; len - len % R::LEN];
    f.read_exact(&mut bytes).map_err(|e| read_error(path, e))?;
    let mut items: Vec<R> = bytes.chunks_exact(R::LEN).map(R::get).collect();
    drop(bytes);
    items.sort_unstable();
    items.dedup();
    Ok(items)
}

/// Removes partition directories whose process no longer runs (a killed gc's).
/// Whether `e` says the place cannot be written at all (a read-only mount, no permission),
/// rather than that this write failed.
fn read_only(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied
    )
}

/// A new private directory for partition files under `parent` (the index's directory) or,
/// when that cannot be written (a read-only repository checked or counted where it lies), under
/// the system's temporary directory. The error names the place tried first.
fn new_dir(parent: &Path) -> std::result::Result<PathBuf, (PathBuf, io::Error)> {
    let name = format!("{DIR_PREFIX}{}-{:016x}", std::process::id(), rand_u64());
    let first = parent.join(&name);
    match fs::create_dir(&first) {
        Ok(()) => Ok(first),
        Err(e) if read_only(&e) => {
            let temp = std::env::temp_dir();
            remove_left_overs(&temp);
            let second = temp.join(&name);
            fs::create_dir(&second)
                .map(|()| second)
                .map_err(|_| (first, e))
        }
        Err(e) => Err((first, e)),
    }
}

fn remove_left_overs(parent: &Path) {
    crate::fsutil::remove_dirs_of_dead_processes(parent, DIR_PREFIX)
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
        let mut last_end = Some(ObjectId([0; 32]));
        for p in set.partitions() {
            let p = p.unwrap();
            assert_eq!(Some(p.first), last_end, "partitions must tile the id space");
            for id in p.ids() {
                assert!(*id >= p.first, "an id below its partition");
                assert!(
                    p.end.is_none_or(|end| *id < end),
                    "an id past its partition"
                );
            }
            last_end = p.end;
            out.extend_from_slice(p.ids());
        }
        assert_eq!(last_end, None, "the last partition ends the id space");
        out
    }

    fn sorted(range: std::ops::Range<u64>) -> Vec<ObjectId> {
        let mut v: Vec<ObjectId> = range.map(id).collect();
        v.sort();
        v
    }

    #[test]
    fn a_spilled_set_holds_each_id_once_in_order_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = IdSpill::with_share(dir.path(), 5000, 1000).unwrap();
        assert_eq!(spill.bits, 3, "5 partitions' worth rounds up to 8");
        for n in 0..7000 {
            spill.insert(id(n % 5000)).unwrap();
        }
        let set = spill.finish().unwrap();
        assert_eq!(set.partition_count(), 8);
        // Twice: a second pass sees the same.
        assert_eq!(members(&set), sorted(0..5000));
        assert_eq!(members(&set), sorted(0..5000));
        let mut asked: std::collections::HashSet<ObjectId> =
            [id(3), id(4999), id(5000), id(99_999)]
                .into_iter()
                .collect();
        set.retain_members(&mut asked).unwrap();
        assert_eq!(asked, [id(3), id(4999)].into_iter().collect());
        drop(set);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "files removed"
        );
    }

    #[test]
    fn a_small_set_stays_in_memory_and_a_larger_one_than_expected_moves_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = IdSpill::with_share(dir.path(), 10, 1000).unwrap();
        spill.extend([id(2), id(1), id(2)]).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let set = spill.finish().unwrap();
        assert_eq!(members(&set), sorted(1..3));
        let p = set.partitions().next().unwrap().unwrap();
        assert!(p.contains(&id(1)) && !p.contains(&id(3)));

        let mut spill = IdSpill::with_share(dir.path(), 10, 1000).unwrap();
        spill.extend((0..5000).map(id)).unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "moved to disk"
        );
        let set = spill.finish().unwrap();
        assert!(set.partition_count() > 1);
        assert_eq!(members(&set), sorted(0..5000));
    }

    #[test]
    fn an_overfull_partition_is_split_when_read() {
        let dir = tempfile::tempdir().unwrap();
        // Two partitions for 2000 expected at 1000 each; ten times as many come.
        let mut spill = IdSpill::with_share(dir.path(), 2000, 1000).unwrap();
        assert_eq!(spill.bits, 1);
        spill.extend((0..20_000).map(id)).unwrap();
        let set = spill.finish().unwrap();
        let parts: Vec<usize> = set.partitions().map(|p| p.unwrap().ids().len()).collect();
        assert_eq!(parts.len(), 2 * 256, "each half split by 8 more bits");
        assert!(parts.iter().all(|&n| n < 1000));
        assert_eq!(members(&set), sorted(0..20_000));
        assert_eq!(
            members(&set),
            sorted(0..20_000),
            "and again on a second pass"
        );
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
        let _spill = IdSpill::with_share(dir.path(), 4000, 1000).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
    }
}
