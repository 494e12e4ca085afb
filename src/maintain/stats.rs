//! What the repository holds and what each VM and generation really costs after
//! deduplication: logical size, the bytes only it references (what removing it would free),
//! the bytes it shares, and the dedup and compression ratios.
//!
//! One walk of the reference graph (manifests, files, disk maps, segments, chunks) files every
//! use of an object (which generation of which VM) by object id, on disk beside the index when
//! there are many (`id_set`); then, one id range at a time, the uses of each object say which
//! generation and VM own it, or that several share it, and the index rows of that range add up
//! the sizes. Metadata is read, never chunk data. Memory follows the largest generation (the
//! chunk lists of its segments and of the night before's), not the repository; the uses take
//! 44 bytes each on disk for the time of the command.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::maintain::id_set::{Keyed, Spill};
use crate::maintain::walk::{Reference, SegmentPlace, Visitor, Walk};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::GenerationInfo;
use crate::repo::manifest::{DiskEntry, DiskMap, Manifest};
use crate::repo::object::{ObjectKind, RECORD_HEADER_LEN};
use crate::repo::Repository;

/// "Referenced by more than one".
const MANY: u32 = u32::MAX;

/// Sizes of a set of stored objects.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Bytes {
    /// Objects.
    pub objects: u64,
    /// Their plaintext bytes (before compression).
    pub raw: u64,
    /// Their bytes in the packs (after compression, with record headers).
    pub stored: u64,
}

impl Bytes {
    fn add(&mut self, raw: u64, stored: u64) {
        self.objects += 1;
        self.raw += raw;
        self.stored += stored;
    }
}

/// One generation's cost.
#[derive(Clone, Debug, Serialize)]
pub struct GenerationStats {
    /// `vm@time`.
    pub generation: String,
    /// Its disks' virtual size.
    pub logical_bytes: u64,
    /// Distinct data chunks it references, and their bytes (before compression).
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Objects only this generation references: what removing it (and a gc) would free.
    pub unique: Bytes,
    /// Chunk bytes it shares with other generations (`chunk_bytes` less its unique chunks).
    pub shared_bytes: u64,
    /// What its ingest added to the repository when it came in.
    pub stored_at_ingest: u64,
}

/// One VM's cost.
#[derive(Clone, Debug, Serialize)]
pub struct VmStats {
    /// The VM's name.
    pub vm: String,
    /// Oldest and newest generation times.
    pub oldest: String,
    pub newest: String,
    /// The sum of its generations' logical sizes.
    pub logical_bytes: u64,
    /// Distinct data chunks its generations reference, and their bytes.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Objects only this VM's generations reference: what removing the VM would free.
    pub unique: Bytes,
    /// Its generations, oldest first.
    pub generations: Vec<GenerationStats>,
}

/// The whole repository.
#[derive(Clone, Debug, Serialize)]
pub struct RepositoryStats {
    /// Generations and VMs in the repository.
    pub generations: u64,
    pub vm_count: u64,
    /// Every object the index lists (what the packs hold, referenced or not).
    pub stored: Bytes,
    /// Objects some generation references.
    pub referenced: Bytes,
    /// The sum of every generation's logical size.
    pub logical_bytes: u64,
    /// The sum of every generation's distinct chunk bytes: what full copies would hold.
    pub chunk_bytes: u64,
    /// chunk bytes / the referenced chunks' raw bytes: how many times each stored chunk byte
    /// is used.
    pub dedup_ratio: f64,
    /// referenced raw / referenced stored bytes.
    pub compression_ratio: f64,
    /// Per VM, by name (only those asked for, when some were).
    pub vms: Vec<VmStats>,
}

/// Who references an object.
#[derive(Clone, Copy)]
struct Owners {
    generation: u32,
    vm: u32,
}

/// [`Use::len`] of an object that is not a chunk.
const NOT_CHUNK: u32 = u32::MAX;

/// One use of an object: generation `generation` (of VM `vm`) references it. Filed on disk by
/// id (see [`Spill`]), so that what refers to each object is gathered one id range at a time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Use {
    id: ObjectId,
    vm: u32,
    generation: u32,
    /// Plaintext length of a chunk, [`NOT_CHUNK`] for other objects.
    len: u32,
}

