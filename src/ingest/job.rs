//! The nightly job (`vmrepo run JOB.toml`): which VMs to back up into which repository, with
//! which hooks, how many at once, then retention and a partial integrity check — one VM's
//! failure never stops the others. docs/NIGHTLY.md documents the file with examples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::copy::{copy, CopyOptions};
use crate::error::{Error, IoContext, Result, Spelling};
use crate::ingest::hooks::Interrupt;
pub use crate::ingest::options::VmSettings;
use crate::ingest::{ingest, IngestReport, SegmentWorkers};
use crate::maintain::check::{check, ReadData};
use crate::maintain::gc::{gc, GcOptions};
use crate::maintain::prune::{prune, PolicySource, PruneOptions};
use crate::maintain::retention::{Policy, PolicyFile};
use crate::progress::{NoProgress, Progress};
use crate::repo::Repository;
use crate::source::chain::ChainOptions;

fn default_parallel() -> usize {
    1
}

fn default_true() -> bool {
    true
}

/// `[retention]`: prune after the ingests (same rules as `vmrepo prune --policy`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRetention {
    /// Policy for every VM without its own.
    pub default: Option<Policy>,
    /// Per-VM policies by VM name.
    #[serde(default)]
    pub vm: BTreeMap<String, Policy>,
    /// Run gc after pruning (default true).
    #[serde(default = "default_true")]
    pub gc: bool,
    /// Buckets in local time instead of UTC.
    #[serde(default)]
    pub local_time: bool,
}

/// `[check]`: a partial integrity check after everything else.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCheck {
    /// `10%` or `n/m`; `all` reads everything.
    pub read_data_subset: String,
}

/// `[[copy]]`: after retention, copy the repository's generations to another repository
/// (off-site), sending only what it lacks (same as `vmrepo copy`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCopy {
    /// The destination: a repository directory or `s3://BUCKET/PREFIX`.
    pub to: PathBuf,
    /// The destination's passphrase file, when it is encrypted.
    pub password_file: Option<PathBuf>,
    /// A command printing the destination's passphrase, when it is encrypted.
    pub password_command: Option<String>,
    /// Read back and verify what was stored (default true).
    #[serde(default = "default_true")]
    pub verify: bool,
}

/// A job file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// The repository.
    pub repository: PathBuf,
    /// VM directories, .vmx files or disk images; shell globs allowed (`/vmfs/volumes/ds1/*`).
    pub vms: Vec<String>,
    /// Globs of paths to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// How many VMs to ingest at once (default 1, so the datastore is not flooded).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Of those, how many VMs of one vSphere host (`esxi://`, `vcenter://` sources) at once
    /// (default 1: one snapshot and one reader per host at a time).
    #[serde(default = "default_parallel")]
    pub parallel_per_host: usize,
    /// Of those, how many VMs on one datastore of a vSphere host at once (default 1: one
    /// reader per datastore), counted on every datastore the host says a VM uses.
    #[serde(default = "default_parallel")]
    pub parallel_per_datastore: usize,
    /// Seconds between the starts of two VMs' ingests (default 0): with `parallel` above 1,
    /// the datastore meets one new reader at a time.
    #[serde(default)]
    pub stagger: u64,
    /// Seconds to wait for the repository lock (another job, a gc).
    #[serde(default)]
    pub lock_wait: u64,
    /// Directories outside each VM's own whose files the VMs' files may name, for every VM
    /// (`--allow-path`): by default only the VM's directory, /vmfs/volumes on an ESXi host.
    #[serde(default)]
    pub allow_paths: Vec<PathBuf>,
    /// Where files named by absolute datastore paths are found on this host, for every VM
    /// (`--datastore-map`): `["/vmfs/volumes/ds1=/mnt/ds1"]`.
    #[serde(default)]
    pub datastore_map: Vec<String>,
    /// Where to write the JSON status of the run (default: none).
    pub status_file: Option<PathBuf>,
    /// Where to write the run's metrics in the Prometheus text format, for node_exporter's
    /// textfile collector (default: none; `--metrics-file` sets it too).
    pub metrics_file: Option<PathBuf>,
    /// A command (`sh -c`) given the run's JSON status on its standard input, with
    /// `VMREPO_STATUS` = `ok` or `failed`.
    pub notify_command: Option<String>,
    /// E-mail the run's summary through the local sendmail.
    pub email: Option<crate::ingest::notify::Email>,
    /// Settings for every VM.
    #[serde(default)]
    pub defaults: VmSettings,
    /// Per-VM settings, by the VM's directory or file name (without extension), or a vSphere
    /// VM's name.
    #[serde(default)]
    pub vm: BTreeMap<String, VmSettings>,
    /// Retention to apply after the ingests.
    pub retention: Option<JobRetention>,
    /// Partial check to run at the end.
    pub check: Option<JobCheck>,
    /// Repositories to copy the generations to, after retention.
    #[serde(default)]
    pub copy: Vec<JobCopy>,
}

