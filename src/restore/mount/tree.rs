//! The mounted tree: one node per VM directory, generation directory, `latest` link and file,
//! numbered as FUSE inodes; a generation's files are added from its manifest (placed as
//! extract would) when its directory is first listed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};

use crate::error::Result;
use crate::repo::index::GenerationInfo;
use crate::repo::Repository;
use crate::restore::log::{Logger, ServiceLog};
use crate::restore::mount::view::{FilesView, FilesViews, OpenViews, ViewKind};
use crate::restore::reader::{FileSource, LazyDisk, ReadCache};
use crate::vmware::vm::is_safe_relative;

/// How long the kernel may cache names and attributes: the tree never changes while mounted.
pub(super) enum Kind {
    Dir(Vec<(String, u64)>),
    Generation(Arc<GenerationSlot>),
    Link(String),
    File(Arc<Content>),
    /// A directory of a generation's `files/` view (its top, a volume, or inside one).
    GuestDir(Arc<GuestDir>),
    /// A file inside a generation's disks.
    GuestFile(Arc<GuestFile>),
}

/// A generation's files view: opened when its `files/` directory is first listed, closed when
/// other generations' views push it out of [`OpenViews`], opened again on use.
pub(super) struct ViewSlot {
    /// The generation directory's inode: the view's key among the open ones.
    id: u64,
    info: GenerationInfo,
    views: FilesViews,
}

/// A directory of a files view, listed on first use.
pub(super) struct GuestDir {
    slot: Arc<ViewSlot>,
    path: String,
    children: Listing,
}

/// A directory's entries, loaded on first use and kept. A load that fails is not kept: the
/// next use tries again, so a passing fault (a store that did not answer, a pack briefly
/// unreachable) does not leave the directory failing until the mount ends. Two uses never load
/// at once, so a directory's entries are added to the tree once.
#[derive(Default)]
pub(super) struct Listing {
    entries: OnceLock<Vec<(String, u64)>>,
    loading: Mutex<()>,
}

impl Listing {
    /// The entries, loaded by `load` if no earlier use loaded them.
    fn get_or_load(
        &self,
        load: impl FnOnce() -> std::result::Result<Vec<(String, u64)>, String>,
    ) -> std::result::Result<&Vec<(String, u64)>, String> {
        if let Some(e) = self.entries.get() {
            return Ok(e);
        }
        let _one_at_a_time = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.entries.get() {
            return Ok(e);
        }
        let loaded = load()?;
        Ok(self.entries.get_or_init(|| loaded))
    }

    /// The entries, if a use has loaded them.
    fn get(&self) -> Option<&Vec<(String, u64)>> {
        self.entries.get()
    }
}

/// A file of a files view.
pub(super) struct GuestFile {
    slot: Arc<ViewSlot>,
    pub(super) path: String,
    pub(super) size: u64,
}

/// The mode and owner a guest filesystem recorded for an entry of a files view.
pub(super) struct GuestAttr {
    mode: u16,
    uid: u32,
    gid: u32,
}

/// A file's bytes: from the repository, or (a descriptor extract writes afresh, see
/// [`crate::restore::extract::place`]) held in memory.
pub(super) enum Content {
    Stored(FileSource),
    Bytes(Vec<u8>),
}

impl Content {
    pub(super) fn size(&self) -> u64 {
        match self {
            Content::Stored(s) => s.size(),
            Content::Bytes(b) => b.len() as u64,
        }
    }

    /// Fills `out` with the bytes at `offset`; returns how many the file has there.
    pub(super) fn read_into(
        &self,
        repo: &Repository,
        cache: &ReadCache,
        offset: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        match self {
            Content::Stored(s) => s.read_into(repo, cache, offset, out),
            Content::Bytes(b) => {
                let from = (offset.min(b.len() as u64)) as usize;
                let to = from.saturating_add(out.len()).min(b.len());
                out[..to - from].copy_from_slice(&b[from..to]);
                Ok(to - from)
            }
        }
    }

