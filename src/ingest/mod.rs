//! Ingest: read a VM (or a disk image), cut each disk into segments and chunks in parallel,
//! store what the repository lacks, and commit one generation atomically.
//!
//! Data flow: source reader → per-segment read (holes skipped) → zero runs → fingerprint →
//! (segment cache hit: reuse) or FastCDC + BLAKE3 → new chunks compressed into packs →
//! segment objects → disk maps → manifest → one index transaction. A change-aware ingest takes
//! untouched segments from the previous generation and patches touched ones around their
//! changes ([`crate::ingest::patch`]) when it can, reading only the changed bytes and some context.

pub mod changes;
pub mod chunker;
pub mod ghettovcb;
pub mod hooks;
pub mod job;
pub mod options;
pub mod patch;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use blake3::hazmat::ChainingValue;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::ingest::changes::ChangedRanges;
use crate::ingest::chunker::Run;
use crate::progress::Progress;
use crate::repo::config::ChunkerParams;
use crate::repo::disk_map::segment_range;
use crate::repo::id::ObjectId;
use crate::repo::index::CacheRow;
use crate::repo::leaves;
use crate::repo::lock::lock_vm;
pub use crate::repo::manifest::{format_time, Incremental};
use crate::repo::manifest::{
    Catalog, DiskEntry, DiskMap, ExtentFile, FileEntry, IngestStats, Manifest, Segment,
};
use crate::repo::object::{ObjectKind, MAX_OBJECT_LEN};
use crate::repo::store::Store;
use crate::repo::Repository;
use crate::source::DiskReader;
use crate::vmware::vm::{open_source_with, DiskPlan, SourceOptions, SourcePlan};
pub use options::IngestOptions;

/// What an ingest did.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    /// `vm@time`.
    pub generation: String,
    /// The manifest id.
    pub manifest: ObjectId,
    /// Byte and chunk counts.
    pub stats: IngestStats,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Disks ingested.
    pub disks: usize,
    /// Small files stored.
    pub files: usize,
    /// Warnings about the source.
    pub warnings: Vec<String>,
    /// Generations marked damaged that this ingest made whole again: empty from [`ingest`],
    /// filled in by `repair::heal_after_ingest`, which its callers run after it.
    pub healed: Vec<String>,
    /// What a change-aware ingest reused and why it fell back, if it was one.
    pub incremental: Option<Incremental>,
    /// The pre- and post-commands that ran.
    pub hooks: Vec<crate::ingest::hooks::HookRun>,
}

impl IngestReport {
    /// The post-command's failure, if it failed (the generation is recorded regardless).
    pub fn hook_failure(&self) -> Option<Error> {
        self.hooks.iter().find(|h| !h.ok()).map(|h| h.error())
    }
}

