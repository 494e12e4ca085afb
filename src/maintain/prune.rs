//! Prune: apply retention policies to the generations of a repository, remove the ones no rule
//! keeps, and say why each kept one was kept; or ([`forget`]) remove generations named one by
//! one.
//!
//! Removal is one index transaction that also records a tombstone object (written to a sealed
//! pack first): an index rebuilt from the pack files later skips the removed generations
//! whose manifests still sit in a pack. Removing a generation frees nothing by itself; `gc`
//! deletes what no remaining generation references.

use std::collections::{BTreeMap, HashSet};

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;

use crate::error::{Advice, Error, Result, Setting};
use crate::maintain::retention::{apply, Policy, PolicyFile};
use crate::progress::Progress;
use crate::repo::id::ObjectId;
use crate::repo::index::GenerationInfo;
use crate::repo::manifest::format_time;
use crate::repo::manifest::{RemovedGeneration, Tombstone, MANIFEST_VERSION};
use crate::repo::object::ObjectKind;
use crate::repo::store::Store;
use crate::repo::Repository;

/// Where the policy comes from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// One policy from the command line, for every VM in scope.
    Rules(Policy),
    /// A policy file (default plus per-VM sections).
    File(PolicyFile),
}

/// Options of a prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// VMs to consider (empty: all).
    pub vms: Vec<String>,
    /// The policy.
    pub policy: PolicySource,
    /// Buckets in the local time zone (`TZ`) instead of UTC.
    pub local_time: bool,
    /// Accept a policy that keeps nothing (removes every generation of the VM).
    pub allow_empty: bool,
    /// Report only.
    pub dry_run: bool,
}

/// The verdict on one generation.
#[derive(Clone, Debug, Serialize)]
pub struct PruneEntry {
    /// `vm@time`.
    pub generation: String,
    /// Kept or removed.
    pub keep: bool,
    /// Rules that kept it (`daily #1`), empty when removed.
    pub reasons: Vec<String>,
    /// Bytes its ingest stored (what it cost when it came in).
    pub bytes_stored: u64,
}

/// A VM and the policy applied to it.
#[derive(Clone, Debug, Serialize)]
pub struct VmVerdict {
    /// VM name.
    pub vm: String,
    /// The policy, described (`daily 7, weekly 4`), or why it was left alone.
    pub policy: String,
    /// False when no rule applies to the VM: it is never touched.
    pub applied: bool,
    /// Its generations, newest first.
    pub generations: Vec<PruneEntry>,
}

/// What prune decided and did.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Per VM, by name.
    pub vms: Vec<VmVerdict>,
    /// Generations kept.
    pub kept: u64,
    /// Generations removed (or that would be, with `dry_run`).
    pub removed: u64,
    /// Objects that no remaining generation references after the removal.
    pub objects_unreferenced: u64,
    /// Their pack bytes: what `gc` can free.
    pub bytes_unreferenced: u64,
}

