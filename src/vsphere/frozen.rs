//! One VM frozen for a backup: connect and log in, deal with snapshots left behind, take the
//! backup snapshot, stage the VM's files, and remove the snapshot again whatever happens (on
//! success, on error, and through the interrupt token on SIGINT/SIGTERM/SIGHUP).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::api::{self, ServiceContent, VmInfo};
use super::datastore::{split_datastore_path, Datastores};
use super::soap::Soap;
use super::tls::Trust;
use super::url::SourceUrl;
use super::xml::MoRef;
use crate::error::{IoContext, Result};
use crate::progress::Progress;
use crate::shutdown::{OweCleanup, OwedCleanup};
use crate::source::confine::RemoteFiles;
use crate::source::RandomRead;
use crate::vmware::vm::StagedVm;

/// The staging directories in the temporary directory: `vmrepo-vsphere-<pid>-<random>`.
const STAGE_PREFIX: &str = "vmrepo-vsphere-";

/// Every snapshot vmrepo takes is named with this prefix, so a later run finds and removes
/// one a killed run left behind.
pub const SNAPSHOT_PREFIX: &str = "vmrepo-backup-";

/// Small files of a VM's directory copied into the staging directory (disk descriptors are
/// found through the disks).
const SMALL_FILE_EXTENSIONS: &[&str] = crate::vmware::vm::SMALL_FILE_EXTENSIONS;

/// The datastore path of a file a descriptor in `[ds] dir` names: relative names are in that
/// folder; `/vmfs/volumes/DS/...` is on datastore DS. `None` for anything else (the reader
/// reports what it cannot find).
fn datastore_name(folder: &str, named: &str) -> Option<String> {
    if let Some(rest) = named.strip_prefix("/vmfs/volumes/") {
        let (ds, path) = rest.split_once('/')?;
        return (safe_inside(ds) && safe_inside(path)).then(|| format!("[{ds}] {path}"));
    }
    if named.starts_with('/') || !safe_inside(named) {
        return None;
    }
    if folder.ends_with(']') {
        Some(format!("{folder} {named}"))
    } else {
        Some(format!("{folder}/{named}"))
    }
}

/// Copies a VM's files into the staging tree: small ones whole, large ones as placeholders.
struct Stager<'a> {
    soap: &'a Soap,
    stores: Datastores,
    root: PathBuf,
    remote: RemoteFiles,
    seen: HashSet<String>,
    bytes: u64,
    skipped: Vec<String>,
}

impl Stager<'_> {
    /// Where `[ds] path` is staged.
    fn local(&self, name: &str) -> Result<PathBuf> {
        match split_datastore_path(name) {
            Some((ds, path)) if safe_inside(path) && safe_inside(ds) => {
                Ok(self.root.join(ds).join(path))
            }
            _ => Err(self.soap.error(format!(
                "the host names a file {name:?} that is not a plain datastore path"
            ))),
        }
    }

    fn prepare(&mut self, name: &str) -> Result<Option<PathBuf>> {
        if !self.seen.insert(name.to_string()) {
            return Ok(None);
        }
        let path = self.local(name)?;
        let parent = path.parent().unwrap();
        std::fs::create_dir_all(parent).ctx("create", parent)?;
        Ok(Some(path))
    }

    /// Copies a small file whole.
    fn small(&mut self, name: &str, size: u64) -> Result<()> {
        if size > u64::from(crate::vmware::vm::MAX_SMALL_FILE_LEN) {
            self.skipped.push(format!(
                "{name} is {size} bytes, too large to store as one of the VM's small files; \
                 it was not backed up"
            ));
            return Ok(());
        }
        let Some(path) = self.prepare(name)? else {
            return Ok(());
        };
        let bytes = self.stores.read_whole(name, size)?;
        std::fs::write(&path, &bytes).ctx("write", &path)?;
        self.bytes += size;
        Ok(())
    }

    /// A disk file: a descriptor-sized one copied whole, a larger one a placeholder for the
    /// remote file. Its size is asked when not known; a file that does not exist is left out
    /// (the disk reader then says what is missing and who names it).
    fn disk_file(&mut self, name: &str, size: Option<u64>) -> Result<()> {
        if self.seen.contains(name) {
            return Ok(());
        }
        let size = match size {
            Some(s) => s,
            None => match self.stores.size_of(name)? {
                Some(s) => s,
                None => return Ok(()),
            },
        };
        if size <= crate::source::descriptor::MAX_DESCRIPTOR_LEN {
            return self.small(name, size);
        }
        let Some(path) = self.prepare(name)? else {
            return Ok(());
        };
        std::fs::File::create(&path).ctx("create", &path)?;
        let real = std::fs::canonicalize(&path).ctx("resolve", &path)?;
        let file: Arc<dyn RandomRead> = Arc::new(self.stores.open(name, size));
        self.remote.insert(real, file);
        Ok(())
    }

    /// The bytes of a file staged whole (a descriptor), if it was.
    fn local_text(&self, name: &str) -> Option<Vec<u8>> {
        let path = self.local(name).ok()?;
        let real = std::fs::canonicalize(&path).ok()?;
        if self.remote.contains_key(&real) {
            return None;
        }
        std::fs::read(&path).ok()
    }
}

