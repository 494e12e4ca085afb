//! XFS volumes (v4 and v5), read by vmrepo itself from the published on-disk format: the
//! superblock, inodes found from their numbers, data forks inline, as extent lists and as
//! B+trees, directories in every form (short form in the inode; block, leaf, node and B+tree
//! directories through their data blocks), symlinks inline or in blocks. Holes and unwritten
//! extents read as zeros. Nothing is written and the log is not replayed: a generation holds
//! what a crash at the snapshot would have left, and XFS keeps its metadata consistent on disk
//! for that. Every structure is bounds-checked before use; a hostile image gives an error.

use crate::error::{Error, Result};
use crate::guest::{collect_span, join, Entry, GuestFs, VolumeIo};

/// An XFS filesystem on a volume.
pub struct Xfs {
    io: VolumeIo,
    sb: Superblock,
    /// `vm@time:volume`, for messages.
    at: String,
}

/// The superblock fields the reader needs.
struct Superblock {
    block_size: u64,
    ag_blocks: u64,
    ag_count: u64,
    ag_blk_log: u32,
    inode_size: u64,
    inop_blk_log: u32,
    root: u64,
    /// Version 5: self-describing metadata (CRCs, longer headers, v3 inodes).
    v5: bool,
    /// Directory entries carry a file-type byte.
    ftype: bool,
    dir_block_size: u64,
    label: String,
}

/// The parts of an inode the reader uses.
struct Inode {
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    atime: (i64, u32),
    mtime: (i64, u32),
    /// Data fork format: 1 local, 2 extents, 3 B+tree.
    format: u8,
    nextents: u64,
    /// Its data is on the realtime device (not part of the volume).
    realtime: bool,
    /// The data fork's bytes.
    fork: Vec<u8>,
}

/// A mapped run of a file: `len` blocks from logical block `logical` at filesystem block
/// `physical` (unwritten: reads as zeros).
#[derive(Clone, Copy, Debug)]
struct Extent {
    logical: u64,
    physical: u64,
    len: u64,
    unwritten: bool,
}

