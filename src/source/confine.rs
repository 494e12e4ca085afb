//! Which host paths an ingest may read.
//!
//! A VM directory is input from whoever controls the VM's datastore folder. Its .vmx, .vmsd,
//! descriptors and disk headers name other files (disks, extents, parents, qcow2 backing files,
//! the nvram), and nothing stops them naming `/etc/shadow`, `../../x`, a symlink out of the
//! directory, a FIFO or a device. Every place that opens a file named by such input goes
//! through [`Confine`]:
//!
//! * A file is read only if its real path (symlinks and `..` resolved by `realpath`) lies inside
//!   an allowed root: the VM's directory (the directory given, or the directory of the .vmx or
//!   disk file given), `/vmfs/volumes` when it exists (an ESXi host's datastores), the local
//!   side of every `--datastore-map OLD=NEW`, and every `--allow-path DIR`. Roots are
//!   canonicalized too, so a datastore reached through a symlink is compared by where it is.
//! * It must be a regular file. A block device is read only when the user named it on the
//!   command line (`vmrepo ingest REPO /dev/vg0/disk --name x`); character devices, FIFOs and
//!   sockets never (opening one can block or have side effects, so they are refused before
//!   they are opened).
//! * The file the user names on the command line is trusted, as is its own directory.
//! * The file is opened by its real path without following a final symlink and without
//!   blocking; `fstat` then re-checks its type, and `/proc/self/fd` (where there is one) where
//!   it really is, so a file swapped between the check and the open is refused too.
//!
//! `--allow-path DIR` travels as the datastore map `DIR=DIR` ([`with_allowed`]): a map's local
//! side is an allowed root, and mapping a directory onto itself changes no path.
//!
//! A VM read over the network (`esxi://`) is staged: its small files are copied into a private
//! directory, and each large disk file is an empty placeholder there whose bytes a
//! [`RemoteFiles`] entry fetches. The same rules then apply to the staged tree, and opening a
//! placeholder gives the remote file ([`Opened::remote`]), never the empty local one.

use std::collections::HashMap;
use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Advice, Error, IoContext, Result, Setting};
use crate::source::{FlatFile, RandomRead};

/// Staged placeholders (by canonical path) and the remote files they stand for.
pub type RemoteFiles = HashMap<PathBuf, Arc<dyn RandomRead>>;
/// Where an ESXi host mounts its datastores: allowed whenever it exists.
pub const ESXI_DATASTORES: &str = "/vmfs/volumes";

/// Adds `--allow-path` directories to a datastore map as `DIR=DIR` entries (made absolute).
pub fn with_allowed(
    mut map: Vec<(PathBuf, PathBuf)>,
    allow: &[PathBuf],
) -> Vec<(PathBuf, PathBuf)> {
    for dir in allow {
        let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        if !map.iter().any(|(a, b)| *a == abs && *b == abs) {
            map.push((abs.clone(), abs));
        }
    }
    map
}

/// The host paths one ingest (or inspection) may read.
#[derive(Clone)]
pub struct Confine {
    /// Canonical directories whose files may be read.
    roots: Vec<PathBuf>,
    /// Canonical paths of files the user named on the command line.
    named: Vec<PathBuf>,
    /// Placeholders of a staged remote VM and what they stand for.
    remote: Option<Arc<RemoteFiles>>,
}

/// A file opened through [`Confine::open`].
pub struct Opened {
    /// Open read-only (blocking mode restored). For a remote file, its empty placeholder.
    pub file: File,
    /// Its real path.
    pub real: PathBuf,
    /// `fstat` of the open file.
    pub meta: Metadata,
    /// The remote file a placeholder stands for: every read goes there.
    pub remote: Option<Arc<dyn RandomRead>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("real", &self.real)
            .field(
                "remote",
                &self.remote.as_ref().map(|r| r.path().to_path_buf()),
            )
            .finish()
    }
}

