//! Streaming an object into a file: the pack writer of the local backend.
//!
//! Bytes are gathered in a [`STAGING`]-byte buffer and written out with direct I/O
//! (`O_DIRECT`) where the filesystem allows it: they are never read back by the ingest, and the
//! page cache path cost more than the device (copying a night's packs into fresh page-cache
//! pages was a fifth of a change-aware ingest's CPU; see docs/PERFORMANCE.md). A direct write
//! is a whole number of [`DIRECT_ALIGN`] blocks at an aligned offset, so the last one is padded
//! with zeros and the file cut back to its length before the final fsync. Where direct I/O is
//! refused (tmpfs on older kernels, some network filesystems) the file is written through the
//! page cache instead, handed to the kernel for writeback every [`WRITEBACK_STEP`] bytes
//! (`sync_file_range`, which does not wait), so the fsync that finishes it finds little left.
//! Full buffers are written by a thread of the writer's own while the next one fills: a write
//! (made under the store's writer lock) waits for the device only when two buffers are already
//! on their way. The file holds an exclusive `flock` from creation until the [`Finished`]
//! guard is dropped: that is how other processes see it is being written.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::backend::{Finished, ObjectWriter};

/// Bytes written to a pack through the page cache between two writeback kicks.
pub const WRITEBACK_STEP: u64 = 8 << 20;

/// Bytes of records gathered before they are written to the file.
pub const STAGING: usize = 4 << 20;

/// Alignment of direct writes (memory, file offset and length): 4 KiB suits devices with 512-byte
/// and with 4 KiB sectors.
pub const DIRECT_ALIGN: usize = 4096;

/// A staging buffer whose usable part starts at a [`DIRECT_ALIGN`] boundary.
struct Staging {
    mem: Vec<u8>,
    start: usize,
    filled: usize,
}

impl Staging {
    fn new() -> Staging {
        let mem = vec![0u8; STAGING + DIRECT_ALIGN];
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        Staging {
            mem,
            start,
            filled: 0,
        }
    }

    /// A placeholder holding no memory, for a pack that takes no more bytes.
    fn unallocated() -> Staging {
        Staging {
            mem: Vec::new(),
            start: 0,
            filled: 0,
        }
    }

    /// Copies as much of `bytes` as fits; returns how much did.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(STAGING - self.filled);
        let at = self.start + self.filled;
        self.mem[at..at + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        n
    }

    fn is_full(&self) -> bool {
        self.filled == STAGING
    }

    /// The gathered bytes followed by zeros up to the next multiple of `align`.
    fn padded(&mut self, align: usize) -> &[u8] {
        let end = self.filled.next_multiple_of(align);
        self.mem[self.start + self.filled..self.start + end].fill(0);
        &self.mem[self.start..self.start + end]
    }
}

/// An object being streamed to a file.
pub struct LocalWriter {
    path: PathBuf,
    /// Writes the staged buffers out; `None` once sealed or discarded.
    flusher: Option<Flusher>,
    staging: Staging,
    /// Buffers handed to the flusher and not taken back yet (at most two).
    in_flight: usize,
    /// Bytes of the object handed to the flusher (the staged ones follow).
    handed: u64,
}

/// The thread that writes a pack's full staging buffers while the next one fills, so that an
/// append (made under the store's writer lock) waits for the device only when two buffers are
/// ahead of it.
struct Flusher {
    file: Arc<File>,
    /// Whether writes still go around the page cache (cleared when refused).
    direct: Arc<AtomicBool>,
    /// Set on the first failed write; the thread then stops.
    failed: Arc<Mutex<Option<io::Error>>>,
    to_write: Option<SyncSender<(Staging, u64)>>,
    written: Receiver<Staging>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(file: File, direct: bool) -> Flusher {
        let file = Arc::new(file);
        let direct = Arc::new(AtomicBool::new(direct));
        let failed = Arc::new(Mutex::new(None));
        let (to_write, todo) = sync_channel::<(Staging, u64)>(2);
        // Room for every buffer a pack can have out (two on their way and the last one, which
        // seal hands over without taking one back), so the thread never waits to return one.
        let (done, written) = sync_channel::<Staging>(3);
        let thread = {
            let (file, direct, failed) = (file.clone(), direct.clone(), failed.clone());
            std::thread::Builder::new()
                .name("vmrepo-pack".into())
                .spawn(move || {
                    let mut kicked = 0u64;
                    for (mut buf, at) in todo {
                        if let Err(e) = write_at(&file, &direct, &mut buf, at, &mut kicked) {
                            *failed.lock().unwrap() = Some(e);
                            return;
                        }
                        if done.send(buf).is_err() {
                            return;
                        }
                    }
                })
        };
        // Without a thread (resources exhausted), the failure is reported at the first write.
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                *failed.lock().unwrap() = Some(e);
                None
            }
        };
        Flusher {
            file,
            direct,
            failed,
            to_write: Some(to_write),
            written,
            thread,
        }
    }

    /// Waits for every buffer handed over to be written; the first write error, if any.
    fn finish(&mut self) -> io::Result<()> {
        self.to_write = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.error()
    }

    /// The write error that stopped the thread, if any.
    fn error(&self) -> io::Result<()> {
        match self.failed.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The error after the thread stopped early (it no longer takes or returns buffers).
    fn stopped(&mut self) -> io::Error {
        match self.finish() {
            Err(e) => e,
            Ok(()) => io::Error::other("the pack writer thread stopped"),
        }
    }
}

