//! Files created inside an opened directory without ever following a link.
//!
//! Extract and `key export` write into directories other people may be able to write to: a
//! symbolic link planted there (in place of a file vmrepo is about to create, or of a directory
//! on the way to it) must never redirect a write outside. Every call here works on a directory
//! descriptor ([`Dir`]) and one plain name inside it (`openat`, `mkdirat`, `renameat`,
//! `unlinkat`): files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` (a name that exists in
//! any form, a dangling link included, is refused rather than opened), directories are entered
//! with `O_DIRECTORY | O_NOFOLLOW`, and a rename replaces a link by the file itself without
//! looking at what the link points to. A path component swapped for a link after vmrepo looked
//! at it is therefore refused at the moment it is used, not followed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a name in a directory is, without following it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link, with its target as stored in it.
    Link(PathBuf),
    /// Anything else (device, FIFO, socket).
    Other,
}

/// An opened directory: files and subdirectories are reached by name relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn cname(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The error for a link met where vmrepo was about to write.
pub fn link_refused(path: &Path, target: &Path, what: &str) -> Error {
    Error::io(
        "write",
        path,
        io::Error::other(format!(
            "it is a symbolic link (to {}); vmrepo never writes through a link {what}: remove \
             the link, or choose another directory",
            target.display()
        )),
    )
}

