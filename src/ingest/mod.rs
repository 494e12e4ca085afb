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
pub mod notify;
pub mod options;
pub mod patch;

mod delta;
mod disk;
mod plan;
mod segment;
mod superseded;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Advice, Error, IoContext, Result, Setting};
use crate::progress::Progress;
use crate::repo::disk_map::segment_range;
use crate::repo::id::ObjectId;
use crate::repo::lock::lock_vm;
pub use crate::repo::manifest::{format_time, Incremental};
use crate::repo::manifest::{Catalog, FileEntry, IngestStats, Manifest};
use crate::repo::object::{ObjectKind, MAX_OBJECT_LEN};
use crate::repo::store::Store;
use crate::repo::Repository;
use crate::vmware::vm::{open_source_with, SourceOptions, SourcePlan};
pub use options::IngestOptions;
pub use segment::SegmentWorkers;

use disk::ingest_disk;
use plan::{load_base, load_chain_base, plan_reuse, Base};

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
    /// A VM read over the vSphere API whose backup snapshot could not be removed: what to do
    /// about it. The generation is recorded regardless.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_left_behind: Option<String>,
    /// A VM read over the vSphere API: the datastore requests sent and the bytes received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_traffic: Option<crate::backend::Traffic>,
    /// A repository in object storage: requests made and bytes moved since it was opened (for
    /// `vmrepo ingest`, the whole command up to the commit: opening, bringing the cache level,
    /// locks, uploads). `None` for a directory.
    pub transfer: Option<crate::backend::Traffic>,
}

impl IngestReport {
    /// The post-command's failure, if it failed (the generation is recorded regardless).
    /// Or the backup snapshot on a vSphere host could not be removed.
    pub fn hook_failure(&self) -> Option<Error> {
        self.hooks
            .iter()
            .find(|h| !h.ok())
            .map(|h| h.error())
            .or_else(|| self.snapshot_left_behind.clone().map(Error::Hook))
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
    if let (Some(c), None) = (&opts.vsphere, &opts.staged) {
        return ingest_vsphere(repo, c, opts, progress);
    }
    let began = Instant::now();
    let started = jiff::Timestamp::now();
    let chain_opts = crate::source::chain::ChainOptions {
        datastore_map: opts.datastore_map.clone(),
    };
    let mut preflight = Vec::new();
    // A staged remote VM was checked through its host's API (snapshots left behind).
    if let Some(limits) = opts.limits.as_ref().filter(|_| opts.staged.is_none()) {
        // A chain that cannot be walked is reported by the ingest itself, with its reason.
        if let Ok(found) = crate::vmware::preflight::check(path, &chain_opts, limits) {
            if !found.is_empty() && opts.strict {
                return Err(
                    Advice::new(format!("refusing to back up {} (", path.display()))
                        .setting(Setting::Strict)
                        .text(format!("): {}", found.join("; ")))
                        .into(),
                );
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
            staged: opts.staged.clone(),
        },
    )?;
    let mut plan = plan;
    if let Some(staged) = &opts.staged {
        plan.disks = plan
            .disks
            .into_iter()
            .map(|d| match staged.in_use.get(&d.slot) {
                Some((size, areas)) if *size == d.reader.size() => crate::vmware::vm::DiskPlan {
                    reader: Box::new(crate::source::InUse::new(d.reader, areas.clone())),
                    ..d
                },
                Some((size, _)) => {
                    progress.note(&format!(
                        "warning: disk {}: the host says it holds {size} bytes, its files {}; \
                         reading all of it",
                        d.slot,
                        d.reader.size()
                    ));
                    d
                }
                None => d,
            })
            .collect();
    }
    if let Some(limit) = opts.workers.read_limit() {
        plan.disks = plan
            .disks
            .into_iter()
            .map(|d| crate::vmware::vm::DiskPlan {
                reader: Box::new(crate::source::Limited::new(d.reader, limit.clone())),
                ..d
            })
            .collect();
    }
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
                return Err(Advice::new(format!(
                    "VM {} already has a generation at {t}; pick another ",
                    plan.vm
                ))
                .setting(Setting::Time)
                .into());
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
            snapshot_left_behind: None,
            host_traffic: None,
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
            transfer: repo.backend().traffic(),
        }),
        Err(e) => {
            store.abort();
            Err(e)
        }
    }
}