const S_IFMT: u16 = 0o170000;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;
/// Directory data blocks live below this byte offset of a directory (leaf and free-index
/// blocks above it).
const DIR_LEAF_OFFSET: u64 = 32 << 30;
/// Deepest B+tree of extents accepted, and most symlinks followed in one path.
const MAX_BTREE_DEPTH: u32 = 10;
const MAX_SYMLINKS: u32 = 40;
/// XFS's own limit on a symlink target.
const MAX_LINK_LEN: u64 = 1024;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Xfs {
    /// Loads the filesystem on `io` (its primary superblock).
    pub fn load(io: VolumeIo, at: &str) -> Result<Xfs> {
        let mut b = vec![0u8; 512.min(io.size()) as usize];
        io.read_at(0, &mut b)?;
        let sb = Superblock::parse(&b).ok_or_else(|| {
            Error::GuestFilesystem(format!("{at}: not a readable XFS superblock"))
        })?;
        Ok(Xfs {
            io,
            sb,
            at: at.to_string(),
        })
    }

    fn what(&self, path: &str) -> String {
        format!("{}:{path}", self.at)
    }

    /// The filesystem's own fault at `what` (`vm@time:volume:path`, or the volume and a
    /// structure).
    fn corrupt(&self, what: &str, why: &str) -> Error {
        Error::GuestFilesystem(format!("{what}: {why}"))
    }

    /// Byte offset of filesystem block `fsb` (allocation group in its high bits).
    fn block_offset(&self, fsb: u64) -> Option<u64> {
        let sb = &self.sb;
        let ag = fsb.checked_shr(sb.ag_blk_log)?;
        let agbno = fsb & ((1u64 << sb.ag_blk_log) - 1);
        if ag >= sb.ag_count || agbno >= sb.ag_blocks {
            return None;
        }
        (ag * sb.ag_blocks + agbno).checked_mul(sb.block_size)
    }

    fn read_blocks(&self, fsb: u64, count: u64, what: &str) -> Result<Vec<u8>> {
        let at = self
            .block_offset(fsb)
            .ok_or_else(|| self.corrupt(what, "points outside the filesystem"))?;
        let mut b = vec![0u8; (count * self.sb.block_size) as usize];
        self.io.read_at(at, &mut b)?;
        Ok(b)
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        let sb = &self.sb;
        let what = format!("{}: inode {ino}", self.at);
        let per_ag = sb.ag_blk_log + sb.inop_blk_log;
        let ag = ino.checked_shr(per_ag).unwrap_or(u64::MAX);
        let agbno = (ino >> sb.inop_blk_log) & ((1u64 << sb.ag_blk_log) - 1);
        let slot = ino & ((1u64 << sb.inop_blk_log) - 1);
        if ag >= sb.ag_count || agbno >= sb.ag_blocks {
            return Err(self.corrupt(&what, "inode number outside the filesystem"));
        }
        let at = (ag * sb.ag_blocks + agbno) * sb.block_size + slot * sb.inode_size;
        let mut b = vec![0u8; sb.inode_size as usize];
        self.io.read_at(at, &mut b)?;
        Inode::parse(&b, ino, sb.v5).ok_or_else(|| self.corrupt(&what, "not a valid inode"))
    }

    /// The data fork's extents, sorted by logical block.
    fn extents(&self, inode: &Inode, what: &str) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        match inode.format {
            2 => {
                let n = inode.nextents as usize;
                if n.saturating_mul(16) > inode.fork.len() {
                    return Err(self.corrupt(what, "more extents than its inode holds"));
                }
                out.extend(inode.fork.chunks_exact(16).take(n).map(extent));
            }
            3 => {
                let fork = &inode.fork;
                let level = be16(fork, 0).unwrap_or(0) as u32;
                let n = be16(fork, 2).unwrap_or(0) as usize;
                let max = fork.len().saturating_sub(4) / 16;
                if level == 0 || n > max {
                    return Err(self.corrupt(what, "bad extent tree root"));
                }
                let mut seen = std::collections::HashSet::new();
                for i in 0..n {
                    let ptr = be64(fork, 4 + max * 8 + i * 8).unwrap_or(0);
                    self.btree_block(ptr, level - 1, 0, what, &mut seen, &mut out)?;
                }
            }
            _ => return Err(self.corrupt(what, "data is not stored in blocks")),
        }
        out.sort_by_key(|e| e.logical);
        Ok(out)
    }

    /// Adds the extents of the B+tree block `fsb` (at `level`; 0 is a leaf) to `out`. A block
    /// met twice (`seen`) is a loop or a shared subtree: refused, so that a hostile tree
    /// cannot make the walk exponential.
    fn btree_block(
        &self,
        fsb: u64,
        level: u32,
        depth: u32,
        what: &str,
        seen: &mut std::collections::HashSet<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        if depth > MAX_BTREE_DEPTH || !seen.insert(fsb) {
            return Err(self.corrupt(what, "extent tree loops or is too deep"));
        }
        let b = self.read_blocks(fsb, 1, what)?;
        let (magic, hdr) = if self.sb.v5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        let n = be16(&b, 6).unwrap_or(0) as usize;
        let max = (b.len() - hdr) / 16;
        if &b[..4] != magic || be16(&b, 4) != Some(level as u16) || n > max {
            return Err(self.corrupt(what, "bad extent tree block"));
        }
        if level == 0 {
            out.extend(b[hdr..hdr + n * 16].chunks_exact(16).map(extent));
            return Ok(());
        }
        for i in 0..n {
            let ptr = be64(&b, hdr + max * 8 + i * 8).unwrap_or(0);
            self.btree_block(ptr, level - 1, depth + 1, what, seen, out)?;
        }
        Ok(())
    }

    /// Hands bytes `[from, end)` of a file mapped by `extents` to `sink` in pieces of at most
    /// 1 MiB; holes and unwritten extents as zeros.
    fn read_mapped(
        &self,
        extents: &[Extent],
        from: u64,
        end: u64,
        what: &str,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let bs = self.sb.block_size;
        let piece = (1u64 << 20).max(bs);
        let mut pos = from;
        let zeros = vec![0u8; piece as usize];
        let mut next = extents.iter().peekable();
        while pos < end {
            let block = pos / bs;
            let skip = pos % bs;
            while next.peek().is_some_and(|e| e.logical + e.len <= block) {
                next.next();
            }
            match next.peek() {
                Some(e) if e.logical <= block => {
                    let within = block - e.logical;
                    let blocks = (e.len - within).min(piece / bs);
                    let n = (blocks * bs - skip).min(end - pos);
                    if e.unwritten {
                        sink(&zeros[..n as usize])?;
                    } else {
                        let b = self.read_blocks(e.physical + within, blocks, what)?;
                        sink(&b[skip as usize..(skip + n) as usize])?;
                    }
                    pos += n;
                }
                // A hole up to the next extent (or the end).
                found => {
                    let upto = found.map_or(end, |e| e.logical.saturating_mul(bs).min(end));
                    let n = (upto - pos).min(piece);
                    sink(&zeros[..n as usize])?;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// The regular file at `path` (symlinks followed), or why it is not one this reader reads.
    fn regular(&self, path: &str) -> Result<Inode> {
        let (_, inode) = self.resolve(path, true)?;
        let what = self.what(path);
        match inode.mode & S_IFMT {
            S_IFDIR => {
                return Err(Error::Usage(format!(
                    "{what} is a directory (`vmrepo ls` lists it)"
                )))
            }
            S_IFREG => {}
            _ => return Err(Error::Usage(format!("{what} is not a regular file"))),
        }
        if inode.realtime {
            return Err(Error::GuestFilesystem(format!(
                "{what}: its data is on the filesystem's realtime device, which is not part \
                 of this volume"
            )));
        }
        Ok(inode)
    }

    /// Hands bytes `[from, end)` of the regular file in `inode` to `sink`.
    fn read_content(
        &self,
        inode: &Inode,
        from: u64,
        end: u64,
        what: &str,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        if inode.format == 1 {
            let data = inode
                .fork
                .get(..inode.size as usize)
                .ok_or_else(|| self.corrupt(what, "inline data outside its inode"))?;
            return sink(&data[from as usize..end as usize]);
        }
        let extents = self.extents(inode, what)?;
        self.read_mapped(&extents, from, end, what, sink)
    }

    /// The entries of the directory in `inode`: (name, inode number), `.` and `..` left out.
    fn entries(&self, inode: &Inode, what: &str) -> Result<Vec<(Vec<u8>, u64)>> {
        if inode.format == 1 {
            return short_form_entries(&inode.fork, self.sb.ftype)
                .ok_or_else(|| self.corrupt(what, "bad short-form directory"));
        }
        let extents = self.extents(inode, what)?;
        let bs = self.sb.block_size;
        let dir_blocks = self.sb.dir_block_size / bs;
        let mut out = Vec::new();
        let below_leaves = |l: u64| l.saturating_mul(bs) < DIR_LEAF_OFFSET;
        for e in extents.iter().filter(|e| below_leaves(e.logical)) {
            // Directory blocks start at multiples of the directory block size.
            let mut l = e.logical.next_multiple_of(dir_blocks);
            while l < e.logical + e.len && below_leaves(l) {
                let mut b = Vec::with_capacity(self.sb.dir_block_size as usize);
                self.read_mapped_at(&extents, l, dir_blocks, what, &mut b)?;
                data_block_entries(&b, self.sb.v5, self.sb.ftype, &mut out)
                    .ok_or_else(|| self.corrupt(what, "bad directory block"))?;
                l += dir_blocks;
            }
        }
        Ok(out)
    }

    /// Reads `count` logical blocks from `first` of a file mapped by `extents` into `out`.
    fn read_mapped_at(
        &self,
        extents: &[Extent],
        first: u64,
        count: u64,
        what: &str,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        for l in first..first + count {
            // Sorted by logical block: the last extent starting at or before `l`.
            let k = extents.partition_point(|e| e.logical <= l);
            let e = k
                .checked_sub(1)
                .map(|k| &extents[k])
                .filter(|e| l < e.logical + e.len)
                .ok_or_else(|| self.corrupt(what, "directory block not mapped"))?;
            out.extend(self.read_blocks(e.physical + (l - e.logical), 1, what)?);
        }
        Ok(())
    }

    /// The target of the symlink in `inode`.
    fn target(&self, inode: &Inode, what: &str) -> Result<Vec<u8>> {
        if inode.size > MAX_LINK_LEN {
            return Err(self.corrupt(what, "symlink target too long"));
        }
        let len = inode.size as usize;
        if inode.format == 1 {
            return inode
                .fork
                .get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| self.corrupt(what, "symlink target outside its inode"));
        }
        let extents = self.extents(inode, what)?;
        let mut raw = Vec::new();
        // v5 remote symlink blocks start with a 56-byte header ("XSLM").
        let hdr = if self.sb.v5 { 56 } else { 0 };
        let blocks = extents.iter().map(|e| e.len).sum::<u64>().min(4);
        for l in 0..blocks {
            let mut b = Vec::new();
            self.read_mapped_at(&extents, l, 1, what, &mut b)?;
            if hdr > 0 && &b[..4] != b"XSLM" {
                return Err(self.corrupt(what, "bad symlink block"));
            }
            raw.extend_from_slice(&b[hdr..]);
        }
        raw.truncate(len);
        if raw.len() < len {
            return Err(self.corrupt(what, "symlink target shorter than its size"));
        }
        Ok(raw)
    }

    /// The inode at `path`; `follow_last` follows a final symlink (symlinks in the middle
    /// always are).
    fn resolve(&self, path: &str, follow_last: bool) -> Result<(u64, Inode)> {
        let mut links = 0;
        let mut stack: Vec<(u64, Inode)> = vec![(self.sb.root, self.inode(self.sb.root)?)];
        let mut todo: Vec<Vec<u8>> = components(path.as_bytes());
        todo.reverse();
        let mut walked = String::from("/");
        while let Some(name) = todo.pop() {
            let (_, dir) = stack.last().expect("the root is never popped");
            if name == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            if dir.mode & S_IFMT != S_IFDIR {
                return Err(Error::Usage(format!(
                    "{}: not a directory",
                    self.what(&walked)
                )));
            }
            let entries = self.entries(dir, &self.what(&walked))?;
            walked = join(&walked, &String::from_utf8_lossy(&name));
            let Some(&(_, ino)) = entries.iter().find(|(n, _)| *n == name) else {
                return Err(Error::NotFound(format!(
                    "{}: no such file or directory",
                    self.what(&walked)
                )));
            };
            let inode = self.inode(ino)?;
            if inode.mode & S_IFMT == S_IFLNK && (follow_last || !todo.is_empty()) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::GuestFilesystem(format!(
                        "{}: too many levels of symbolic links",
                        self.what(&walked)
                    )));
                }
                let target = self.target(&inode, &self.what(&walked))?;
                if target.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                let mut more = components(&target);
                more.reverse();
                todo.extend(more);
                continue;
            }
            stack.push((ino, inode));
        }
        Ok(stack.pop().expect("the root is never popped"))
    }

    fn entry(&self, name: String, inode: &Inode, what: &str) -> Result<Entry> {
        let kind = match inode.mode & S_IFMT {
            S_IFDIR => "dir",
            S_IFREG => "file",
            S_IFLNK => "symlink",
            0o060000 => "block",
            0o020000 => "char",
            0o010000 => "fifo",
            _ => "socket",
        };
        let target = if kind == "symlink" {
            Some(String::from_utf8_lossy(&self.target(inode, what)?).into_owned())
        } else {
            None
        };
        Ok(Entry {
            name,
            kind,
            mode: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            mtime: inode.mtime.0,
            mtime_nanos: inode.mtime.1,
            atime: inode.atime,
            target,
        })
    }
}