impl Keyed for Use {
    const LEN: usize = 44;
    fn id(&self) -> &ObjectId {
        &self.id
    }
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        for n in [self.vm, self.generation, self.len] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    fn get(b: &[u8]) -> Self {
        let n = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Use {
            id: ObjectId(b[..32].try_into().expect("32 bytes")),
            vm: n(32),
            generation: n(36),
            len: n(40),
        }
    }
}

/// A segment's distinct data chunks with their lengths, and its base segment (as a delta, with
/// [`NOT_CHUNK`]).
type Chunks = Arc<Vec<(ObjectId, u32)>>;

struct Counter<'a> {
    repo: &'a Repository,
    uses: Spill<Use>,
    generation: u32,
    vm: u32,
    /// Chunk lists of the segments met in this generation and in the one before (a night
    /// shares most of its segments with the night before): memory follows a generation.
    current: HashMap<ObjectId, Chunks>,
    previous: HashMap<ObjectId, Chunks>,
    /// Chunk lists loaded while segments were evaluated, until shown at their place.
    fresh: Mutex<HashMap<ObjectId, Chunks>>,
}

impl Counter<'_> {
    fn touch(&mut self, id: ObjectId, len: u32) -> Result<()> {
        self.uses.insert(Use {
            id,
            vm: self.vm,
            generation: self.generation,
            len,
        })
    }

    fn next_generation(&mut self, generation: u32, vm: u32) {
        self.previous = std::mem::take(&mut self.current);
        self.generation = generation;
        self.vm = vm;
    }

    /// The chunks of segment `id`, from the generations at hand or read again.
    fn chunks(&mut self, id: &ObjectId) -> std::result::Result<Chunks, String> {
        if let Some(c) = self.current.get(id) {
            return Ok(c.clone());
        }
        let c = match self.fresh.get_mut().unwrap().remove(id) {
            Some(c) => c,
            None => match self.previous.remove(id) {
                Some(c) => c,
                None => load_chunks(self.repo, id)?,
            },
        };
        self.current.insert(*id, c.clone());
        Ok(c)
    }
}

fn load_chunks(repo: &Repository, id: &ObjectId) -> std::result::Result<Chunks, String> {
    let (seg, base) = repo.load_segment_with_base(id).map_err(|e| e.to_string())?;
    // A delta's base segment is referenced with it.
    let mut chunks: Vec<(ObjectId, u32)> = seg
        .data_chunks()
        .chain(base.map(|b| (b, NOT_CHUNK)))
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    Ok(Arc::new(chunks))
}

impl Visitor for Counter<'_> {
    /// Why the segment cannot be read, if it cannot.
    type Segment = std::result::Result<(), String>;

    fn reference(&mut self, r: Reference<'_>) -> Result<()> {
        match r {
            Reference::File(f) => self.touch(f.object, NOT_CHUNK),
            Reference::ExtentEdge { id, .. } => self.touch(id, NOT_CHUNK),
        }
    }

    fn disk_map(&mut self, disk: &DiskEntry) -> Result<Option<DiskMap>> {
        self.touch(disk.disk_map, NOT_CHUNK)?;
        Ok(Some(self.repo.load_disk_map(&disk.disk_map)?))
    }

    fn segment(&self, id: &ObjectId, _len: u64) -> Self::Segment {
        let chunks = load_chunks(self.repo, id)?;
        self.fresh.lock().unwrap().insert(*id, chunks);
        Ok(())
    }

    fn segment_at(&mut self, place: SegmentPlace<'_>, verdict: &Self::Segment) -> Result<()> {
        self.touch(place.id, NOT_CHUNK)?;
        let chunks = verdict.clone().and_then(|()| self.chunks(&place.id));
        match chunks {
            Ok(chunks) => {
                for &(c, len) in chunks.iter() {
                    self.touch(c, len)?;
                }
                Ok(())
            }
            Err(e) => Err(Error::Corrupt(format!(
                "segment {} of disk {}: {e}; `vmrepo check` says more",
                place.id.short(),
                place.disk.slot
            ))),
        }
    }
}

