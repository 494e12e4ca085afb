//! Repository locks (`locks/`), held with `flock` so that they vanish with a killed process.
//!
//! * `locks/repository.lock`: shared by every command that adds or reads data (ingest, extract,
//!   check); exclusive for commands that rewrite or delete (index rebuild, and later prune/gc).
//! * `locks/vm-<hash>.lock`: exclusive per VM while it is being ingested, so two ingests of
//!   different VMs run side by side but two of the same VM do not.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

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

/// Takes the repository lock in `mode`, or fails at once with a message saying who holds it.
pub fn lock_repository(root: &Path, mode: LockMode) -> Result<Lock> {
    let path = root.join("locks").join("repository.lock");
    let file = open_lock_file(&path)?;
    let r = match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    };
    match r {
        Ok(()) => Ok(Lock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(Error::Locked(match mode {
            LockMode::Shared => format!(
                "repository {} is locked by a command that needs it alone (index rebuild, prune or gc) \
                 in another process; retry when it has finished",
                root.display()
            ),
            LockMode::Exclusive => format!(
                "repository {} is in use by another vmrepo process (ingest, extract or check); \
                 this command needs it alone, retry when they have finished",
                root.display()
            ),
        })),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// Takes the per-VM ingest lock.
pub fn lock_vm(root: &Path, vm: &str) -> Result<Lock> {
    let tag = &blake3::hash(vm.as_bytes()).to_hex()[..16];
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
