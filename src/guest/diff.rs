//! `vmrepo diff` and `vmrepo log`: what changed in a guest filesystem between generations.
//!
//! A file counts as changed when its kind, size, modification time, mode, owner or symlink
//! target differs (the quick check rsync and backup tools make); contents are not compared.
//! Directories are walked in both generations at once; a directory present on one side only is
//! reported once, with the number of entries under it.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::guest::{join, Entry, Filesystem};

/// Directory depth followed at most (a damaged filesystem may loop).
const MAX_DEPTH: usize = 256;

/// One difference between two trees.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Change {
    /// `added`, `removed` or `changed`.
    pub what: &'static str,
    /// Path in the guest.
    pub path: String,
    /// What differs, for `changed` (`size 20 -> 35`, `mtime`, ...); for a directory added or
    /// removed, how many entries it holds.
    pub detail: String,
}

/// The differences between `path` in `old` and in `new` (both directories), in path order.
pub fn diff(old: &Filesystem, new: &Filesystem, path: &str) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    walk(old, new, path, 0, &mut out)?;
    Ok(out)
}

fn walk(
    old: &Filesystem,
    new: &Filesystem,
    path: &str,
    depth: usize,
    out: &mut Vec<Change>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::GuestFilesystem(format!(
            "{}: directories nested deeper than {MAX_DEPTH} levels (a loop?)",
            new.describe(path)
        )));
    }
    let a = old.list(path)?;
    let b = new.list(path)?;
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let order = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                out.push(one_sided("removed", old, path, &a[i], depth)?);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(one_sided("added", new, path, &b[j], depth)?);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (&a[i], &b[j]);
                let child = join(path, &x.name);
                if x.kind == "dir" && y.kind == "dir" {
                    let what = differences(x, y);
                    // A directory's own mode or owner: its entries are compared below anyway.
                    if what
                        .iter()
                        .any(|w| !w.starts_with("mtime") && !w.starts_with("size"))
                    {
                        out.push(Change {
                            what: "changed",
                            path: child.clone(),
                            detail: what.join(", "),
                        });
                    }
                    walk(old, new, &child, depth + 1, out)?;
                } else {
                    let what = differences(x, y);
                    if !what.is_empty() {
                        out.push(Change {
                            what: "changed",
                            path: child,
                            detail: what.join(", "),
                        });
                    }
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

/// An entry on one side only; a directory with the count of what it holds.
fn one_sided(
    what: &'static str,
    fs: &Filesystem,
    dir: &str,
    e: &Entry,
    depth: usize,
) -> Result<Change> {
    let path = join(dir, &e.name);
    let detail = if e.kind == "dir" {
        format!("directory, {} entries", count(fs, &path, depth + 1)?)
    } else {
        format!("{}, {} bytes", e.kind, e.size)
    };
    Ok(Change { what, path, detail })
}

fn count(fs: &Filesystem, path: &str, depth: usize) -> Result<u64> {
    if depth > MAX_DEPTH {
        return Err(Error::GuestFilesystem(format!(
            "{}: directories nested deeper than {MAX_DEPTH} levels (a loop?)",
            fs.describe(path)
        )));
    }
    let mut n = 0;
    for e in fs.list(path)? {
        n += 1;
        if e.kind == "dir" {
            n += count(fs, &join(path, &e.name), depth + 1)?;
        }
    }
    Ok(n)
}

/// What differs between two versions of one entry.
pub fn differences(a: &Entry, b: &Entry) -> Vec<String> {
    let mut d = Vec::new();
    if a.kind != b.kind {
        d.push(format!("{} -> {}", a.kind, b.kind));
        return d;
    }
    if a.size != b.size {
        d.push(format!("size {} -> {}", a.size, b.size));
    }
    if (a.mtime, a.mtime_nanos) != (b.mtime, b.mtime_nanos) {
        d.push("mtime".to_string());
    }
    if a.mode != b.mode {
        d.push(format!("mode {:o} -> {:o}", a.mode, b.mode));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        d.push(format!("owner {}:{} -> {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    if a.target != b.target {
        d.push(format!(
            "target {} -> {}",
            a.target.as_deref().unwrap_or(""),
            b.target.as_deref().unwrap_or("")
        ));
    }
    d
}