impl JobFile {
    /// Reads and validates a job file.
    pub fn load(path: &Path) -> Result<JobFile> {
        let text = std::fs::read_to_string(path).ctx("read job file", path)?;
        let job: JobFile = toml::from_str(&text)
            .map_err(|e| Error::bad_input(path, format!("not a valid job file: {e}")))?;
        if job.parallel == 0 {
            return Err(Error::bad_input(path, "parallel must be at least 1"));
        }
        if job.parallel_per_host == 0 || job.parallel_per_datastore == 0 {
            return Err(Error::bad_input(
                path,
                "parallel_per_host and parallel_per_datastore must be at least 1",
            ));
        }
        if job.vms.is_empty() {
            return Err(Error::bad_input(path, "`vms` lists no VM to back up"));
        }
        for m in &job.datastore_map {
            ChainOptions::parse_map(m)
                .map_err(|e| Error::bad_input(path, format!("datastore_map: {e}")))?;
        }
        if let Some(c) = &job.check {
            if c.read_data_subset != "all" {
                ReadData::parse_subset(&c.read_data_subset)
                    .map_err(|e| Error::bad_input(path, e))?;
            }
        }
        if let Some(e) = &job.email {
            e.validate().map_err(|e| Error::bad_input(path, e))?;
        }
        Ok(job)
    }