/// Applies the policy and (unless `dry_run`) removes the generations it does not keep. The
/// repository must be open with the exclusive lock.
pub fn prune(
    repo: &Repository,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    if let PolicySource::Rules(p) = &opts.policy {
        if p.is_empty() && !opts.allow_empty {
            return Err(Advice::new("this policy keeps nothing: give at least one ")
                .setting(Setting::KeepRule)
                .text(" or ")
                .setting(Setting::PolicyFile)
                .text(" (use ")
                .setting(Setting::AllowEmpty)
                .text(" to really remove every generation)")
                .into());
        }
    }
    let tz = if opts.local_time {
        TimeZone::system()
    } else {
        TimeZone::UTC
    };
    if !opts.dry_run {
        if let Some(note) = repo.release_reserve_if_full() {
            progress.note(&note);
        }
    }
    let all = repo.with_index(|i| i.generations(None))?;
    let mut by_vm: BTreeMap<&str, Vec<&GenerationInfo>> = BTreeMap::new();
    for g in &all {
        by_vm.entry(g.vm.as_str()).or_default().push(g);
    }
    for vm in &opts.vms {
        if !by_vm.contains_key(vm.as_str()) {
            let known: Vec<&str> = by_vm.keys().copied().collect();
            return Err(Error::NotFound(format!(
                "no VM named {vm:?} in the repository (VMs: {})",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        vms: Vec::new(),
        kept: 0,
        removed: 0,
        objects_unreferenced: 0,
        bytes_unreferenced: 0,
    };
    let mut doomed: Vec<GenerationInfo> = Vec::new();
    for (vm, gens) in &by_vm {
        if !opts.vms.is_empty() && !opts.vms.iter().any(|v| v == vm) {
            continue;
        }
        let policy = match &opts.policy {
            PolicySource::Rules(p) => Some(p),
            PolicySource::File(f) => f.for_vm(vm),
        };
        let Some(policy) = policy else {
            report.vms.push(VmVerdict {
                vm: vm.to_string(),
                policy: "no policy for this VM: left alone".into(),
                applied: false,
                generations: gens
                    .iter()
                    .rev()
                    .map(|g| PruneEntry {
                        generation: g.name.clone(),
                        keep: true,
                        reasons: vec!["no policy".into()],
                        bytes_stored: g.bytes_stored,
                    })
                    .collect(),
            });
            report.kept += gens.len() as u64;
            continue;
        };
        if policy.is_empty() && !opts.allow_empty {
            return Err(
                Advice::new(format!("the policy for VM {vm} keeps nothing; give it a "))
                    .setting(Setting::KeepRule)
                    .text(", or use ")
                    .setting(Setting::AllowEmpty)
                    .text(format!(
                        " to really remove all {} of its generations",
                        gens.len()
                    ))
                    .into(),
            );
        }
        let mut times = Vec::with_capacity(gens.len());
        for g in gens {
            let t: Timestamp = g.time.parse().map_err(|_| {
                Error::Corrupt(format!("generation {} has an unreadable time", g.name))
            })?;
            times.push(t);
        }
        let verdicts = apply(policy, &times, &tz);
        let mut entries = Vec::with_capacity(gens.len());
        for v in verdicts {
            let time = format_time(v.time);
            let g = gens
                .iter()
                .find(|g| g.time == time)
                .expect("every verdict is one of the generations");
            if v.keep {
                report.kept += 1;
            } else {
                report.removed += 1;
                doomed.push((*g).clone());
            }
            entries.push(PruneEntry {
                generation: g.name.clone(),
                keep: v.keep,
                reasons: v.reasons,
                bytes_stored: g.bytes_stored,
            });
        }
        report.vms.push(VmVerdict {
            vm: vm.to_string(),
            policy: policy.describe(),
            applied: true,
            generations: entries,
        });
    }
    if doomed.is_empty() {
        return Ok(report);
    }
    (report.objects_unreferenced, report.bytes_unreferenced) =
        remove(repo, &doomed, opts.dry_run, progress)?;
    Ok(report)
}

/// What [`forget`] removed.
#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// The generations removed (or that would be), `vm@time`, oldest first.
    pub removed: Vec<String>,
    /// Objects that no remaining generation references after the removal.
    pub objects_unreferenced: u64,
    /// Their pack bytes: what `gc` can free.
    pub bytes_unreferenced: u64,
}

/// Removes the generations `specs` name, each `VM@TIME` or `VM@-N` (counted before anything
/// is removed), all or none: a spec that names no generation fails before anything changes.
/// A bare VM name is refused (it would mean its newest generation). The repository must be
/// open with the exclusive lock.
pub fn forget(
    repo: &Repository,
    specs: &[String],
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<ForgetReport> {
    let mut doomed: Vec<GenerationInfo> = Vec::new();
    for spec in specs {
        if !spec.contains('@') {
            return Err(Error::Usage(format!(
                "{spec:?} names a VM, not one of its generations: give VM@TIME or VM@-N (see \
                 `vmrepo list REPO {spec}`); to remove generations by age use `vmrepo prune`"
            )));
        }
        let g = repo.with_index(|i| i.resolve(spec))?;
        if !doomed.iter().any(|d| d.manifest == g.manifest) {
            doomed.push(g);
        }
    }
    doomed.sort_by(|a, b| (&a.vm, &a.time).cmp(&(&b.vm, &b.time)));
    if !dry_run {
        if let Some(note) = repo.release_reserve_if_full() {
            progress.note(&note);
        }
    }
    let (objects_unreferenced, bytes_unreferenced) = if doomed.is_empty() {
        (0, 0)
    } else {
        remove(repo, &doomed, dry_run, progress)?
    };
    Ok(ForgetReport {
        dry_run,
        removed: doomed.into_iter().map(|g| g.name).collect(),
        objects_unreferenced,
        bytes_unreferenced,
    })
}

/// Removes `doomed` (unless `dry_run`): a tombstone naming their manifests, stored in a sealed
/// pack, then one index transaction. Returns the objects, and their bytes, that no remaining
/// generation references.
fn remove(
    repo: &Repository,
    doomed: &[GenerationInfo],
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let removed: HashSet<ObjectId> = doomed.iter().map(|g| g.manifest).collect();
    let unreferenced = crate::maintain::gc::unreferenced_after(repo, &removed, progress)?;
    if dry_run {
        return Ok(unreferenced);
    }
    let tombstone = Tombstone {
        version: MANIFEST_VERSION,
        time: format_time(Timestamp::now()),
        removed: doomed
            .iter()
            .map(|g| RemovedGeneration {
                generation: g.name.clone(),
                manifest: g.manifest,
            })
            .collect(),
    };
    let store = Store::new(repo)?;
    let result = store
        .put_blob(ObjectKind::Tombstone, &tombstone.encode())
        .and_then(|_| store.commit_removal(doomed));
    if result.is_err() {
        store.abort();
    }
    result?;
    Ok(unreferenced)
}
