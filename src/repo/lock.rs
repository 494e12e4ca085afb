//! Repository locks (`locks/`), held with `flock` so that they vanish with a killed process.
//!
//! * `locks/repository.lock`: shared by every command that adds or reads data (ingest, extract,
//!   check, mount); exclusive for commands that rewrite or delete (index rebuild, repair, prune,
//!   gc). A command waits for the lock only as long as `--lock-wait` says (default: not at all).
//! * `locks/vm-<hash>.lock`: exclusive per VM while it is being ingested, so two ingests of
//!   different VMs run side by side but two of the same VM do not.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// How a command uses the repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Only reads (list, extract, mount, serve-nbd, check): the shared lock when it can be
    /// taken; on a repository this process cannot write (read-only media, a filesystem
    /// snapshot, another user's repository) the existing lock file is locked through a
    /// read-only descriptor, or, if there is none, the command runs unguarded and says so.
    Read,
    /// Adds or reads data; many may run at once.
    Shared,
    /// Rewrites or deletes data; must run alone.
    Exclusive,
}

/// A held lock; released on drop or process exit.
#[derive(Debug)]
pub struct Lock {
    file: Option<File>,
    /// Why no lock is held (a read-only command on a repository it cannot write).
    unguarded: Option<String>,
}

impl Lock {
    /// When no lock could be taken: what the command could not guard against.
    pub fn unguarded(&self) -> Option<&str> {
        self.unguarded.as_deref()
    }

    /// True when a lock file is held.
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }
}

/// True for the errors that say "this process may not write here".
fn is_not_writable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
    )
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx("open lock file", path)
}

/// Takes the repository lock in `mode`. If another process holds it, waits up to `wait`
/// (calling `on_wait` once with a message), then fails with a message saying who holds it.
pub fn lock_repository(
    root: &Path,
    mode: LockMode,
    wait: Duration,
    on_wait: &dyn Fn(&str),
) -> Result<Lock> {
    let path = root.join("locks").join("repository.lock");
    let file = match (mode, open_lock_file(&path)) {
        (_, Ok(f)) => f,
        (LockMode::Read, Err(Error::Io { cause, .. })) if is_not_writable(&cause) => {
            // flock needs no write access: lock the existing file through a read-only
            // descriptor; without one, run unguarded.
            match File::open(&path) {
                Ok(f) => f,
                Err(_) => {
                    return Ok(Lock {
                        file: None,
                        unguarded: Some(format!(
                            "repository {} cannot be written by this process ({cause}), so no \
                             lock was taken: a prune or gc running elsewhere at the same time \
                             could remove what this command reads (it would then fail with an \
                             error; it never returns bytes that do not match their hash)",
                            root.display()
                        )),
                    });
                }
            }
        }
        (_, Err(e)) => return Err(e),
    };
    let holder = match mode {
        LockMode::Read | LockMode::Shared => {
            "a command that needs it alone (index rebuild, repair, prune or gc)"
        }
        LockMode::Exclusive => "another vmrepo process (ingest, extract, mount or check)",
    };
    wait_for(
        file,
        &path,
        mode != LockMode::Exclusive,
        wait,
        on_wait,
        &format!(
            "repository {} is in use by {holder}; retry when it has finished, or pass \
             --lock-wait SECONDS to wait for it",
            root.display()
        ),
        &format!(
            "waiting up to {} s for repository {}: it is in use by {holder}",
            wait.as_secs(),
            root.display()
        ),
    )
}

/// Takes `file`'s `flock` (shared or exclusive), retrying every 200 ms for up to `wait`; tells
/// `on_wait` once (`waiting`) when it has to wait, and fails with `busy` (plus how long it
/// waited) when the time is up.
fn wait_for(
    file: File,
    path: &Path,
    shared: bool,
    wait: Duration,
    on_wait: &dyn Fn(&str),
    busy: &str,
    waiting: &str,
) -> Result<Lock> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        let r = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match r {
            Ok(()) => {
                return Ok(Lock {
                    file: Some(file),
                    unguarded: None,
                })
            }
            Err(TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
            Err(TryLockError::WouldBlock) => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Locked(if wait.is_zero() {
                busy.to_string()
            } else {
                format!("{busy} (waited {} s)", wait.as_secs())
            }));
        }
        if !told {
            on_wait(waiting);
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Takes the per-VM ingest lock. The lock file is named by a hash of `tag` (the VM name, or
/// its keyed tag in an encrypted repository, so the name never shows in the repository). If
/// another ingest of the VM holds it, waits up to `wait` (the command's `--lock-wait`), calling
/// `on_wait` once.
pub fn lock_vm(
    root: &Path,
    vm: &str,
    tag: &str,
    wait: Duration,
    on_wait: &dyn Fn(&str),
) -> Result<Lock> {
    let tag = &blake3::hash(tag.as_bytes()).to_hex()[..16];
    let path = root.join("locks").join(format!("vm-{tag}.lock"));
    let file = open_lock_file(&path)?;
    wait_for(
        file,
        &path,
        false,
        wait,
        on_wait,
        &format!(
            "another ingest of VM {vm:?} is running on repository {}; one VM is ingested by one \
             process at a time: retry when it has finished, or pass --lock-wait SECONDS to wait \
             for it",
            root.display()
        ),
        &format!(
            "waiting up to {} s for another ingest of VM {vm:?} to finish",
            wait.as_secs()
        ),
    )
}
