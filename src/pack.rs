//! Pack files: append-only files under `data/` that hold object records back to back.
//!
//! A pack is written by exactly one process, which holds an exclusive `flock` on it while
//! writing; it is fsynced (file and directory) before any index row points into it. A pack
//! starts with a 16-byte header: `"VMREPACK" | version u32 | 0u32`.
//!
//! While a pack grows, its written bytes are handed to the kernel for writeback every
//! [`WRITEBACK_STEP`] bytes (`sync_file_range`, which does not wait), so the fsync that seals it
//! finds little left to write and the ingest does not stall on it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::crypto::Keys;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::sync_dir;
use crate::object::{EncodedObject, RecordHeader, RECORD_HEADER_LEN};

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

/// Bytes written to a pack between two writeback kicks.
pub const WRITEBACK_STEP: u64 = 8 << 20;

/// A pack being written.
pub struct PackFile {
    name: String,
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    /// Bytes from the start already handed to the kernel for writeback.
    kicked: u64,
}

impl PackFile {
    /// Creates a new pack with a random name and locks it for writing.
    pub fn create(data_dir: &Path) -> Result<PackFile> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| Error::Usage(format!("no randomness: {e}")))?;
        let name = hex::encode(raw);
        let path = pack_path(data_dir, &name);
        let dir = path.parent().unwrap();
        if !dir.is_dir() {
            fs::create_dir_all(dir).ctx("create directory", dir)?;
            sync_dir(data_dir)?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("create pack file", &path)?;
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
        let mut out = BufWriter::with_capacity(4 << 20, file);
        out.write_all(&header).ctx("write pack file", &path)?;
        Ok(PackFile {
            name,
            path,
            out,
            len: PACK_HEADER_LEN,
            kicked: 0,
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

    /// Appends a record and returns its offset.
    pub fn append(&mut self, obj: &EncodedObject) -> Result<u64> {
        let offset = self.len;
        self.out
            .write_all(&obj.header.encode())
            .and_then(|_| self.out.write_all(&obj.payload))
            .ctx("write pack file", &self.path)?;
        self.len += obj.record_len();
        self.start_writeback();
        Ok(offset)
    }

    /// Starts writeback of the bytes that reached the file since the last kick, once there are
    /// [`WRITEBACK_STEP`] of them. Advisory: an error here resurfaces in [`PackFile::seal`]'s fsync.
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let in_file = self.len - self.out.buffer().len() as u64;
        if in_file < self.kicked + WRITEBACK_STEP {
            return;
        }
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is ours.
        unsafe {
            libc::sync_file_range(
                self.out.get_ref().as_raw_fd(),
                self.kicked as libc::off64_t,
                (in_file - self.kicked) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.kicked = in_file;
    }

    /// Flushes and fsyncs the pack (and its directory); afterwards its records are durable.
    pub fn seal(self) -> Result<(String, u64)> {
        let path = self.path;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("write pack file", &path, e.into_error()))?;
        file.sync_all().ctx("fsync pack file", &path)?;
        sync_dir(path.parent().unwrap())?;
        Ok((self.name, self.len))
    }

    /// Deletes an unsealed pack (used when an ingest fails).
    pub fn discard(self) {
        let path = self.path.clone();
        // Drop the buffered bytes unwritten: the file is going away.
        drop(self.out.into_parts());
        let _ = fs::remove_file(path);
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
        crate::object::decode(expect, payload, &self.keys).map_err(|e| match e {
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

/// True if some process still holds the pack's write lock (an ingest in progress).
pub fn is_being_written(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => f.try_lock_shared().is_err(),
        Err(_) => false,
    }
}