impl Dir {
    /// Opens the directory `path` (the caller's own path: a link given there is followed, as
    /// for any path a user types; nothing below it is).
    pub fn open(path: &Path) -> Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            Error::io(
                "open directory",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "NUL in the path"),
            )
        })?;
        // SAFETY: `c` is a valid NUL-terminated string; the returned descriptor is owned below.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
        .map_err(|e| Error::io("open directory", path, e))?;
        Ok(Dir {
            // SAFETY: `fd` was just opened and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    /// The directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// What `name` is, without following it; `None` if it does not exist.
    pub fn entry(&self, name: &str) -> Result<Option<Entry>> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("look at", &path, e))?;
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name, `st` is writable.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(Error::io("look at", &path, e)),
            };
        }
        Ok(Some(match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Entry::File,
            libc::S_IFDIR => Entry::Dir,
            libc::S_IFLNK => Entry::Link(self.read_link(&c)),
            _ => Entry::Other,
        }))
    }

    fn read_link(&self, c: &CString) -> PathBuf {
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid descriptor and name; `buf` is writable for its length.
        let n = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return PathBuf::from("?");
        }
        buf.truncate(n as usize);
        PathBuf::from(std::ffi::OsStr::from_bytes(&buf))
    }

    /// Opens the subdirectory `name`; a link there is refused (with `what` saying where, for
    /// the message), never followed.
    pub fn open_dir(&self, name: &str, what: &str) -> Result<Dir> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("open directory", &path, e))?;
        // SAFETY: valid descriptor and name; the returned descriptor is owned below.
        let r = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match self.entry(name) {
                Ok(Some(Entry::Link(t))) => link_refused(&path, &t, what),
                Ok(Some(Entry::File | Entry::Other)) => Error::io(
                    "write into",
                    &path,
                    io::Error::other(
                        "it is a file, not a directory: remove or rename it, or choose another \
                         directory",
                    ),
                ),
                _ => Error::io("open directory", &path, e),
            });
        }
        Ok(Dir {
            // SAFETY: `r` was just opened and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(r) },
            path,
        })
    }

    /// Creates the subdirectory `name` if it does not exist and opens it (never through a
    /// link). Returns whether this call created it.
    pub fn make_dir(&self, name: &str, what: &str) -> Result<(Dir, bool)> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("create directory", &path, e))?;
        // SAFETY: valid descriptor and name.
        let created = match cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o777) }) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(e) => return Err(Error::io("create directory", &path, e)),
        };
        match self.open_dir(name, what) {
            Ok(d) => Ok((d, created)),
            Err(e) => {
                if created {
                    let _ = self.remove_dir(name);
                }
                Err(e)
            }
        }
    }

    /// Creates the file `name`, which must not exist in any form (a link, even a dangling one,
    /// is refused: `O_EXCL | O_NOFOLLOW`). Opened for reading and writing, with `mode` (before
    /// the umask).
    pub fn create_new(&self, name: &str, mode: u32) -> Result<File> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("create", &path, e))?;
        // SAFETY: valid descriptor and name; the returned descriptor is owned below.
        let r = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if r < 0 {
            return Err(Error::io("create", &path, io::Error::last_os_error()));
        }
        // SAFETY: `r` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(r) })
    }

    /// Creates the file `name`, a name vmrepo owns (a partial or scratch file): whatever a
    /// killed earlier run (or anybody else) left there is removed first — a file or a link is
    /// unlinked itself, never followed; a directory is refused — then the file is created as by
    /// [`Dir::create_new`].
    pub fn create_replacing(&self, name: &str, mode: u32) -> Result<File> {
        match self.entry(name)? {
            None => {}
            Some(Entry::Dir) => {
                return Err(Error::io(
                    "create",
                    self.path_of(name),
                    io::Error::other(
                        "a directory has the name of vmrepo's partial file; remove it and run \
                         the command again",
                    ),
                ))
            }
            Some(_) => self.remove_file(name)?,
        }
        self.create_new(name, mode)
    }

    /// Renames `from` to `to` in this directory. With `replace`, an existing `to` (a file, or a
    /// link, which is replaced itself and never followed) is replaced atomically; without, an
    /// existing `to` of any kind is an error and is left alone.
    pub fn rename(&self, from: &str, to: &str, replace: bool) -> Result<()> {
        let path = self.path_of(to);
        let f = cname(from).map_err(|e| Error::io("rename into place", &path, e))?;
        let t = cname(to).map_err(|e| Error::io("rename into place", &path, e))?;
        let fd = self.fd.as_raw_fd();
        if !replace {
            // SAFETY: valid descriptors and names.
            let r =
                unsafe { libc::renameat2(fd, f.as_ptr(), fd, t.as_ptr(), libc::RENAME_NOREPLACE) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Filesystems without RENAME_NOREPLACE: a hard link never replaces either.
                Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
                    // SAFETY: valid descriptors and names; flags 0 do not follow links.
                    let r = unsafe { libc::linkat(fd, f.as_ptr(), fd, t.as_ptr(), 0) };
                    if r == 0 {
                        return self.remove_file(from);
                    }
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        return Err(Error::Exists(path));
                    }
                    // Nor hard links (some network filesystems): look, then rename.
                    if self.entry(to)?.is_some() {
                        return Err(Error::Exists(path));
                    }
                }
                Some(libc::EEXIST) => return Err(Error::Exists(path)),
                _ => return Err(Error::io("rename into place", &path, e)),
            }
        }
        // SAFETY: valid descriptors and names.
        cvt(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) })
            .map(drop)
            .map_err(|e| Error::io("rename into place", &path, e))
    }

    /// Removes the file or link `name` (the link itself); a missing name is not an error.
    pub fn remove_file(&self, name: &str) -> Result<()> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("remove", &path, e))?;
        // SAFETY: valid descriptor and name.
        match cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &str) -> Result<()> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("remove directory", &path, e))?;
        // SAFETY: valid descriptor and name.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
            .map(drop)
            .map_err(|e| Error::io("remove directory", &path, e))
    }

    /// Opens the existing regular file `name` for reading; a link there is refused.
    pub fn open_file(&self, name: &str) -> Result<File> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("open", &path, e))?;
        // SAFETY: valid descriptor and name; the returned descriptor is owned below.
        let r = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            return Err(Error::io("open", &path, io::Error::last_os_error()));
        }
        // SAFETY: `r` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(r) })
    }

    /// Creates the symbolic link `name` pointing to `target`; `name` must not exist.
    pub fn symlink(&self, name: &str, target: &[u8]) -> Result<()> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("create link", &path, e))?;
        let t = CString::new(target).map_err(|_| {
            Error::io(
                "create link",
                &path,
                io::Error::new(io::ErrorKind::InvalidInput, "NUL in the link's target"),
            )
        })?;
        // SAFETY: valid descriptor and NUL-terminated strings.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) })
            .map(drop)
            .map_err(|e| Error::io("create link", &path, e))
    }

    /// Sets the access and modification times of `name` (a link itself, never what it points
    /// to), as (seconds, nanoseconds) since the Unix epoch.
    pub fn set_times(&self, name: &str, atime: (i64, u32), mtime: (i64, u32)) -> Result<()> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("set times of", &path, e))?;
        let spec = |(s, ns): (i64, u32)| libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: ns.min(999_999_999) as _,
        };
        let times = [spec(atime), spec(mtime)];
        // SAFETY: valid descriptor, name and a two-element array.
        cvt(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
        .map_err(|e| Error::io("set times of", &path, e))
    }

    /// Sets the owner and group of `name` (a link itself, never what it points to).
    pub fn set_owner(&self, name: &str, uid: u32, gid: u32) -> Result<()> {
        let path = self.path_of(name);
        let c = cname(name).map_err(|e| Error::io("set owner of", &path, e))?;
        // SAFETY: valid descriptor and name.
        cvt(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
        .map_err(|e| Error::io("set owner of", &path, e))
    }

    /// Sets the permission bits of this directory itself.
    pub fn set_mode(&self, mode: u32) -> Result<()> {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) })
            .map(drop)
            .map_err(|e| Error::io("set mode of", &self.path, e))
    }

    /// Flushes everything written to the filesystem this directory is on.
    pub fn sync_filesystem(&self) -> Result<()> {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::syncfs(self.fd.as_raw_fd()) })
            .map(drop)
            .map_err(|e| Error::io("sync the filesystem of", &self.path, e))
    }

    /// Fsyncs the directory, so that entries created or renamed in it survive a crash.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fsync(self.fd.as_raw_fd()) })
            .map(drop)
            .map_err(|e| Error::io("fsync directory", &self.path, e))
    }
}