    /// The VM paths the job names, globs expanded, exclusions removed, in order, once each.
    pub fn expand(&self) -> Result<Vec<PathBuf>> {
        let mut excluded = Vec::new();
        for pat in &self.exclude {
            excluded.push(
                glob::Pattern::new(pat)
                    .map_err(|e| Error::Usage(format!("bad exclude pattern {pat:?}: {e}")))?,
            );
        }
        let mut out: Vec<PathBuf> = Vec::new();
        for pat in &self.vms {
            let mut matched = Vec::new();
            // A vSphere folder or pattern is expanded on its host when the job runs.
            if crate::vsphere::is_vsphere(pat) {
                matched.push(PathBuf::from(pat));
            } else if pat.contains(['*', '?', '[']) {
                let paths = glob::glob(pat)
                    .map_err(|e| Error::Usage(format!("bad VM pattern {pat:?}: {e}")))?;
                for p in paths {
                    let p = p.map_err(|e| {
                        let path = e.path().to_path_buf();
                        Error::io("list", path, e.into())
                    })?;
                    matched.push(p);
                }
            } else {
                matched.push(PathBuf::from(pat));
            }
            matched.sort();
            for p in matched {
                if excluded.iter().any(|x| x.matches_path(&p)) || out.contains(&p) {
                    continue;
                }
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The datastore map (checked by [`JobFile::load`]).
    pub fn datastore_map(&self) -> Vec<(PathBuf, PathBuf)> {
        self.datastore_map
            .iter()
            .filter_map(|m| ChainOptions::parse_map(m).ok())
            .collect()
    }

    /// The key under which `[vm.KEY]` settings apply to `path`: its directory or file name
    /// without extension; for a VM on a vSphere host, the VM's name.
    pub fn key_of(path: &Path) -> String {
        if let Some(url) = path
            .to_str()
            .filter(|t| crate::vsphere::is_vsphere(t))
            .and_then(|t| crate::vsphere::SourceUrl::parse(t).ok())
        {
            return url.vm;
        }
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Settings for `path`: its `[vm.KEY]` section over `[defaults]`; `allow_paths` are the
    /// job's, `[defaults]`'s and the VM's together.
    pub fn settings_for(&self, path: &Path) -> VmSettings {
        let d = &self.defaults;
        let mut s = self.own_settings(path);
        let mut allow = self.allow_paths.clone();
        for a in d.allow_paths.iter().chain(&s.allow_paths) {
            if !allow.contains(a) {
                allow.push(a.clone());
            }
        }
        s.allow_paths = allow;
        s
    }

    fn own_settings(&self, path: &Path) -> VmSettings {
        let mut d = self.defaults.clone();
        // `at_snapshot` in [defaults] is for VMware VMs (a directory or .vmx, whose .vmsd
        // says what each snapshot froze); a disk image in the same job (a KVM qcow2) is read
        // as it is. Set it in a [vm.X] section to ask it of an image explicitly.
        // A VM on a vSphere host is read as the snapshot vmrepo takes of it.
        if !names_a_vm(path) || vsphere_host(path).is_some() {
            d.at_snapshot = None;
        }
        let d = &d;
        match self.vm.get(&Self::key_of(path)) {
            None => d.clone(),
            Some(v) => VmSettings {
                pre_command: v.pre_command.clone().or(d.pre_command.clone()),
                post_command: v.post_command.clone().or(d.post_command.clone()),
                hook_timeout: v.hook_timeout.or(d.hook_timeout),
                name: v.name.clone(),
                at_snapshot: v.at_snapshot.clone().or(d.at_snapshot.clone()),
                max_snapshot_age_days: v.max_snapshot_age_days.or(d.max_snapshot_age_days),
                max_chain_depth: v.max_chain_depth.or(d.max_chain_depth),
                strict: v.strict.or(d.strict),
                full_read: v.full_read.or(d.full_read),
                allow_paths: v.allow_paths.clone(),
                tls_thumbprint: v.tls_thumbprint.clone().or(d.tls_thumbprint.clone()),
                tls_ca: v.tls_ca.clone().or(d.tls_ca.clone()),
                source_password_file: v
                    .source_password_file
                    .clone()
                    .or(d.source_password_file.clone()),
                source_password_command: v
                    .source_password_command
                    .clone()
                    .or(d.source_password_command.clone()),
                quiesce: v.quiesce.or(d.quiesce),
            },
        }
    }
}

/// The outcome for one VM.
#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    /// The path from the job.
    pub path: String,
    /// `ok` or `failed`.
    pub status: String,
    /// The ingest, when it ran.
    pub report: Option<IngestReport>,
    /// What went wrong.
    pub error: Option<String>,
    /// Wall-clock seconds including hooks.
    pub seconds: f64,
}

/// The outcome of a run, also written as the status file.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// When the run started, UTC.
    pub started: String,
    /// When it ended, UTC.
    pub finished: String,
    /// The repository.
    pub repository: String,
    /// One entry per VM, in job order.
    pub vms: Vec<VmOutcome>,
    /// Retention: `applied`, `not configured`, or the error.
    pub retention: String,
    /// Generations removed by retention.
    pub removed: u64,
    /// Bytes gc returned to the filesystem.
    pub freed: u64,
    /// Check: `ok`, `damage found: ...`, `not configured`, or the error.
    pub check: String,
    /// One line per `[[copy]]` destination: what was copied, or the error.
    pub copies: Vec<String>,
    /// True when every VM succeeded and retention and check (if configured) are fine.
    pub ok: bool,
    /// Notifications that failed (notify command, e-mail, metrics file), each with why. They
    /// do not change `ok`: the backups are what they are.
    pub notification_errors: Vec<String>,
}

fn now() -> String {
    crate::ingest::format_time(jiff::Timestamp::now())
}

/// Opens the job's repository (passphrase and lock wait from the caller).
pub type Opener<'a> = dyn Fn(&Path, crate::repo::lock::LockMode) -> Result<Repository> + Sync + 'a;

/// How to reach a VM on a vSphere host with its settings (`Ok(None)` for a local path): the
/// command line's, which knows where passwords come from.
pub type Connector<'a> =
    dyn Fn(&Path, &VmSettings) -> Result<Option<crate::vsphere::Connect>> + Sync + 'a;

/// The vSphere host (`host:port`) `path` names, if it is an `esxi://` or `vcenter://` source.
fn vsphere_host(path: &Path) -> Option<String> {
    let text = path.to_str().filter(|t| crate::vsphere::is_vsphere(t))?;
    crate::vsphere::SourceUrl::parse(&crate::vsphere::inventory::selection_address(text))
        .ok()
        .map(|u| u.authority())
}

/// Ingests running now per vSphere host or per datastore, held to a limit: a VM takes its
/// slots all at once (so two VMs never hold some of each other's), and waits while any is
/// full.
struct Slots {
    running: Mutex<BTreeMap<String, usize>>,
    freed: std::sync::Condvar,
    limit: usize,
}

impl Slots {
    fn new(limit: usize) -> Slots {
        Slots {
            running: Mutex::default(),
            freed: std::sync::Condvar::new(),
            limit,
        }
    }

    fn take(&self, keys: &[String]) {
        let mut running = self.running.lock().unwrap();
        while keys
            .iter()
            .any(|k| running.get(k).copied().unwrap_or(0) >= self.limit)
        {
            running = self.freed.wait(running).unwrap();
        }
        for k in keys {
            *running.entry(k.clone()).or_default() += 1;
        }
    }

    fn give_back(&self, keys: &[String]) {
        let mut running = self.running.lock().unwrap();
        for k in keys {
            if let Some(n) = running.get_mut(k) {
                *n -= 1;
            }
        }
        self.freed.notify_all();
    }
}

/// The slot keys of the datastores the VM of `c` uses (`host:port/[ds]`): empty when the
/// limit cannot bind (it is at least `parallel`) or the host cannot say (the ingest then
/// reports why).
fn datastore_keys(job: &JobFile, c: Option<&crate::vsphere::Connect>) -> Vec<String> {
    let Some(c) = c.filter(|_| job.parallel_per_datastore < job.parallel) else {
        return Vec::new();
    };
    let mut keys: Vec<String> = crate::vsphere::inventory::datastores(c)
        .unwrap_or_default()
        .into_iter()
        .map(|ds| format!("{}/[{ds}]", c.url.authority()))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// A job's entry after folders and patterns on vSphere hosts are expanded: a VM to back up,
/// or an entry that could not be expanded, with why.
enum Entry {
    Vm(PathBuf),
    Unexpanded(PathBuf, Error),
}

/// The job's VMs with its vSphere folders and patterns expanded on their hosts (in place, in
/// job order), exclusions applied to what they expand to.
fn expand_on_hosts(job: &JobFile, paths: Vec<PathBuf>, connect: &Connector<'_>) -> Vec<Entry> {
    let excluded: Vec<glob::Pattern> = job
        .exclude
        .iter()
        .filter_map(|p| glob::Pattern::new(p).ok())
        .collect();
    // A VM named twice (by itself and in a folder, say) is backed up once: vSphere addresses
    // are compared as written back from their parts (the port spelled out).
    let canonical = |path: &Path| {
        path.to_str()
            .filter(|t| crate::vsphere::is_vsphere(t))
            .and_then(|t| crate::vsphere::SourceUrl::parse(t).ok())
            .map_or_else(
                || path.to_path_buf(),
                |u| PathBuf::from(u.with_vm(&u.vm_elements())),
            )
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for path in paths {
        let text = path.to_str().unwrap_or("");
        if !crate::vsphere::is_vsphere(text) || !crate::vsphere::inventory::is_selection(text) {
            let key = canonical(&path);
            if !seen.contains(&key) {
                seen.push(key);
                out.push(Entry::Vm(path));
            }
            continue;
        }
        let address = PathBuf::from(crate::vsphere::inventory::selection_address(text));
        let expanded = connect(&address, &job.settings_for(&address)).and_then(|c| {
            let c = c.ok_or_else(|| Error::Usage(format!("{text} is not a vSphere address")))?;
            crate::vsphere::inventory::expand(&c)
        });
        match expanded {
            Ok(vms) => {
                for vm in vms.into_iter().map(PathBuf::from) {
                    let key = canonical(&vm);
                    if excluded.iter().any(|x| x.matches_path(&vm)) || seen.contains(&key) {
                        continue;
                    }
                    seen.push(key);
                    out.push(Entry::Vm(vm));
                }
            }
            Err(e) => out.push(Entry::Unexpanded(path, e)),
        }
    }
    out
}

/// Opens a `[[copy]]` destination (its passphrase as the entry says).
pub type CopyOpener<'a> = dyn Fn(&JobCopy) -> Result<Repository> + Sync + 'a;

/// Runs the job: ingests (at most `parallel` at once), then retention, the copies, and the
/// check.
#[allow(clippy::too_many_arguments)]
pub fn run(
    job: &JobFile,
    open: &Opener<'_>,
    open_copy: &CopyOpener<'_>,
    connect: &Connector<'_>,
    interrupt: &Interrupt,
    workers: &SegmentWorkers,
    progress: &(dyn Progress + Sync),
) -> Result<RunReport> {
    let started = now();
    let paths = expand_on_hosts(job, job.expand()?, connect);
    let repo = open(&job.repository, crate::repo::lock::LockMode::Shared)?;
    let outcomes: Mutex<Vec<Option<VmOutcome>>> = Mutex::new(vec![None; paths.len()]);
    let next = Mutex::new(0usize);
    // When the last VM started (for `stagger`).
    let last_start: Mutex<Option<Instant>> = Mutex::new(None);
    let quiet = NoProgress;
    let hosts = Slots::new(job.parallel_per_host);
    let datastores = Slots::new(job.parallel_per_datastore);
    std::thread::scope(|scope| {
        for _ in 0..job.parallel.min(paths.len()).max(1) {
            scope.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    let i = *n;
                    *n += 1;
                    i
                };
                let path = match paths.get(i) {
                    None => break,
                    Some(Entry::Vm(path)) => path,
                    Some(Entry::Unexpanded(path, e)) => {
                        let e = e.spelled(Spelling::JobFile);
                        progress.note(&format!("failed: {}: {e}", path.display()));
                        outcomes.lock().unwrap()[i] = Some(VmOutcome {
                            path: path.display().to_string(),
                            status: "failed".into(),
                            error: Some(e),
                            report: None,
                            seconds: 0.0,
                        });
                        continue;
                    }
                };
                if job.stagger > 0 {
                    // Each start waits for the previous one plus `stagger`; the lock is held
                    // while waiting so starts stay in job order.
                    let mut last = last_start.lock().unwrap();
                    if let Some(t) = *last {
                        let due = t + std::time::Duration::from_secs(job.stagger);
                        while Instant::now() < due && !interrupt.is_interrupted() {
                            std::thread::sleep(
                                due.saturating_duration_since(Instant::now())
                                    .min(std::time::Duration::from_millis(100)),
                            );
                        }
                    }
                    *last = Some(Instant::now());
                }
                let s = job.settings_for(path);
                let mut opts = s.ingest_options(job.datastore_map(), interrupt, workers);
                let host: Vec<String> = vsphere_host(path).into_iter().collect();
                hosts.take(&host);
                let connected = connect(path, &s);
                let stores = datastore_keys(job, connected.as_ref().ok().and_then(Option::as_ref));
                datastores.take(&stores);
                let began = Instant::now();
                progress.note(&format!("== {}", path.display()));
                let shown: &dyn Progress = if job.parallel == 1 { progress } else { &quiet };
                let result = connected
                    .and_then(|c| {
                        opts.vsphere = c;
                        ingest(&repo, path, &opts, shown)
                    })
                    .map(|mut r| {
                        r.healed = crate::maintain::repair::heal_after_ingest(&repo, shown);
                        r
                    });
                datastores.give_back(&stores);
                hosts.give_back(&host);
                let outcome = match result {
                    Ok(r) => {
                        let hook = r.hook_failure().map(|e| e.to_string());
                        VmOutcome {
                            path: path.display().to_string(),
                            status: if hook.is_none() { "ok" } else { "failed" }.into(),
                            error: hook,
                            report: Some(r),
                            seconds: began.elapsed().as_secs_f64(),
                        }
                    }
                    Err(e) => {
                        let e = e.spelled(Spelling::JobFile);
                        progress.note(&format!("failed: {}: {e}", path.display()));
                        VmOutcome {
                            path: path.display().to_string(),
                            status: "failed".into(),
                            error: Some(e),
                            report: None,
                            seconds: began.elapsed().as_secs_f64(),
                        }
                    }
                };
                outcomes.lock().unwrap()[i] = Some(outcome);
            });
        }
    });
    drop(repo);
    let vms: Vec<VmOutcome> = outcomes
        .into_inner()
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    let mut report = RunReport {
        started,
        finished: String::new(),
        repository: job.repository.display().to_string(),
        ok: vms.iter().all(|v| v.status == "ok"),
        vms,
        retention: "not configured".into(),
        removed: 0,
        freed: 0,
        check: "not configured".into(),
        copies: Vec::new(),
        notification_errors: Vec::new(),
    };

    if let Some(r) = &job.retention {
        let outcome =
            open(&job.repository, crate::repo::lock::LockMode::Exclusive).and_then(|repo| {
                let opts = PruneOptions {
                    vms: Vec::new(),
                    policy: PolicySource::File(PolicyFile {
                        default: r.default.clone(),
                        vm: r.vm.clone(),
                    }),
                    local_time: r.local_time,
                    allow_empty: false,
                    dry_run: false,
                };
                let p = prune(&repo, &opts, &quiet)?;
                report.removed = p.removed;
                if r.gc {
                    report.freed = gc(&repo, &GcOptions::default(), &quiet)?.bytes_freed;
                }
                Ok(())
            });
        report.retention = match outcome {
            Ok(()) => "applied".into(),
            Err(e) => {
                report.ok = false;
                format!("failed: {}", e.spelled(Spelling::JobFile))
            }
        };
    }
    for c in &job.copy {
        let outcome = open(&job.repository, crate::repo::lock::LockMode::Read).and_then(|src| {
            let dst = open_copy(c)?;
            let gens = src.with_index(|i| i.generations(None))?;
            copy(&src, &dst, &gens, &CopyOptions { verify: c.verify }, &quiet)
        });
        let line = match outcome {
            Ok(r) if r.failed.is_empty() => format!(
                "{}: ok ({} generation(s) copied, {} already there)",
                c.to.display(),
                r.copied.len(),
                r.present.len()
            ),
            Ok(r) => {
                report.ok = false;
                format!(
                    "{}: {} generation(s) NOT copied (first: {}: {})",
                    c.to.display(),
                    r.failed.len(),
                    r.failed[0].0,
                    r.failed[0].1
                )
            }
            Err(e) => {
                report.ok = false;
                format!(
                    "{}: failed: {}",
                    c.to.display(),
                    e.spelled(Spelling::JobFile)
                )
            }
        };
        progress.note(&format!("copy to {line}"));
        report.copies.push(line);
    }
    if let Some(c) = &job.check {
        let mode = if c.read_data_subset == "all" {
            ReadData::All
        } else {
            ReadData::parse_subset(&c.read_data_subset).map_err(Error::Usage)?
        };
        let outcome = open(&job.repository, crate::repo::lock::LockMode::Shared)
            .and_then(|repo| check(&repo, mode, &quiet));
        report.check = match outcome {
            Ok(c) if c.ok() => format!("ok ({} objects read)", c.objects_read),
            Ok(c) => {
                report.ok = false;
                format!(
                    "damage found: {} problem(s), {} damaged generation(s); run `vmrepo check`",
                    c.problems.len(),
                    c.damaged.len()
                )
            }
            Err(e) => {
                report.ok = false;
                format!("failed: {}", e.spelled(Spelling::JobFile))
            }
        };
    }
    report.finished = now();
    // The notifications see the run as it ended; what fails among them is in the status file.
    let mut failed = Vec::new();
    if let Some(c) = &job.notify_command {
        if let Err(e) = crate::ingest::notify::run_command(c, &report) {
            failed.push(e.to_string());
        }
    }
    if let Some(e) = &job.email {
        if e.when == crate::ingest::notify::When::Always || !report.ok {
            if let Err(e) = crate::ingest::notify::send_email(e, &report) {
                failed.push(e.to_string());
            }
        }
    }
    if let Some(m) = &job.metrics_file {
        if let Err(e) = crate::ingest::notify::write_metrics(m, &report) {
            failed.push(format!("metrics file: {e}"));
        }
    }
    report.notification_errors = failed;
    if let Some(f) = &job.status_file {
        let text = serde_json::to_vec_pretty(&report).expect("serializable");
        crate::fsutil::write_atomic(f, &text)?;
    }
    Ok(report)
}

/// What a dry run shows for one VM.
#[derive(Clone, Debug, Serialize)]
pub struct DryVm {
    /// The path from the job.
    pub path: String,
    /// The generation name it would get, or the error opening it.
    pub vm: std::result::Result<String, String>,
    /// Disks: slot, createType, virtual and allocated bytes.
    pub disks: Vec<(String, String, u64, u64)>,
    /// Warnings about the source.
    pub warnings: Vec<String>,
    /// Commands it would run.
    pub hooks: Vec<String>,
}

/// True when `path` is a VM directory or a `.vmx`/`.vmtx` file (not a disk image).
fn names_a_vm(path: &Path) -> bool {
    path.is_dir()
        || path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("vmx") || e.eq_ignore_ascii_case("vmtx"))
}