/// The path's components, `.` and empty ones left out.
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

/// One 16-byte extent record: flag (1 bit), logical block (54), physical block (52), length
/// (21), big-endian.
fn extent(r: &[u8]) -> Extent {
    let v = u128::from_be_bytes(r.try_into().expect("16 bytes"));
    Extent {
        unwritten: v >> 127 == 1,
        logical: ((v >> 73) & ((1u128 << 54) - 1)) as u64,
        physical: ((v >> 21) & ((1u128 << 52) - 1)) as u64,
        len: (v & ((1u128 << 21) - 1)) as u64,
    }
}

/// The entries of a short-form directory (kept in the inode).
fn short_form_entries(fork: &[u8], ftype: bool) -> Option<Vec<(Vec<u8>, u64)>> {
    let count = *fork.first()? as usize;
    let wide = *fork.get(1)? != 0;
    let ino_len = if wide { 8 } else { 4 };
    let mut at = 2 + ino_len;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = *fork.get(at)? as usize;
        let name = fork.get(at + 3..at + 3 + len)?.to_vec();
        at += 3 + len + usize::from(ftype);
        let ino = if wide {
            be64(fork, at)?
        } else {
            be32(fork, at)? as u64
        };
        at += ino_len;
        out.push((name, ino));
    }
    Some(out)
}

