//! ext2/3/4 volumes, read through the `ext4-view` crate (read-only; it replays nothing and
//! writes nothing).

use ext4_view::{Ext4, Ext4Error, Ext4Read};

use crate::error::{Error, Result};
use std::cell::RefCell;

use crate::guest::{join, pump, read_span, repository_error, Entry, GuestFs, VolumeIo};

/// An ext2/3/4 filesystem on a volume.
pub struct Ext {
    fs: Ext4,
    /// `vm@time:volume`, for messages.
    at: String,
}

impl Ext4Read for VolumeIo {
    fn read(
        &mut self,
        at: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_at(at, dst).map_err(|e| Box::new(e) as _)
    }
}

impl Ext {
    /// Loads the filesystem on `io` (its superblock and group descriptors).
    pub fn load(io: VolumeIo, at: &str) -> Result<Ext> {
        let fs = Ext4::load(Box::new(io)).map_err(|e| error(at, e))?;
        Ok(Ext {
            fs,
            at: at.to_string(),
        })
    }

    fn err(&self, path: &str, e: Ext4Error) -> Error {
        let what = format!("{}:{path}", self.at);
        match e {
            Ext4Error::NotFound => Error::NotFound(format!("{what}: no such file or directory")),
            Ext4Error::NotADirectory => Error::Usage(format!("{what}: not a directory")),
            Ext4Error::IsADirectory => {
                Error::Usage(format!("{what} is a directory (`vmrepo ls` lists it)"))
            }
            e => error(&what, e),
        }
    }
}

/// What went wrong reading `what`: a failed read of the disk (the repository's error, with
/// where it happened) or the filesystem's own fault.
fn error(what: &str, e: Ext4Error) -> Error {
    match e {
        Ext4Error::Io(e) => repository_error(what, e)
            .unwrap_or_else(|e| Error::Corrupt(format!("{what}: cannot be read: {e}"))),
        e => Error::GuestFilesystem(format!("{what}: {e}")),
    }
}

impl GuestFs for Ext {
    fn label(&self) -> Option<String> {
        self.fs
            .label()
            .to_str()
            .ok()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let m = self
            .fs
            .symlink_metadata(path)
            .map_err(|e| self.err(path, e))?;
        let target = if m.is_symlink() {
            Some(String::from_utf8_lossy(&self.link_target(path)?).into_owned())
        } else {
            None
        };
        Ok(entry(path.to_string(), &m, target))
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.fs.read_dir(path).map_err(|e| self.err(path, e))?;
        let mut out = Vec::new();
        for e in dir {
            let e = e.map_err(|e| self.err(path, e))?;
            let name = String::from_utf8_lossy(e.file_name().as_ref()).into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let full = join(path, &name);
            let m = e.metadata().map_err(|e| self.err(&full, e))?;
            let target = if m.is_symlink() {
                Some(String::from_utf8_lossy(&self.link_target(&full)?).into_owned())
            } else {
                None
            };
            out.push(entry(name, &m, target));
        }
        Ok(out)
    }

    fn link_target(&self, path: &str) -> Result<Vec<u8>> {
        let t = self.fs.read_link(path).map_err(|e| self.err(path, e))?;
        Ok(t.as_ref().to_vec())
    }

    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = self.fs.open(path).map_err(|e| self.err(path, e))?;
        let size = f.metadata().len();
        let f = RefCell::new(f);
        read_span(
            size,
            offset,
            len,
            &mut |at| f.borrow_mut().seek_to(at).map_err(|e| self.err(path, e)),
            &mut |b| f.borrow_mut().read_bytes(b).map_err(|e| self.err(path, e)),
        )
    }

    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        let mut f = self.fs.open(path).map_err(|e| self.err(path, e))?;
        pump(
            &mut |b| f.read_bytes(b).map_err(|e| self.err(path, e)),
            sink,
        )
    }
}

fn entry(name: String, m: &ext4_view::Metadata, target: Option<String>) -> Entry {
    let t = m.file_type();
    let kind = if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_regular_file() {
        "file"
    } else if t.is_block_dev() {
        "block"
    } else if t.is_char_dev() {
        "char"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    Entry {
        name,
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.len(),
        mtime: m.modified().seconds(),
        mtime_nanos: m.modified().nanoseconds(),
        atime: (m.accessed().seconds(), m.accessed().nanoseconds()),
        target,
    }
}
