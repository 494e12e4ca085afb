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
    /// A filesystem inside a generation's disk cannot be read, though every byte of the disk
    /// was read back intact.
    #[error(
        "{0}. The guest filesystem itself is damaged or uses a feature this build cannot read; \
         the backup of the disk is intact (`vmrepo extract` restores the whole disk)"
    )]
    GuestFilesystem(String),
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
    #[error("{}", .0.spelled(Spelling::CommandLine))]
    Locked(Advice),
    /// A vSphere host (ESXi or vCenter) refused a request or could not be reached.
    #[error("vSphere {host}: {what}")]
    Vsphere { host: String, what: String },
    /// Refusing to overwrite an existing file.
    #[error("{} already exists; pass --force to overwrite it", .0.display())]
    Exists(PathBuf),
    /// A request that makes no sense (bad generation syntax, bad option value).
    #[error("{0}")]
    Usage(String),
    /// A request refused, or a remedy offered, in terms of the user's settings: shown with
    /// command-line flags, or with job-file keys by [`Error::spelled`].
    #[error("{}", .0.spelled(Spelling::CommandLine))]
    Refused(Advice),
}

/// A setting a user gives on the command line or in a job file. The library names settings in
/// its messages through this type, never by a flag, so each front end shows them the way its
/// user wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// The VM name to record.
    Name,
    /// The time to record a generation at.
    Time,
    /// Refuse a VM that breaks the snapshot limits.
    Strict,
    /// Read the disks as a snapshot froze them.
    AtSnapshot,
    /// A directory outside the VM's own that its files may name.
    AllowPath,
    /// Where an absolute datastore path is found locally.
    DatastoreMap,
    /// The list of ranges that changed since a generation.
    ChangedRanges,
    /// A retention rule (keep last, daily, ...).
    KeepRule,
    /// A retention policy file.
    PolicyFile,
    /// Remove every generation when a policy keeps nothing.
    AllowEmpty,
    /// The generation a changed-ranges list is relative to.
    Since,
    /// Seconds to wait for a lock another process holds.
    LockWait,
    /// Serve NBD on addresses other than loopback.
    AllowRemote,
    /// The TCP address an NBD server listens on.
    Listen,
    /// The Unix socket an NBD server listens on.
    ListenUnix,
    /// The SHA-256 fingerprint a vSphere host's certificate must have.
    TlsThumbprint,
    /// The CA that signed a vSphere host's certificate.
    TlsCa,
    /// Where a vSphere user's password comes from (a file or a command).
    SourcePassword,
}

/// Who gave the settings, and so how a message spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spelling {
    /// Flags of a `vmrepo` command.
    CommandLine,
    /// Keys of a `vmrepo run` job file.
    JobFile,
}

impl Setting {
    /// How a user of `how` gives this setting.
    pub fn spelled(self, how: Spelling) -> &'static str {
        use Setting::*;
        let job = how == Spelling::JobFile;
        match self {
            Name if job => "name = \"NAME\" in the VM's [vm.\"...\"] table",
            Name => "--name NAME",
            Time => "--time",
            Strict if job => "strict = true",
            Strict => "--strict",
            AtSnapshot if job => "at_snapshot",
            AtSnapshot => "--at-snapshot",
            AllowPath if job => "allow_paths = [\"DIR\"]",
            AllowPath => "--allow-path DIR",
            DatastoreMap if job => "datastore_map = [\"DATASTORE=DIR\"]",
            DatastoreMap => "--datastore-map DATASTORE=DIR",
            ChangedRanges => "--changed-ranges",
            KeepRule if job => "keep_* rule",
            KeepRule => "--keep-* option",
            PolicyFile if job => "[retention] table",
            PolicyFile => "--policy FILE",
            AllowEmpty => "`vmrepo prune --allow-empty`",
            Since => "--since VM@GEN",
            LockWait if job => "lock_wait = SECONDS",
            LockWait => "--lock-wait SECONDS",
            AllowRemote => "--allow-remote",
            Listen => "--listen",
            ListenUnix => "--listen-unix",
            TlsThumbprint if job => "tls_thumbprint = \"SHA256\"",
            TlsThumbprint => "--tls-thumbprint SHA256",
            TlsCa if job => "tls_ca = \"FILE\"",
            TlsCa => "--tls-ca FILE",
            SourcePassword if job => "source_password_file (or source_password_command)",
            SourcePassword => "--source-password-file FILE (or --source-password-command CMD)",
        }
    }
}

/// A message that names settings: text and settings in turn, spelled when shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advice(Vec<Piece>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Setting(Setting),
}

impl Advice {
    /// A message starting with `text`.
    pub fn new(text: impl Into<String>) -> Advice {
        Advice(vec![Piece::Text(text.into())])
    }

    /// Goes on with a setting.
    pub fn setting(mut self, setting: Setting) -> Advice {
        self.0.push(Piece::Setting(setting));
        self
    }

    /// Goes on with text.
    pub fn text(mut self, text: impl Into<String>) -> Advice {
        self.0.push(Piece::Text(text.into()));
        self
    }

    /// The message as a user of `how` reads it.
    pub fn spelled(&self, how: Spelling) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Setting(s) => s.spelled(how),
            })
            .collect()
    }

    /// The same message with `f` applied to its text (not to the settings it names).
    pub fn map_text(self, f: impl Fn(&str) -> String) -> Advice {
        Advice(
            self.0
                .into_iter()
                .map(|p| match p {
                    Piece::Text(t) => Piece::Text(f(&t)),
                    s => s,
                })
                .collect(),
        )
    }

    /// The settings it names.
    pub fn settings(&self) -> impl Iterator<Item = Setting> + '_ {
        self.0.iter().filter_map(|p| match p {
            Piece::Setting(s) => Some(*s),
            Piece::Text(_) => None,
        })
    }
}

impl From<Advice> for Error {
    fn from(a: Advice) -> Error {
        Error::Refused(a)
    }
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

    /// The message as a user of `how` reads it: a job file's keys instead of flags where the
    /// error names settings.
    pub fn spelled(&self, how: Spelling) -> String {
        match self {
            Error::Refused(a) | Error::Locked(a) => a.spelled(how),
            e => e.to_string(),
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
