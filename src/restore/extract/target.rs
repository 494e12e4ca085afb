//! The files an extract writes: each first as a partial file inside the destination, opened
//! without following links, renamed into place when complete; the directories it made, to
//! remove again on failure.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::restore::safe_fs::{link_refused, Dir, Entry};

/// One file to restore: written as `partial` in `dir`, then renamed to `base`.
pub(super) struct Target {
    /// Name relative to the destination.
    pub(super) name: String,
    pub(super) dir: Arc<Dir>,
    pub(super) base: String,
    pub(super) partial: String,
    /// The final name existed before (only with `--force`).
    pub(super) existed: bool,
    /// The partial file was created (and must go on failure).
    pub(super) created: AtomicBool,
    /// Renamed into place.
    pub(super) placed: AtomicBool,
}

impl Target {
    pub(super) fn partial_path(&self) -> PathBuf {
        self.dir.path_of(&self.partial)
    }

    /// Creates the partial file (replacing a stale one, never following a link).
    pub(super) fn create(&self) -> Result<(File, PathBuf)> {
        let f = self.dir.create_replacing(&self.partial, 0o666)?;
        self.created.store(true, Ordering::SeqCst);
        Ok((f, self.partial_path()))
    }
}

pub(super) const IN_DEST: &str = "inside the destination";

/// The directories of the destination, opened without following links, and those extract
/// created (to remove again on failure).
pub(super) struct DestDirs {
    pub(super) root: Arc<Dir>,
    /// Directory (relative, "" for the root) → opened handle.
    pub(super) open: HashMap<String, Arc<Dir>>,
    /// Directories created, in order: (parent, name).
    pub(super) created: Vec<(Arc<Dir>, String)>,
}

impl DestDirs {
    /// Opens (creating if needed) the directory `rel` under the destination.
    pub(super) fn dir(&mut self, rel: &str) -> Result<Arc<Dir>> {
        if let Some(d) = self.open.get(rel) {
            return Ok(d.clone());
        }
        let (parent, name) = match rel.rfind('/') {
            Some(i) => (self.dir(&rel[..i])?, &rel[i + 1..]),
            None => (self.root.clone(), rel),
        };
        let (d, created) = parent.make_dir(name, IN_DEST)?;
        if created {
            self.created.push((parent, name.to_string()));
        }
        let d = Arc::new(d);
        self.open.insert(rel.to_string(), d.clone());
        Ok(d)
    }

    /// Removes the directories created, deepest first (each only if empty).
    pub(super) fn remove_created(&self) {
        for (parent, name) in self.created.iter().rev() {
            let _ = parent.remove_dir(name);
        }
    }
}

/// Looks at where `name` will go, following no link: whether it exists, and an error for
/// anything extract must not write through or over.
pub(super) fn check_target(root: &Dir, name: &str, force: bool) -> Result<bool> {
    let parts: Vec<&str> = name.split('/').collect();
    let (leaf, dirs) = parts.split_last().expect("not empty");
    let mut owned: Option<Dir> = None;
    for d in dirs {
        let cur = owned.as_ref().unwrap_or(root);
        match cur.entry(d)? {
            None => return Ok(false),
            Some(Entry::Dir) => owned = Some(cur.open_dir(d, IN_DEST)?),
            Some(Entry::Link(t)) => return Err(link_refused(&cur.path_of(d), &t, IN_DEST)),
            Some(_) => {
                return Err(Error::io(
                    "write into",
                    cur.path_of(d),
                    io::Error::other(
                        "it is a file, not a directory: remove or rename it, or extract into \
                         another directory",
                    ),
                ))
            }
        }
    }
    let cur = owned.as_ref().unwrap_or(root);
    let path = cur.path_of(leaf);
    match cur.entry(leaf)? {
        None => Ok(false),
        Some(Entry::Dir) => Err(Error::io(
            "restore",
            &path,
            io::Error::other(
                "a directory has this name (even --force replaces only files): remove or rename \
                 it, or extract into another directory",
            ),
        )),
        Some(Entry::Link(t)) if !force => Err(Error::io(
            "restore",
            &path,
            io::Error::other(format!(
                "it is a symbolic link (to {}); pass --force to replace the link itself with the \
                 restored file (what it points to is never written), or extract into another \
                 directory",
                t.display()
            )),
        )),
        Some(_) if !force => Err(Error::Exists(path)),
        Some(_) => Ok(true),
    }
}
