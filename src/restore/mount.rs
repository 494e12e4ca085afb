//! `vmrepo mount`: a read-only FUSE filesystem showing generations as VM directories.
//!
//! Tree: `/<vm>/<generation time>/` holds the generation's files exactly as `vmrepo extract`
//! would write them (small files, descriptors, flat extent files), and `/<vm>/latest` is a
//! symlink to the newest generation shown. A generation's manifest is loaded when its directory
//! is first listed, a disk's map when one of its files is first read; file bytes come from
//! [`crate::restore::reader`] (only the chunks a read touches, verified, through a bounded cache). A read
//! that meets damaged data fails with EIO; it never returns zeros in its place.
//!
//! The repository stays open with its shared lock for as long as the filesystem is mounted, so
//! commands that need it alone (prune, gc, index rebuild) wait. Nothing is ever written.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, Request,
};

use crate::error::{Error, IoContext, Result};
use crate::repo::index::GenerationInfo;
use crate::repo::Repository;
use crate::restore::reader::{FileSource, LazyDisk, ReadCache};
use crate::shutdown::TerminationSignals;
use crate::vmware::vm::is_safe_relative;

/// How long the kernel may cache names and attributes: the tree never changes while mounted.
const TTL: Duration = Duration::from_secs(3600);

pub use crate::restore::log::Logger;
use crate::restore::log::ServiceLog;

/// Options of a mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// `VM` (its generations) or `VM@GEN` (one generation); `None` for every VM.
    pub selection: Option<String>,
    /// Bytes of decompressed chunks kept in memory.
    pub cache_bytes: usize,
    /// Threads serving FUSE requests.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            selection: None,
            cache_bytes: crate::restore::reader::DEFAULT_CACHE_BYTES,
            threads: 4,
        }
    }
}

/// What a mount shows.
#[derive(Clone, Debug)]
pub struct MountSummary {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// VMs shown.
    pub vms: usize,
    /// Generations shown.
    pub generations: usize,
}

enum Kind {
    Dir(Vec<(String, u64)>),
    Generation(Arc<GenerationSlot>),
    Link(String),
    File(Arc<Content>),
}

/// A file's bytes: from the repository, or (a descriptor extract writes afresh, see
/// [`crate::restore::extract::place`]) held in memory.
enum Content {
    Stored(FileSource),
    Bytes(Vec<u8>),
}

impl Content {
    fn size(&self) -> u64 {
        match self {
            Content::Stored(s) => s.size(),
            Content::Bytes(b) => b.len() as u64,
        }
    }

    fn read(
        &self,
        repo: &Repository,
        cache: &ReadCache,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        match self {
            Content::Stored(s) => s.read(repo, cache, offset, len),
            Content::Bytes(b) => {
                let from = (offset.min(b.len() as u64)) as usize;
                let to = from.saturating_add(len).min(b.len());
                Ok(b[from..to].to_vec())
            }
        }
    }

