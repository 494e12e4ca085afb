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

/// The files views open at a time, most recently used last. Each open view may hold a
/// generation's disk maps, loaded filesystems and a thread; past `limit` the least recently
/// used is closed (it ends once no read in flight holds it) and is opened again when next used,
/// so browsing many generations' `files/` keeps memory bounded.
pub(crate) struct OpenViews {
    limit: usize,
    open: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<dyn FilesView>)>>,
}

impl OpenViews {
    pub(crate) fn new(limit: usize) -> OpenViews {
        OpenViews {
            limit: limit.max(1),
            open: Default::default(),
        }
    }

    /// The view with key `id`, opened by `open` if it is not open. Opening happens under the
    /// lock: two requests for one generation never open it twice.
    pub(crate) fn get(
        &self,
        id: u64,
        open: impl FnOnce() -> std::result::Result<Arc<dyn FilesView>, String>,
    ) -> std::result::Result<Arc<dyn FilesView>, String> {
        let mut views = self.open.lock().unwrap();
        if let Some(k) = views.iter().position(|(i, _)| *i == id) {
            let entry = views.remove(k).expect("found");
            let view = entry.1.clone();
            views.push_back(entry);
            return Ok(view);
        }
        let view = open()?;
        views.push_back((id, view.clone()));
        while views.len() > self.limit {
            views.pop_front();
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A view that counts how many of its kind are alive.
    struct Counted(Arc<AtomicUsize>);

    impl FilesView for Counted {
        fn list(&self, _: &str) -> Result<Vec<ViewEntry>> {
            Ok(Vec::new())
        }
        fn read(&self, _: &str, _: u64, _: usize) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn at_most_limit_views_stay_open_and_the_least_recently_used_goes() {
        let alive = Arc::new(AtomicUsize::new(0));
        let opened = AtomicUsize::new(0);
        let views = OpenViews::new(2);
        let get = |id: u64| {
            views
                .get(id, || {
                    opened.fetch_add(1, Ordering::SeqCst);
                    alive.fetch_add(1, Ordering::SeqCst);
                    Ok(Arc::new(Counted(alive.clone())) as Arc<dyn FilesView>)
                })
                .unwrap()
        };
        drop((get(1), get(2), get(1)));
        assert_eq!(
            opened.load(Ordering::SeqCst),
            2,
            "1 was open: not opened again"
        );
        drop(get(3)); // 2 is the least recently used: closed
        assert_eq!(alive.load(Ordering::SeqCst), 2);
        drop(get(1));
        assert_eq!(opened.load(Ordering::SeqCst), 3);
        drop(get(2)); // opened again; 3 goes
        assert_eq!(opened.load(Ordering::SeqCst), 4);
        assert_eq!(alive.load(Ordering::SeqCst), 2);
        // A view still in use when closed lives until its user lets go.
        let held = get(5);
        drop((get(6), get(7)));
        assert_eq!(alive.load(Ordering::SeqCst), 3);
        drop(held);
        assert_eq!(alive.load(Ordering::SeqCst), 2);
        // A failed open is not remembered: the next use tries again.
        assert!(views.get(9, || Err("no".into())).is_err());
        drop(get(9));
        assert_eq!(opened.load(Ordering::SeqCst), 8);
    }
}
