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
    /// Adds or reads data; many may run at once.
    Shared,
    /// Rewrites or deletes data; must run alone.
    Exclusive,
}

/// A held lock; released on drop or process exit.
#[derive(Debug)]
pub struct Lock {
    _file: File,
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
    let file = open_lock_file(&path)?;
    let holder = match mode {
        LockMode::Shared => "a command that needs it alone (index rebuild, repair, prune or gc)",
        LockMode::Exclusive => "another vmrepo process (ingest, extract, mount or check)",
    };
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        let r = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match r {
            Ok(()) => return Ok(Lock { _file: file }),
            Err(TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
            Err(TryLockError::WouldBlock) => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Locked(format!(
                "repository {} is in use by {holder}; retry when it has finished, or pass \
                 --lock-wait SECONDS to wait for it{}",
                root.display(),
                if wait.is_zero() {
                    String::new()
                } else {
                    format!(" (waited {} s)", wait.as_secs())
                }
            )));
        }
        if !told {
            on_wait(&format!(
                "waiting up to {} s for repository {}: it is in use by {holder}",
                wait.as_secs(),
                root.display()
            ));
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Takes the per-VM ingest lock. The lock file is named by a hash of `tag` (the VM name, or
/// its keyed tag in an encrypted repository, so the name never shows in the repository).
pub fn lock_vm(root: &Path, vm: &str, tag: &str) -> Result<Lock> {
    let tag = &blake3::hash(tag.as_bytes()).to_hex()[..16];
    let path = root.join("locks").join(format!("vm-{tag}.lock"));
    let file = open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(Lock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(Error::Locked(format!(
            "another ingest of VM {vm:?} is running on repository {}; one VM is ingested by one process at a time",
            root.display()
        ))),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}