impl Opened {
    /// Length in bytes (of the remote file, for a placeholder).
    pub fn len(&self) -> u64 {
        match &self.remote {
            Some(r) => r.len(),
            None => self.meta.len(),
        }
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for a regular file (a remote file is one).
    pub fn is_file(&self) -> bool {
        self.remote.is_some() || self.meta.is_file()
    }

    /// The first up to `n` bytes.
    pub fn head(&self, n: usize, path: &Path) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        if let Some(r) = &self.remote {
            let mut head = vec![0u8; n.min(r.len() as usize)];
            r.read_exact_at(&mut head, 0)?;
            return Ok(head);
        }
        let mut head = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self
                .file
                .read_at(&mut head[got..], got as u64)
                .ctx("read", path)?
            {
                0 => break,
                k => got += k,
            }
        }
        head.truncate(got);
        Ok(head)
    }

    /// The file as a disk reader (the remote one for a placeholder).
    pub fn into_flat(self, path: &Path) -> Result<FlatFile> {
        match self.remote {
            Some(r) => Ok(FlatFile::remote(r)),
            None => FlatFile::from_file(self.file, path),
        }
    }

    /// The whole file, at most `max` bytes (more is an error naming it).
    pub fn read_all(&self, path: &Path, max: u64) -> Result<Vec<u8>> {
        if self.len() > max {
            return Err(Error::bad_input(
                path,
                format!(
                    "is {} bytes, more than the {max} bytes such a file may have",
                    self.len()
                ),
            ));
        }
        if let Some(r) = &self.remote {
            return r.read_vec(0, r.len(), "the whole file");
        }
        let mut out = Vec::with_capacity(self.meta.len() as usize);
        (&self.file)
            .take(max + 1)
            .read_to_end(&mut out)
            .ctx("read", path)?;
        if out.len() as u64 > max {
            return Err(Error::bad_input(
                path,
                format!("grew past {max} bytes while being read"),
            ));
        }
        Ok(out)
    }
}

impl std::fmt::Debug for Confine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confine")
            .field("roots", &self.roots)
            .field("named", &self.named)
            .field("remote", &self.remote.as_ref().map(|m| m.len()))
            .finish()
    }
}

impl Confine {
    /// The rule for a source the user named: `source` is a VM directory (its files may be
    /// read), or a .vmx or disk file (trusted, and its directory's files may be read).
    /// The local sides of `datastore_map` (`--datastore-map`, and `--allow-path` directories
    /// as `DIR=DIR` entries) are allowed too.
    pub fn for_source(source: &Path, datastore_map: &[(PathBuf, PathBuf)]) -> Result<Confine> {
        let source = std::path::absolute(source).ctx("resolve", source)?;
        let meta = std::fs::metadata(&source).ctx("open", &source)?;
        let mut named = Vec::new();
        let dir = if meta.is_dir() {
            source.clone()
        } else {
            named.push(std::fs::canonicalize(&source).ctx("resolve", &source)?);
            source.parent().unwrap_or(Path::new("/")).to_path_buf()
        };
        let mut roots = vec![std::fs::canonicalize(&dir).ctx("resolve", &dir)?];
        let mut extra: Vec<PathBuf> = vec![PathBuf::from(ESXI_DATASTORES)];
        extra.extend(datastore_map.iter().map(|(_, local)| local.clone()));
        for r in extra {
            // A root that does not exist holds nothing to read.
            if let Ok(c) = std::path::absolute(&r).and_then(std::fs::canonicalize) {
                if c.is_dir() && !roots.contains(&c) {
                    roots.push(c);
                }
            }
        }
        Ok(Confine {
            roots,
            named,
            remote: None,
        })
    }

    /// True over a staged remote VM (its files are a host's datastore files, so mapping a
    /// datastore onto a local directory is no remedy for one that is missing).
    pub fn is_staged(&self) -> bool {
        self.remote.is_some()
    }

    /// The same rule over a staged remote VM: opening a placeholder in `remote` gives the
    /// remote file it stands for.
    pub fn with_remote(mut self, remote: Option<Arc<RemoteFiles>>) -> Confine {
        self.remote = remote;
        self
    }

