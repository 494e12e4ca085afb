//! The storage seam: the one place a repository's files are reached. Everything above it
//! (the `repo` layer and up) names objects by key and never by path.
//!
//! A key is a relative name with `/` separators, laid out by the repository layer (`repo/layout.rs`):
//! `config.toml`, `keys/<id>.key`, `data/<xx>/<name>.pack`, `gc-epoch`, `locks/...`. The
//! index, a cache of what the data files hold, is not an object: it lives in the backend's
//! [`Backend::local_dir`] (the repository directory for [`local::LocalBackend`]).
//!
//! ## Durability contract
//!
//! * [`Backend::put`] with [`Durability::Synced`] is atomic and durable when it returns: after
//!   a crash the key holds the old bytes or the new ones, never a mix. With
//!   [`Durability::Unsynced`] it is atomic but may be lost in a crash (markers whose loss is
//!   safe).
//! * An object streamed with [`Backend::create`] is durable once [`ObjectWriter::finish`]
//!   returns. Until then a crash may leave it absent, empty, or cut short anywhere (the pack
//!   format tells a torn tail from damage); while it is being written
//!   [`Backend::is_being_written`] says so to every process, and keeps saying so until the
//!   [`Finished`] guard is dropped.
//! * [`Backend::delete`] with [`Durability::Synced`] is durable when it returns; deleting a
//!   key that is not there is not an error.
//! * Reads see every put and finished object of this and other processes that returned
//!   before the read began.
//!
//! Errors are plain `std::io::Error`s (`NotFound` when a key is absent, `UnexpectedEof` when a
//! range runs past an object's end): callers add what they were doing and [`Backend::path`],
//! the name a user knows the object by.

pub mod local;
pub mod s3;

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use local::LocalBackend;
pub use s3::S3Backend;

use crate::error::{Error, Result};

/// What a repository location names.
enum Place<'a> {
    /// A directory.
    Directory(&'a Path),
    /// `s3://BUCKET/PREFIX`.
    S3(&'a str),
}

fn place(location: &Path) -> Result<Place<'_>> {
    let Some(text) = location.to_str() else {
        return Ok(Place::Directory(location));
    };
    if text.starts_with(s3::SCHEME) {
        return Ok(Place::S3(text));
    }
    // `gs://x`, `S3://x`, `sftp://x`: a URL this build cannot reach is an error, never a
    // directory named `gs:`.
    if let Some((scheme, _)) = text.split_once("://") {
        if !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(Error::Usage(format!(
                "repository {text:?}: {scheme}:// repositories are not supported; give a \
                 directory or s3://BUCKET/PREFIX"
            )));
        }
    }
    Ok(Place::Directory(location))
}

/// True when `location` names a repository in an object store (its index is a cache on this
/// host that can be rebuilt at any time).
pub fn is_remote(location: &Path) -> bool {
    matches!(place(location), Ok(Place::S3(_)))
}

/// Where host-local caches are kept when no directory is given: `$XDG_CACHE_HOME/vmrepo`,
/// else `~/.cache/vmrepo`.
pub fn default_cache_root() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("vmrepo"),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/vmrepo")
        }
    }
}

/// Requests a backend made and bytes it moved since it was opened (object storage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Requests sent (GET, HEAD, PUT, LIST pages, DELETE, multipart steps).
    pub requests: u64,
    /// Payload bytes sent.
    pub bytes_up: u64,
    /// Payload bytes received.
    pub bytes_down: u64,
}

/// Settings of a repository in an object store (ignored for a directory).
#[derive(Clone, Debug, Default)]
pub struct RemoteOptions {
    /// Where the index is cached on this host (`None`: [`default_cache_root`]).
    pub cache_root: Option<PathBuf>,
    /// Upload at most this many bytes per second (the whole process, all requests).
    pub limit_upload: Option<f64>,
    /// Download at most this many bytes per second.
    pub limit_download: Option<f64>,
}

/// The backend of the existing repository at `location` (a directory or `s3://BUCKET/PREFIX`).
pub fn open(location: &Path, remote: &RemoteOptions) -> Result<Arc<dyn Backend>> {
    Ok(match place(location)? {
        Place::Directory(d) => Arc::new(LocalBackend::open(d)?),
        Place::S3(url) => Arc::new(S3Backend::open(url, remote)?),
    })
}

/// The backend of a new repository at `location`: a directory that must not exist or be empty,
/// or an S3 prefix that must hold no object.
pub fn create(location: &Path, remote: &RemoteOptions) -> Result<Arc<dyn Backend>> {
    Ok(match place(location)? {
        Place::Directory(d) => Arc::new(LocalBackend::create(d)?),
        Place::S3(_) => {
            let b = open(location, remote)?;
            let found = b.list("").map_err(|e| Error::io("list", location, e))?;
            if !found.is_empty() {
                return Err(Error::NotEmpty(location.to_path_buf()));
            }
            b
        }
    })
}

/// Whether a write or delete must survive a crash once it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Survives a crash (fsync, or the store's acknowledgement).
    Synced,
    /// May be lost in a crash; used only where losing it is safe.
    Unsynced,
}

/// One object found by [`Backend::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its key.
    pub key: String,
    /// Its length in bytes.
    pub size: u64,
}

/// How a lock is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many holders at once.
    Shared,
    /// One holder, alone.
    Exclusive,
}