/// Ingests a VM on a vSphere host: takes the backup snapshot, reads the staged VM as its
/// snapshot froze it, and removes the snapshot whatever happened.
fn ingest_vsphere(
    repo: &Repository,
    c: &crate::vsphere::Connect,
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<IngestReport> {
    if opts.at_snapshot.is_some() || opts.changes.is_some() {
        return Err(Advice::new(format!("{}: ", c.url))
            .setting(Setting::AtSnapshot)
            .text(" and ")
            .setting(Setting::ChangedRanges)
            .text(
                " are for VM directories; vmrepo takes and reads its own snapshot of a VM on a \
                 vSphere host, and asks the host what changed (changed-block tracking)",
            )
            .into());
    }
    let frozen = crate::vsphere::FrozenVm::take(c, &opts.interrupt, progress)?;
    for w in &frozen.warnings {
        progress.note(&format!("warning: {w}"));
    }
    let mut o = opts.clone();
    o.staged = Some(frozen.staged().clone());
    o.recorded_source = Some(std::path::PathBuf::from(c.url.to_string()));
    o.name = o.name.or_else(|| Some(frozen.vm.clone()));
    o.datastore_map.push((
        std::path::PathBuf::from(crate::source::confine::ESXI_DATASTORES),
        frozen.volumes(),
    ));
    if frozen.cbt && !opts.full_read {
        o.changes = tracked_changes(
            repo,
            &frozen,
            o.name.as_deref().unwrap_or(&frozen.vm),
            progress,
        )?;
        // Disks read in full: only the areas the host says are in use.
        let tracked = o
            .changes
            .as_ref()
            .map(|c| c.per_disk.clone())
            .unwrap_or_default();
        let staged = o.staged.as_mut().expect("set above");
        for slot in frozen
            .change_ids()
            .keys()
            .filter(|s| !tracked.contains_key(*s))
        {
            match frozen.changed_areas(slot, "*") {
                Ok(areas) => {
                    progress.note(&format!(
                        "disk {slot}: changed-block tracking says {} bytes are in use; only \
                         those are read",
                        areas.iter().map(|r| r.end - r.start).sum::<u64>()
                    ));
                    let size = frozen.capacity(slot).unwrap_or(0);
                    staged.in_use.insert(slot.clone(), (size, areas));
                }
                Err(e) => progress.note(&format!(
                    "warning: disk {slot}: changed-block tracking cannot say which areas are \
                     in use ({e}); reading all of it"
                )),
            }
        }
    }
    o.change_ids = frozen.change_ids();
    let warnings = frozen.warnings.clone();
    let vmx = frozen.vmx().to_path_buf();
    let volumes = frozen.volumes();
    // Messages name the host's files, not their staged copies.
    let unstage = |t: &str| crate::vsphere::datastore::unstage(t, &volumes);
    let result = ingest_unhooked(repo, &vmx, &o, progress).map_err(|e| match e {
        Error::Refused(a) => Error::Refused(a.map_text(unstage)),
        Error::Locked(a) => Error::Locked(a.map_text(unstage)),
        e if e.to_string() != unstage(&e.to_string()) => Error::Vsphere {
            host: c.url.authority(),
            what: unstage(&e.to_string()),
        },
        e => e,
    });
    let snapshot = frozen.snapshot_name().to_string();
    let (requests, bytes_down) = frozen.wire();
    let released = frozen.release();
    match (result, released) {
        (Ok(mut r), released) => {
            r.warnings.splice(0..0, warnings);
            r.host_traffic = Some(crate::backend::Traffic {
                requests,
                bytes_up: 0,
                bytes_down,
            });
            r.snapshot_left_behind = released.err().map(|e| e.to_string());
            if r.snapshot_left_behind.is_none() {
                progress.note(&format!("removed snapshot {snapshot:?}"));
            }
            Ok(r)
        }
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(left)) => Err(Error::Hook(format!("{e}; and then {left}"))),
    }
}

