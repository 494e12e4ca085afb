//! The seam through which `vmrepo mount` shows the files inside a generation's disks under
//! `<vm>/<generation>/files/`: this layer serves FUSE, the guest layer above it reads guest
//! filesystems, so the mount is handed a [`FilesViews`] that opens one [`FilesView`] per
//! generation, when its `files/` directory is first listed.

use std::sync::Arc;

use crate::error::Result;
use crate::repo::index::GenerationInfo;
use crate::restore::reader::ReadCache;

/// What an entry of a files view is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewKind {
    Dir,
    File,
    /// A symlink and its target, as stored.
    Symlink(String),
}

/// One entry of a directory of a files view.
#[derive(Clone, Debug)]
pub struct ViewEntry {
    pub name: String,
    pub kind: ViewKind,
    pub size: u64,
    /// Permission bits, owner and group as the guest recorded them.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds since the Unix epoch and nanoseconds.
    pub mtime: (i64, u32),
}

/// The files inside one generation's disks. Paths are relative to `files/`: `""` lists the
/// volumes (`disk0`, ...), `disk0/p2/etc` a directory of the volume `disk0/p2`.
pub trait FilesView: Send + Sync {
    /// The entries of directory `path`.
    fn list(&self, path: &str) -> Result<Vec<ViewEntry>>;
    /// Up to `len` bytes of file `path` from byte `offset`.
    fn read(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
}

/// Opens the files view of a generation, reading through the mount's chunk cache.
pub type OpenView =
    dyn Fn(&GenerationInfo, Arc<ReadCache>) -> Result<Arc<dyn FilesView>> + Send + Sync;

/// How a mount opens the files view of each generation.
#[derive(Clone)]
pub struct FilesViews(pub Arc<OpenView>);

impl std::fmt::Debug for FilesViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FilesViews")
    }
}