/// Adds the entries of one directory data block (block form or data form) to `out`.
fn data_block_entries(
    b: &[u8],
    v5: bool,
    ftype: bool,
    out: &mut Vec<(Vec<u8>, u64)>,
) -> Option<()> {
    let magic = b.get(..4)?;
    let hdr = if v5 { 64 } else { 16 };
    let end = match magic {
        b"XDB3" | b"XD2B" => {
            // A single-block directory: its leaf entries and tail close the block.
            let count = be32(b, b.len().checked_sub(8)?)? as usize;
            b.len().checked_sub(8 + count.checked_mul(8)?)?
        }
        b"XDD3" | b"XD2D" => b.len(),
        _ => return None,
    };
    if (magic == b"XDB3" || magic == b"XDD3") != v5 {
        return None;
    }
    let mut at = hdr;
    while at + 8 <= end {
        if be16(b, at)? == 0xffff {
            let len = be16(b, at + 2)? as usize;
            if len < 8 || !len.is_multiple_of(8) {
                return None;
            }
            at += len;
            continue;
        }
        let ino = be64(b, at)?;
        let len = *b.get(at + 8)? as usize;
        let name = b.get(at + 9..at + 9 + len)?;
        if name != b"." && name != b".." {
            out.push((name.to_vec(), ino));
        }
        at += (8 + 1 + len + usize::from(ftype) + 2).next_multiple_of(8);
    }
    Some(())
}