/// What changed-block tracking says changed on each disk of a VM on a vSphere host since its
/// latest generation, for the disks whose change id that generation recorded. A disk the host
/// cannot answer for (tracking reset, the VM moved: the change id no longer matches) is read
/// in full, with a warning; `None` when no disk can be read that way.
fn tracked_changes(
    repo: &Repository,
    frozen: &crate::vsphere::FrozenVm,
    vm: &str,
    progress: &dyn Progress,
) -> Result<Option<crate::ingest::changes::ChangedRanges>> {
    let Some(latest) = repo.with_index(|i| i.latest_time(vm))? else {
        return Ok(None);
    };
    let since = format!("{vm}@{latest}");
    // A previous generation that cannot be read costs a full read, not the backup.
    let before = match repo
        .with_index(|i| i.resolve(&since))
        .and_then(|gen| repo.load_manifest(&gen.manifest))
    {
        Ok(m) => m.catalog.change_ids,
        Err(e) => {
            progress.note(&format!(
                "warning: cannot read {since} to ask what changed since ({e}); reading the \
                 whole VM"
            ));
            return Ok(None);
        }
    };
    let mut per_disk = std::collections::BTreeMap::new();
    for (slot, id) in &before {
        if !frozen.change_ids().contains_key(slot) {
            continue;
        }
        match frozen.changed_areas(slot, id) {
            Ok(areas) => {
                progress.note(&format!(
                    "disk {slot}: changed-block tracking names {} changed bytes in {} areas since {since}",
                    areas.iter().map(|r| r.end - r.start).sum::<u64>(),
                    areas.len()
                ));
                per_disk.insert(slot.clone(), areas);
            }
            Err(e) => progress.note(&format!(
                "warning: disk {slot}: changed-block tracking cannot say what changed since \
                 {since} ({e}); reading the whole disk"
            )),
        }
    }
    if per_disk.is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::ingest::changes::ChangedRanges {
        since: Some(since),
        single: None,
        per_disk,
        source: "vSphere changed-block tracking".into(),
    }))
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
    let cx = segment::SegmentContext::new(store, &counters, progress);
    let mut disks = Vec::new();
    let mut maps = Vec::new();
    let mut cache_rows = Vec::new();
    let mut stats = IngestStats::default();
    let known: Vec<bool> = reuse.iter().map(Option::is_some).collect();
    let previous = delta::previous_maps(repo, &plan.vm, &plan.disks, &known, params.segment_size);
    for ((d, r), p) in plan.disks.iter().zip(&reuse).zip(&previous) {
        let (entry, map, rows) = ingest_disk(
            &cx,
            d,
            r.as_ref(),
            p.as_ref(),
            opts.verify_unchanged,
            &opts.workers,
        )?;
        stats.virtual_bytes += d.reader.size();
        stats.segments_total += map.count();
        disks.push(entry);
        maps.push(map);
        cache_rows.extend(rows);
    }
    progress.finish();
    // Dropping leaves is housekeeping of a cache: a previous generation that cannot be read
    // tonight fails no backup.
    let replaced = superseded::replaced_segments(
        repo,
        &plan.vm,
        time,
        base.map(|b| (b.name.as_str(), &b.manifest)),
        &disks.iter().zip(&maps).collect::<Vec<_>>(),
    )
    .unwrap_or_else(|e| {
        progress.note(&format!(
            "the index keeps the leaves of the segments tonight replaced (a cache; `vmrepo \
             check` tells whether the previous generation is damaged): {e}"
        ));
        Vec::new()
    });

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
            change_ids: opts.change_ids.clone(),
        },
        files,
        disks,
    };
    // Everything but the manifest is written: count it, then store the manifest itself.
    manifest.catalog.stats.bytes_stored = store.bytes_stored();
    manifest.catalog.finished = format_time(jiff::Timestamp::now());
    let manifest_id = store.put_blob(ObjectKind::Manifest, &manifest.encode())?;
    store.commit_generation(manifest_id, &manifest, &cache_rows, &replaced)?;
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