/// Opens every VM of the job without reading its disks: what a run would do.
pub fn dry_run(job: &JobFile) -> Result<Vec<DryVm>> {
    let mut out = Vec::new();
    for path in job.expand()? {
        let s = job.settings_for(&path);
        let hooks = [("pre", &s.pre_command), ("post", &s.post_command)]
            .into_iter()
            .filter_map(|(p, c)| c.as_ref().map(|c| format!("{p}: {c}")))
            .collect();
        let mut d = DryVm {
            path: path.display().to_string(),
            vm: Err(String::new()),
            disks: Vec::new(),
            warnings: Vec::new(),
            hooks,
        };
        if let Some(host) = vsphere_host(&path) {
            // Not contacted: a dry run takes no snapshot.
            d.vm = Ok(s.name.clone().unwrap_or_else(|| JobFile::key_of(&path)));
            d.warnings
                .push(if crate::vsphere::inventory::is_selection(&d.path) {
                    format!(
                        "VMs on the vSphere host {host} named by folder or pattern: listed on \
                         the host when the job runs (a dry run does not contact it)"
                    )
                } else {
                    format!(
                        "a VM on the vSphere host {host}: not contacted by a dry run (the run \
                         takes its snapshot and reads it over HTTPS)"
                    )
                });
            out.push(d);
            continue;
        }
        let opts = crate::vmware::vm::SourceOptions {
            name: s.name.clone(),
            chain: ChainOptions {
                datastore_map: crate::source::confine::with_allowed(
                    job.datastore_map(),
                    &s.allow_paths,
                ),
            },
            // Opened as the run will open it: with the snapshot it will read.
            at_snapshot: s.at_snapshot.clone(),
            staged: None,
        };
        match crate::vmware::vm::open_source_with(&path, &opts) {
            Ok(plan) => {
                for disk in &plan.disks {
                    let size = disk.reader.size();
                    let alloc = crate::source::allocated_bytes(disk.reader.as_ref())?;
                    d.disks
                        .push((disk.slot.clone(), disk.create_type.clone(), size, alloc));
                }
                d.vm = Ok(plan.vm.clone());
                d.warnings = plan.warnings.clone();
            }
            Err(e) => d.vm = Err(e.spelled(Spelling::JobFile)),
        }
        out.push(d);
    }
    Ok(out)
}