    /// The canonical allowed roots (for messages and tests).
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// True if the real path `real` may be read.
    pub fn allows(&self, real: &Path) -> bool {
        self.named.iter().any(|n| n == real) || self.roots.iter().any(|r| real.starts_with(r))
    }

    fn refuse(&self, path: &Path, by: Option<&Path>, reason: String) -> Error {
        let by = by
            .map(|b| format!(" (named by {})", b.display()))
            .unwrap_or_default();
        Error::bad_input(path, format!("refused{by}: {reason}"))
    }

    fn outside(&self, path: &Path, real: &Path, by: Option<&Path>) -> Error {
        let resolves = if real != path {
            format!("it resolves to {}, which is", real.display())
        } else {
            "it is".to_string()
        };
        if self.is_staged() {
            // No setting makes a file of this machine part of a VM on a host.
            return self.refuse(
                path,
                by,
                format!(
                    "{resolves} not a file of the host's datastores; a VM's files may only name \
                     files on its host's datastores, so it may have been made to read a file of \
                     this machine"
                ),
            );
        }
        let roots = self
            .roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let by = by
            .map(|b| format!(" (named by {})", b.display()))
            .unwrap_or_default();
        Advice::new(format!(
            "{}: refused{by}: {resolves} outside the directories this ingest may read \
             ({roots}); a VM's files may only name files in its own directory and the datastores \
             you allow, so it may have been made to read a host file. Use ",
            path.display()
        ))
        .setting(Setting::AllowPath)
        .text(" (or ")
        .setting(Setting::DatastoreMap)
        .text(") if you trust it")
        .into()
    }

    fn check_type(&self, path: &Path, real: &Path, t: FileType, by: Option<&Path>) -> Result<()> {
        if t.is_file() {
            return Ok(());
        }
        if t.is_dir() {
            return Err(Error::bad_input(path, "is a directory, not a disk file"));
        }
        if t.is_block_device() && self.named.iter().any(|n| n == real) {
            return Ok(());
        }
        let what = if t.is_block_device() {
            "a block device; vmrepo reads a block device only when you name it on the command \
             line (`vmrepo ingest REPO /dev/... --name NAME`)"
        } else if t.is_char_device() {
            "a character device, not a regular file; vmrepo reads only regular files (and block \
             devices named on the command line)"
        } else if t.is_fifo() {
            "a FIFO (named pipe), not a regular file; vmrepo reads only regular files (and block \
             devices named on the command line)"
        } else if t.is_socket() {
            "a socket, not a regular file; vmrepo reads only regular files (and block devices \
             named on the command line)"
        } else {
            "not a regular file; vmrepo reads only regular files (and block devices named on the \
             command line)"
        };
        Err(self.refuse(
            path,
            by,
            if real != path {
                format!("it resolves to {}, which is {what}", real.display())
            } else {
                format!("it is {what}")
            },
        ))
    }

    /// Checks that `path` (named by `by`, if a file named it) may be read: its real path is
    /// inside an allowed root and it is a regular file (or a block device the user named).
    /// Returns the real path.
    pub fn check(&self, path: &Path, by: Option<&Path>) -> Result<PathBuf> {
        let real = std::fs::canonicalize(path).ctx("open", path)?;
        if !self.allows(&real) {
            return Err(self.outside(path, &real, by));
        }
        let meta = std::fs::metadata(&real).ctx("stat", path)?;
        self.check_type(path, &real, meta.file_type(), by)?;
        Ok(real)
    }