/// Seconds and nanoseconds of an inode timestamp (`bigtime`: nanoseconds since 1901-12-13).
fn timestamp(b: &[u8], at: usize, bigtime: bool) -> Option<(i64, u32)> {
    if bigtime {
        let ns = be64(b, at)?;
        Some((
            (ns / 1_000_000_000) as i64 - (1i64 << 31),
            (ns % 1_000_000_000) as u32,
        ))
    } else {
        Some((be32(b, at)? as i32 as i64, be32(b, at + 4)?))
    }
}

impl Superblock {
    fn parse(b: &[u8]) -> Option<Superblock> {
        if b.get(..4)? != b"XFSB" {
            return None;
        }
        let block_size = be32(b, 4)? as u64;
        let ag_blocks = be32(b, 84)? as u64;
        let ag_count = be32(b, 88)? as u64;
        let version = be16(b, 100)? & 0xf;
        let inode_size = be16(b, 104)? as u64;
        let block_log = *b.get(120)? as u32;
        let inode_log = *b.get(122)? as u32;
        let inop_blk_log = *b.get(123)? as u32;
        let ag_blk_log = *b.get(124)? as u32;
        let dir_blk_log = *b.get(192)? as u32;
        let v5 = version == 5;
        let ftype = if v5 {
            be32(b, 216)? & 1 != 0
        } else {
            be32(b, 200)? & 0x200 != 0
        };
        let sane = (9..=16).contains(&block_log)
            && block_size == 1 << block_log
            && (8..=11).contains(&inode_log)
            && inode_size == 1 << inode_log
            && inop_blk_log == block_log.checked_sub(inode_log)?
            && (1..=31).contains(&ag_blk_log)
            && ag_blocks > 0
            && ag_blocks <= 1 << ag_blk_log
            && ag_count > 0
            && dir_blk_log <= 8
            && (version == 4 || v5);
        if !sane {
            return None;
        }
        let label = b.get(108..120)?;
        let label = String::from_utf8_lossy(label)
            .trim_end_matches('\0')
            .to_string();
        Some(Superblock {
            block_size,
            ag_blocks,
            ag_count,
            ag_blk_log,
            inode_size,
            inop_blk_log,
            root: be64(b, 56)?,
            v5,
            ftype,
            dir_block_size: block_size << dir_blk_log,
            label,
        })
    }
}