/// The VM name hooks see before the source is opened: `--name`, or the directory or file name.
pub fn hook_vm_name(path: &std::path::Path, name: Option<&str>) -> String {
    name.map(str::to_string).unwrap_or_else(|| {
        let p = if path.extension().is_some_and(|e| e == "vmx") {
            path.parent().unwrap_or(path)
        } else {
            path
        };
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

/// Ingests `path` with its pre- and post-commands: a failing pre-command aborts the ingest (no
/// generation); the post-command runs whatever happened, with `VMREPO_STATUS` saying what.
pub fn ingest(
    repo: &Repository,
    path: &std::path::Path,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<IngestReport> {
    let h = &opts.hooks;
    if h.pre.is_none() && h.post.is_none() {
        return ingest_unhooked(repo, path, opts, progress);
    }
    let vm = hook_vm_name(path, opts.name.as_deref());
    // Owed from now on: an interrupt (SIGINT, SIGTERM, SIGHUP) runs it if we cannot.
    let owed = h
        .post
        .as_deref()
        .map(|cmd| opts.interrupt.owe_post(cmd, &vm, path, h.timeout));
    let mut runs = Vec::new();
    let mut result = match &h.pre {
        Some(cmd) => {
            progress.note(&format!("pre-command: {cmd}"));
            match opts
                .interrupt
                .run_hook(cmd, "pre", &vm, path, None, h.timeout)
            {
                Ok(r) if r.ok() => {
                    runs.push(r);
                    Ok(())
                }
                Ok(r) => {
                    let e = r.error();
                    runs.push(r);
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }
        None => Ok(()),
    }
    .and_then(|()| ingest_unhooked(repo, path, opts, progress));
    if let (Some(cmd), Some(owed)) = (&h.post, owed) {
        let status = if result.is_ok() { "success" } else { "failure" };
        if !opts.interrupt.is_interrupted() {
            progress.note(&format!("post-command ({status}): {cmd}"));
        }
        let Some(post) = owed.run(status) else {
            // The interrupt runs the post-command and ends the process; do not race it.
            loop {
                std::thread::park();
            }
        };
        match (&mut result, post) {
            (Ok(_), Ok(r)) => runs.push(r),
            (Ok(_), Err(e)) => {
                progress.note(&format!("warning: {e}"));
            }
            (Err(e), Ok(r)) if !r.ok() => {
                *e = Error::Hook(format!("{e}; and then the {}", r.error()));
                runs.push(r);
            }
            (Err(_), _) => {}
        }
    }
    result.map(|mut r| {
        r.hooks = runs;
        r
    })
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    bytes_data: AtomicU64,
    bytes_new: AtomicU64,
    chunks_total: AtomicU64,
    chunks_new: AtomicU64,
    segments_reused: AtomicU64,
    segments_zero: AtomicU64,
    segments_skipped: AtomicU64,
    segments_verified: AtomicU64,
    segments_patched: AtomicU64,
}

/// Ingests `path` into `repo` as a new generation (without hooks).
fn ingest_unhooked(
    repo: &Repository,
    path: &std::path::Path,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<IngestReport> {
    let began = Instant::now();
    let started = jiff::Timestamp::now();
    let chain_opts = crate::source::chain::ChainOptions {
        datastore_map: opts.datastore_map.clone(),
    };
    let mut preflight = Vec::new();
    if let Some(limits) = &opts.limits {
        // A chain that cannot be walked is reported by the ingest itself, with its reason.
        if let Ok(found) = crate::vmware::preflight::check(path, &chain_opts, limits) {
            if !found.is_empty() && opts.strict {
                return Err(Error::Usage(format!(
                    "refusing to back up {} (--strict): {}",
                    path.display(),
                    found.join("; ")
                )));
            }
            preflight = found;
        }
    }
    let plan = open_source_with(
        path,
        &SourceOptions {
            name: opts.name.clone(),
            chain: crate::source::chain::ChainOptions {
                datastore_map: opts.datastore_map.clone(),
            },
            at_snapshot: opts.at_snapshot.clone(),
        },
    )?;
    let mut plan = plan;
    plan.warnings.extend(preflight);
    for w in &plan.warnings {
        progress.note(&format!("warning: {w}"));
    }
    let _vm_lock = lock_vm(
        &**repo.backend(),
        &plan.vm,
        &repo.keys().name_tag(&plan.vm),
        repo.lock_wait(),
        &|m| progress.note(m),
    )?;
    let time = match opts.time {
        Some(t) => {
            let t = format_time(t);
            if repo.with_index(|i| i.has_generation(&plan.vm, &t))? {
                return Err(Error::Usage(format!(
                    "VM {} already has a generation at {t}; pick another --time",
                    plan.vm
                )));
            }
            t
        }
        None => generation_time(repo, &plan.vm, started)?,
    };
    let base = match &opts.changes {
        Some(c) => Some(load_base(repo, &plan, c, opts.since.as_deref())?),
        None if opts.full_read => None,
        None => load_chain_base(repo, &plan)?,
    };
    let store = Store::new(repo)?;
    match run(
        repo,
        &store,
        &plan,
        &time,
        started,
        base.as_ref(),
        opts,
        progress,
    ) {
        Ok((manifest_id, manifest)) => Ok(IngestReport {
            incremental: manifest.catalog.incremental.clone(),
            hooks: Vec::new(),
            healed: Vec::new(),
            generation: format!("{}@{}", plan.vm, time),
            manifest: manifest_id,
            stats: manifest.catalog.stats.clone(),
            seconds: began.elapsed().as_secs_f64(),
            disks: manifest.disks.len(),
            files: manifest.files.len(),
            warnings: plan.warnings.clone(),
        }),
        Err(e) => {
            store.abort();
            Err(e)
        }
    }
}

/// The generation a change-aware ingest builds on, and the changes.
struct Base<'a> {
    name: String,
    manifest: Manifest,
    /// The changed-ranges list, or `None` to compare snapshot chains with `manifest`'s.
    changes: Option<&'a ChangedRanges>,
}

/// For a VM with snapshot chains and no changed-ranges list: its latest generation, whose
/// recorded chains tell which links tonight's chains add.
fn load_chain_base(repo: &Repository, plan: &SourcePlan) -> Result<Option<Base<'static>>> {
    if !plan.disks.iter().any(|d| d.layout.is_some()) {
        return Ok(None);
    }
    let gen = match repo.with_index(|i| i.resolve(&plan.vm)) {
        Ok(g) => g,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(Base {
        manifest: repo.load_manifest(&gen.manifest)?,
        name: gen.name,
        changes: None,
    }))
}

/// Tonight's chain of `d` against the chain `prev` recorded: if the links `prev` read are
/// unchanged at the bottom of tonight's chain, the ranges the new links on top hold.
fn chain_changes(
    d: &DiskPlan,
    prev: &crate::repo::manifest::DiskEntry,
    since: &str,
) -> Result<Option<std::result::Result<Vec<Range<u64>>, String>>> {
    let Some(now) = &d.layout else {
        return Ok(None);
    };
    let Some(before) = &prev.layout else {
        return Ok(Some(Err(format!(
            "disk {}: {since} did not read it as a snapshot chain",
            d.slot
        ))));
    };
    let (now, before) = (&now.chain, &before.chain);
    if now.len() < before.len() {
        return Ok(Some(Err(format!(
            "disk {}: its chain has {} link(s), {} at {since} (snapshots were consolidated)",
            d.slot,
            now.len(),
            before.len()
        ))));
    }
    let k = now.len() - before.len();
    for (a, b) in now[k..].iter().zip(before) {
        let same = a.file == b.file
            && a.format == b.format
            && a.cid == b.cid
            && a.virtual_size == b.virtual_size
            && a.stamp.is_some()
            && a.stamp == b.stamp;
        if !same {
            return Ok(Some(Err(format!(
                "disk {}: link {} changed since {since} (CID, size or modification time)",
                d.slot, a.file
            ))));
        }
    }
    let mut ranges = Vec::new();
    for level in 0..k {
        match d.reader.link_ranges(level) {
            Some(r) => ranges.extend(r?),
            None => return Ok(None),
        }
    }
    ranges.sort_by_key(|r| r.start);
    Ok(Some(Ok(ranges)))
}

fn load_base<'a>(
    repo: &Repository,
    plan: &SourcePlan,
    changes: &'a ChangedRanges,
    since: Option<&str>,
) -> Result<Base<'a>> {
    let spec = since.or(changes.since.as_deref()).ok_or_else(|| {
        Error::Usage(format!(
            "--changed-ranges {} needs the generation the changes are relative to: pass \
             --since VM@GEN or put \"since\" in the file",
            changes.source
        ))
    })?;
    let gen = repo.with_index(|i| i.resolve(spec))?;
    if gen.vm != plan.vm {
        return Err(Error::Usage(format!(
            "the changes are relative to {}, a generation of another VM than {}",
            gen.name, plan.vm
        )));
    }
    let slots: Vec<&str> = plan.disks.iter().map(|d| d.slot.as_str()).collect();
    let unknown = changes.unknown_slots(&slots);
    if !unknown.is_empty() {
        return Err(Error::BadInput {
            path: changes.source.clone().into(),
            reason: format!(
                "names disk(s) {} that VM {} does not have (its disks: {})",
                unknown.join(", "),
                plan.vm,
                slots.join(", ")
            ),
        });
    }
    Ok(Base {
        manifest: repo.load_manifest(&gen.manifest)?,
        name: gen.name,
        changes: Some(changes),
    })
}

/// Per disk: the previous segment list, which segments the changes touch, the changed ranges
/// (sorted, disjoint), which touched segments can be patched (one data run with its leaves
/// kept), and the previous versions of those, loaded before the workers start (up to
/// [`PRELOAD_MAX`]; the rest are loaded when their turn comes).
struct Reuse {
    segments: DiskMap,
    touched: Vec<Range<u64>>,
    changed: Vec<Range<u64>>,
    patchable: HashSet<u64>,
    preloaded: HashMap<u64, (Segment, Vec<ChainingValue>)>,
}

/// Previous segments a change-aware ingest loads up front, at most (about 12 KiB each). Read
/// before the run writes anything, they cost a few sequential reads; read when their turn
/// comes, each is a random read queued behind the new packs' writeback (0.2 s seen on a
/// shared disk).
const PRELOAD_MAX: usize = 4096;

impl Reuse {
    /// Whether the changes touch segment `i`.
    fn is_touched(&self, i: u64) -> bool {
        let k = self.touched.partition_point(|t| t.end <= i);
        self.touched.get(k).is_some_and(|t| t.start <= i)
    }

    /// The touched segments, in order.
    fn touched(&self) -> impl Iterator<Item = u64> + '_ {
        self.touched.iter().flat_map(|t| t.clone())
    }

    /// The changed ranges that meet `r`.
    fn changed_in(&self, r: &Range<u64>) -> &[Range<u64>] {
        let lo = self.changed.partition_point(|c| c.end <= r.start);
        let hi = self.changed.partition_point(|c| c.start < r.end).max(lo);
        &self.changed[lo..hi]
    }

    /// What touched segment `i` (disk bytes `range`) is expected to be read as: the context
    /// around each change when it can be patched, else all of it.
    fn planned_reads(&self, i: u64, range: Range<u64>, params: &ChunkerParams) -> Vec<Range<u64>> {
        if !self.patchable.contains(&i) {
            return vec![range];
        }
        let (before, after) = crate::ingest::patch::context(params);
        crate::ingest::patch::merged(self.changed_in(&range).iter().map(|c| {
            c.start.saturating_sub(before).max(range.start)..(c.end + after).min(range.end)
        }))
    }
}

fn plan_reuse(
    repo: &Repository,
    base: &Base<'_>,
    d: &DiskPlan,
    disks: usize,
    params: &ChunkerParams,
) -> Result<Option<std::result::Result<Reuse, String>>> {
    let size = d.reader.size();
    let Some(prev) = base.manifest.disks.iter().find(|p| p.slot == d.slot) else {
        return Ok(Some(Err(format!(
            "disk {}: {} has no such disk",
            d.slot, base.name
        ))));
    };
    let ranges = match base.changes {
        Some(c) => match c.for_disk(&d.slot, disks, size)? {
            Some(r) => r,
            None => {
                return Ok(Some(Err(format!(
                    "disk {}: no changed ranges given for it",
                    d.slot
                ))))
            }
        },
        None => match chain_changes(d, prev, &base.name)? {
            None => return Ok(None),
            Some(Err(why)) => return Ok(Some(Err(why))),
            Some(Ok(r)) => r,
        },
    };
    if prev.virtual_size != size {
        return Ok(Some(Err(format!(
            "disk {}: its size changed from {} to {size} bytes since {}",
            d.slot, prev.virtual_size, base.name
        ))));
    }
    let map = repo.load_disk_map(&prev.disk_map)?;
    if map.segment_size != params.segment_size {
        return Ok(Some(Err(format!(
            "disk {}: {} was cut in other segments",
            d.slot, base.name
        ))));
    }
    let touched =
        crate::ingest::changes::touched_segments(&ranges, size, params.segment_size as u64);
    let mut leaves = Vec::new();
    let patchable = repo.with_index(|i| {
        let mut patchable = HashSet::new();
        for t in &touched {
            for k in map.nonzero_in(t.start, t.end) {
                let s = map.get(k);
                if leaves.len() < PRELOAD_MAX {
                    if let Some(cvs) = i.segment_leaves(&s)? {
                        leaves.push((k, cvs));
                        patchable.insert(k);
                    }
                } else if i.has_segment_leaves(&s)? {
                    patchable.insert(k);
                }
            }
        }
        Ok(patchable)
    })?;
    let ids: Vec<ObjectId> = leaves.iter().map(|(k, _)| map.get(*k)).collect();
    let mut preloaded = HashMap::with_capacity(ids.len());
    for ((k, cvs), bytes) in leaves.into_iter().zip(repo.read_objects(&ids)?) {
        let segment = crate::repo::decode_segment(&map.get(k), &bytes)?;
        preloaded.insert(k, (segment, cvs));
    }
    Ok(Some(Ok(Reuse {
        touched,
        segments: map,
        changed: crate::ingest::patch::merged(ranges),
        patchable,
        preloaded,
    })))
}

/// The generation time: now, or one second after the VM's newest generation if that is not
/// older (fast repeated runs, clock steps), so names stay unique and ordered.
fn generation_time(repo: &Repository, vm: &str, now: jiff::Timestamp) -> Result<String> {
    let mut t = format_time(now);
    if let Some(latest) = repo.with_index(|i| i.latest_time(vm))? {
        if latest >= t {
            let parsed: jiff::Timestamp = latest.parse().map_err(|_| {
                Error::Corrupt(format!(
                    "generation time {latest:?} of {vm} is not a timestamp"
                ))
            })?;
            t = format_time(parsed + jiff::SignedDuration::from_secs(1));
        }
    }
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
fn run(
    repo: &Repository,
    store: &Store<'_>,
    plan: &SourcePlan,
    time: &str,
    started: jiff::Timestamp,
    base: Option<&Base<'_>>,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<(ObjectId, Manifest)> {
    let params = repo.config().chunker;
    let counters = Counters::default();
    let mut files = Vec::new();
    for f in &plan.files {
        let data = read_small_file(f)?;
        let object = store.put_blob(ObjectKind::File, &data)?;
        counters
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        files.push(FileEntry {
            name: f.name.clone(),
            size: data.len() as u64,
            object,
        });
    }

    let mut incremental = base.map(|b| Incremental {
        since: b.name.clone(),
        source: match b.changes {
            Some(c) => c.source.clone(),
            None => "snapshot chain".into(),
        },
        ..Default::default()
    });
    let mut reuse = Vec::with_capacity(plan.disks.len());
    for d in &plan.disks {
        reuse.push(match base {
            None => None,
            Some(b) => match plan_reuse(repo, b, d, plan.disks.len(), &params)? {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(why)) => {
                    progress.note(&format!("full read: {why}"));
                    if let Some(i) = incremental.as_mut() {
                        i.full_reads.push(why);
                    }
                    None
                }
            },
        });
    }
    let mut to_read = 0u64;
    let seg = params.segment_size as u64;
    for (d, r) in plan.disks.iter().zip(&reuse) {
        let size = d.reader.size();
        let Some(r) = r else {
            to_read += crate::source::allocated_bytes(d.reader.as_ref())?;
            continue;
        };
        for i in r.touched() {
            let range = segment_range(i, seg, size);
            let patchable = r.patchable.contains(&i);
            for p in r.planned_reads(i, range, &params) {
                if patchable {
                    to_read += p.end - p.start;
                } else {
                    to_read += d
                        .reader
                        .allocated(p)?
                        .iter()
                        .map(|a| a.end - a.start)
                        .sum::<u64>();
                }
            }
        }
    }
    progress.start(&format!("ingest {}", plan.vm), to_read);
    let mut disks = Vec::new();
    let mut cache_rows = Vec::new();
    let mut stats = IngestStats::default();
    for (d, r) in plan.disks.iter().zip(&reuse) {
        let (entry, rows, nseg) = ingest_disk(
            store,
            d,
            &params,
            &counters,
            r.as_ref(),
            opts.verify_unchanged,
            progress,
        )?;
        stats.virtual_bytes += d.reader.size();
        stats.segments_total += nseg;
        disks.push(entry);
        cache_rows.extend(rows);
    }
    progress.finish();

    stats.bytes_read = counters.bytes_read.load(Ordering::Relaxed);
    stats.bytes_data = counters.bytes_data.load(Ordering::Relaxed);
    stats.bytes_new = counters.bytes_new.load(Ordering::Relaxed);
    stats.chunks_total = counters.chunks_total.load(Ordering::Relaxed);
    stats.chunks_new = counters.chunks_new.load(Ordering::Relaxed);
    stats.segments_reused = counters.segments_reused.load(Ordering::Relaxed);
    stats.segments_zero = counters.segments_zero.load(Ordering::Relaxed);
    stats.segments_skipped = counters.segments_skipped.load(Ordering::Relaxed);
    if let Some(i) = incremental.as_mut() {
        i.segments_taken = stats.segments_skipped;
        i.segments_verified = counters.segments_verified.load(Ordering::Relaxed);
        i.segments_patched = counters.segments_patched.load(Ordering::Relaxed);
    }
    // Chain comparison that found nothing to say (no chained disk took part): not incremental.
    if base.is_some_and(|b| b.changes.is_none())
        && incremental
            .as_ref()
            .is_some_and(|i| i.segments_taken == 0 && i.full_reads.is_empty())
    {
        incremental = None;
    }
    let mut manifest = Manifest {
        version: crate::repo::manifest::manifest_version_for(&disks),
        catalog: Catalog {
            vm: plan.vm.clone(),
            time: time.to_string(),
            uuid: plan.uuid.clone(),
            display_name: plan.display_name.clone(),
            source_kind: plan.kind.to_string(),
            source: opts
                .recorded_source
                .as_deref()
                .unwrap_or(&plan.source)
                .to_string_lossy()
                .into_owned(),
            started: format_time(started),
            finished: String::new(),
            vmrepo_version: env!("CARGO_PKG_VERSION").to_string(),
            stats,
            incremental,
        },
        files,
        disks,
    };
    // Everything but the manifest is written: count it, then store the manifest itself.
    manifest.catalog.stats.bytes_stored = store.bytes_stored();
    manifest.catalog.finished = format_time(jiff::Timestamp::now());
    let manifest_id = store.put_blob(ObjectKind::Manifest, &manifest.encode())?;
    store.commit_generation(manifest_id, &manifest, &cache_rows)?;
    Ok((manifest_id, manifest))
}

/// Reads a small file through the descriptor opened when it was checked (a log may still grow
/// meanwhile: what is there now is read).
fn read_small_file(f: &crate::vmware::vm::SmallFile) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let path = &f.path;
    let mut file = &*f.file;
    file.seek(std::io::SeekFrom::Start(0)).ctx("read", path)?;
    let mut data = Vec::new();
    file.take(MAX_OBJECT_LEN as u64 + 1)
        .read_to_end(&mut data)
        .ctx("read", path)?;
    if data.len() as u64 > MAX_OBJECT_LEN as u64 {
        return Err(Error::bad_input(
            path,
            "is larger than 256 MiB; small VM files (.vmx, .nvram, logs, descriptors) are limited to 256 MiB",
        ));
    }
    Ok(data)
}

fn ingest_disk(
    store: &Store<'_>,
    d: &DiskPlan,
    params: &ChunkerParams,
    counters: &Counters,
    reuse: Option<&Reuse>,
    verify_share: f64,
    progress: &dyn Progress,
) -> Result<(DiskEntry, Vec<CacheRow>, u64)> {
    let size = d.reader.size();
    let seg = params.segment_size as u64;
    let nseg = size.div_ceil(seg);
    // How the errors below name the disk: the file the VM knows it by.
    let disk_file = || -> std::path::PathBuf {
        d.layout
            .as_ref()
            .map(|l| l.file.clone())
            .or_else(|| d.descriptor.clone())
            .unwrap_or_else(|| d.slot.clone())
            .into()
    };
    let key = chunker::fingerprint_key(params, store.repo().keys());
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
    let seed = u64::from_le_bytes(seed) | 1;
    // Segments finished, and whether the workers are done (the prefetcher then stops).
    let done = AtomicU64::new(0);
    let finished = std::sync::atomic::AtomicBool::new(false);
    // One segment: taken unread, patched, or read.
    let segment = |i: u64| -> Result<(ObjectId, Option<CacheRow>)> {
        let range = segment_range(i, seg, size);
        if let Some(r) = reuse.filter(|r| !r.is_touched(i)) {
            let prev = r.segments.get(i);
            counters.segments_skipped.fetch_add(1, Ordering::Relaxed);
            if sampled(seed, i, verify_share) {
                verify_unchanged(store, d, range, prev, params, &key, counters)?;
            }
            return Ok((prev, None));
        }
        if let Some(r) = reuse.filter(|r| r.patchable.contains(&i)) {
            let prev = r.segments.get(i);
            let changed = r.changed_in(&range);
            let preloaded = r.preloaded.get(&i);
            let patched = patch_segment(
                store, d, &range, prev, preloaded, changed, params, &key, counters, progress,
            )?;
            if let Some(p) = patched {
                done.fetch_add(1, Ordering::Relaxed);
                return Ok(p);
            }
        }
        let r = ingest_segment(
            store,
            d.reader.as_ref(),
            range,
            params,
            &key,
            counters,
            progress,
        );
        done.fetch_add(1, Ordering::Relaxed);
        r
    };
    // Segments are handed out in disk order, one at a time, to whichever worker is free
    // (`par_bridge`): reads then move through the disk as one front, in the order the
    // prefetcher hints them, instead of one stream per worker at distant offsets.
    // Only the segments worth a visit (see `visits`) are handed out; every other one is all
    // zero, so time and memory follow the disk's data, not its virtual size.
    let work = || {
        let mut results = visits(d.reader.as_ref(), reuse, size, seg, seed, verify_share)
            .par_bridge()
            .map(|i| i.and_then(|i| segment(i).map(|r| (i, r))))
            .collect::<Result<Vec<_>>>()?;
        results.sort_unstable_by_key(|(i, _)| *i);
        Ok::<_, Error>(results)
    };
    let results = std::thread::scope(|scope| {
        if let Some(r) = reuse {
            scope.spawn(|| prefetch_touched(d.reader.as_ref(), r, params, size, &done, &finished));
        }
        let results = match segment_pool() {
            Some(pool) => pool.install(work),
            None => work(),
        };
        finished.store(true, Ordering::Relaxed);
        results
    })?;
    // Segments not visited: all zero (a full ingest), or unchanged and zero before.
    let unvisited = nseg - results.len() as u64;
    match reuse {
        None => counters
            .segments_zero
            .fetch_add(unvisited, Ordering::Relaxed),
        Some(_) => counters
            .segments_skipped
            .fetch_add(unvisited, Ordering::Relaxed),
    };
    let mut entries = Vec::with_capacity(results.len());
    let mut rows = Vec::new();
    for (i, (id, row)) in results {
        entries.push((i, id));
        rows.extend(row);
    }
    let map = DiskMap::new(size, params.segment_size, entries);
    // No object may exceed MAX_OBJECT_LEN (readers refuse larger records).
    if map.encoded_len() > MAX_OBJECT_LEN as u64 {
        return Err(Error::Unsupported {
            what: format!(
                "disk {}: {} of its {} MiB segments hold data, and their list (the disk map, \
                 {} MiB) would exceed the largest object, {} MiB; a disk can hold up to about \
                 {} TiB of data",
                d.slot,
                map.nonzero().len(),
                seg >> 20,
                map.encoded_len() >> 20,
                MAX_OBJECT_LEN >> 20,
                ((MAX_OBJECT_LEN as u64 - 24) / 32 * seg) >> 40
            ),
            path: disk_file(),
        });
    }
    let disk_map = store.put_blob(ObjectKind::DiskMap, &map.encode())?;
    let mut extents = Vec::new();
    for e in &d.extents {
        let (head, tail) = match &e.path {
            Some(p) => {
                store_extent_edges(store, p, e.file_offset, e.file_offset + e.len, e.file_size)?
            }
            None => (None, None),
        };
        extents.push(ExtentFile {
            kind: e.kind.clone(),
            start: e.start,
            len: e.len,
            file: e.name.clone(),
            file_offset: e.file_offset,
            file_size: e.file_size,
            head,
            tail,
        });
    }
    Ok((
        DiskEntry {
            slot: d.slot.clone(),
            descriptor: d.descriptor.clone(),
            create_type: d.create_type.clone(),
            virtual_size: size,
            disk_map,
            extents,
            layout: d.layout.clone(),
        },
        rows,
        nseg,
    ))
}

/// Stores the bytes of an extent file that lie outside the extent (before its offset, after its
/// end) so that restore gives back the file byte for byte.
fn store_extent_edges(
    store: &Store<'_>,
    path: &std::path::Path,
    data_start: u64,
    data_end: u64,
    file_size: u64,
) -> Result<(Option<ObjectId>, Option<ObjectId>)> {
    let read = |r: Range<u64>| -> Result<Option<ObjectId>> {
        if r.is_empty() {
            return Ok(None);
        }
        if r.end - r.start > MAX_OBJECT_LEN as u64 {
            return Err(Error::Unsupported {
                what: format!("{} bytes outside the extent's data", r.end - r.start),
                path: path.to_path_buf(),
            });
        }
        let f = crate::source::FlatFile::open(path)?;
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        f.read_exact_at(&mut buf, r.start)?;
        Ok(Some(store.put_blob(ObjectKind::File, &buf)?))
    };
    Ok((read(0..data_start)?, read(data_end..file_size)?))
}

/// Segments planned together by [`visits`]: one call of `allocated` covers this many.
const VISIT_WINDOW: u64 = 4096;

/// The segments of a disk an ingest must visit, in disk order: where the source may hold data
/// (a full ingest), or, for a change-aware one, the segments the changes touch, those that held
/// data in the base generation (taken unread) and the sample `--verify-unchanged` re-reads
/// among those the source may hold data in. Every other segment is all zero. Planned one window
/// of [`VISIT_WINDOW`] segments at a time, so memory stays small on a huge thin disk.
fn visits<'a>(
    reader: &'a dyn DiskReader,
    reuse: Option<&'a Reuse>,
    size: u64,
    seg: u64,
    seed: u64,
    verify_share: f64,
) -> impl Iterator<Item = Result<u64>> + Send + 'a {
    let nseg = size.div_ceil(seg);
    (0..nseg.div_ceil(VISIT_WINDOW)).flat_map(move |w| {
        let (from, to) = (w * VISIT_WINDOW, ((w + 1) * VISIT_WINDOW).min(nseg));
        let window = || -> Result<Vec<u64>> {
            let mut v = Vec::new();
            if reuse.is_none() || verify_share > 0.0 {
                for a in reader.allocated(from * seg..(to * seg).min(size))? {
                    if a.start < a.end {
                        v.extend(a.start / seg..=(a.end - 1) / seg);
                    }
                }
            }
            if let Some(r) = reuse {
                v.retain(|&i| sampled(seed, i, verify_share));
                let first = r.touched.partition_point(|t| t.end <= from);
                let touched = r.touched[first..].iter().take_while(|t| t.start < to);
                v.extend(touched.flat_map(|t| t.start.max(from)..t.end.min(to)));
                v.extend(r.segments.nonzero_in(from, to));
            }
            v.sort_unstable();
            v.dedup();
            Ok(v)
        };
        match window() {
            Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        }
    })
}

