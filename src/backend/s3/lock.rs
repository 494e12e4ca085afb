//! Locks in an S3 repository, without a server and without conditional writes.
//!
//! A holder writes an object `<lock name>/<shared|exclusive>-<random>`, then lists the lock's
//! folder. It holds the lock if no other live object conflicts (an exclusive one, or any other
//! when it wants exclusive); otherwise it deletes its object and reports the lock busy. Two
//! that race both see each other and both back off, which is safe; a later attempt succeeds.
//! This needs only what every store here gives: a listing shows an object whose PUT has
//! returned (a listing that lags a delete shows a lock a little longer: safe too).
//!
//! A shared attempt that found the lock busy leaves `<lock name>/waiting-<random>` for as long
//! as it waits ([`wait_turn`]); an exclusive attempt counts a live waiting object as a
//! conflict, so a command that needs the repository alone (prune, gc) gives way to the backups
//! already waiting instead of keeping them out one exclusive run after another.
//!
//! A held lock's object is written again every [`REFRESH`] by a thread of the guard and
//! deleted when the guard is dropped. A holder that was killed leaves its object behind; it is
//! ignored once it is [`STALE`] old. Age is measured on the store's clock alone: the
//! Last-Modified of the object just written is "now", so the clocks of the hosts may disagree
//! by any amount.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{io_error, S3Backend};
use crate::backend::{LockAttempt, LockGuard, LockKind};

/// How often a held lock's object is written again.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// Age (on the store's clock) after which a lock object no longer counts: a holder that could
/// not refresh it for this long is taken to be gone.
pub const STALE: Duration = Duration::from_secs(30 * 60);

pub(super) fn try_lock(
    b: &S3Backend,
    name: &str,
    kind: LockKind,
    _read_only: bool,
) -> io::Result<LockAttempt> {
    let kind_name = match kind {
        LockKind::Shared => "shared",
        LockKind::Exclusive => "exclusive",
    };
    let (path, body) = put_holder(b, name, kind_name)?;
    let release = || {
        b.counters.add(1, 0, 0);
        let _ = b.block_on(b.store.delete(&path));
    };
    let folder = b.object(name);
    b.counters.add(1, 0, 0);
    let listed: Vec<_> = match b.block_on(b.store.list(Some(&folder)).try_collect::<Vec<_>>()) {
        Ok(l) => l,
        Err(e) => {
            release();
            return Err(io_error(e));
        }
    };
    let Some(now) = listed
        .iter()
        .find(|m| m.location == path)
        .map(|m| m.last_modified)
    else {
        // The listing does not show our own object yet: it cannot be trusted to show others.
        release();
        return Ok(LockAttempt::Busy { holder: None });
    };
    for other in listed.iter().filter(|m| m.location != path) {
        let age = (now - other.last_modified).num_seconds();
        if age > STALE.as_secs() as i64 {
            continue;
        }
        let theirs = other.location.filename().unwrap_or_default();
        let conflict = match kind {
            LockKind::Exclusive => true,
            LockKind::Shared => theirs.starts_with("exclusive-"),
        };
        if !conflict {
            continue;
        }
        match holder_of(b, &other.location) {
            Some(h) if h.is_dead_process_here() => {
                // A killed process of this host: its object does not count.
                b.counters.add(1, 0, 0);
                let _ = b.block_on(b.store.delete(&other.location));
            }
            holder => {
                release();
                let what = if theirs.starts_with("exclusive-") {
                    "holds it alone"
                } else if theirs.starts_with("waiting-") {
                    "is waiting for it"
                } else {
                    "holds it"
                };
                let who = holder.map_or("a process (no holder recorded)".to_string(), |h| {
                    format!("process {} on host {}", h.pid, h.host)
                });
                return Ok(LockAttempt::Busy {
                    holder: Some(format!("{who} {what} (since {} s)", age.max(0))),
                });
            }
        }
    }
    let alive = Arc::new(AtomicBool::new(true));
    match Held::start(
        b.store.clone(),
        b.runtime.clone(),
        path.clone(),
        body,
        alive.clone(),
    ) {
        Ok(held) => Ok(LockAttempt::Held(LockGuard::renewed(held, alive))),
        Err(e) => {
            release();
            Err(e)
        }
    }
}