    pub(super) fn seek(&self, from: u64, want_data: bool) -> Result<Option<u64>> {
        match self {
            Content::Stored(s) => s.seek(from, want_data),
            Content::Bytes(b) => {
                Ok(
                    (from < b.len() as u64).then_some(if want_data {
                        from
                    } else {
                        b.len() as u64
                    }),
                )
            }
        }
    }
}

pub(super) struct Node {
    pub(super) parent: u64,
    pub(super) kind: Kind,
    pub(super) mtime: SystemTime,
    /// Inside a files view: the guest's mode and owner (else read-only, owned by the mounter).
    pub(super) guest: Option<GuestAttr>,
}

/// A generation directory, filled from its manifest on first use.
pub(super) struct GenerationSlot {
    pub(super) info: GenerationInfo,
    pub(super) children: Listing,
}

/// The filesystem handed to fuser.
pub(super) struct RepoFs {
    pub(super) repo: Arc<Repository>,
    pub(super) cache: Arc<ReadCache>,
    pub(super) nodes: RwLock<Vec<Node>>,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) log: ServiceLog,
    files: Option<FilesViews>,
    open_views: OpenViews,
}

pub(super) const ROOT: u64 = 1;

pub(super) fn time_of(generation_time: &str) -> SystemTime {
    generation_time
        .parse::<jiff::Timestamp>()
        .map(SystemTime::from)
        .unwrap_or(UNIX_EPOCH)
}

impl RepoFs {
    pub(super) fn new(
        repo: Arc<Repository>,
        gens: Vec<GenerationInfo>,
        cache_bytes: usize,
        files: Option<FilesViews>,
        log: Logger,
    ) -> RepoFs {
        let now = SystemTime::now();
        let mut nodes = vec![Node {
            parent: ROOT,
            kind: Kind::Dir(Vec::new()),
            mtime: now,
            guest: None,
        }];
        let mut root_children: Vec<(String, u64)> = Vec::new();
        let mut vms: Vec<&str> = gens.iter().map(|g| g.vm.as_str()).collect();
        vms.dedup();
        for vm in vms {
            let vm_ino = nodes.len() as u64 + 1;
            let mine: Vec<&GenerationInfo> = gens.iter().filter(|g| g.vm == vm).collect();
            let newest = mine.iter().map(|g| g.time.as_str()).max().unwrap_or("");
            nodes.push(Node {
                parent: ROOT,
                kind: Kind::Dir(Vec::new()),
                mtime: time_of(newest),
                guest: None,
            });
            root_children.push((vm.to_string(), vm_ino));
            let mut children = Vec::new();
            for g in &mine {
                let ino = nodes.len() as u64 + 1;
                nodes.push(Node {
                    parent: vm_ino,
                    kind: Kind::Generation(Arc::new(GenerationSlot {
                        info: (*g).clone(),
                        children: Listing::default(),
                    })),
                    mtime: time_of(&g.time),
                    guest: None,
                });
                children.push((g.time.clone(), ino));
            }
            let link = nodes.len() as u64 + 1;
            nodes.push(Node {
                parent: vm_ino,
                kind: Kind::Link(newest.to_string()),
                mtime: time_of(newest),
                guest: None,
            });
            children.push(("latest".to_string(), link));
            nodes[(vm_ino - 1) as usize].kind = Kind::Dir(children);
        }
        nodes[0].kind = Kind::Dir(root_children);
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        RepoFs {
            repo,
            cache: Arc::new(ReadCache::new(cache_bytes)),
            nodes: RwLock::new(nodes),
            uid,
            gid,
            log: ServiceLog::new(log),
            files,
            open_views: OpenViews::new(MAX_OPEN_VIEWS),
        }
    }

    /// Reports an error once (a damaged chunk is met again on every retry).
    pub(super) fn note_once(&self, msg: String) {
        self.log.note_once(msg);
    }