/// What one attempt to take a lock found.
pub enum LockAttempt {
    /// Taken; released when the guard is dropped (or the process ends).
    Held(LockGuard),
    /// Another holder has it; who, when the backend can tell ("process 4242 on host esx-backup
    /// holds it alone (since 37 s)").
    Busy { holder: Option<String> },
}

/// A held lock: released on drop, or when the process holding it ends.
pub struct LockGuard {
    _held: Box<dyn std::any::Any + Send + Sync>,
    /// Cleared when the lock may have been lost (a lock that must be renewed and could not be).
    alive: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl LockGuard {
    /// Wraps whatever keeps the lock held, for as long as the process runs.
    pub fn new(held: impl std::any::Any + Send + Sync) -> LockGuard {
        LockGuard {
            _held: Box::new(held),
            alive: None,
        }
    }

    /// Wraps a lock that lasts only while it is renewed: `alive` is cleared when it may have
    /// expired for others.
    pub fn renewed(
        held: impl std::any::Any + Send + Sync,
        alive: Arc<std::sync::atomic::AtomicBool>,
    ) -> LockGuard {
        LockGuard {
            _held: Box::new(held),
            alive: Some(alive),
        }
    }

    /// True when the lock may no longer be held: others may have taken it.
    pub fn is_lost(&self) -> bool {
        self.alive
            .as_ref()
            .is_some_and(|a| !a.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockGuard")
    }
}

/// Keeps a finished object marked as being written until dropped (see
/// [`ObjectWriter::finish`]).
pub struct Finished(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

impl Finished {
    /// Wraps whatever keeps the object marked.
    pub fn new(held: impl std::any::Any + Send + Sync) -> Finished {
        Finished(Box::new(held))
    }
}

/// An object being streamed into the backend (a pack).
pub trait ObjectWriter: Send {
    /// Appends bytes.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Writes what is left and makes the object durable. The returned guard keeps it marked
    /// as being written (see [`Backend::is_being_written`]) until it is dropped: hold it until
    /// the object is recorded wherever it must be before others may judge it.
    fn finish(self: Box<Self>) -> io::Result<Finished>;
    /// Stops and deletes the object.
    fn abandon(self: Box<Self>);
    /// Whether writes bypass the page cache (local backend; for tests).
    fn is_direct(&self) -> bool {
        false
    }
}

/// A place to keep a repository's objects. See the module documentation for the contract.
pub trait Backend: Send + Sync {
    /// The repository's location as users name it (a directory, a URL).
    fn location(&self) -> &Path;
    /// How messages name the object `key`.
    fn path(&self, key: &str) -> PathBuf;
    /// A local directory for what is kept beside the objects on this host (the index and its
    /// reserve file). `None` when there is none.
    fn local_dir(&self) -> Option<&Path>;
    /// Whether the folder `prefix` (such as `data/`) exists; stores without folders say true.
    fn has_folder(&self, prefix: &str) -> bool;
    /// Makes the folder `prefix` (durably); a no-op for stores without folders.
    fn make_folder(&self, prefix: &str) -> io::Result<()>;

    /// The whole object.
    fn get(&self, key: &str) -> io::Result<Vec<u8>>;
    /// Fills `buf` from `offset` of the object.
    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// A sequential reader over the whole object, and its length.
    fn open_sequential(&self, key: &str) -> io::Result<(Box<dyn Read + Send>, u64)>;
    /// The object's length, or `None` when it is absent.
    fn size(&self, key: &str) -> io::Result<Option<u64>>;
    /// Every object whose key starts with `prefix` (a folder such as `data/`), in key order.
    fn list(&self, prefix: &str) -> io::Result<Vec<Entry>>;
    /// Asks for `len` bytes at `offset` to be fetched ahead of a read. Advisory.
    fn will_need(&self, key: &str, offset: u64, len: u64);

    /// Writes a whole object, atomically.
    fn put(&self, key: &str, bytes: &[u8], durability: Durability) -> io::Result<()>;
    /// Starts streaming a new object; fails if `key` exists.
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>>;
    /// True while some process streams `key` (or holds its [`Finished`] guard).
    fn is_being_written(&self, key: &str) -> bool;
    /// Makes an object found in the backend durable (one an interrupted writer left).
    fn sync(&self, key: &str) -> io::Result<()>;
    /// Deletes objects; those already gone are skipped.
    fn delete(&self, keys: &[String], durability: Durability) -> io::Result<()>;

    /// Tries once to take the lock `name`. `read_only` asks only to keep writers of the lock
    /// out (a reader on a repository it may not write). `Err` with
    /// [`is_not_writable`] when the lock cannot be taken here at all.
    fn try_lock(&self, name: &str, kind: LockKind, read_only: bool) -> io::Result<LockAttempt>;
    /// Marks this process as waiting for a shared hold of lock `name`, after an attempt found
    /// it busy: while the returned guard lives, exclusive attempts on `name` find it busy, so a
    /// command that needs the repository alone gives way to backups and restores already
    /// waiting. `Err` when the mark cannot be written (the caller then waits without it).
    fn wait_turn(&self, name: &str) -> io::Result<LockGuard>;
    /// Requests made and bytes moved so far, for a backend that pays per request (object
    /// storage); `None` for a directory.
    fn traffic(&self) -> Option<Traffic> {
        None
    }
}

/// True for the errors that say "this process may not write here" (a read-only or forbidden
/// file, a store that refuses the request).
pub fn is_not_writable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
    ) || (e.raw_os_error().is_none() && e.kind() == io::ErrorKind::PermissionDenied)
}