/// Marks a shared holder waiting for lock `name`: while the guard lives, exclusive attempts
/// give way (see the module comment). The object is renewed like a held lock's and deleted
/// when the guard is dropped; one left by a killed waiter stops counting as a held lock's does.
pub(super) fn wait_turn(b: &S3Backend, name: &str) -> io::Result<LockGuard> {
    let (path, body) = put_holder(b, name, "waiting")?;
    let held = Held::start(
        b.store.clone(),
        b.runtime.clone(),
        path.clone(),
        body,
        Arc::new(AtomicBool::new(true)),
    );
    match held {
        Ok(held) => Ok(LockGuard::new(held)),
        Err(e) => {
            let _ = b.block_on(b.store.delete(&path));
            Err(e)
        }
    }
}

/// Writes this process's object `<name>/<kind>-<random>` under the lock's folder. A reader
/// that may not write gets EACCES here, which the caller takes as "run unlocked".
fn put_holder(b: &S3Backend, name: &str, kind: &str) -> io::Result<(ObjectPath, PutPayload)> {
    let mut token = [0u8; 8];
    getrandom::fill(&mut token).map_err(|e| io::Error::other(e.to_string()))?;
    let path = b.object(&format!("{name}/{kind}-{}", hex::encode(token)));
    let body = PutPayload::from(holder_text());
    b.counters.add(1, body.content_length() as u64, 0);
    b.block_on(b.store.put(&path, body.clone()))
        .map_err(io_error)?;
    Ok((path, body))
}

/// This host's name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Who holds a lock: for people reading the bucket, and for [`holder_of`].
fn holder_text() -> Vec<u8> {
    format!("host={} pid={}\n", hostname(), std::process::id()).into_bytes()
}

/// Who wrote a lock object, from its body.
struct Holder {
    host: String,
    pid: i32,
}

impl Holder {
    /// True for a process of this host that no longer runs (a killed ingest): its object
    /// does not count, so a killed run does not keep the next one out until the object goes
    /// stale. A process of another host is taken to be alive.
    fn is_dead_process_here(&self) -> bool {
        self.host == hostname() && crate::fsutil::process_is_gone(self.pid)
    }
}

/// The holder recorded in the lock object at `path`; `None` when it cannot be read or names
/// none (such an object is taken to belong to a live process).
fn holder_of(b: &S3Backend, path: &ObjectPath) -> Option<Holder> {
    b.counters.add(1, 0, 0);
    let body = b
        .block_on(async { b.store.get(path).await?.bytes().await })
        .ok()?;
    let text = String::from_utf8_lossy(&body);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
    };
    Some(Holder {
        host: field("host=")?,
        pid: field("pid=")?.parse().ok()?,
    })
}

/// A held lock: its refresher thread, stopped (and the object deleted) on drop.
struct Held {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Held {
    fn start(
        store: Arc<AmazonS3>,
        runtime: Arc<tokio::runtime::Runtime>,
        path: ObjectPath,
        body: PutPayload,
        alive: Arc<AtomicBool>,
    ) -> io::Result<Held> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vmrepo-s3-lock".into())
            .spawn(move || {
                // Until the guard is dropped (a message, or the sender gone). A failed refresh
                // is tried again at the next turn; the lock is lost to others only after STALE
                // without one.
                let mut renewed = Instant::now();
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
                    if runtime.block_on(store.put(&path, body.clone())).is_ok() {
                        renewed = Instant::now();
                    } else if renewed.elapsed() + REFRESH >= STALE {
                        // Before the next turn others may count it stale: it is lost.
                        alive.store(false, Ordering::SeqCst);
                    }
                }
                let _ = runtime.block_on(store.delete(&path));
            })?;
        Ok(Held {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
