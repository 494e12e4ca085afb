//! Pack files: append-only files under `data/` that hold object records back to back.
//!
//! A pack is written by exactly one process, which holds an exclusive `flock` on it while
//! writing; it is fsynced (file and directory) before any index row points into it. A pack
//! starts with a 16-byte header: `"VMREPACK" | version u32 | 0u32`.
//!
//! A pack's bytes are gathered in a [`STAGING`]-byte buffer and written out with direct I/O
//! (`O_DIRECT`) where the filesystem allows it: they are never read back by the ingest, and the
//! page cache path cost more than the device (copying a night's packs into fresh page-cache
//! pages was a fifth of a change-aware ingest's CPU; see docs/PERFORMANCE.md). A direct write
//! is a whole number of [`DIRECT_ALIGN`] blocks at an aligned offset, so the last one of a pack
//! is padded with zeros and the file cut back to its length before the seal's fsync. Where
//! direct I/O is refused (tmpfs on older kernels, some network filesystems) the pack is written
//! through the page cache instead, handed to the kernel for writeback every [`WRITEBACK_STEP`]
//! bytes (`sync_file_range`, which does not wait), so the fsync that seals it finds little left.
//! Full buffers are written by a thread of the pack's own while the next one fills: an append
//! (made under the store's writer lock) waits for the device only when two buffers are already
//! on their way.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::sync_dir;
use crate::repo::crypto::Keys;
use crate::repo::object::{EncodedObject, RecordHeader, RECORD_HEADER_LEN};

/// Magic at the start of every pack file.
pub const PACK_MAGIC: &[u8; 8] = b"VMREPACK";
/// Pack format version.
pub const PACK_VERSION: u32 = 1;
/// Bytes before the first record.
pub const PACK_HEADER_LEN: u64 = 16;

/// Where a pack named `name` lives under the data directory.
pub fn pack_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(&name[..2]).join(format!("{name}.pack"))
}

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

/// A pack being written.
pub struct PackFile {
    name: String,
    path: PathBuf,
    /// Writes the staged buffers out; `None` once sealed or discarded.
    flusher: Option<Flusher>,
    staging: Staging,
    /// Buffers handed to the flusher and not taken back yet (at most two).
    in_flight: usize,
    /// Bytes of the pack handed to the flusher (the staged ones follow).
    handed: u64,
    len: u64,
}

