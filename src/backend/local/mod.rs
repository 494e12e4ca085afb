//! The local filesystem backend: a repository is a directory, a key is a relative path in it.
//!
//! Whole objects are written atomically (temporary file, fsync, rename, fsync of the folder);
//! packs are streamed by [`writer::LocalWriter`] (direct I/O where allowed, `flock`ed while
//! written). Locks are `flock`s on files, so they vanish with a killed process. Ranges are
//! read through a bounded cache of open files.

mod writer;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Backend, Durability, Entry, LockAttempt, LockGuard, LockKind, ObjectWriter};
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// Open files kept for range reads; the cache is emptied when it is full.
const MAX_OPEN: usize = 256;

/// A repository directory on a local (or network-mounted) filesystem.
pub struct LocalBackend {
    root: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl LocalBackend {
    /// The backend of the existing directory `root`.
    pub fn open(root: &Path) -> Result<LocalBackend> {
        if !root.is_dir() {
            return Err(Error::NotARepository {
                path: root.to_path_buf(),
                reason: "no such directory".into(),
            });
        }
        Ok(LocalBackend::at(root))
    }

    /// The backend of a new repository in `root`, which must not exist or be an empty
    /// directory.
    pub fn create(root: &Path) -> Result<LocalBackend> {
        if root.exists() {
            let mut entries = fs::read_dir(root).ctx("read directory", root)?;
            if entries.next().is_some() {
                return Err(Error::NotEmpty(root.to_path_buf()));
            }
        } else {
            fs::create_dir_all(root).ctx("create directory", root)?;
        }
        Ok(LocalBackend::at(root))
    }

    fn at(root: &Path) -> LocalBackend {
        LocalBackend {
            root: root.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, key: &str) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap();
        if let Some(f) = open.get(key) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(key))?);
        if open.len() >= MAX_OPEN {
            open.clear();
        }
        open.insert(key.to_string(), f.clone());
        Ok(f)
    }

    /// Forgets the open file of a deleted key (its space is freed when the last reader ends).
    fn forget(&self, key: &str) {
        self.open.lock().unwrap().remove(key);
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it survive a crash.
impl Backend for LocalBackend {
    fn location(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn has_folder(&self, prefix: &str) -> bool {
        self.path(prefix).is_dir()
    }

    fn make_folder(&self, prefix: &str) -> io::Result<()> {
        let dir = self.path(prefix);
        fs::create_dir_all(&dir)?;
        fsutil::sync_directory(dir.parent().unwrap_or(&self.root))
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(key))
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(key)?.read_exact_at(buf, offset)
    }

    fn open_sequential(&self, key: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let file = File::open(self.path(key))?;
        let len = file.metadata()?.len();
        Ok((Box::new(BufReader::with_capacity(4 << 20, file)), len))
    }

    fn size(&self, key: &str) -> io::Result<Option<u64>> {
        match fs::metadata(self.path(key)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<Entry>> {
        fn walk(dir: &Path, key: &str, out: &mut Vec<Entry>) -> io::Result<()> {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let ty = e.file_type()?;
                let key = format!("{key}{name}");
                if ty.is_dir() {
                    walk(&e.path(), &format!("{key}/"), out)?;
                } else if ty.is_file() {
                    // A file removed since the directory was read is not listed.
                    match e.metadata() {
                        Ok(m) => out.push(Entry { key, size: m.len() }),
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        }
        // The prefix names a folder, or a folder and the start of a file name in it.
        let (folder, start) = match prefix.rfind('/') {
            Some(i) => (&prefix[..=i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let mut out = Vec::new();
        walk(&self.path(folder), folder, &mut out)?;
        out.retain(|e| e.key[folder.len()..].starts_with(start));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn will_need(&self, key: &str, offset: u64, len: u64) {
        if let Ok(f) = self.file(key) {
            fsutil::will_need(&f, offset, len);
        }
    }

    fn put(&self, key: &str, bytes: &[u8], durability: Durability) -> io::Result<()> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root);
        if !dir.is_dir() {
            fs::create_dir_all(dir)?;
        }
        fsutil::replace_file(&path, bytes, durability == Durability::Synced)
    }

    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root);
        if !dir.is_dir() {
            fs::create_dir_all(dir)?;
            fsutil::sync_directory(dir.parent().unwrap_or(&self.root))?;
        }
        Ok(Box::new(writer::LocalWriter::create(&path, true)?))
    }

    fn is_being_written(&self, key: &str) -> bool {
        match File::open(self.path(key)) {
            Ok(f) => f.try_lock_shared().is_err(),
            Err(_) => false,
        }
    }

    fn sync(&self, key: &str) -> io::Result<()> {
        File::open(self.path(key))?.sync_all()
    }

    fn delete(&self, keys: &[String], durability: Durability) -> io::Result<()> {
        let mut dirs = Vec::new();
        for key in keys {
            self.forget(key);
            let path = self.path(key);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some(d) = path.parent() {
                dirs.push(d.to_path_buf());
            }
        }
        if durability == Durability::Synced {
            dirs.sort();
            dirs.dedup();
            for d in dirs.iter().filter(|d| d.is_dir()) {
                fsutil::sync_directory(d)?;
            }
        }
        Ok(())
    }

    fn try_lock(&self, key: &str, kind: LockKind, read_only: bool) -> io::Result<LockAttempt> {
        let path = self.path(key);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        let file = match opened {
            Ok(f) => f,
            // flock needs no write access: a reader locks the existing file through a
            // read-only descriptor.
            Err(e) if read_only && super::is_not_writable(&e) => {
                File::open(&path).map_err(|_| e)?
            }
            Err(e) => return Err(e),
        };
        let r = match kind {
            LockKind::Shared => file.try_lock_shared(),
            LockKind::Exclusive => file.try_lock(),
        };
        match r {
            Ok(()) if kind == LockKind::Exclusive && self.someone_waits(key) => {
                // Dropping `file` releases the flock just taken.
                Ok(LockAttempt::Busy {
                    holder: Some("a backup or restore is waiting for it".into()),
                })
            }
            Ok(()) => Ok(LockAttempt::Held(LockGuard::new(file))),
            Err(TryLockError::WouldBlock) => Ok(LockAttempt::Busy { holder: None }),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    fn wait_turn(&self, key: &str) -> io::Result<LockGuard> {
        let folder = self.path(&waiting_folder(key));
        match fs::create_dir(&folder) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut token = [0u8; 8];
        getrandom::fill(&mut token).map_err(|e| io::Error::other(e.to_string()))?;
        let name = format!("{}-{}", std::process::id(), hex::encode(token));
        // Locked under a hidden name, then renamed: an exclusive attempt sees only marks
        // already locked, so it never takes a live waiter's mark for a dead one.
        let hidden = folder.join(format!(".{name}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&hidden)?;
        let placed = file
            .try_lock_shared()
            .map_err(io::Error::from)
            .and_then(|()| fs::rename(&hidden, folder.join(&name)));
        if let Err(e) = placed {
            let _ = fs::remove_file(&hidden);
            return Err(e);
        }
        Ok(LockGuard::new(WaitMark {
            path: folder.join(name),
            _file: file,
        }))
    }
}

/// The folder of the marks of processes waiting for a shared hold of lock `key`.
fn waiting_folder(key: &str) -> String {
    format!("{key}.waiting")
}

/// A waiting process's mark: a file it keeps `flock`ed (so a killed waiter's mark is known
/// dead), removed when dropped.
struct WaitMark {
    path: PathBuf,
    _file: File,
}

impl Drop for WaitMark {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl LocalBackend {
    /// True when a live process waits for a shared hold of lock `key` (see
    /// [`Backend::wait_turn`]). Marks left by killed waiters are removed on the way; a mark
    /// that cannot be read counts as no one.
    fn someone_waits(&self, key: &str) -> bool {
        let folder = self.path(&waiting_folder(key));
        let Ok(entries) = fs::read_dir(&folder) else {
            return false;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            let Ok(file) = File::open(&path) else {
                continue;
            };
            match file.try_lock() {
                Err(TryLockError::WouldBlock) if !hidden => return true,
                // A hidden mark is being placed (or was left by a waiter killed while placing
                // it): only an old one is removed.
                Ok(()) if hidden => {
                    let old = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default().as_secs() > 60);
                    if old {
                        let _ = fs::remove_file(&path);
                    }
                }
                Ok(()) => {
                    let _ = fs::remove_file(&path);
                }
                Err(_) => {}
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_list_by_folder() {
        let t = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(&t.path().join("r")).unwrap();
        b.put("config.toml", b"c", Durability::Synced).unwrap();
        b.put("keys/a.key", b"k1", Durability::Synced).unwrap();
        b.put("data/ab/ab01.pack", b"pack", Durability::Unsynced)
            .unwrap();
        b.put("data/cd/cd02.pack", b"pack2", Durability::Synced)
            .unwrap();
        assert_eq!(b.get("keys/a.key").unwrap(), b"k1");
        assert_eq!(
            b.list("data/").unwrap(),
            vec![
                Entry {
                    key: "data/ab/ab01.pack".into(),
                    size: 4
                },
                Entry {
                    key: "data/cd/cd02.pack".into(),
                    size: 5
                }
            ]
        );
        assert_eq!(b.list("keys/").unwrap().len(), 1);
        assert!(b.list("nothing/").unwrap().is_empty());
        let mut buf = [0u8; 3];
        b.get_range("data/cd/cd02.pack", 2, &mut buf).unwrap();
        assert_eq!(&buf, b"ck2");
        let short = b.get_range("data/cd/cd02.pack", 4, &mut buf).unwrap_err();
        assert_eq!(short.kind(), ErrorKind::UnexpectedEof);
        b.delete(
            &["data/ab/ab01.pack".into(), "gone".into()],
            Durability::Synced,
        )
        .unwrap();
        assert_eq!(b.size("data/ab/ab01.pack").unwrap(), None);
        assert_eq!(
            b.get("data/ab/ab01.pack").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn locks_exclude_as_their_kind_says() {
        let t = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(t.path()).unwrap();
        b.make_folder("locks/").unwrap();
        let held = |a: LockAttempt| matches!(a, LockAttempt::Held(_));
        let s1 = b.try_lock("locks/x", LockKind::Shared, false).unwrap();
        assert!(held(
            b.try_lock("locks/x", LockKind::Shared, false).unwrap()
        ));
        assert!(!held(
            b.try_lock("locks/x", LockKind::Exclusive, false).unwrap()
        ));
        drop(s1);
        let e = b.try_lock("locks/x", LockKind::Exclusive, false).unwrap();
        assert!(held(e));
    }

    #[test]
    fn an_exclusive_attempt_gives_way_to_a_live_waiter_only() {
        let t = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(t.path()).unwrap();
        b.make_folder("locks/").unwrap();
        let held = |a: LockAttempt| matches!(a, LockAttempt::Held(_));
        let mark = b.wait_turn("locks/x").unwrap();
        let busy = b.try_lock("locks/x", LockKind::Exclusive, false).unwrap();
        assert!(
            matches!(&busy, LockAttempt::Busy { holder: Some(h) } if h.contains("waiting")),
            "an exclusive attempt with a waiter present must be refused"
        );
        drop(busy);
        // The waiter itself still gets its shared hold.
        assert!(held(
            b.try_lock("locks/x", LockKind::Shared, false).unwrap()
        ));
        drop(mark);
        assert!(held(
            b.try_lock("locks/x", LockKind::Exclusive, false).unwrap()
        ));
        // A mark no process keeps locked (its waiter was killed) is removed, not obeyed.
        let dead = t.path().join("locks/x.waiting/4242-dead");
        std::fs::write(&dead, b"").unwrap();
        assert!(held(
            b.try_lock("locks/x", LockKind::Exclusive, false).unwrap()
        ));
        assert!(!dead.exists());
    }

    #[test]
    fn a_streamed_object_is_being_written_until_its_guard_drops() {
        let t = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(t.path()).unwrap();
        let mut w = b.create("data/ab/x.pack").unwrap();
        w.write(b"hello").unwrap();
        assert!(b.is_being_written("data/ab/x.pack"));
        let done = w.finish().unwrap();
        assert!(b.is_being_written("data/ab/x.pack"));
        drop(done);
        assert!(!b.is_being_written("data/ab/x.pack"));
        assert_eq!(b.get("data/ab/x.pack").unwrap(), b"hello");
        let w = b.create("data/ab/y.pack").unwrap();
        w.abandon();
        assert_eq!(b.size("data/ab/y.pack").unwrap(), None);
        assert!(b.create("data/ab/x.pack").is_err(), "exists");
    }
}