/// Counts what the repository holds and what its VMs and generations cost. With `vms`
/// (names), only those VMs are reported, though sharing is judged against every generation.
pub fn stats(
    repo: &Repository,
    vms: &[String],
    progress: &dyn Progress,
) -> Result<RepositoryStats> {
    let mut gens: Vec<GenerationInfo> = repo.with_index(|i| i.generations(None))?;
    gens.sort_by(|a, b| (&a.vm, &a.time).cmp(&(&b.vm, &b.time)));
    let mut vm_names: Vec<String> = gens.iter().map(|g| g.vm.clone()).collect();
    vm_names.dedup();
    for vm in vms {
        if !vm_names.contains(vm) {
            return Err(Error::NotFound(format!(
                "no VM named {vm:?} in the repository (VMs: {})",
                if vm_names.is_empty() {
                    "none".into()
                } else {
                    vm_names.join(", ")
                }
            )));
        }
    }
    // About one use per 16 KiB of every generation's data.
    let expected: u64 = gens.iter().map(|g| g.virtual_bytes >> 14).sum();
    let mut counter = Counter {
        repo,
        uses: Spill::new(repo.index_dir(), expected)?,
        generation: 0,
        vm: 0,
        current: HashMap::new(),
        previous: HashMap::new(),
        fresh: Mutex::new(HashMap::new()),
    };
    let mut walk = Walk::every_place();
    progress.start("stats: walk generations", gens.len() as u64);
    for (i, g) in gens.iter().enumerate() {
        let v = vm_names.binary_search(&g.vm).expect("listed above");
        counter.next_generation(i as u32, v as u32);
        counter.touch(g.manifest, NOT_CHUNK)?;
        let m = repo
            .read_object(&g.manifest)
            .and_then(|b| Manifest::decode(&b).map_err(Error::Corrupt))
            .map_err(|e| {
                Error::Corrupt(format!(
                    "generation {}: its manifest cannot be read ({e}); `vmrepo check` says more",
                    g.name
                ))
            })?;
        walk.manifest_parallel(&mut counter, &m)?;
        progress.advance(1);
    }
    progress.finish();
    let uses = with_base_uses(repo, counter.uses.finish()?, expected)?;
    drop(walk);

    // Per generation and per VM: distinct chunks and their bytes; then who owns each object
    // and what it costs, one id range at a time.
    let mut gen_chunks = vec![(0u64, 0u64); gens.len()];
    let mut vm_chunks = vec![(0u64, 0u64); vm_names.len()];
    let mut gen_unique = vec![Bytes::default(); gens.len()];
    let mut gen_unique_chunk_raw = vec![0u64; gens.len()];
    let mut vm_unique = vec![Bytes::default(); vm_names.len()];
    let mut stored = Bytes::default();
    let mut referenced = Bytes::default();
    let mut referenced_chunk_raw = 0u64;
    progress.start("stats: add up", uses.partition_count() as u64);
    for part in uses.partitions() {
        let part = part?;
        let owners = owners_of(part.items(), &mut gen_chunks, &mut vm_chunks);
        repo.with_index(|index| {
            index.for_each_object_in_range(&part.first, part.end.as_ref(), |loc| {
                let raw = u64::from(loc.header.raw_len);
                let size = RECORD_HEADER_LEN as u64 + u64::from(loc.header.stored_len);
                stored.add(raw, size);
                let Ok(at) = owners.binary_search_by(|o| o.0.cmp(&loc.header.id)) else {
                    return Ok(());
                };
                let o = owners[at].1;
                referenced.add(raw, size);
                if loc.header.kind == ObjectKind::Chunk {
                    referenced_chunk_raw += raw;
                }
                if o.generation != MANY {
                    gen_unique[o.generation as usize].add(raw, size);
                    if loc.header.kind == ObjectKind::Chunk {
                        gen_unique_chunk_raw[o.generation as usize] += raw;
                    }
                }
                if o.vm != MANY {
                    vm_unique[o.vm as usize].add(raw, size);
                }
                Ok(())
            })
        })?;
        progress.advance(1);
    }
    progress.finish();

    let mut out_vms = Vec::new();
    for (v, name) in vm_names.iter().enumerate() {
        if !vms.is_empty() && !vms.contains(name) {
            continue;
        }
        let mine: Vec<usize> = (0..gens.len()).filter(|&i| gens[i].vm == *name).collect();
        out_vms.push(VmStats {
            vm: name.clone(),
            oldest: gens[mine[0]].time.clone(),
            newest: gens[*mine.last().expect("a listed VM has generations")]
                .time
                .clone(),
            logical_bytes: mine.iter().map(|&i| gens[i].virtual_bytes).sum(),
            chunks: vm_chunks[v].0,
            chunk_bytes: vm_chunks[v].1,
            unique: vm_unique[v].clone(),
            generations: mine
                .iter()
                .map(|&i| GenerationStats {
                    generation: gens[i].name.clone(),
                    logical_bytes: gens[i].virtual_bytes,
                    chunks: gen_chunks[i].0,
                    chunk_bytes: gen_chunks[i].1,
                    unique: gen_unique[i].clone(),
                    shared_bytes: gen_chunks[i].1.saturating_sub(gen_unique_chunk_raw[i]),
                    stored_at_ingest: gens[i].bytes_stored,
                })
                .collect(),
        });
    }
    let chunk_bytes: u64 = gen_chunks.iter().map(|c| c.1).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(RepositoryStats {
        generations: gens.len() as u64,
        vm_count: vm_names.len() as u64,
        dedup_ratio: ratio(chunk_bytes, referenced_chunk_raw),
        compression_ratio: ratio(referenced.raw, referenced.stored),
        stored,
        referenced,
        logical_bytes: gens.iter().map(|g| g.virtual_bytes).sum(),
        chunk_bytes,
        vms: out_vms,
    })
}

