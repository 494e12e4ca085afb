//! The library's error type: every variant says what failed, where, and (where it helps) what to do.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in vmrepo's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on a named file failed.
    #[error("cannot {op} {}: {}{}", path.display(), strip_os_code(cause), hint(cause))]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    /// The SQLite index failed.
    #[error("index {}: {cause}{}", path.display(), index_hint(path, cause))]
    Index {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// The path is not a vmrepo repository.
    #[error("{} is not a vmrepo repository ({reason}); create one with `vmrepo init`", path.display())]
    NotARepository { path: PathBuf, reason: String },
    /// The repository was written by a newer vmrepo.
    #[error("{} has repository format version {found}, but this vmrepo ({version}) understands up to {supported}; upgrade vmrepo", path.display(), version = env!("CARGO_PKG_VERSION"))]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// `init` was pointed at a directory that already has content.
    #[error("{} is not empty; `vmrepo init` only creates a repository in a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// An input file is malformed.
    #[error("{}: {reason}", path.display())]
    BadInput { path: PathBuf, reason: String },
    /// An input uses a format this version cannot read yet.
    #[error("not supported yet: {what} in {}", path.display())]
    Unsupported { what: String, path: PathBuf },
    /// A VM name is not acceptable.
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// A VM, generation or object was not found.
    #[error("{0}")]
    NotFound(String),
    /// Stored data does not match what the index or its hash says.
    #[error(
        "damaged repository data: {0}; run `vmrepo check --read-data` to see what is affected"
    )]
    Corrupt(String),
    /// A generation lost data (found by `check --repair` or while reading it).
    #[error("generation {generation} is damaged:\n  {detail}\npass --allow-damaged to write what is left (damaged ranges stay zero and are listed)")]
    Damaged { generation: String, detail: String },
    /// No key file of an encrypted repository opens with the passphrase given.
    #[error("wrong passphrase for repository {} (tried {keys} key(s)); nothing was changed. Give the \
             passphrase with VMREPO_PASSWORD, --password-file or --password-command, or at the prompt", repo.display())]
    WrongPassphrase { repo: PathBuf, keys: usize },
    /// An encrypted repository was opened without a way to get its passphrase.
    #[error("repository {} is encrypted: give its passphrase with VMREPO_PASSWORD, --password-file FILE or \
             --password-command CMD (or run on a terminal to be asked)", .0.display())]
    NeedPassphrase(PathBuf),
    /// `--verify-unchanged` found a change the changed-ranges list does not name.
    #[error(
        "disk {disk} changed in bytes {start}..{end}, which the changed ranges say are unchanged: \
             the changed-ranges list is wrong or incomplete; no generation was recorded. Ingest \
             without --changed-ranges (a full read), and check the tool that produced the list"
    )]
    ChangedOutsideRanges { disk: String, start: u64, end: u64 },
    /// A pre- or post-ingest command failed or timed out.
    #[error("{0}")]
    Hook(String),
    /// Another process holds a lock we need.
    #[error("{0}")]
    Locked(String),
    /// Refusing to overwrite an existing file.
    #[error("{} already exists; pass --force to overwrite it", .0.display())]
    Exists(PathBuf),
    /// A request that makes no sense (bad generation syntax, bad option value).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Builds an [`Error::Io`].
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.as_ref().to_path_buf(),
            cause: source,
        }
    }

    /// Builds an [`Error::BadInput`].
    pub fn bad_input(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Adds the operation and file name to an `io::Result`.
pub trait IoContext<T> {
    /// Wraps the error as [`Error::Io`] naming `op` and `path`.
    fn ctx(self, op: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

/// `No such file or directory (os error 2)` → `No such file or directory`.
fn strip_os_code(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What to do about common I/O failures.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            "; free space on that filesystem and run the command again"
        }
        Some(libc::EFBIG) => {
            "; the file size limit (ulimit -f) or the filesystem's maximum file size was reached"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "; check the permissions (vmrepo needs to read the VM files and write the repository)"
        }
        Some(libc::EROFS) => "; the filesystem is mounted read-only",
        _ => "",
    }
}

/// What a failed index operation most likely means: SQLite reports a full filesystem as a
/// plain "disk I/O error" when it cannot create or grow its `-wal`/`-shm` files.
fn index_hint(path: &Path, e: &rusqlite::Error) -> String {
    let io = matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::SystemIoFailure) | Some(rusqlite::ErrorCode::DiskFull)
    );
    if !io {
        return String::new();
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    match crate::space::free_bytes(dir) {
        Some(free) if free < crate::space::LOW_SPACE => format!(
            "; the filesystem holding {} is full ({free} bytes free): free space there (`vmrepo \
             prune` and `vmrepo gc` can, they release the repository's reserve first) and run \
             the command again",
            dir.display()
        ),
        _ => String::new(),
    }
}