    fn seek(&self, from: u64, want_data: bool) -> Result<Option<u64>> {
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

struct Node {
    parent: u64,
    kind: Kind,
    mtime: SystemTime,
}

/// A generation directory, filled from its manifest on first use.
struct GenerationSlot {
    info: GenerationInfo,
    children: OnceLock<std::result::Result<Vec<(String, u64)>, String>>,
}

/// The filesystem handed to fuser.
struct RepoFs {
    repo: Arc<Repository>,
    cache: Arc<ReadCache>,
    nodes: RwLock<Vec<Node>>,
    uid: u32,
    gid: u32,
    log: ServiceLog,
}

const ROOT: u64 = 1;

fn time_of(generation_time: &str) -> SystemTime {
    generation_time
        .parse::<jiff::Timestamp>()
        .map(SystemTime::from)
        .unwrap_or(UNIX_EPOCH)
}

impl RepoFs {
    fn new(
        repo: Arc<Repository>,
        gens: Vec<GenerationInfo>,
        cache_bytes: usize,
        log: Logger,
    ) -> RepoFs {
        let now = SystemTime::now();
        let mut nodes = vec![Node {
            parent: ROOT,
            kind: Kind::Dir(Vec::new()),
            mtime: now,
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
            });
            root_children.push((vm.to_string(), vm_ino));
            let mut children = Vec::new();
            for g in &mine {
                let ino = nodes.len() as u64 + 1;
                nodes.push(Node {
                    parent: vm_ino,
                    kind: Kind::Generation(Arc::new(GenerationSlot {
                        info: (*g).clone(),
                        children: OnceLock::new(),
                    })),
                    mtime: time_of(&g.time),
                });
                children.push((g.time.clone(), ino));
            }
            let link = nodes.len() as u64 + 1;
            nodes.push(Node {
                parent: vm_ino,
                kind: Kind::Link(newest.to_string()),
                mtime: time_of(newest),
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
        }
    }

    /// Reports an error once (a damaged chunk is met again on every retry).
    fn note_once(&self, msg: String) {
        self.log.note_once(msg);
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let nodes = self.nodes.read().unwrap();
        let n = nodes.get(ino.checked_sub(1)? as usize)?;
        let (kind, size, perm, nlink) = match &n.kind {
            Kind::Dir(_) | Kind::Generation(_) => (FileType::Directory, 0, 0o555, 2),
            Kind::Link(t) => (FileType::Symlink, t.len() as u64, 0o777, 1),
            Kind::File(f) => (FileType::RegularFile, f.size(), 0o444, 1),
        };
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
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// The entries of directory `ino`, loading a generation's manifest the first time.
    fn children(&self, ino: u64) -> std::result::Result<Vec<(String, u64)>, Errno> {
        let slot = {
            let nodes = self.nodes.read().unwrap();
            let n = nodes.get((ino.max(1) - 1) as usize).ok_or(Errno::ENOENT)?;
            match &n.kind {
                Kind::Dir(c) => return Ok(c.clone()),
                Kind::Generation(slot) => slot.clone(),
                _ => return Err(Errno::ENOTDIR),
            }
        };
        // Not under the node lock: loading adds nodes.
        let r = slot
            .children
            .get_or_init(|| self.load_generation(ino, &slot.info));
        match r {
            Ok(c) => Ok(c.clone()),
            Err(msg) => {
                self.note_once(msg.clone());
                Err(Errno::EIO)
            }
        }
    }

    fn load_generation(
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
            });
            add_child(&mut nodes, &mut top, gen_ino, parent, leaf, i);
        }
        Ok(top)
    }

    fn source(&self, ino: u64) -> Option<Arc<Content>> {
        let nodes = self.nodes.read().unwrap();
        match &nodes.get((ino.max(1) - 1) as usize)?.kind {
            Kind::File(f) => Some(f.clone()),
            _ => None,
        }
    }

    fn path_of(&self, ino: u64) -> String {
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
                    .and_then(|r| r.as_ref().ok())
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

fn add_child(
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

impl Filesystem for RepoFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let children = match self.children(parent.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match children.iter().find(|(n, _)| n == name) {
            Some((_, ino)) => match self.attr(*ino) {
                Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let nodes = self.nodes.read().unwrap();
        match nodes.get((ino.0.max(1) - 1) as usize).map(|n| &n.kind) {
            Some(Kind::Link(t)) => reply.data(t.as_bytes()),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.source(ino.0) {
            // The content never changes: let the kernel keep cached pages across opens.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::EISDIR),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(src) = self.source(ino.0) else {
            return reply.error(Errno::EISDIR);
        };
        match src.read(&self.repo, &self.cache, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                self.note_once(format!(
                    "read of {} at offset {offset} failed (EIO): {e}",
                    self.path_of(ino.0)
                ));
                reply.error(Errno::EIO)
            }
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(src) = self.source(ino.0) else {
            return reply.error(Errno::EINVAL);
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        match src.seek(offset as u64, want_data) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => {
                self.note_once(format!("seek in {} failed (EIO): {e}", self.path_of(ino.0)));
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let children = match self.children(ino.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let parent = {
            let nodes = self.nodes.read().unwrap();
            nodes[(ino.0 - 1) as usize].parent
        };
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (name, i) in children {
            let kind = self.attr(i).map_or(FileType::RegularFile, |a| a.kind);
            entries.push((i, kind, name));
        }
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.nodes.read().unwrap().len() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }
}

/// Resolves which generations a mount shows.
fn select(repo: &Repository, selection: Option<&str>) -> Result<Vec<GenerationInfo>> {
    let index = repo.open_index()?;
    match selection {
        None => {
            let gens = index.generations(None)?;
            if gens.is_empty() {
                return Err(Error::NotFound(format!(
                    "repository {} holds no generations yet; nothing to mount",
                    repo.location().display()
                )));
            }
            Ok(gens)
        }
        Some(spec) if spec.contains('@') => Ok(vec![index.resolve(spec)?]),
        Some(vm) => {
            // resolve() gives the helpful message for an unknown VM.
            index.resolve(vm)?;
            index.generations(Some(vm))
        }
    }
}

/// Mounts the repository at `mountpoint` and serves it until it is unmounted (`fusermount3 -u`,
/// `umount`) or the process gets SIGINT, SIGTERM or SIGHUP, which unmount it. `on_mounted` is
/// called once the filesystem is visible.
pub fn mount(
    repo: Arc<Repository>,
    mountpoint: &Path,
    opts: &MountOptions,
    log: Logger,
    on_mounted: impl FnOnce(&MountSummary),
) -> Result<()> {
    let gens = select(&repo, opts.selection.as_deref())?;
    let meta = std::fs::metadata(mountpoint).ctx("use as mount point", mountpoint)?;
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "mount point {} is not a directory",
            mountpoint.display()
        )));
    }
    let mut vms: Vec<&str> = gens.iter().map(|g| g.vm.as_str()).collect();
    vms.dedup();
    let summary = MountSummary {
        mountpoint: mountpoint.to_path_buf(),
        vms: vms.len(),
        generations: gens.len(),
    };
    let fsname = format!("vmrepo:{}", repo.location().display());
    let fs = RepoFs::new(repo, gens, opts.cache_bytes, log.clone());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
        MountOption::FSName(fsname),
        MountOption::Subtype("vmrepo".into()),
    ];
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    // Block the signals before fuser starts its threads, so that only the waiter below gets them.
    let signals = TerminationSignals::block()?;
    let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "; is FUSE available (/dev/fuse, and fusermount3 from the fuse3 package)?"
            }
            std::io::ErrorKind::PermissionDenied => {
                "; mounting needs root, or fusermount3 and access to /dev/fuse"
            }
            _ => "",
        };
        Error::Usage(format!(
            "cannot mount a FUSE filesystem at {}: {e}{hint}",
            mountpoint.display()
        ))
    })?;
    let mut unmounter = session.unmount_callable();
    on_mounted(&summary);
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("vmrepo-signals".into())
        .spawn(move || loop {
            let sig = signals.wait();
            match unmounter.unmount() {
                Ok(()) => break,
                Err(e) => log(&format!(
                    "{sig}: cannot unmount {} yet: {e}; close the files and shells using it, \
                     then press Ctrl-C again (or run `fusermount3 -u {}`)",
                    mp.display(),
                    mp.display()
                )),
            }
        })
        .ctx("start a thread for", mountpoint)?;
    session.run().ctx("serve FUSE requests at", mountpoint)?;
    Ok(())
}
