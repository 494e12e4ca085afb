//! The index file on disk: its path, a fresh path for a rebuild, swapping a rebuilt index in,
//! and the read-ahead hint, which goes through one descriptor that is never closed (closing any
//! descriptor of the database file would drop this process's SQLite locks on it).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Name of the index database inside a repository.
pub const INDEX_FILE: &str = "index.sqlite";

/// The index database of the repository at `root`.
pub fn index_path(root: &Path) -> PathBuf {
    root.join(INDEX_FILE)
}

/// Whether the directory `root` holds an index (a `stat`, which opens no descriptor).
pub fn index_exists(root: &Path) -> bool {
    index_path(root).exists()
}

/// A free path for a new index built beside the live one (`index.sqlite.rebuild`): a
/// left-over of an interrupted rebuild there is removed first.
pub fn fresh_rebuild_path(root: &Path) -> Result<PathBuf> {
    for suffix in ["", "-wal", "-shm"] {
        let p = root.join(format!("{INDEX_FILE}.rebuild{suffix}"));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove left-over rebuild", &p, e)),
        }
    }
    Ok(root.join(format!("{INDEX_FILE}.rebuild")))
}

/// Makes the index at `new` (closed, checkpointed) the live index of the repository at `root`.
/// The previous live index, if any, is moved to `index.sqlite.old-<UTC time>` for inspection
/// (returned); older such copies are removed, so one is kept. Renames only: no descriptor of a
/// live index file is opened or closed here (see [`HELD_DESCRIPTORS`]). The caller must hold
/// the repository exclusively and drop its connections to the old index afterwards.
pub fn replace_live(root: &Path, new: &Path) -> Result<Option<PathBuf>> {
    let live = index_path(root);
    let stale_copies: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io("list", root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&format!("{INDEX_FILE}.old-")))
        })
        .map(|e| e.path())
        .collect();
    let mut old_copy = None;
    if live.exists() {
        let stamp = jiff::Timestamp::now()
            .strftime("%Y%m%dT%H%M%SZ")
            .to_string();
        let old = root.join(format!("{INDEX_FILE}.old-{stamp}"));
        std::fs::rename(&live, &old).map_err(|e| Error::io("move aside", &live, e))?;
        for suffix in ["-wal", "-shm"] {
            let p = root.join(format!("{INDEX_FILE}{suffix}"));
            if p.exists() {
                let _ = std::fs::rename(&p, root.join(format!("{INDEX_FILE}.old-{stamp}{suffix}")));
            }
        }
        old_copy = Some(old);
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(root.join(format!("{}{suffix}", new.display())));
    }
    std::fs::rename(new, &live).map_err(|e| Error::io("move into place", &live, e))?;
    crate::fsutil::sync_dir(root)?;
    for p in stale_copies {
        let _ = std::fs::remove_file(p);
    }
    Ok(old_copy)
}

/// Descriptors of index files that this process opened itself (for read-ahead hints): one per
/// file (device and inode), opened once and never closed.
///
/// SQLite guards its database with POSIX advisory locks (`fcntl`), and POSIX drops *every*
/// such lock a process holds on a file when the process closes *any* descriptor of that file,
/// whoever opened it. A `File::open` + drop of `index.sqlite` (or its `-wal`/`-shm`) while a
/// connection of this process holds a lock therefore silently releases it, and a concurrent
/// writer in another process corrupts the database (SQLite's "How To Corrupt An SQLite
/// Database File", section 2.2). So vmrepo opens an index file outside SQLite only here, and
/// keeps that descriptor for the life of the process. Nothing else in the crate may open an
/// index file but [`Index::open`]; `tests::index_file_is_opened_only_by_sqlite_and_here`
/// enforces it.
static HELD_DESCRIPTORS: std::sync::Mutex<Vec<(u64, u64, &'static std::fs::File)>> =
    std::sync::Mutex::new(Vec::new());

/// A descriptor of the index file at `path` that stays open until the process exits (see
/// [`HELD_DESCRIPTORS`]); `None` if it cannot be opened.
fn held_descriptor(path: &Path) -> Option<&'static std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mut held = HELD_DESCRIPTORS.lock().unwrap();
    if let Some((_, _, f)) = held
        .iter()
        .find(|(dev, ino, _)| *dev == meta.dev() && *ino == meta.ino())
    {
        return Some(f);
    }
    let file: &'static std::fs::File = Box::leak(Box::new(std::fs::File::open(path).ok()?));
    let opened = file.metadata().ok()?;
    held.push((opened.dev(), opened.ino(), file));
    Some(file)
}

/// Asks the kernel to read the index file at `path` into the page cache, when it is small next
/// to memory (at most 1/16 of it): an ingest's lookups of a cold index then cost one sequential
/// read instead of a random read each. Advisory and best effort; may take a moment, so call it
/// off the critical path. Safe beside open connections: the descriptor is never closed.
pub fn prefetch_file(path: &Path) {
    let Some(f) = held_descriptor(path) else {
        return;
    };
    let Ok(meta) = f.metadata() else {
        return;
    };
    if !small_next_to_memory(meta.len()) {
        return;
    }
    crate::fsutil::will_need(f, 0, meta.len());
}

/// True when an index file of `len` bytes is at most 1/16 of the machine's memory: small
/// enough for [`prefetch_file`] to read it ahead whole.
pub fn small_next_to_memory(len: u64) -> bool {
    // SAFETY: sysconf only reads its argument.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    pages > 0 && page > 0 && len <= (pages as u64).saturating_mul(page as u64) / 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::crypto::Keys;
    use crate::repo::index::Index;
    use std::sync::Arc;

    /// The held descriptor is opened once per file and reused, so hinting again never closes
    /// one.
    #[test]
    fn prefetch_reuses_one_descriptor_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INDEX_FILE);
        let _idx = Index::open(&path, true, Arc::new(Keys::none())).unwrap();
        let a = held_descriptor(&path).unwrap() as *const std::fs::File;
        prefetch_file(&path);
        let b = held_descriptor(&path).unwrap() as *const std::fs::File;
        assert_eq!(a, b);
    }
}
