//! Every input parser driven from bytes in memory, for the cargo-fuzz targets in `fuzz/` and the
//! mutation test: descriptor, .vmx, .vmsd, KDMV, COWD, seSparse, qcow2, partition tables, LVM2
//! metadata, ext2/3/4, NTFS, FAT, XFS and exFAT. Each call parses the input and, when it opens, walks its
//! allocation map (or its directory tree) and reads its data, in bounded windows.
//! Errors are the expected outcome for most inputs; a panic, hang or huge allocation is a bug.

use std::path::Path;

use crate::source::{Cowd, GrainFormat, GrainLayer, Kdmv, Layer, MemFile, Qcow2, SeSparse};

/// The parsers [`exercise`] knows.
pub const PARSERS: &[&str] = &[
    "descriptor",
    "vmx",
    "vmsd",
    "kdmv",
    "cowd",
    "sesparse",
    "qcow2",
    "partitions",
    "ext4",
    "ntfs",
    "fat",
    "xfs",
    "exfat",
    "lvm",
];

/// Guest bytes read per input at most (start and end of the disk, and the map around them);
/// of a guest file, its first window.
const READ_WINDOW: u64 = 1 << 20;
/// How the walk of a guest tree stops reading a file after its first window.
const WINDOW_READ: &str = "first window read";

/// Maps and reads the start and end windows of a grain-table layer; the first error.
fn walk<F: GrainFormat>(f: F) -> Result<(), String> {
    let layer = GrainLayer(f);
    let size = layer.size();
    let mut buf = Vec::new();
    for start in [0, size.saturating_sub(READ_WINDOW)] {
        let end = (start + READ_WINDOW).min(size);
        layer.map(start..end).map_err(|e| e.to_string())?;
        buf.resize((end - start) as usize, 0);
        layer.read(&mut buf, start).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Lists directory `path` of `fs` and what is under it (at most 4 levels, 64 entries each),
/// reading each file and each symlink's target.
fn walk_guest(fs: &dyn crate::guest::GuestFs, path: &str, depth: usize) -> Result<(), String> {
    let entries = fs.list(path).map_err(|e| e.to_string())?;
    for e in entries.into_iter().take(64) {
        let full = crate::guest::join(path, &e.name);
        match e.kind {
            "dir" if depth < 4 => walk_guest(fs, &full, depth + 1)?,
            "symlink" => {
                fs.link_target(&full).map_err(|e| e.to_string())?;
            }
            "file" => {
                // The first window of each file: a hostile size (a file of 2^60 bytes of holes)
                // would otherwise take forever to read, correctly.
                let mut n = 0u64;
                let read = fs.read_file(&full, &mut |b| {
                    n += b.len() as u64;
                    if n > READ_WINDOW {
                        return Err(crate::error::Error::Usage(WINDOW_READ.into()));
                    }
                    Ok(())
                });
                match read {
                    Err(crate::error::Error::Usage(m)) if m == WINDOW_READ => {}
                    r => {
                        r.map_err(|e| e.to_string())?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs parser `which` (one of [`PARSERS`]) over `data`: `Ok` when the input parses (and, for
/// a disk format, opens and its windows map and read), else the parser's error. Mutated inputs
/// mostly give errors; a panic, hang or huge allocation is a bug. A valid input must give `Ok`,
/// which is how the mutation test knows its seeds reach the parsers' deeper code at all.
pub fn exercise(which: &str, data: &[u8]) -> Result<(), String> {
    let path = Path::new("fuzz-input");
    let file = || Box::new(MemFile::new(path, data.to_vec()));
    let err = |e: crate::error::Error| e.to_string();
    match which {
        "descriptor" => crate::source::descriptor::parse(data, path)
            .map(|_| ())
            .map_err(err),
        "vmx" => {
            let v = crate::vmware::vmx::Vmx::parse(&String::from_utf8_lossy(data));
            if v.disks().is_empty() {
                return Err("no disks".into());
            }
            Ok(())
        }
        "vmsd" => {
            let v = crate::vmware::vmsd::Vmsd::parse(&String::from_utf8_lossy(data));
            v.select("latest", path).map(|_| ()).map_err(err)
        }
        "kdmv" => {
            let k = Kdmv::open(file(), false).map_err(err)?;
            if let Some(d) = k.descriptor() {
                crate::source::descriptor::parse(d, path).map_err(err)?;
            }
            walk(k)
        }
        "cowd" => walk(Cowd::open(file()).map_err(err)?),
        "sesparse" => walk(SeSparse::open(file()).map_err(err)?),
        "qcow2" => walk(Qcow2::open(file()).map_err(err)?),
        "partitions" => {
            let io = crate::guest::VolumeIo::in_memory(data.to_vec());
            let mut read = |at: u64, buf: &mut [u8]| io.read_at(at, buf);
            let parts = match crate::guest::partitions::read_table(data.len() as u64, &mut read)
                .map_err(err)?
            {
                crate::guest::partitions::Table::None => return Err("no table".into()),
                crate::guest::partitions::Table::Mbr(p)
                | crate::guest::partitions::Table::Gpt(p) => p,
            };
            for p in parts {
                crate::guest::probe::probe_at(p.start, p.len, &mut read).map_err(err)?;
            }
            Ok(())
        }
        "lvm" => {
            let io = crate::guest::VolumeIo::in_memory(data.to_vec());
            let mut read = |at: u64, buf: &mut [u8]| io.read_at(at, buf);
            let lvs = crate::guest::lvm::read_pv(data.len() as u64, &mut read).map_err(err)?;
            if lvs.is_empty() {
                return Err("no logical volumes".into());
            }
            Ok(())
        }
        "ext4" | "ntfs" | "fat" | "xfs" | "exfat" => {
            let content = match which {
                "ext4" => crate::guest::Content::Ext,
                "ntfs" => crate::guest::Content::Ntfs,
                "xfs" => crate::guest::Content::Xfs,
                "exfat" => crate::guest::Content::ExFat,
                _ => crate::guest::Content::Fat,
            };
            let io = crate::guest::VolumeIo::in_memory(data.to_vec());
            let fs = crate::guest::open_fs(io, content, "fuzz-input").map_err(err)?;
            walk_guest(&*fs, "/", 0)
        }
        other => panic!("unknown parser {other}"),
    }
}
