//! Repository locks (`locks/`), taken through the backend (`flock`s on files for a local
//! repository, so that they vanish with a killed process).
//!
//! * `locks/repository.lock`: shared by every command that adds or reads data (ingest, extract,
//!   check, mount); exclusive for commands that rewrite or delete (index rebuild, repair, prune,
//!   gc). A command waits for the lock only as long as `--lock-wait` says (default: not at all).
//!   A command waiting for a shared hold marks itself waiting, and exclusive attempts give way
//!   to it: maintenance never keeps backups and restores out run after run.
//! * `locks/vm-<hash>.lock`: exclusive per VM while it is being ingested, so two ingests of
//!   different VMs run side by side but two of the same VM do not.

use std::time::{Duration, Instant};

use crate::backend::{is_not_writable, Backend, LockAttempt, LockGuard, LockKind};
use crate::error::{Advice, Error, Result, Setting};
use crate::repo::layout;

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

impl LockMode {
    /// The lock of a command that rewrites or deletes data (prune, gc): exclusive, or for a
    /// dry run, which changes nothing, only [`LockMode::Read`].
    pub fn for_changes(dry_run: bool) -> LockMode {
        if dry_run {
            LockMode::Read
        } else {
            LockMode::Exclusive
        }
    }
}

/// A held lock; released on drop or process exit.
#[derive(Debug)]
pub struct Lock {
    guard: Option<LockGuard>,
    /// Why no lock is held (a read-only command on a repository it cannot write).
    unguarded: Option<String>,
}

impl Lock {
    /// When no lock could be taken: what the command could not guard against.
    pub fn unguarded(&self) -> Option<&str> {
        self.unguarded.as_deref()
    }

    /// True when the lock was held but may have been lost since: a lock in object storage
    /// that could not be renewed in time, which others may since have taken.
    pub fn is_lost(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.is_lost())
    }

    /// True when a lock is held.
    pub fn is_held(&self) -> bool {
        self.guard.is_some()
    }
}

/// Takes the repository lock in `mode`. If another process holds it, waits up to `wait`
/// (calling `on_wait` once with a message), then fails with a message saying who holds it.
pub fn lock_repository(
    backend: &dyn Backend,
    mode: LockMode,
    wait: Duration,
    on_wait: &dyn Fn(&str),
) -> Result<Lock> {
    let root = backend.location();
    let holder = match mode {
        LockMode::Read | LockMode::Shared => {
            "a command that needs it alone (index rebuild, repair, prune or gc)"
        }
        LockMode::Exclusive => "another vmrepo process (ingest, extract, mount or check)",
    };
    let kind = match mode {
        LockMode::Exclusive => LockKind::Exclusive,
        _ => LockKind::Shared,
    };
    let taken = wait_for(
        backend,
        layout::REPOSITORY_LOCK,
        kind,
        mode == LockMode::Read,
        wait,
        on_wait,
        Advice::new(format!(
            "repository {} is in use by {holder}; retry when it has finished, or use ",
            root.display()
        ))
        .setting(Setting::LockWait)
        .text(" to wait for it"),
        &format!(
            "waiting up to {} s for repository {}: it is in use by {holder}",
            wait.as_secs(),
            root.display()
        ),
    );
    match taken {
        // A reader with no lock it can take: run unguarded, and say so.
        Err(Error::Io { cause, .. }) if mode == LockMode::Read && is_not_writable(&cause) => {
            Ok(Lock {
                guard: None,
                unguarded: Some(format!(
                    "repository {} cannot be written by this process ({cause}), so no lock \
                     was taken: a prune or gc running elsewhere at the same time could remove \
                     what this command reads (it would then fail with an error; it never \
                     returns bytes that do not match their hash)",
                    root.display()
                )),
            })
        }
        other => other,
    }
}

/// Takes lock `key`, retrying about every 200 ms for up to `wait`; tells `on_wait` once
/// (`waiting`) when it has to wait, and fails with `busy` (plus how long it waited and the last
/// holder seen) when the time is up. A shared waiter marks itself waiting
/// ([`Backend::wait_turn`]), so exclusive commands give way to it.
#[allow(clippy::too_many_arguments)]
fn wait_for(
    backend: &dyn Backend,
    key: &str,
    kind: LockKind,
    read_only: bool,
    wait: Duration,
    on_wait: &dyn Fn(&str),
    busy: Advice,
    waiting: &str,
) -> Result<Lock> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    let mut holder = None;
    // Dropped (the mark removed) once the lock is taken or the wait given up.
    let mut _turn = None;
    loop {
        match backend.try_lock(key, kind, read_only) {
            Ok(LockAttempt::Held(guard)) => {
                return Ok(Lock {
                    guard: Some(guard),
                    unguarded: None,
                })
            }
            Ok(LockAttempt::Busy { holder: h }) => holder = h.or(holder),
            Err(e) => return Err(Error::io("lock", backend.path(key), e)),
        }
        if Instant::now() >= deadline {
            let mut busy = busy;
            if !wait.is_zero() {
                busy = busy.text(format!(" (waited {} s)", wait.as_secs()));
            }
            if let Some(h) = holder {
                busy = busy.text(format!("; last seen: {h}"));
            }
            return Err(Error::Locked(busy));
        }
        if !told {
            on_wait(waiting);
            told = true;
            if kind == LockKind::Shared {
                // Without the mark the wait still works, only without priority.
                _turn = backend.wait_turn(key).ok();
            }
        }
        std::thread::sleep(retry_pause());
    }
}

/// 150 to 250 ms: waiters that started together do not retry in step.
fn retry_pause() -> Duration {
    let mut b = [0u8; 1];
    let jitter = getrandom::fill(&mut b).map_or(50, |()| u64::from(b[0]) * 100 / 255);
    Duration::from_millis(150 + jitter)
}

/// Takes the lock under which key files are removed ([`layout::KEYS_LOCK`]), waiting up to
/// `wait` for another key command, calling `on_wait` once.
pub fn lock_keys(backend: &dyn Backend, wait: Duration, on_wait: &dyn Fn(&str)) -> Result<Lock> {
    wait_for(
        backend,
        layout::KEYS_LOCK,
        LockKind::Exclusive,
        false,
        wait,
        on_wait,
        Advice::new(format!(
            "another `vmrepo key` command is changing the key files of repository {}: retry \
             when it has finished, or use ",
            backend.location().display()
        ))
        .setting(Setting::LockWait)
        .text(" to wait for it"),
        &format!(
            "waiting up to {} s for another key command to finish",
            wait.as_secs()
        ),
    )
}

/// Takes the per-VM ingest lock. The lock is named by a hash of `tag` (the VM name, or its
/// keyed tag in an encrypted repository, so the name never shows in the repository). If
/// another ingest of the VM holds it, waits up to `wait` (the command's `--lock-wait`), calling
/// `on_wait` once.
pub fn lock_vm(
    backend: &dyn Backend,
    vm: &str,
    tag: &str,
    wait: Duration,
    on_wait: &dyn Fn(&str),
) -> Result<Lock> {
    let tag = &blake3::hash(tag.as_bytes()).to_hex()[..16];
    wait_for(
        backend,
        &layout::vm_lock(tag),
        LockKind::Exclusive,
        false,
        wait,
        on_wait,
        Advice::new(format!(
            "another ingest of VM {vm:?} is running on repository {}; one VM is ingested by one \
             process at a time: retry when it has finished, or use ",
            backend.location().display()
        ))
        .setting(Setting::LockWait)
        .text(" to wait for it"),
        &format!(
            "waiting up to {} s for another ingest of VM {vm:?} to finish",
            wait.as_secs()
        ),
    )
}