/// How to reach and treat one vSphere source.
#[derive(Clone)]
pub struct Connect {
    /// Which host and VM.
    pub url: SourceUrl,
    /// The user's password.
    pub password: Arc<zeroize::Zeroizing<String>>,
    /// How the host's certificate is checked.
    pub trust: Trust,
    /// Ask VMware Tools to quiesce the guest's filesystems for the snapshot.
    pub quiesce: bool,
    /// Refuse a VM that has snapshots vmrepo did not take.
    pub strict: bool,
    /// Longest wait for one request.
    pub timeout: Duration,
    /// Longest wait for a snapshot to be created or removed.
    pub task_timeout: Duration,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("url", &self.url.to_string())
            .field("trust", &self.trust)
            .field("quiesce", &self.quiesce)
            .field("strict", &self.strict)
            .finish()
    }
}

/// A logged-in connection to a host.
pub(super) struct Session {
    pub(super) soap: Soap,
    pub(super) sc: ServiceContent,
}

/// A VM with vmrepo's snapshot on it and its files staged; [`FrozenVm::release`] removes the
/// snapshot (dropping it unreleased removes it too).
pub struct FrozenVm {
    session: Arc<Session>,
    snapshot: Option<(MoRef, String, Box<dyn OwedCleanup>)>,
    stage: Stage,
    vmx: PathBuf,
    staged: StagedVm,
    /// The VM's name on the host.
    pub vm: String,
    /// What the user should know (snapshots left behind, files not read).
    pub warnings: Vec<String>,
    /// Bytes copied into the staging directory.
    pub staged_bytes: u64,
    counters: Arc<super::datastore::Counters>,
    /// The VM and the disks its backup snapshot froze (for changed-block queries).
    vm_mo: MoRef,
    disks: Vec<api::VmDisk>,
    /// Changed-block tracking is on for the VM.
    pub cbt: bool,
}

/// The private staging directory, removed when dropped.
struct Stage(PathBuf);

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects to `c`'s host and logs in.
pub(super) fn connect(c: &Connect) -> Result<Arc<Session>> {
    let http = super::tls::client(&c.url.authority(), &c.trust, c.timeout)?;
    let soap = Soap::new(http, &c.url.base(), &c.url.authority());
    let sc = ServiceContent::get(&soap)?;
    api::login(&soap, &sc, &c.url.user, &c.password)?;
    Ok(Arc::new(Session { soap, sc }))
}