    /// [`Confine::check`], then opens the file read-only by its real path (not following a
    /// final symlink, not blocking on a FIFO) and checks again what was opened.
    pub fn open(&self, path: &Path, by: Option<&Path>) -> Result<Opened> {
        let real = self.check(path, by)?;
        let file = open_read_only(&real, true).ctx("open", path)?;
        let meta = file.metadata().ctx("stat", path)?;
        self.check_type(path, &real, meta.file_type(), by)?;
        // Where the kernel says the descriptor leads (Linux): the path may have been swapped
        // to point elsewhere between the check and the open.
        if let Ok(now) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            let deleted = now.to_string_lossy().ends_with(" (deleted)");
            if now.is_absolute() && !deleted && !self.allows(&now) {
                return Err(self.outside(path, &now, by));
            }
        }
        let remote = self.remote.as_ref().and_then(|m| m.get(&real)).cloned();
        Ok(Opened {
            file,
            real,
            meta,
            remote,
        })
    }

    /// Opens `path` through [`Confine::open`] and reads it whole; more than `max` bytes is an
    /// error naming the file.
    pub fn read(&self, path: &Path, by: Option<&Path>, max: u64) -> Result<Vec<u8>> {
        self.open(path, by)?.read_all(path, max)
    }
}

/// Opens `path` read-only without blocking on a FIFO (and, with `nofollow`, without following
/// a final symlink), then puts the descriptor back in blocking mode. Character devices, FIFOs
/// and sockets are refused before the open (opening one can block or have side effects) and
/// after it.
pub fn open_read_only(path: &Path, nofollow: bool) -> std::io::Result<File> {
    let special = |t: FileType| t.is_char_device() || t.is_fifo() || t.is_socket();
    let refused = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file or block device (a character device, FIFO or socket)",
        )
    };
    if std::fs::metadata(path).is_ok_and(|m| special(m.file_type())) {
        return Err(refused());
    }
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    if special(file.metadata()?.file_type()) {
        return Err(refused());
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(map: &[(&Path, &Path)]) -> Vec<(PathBuf, PathBuf)> {
        map.iter()
            .map(|(a, b)| (a.to_path_buf(), b.to_path_buf()))
            .collect()
    }

    #[test]
    fn inside_outside_symlinks_dotdot_and_specials() {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm");
        let out = t.path().join("outside");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(vm.join("a.vmdk"), b"x").unwrap();
        std::fs::write(out.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(out.join("secret"), vm.join("link")).unwrap();
        std::os::unix::fs::symlink("a.vmdk", vm.join("inner")).unwrap();
        let c = Confine::for_source(&vm, &opts(&[])).unwrap();
        assert!(c.open(&vm.join("a.vmdk"), None).is_ok());
        assert!(c.open(&vm.join("inner"), None).is_ok());
        assert!(c.open(&vm.join("sub/../a.vmdk"), None).is_err()); // no such dir: not found
        let e = c.open(&vm.join("link"), None).unwrap_err().to_string();
        assert!(e.contains("link") && e.contains("--allow-path"), "{e}");
        let e = c.open(&vm.join("../outside/secret"), None).unwrap_err();
        assert!(e.to_string().contains("outside the directories"), "{e}");
        let e = c.open(&out.join("secret"), Some(&vm.join("x.vmx")));
        assert!(e.unwrap_err().to_string().contains("named by"));
        // The local side of a datastore map (and so an --allow-path) is allowed.
        let allowed = with_allowed(Vec::new(), std::slice::from_ref(&out));
        let c2 = Confine::for_source(&vm, &allowed).unwrap();
        assert!(c2.open(&vm.join("link"), None).is_ok());
        let c3 = Confine::for_source(&vm, &opts(&[(Path::new("/vmfs/volumes/x"), &out)])).unwrap();
        assert!(c3.open(&out.join("secret"), None).is_ok());
        // A file named on the command line is trusted with its directory.
        let c4 = Confine::for_source(&out.join("secret"), &opts(&[])).unwrap();
        assert!(c4.open(&out.join("secret"), None).is_ok());
        assert!(c4.open(&vm.join("a.vmdk"), None).is_err());
        // A FIFO inside the directory is refused without blocking.
        let fifo = vm.join("fifo");
        let cpath = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
        let e = c.open(&fifo, None).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        assert!(open_read_only(&fifo, false).is_err());
    }
}