/// Writes `data` to a new file `path` with `mode`, all or nothing: a partial file beside it
/// (`.NAME.vmrepo-partial`, created without following links) is written and fsynced, then
/// renamed to `path` only if `path` does not exist in any form — an existing file or link is
/// refused and left untouched, never followed. On failure nothing is left behind.
pub fn write_new_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::io(
                "create",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = Dir::open(parent)?;
    let refuse = |e: Entry| match e {
        Entry::Link(t) => Error::io(
            "create",
            path,
            io::Error::other(format!(
                "it is a symbolic link (to {}); vmrepo never writes through a link or over an \
                 existing file: give a new file name, or remove the link first",
                t.display()
            )),
        ),
        _ => Error::io(
            "create",
            path,
            io::Error::other(
                "it already exists; vmrepo never overwrites it: give a new file name, or remove \
                 the old file first",
            ),
        ),
    };
    if let Some(e) = dir.entry(&name)? {
        return Err(refuse(e));
    }
    let partial = format!(".{name}.vmrepo-partial");
    let f = dir.create_replacing(&partial, mode)?;
    let written = f
        .write_all_at(data, 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write", dir.path_of(&partial), e))
        .and_then(|()| dir.rename(&partial, &name, false))
        .and_then(|()| dir.sync());
    if let Err(e) = written {
        let _ = dir.remove_file(&partial);
        return Err(match (e, dir.entry(&name)) {
            (Error::Exists(_), Ok(Some(entry))) => refuse(entry),
            (e, _) => e,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, "victim").unwrap();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        symlink(&victim, d.join("f")).unwrap();
        symlink(t.path(), d.join("sub")).unwrap();
        symlink(t.path().join("nowhere"), d.join("dangling")).unwrap();
        let dir = Dir::open(&d).unwrap();
        assert!(matches!(dir.entry("f").unwrap(), Some(Entry::Link(_))));
        assert!(dir.create_new("f", 0o644).is_err());
        assert!(dir.create_new("dangling", 0o644).is_err());
        assert!(!t.path().join("nowhere").exists());
        let err = dir.open_dir("sub", "in the destination").unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(dir.make_dir("sub", "in the destination").is_err());
        // A name vmrepo owns: the link is removed, not followed.
        let f = dir.create_replacing("f", 0o644).unwrap();
        f.write_all_at(b"new", 0).unwrap();
        use std::os::unix::fs::FileExt;
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
        // Renaming over a link replaces the link.
        std::fs::write(d.join("g"), "g").unwrap();
        symlink(&victim, d.join("h")).unwrap();
        assert!(matches!(dir.rename("g", "h", false), Err(Error::Exists(_))));
        dir.rename("g", "h", true).unwrap();
        assert_eq!(dir.entry("h").unwrap(), Some(Entry::File));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
        assert!(write_new_file(&d.join("dangling"), b"x", 0o600).is_err());
        assert!(!t.path().join("nowhere").exists());
        write_new_file(&d.join("key"), b"k", 0o600).unwrap();
        assert_eq!(std::fs::read(d.join("key")).unwrap(), b"k");
        assert!(dir.entry(".key.vmrepo-partial").unwrap().is_none());
    }
}
