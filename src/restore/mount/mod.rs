//! `vmrepo mount`: a read-only FUSE filesystem showing generations as VM directories.
//!
//! Tree: `/<vm>/<generation time>/` holds the generation's files exactly as `vmrepo extract`
//! would write them (small files, descriptors, flat extent files), and `/<vm>/latest` is a
//! symlink to the newest generation shown. A generation's manifest is loaded when its directory
//! is first listed, a disk's map when one of its files is first read; file bytes come from
//! [`crate::restore::reader`] (only the chunks a read touches, verified, through a bounded cache). A read
//! that meets damaged data fails with EIO; it never returns zeros in its place.
//!
//! With a [`FilesViews`] each generation directory also holds `files/`: the files inside its
//! disks (`files/disk0/p2/etc/hosts`), read by the guest layer through the same chunk cache,
//! with the guest's modes and owners (the kernel enforces them, as on a loop-mounted disk).
//!
//! The repository stays open with its shared lock for as long as the filesystem is mounted, so
//! commands that need it alone (prune, gc, index rebuild) wait. Nothing is ever written.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, Request,
};

use crate::error::{Error, IoContext, Result};
use crate::repo::index::GenerationInfo;
use crate::repo::Repository;
use crate::shutdown::TerminationSignals;

/// How long the kernel may cache names and attributes: the tree never changes while mounted.
mod tree;
mod view;

use tree::{Kind, RepoFs};
pub use view::{FilesView, FilesViews, ViewEntry, ViewKind};

const TTL: Duration = Duration::from_secs(3600);

pub use crate::restore::log::Logger;

/// Options of a mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// `VM` (its generations) or `VM@GEN` (one generation); `None` for every VM.
    pub selection: Option<String>,
    /// Bytes of decompressed chunks kept in memory.
    pub cache_bytes: usize,
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// The files inside each generation's disks, shown under `<generation>/files/`.
    pub files: Option<FilesViews>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            selection: None,
            cache_bytes: crate::restore::reader::DEFAULT_CACHE_BYTES,
            threads: 4,
            files: None,
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
        if self.source(ino.0).is_some() || self.guest_file(ino.0).is_some() {
            // The content never changes: let the kernel keep cached pages across opens.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
        } else {
            reply.error(Errno::EISDIR)
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
        let failed = |e: Error| {
            self.note_once(format!(
                "read of {} at offset {offset} failed (EIO): {e}",
                self.path_of(ino.0)
            ));
            Errno::EIO
        };
        if let Some(f) = self.guest_file(ino.0) {
            return match self.guest_read(&f, offset, size as usize) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(failed(e)),
            };
        }
        let Some(src) = self.source(ino.0) else {
            return reply.error(Errno::EISDIR);
        };
        // Each FUSE thread answers from its own buffer, kept between requests: a sequential
        // read of a disk is thousands of 1 MiB requests, and a fresh buffer for each would be
        // zeroed first, then written again.
        thread_local! {
            static REPLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        REPLY.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            match src.read_into(&self.repo, &self.cache, offset, buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(failed(e)),
            }
        });
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
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        if let Some(f) = self.guest_file(ino.0) {
            // A guest file is all data, as far as the mount tells.
            let offset = offset as u64;
            return if offset >= f.size {
                reply.error(Errno::ENXIO)
            } else {
                reply.offset(if want_data { offset } else { f.size } as i64)
            };
        }
        let Some(src) = self.source(ino.0) else {
            return reply.error(Errno::EINVAL);
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

/// The kernel's readahead for this mount, in KiB, when it can be set.
const MOUNT_READAHEAD_KIB: u32 = 4096;

/// Widens the kernel's readahead window for the mount at `mountpoint` from the 128 KiB a FUSE
/// mount starts with to [`MOUNT_READAHEAD_KIB`]: a sequential read (`dd`, `cp`, `qemu-img`)
/// then arrives as 1 MiB requests, several in flight, whose chunks are decoded on every core.
/// Waits for the mount's first answer (the kernel sets the window while the mount starts).
/// Needs root (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`); otherwise the window stays.
fn widen_readahead(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    let Ok(dev) = std::fs::metadata(mountpoint).map(|m| m.dev()) else {
        return;
    };
    // Only the FUSE mount's own device: if it is already gone, the directory under it belongs
    // to another filesystem, whose readahead is not ours to change.
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: statfs writes into the zeroed struct it is given; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0
        || st.f_type as i64 != FUSE_SUPER_MAGIC
        || libc::major(dev) != 0
    {
        return;
    }
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let _ = std::fs::write(bdi, MOUNT_READAHEAD_KIB.to_string());
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
    crate::repo::refuse_inside(repo.location(), mountpoint, "the mount point")?;
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
    let fs = RepoFs::new(
        repo,
        gens,
        opts.cache_bytes,
        opts.files.clone(),
        log.clone(),
    );
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
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("vmrepo-readahead".into())
        .spawn(move || widen_readahead(&mp))
        .ctx("start a thread for", mountpoint)?;
    session.run().ctx("serve FUSE requests at", mountpoint)?;
    Ok(())
}