/// A path inside a datastore that stays inside it (no `..`, not absolute).
fn safe_inside(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

impl FrozenVm {
    /// Connects, finds the VM, removes vmrepo snapshots left behind, warns about (or with
    /// `strict` refuses) others, takes the backup snapshot and stages the VM's files. The
    /// snapshot's removal is owed to `interrupt` from the moment it exists.
    pub fn take(
        c: &Connect,
        interrupt: &dyn OweCleanup,
        progress: &dyn Progress,
    ) -> Result<FrozenVm> {
        let session = connect(c)?;
        let (soap, sc) = (&session.soap, &session.sc);
        progress.note(&format!(
            "connected to {} ({})",
            c.url.authority(),
            sc.full_name
        ));
        let found = api::find_by_path(soap, sc, &c.url.inventory_path)?;
        let vm = match found {
            Some(vm) if vm.kind == "VirtualMachine" => vm,
            Some(other) => {
                return Err(soap.error(format!(
                    "{:?} is a {}, not a VM; a job backs up the VMs below a folder when its \
                     address ends with `/` (or `/*` for those directly in it)",
                    c.url.inventory_path, other.kind
                )))
            }
            None if c
                .url
                .vm_elements()
                .iter()
                .any(|e| e.contains(['*', '?', '['])) =>
            {
                return Err(soap.error(format!(
                    "no VM is named {:?}; a pattern names VMs in a job's `vms` (vmrepo run), \
                     where it is expanded on the host, not here",
                    c.url.inventory_path
                )))
            }
            None => {
                return Err(soap.error(format!(
                    "no VM at {:?}; check the name (it is case-sensitive) and, on vCenter, the \
                     datacenter and folder path",
                    c.url.inventory_path
                )))
            }
        };
        let before = api::vm_info(soap, sc, &vm)?;
        let mut warnings = Vec::new();
        for s in before
            .snapshots
            .iter()
            .filter(|s| s.name.starts_with(SNAPSHOT_PREFIX))
        {
            progress.note(&format!(
                "removing snapshot {:?} (taken {}) that an earlier vmrepo run left behind",
                s.name, s.created
            ));
            api::remove_snapshot(soap, sc, &s.mo, &s.name, c.task_timeout)?;
        }
        let others: Vec<_> = before
            .snapshots
            .iter()
            .filter(|s| !s.name.starts_with(SNAPSHOT_PREFIX))
            .collect();
        if !others.is_empty() {
            let list = others
                .iter()
                .map(|s| format!("{:?} (taken {})", s.name, s.created))
                .collect::<Vec<_>>()
                .join(", ");
            let msg = format!(
                "VM {} has {} snapshot(s) vmrepo did not take: {list}; every snapshot left in \
                 place makes the VM's disks slower and its deltas grow until the datastore fills",
                before.name,
                others.len()
            );
            if c.strict {
                return Err(crate::error::Advice::new(format!(
                    "vSphere {}: refusing to back up (",
                    soap.host()
                ))
                .setting(crate::error::Setting::Strict)
                .text(format!("): {msg}"))
                .into());
            }
            warnings.push(msg);
        }
        // The staging directory is named before the snapshot is taken, so that an interrupt
        // removes it with the snapshot; a killed run's is removed by the next.
        crate::fsutil::remove_dirs_of_dead_processes(&std::env::temp_dir(), STAGE_PREFIX);
        let mut tag = [0u8; 6];
        let _ = getrandom::fill(&mut tag);
        let stage_dir = std::env::temp_dir().join(format!(
            "{STAGE_PREFIX}{}-{}",
            std::process::id(),
            hex::encode(tag)
        ));
        let name = format!(
            "{SNAPSHOT_PREFIX}{}",
            jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ")
        );
        progress.note(&format!("taking snapshot {name:?} of {}", before.name));
        let snap = api::create_snapshot(
            soap,
            sc,
            &vm,
            &name,
            "Taken by vmrepo for a backup; vmrepo removes it when the backup ends, and a later \
             vmrepo run removes it if it was left behind.",
            c.quiesce,
            c.task_timeout,
        )?;
        let guard = {
            let s = session.clone();
            let (mo, n, limit) = (snap.clone(), name.clone(), c.task_timeout);
            let stage = stage_dir.clone();
            interrupt.owe_cleanup(
                &format!("removing snapshot {name:?} of VM {}", before.name),
                Box::new(move || {
                    let _ = std::fs::remove_dir_all(&stage);
                    api::remove_snapshot(&s.soap, &s.sc, &mo, &n, limit).map_err(|e| e.to_string())
                }),
            )
        };
        let mut frozen = FrozenVm {
            session: session.clone(),
            snapshot: Some((snap.clone(), name.clone(), guard)),
            stage: Stage(PathBuf::new()),
            vmx: PathBuf::new(),
            staged: StagedVm {
                files: Arc::default(),
                frozen: Vec::new(),
                snapshot: name.clone(),
                in_use: Default::default(),
            },
            vm: before.name.clone(),
            warnings,
            staged_bytes: 0,
            counters: Arc::default(),
            vm_mo: vm.clone(),
            disks: Vec::new(),
            cbt: false,
        };
        // From here on a failure drops `frozen`, which removes the snapshot.
        let after = api::vm_info(soap, sc, &vm)?;
        let frozen_disks = api::snapshot_disks(soap, sc, &snap)?;
        frozen.stage_files(c, &after, &frozen_disks, stage_dir)?;
        frozen.cbt = after.cbt;
        frozen.disks = frozen_disks;
        Ok(frozen)
    }

    fn stage_files(
        &mut self,
        c: &Connect,
        vm: &VmInfo,
        disks: &[api::VmDisk],
        dir: PathBuf,
    ) -> Result<()> {
        let soap = &self.session.soap;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .ctx("create the staging directory", &dir)?;
        self.stage = Stage(dir.clone());
        let mut stager = Stager {
            soap,
            stores: Datastores {
                agent: super::tls::agent(&c.url.authority(), &c.trust, c.timeout)?,
                base: soap.base().to_string(),
                host: c.url.authority(),
                cookie: soap.cookie(),
                datacenter: c.url.datacenter.clone(),
                counters: self.counters.clone(),
            },
            root: dir.join("vmfs").join("volumes"),
            remote: HashMap::new(),
            seen: HashSet::new(),
            bytes: 0,
            skipped: Vec::new(),
        };
        // The VM's directory: its small files, and its disks' descriptors.
        let folder = vm
            .vmx
            .rsplit_once('/')
            .map(|(f, _)| f.to_string())
            .ok_or_else(|| soap.error(format!("the .vmx path {:?} has no folder", vm.vmx)))?;
        let listed = api::list_folder(soap, &self.session.sc, &vm.mo, &folder, c.task_timeout)?;
        for (name, size) in listed {
            let full = format!("{folder}/{name}");
            let ext = Path::new(&name)
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if SMALL_FILE_EXTENSIONS.contains(&ext.as_str()) {
                stager.small(&full, size)?;
            } else if ext == "vmdk" {
                stager.disk_file(&full, Some(size))?;
            }
        }
        if !stager.seen.contains(&vm.vmx) {
            let size = stager.stores.size_of(&vm.vmx)?.ok_or_else(|| {
                soap.error(format!(
                    "VM {}: its configuration file {} is missing",
                    vm.name, vm.vmx
                ))
            })?;
            stager.small(&vm.vmx, size)?;
        }
        // Every disk file the disks name, wherever it is: descriptors, extents, parents.
        let mut queue: Vec<String> = disks
            .iter()
            .chain(&vm.disks)
            .map(|d| d.file.clone())
            .collect();
        let mut named = HashSet::new();
        while let Some(name) = queue.pop() {
            if !named.insert(name.clone()) || named.len() > 4096 {
                continue;
            }
            stager.disk_file(&name, None)?;
            let Some(text) = stager.local_text(&name) else {
                continue;
            };
            let Ok(d) = crate::source::descriptor::parse(&text, Path::new(&name)) else {
                continue;
            };
            // The descriptor's folder: `[ds] dir`, or `[ds]` at the datastore's top.
            let dir_of = match name.rsplit_once('/') {
                Some((folder, _)) => folder.to_string(),
                None => format!("{}]", name.split(']').next().unwrap_or("")),
            };
            for other in d
                .extents
                .iter()
                .filter_map(|e| e.file.clone())
                .chain(d.parent_hint.clone())
            {
                if let Some(n) = datastore_name(&dir_of, &other) {
                    queue.push(n);
                }
            }
        }
        let local = |name: &str| stager.local(name);
        self.vmx = local(&vm.vmx)?;
        self.staged.frozen = disks
            .iter()
            .map(|d| Ok((d.slot.clone(), local(&d.file)?)))
            .collect::<Result<_>>()?;
        self.warnings.append(&mut stager.skipped);
        self.staged_bytes = stager.bytes;
        self.staged.files = Arc::new(stager.remote);
        Ok(())
    }

    /// The staged .vmx: what the VM-directory reader opens.
    pub fn vmx(&self) -> &Path {
        &self.vmx
    }

    /// The staged VM's remote files and frozen disks.
    pub fn staged(&self) -> &StagedVm {
        &self.staged
    }

    /// The staged root that stands for `/vmfs/volumes` (map absolute datastore paths there).
    pub fn volumes(&self) -> PathBuf {
        self.stage.0.join("vmfs").join("volumes")
    }

    /// Each frozen disk's change id (by slot), when changed-block tracking is on.
    pub fn change_ids(&self) -> std::collections::BTreeMap<String, String> {
        if !self.cbt {
            return Default::default();
        }
        self.disks
            .iter()
            .filter_map(|d| Some((d.slot.clone(), d.change_id.clone()?)))
            .collect()
    }

    /// What changed on the disk at `slot` since `change_id`, as the host's changed-block
    /// tracking says.
    pub fn changed_areas(&self, slot: &str, change_id: &str) -> Result<Vec<std::ops::Range<u64>>> {
        let soap = &self.session.soap;
        let disk = self
            .disks
            .iter()
            .find(|d| d.slot == slot)
            .ok_or_else(|| soap.error(format!("the snapshot has no disk {slot}")))?;
        let Some((snapshot, _, _)) = &self.snapshot else {
            return Err(soap.error("the backup snapshot is gone"));
        };
        api::changed_areas(
            soap,
            &self.vm_mo,
            snapshot,
            &disk.key,
            change_id,
            disk.capacity,
        )
    }

    /// The size of the disk at `slot` as the host gives it.
    pub fn capacity(&self, slot: &str) -> Option<u64> {
        self.disks
            .iter()
            .find(|d| d.slot == slot)
            .map(|d| d.capacity)
    }

    /// Datastore requests sent and bytes received so far.
    pub fn wire(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counters.requests.load(Relaxed),
            self.counters.bytes.load(Relaxed),
        )
    }

    /// The snapshot's name.
    pub fn snapshot_name(&self) -> &str {
        &self.staged.snapshot
    }

    /// Removes the snapshot and logs out. `Err` names the snapshot left behind.
    pub fn release(mut self) -> Result<()> {
        self.remove_snapshot()
    }

    fn remove_snapshot(&mut self) -> Result<()> {
        let Some((_, name, guard)) = self.snapshot.take() else {
            return Ok(());
        };
        let result = match guard.run() {
            // The interrupt took it and removes it, with this session: no logout.
            None => return Ok(()),
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.session.soap.error(format!(
                "the backup snapshot {name:?} of VM {} could not be removed: {e}. Remove it in \
                 the vSphere client (Snapshots > Delete) or with `vim-cmd vmsvc/snapshot.remove`; \
                 the next vmrepo run of this VM removes it too",
                self.vm
            ))),
        };
        api::logout(&self.session.soap, &self.session.sc);
        result
    }
}

impl Drop for FrozenVm {
    fn drop(&mut self) {
        if let Err(e) = self.remove_snapshot() {
            eprintln!("vmrepo: error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_descriptors_become_datastore_paths() {
        assert_eq!(
            datastore_name("[ds1] web", "web-flat.vmdk").as_deref(),
            Some("[ds1] web/web-flat.vmdk")
        );
        assert_eq!(
            datastore_name("[ds1]", "web.vmdk").as_deref(),
            Some("[ds1] web.vmdk")
        );
        assert_eq!(
            datastore_name("[ds1] web", "/vmfs/volumes/ds2/base/base.vmdk").as_deref(),
            Some("[ds2] base/base.vmdk")
        );
        assert_eq!(datastore_name("[ds1] web", "../other/x.vmdk"), None);
        assert_eq!(datastore_name("[ds1] web", "/etc/shadow"), None);
    }

    #[test]
    fn staged_paths_stay_inside() {
        assert!(safe_inside("web/web.vmx"));
        assert!(!safe_inside("../etc/passwd"));
        assert!(!safe_inside("/etc/passwd"));
        assert!(!safe_inside("web/../../x"));
        assert!(!safe_inside(""));
    }
}
