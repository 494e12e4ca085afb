//! The files inside one generation's disks as a [`FilesView`] for `vmrepo mount`
//! (`<generation>/files/disk0/p2/etc/hosts`). The guest filesystem readers are not shared
//! across threads, so one thread per opened generation owns the generation's disks and the
//! filesystems loaded from them, and answers the mount's requests in turn.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::guest::{Entry, Filesystem, Guest, Volume};
use crate::repo::index::GenerationInfo;
use crate::repo::Repository;
use crate::restore::mount::{FilesView, ViewEntry, ViewKind};
use crate::restore::reader::ReadCache;

enum Request {
    List(String, Sender<Result<Vec<ViewEntry>>>),
    Read(String, u64, usize, Sender<Result<Vec<u8>>>),
}

/// A generation's files, served by its own thread.
pub struct GuestView {
    requests: Mutex<Sender<Request>>,
}

/// Opens the files view of generation `info`: its disks and volume list now (errors are
/// reported here), each filesystem when first used.
pub fn open(
    repo: Arc<Repository>,
    info: &GenerationInfo,
    cache: Arc<ReadCache>,
) -> Result<Arc<dyn FilesView>> {
    let (requests, incoming) = mpsc::channel();
    let (ready, opened) = mpsc::channel();
    let name = info.name.clone();
    std::thread::Builder::new()
        .name("vmrepo-guest".into())
        .spawn(move || {
            let worker = Guest::open_with_cache(repo, &name, cache).and_then(|guest| {
                let volumes = guest.volumes()?;
                Ok(Worker {
                    guest,
                    volumes,
                    loaded: HashMap::new(),
                })
            });
            match worker {
                Ok(w) => {
                    let _ = ready.send(Ok(()));
                    w.serve(incoming);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::Usage(format!("cannot start a thread for {}: {e}", info.name)))?;
    opened
        .recv()
        .map_err(|_| Error::Usage(format!("the reader of {} stopped", info.name)))??;
    Ok(Arc::new(GuestView {
        requests: Mutex::new(requests),
    }))
}

impl GuestView {
    fn ask<T>(&self, make: impl FnOnce(Sender<Result<T>>) -> Request) -> Result<T> {
        let (reply, answer) = mpsc::channel();
        let sent = self.requests.lock().unwrap().send(make(reply));
        let gone = || Error::Usage("the guest filesystem reader stopped".into());
        sent.map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

impl FilesView for GuestView {
    fn list(&self, path: &str) -> Result<Vec<ViewEntry>> {
        self.ask(|r| Request::List(path.to_string(), r))
    }

    fn read(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.ask(|r| Request::Read(path.to_string(), offset, len, r))
    }
}

/// The thread's state: the disks, their volumes, the filesystems loaded so far.
struct Worker {
    guest: Guest,
    volumes: Vec<Volume>,
    loaded: HashMap<String, Filesystem>,
}

/// Where a path of the view leads: a directory above the volumes (`disk0`, `disk0/lvm`), or a
/// path inside one readable volume.
enum Place {
    Above(String),
    Inside(usize, String),
}

impl Worker {
    fn serve(mut self, incoming: Receiver<Request>) {
        for request in incoming {
            match request {
                Request::List(path, reply) => {
                    let _ = reply.send(self.list(&path));
                }
                Request::Read(path, offset, len, reply) => {
                    let _ = reply.send(self.read(&path, offset, len));
                }
            }
        }
    }

    fn readable(&self) -> impl Iterator<Item = (usize, &Volume)> {
        self.volumes.iter().enumerate().filter(|(_, v)| v.readable)
    }

    fn place(&self, path: &str) -> Place {
        let path = path.trim_matches('/');
        for (i, v) in self.readable() {
            if path == v.name {
                return Place::Inside(i, "/".into());
            }
            if let Some(rest) = path.strip_prefix(&v.name).and_then(|r| r.strip_prefix('/')) {
                return Place::Inside(i, format!("/{rest}"));
            }
        }
        Place::Above(path.to_string())
    }

    fn filesystem(&mut self, i: usize) -> Result<&Filesystem> {
        let name = self.volumes[i].name.clone();
        if !self.loaded.contains_key(&name) {
            let fs = self.guest.filesystem(&self.volumes[i])?;
            self.loaded.insert(name.clone(), fs);
        }
        Ok(&self.loaded[&name])
    }

    fn list(&mut self, path: &str) -> Result<Vec<ViewEntry>> {
        match self.place(path) {
            Place::Inside(i, inner) => {
                let fs = self.filesystem(i)?;
                Ok(fs
                    .list(&inner)?
                    .into_iter()
                    .filter_map(view_entry)
                    .collect())
            }
            Place::Above(prefix) => {
                // The next component of every readable volume's name below `prefix`.
                let mut names: Vec<String> = self
                    .readable()
                    .filter_map(|(_, v)| {
                        let rest = if prefix.is_empty() {
                            Some(v.name.as_str())
                        } else {
                            v.name
                                .strip_prefix(prefix.as_str())
                                .and_then(|r| r.strip_prefix('/'))
                        };
                        rest.map(|r| r.split('/').next().unwrap_or(r).to_string())
                    })
                    .collect();
                names.sort();
                names.dedup();
                if names.is_empty() && !prefix.is_empty() {
                    return Err(Error::NotFound(format!(
                        "{}: no readable volume under files/{prefix}",
                        self.guest.generation()
                    )));
                }
                Ok(names
                    .into_iter()
                    .map(|name| ViewEntry {
                        name,
                        kind: ViewKind::Dir,
                        size: 0,
                        mode: 0o555,
                        uid: 0,
                        gid: 0,
                        mtime: (0, 0),
                    })
                    .collect())
            }
        }
    }

    fn read(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        match self.place(path) {
            Place::Inside(i, inner) => self.filesystem(i)?.read_range(&inner, offset, len),
            Place::Above(p) => Err(Error::Usage(format!("files/{p} is a directory"))),
        }
    }
}

/// An entry as the mount shows it; devices, FIFOs, sockets and reparse points are left out.
fn view_entry(e: Entry) -> Option<ViewEntry> {
    let kind = match e.kind {
        "dir" => ViewKind::Dir,
        "file" => ViewKind::File,
        "symlink" => ViewKind::Symlink(e.target.clone().unwrap_or_default()),
        _ => return None,
    };
    Some(ViewEntry {
        name: e.name,
        kind,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: (e.mtime, e.mtime_nanos),
    })
}