impl Inode {
    fn parse(b: &[u8], ino: u64, v5: bool) -> Option<Inode> {
        if b.get(..2)? != b"IN" {
            return None;
        }
        let version = *b.get(4)?;
        let core = if version == 3 { 176 } else { 100 };
        if v5 && (version != 3 || be64(b, 152)? != ino) {
            return None;
        }
        let flags2 = if version == 3 { be64(b, 120)? } else { 0 };
        let bigtime = flags2 & 0x8 != 0;
        let nextents = if flags2 & 0x10 != 0 {
            be64(b, 24)?
        } else {
            be32(b, 76)? as u64
        };
        let fork_off = *b.get(82)? as usize * 8;
        let fork_end = if fork_off == 0 {
            b.len()
        } else {
            core + fork_off
        };
        Some(Inode {
            mode: be16(b, 2)?,
            uid: be32(b, 8)?,
            gid: be32(b, 12)?,
            size: be64(b, 56)?,
            atime: timestamp(b, 32, bigtime)?,
            mtime: timestamp(b, 40, bigtime)?,
            format: *b.get(5)?,
            nextents,
            realtime: be16(b, 90)? & 1 != 0,
            fork: b.get(core..fork_end)?.to_vec(),
        })
    }
}

impl GuestFs for Xfs {
    fn label(&self) -> Option<String> {
        (!self.sb.label.is_empty()).then(|| self.sb.label.clone())
    }

    fn stat(&self, path: &str) -> Result<Entry> {
        let (_, inode) = self.resolve(path, false)?;
        self.entry(path.to_string(), &inode, &self.what(path))
    }

    fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let (_, dir) = self.resolve(path, true)?;
        if dir.mode & S_IFMT != S_IFDIR {
            return Err(Error::Usage(format!(
                "{}: not a directory",
                self.what(path)
            )));
        }
        let mut out = Vec::new();
        for (name, ino) in self.entries(&dir, &self.what(path))? {
            let name = String::from_utf8_lossy(&name).into_owned();
            let what = self.what(&join(path, &name));
            let inode = self.inode(ino)?;
            out.push(self.entry(name, &inode, &what)?);
        }
        Ok(out)
    }

    fn link_target(&self, path: &str) -> Result<Vec<u8>> {
        let (_, inode) = self.resolve(path, false)?;
        if inode.mode & S_IFMT != S_IFLNK {
            return Err(Error::Usage(format!(
                "{}: not a symbolic link",
                self.what(path)
            )));
        }
        self.target(&inode, &self.what(path))
    }

    fn read_file(&self, path: &str, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        let inode = self.regular(path)?;
        self.read_content(&inode, 0, inode.size, &self.what(path), sink)?;
        Ok(inode.size)
    }

    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let inode = self.regular(path)?;
        collect_span(inode.size, offset, len, |from, end, sink| {
            self.read_content(&inode, from, end, &self.what(path), sink)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_records_unpack_their_four_fields() {
        let v: u128 = (1u128 << 127) | (5u128 << 73) | (1234u128 << 21) | 7;
        let e = extent(&v.to_be_bytes());
        assert!(e.unwritten);
        assert_eq!((e.logical, e.physical, e.len), (5, 1234, 7));
    }

    #[test]
    fn hostile_directory_blocks_are_refused_not_followed() {
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(b"XDD3");
        // A free entry of length 0 would never advance.
        b[64..66].copy_from_slice(&[0xff, 0xff]);
        let mut out = Vec::new();
        assert!(data_block_entries(&b, true, true, &mut out).is_none());
        // A block-form directory claiming more leaf entries than fit.
        b[..4].copy_from_slice(b"XDB3");
        b[4088..4092].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(data_block_entries(&b, true, true, &mut out).is_none());
        // A short-form directory whose entries run past the fork.
        assert!(short_form_entries(&[3, 0, 0, 0, 0, 128, 9], true).is_none());
    }
}