/// How far (in segments) the prefetcher of a change-aware ingest runs ahead of the workers.
const PREFETCH_AHEAD: u64 = 64;

/// A change-aware ingest reads scattered pieces; hinting them to the kernel ahead of the workers
/// (in order, at most [`PREFETCH_AHEAD`] segments ahead of those finished) lets the disk work on
/// several at once while the workers hash and compress. A segment to be patched is hinted as the
/// context around its changes, any other touched segment whole.
fn prefetch_touched(
    reader: &dyn DiskReader,
    reuse: &Reuse,
    params: &ChunkerParams,
    size: u64,
    done: &AtomicU64,
    finished: &std::sync::atomic::AtomicBool,
) {
    let seg = params.segment_size as u64;
    for (issued, i) in reuse.touched().enumerate() {
        while issued as u64 >= done.load(Ordering::Relaxed) + PREFETCH_AHEAD {
            if finished.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        if finished.load(Ordering::Relaxed) {
            return;
        }
        let range = segment_range(i, seg, size);
        for r in reuse.planned_reads(i, range, params) {
            reader.prefetch(r);
        }
    }
}

/// Threads for segments when set by [`limit_threads`].
static THREAD_LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Caps this process at `n` worker threads (`vmrepo --threads N`): the global rayon pool (check,
/// extract, inflate) and the ingest's segment pool both get `n`. Call before any parallel work.
pub fn limit_threads(n: usize) -> std::result::Result<(), rayon::ThreadPoolBuildError> {
    let _ = THREAD_LIMIT.set(n);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
}

/// The threads that read and cut segments: twice as many as cores (at least 4), so that while
/// some wait for the disk (a cold datastore, an NFS mount) the others hash and compress, and the
/// disk sees several requests at once; exactly `--threads` when given. Each holds one segment
/// buffer. `None` (the global pool is used) when the threads cannot be started.
fn segment_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = THREAD_LIMIT
            .get()
            .copied()
            .unwrap_or_else(|| (2 * rayon::current_num_threads()).max(4));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("vmrepo-segment-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

thread_local! {
    static SEGMENT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether segment `i` is in the random sample of the given share (a hash of a per-ingest seed
/// and the index, so the choice is spread evenly and differs between runs).
fn sampled(seed: u64, i: u64, share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x as f64 / u64::MAX as f64) < share
}

/// Reads the allocated parts of `range` into `buf` (widened to zero blocks, gaps zeroed); returns
/// which zero blocks are holes and how many bytes were read.
fn fill_segment(
    buf: &mut [u8],
    reader: &dyn DiskReader,
    range: &Range<u64>,
    alloc: &[Range<u64>],
    zb: usize,
) -> Result<(Vec<bool>, u64)> {
    let len = buf.len();
    let mut hole = vec![true; len.div_ceil(zb)];
    let mut filled = 0usize;
    let mut read = 0u64;
    for r in alloc {
        let s = ((r.start - range.start) as usize / zb * zb).max(filled);
        let e = ((r.end - range.start) as usize)
            .div_ceil(zb)
            .saturating_mul(zb)
            .min(len);
        if s >= e {
            continue;
        }
        buf[filled..s].fill(0);
        reader.read_at(&mut buf[s..e], range.start + s as u64)?;
        hole[s / zb..e.div_ceil(zb)].fill(false);
        read += (e - s) as u64;
        filled = e;
    }
    buf[filled..].fill(0);
    Ok((hole, read))
}

/// `--verify-unchanged`: re-reads a segment the changes say is unchanged and checks it is the
/// segment `prev` of the base generation (same fingerprint, or still all zero).
fn verify_unchanged(
    store: &Store<'_>,
    d: &DiskPlan,
    range: Range<u64>,
    prev: ObjectId,
    params: &ChunkerParams,
    key: &[u8; 32],
    counters: &Counters,
) -> Result<()> {
    let alloc = d.reader.allocated(range.clone())?;
    let len = (range.end - range.start) as usize;
    let mut buf = vec![0u8; len];
    let (hole, read) = fill_segment(
        &mut buf,
        d.reader.as_ref(),
        &range,
        &alloc,
        params.zero_block as usize,
    )?;
    counters.bytes_read.fetch_add(read, Ordering::Relaxed);
    let runs = chunker::runs(&buf, params, |i| hole[i]);
    let now_zero = matches!(runs.as_slice(), [Run::Zero(_)]);
    let same = if prev.is_zero() {
        now_zero
    } else {
        !now_zero
            && store.repo().load_segment(&prev)?.fingerprint
                == chunker::fingerprint(key, &buf, &runs)
    };
    counters.segments_verified.fetch_add(1, Ordering::Relaxed);
    if !same {
        return Err(Error::ChangedOutsideRanges {
            disk: d.slot.clone(),
            start: range.start,
            end: range.end,
        });
    }
    Ok(())
}

fn ingest_segment(
    store: &Store<'_>,
    reader: &dyn DiskReader,
    range: Range<u64>,
    params: &ChunkerParams,
    key: &[u8; 32],
    counters: &Counters,
    progress: &dyn Progress,
) -> Result<(ObjectId, Option<CacheRow>)> {
    let alloc = reader.allocated(range.clone())?;
    if alloc.is_empty() {
        counters.segments_zero.fetch_add(1, Ordering::Relaxed);
        return Ok((ObjectId::ZERO, None));
    }
    let len = (range.end - range.start) as usize;
    let zb = params.zero_block as usize;
    // The buffer is taken out of the thread-local, not borrowed from it: reading a compressed
    // source decompresses in the same rayon pool, and while this worker waits for that it may
    // run another segment, which then finds no buffer and makes its own.
    let mut owned = SEGMENT_BUF.with(|cell| cell.take());
    owned.resize(len, 0);
    let buf = &mut owned[..len];
    let result = (|| {
        // Read the allocated ranges, widened to zero blocks; zero-fill the gaps, which are holes.
        let (hole, read) = fill_segment(buf, reader, &range, &alloc, zb)?;
        counters.bytes_read.fetch_add(read, Ordering::Relaxed);
        progress.advance(read);

        let runs = chunker::runs(buf, params, |i| hole[i]);
        if let [Run::Zero(_)] = runs.as_slice() {
            counters.segments_zero.fetch_add(1, Ordering::Relaxed);
            return Ok((ObjectId::ZERO, None));
        }
        let data_bytes: u64 = runs
            .iter()
            .map(|r| match r {
                Run::Data(d) => (d.end - d.start) as u64,
                Run::Zero(_) => 0,
            })
            .sum();
        counters.bytes_data.fetch_add(data_bytes, Ordering::Relaxed);
        // A one-run segment's fingerprint is hashed leaf by leaf, and the leaves are kept so a
        // later change-aware ingest can patch it (same value as hashing it whole).
        let cvs = match runs.as_slice() {
            [Run::Data(d)] if d.start == 0 && d.end == len => leaves::all(key, buf),
            _ => None,
        };
        let fp = match &cvs {
            Some(c) => leaves::root(key, len, c).expect("leaves of this segment's length"),
            None => chunker::fingerprint(key, buf, &runs),
        };
        let cached = store.repo().with_index(|i| {
            Ok(match i.cached_segment(&fp)? {
                Some(seg) => Some((seg, cvs.is_none() || i.has_segment_leaves(&seg)?)),
                None => None,
            })
        })?;
        if let Some((seg, has_leaves)) = cached {
            counters.segments_reused.fetch_add(1, Ordering::Relaxed);
            // Chunk count of a reused segment is not known without loading it; count data bytes only.
            // A segment stored before leaves were kept gets them now.
            let row = (!has_leaves).then(|| CacheRow {
                fingerprint: fp,
                segment: seg,
                leaves: cvs.as_deref().map(leaves::encode),
            });
            return Ok((seg, row));
        }
        let (extents, cuts) = chunker::cut(buf, &runs, params, store.repo().keys());
        counters
            .chunks_total
            .fetch_add(cuts.len() as u64, Ordering::Relaxed);
        for c in &cuts {
            if store.put(ObjectKind::Chunk, c.id, &buf[c.range.clone()])? {
                counters.chunks_new.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes_new
                    .fetch_add(c.range.len() as u64, Ordering::Relaxed);
            }
        }
        let segment = Segment {
            fingerprint: fp,
            extents,
        };
        let id = store.put_blob(ObjectKind::Segment, &segment.encode())?;
        Ok((
            id,
            Some(CacheRow {
                fingerprint: fp,
                segment: id,
                leaves: cvs.as_deref().map(leaves::encode),
            }),
        ))
    })();
    SEGMENT_BUF.with(|cell| cell.replace(owned));
    result
}

/// A touched segment built from its previous version `prev` (with its leaves: `preloaded`, or
/// loaded now) and the bytes around its `changed` ranges (disk offsets) alone
/// ([`crate::ingest::patch`]); `None` when it must be read whole.
#[allow(clippy::too_many_arguments)]
fn patch_segment(
    store: &Store<'_>,
    d: &DiskPlan,
    range: &Range<u64>,
    prev: ObjectId,
    preloaded: Option<&(Segment, Vec<ChainingValue>)>,
    changed: &[Range<u64>],
    params: &ChunkerParams,
    key: &[u8; 32],
    counters: &Counters,
    progress: &dyn Progress,
) -> Result<Option<(ObjectId, Option<CacheRow>)>> {
    let loaded;
    let (prev_segment, prev_leaves) = match preloaded {
        Some((segment, leaves)) => (segment, leaves),
        None => {
            let Some(leaves) = store.repo().with_index(|i| i.segment_leaves(&prev))? else {
                return Ok(None);
            };
            loaded = (store.repo().load_segment(&prev)?, leaves);
            (&loaded.0, &loaded.1)
        }
    };
    let len = (range.end - range.start) as usize;
    let changed: Vec<Range<usize>> = changed
        .iter()
        .map(|c| {
            (c.start.max(range.start) - range.start) as usize
                ..(c.end.min(range.end) - range.start) as usize
        })
        .collect();
    // Taken out of the thread-local for the same reason as in ingest_segment.
    let mut owned = SEGMENT_BUF.with(|cell| cell.take());
    owned.resize(len, 0);
    let result = (|| {
        let mut source = |dst: &mut [u8], at: usize| -> Result<()> {
            d.reader.read_at(dst, range.start + at as u64)?;
            counters
                .bytes_read
                .fetch_add(dst.len() as u64, Ordering::Relaxed);
            progress.advance(dst.len() as u64);
            Ok(())
        };
        let previous = crate::ingest::patch::Previous {
            segment: prev_segment,
            leaves: prev_leaves,
        };
        let buf = &mut owned[..len];
        let keys = store.repo().keys();
        let Some(p) =
            crate::ingest::patch::patch(buf, previous, &changed, params, keys, key, &mut source)?
        else {
            return Ok(None);
        };
        counters.segments_patched.fetch_add(1, Ordering::Relaxed);
        counters.bytes_data.fetch_add(len as u64, Ordering::Relaxed);
        let fp = p.segment.fingerprint;
        let row = CacheRow {
            fingerprint: fp,
            segment: ObjectId::ZERO,
            leaves: Some(leaves::encode(&p.leaves)),
        };
        if let Some(seg) = store.repo().with_index(|i| i.cached_segment(&fp))? {
            counters.segments_reused.fetch_add(1, Ordering::Relaxed);
            return Ok(Some((
                seg,
                Some(CacheRow {
                    segment: seg,
                    ..row
                }),
            )));
        }
        counters
            .chunks_total
            .fetch_add(p.segment.extents.len() as u64, Ordering::Relaxed);
        for c in &p.cuts {
            if store.put(ObjectKind::Chunk, c.id, &buf[c.range.clone()])? {
                counters.chunks_new.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes_new
                    .fetch_add(c.range.len() as u64, Ordering::Relaxed);
            }
        }
        let id = store.put_blob(ObjectKind::Segment, &p.segment.encode())?;
        Ok(Some((id, Some(CacheRow { segment: id, ..row }))))
    })();
    SEGMENT_BUF.with(|cell| cell.replace(owned));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose reads wait on a parallel loop in the same pool, as the compressed readers
    /// do: while waiting, the worker may run another segment. Segment `i` holds the byte `i + 1`.
    struct Nesting {
        size: u64,
    }

    impl DiskReader for Nesting {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            (0..8u64)
                .into_par_iter()
                .for_each(|_| std::thread::sleep(std::time::Duration::from_millis(2)));
            buf.fill((offset / (4 << 20)) as u8 + 1);
            Ok(())
        }
        fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
            Ok(vec![range])
        }
    }

    #[test]
    fn a_worker_running_another_segment_while_it_reads_keeps_the_buffers_apart() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("repo");
        let params = ChunkerParams::default();
        crate::Repository::init(&path, params, 1, None).unwrap();
        let repo = crate::Repository::open(&path, crate::repo::lock::LockMode::Shared).unwrap();
        let store = Store::new(&repo).unwrap();
        let nseg = 32u64;
        let d = DiskPlan {
            slot: "image".into(),
            descriptor: None,
            create_type: "raw".into(),
            reader: Box::new(Nesting {
                size: nseg * params.segment_size as u64,
            }),
            extents: Vec::new(),
            layout: None,
        };
        let counters = Counters::default();
        let progress = crate::progress::NoProgress;
        let (entry, _, n) = ingest_disk(&store, &d, &params, &counters, None, 0.0, &progress)
            .expect("no worker may trip over another's segment buffer");
        assert_eq!(n, nseg);
        store.flush().unwrap();
        let map = repo.load_disk_map(&entry.disk_map).unwrap();
        // Every segment kept its own bytes: 32 different contents, 32 different segments.
        let distinct: std::collections::HashSet<_> = map.nonzero().map(|(_, s)| s).collect();
        assert_eq!(distinct.len(), nseg as usize);
    }
}