/// The thread that writes a pack's full staging buffers while the next one fills, so that an
/// append (made under the store's writer lock) waits for the device only when two buffers are
/// ahead of it.
struct Flusher {
    file: Arc<File>,
    path: PathBuf,
    /// Whether writes still go around the page cache (cleared when refused).
    direct: Arc<AtomicBool>,
    /// Set on the first failed write; the thread then stops.
    failed: Arc<Mutex<Option<std::io::Error>>>,
    to_write: Option<SyncSender<(Staging, u64)>>,
    written: Receiver<Staging>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(file: File, path: &Path, direct: bool) -> Flusher {
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
            path: path.to_path_buf(),
            direct,
            failed,
            to_write: Some(to_write),
            written,
            thread,
        }
    }

    /// Waits for every buffer handed over to be written; the first write error, if any.
    fn finish(&mut self) -> Result<()> {
        self.to_write = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.error()
    }

    /// The write error that stopped the thread, if any.
    fn error(&self) -> Result<()> {
        match self.failed.lock().unwrap().take() {
            Some(e) => Err(Error::io("write pack file", &self.path, e)),
            None => Ok(()),
        }
    }

    /// The error after the thread stopped early (it no longer takes or returns buffers).
    fn stopped(&mut self) -> Error {
        match self.finish() {
            Err(e) => e,
            Ok(()) => Error::io(
                "write pack file",
                &self.path,
                std::io::Error::other("the pack writer thread stopped"),
            ),
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
) -> std::io::Result<()> {
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

fn clear_direct_flag(file: &File) -> std::io::Result<()> {
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
        Err(std::io::Error::last_os_error())
    }
}

impl PackFile {
    /// Creates a new pack with a random name and locks it for writing.
    pub fn create(data_dir: &Path) -> Result<PackFile> {
        PackFile::create_with(data_dir, true)
    }

    /// [`PackFile::create`], with direct I/O tried only if `try_direct`.
    fn create_with(data_dir: &Path, try_direct: bool) -> Result<PackFile> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
        let name = hex::encode(raw);
        let path = pack_path(data_dir, &name);
        let dir = path.parent().unwrap();
        if !dir.is_dir() {
            fs::create_dir_all(dir).ctx("create directory", dir)?;
            sync_dir(data_dir)?;
        }
        let open = |flags| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(&path)
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
                    .open(&path)
                    .ctx("create pack file", &path)?;
                (file, false)
            }
            Err(e) => return Err(Error::io("create pack file", &path, e)),
        };
        file.try_lock().map_err(|e| {
            Error::io(
                "lock pack file",
                &path,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let mut header = [0u8; PACK_HEADER_LEN as usize];
        header[..8].copy_from_slice(PACK_MAGIC);
        header[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
        let mut staging = Staging::new();
        staging.fill(&header);
        Ok(PackFile {
            name,
            flusher: Some(Flusher::start(file, &path, direct)),
            path,
            staging,
            in_flight: 0,
            handed: 0,
            len: PACK_HEADER_LEN,
        })
    }

    /// The pack's name (32 hex digits).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True before any record was appended.
    pub fn is_empty(&self) -> bool {
        self.len == PACK_HEADER_LEN
    }

    /// Whether the pack is (still) written with direct I/O.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.flusher
            .as_ref()
            .is_some_and(|f| f.direct.load(Ordering::Relaxed))
    }

    /// Appends a record and returns its offset.
    pub fn append(&mut self, obj: &EncodedObject) -> Result<u64> {
        let offset = self.len;
        self.put(&obj.header.encode())?;
        self.put(&obj.payload)?;
        self.len += obj.record_len();
        Ok(offset)
    }

    /// Stages `bytes`, handing the staging buffer to the flusher each time it fills.
    fn put(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = self.staging.fill(bytes);
            bytes = &bytes[n..];
            if self.staging.is_full() {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Hands the full staging buffer to the flusher and goes on in an empty one: a new one
    /// while fewer than two are on their way, else the next one written.
    fn hand_over(&mut self) -> Result<()> {
        let mut next = if self.in_flight < 2 {
            Staging::new()
        } else {
            let f = self.flusher.as_mut().expect("pack open");
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
    fn send(&mut self, buf: Staging) -> Result<()> {
        let f = self.flusher.as_mut().expect("pack open");
        let n = buf.filled as u64;
        let sent = f.to_write.as_ref().map(|t| t.send((buf, self.handed)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(f.stopped());
        }
        self.in_flight += 1;
        self.handed += n;
        Ok(())
    }

    /// Writes the rest and fsyncs the pack (and its directory); afterwards its records are
    /// durable.
    pub fn seal(self) -> Result<(String, u64)> {
        self.seal_locked().map(|(name, len, _)| (name, len))
    }

    /// [`PackFile::seal`], keeping the pack's write lock in the returned guard: hold it until
    /// the pack is indexed, so that a concurrent `check` never reads a sealed but unindexed
    /// pack as a left-over (or its manifest as a generation the index does not list).
    pub fn seal_locked(mut self) -> Result<(String, u64, SealedLock)> {
        if self.staging.filled > 0 {
            // The last buffer needs no successor.
            let last = std::mem::replace(&mut self.staging, Staging::unallocated());
            self.send(last)?;
        }
        let mut f = self.flusher.take().expect("pack open");
        f.finish()?;
        // A padded last direct write left zeros past the end.
        if f.direct.load(Ordering::Relaxed) && !self.handed.is_multiple_of(DIRECT_ALIGN as u64) {
            f.file
                .set_len(self.handed)
                .ctx("truncate pack file", &self.path)?;
        }
        f.file.sync_all().ctx("fsync pack file", &self.path)?;
        sync_dir(self.path.parent().unwrap())?;
        Ok((
            std::mem::take(&mut self.name),
            self.len,
            SealedLock {
                _file: f.file.clone(),
            },
        ))
    }

    /// Deletes an unsealed pack (used when an ingest fails).
    pub fn discard(mut self) {
        // What is still staged is dropped unwritten: the file is going away.
        if let Some(mut f) = self.flusher.take() {
            let _ = f.finish();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// A sealed pack's write lock, released on drop (see [`PackFile::seal_locked`]).
pub struct SealedLock {
    _file: Arc<File>,
}

impl Drop for PackFile {
    /// A pack dropped unsealed (an error on the way) lets its flusher finish and end.
    fn drop(&mut self) {
        if let Some(mut f) = self.flusher.take() {
            let _ = f.finish();
        }
    }
}

/// Random-access reader over the packs of a repository, with a bounded cache of open files.
pub struct PackReader {
    data_dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
    keys: Arc<Keys>,
}

const MAX_OPEN_PACKS: usize = 256;

impl PackReader {
    /// A reader for packs under `data_dir`.
    pub fn new(data_dir: &Path, keys: Arc<Keys>) -> PackReader {
        PackReader {
            data_dir: data_dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
            keys,
        }
    }

    /// The keys objects are decoded with.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn file(&self, pack: &str) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap();
        if let Some(f) = open.get(pack) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.data_dir, pack);
        let f = match File::open(&path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::Corrupt(format!(
                    "pack file {} is missing",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io("open pack file", &path, e)),
        };
        if open.len() >= MAX_OPEN_PACKS {
            open.clear();
        }
        open.insert(pack.to_string(), f.clone());
        Ok(f)
    }

    /// Asks the kernel to start reading `len` bytes at `offset` of a pack (advisory: a pack
    /// that cannot be opened is reported by the read that follows).
    pub fn hint(&self, pack: &str, offset: u64, len: u64) {
        if let Ok(f) = self.file(pack) {
            crate::fsutil::will_need(&f, offset, len);
        }
    }

    /// Reads `len` bytes at `offset` of a pack; `what` names the first record for messages.
    pub fn read_span(
        &self,
        pack: &str,
        offset: u64,
        len: usize,
        what: &RecordHeader,
    ) -> Result<Vec<u8>> {
        let f = self.file(pack)?;
        let mut buf = vec![0u8; len];
        match f.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(Error::Corrupt(format!(
                "pack file {} is truncated: {} {} at offset {offset} is cut off",
                pack_path(&self.data_dir, pack).display(),
                what.kind.name(),
                what.id.short()
            ))),
            Err(e) => Err(Error::io(
                "read pack file",
                pack_path(&self.data_dir, pack),
                e,
            )),
        }
    }

    /// Checks that the record header bytes read at `offset` are exactly `expect`.
    pub fn check_header(
        &self,
        pack: &str,
        offset: u64,
        header: &[u8],
        expect: &RecordHeader,
    ) -> Result<()> {
        let path = || pack_path(&self.data_dir, pack).display().to_string();
        let found = RecordHeader::decode(header).map_err(|why| {
            Error::Corrupt(format!(
                "pack file {} offset {offset}: {why} (expected {} {})",
                path(),
                expect.kind.name(),
                expect.id.short()
            ))
        })?;
        if found != *expect {
            return Err(Error::Corrupt(format!(
                "pack file {} offset {offset} holds {} {}, the index expects {} {}",
                path(),
                found.kind.name(),
                found.id.short(),
                expect.kind.name(),
                expect.id.short()
            )));
        }
        Ok(())
    }

    /// Checks that `record` (header and payload, read at `offset`) is the record `expect`;
    /// returns its payload.
    pub fn check_record<'b>(
        &self,
        pack: &str,
        offset: u64,
        record: &'b [u8],
        expect: &RecordHeader,
    ) -> Result<&'b [u8]> {
        self.check_header(pack, offset, &record[..RECORD_HEADER_LEN], expect)?;
        Ok(&record[RECORD_HEADER_LEN..RECORD_HEADER_LEN + expect.stored_len as usize])
    }

    /// Reads the record at `offset` and checks that its header says `expect`; returns the payload.
    pub fn read_record(&self, pack: &str, offset: u64, expect: &RecordHeader) -> Result<Vec<u8>> {
        let buf = self.read_span(
            pack,
            offset,
            RECORD_HEADER_LEN + expect.stored_len as usize,
            expect,
        )?;
        Ok(self.check_record(pack, offset, &buf, expect)?.to_vec())
    }

    /// Decodes a payload read from `pack` at `offset`, naming the place on damage.
    pub fn decode_at(
        &self,
        pack: &str,
        offset: u64,
        expect: &RecordHeader,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        crate::repo::object::decode(expect, payload, &self.keys).map_err(|e| match e {
            Error::Corrupt(m) => Error::Corrupt(format!(
                "{m} (pack file {} offset {offset})",
                pack_path(&self.data_dir, pack).display()
            )),
            other => other,
        })
    }

    /// Reads a record and decodes (decompresses and verifies) its plaintext.
    pub fn read_object(&self, pack: &str, offset: u64, expect: &RecordHeader) -> Result<Vec<u8>> {
        let payload = self.read_record(pack, offset, expect)?;
        self.decode_at(pack, offset, expect, &payload)
    }
}

/// One record found by [`scan_pack`].
pub struct ScannedRecord {
    /// Its header.
    pub header: RecordHeader,
    /// Offset of the header within the pack.
    pub offset: u64,
    /// The stored payload.
    pub payload: Vec<u8>,
}

/// Reads every well-formed record of a pack in order, calling `f` for each. Returns the pack's
/// length and, if the pack ends in a torn or damaged record, a description of where.
pub fn scan_pack(
    path: &Path,
    mut f: impl FnMut(ScannedRecord) -> Result<()>,
) -> Result<(u64, Option<String>)> {
    let file = File::open(path).ctx("open pack file", path)?;
    let len = file.metadata().ctx("stat pack file", path)?.len();
    let mut r = BufReader::with_capacity(4 << 20, file);
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    if r.read_exact(&mut header).is_err() || &header[..8] != PACK_MAGIC {
        return Ok((len, Some("not a pack file (bad header)".into())));
    }
    let mut offset = PACK_HEADER_LEN;
    loop {
        if offset == len {
            return Ok((len, None));
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        if r.read_exact(&mut h).is_err() {
            return Ok((len, Some(format!("torn record header at offset {offset}"))));
        }
        let header = match RecordHeader::decode(&h) {
            Ok(h) => h,
            Err(why) => return Ok((len, Some(format!("{why} at offset {offset}")))),
        };
        let mut payload = vec![0u8; header.stored_len as usize];
        if r.read_exact(&mut payload).is_err() {
            return Ok((len, Some(format!("torn record payload at offset {offset}"))));
        }
        let next = offset + RECORD_HEADER_LEN as u64 + header.stored_len as u64;
        f(ScannedRecord {
            header,
            offset,
            payload,
        })?;
        offset = next;
    }
}

/// Lists the names of all pack files under `data_dir`.
pub fn list_packs(data_dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for shard in fs::read_dir(data_dir).ctx("list", data_dir)? {
        let shard = shard.ctx("list", data_dir)?.path();
        if !shard.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&shard).ctx("list", &shard)? {
            let p = entry.ctx("list", &shard)?.path();
            if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pack"))
            {
                if stem.len() == 32 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
                    names.push(stem.to_string());
                }
            }
        }
    }
    names.sort();
    Ok(names)
}

/// True if what follows `from` in the pack at `path` is what an interrupted writer leaves:
/// nothing, zeros (the padding of a direct-I/O write), or one well-formed record header whose
/// record runs past the end of the file. Anything else may hide records a scan cannot reach.
pub fn is_torn_write(path: &Path, from: u64) -> Result<bool> {
    let file = File::open(path).ctx("open pack file", path)?;
    let len = file.metadata().ctx("stat pack file", path)?.len();
    if from >= len {
        return Ok(true);
    }
    let mut h = [0u8; RECORD_HEADER_LEN];
    let n = (len - from).min(RECORD_HEADER_LEN as u64) as usize;
    file.read_exact_at(&mut h[..n], from)
        .ctx("read pack file", path)?;
    if n == RECORD_HEADER_LEN {
        if let Ok(header) = RecordHeader::decode(&h) {
            return Ok(from + RECORD_HEADER_LEN as u64 + header.stored_len as u64 > len);
        }
    }
    // Zeros to the end?
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(std::io::SeekFrom::Start(from))
        .ctx("read pack file", path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).ctx("read pack file", path)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// True if some process still holds the pack's write lock (an ingest in progress).
pub fn is_being_written(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => f.try_lock_shared().is_err(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::id::ObjectId;
    use crate::repo::object::{self, ObjectKind};

    /// Records of awkward sizes: some straddle the staging buffer's end, one is bigger than it.
    fn records() -> Vec<EncodedObject> {
        let keys = Keys::none();
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
        .map(|(i, &n)| {
            let data = crate::ingest::chunker::noise(n, i as u64 + 1);
            let id = ObjectId(*blake3::hash(&data).as_bytes());
            object::encode(ObjectKind::Chunk, id, &data, 3, &keys)
        })
        .collect()
    }

    fn write_pack(dir: &Path, try_direct: bool) -> (PathBuf, Vec<u64>, u64, bool) {
        let mut p = PackFile::create_with(dir, try_direct).unwrap();
        let offsets = records().iter().map(|r| p.append(r).unwrap()).collect();
        let direct = p.is_direct();
        let path = p.path().to_path_buf();
        let (_, len) = p.seal().unwrap();
        (path, offsets, len, direct)
    }

    #[test]
    fn a_sealed_pack_holds_exactly_its_records_written_either_way() {
        let t = tempfile::tempdir().unwrap();
        let expected = records();
        let mut files = Vec::new();
        for try_direct in [true, false] {
            let (path, offsets, len, direct) = write_pack(t.path(), try_direct);
            if !try_direct {
                assert!(!direct);
            }
            // The padding of the last direct write is cut off: the file is the records.
            assert_eq!(fs::metadata(&path).unwrap().len(), len);
            let mut seen = Vec::new();
            let (scanned_len, damage) = scan_pack(&path, |r| {
                seen.push(r);
                Ok(())
            })
            .unwrap();
            assert_eq!((scanned_len, damage), (len, None));
            assert_eq!(seen.len(), expected.len());
            for ((r, e), off) in seen.iter().zip(&expected).zip(&offsets) {
                assert_eq!(r.header, e.header);
                assert_eq!(r.payload, e.payload);
                assert_eq!(r.offset, *off);
            }
            files.push(fs::read(&path).unwrap());
        }
        // Byte for byte the same whether the page cache was bypassed or not (packs differ only
        // in name).
        assert_eq!(files[0], files[1]);
    }

    #[test]
    fn a_discarded_pack_leaves_no_file() {
        let t = tempfile::tempdir().unwrap();
        let mut p = PackFile::create(t.path()).unwrap();
        for r in records() {
            p.append(&r).unwrap();
        }
        let path = p.path().to_path_buf();
        assert!(path.exists());
        p.discard();
        assert!(!path.exists());
    }
}