/// `uses` with a use of each delta's base wherever the delta is used (as an object, not as a
/// chunk's data): a delta is read with its base, so gc keeps the base as long as the delta
/// ([`crate::maintain::mark::with_bases`]), and what removing a generation would free must
/// count it the same way. Filed again only when some delta is used.
fn with_base_uses(
    repo: &Repository,
    uses: crate::maintain::id_set::Sorted<Use>,
    expected: u64,
) -> Result<crate::maintain::id_set::Sorted<Use>> {
    // At most one base use per use: sized for that, the set goes to disk from the start when
    // it could outgrow a partition, instead of growing in memory until it does.
    let mut extra = Spill::new(repo.index_dir(), expected)?;
    let mut added = 0u64;
    for part in uses.partitions() {
        let part = part?;
        let items = part.items();
        repo.with_index(|index| {
            index.for_each_delta_in_range(&part.first, part.end.as_ref(), |id, base| {
                let at = items.partition_point(|u| u.id < id);
                for u in items[at..].iter().take_while(|u| u.id == id) {
                    extra.insert(Use {
                        id: base,
                        len: NOT_CHUNK,
                        ..*u
                    })?;
                    added += 1;
                }
                Ok(())
            })
        })?;
    }
    if added == 0 {
        return Ok(uses);
    }
    let extra = extra.finish()?;
    let mut all = Spill::new(repo.index_dir(), expected + added)?;
    for part in uses.partitions() {
        all.extend(part?.items().iter().copied())?;
    }
    for part in extra.partitions() {
        all.extend(part?.items().iter().copied())?;
    }
    all.finish()
}

/// Who owns each object of one id range, from its uses (sorted by id, then VM, then
/// generation, each once); adds each distinct chunk to the counts of every generation and VM
/// that uses it.
fn owners_of(
    uses: &[Use],
    gen_chunks: &mut [(u64, u64)],
    vm_chunks: &mut [(u64, u64)],
) -> Vec<(ObjectId, Owners)> {
    let mut owners: Vec<(ObjectId, Owners)> = Vec::new();
    for group in uses.chunk_by(|a, b| a.id == b.id) {
        let mut o = Owners {
            generation: group[0].generation,
            vm: group[0].vm,
        };
        let mut last_vm = None;
        for u in group {
            if u.len != NOT_CHUNK {
                let len = u64::from(u.len);
                let g = &mut gen_chunks[u.generation as usize];
                *g = (g.0 + 1, g.1 + len);
                if last_vm != Some(u.vm) {
                    let v = &mut vm_chunks[u.vm as usize];
                    *v = (v.0 + 1, v.1 + len);
                    last_vm = Some(u.vm);
                }
            }
            if u.generation != o.generation {
                o.generation = MANY;
            }
            if u.vm != o.vm {
                o.vm = MANY;
            }
        }
        owners.push((group[0].id, o));
    }
    owners
}