    pub(super) fn attr(&self, ino: u64) -> Option<FileAttr> {
        let nodes = self.nodes.read().unwrap();
        let n = nodes.get(ino.checked_sub(1)? as usize)?;
        let (kind, size, mut perm, nlink) = match &n.kind {
            Kind::Dir(_) | Kind::Generation(_) | Kind::GuestDir(_) => {
                (FileType::Directory, 0, 0o555, 2)
            }
            Kind::Link(t) => (FileType::Symlink, t.len() as u64, 0o777, 1),
            Kind::File(f) => (FileType::RegularFile, f.size(), 0o444, 1),
            Kind::GuestFile(f) => (FileType::RegularFile, f.size, 0o444, 1),
        };
        let (mut uid, mut gid) = (self.uid, self.gid);
        if let Some(g) = &n.guest {
            // Shown as the guest has them; nothing here is writable.
            perm = g.mode & 0o7555;
            (uid, gid) = (g.uid, g.gid);
        }
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// The entries of directory `ino`, loading a generation's manifest the first time.
    pub(super) fn children(&self, ino: u64) -> std::result::Result<Vec<(String, u64)>, Errno> {
        let slot = {
            let nodes = self.nodes.read().unwrap();
            let n = nodes.get((ino.max(1) - 1) as usize).ok_or(Errno::ENOENT)?;
            match &n.kind {
                Kind::Dir(c) => return Ok(c.clone()),
                Kind::Generation(slot) => slot.clone(),
                Kind::GuestDir(d) => {
                    let d = d.clone();
                    drop(nodes);
                    return match d.children.get_or_load(|| self.load_guest_dir(ino, &d)) {
                        Ok(c) => Ok(c.clone()),
                        Err(msg) => {
                            self.note_once(msg.clone());
                            Err(Errno::EIO)
                        }
                    };
                }
                _ => return Err(Errno::ENOTDIR),
            }
        };
        // Not under the node lock: loading adds nodes.
        let r = slot
            .children
            .get_or_load(|| self.load_generation(ino, &slot.info));
        match r {
            Ok(c) => Ok(c.clone()),
            Err(msg) => {
                self.note_once(msg.clone());
                Err(Errno::EIO)
            }
        }
    }

    pub(super) fn load_generation(
        &self,
        gen_ino: u64,
        info: &GenerationInfo,
    ) -> std::result::Result<Vec<(String, u64)>, String> {
        let manifest = self
            .repo
            .load_manifest(&info.manifest)
            .map_err(|e| format!("cannot list generation {}: {e}", info.name))?;
        // The names extract gives them: a disk whose file names another disk already has
        // (same VM folder name on two datastores) is shown in a subdirectory named after its
        // datastore, as extract writes it.
        let vmx = crate::restore::extract::stored_vmx(&self.repo, &manifest);
        let placement = crate::restore::extract::place(&manifest, vmx.as_deref(), None)
            .map_err(|e| format!("cannot list generation {}: {e}", info.name))?;
        let manifest = placement.manifest;
        let mut files: Vec<(String, Content)> = Vec::new();
        let mut names = HashSet::new();
        for f in &manifest.files {
            if names.insert(f.name.clone()) {
                files.push((
                    f.name.clone(),
                    Content::Stored(FileSource::Object {
                        id: f.object,
                        size: f.size,
                    }),
                ));
            }
        }
        for (name, bytes) in placement.generated {
            if names.insert(name.clone()) {
                files.push((name, Content::Bytes(bytes)));
            }
        }
        for d in &manifest.disks {
            let disk = Arc::new(LazyDisk::new(
                self.repo.clone(),
                d.clone(),
                self.cache.clone(),
            ));
            for e in &d.extents {
                if let Some(name) = &e.file {
                    if names.insert(name.clone()) {
                        files.push((
                            name.clone(),
                            Content::Stored(FileSource::Extent {
                                disk: disk.clone(),
                                extent: e.clone(),
                            }),
                        ));
                    }
                }
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mtime = time_of(&info.time);
        let view = self.files.as_ref().map(|views| {
            Arc::new(ViewSlot {
                id: gen_ino,
                info: info.clone(),
                views: views.clone(),
            })
        });
        let mut nodes = self.nodes.write().unwrap();
        let mut top: Vec<(String, u64)> = Vec::new();
        for (name, source) in files {
            if !is_safe_relative(&name) {
                self.note_once(format!(
                    "generation {} names an unsafe file path {name:?}; it is not shown",
                    info.name
                ));
                continue;
            }
            let parts: Vec<&str> = name.split('/').collect();
            let (leaf, dirs) = parts.split_last().expect("not empty");
            // Walk or create the directories above the file.
            let mut parent = gen_ino;
            for d in dirs {
                let existing = if parent == gen_ino {
                    top.iter().find(|(n, _)| n == d).map(|(_, i)| *i)
                } else {
                    match &nodes[(parent - 1) as usize].kind {
                        Kind::Dir(c) => c.iter().find(|(n, _)| n == d).map(|(_, i)| *i),
                        _ => None,
                    }
                };
                let next = match existing {
                    Some(i) if matches!(nodes[(i - 1) as usize].kind, Kind::Dir(_)) => i,
                    Some(_) => {
                        self.note_once(format!(
                            "generation {}: {name:?} is under a file; it is not shown",
                            info.name
                        ));
                        parent = 0;
                        break;
                    }
                    None => {
                        let i = nodes.len() as u64 + 1;
                        nodes.push(Node {
                            parent,
                            kind: Kind::Dir(Vec::new()),
                            mtime,
                            guest: None,
                        });
                        add_child(&mut nodes, &mut top, gen_ino, parent, d, i);
                        i
                    }
                };
                parent = next;
            }
            if parent == 0 {
                continue;
            }
            let i = nodes.len() as u64 + 1;
            nodes.push(Node {
                parent,
                kind: Kind::File(Arc::new(source)),
                mtime,
                guest: None,
            });
            add_child(&mut nodes, &mut top, gen_ino, parent, leaf, i);
        }
        if let Some(slot) = view {
            if top.iter().any(|(n, _)| n == FILES) {
                self.note_once(format!(
                    "generation {} has a file named {FILES:?}: the files inside its disks are \
                     not shown",
                    info.name
                ));
            } else {
                let i = nodes.len() as u64 + 1;
                nodes.push(Node {
                    parent: gen_ino,
                    kind: Kind::GuestDir(Arc::new(GuestDir {
                        slot,
                        path: String::new(),
                        children: Listing::default(),
                    })),
                    mtime,
                    guest: None,
                });
                top.push((FILES.to_string(), i));
            }
        }
        Ok(top)
    }

    /// Lists directory `d` of a files view (opening the view on first use) and adds its
    /// entries as nodes under `ino`. Devices, FIFOs and sockets are left out, and so are names
    /// no directory may hold.
    fn load_guest_dir(
        &self,
        ino: u64,
        d: &GuestDir,
    ) -> std::result::Result<Vec<(String, u64)>, String> {
        let info = &d.slot.info;
        let view = self.view(&d.slot)?;
        let entries = view
            .list(&d.path)
            .map_err(|e| format!("cannot list {}/files/{}: {e}", info.name, d.path))?;
        let mut nodes = self.nodes.write().unwrap();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            if e.name.is_empty() || e.name == "." || e.name == ".." || e.name.contains(['/', '\0'])
            {
                continue;
            }
            let path = if d.path.is_empty() {
                e.name.clone()
            } else {
                format!("{}/{}", d.path, e.name)
            };
            let kind = match e.kind {
                ViewKind::Dir => Kind::GuestDir(Arc::new(GuestDir {
                    slot: d.slot.clone(),
                    path,
                    children: Listing::default(),
                })),
                ViewKind::File => Kind::GuestFile(Arc::new(GuestFile {
                    slot: d.slot.clone(),
                    path,
                    size: e.size,
                })),
                ViewKind::Symlink(t) => Kind::Link(t),
            };
            let i = nodes.len() as u64 + 1;
            nodes.push(Node {
                parent: ino,
                kind,
                // A directory above the volumes has no time of its own: the generation's.
                mtime: if e.mtime == (0, 0) {
                    time_of(&info.time)
                } else {
                    guest_time(e.mtime)
                },
                guest: Some(GuestAttr {
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                }),
            });
            out.push((e.name, i));
        }
        Ok(out)
    }

    /// The files view of `slot`'s generation, opened if it is not open.
    fn view(&self, slot: &ViewSlot) -> std::result::Result<Arc<dyn FilesView>, String> {
        self.open_views.get(slot.id, || {
            (slot.views.0)(&slot.info, self.cache.clone()).map_err(|e| {
                format!(
                    "cannot read the files of generation {}: {e}",
                    slot.info.name
                )
            })
        })
    }

    /// Up to `len` bytes of guest file `f` from `offset`.
    pub(super) fn guest_read(&self, f: &GuestFile, offset: u64, len: usize) -> Result<Vec<u8>> {
        let view = self
            .view(&f.slot)
            .map_err(crate::error::Error::GuestFilesystem)?;
        view.read(&f.path, offset, len)
    }

    /// The guest file at `ino`, if it is one.
    pub(super) fn guest_file(&self, ino: u64) -> Option<Arc<GuestFile>> {
        let nodes = self.nodes.read().unwrap();
        match &nodes.get((ino.max(1) - 1) as usize)?.kind {
            Kind::GuestFile(f) => Some(f.clone()),
            _ => None,
        }
    }

    pub(super) fn source(&self, ino: u64) -> Option<Arc<Content>> {
        let nodes = self.nodes.read().unwrap();
        match &nodes.get((ino.max(1) - 1) as usize)?.kind {
            Kind::File(f) => Some(f.clone()),
            _ => None,
        }
    }

    pub(super) fn path_of(&self, ino: u64) -> String {
        let nodes = self.nodes.read().unwrap();
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT && parts.len() < 64 {
            let parent = nodes[(cur - 1) as usize].parent;
            let name = match &nodes[(parent - 1) as usize].kind {
                Kind::Dir(c) => c.iter().find(|(_, i)| *i == cur).map(|(n, _)| n.clone()),
                Kind::Generation(slot) => slot
                    .children
                    .get()
                    .and_then(|c| c.iter().find(|(_, i)| *i == cur).map(|(n, _)| n.clone())),
                Kind::GuestDir(d) => d
                    .children
                    .get()
                    .and_then(|c| c.iter().find(|(_, i)| *i == cur).map(|(n, _)| n.clone())),
                _ => None,
            };
            parts.push(name.unwrap_or_else(|| "?".into()));
            cur = parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

/// The name of a generation's files view.
const FILES: &str = "files";
/// Generations whose files views stay open at once (see [`OpenViews`]).
const MAX_OPEN_VIEWS: usize = 8;

/// A guest time as a `SystemTime` (before 1970 clamps to 1970).
fn guest_time((secs, nanos): (i64, u32)) -> SystemTime {
    u64::try_from(secs).map_or(UNIX_EPOCH, |s| {
        UNIX_EPOCH + std::time::Duration::new(s, nanos.min(999_999_999))
    })
}

pub(super) fn add_child(
    nodes: &mut [Node],
    top: &mut Vec<(String, u64)>,
    gen_ino: u64,
    parent: u64,
    name: &str,
    ino: u64,
) {
    if parent == gen_ino {
        top.push((name.to_string(), ino));
    } else if let Kind::Dir(c) = &mut nodes[(parent - 1) as usize].kind {
        c.push((name.to_string(), ino));
    }
}
