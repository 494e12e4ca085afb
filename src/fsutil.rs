//! Small file helpers: atomic replace, directory fsync, read-ahead hints, and the private
//! directories a killed process left behind.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{IoContext, Result};

/// Fsyncs a directory so that entries created or renamed in it survive a crash.
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `data` atomically: a temp file beside it, then a rename over `path`. With
/// `durable`, the temp file is fsynced before the rename and the directory after it, so that a
/// crash leaves either the old or the new whole file; without, only the atomicity holds.
pub fn replace_file(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            sync_directory(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`sync_directory`] with the directory named in the error.
pub fn sync_dir(dir: &Path) -> Result<()> {
    sync_directory(dir).ctx("fsync directory", dir)
}

/// [`replace_file`], durable, with the file named in the error.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    replace_file(path, data, true).ctx("write (temp file, fsync, rename)", path)
}

/// Whether `path` (which need not exist yet) is directory `dir` or lies below it, links
/// resolved: `path` is walked a component at a time, each prefix that exists resolved
/// (`realpath`), and names that do not exist yet kept as they are (they will be made as
/// directories or files, not links), `..` among them taken lexically. False when `dir` does
/// not resolve (an object-storage location, say).
pub fn lies_within(path: &Path, dir: &Path) -> bool {
    use std::path::{Component, PathBuf};
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let absolute = match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path.to_path_buf(),
    };
    let mut resolved = PathBuf::from("/");
    for c in absolute.components() {
        match c {
            Component::Prefix(_) | Component::CurDir => {}
            Component::RootDir => resolved = PathBuf::from("/"),
            // `resolved` holds no link: its parent is what `..` reaches.
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => {
                let next = resolved.join(name);
                resolved = std::fs::canonicalize(&next).unwrap_or(next);
            }
        }
    }
    resolved.starts_with(&dir)
}

/// Bytes per read-ahead hint. Linux reads at most max(read_ahead_kb, max_sectors_kb) of one
/// `POSIX_FADV_WILLNEED` call and silently drops the rest (128 KiB with the default
/// read_ahead_kb): a whole-file hint of a 55 MB index brought in its first 8 MiB on the
/// project's VM. Hints are therefore given in steps of this size.
pub const HINT_STEP: u64 = 128 << 10;

/// Asks the kernel to start reading `len` bytes of `file` at `offset` into the page cache,
/// without waiting, in [`HINT_STEP`] pieces so that all of it is read. Advisory: errors are
/// ignored (the later read reports them).
pub fn will_need(file: &File, offset: u64, len: u64) {
    let fd = file.as_raw_fd();
    let end = offset.saturating_add(len);
    let mut at = offset;
    while at < end {
        let n = HINT_STEP.min(end - at);
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        unsafe {
            libc::posix_fadvise(
                fd,
                at as libc::off_t,
                n as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        at += n;
    }
}

/// True when no process `pid` exists on this host (`kill(pid, 0)` says ESRCH). Our own pid
/// and pids that cannot be asked about count as alive.
pub fn process_is_gone(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
    let failed = unsafe { libc::kill(pid, 0) } == -1;
    failed && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes the directories in `parent` named `PREFIX<pid>-...` whose process is gone: what a
/// killed run left (temporary sets, staged files). Best effort. `parent` may be a shared
/// temporary directory: only real directories owned by this process's user are removed, never
/// a symbolic link's target or what another user made under a name like ours.
pub fn remove_dirs_of_dead_processes(parent: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // The entry itself, not what a link names.
        let ours = fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && process_is_gone(pid) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has now: a child that has been waited for.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn lies_within_resolves_links_and_dot_dots_of_names_not_made_yet() {
        let t = tempfile::tempdir().unwrap();
        let t = fs::canonicalize(t.path()).unwrap();
        let repo = t.join("repo");
        fs::create_dir_all(repo.join("data")).unwrap();
        fs::create_dir_all(t.join("repo2")).unwrap();
        std::os::unix::fs::symlink(repo.join("data"), t.join("link")).unwrap();
        for inside in [
            "repo",
            "repo/",
            "repo/data/new/x",
            "link",
            "link/x/y",
            "nope/../repo/x",
            "repo2/../repo",
            "link/../new",
        ] {
            assert!(lies_within(&t.join(inside), &repo), "{inside}");
        }
        for outside in [
            "repo2",
            "repo2/x",
            "other",
            "repo/../other",
            "repo/data/../../x",
        ] {
            assert!(!lies_within(&t.join(outside), &repo), "{outside}");
        }
        assert!(!lies_within(&repo, &t.join("missing")));
    }

    #[test]
    fn only_our_own_left_over_directories_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("tmp");
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir_all(&shared).unwrap();
        fs::create_dir_all(elsewhere.join("keep")).unwrap();
        fs::write(elsewhere.join("keep/file"), b"x").unwrap();
        let dead = dead_pid();
        let left = shared.join(format!("vmrepo-x-{dead}-1"));
        fs::create_dir(&left).unwrap();
        fs::write(left.join("part"), b"set").unwrap();
        let alive = shared.join(format!("vmrepo-x-{}-2", std::process::id()));
        fs::create_dir(&alive).unwrap();
        // Planted by someone else: a link with a dead pid's name to a directory to keep.
        let link = shared.join(format!("vmrepo-x-{dead}-3"));
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        // Another user's directory under a name like ours (only root can make one here).
        let theirs = shared.join(format!("vmrepo-x-{dead}-4"));
        fs::create_dir(&theirs).unwrap();
        let foreign = std::os::unix::fs::chown(&theirs, Some(54_321), None).is_ok();

        remove_dirs_of_dead_processes(&shared, "vmrepo-x-");
        assert!(!left.exists(), "a dead run's directory stays");
        assert!(alive.exists(), "a live run's directory went");
        assert!(link.symlink_metadata().is_ok(), "the planted link went");
        assert!(
            elsewhere.join("keep/file").exists(),
            "the link's target was emptied"
        );
        if foreign {
            assert!(theirs.exists(), "another user's directory went");
        }
    }
}