/// Writes `buf`'s bytes at `at`: direct (padded to a [`DIRECT_ALIGN`] block) while `direct`
/// holds, else through the page cache with a writeback kick every [`WRITEBACK_STEP`] bytes.
fn write_at(
    file: &File,
    direct: &AtomicBool,
    buf: &mut Staging,
    at: u64,
    kicked: &mut u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if direct.load(Ordering::Relaxed) {
        match file.write_all_at(buf.padded(DIRECT_ALIGN), at) {
            Ok(()) => return Ok(()),
            // Direct I/O refused for this write (a filesystem that accepts O_DIRECT at open but
            // not these writes): the same bytes go through the page cache, from now on.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                direct.store(false, Ordering::Relaxed);
                clear_direct_flag(file)?;
            }
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(buf.padded(1), at)?;
    let end = at + buf.filled as u64;
    if end >= *kicked + WRITEBACK_STEP {
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open.
        // Advisory: an error here resurfaces in the seal's fsync.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                *kicked as libc::off64_t,
                (end - *kicked) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        *kicked = end;
    }
    Ok(())
}

fn clear_direct_flag(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL only reads and sets the descriptor's flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl LocalWriter {
    /// Creates the file at `path` (which must not exist) and locks it for writing; direct I/O
    /// is tried only if `try_direct`.
    pub fn create(path: &Path, try_direct: bool) -> io::Result<LocalWriter> {
        let open = |flags| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(if try_direct { libc::O_DIRECT } else { 0 }) {
            Ok(f) => (f, try_direct),
            // Direct I/O refused by this filesystem (older kernels' tmpfs says so at open,
            // after creating the file: it is opened again as it is, empty).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                (file, false)
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = file.try_lock() {
            let _ = fs::remove_file(path);
            return Err(io::Error::other(format!("cannot lock it: {e}")));
        }
        Ok(LocalWriter {
            flusher: Some(Flusher::start(file, direct)),
            path: path.to_path_buf(),
            staging: Staging::new(),
            in_flight: 0,
            handed: 0,
        })
    }

    /// Hands the full staging buffer to the flusher and goes on in an empty one: a new one
    /// while fewer than two are on their way, else the next one written.
    fn hand_over(&mut self) -> io::Result<()> {
        let mut next = if self.in_flight < 2 {
            Staging::new()
        } else {
            let f = self.flusher.as_mut().expect("writer open");
            match f.written.recv() {
                Ok(b) => {
                    self.in_flight -= 1;
                    b
                }
                Err(_) => return Err(f.stopped()),
            }
        };
        next.filled = 0;
        let full = std::mem::replace(&mut self.staging, next);
        self.send(full)
    }

    /// Hands `buf` to the flusher, to be written after what was handed before.
    fn send(&mut self, buf: Staging) -> io::Result<()> {
        let f = self.flusher.as_mut().expect("writer open");
        let n = buf.filled as u64;
        let sent = f.to_write.as_ref().map(|t| t.send((buf, self.handed)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(f.stopped());
        }
        self.in_flight += 1;
        self.handed += n;
        Ok(())
    }
}

impl ObjectWriter for LocalWriter {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.staging.fill(bytes);
            bytes = &bytes[n..];
            if self.staging.is_full() {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<Finished> {
        if self.staging.filled > 0 {
            // The last buffer needs no successor.
            let last = std::mem::replace(&mut self.staging, Staging::unallocated());
            self.send(last)?;
        }
        let mut f = self.flusher.take().expect("writer open");
        f.finish()?;
        // A padded last direct write left zeros past the end.
        if f.direct.load(Ordering::Relaxed) && !self.handed.is_multiple_of(DIRECT_ALIGN as u64) {
            f.file.set_len(self.handed)?;
        }
        f.file.sync_all()?;
        crate::fsutil::sync_directory(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(Finished::new(f.file.clone()))
    }

    fn abandon(mut self: Box<Self>) {
        // What is still staged is dropped unwritten: the file is going away.
        if let Some(mut f) = self.flusher.take() {
            let _ = f.finish();
        }
        let _ = fs::remove_file(&self.path);
    }

    fn is_direct(&self) -> bool {
        self.flusher
            .as_ref()
            .is_some_and(|f| f.direct.load(Ordering::Relaxed))
    }
}

impl Drop for LocalWriter {
    /// A writer dropped unfinished (an error on the way) lets its flusher finish and end.
    fn drop(&mut self) {
        if let Some(mut f) = self.flusher.take() {
            let _ = f.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes in pieces of awkward sizes: some straddle the staging buffer's end, one is bigger
    /// than it.
    fn pieces() -> Vec<Vec<u8>> {
        [
            1usize,
            4000,
            70_001,
            STAGING - 100,
            3,
            STAGING + 12_345,
            999,
            4096,
        ]
        .iter()
        .enumerate()
        .map(|(i, &n)| crate::ingest::chunker::noise(n, i as u64 + 1))
        .collect()
    }

    #[test]
    fn a_finished_file_holds_exactly_its_bytes_written_either_way() {
        let t = tempfile::tempdir().unwrap();
        let want: Vec<u8> = pieces().concat();
        for try_direct in [true, false] {
            let path = t.path().join(format!("f{try_direct}"));
            let mut w = Box::new(LocalWriter::create(&path, try_direct).unwrap());
            for p in pieces() {
                w.write(&p).unwrap();
            }
            if !try_direct {
                assert!(!w.is_direct());
            }
            drop(w.finish().unwrap());
            // The padding of the last direct write is cut off: the file is the bytes.
            assert_eq!(
                std::fs::read(&path).unwrap(),
                want,
                "direct tried: {try_direct}"
            );
        }
    }
}
