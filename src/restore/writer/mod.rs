//! Disk writers for extract: lay a restored disk out afresh as raw, flat VMDK (monolithicFlat or
//! ESXi `vmfs`), monolithicSparse, twoGbMaxExtentSparse, streamOptimized or qcow2.
//!
//! Extract first writes the disk's bytes into a sparse raw file (verified chunk by chunk, as for
//! every restore); a writer then reads that file's allocated ranges and emits the target format,
//! leaving zero grains/clusters out. Raw and flat outputs use the raw file itself as the data.

mod kdmv;
mod qcow2;

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, IoContext, Result};
use crate::repo::manifest::{DiskEntry, ExtentFile};

/// Output formats of `extract --disk-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A text descriptor and one flat extent (`vmfs` for ESXi disks, else `monolithicFlat`).
    Flat,
    /// One hosted sparse file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor and hosted sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// One compressed hosted sparse file (VMware stream layout, grain directory at the end).
    StreamOptimized,
    /// A qcow2 (version 3) image.
    Qcow2,
}

impl FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<DiskFormat, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "raw" => DiskFormat::Raw,
            "flat" => DiskFormat::Flat,
            "monolithicsparse" => DiskFormat::MonolithicSparse,
            "twogbmaxextentsparse" | "2gbmaxextentsparse" => DiskFormat::TwoGbMaxExtentSparse,
            "streamoptimized" => DiskFormat::StreamOptimized,
            "qcow2" => DiskFormat::Qcow2,
            _ => {
                return Err(format!(
                    "{s:?} is not one of raw, flat, monolithicSparse, twoGbMaxExtentSparse, streamOptimized, qcow2"
                ))
            }
        })
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Flat => "flat",
            DiskFormat::MonolithicSparse => "monolithicSparse",
            DiskFormat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            DiskFormat::StreamOptimized => "streamOptimized",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// How one disk is written by a writer.
#[derive(Clone, Debug)]
pub struct WritePlan {
    /// Output format.
    pub format: DiskFormat,
    /// createType written into the descriptor (`vmfs`, `monolithicFlat`, ...).
    pub create_type: String,
    /// Files created, relative to the destination; the first is what the VM refers to.
    pub outputs: Vec<String>,
    /// Index into `outputs` of a file that is the raw data itself (raw, flat), if any.
    pub data_output: Option<usize>,
    /// A stored descriptor file this plan replaces (not restored verbatim).
    pub replaces: Option<String>,
}

/// VMware's twoGbMaxExtentSparse extent size (vmkfstools), in sectors.
pub const TWO_GB_EXTENT_SECTORS: u64 = 4_192_256;

fn split_name(name: &str) -> (String, String) {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (name[..=i].to_string(), name[i + 1..].to_string()),
        None => (String::new(), name.to_string()),
    };
    let stem = match base.rfind('.') {
        Some(i)
            if ["vmdk", "qcow2", "img", "raw"]
                .iter()
                .any(|e| base[i + 1..].eq_ignore_ascii_case(e)) =>
        {
            base[..i].to_string()
        }
        _ => base,
    };
    (dir, stem)
}

/// How `d` is restored: `None` for the file-for-file restore of a flat disk or raw image (the
/// default for those, and what `flat`/`raw` mean for them), else a writer plan.
pub fn plan(d: &DiskEntry, requested: Option<DiskFormat>) -> Result<Option<WritePlan>> {
    let original = match &d.layout {
        Some(l) => l.format.to_ascii_lowercase(),
        None => d.create_type.to_ascii_lowercase(),
    };
    let esxi = original.starts_with("vmfs");
    let default = match original.as_str() {
        "raw" => DiskFormat::Raw,
        "qcow2" => DiskFormat::Qcow2,
        "monolithicsparse" => DiskFormat::MonolithicSparse,
        "twogbmaxextentsparse" | "2gbmaxextentsparse" => DiskFormat::TwoGbMaxExtentSparse,
        "streamoptimized" => DiskFormat::StreamOptimized,
        _ => DiskFormat::Flat,
    };
    let format = requested.unwrap_or(default);
    if d.layout.is_none() {
        let same = match format {
            DiskFormat::Raw => original == "raw",
            DiskFormat::Flat => original != "raw",
            _ => false,
        };
        if same {
            return Ok(None);
        }
    }
    let name = match (&d.layout, &d.descriptor) {
        (Some(l), _) => l.file.clone(),
        (None, Some(desc)) => desc.clone(),
        (None, None) => d
            .extents
            .first()
            .and_then(|e| e.file.clone())
            .ok_or_else(|| Error::Corrupt(format!("disk {} names no file", d.slot)))?,
    };
    let (dir, stem) = split_name(&name);
    let vmdk = format!("{dir}{stem}.vmdk");
    let (outputs, data_output, create_type) = match format {
        DiskFormat::Raw => {
            let n = if d.layout.as_ref().is_some_and(|l| l.format == "raw") {
                name.clone()
            } else {
                format!("{dir}{stem}.img")
            };
            (vec![n], Some(0), "raw".to_string())
        }
        DiskFormat::Flat => (
            vec![vmdk, format!("{dir}{stem}-flat.vmdk")],
            Some(1),
            if esxi { "vmfs" } else { "monolithicFlat" }.to_string(),
        ),
        DiskFormat::MonolithicSparse => (vec![vmdk], None, "monolithicSparse".into()),
        DiskFormat::StreamOptimized => (vec![vmdk], None, "streamOptimized".into()),
        DiskFormat::TwoGbMaxExtentSparse => {
            let n = d.virtual_size.div_ceil(TWO_GB_EXTENT_SECTORS * 512).max(1);
            let mut o = vec![vmdk];
            for i in 1..=n {
                o.push(format!("{dir}{stem}-s{i:03}.vmdk"));
            }
            (o, None, "twoGbMaxExtentSparse".into())
        }
        DiskFormat::Qcow2 => (vec![format!("{dir}{stem}.qcow2")], None, "qcow2".into()),
    };
    Ok(Some(WritePlan {
        format,
        create_type,
        outputs,
        data_output,
        replaces: if d.layout.is_none() {
            d.descriptor.clone()
        } else {
            None
        },
    }))
}

/// A file a writer writes (created by the caller, empty, without following links) and its
/// path for messages.
#[derive(Clone, Copy)]
pub struct Output<'a> {
    /// The open file.
    pub file: &'a File,
    /// Where it is, for messages.
    pub path: &'a Path,
}

impl Output<'_> {
    /// Writes `data` as the whole content of the file.
    fn write_whole(&self, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, 0).ctx("write", self.path)?;
        self.file
            .set_len(data.len() as u64)
            .ctx("set the size of", self.path)
    }
}

/// The restored raw disk a writer reads: a sparse file read with `pread`, its holes found with
/// SEEK_DATA/SEEK_HOLE on the descriptor extract created (never reopened by name).
pub struct RawFile<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
}

impl<'a> RawFile<'a> {
    /// The raw disk in `out`.
    pub fn new(out: Output<'a>) -> Result<RawFile<'a>> {
        let len = out.file.metadata().ctx("stat", out.path)?.len();
        Ok(RawFile {
            file: out.file,
            path: out.path,
            len,
        })
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.len
    }

    fn seek(&self, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek only reads its integer arguments; the descriptor is open. Reads are
        // positioned (pread), so moving the file offset disturbs nothing.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    /// The data ranges within `range` (everything else reads as zeros).
    pub fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let end = range.end.min(self.len);
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    // No hole support: all data.
                    out.push(pos..end);
                    break;
                }
                Err(e) => return Err(Error::io("find data in", self.path, e)),
            };
            if data >= end {
                break;
            }
            let hole = self
                .seek(data, libc::SEEK_HOLE)
                .map_err(|e| Error::io("find data in", self.path, e))?
                .unwrap_or(self.len)
                .clamp(data + 1, end);
            out.push(data..hole);
            pos = hole;
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).ctx("read", self.path)
    }
}

/// Writes `plan`'s outputs (`outputs[i]` is where `plan.outputs[i]` goes, created empty by the
/// caller) from the restored raw disk `raw` (for raw and flat formats, `outputs[data_output]`
/// itself). `source_descriptor` is the disk's original descriptor text, whose disk database
/// (adapter type, geometry, uuid) is carried over.
pub fn write(
    plan: &WritePlan,
    d: &DiskEntry,
    raw: Output<'_>,
    outputs: &[Output<'_>],
    source_descriptor: Option<&str>,
) -> Result<()> {
    let size = d.virtual_size;
    let name_of = |i: usize| {
        let n = &plan.outputs[i];
        n.rsplit('/').next().unwrap_or(n).to_string()
    };
    match plan.format {
        DiskFormat::Raw => Ok(()),
        DiskFormat::Flat => {
            let sectors = size.div_ceil(512);
            if !size.is_multiple_of(512) {
                // Flat extents hold whole sectors.
                outputs[1]
                    .file
                    .set_len(sectors * 512)
                    .ctx("extend", outputs[1].path)?;
            }
            let line = if plan.create_type == "vmfs" {
                format!("RW {sectors} VMFS \"{}\"", name_of(1))
            } else {
                format!("RW {sectors} FLAT \"{}\" 0", name_of(1))
            };
            let text = descriptor_text(
                &plan.create_type,
                &[line],
                size,
                source_descriptor,
                plan.create_type == "vmfs",
            );
            outputs[0].write_whole(text.as_bytes())
        }
        DiskFormat::MonolithicSparse | DiskFormat::StreamOptimized => {
            let sectors = size.div_ceil(512);
            let line = format!("RW {sectors} SPARSE \"{}\"", name_of(0));
            let text = descriptor_text(&plan.create_type, &[line], size, source_descriptor, false);
            let src = RawFile::new(raw)?;
            if plan.format == DiskFormat::StreamOptimized {
                kdmv::write_stream(outputs[0], &src, sectors, &text)
            } else {
                kdmv::write_sparse(outputs[0], &src, 0, sectors, Some(&text))
            }
        }
        DiskFormat::TwoGbMaxExtentSparse => {
            let src = RawFile::new(raw)?;
            let total = size.div_ceil(512);
            let mut lines = Vec::new();
            for (i, out) in outputs.iter().enumerate().skip(1) {
                let start = (i as u64 - 1) * TWO_GB_EXTENT_SECTORS;
                let n = (total - start).min(TWO_GB_EXTENT_SECTORS);
                kdmv::write_sparse(*out, &src, start * 512, n, None)?;
                lines.push(format!("RW {n} SPARSE \"{}\"", name_of(i)));
            }
            let text = descriptor_text(&plan.create_type, &lines, size, source_descriptor, false);
            outputs[0].write_whole(text.as_bytes())
        }
        DiskFormat::Qcow2 => qcow2::write_qcow2(outputs[0], &RawFile::new(raw)?, size),
    }
}

/// A descriptor for a flat disk restored file for file whose own descriptor was not stored (at
/// ingest its name was already taken by another disk's): its extent lines from the stored
/// extents (file names relative to the descriptor's directory), a CID derived from the disk's
/// contents (so that extract and mount give the same bytes), and a disk database of defaults.
pub fn flat_descriptor(d: &DiskEntry) -> String {
    let desc = d.descriptor.as_deref().unwrap_or("");
    let desc_dir = match desc.rfind('/') {
        Some(i) => &desc[..=i],
        None => "",
    };
    let relative = |name: &str| -> String {
        match name.strip_prefix(desc_dir) {
            Some(rest) => rest.to_string(),
            None => {
                // Up from the descriptor's directory to the common part, then down.
                let a: Vec<&str> = desc_dir.split('/').filter(|c| !c.is_empty()).collect();
                let b: Vec<&str> = name.split('/').collect();
                let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
                let mut parts: Vec<&str> = vec![".."; a.len() - common];
                parts.extend(&b[common..]);
                parts.join("/")
            }
        }
    };
    let lines: Vec<String> = d
        .extents
        .iter()
        .map(|e: &ExtentFile| {
            let sectors = e.len.div_ceil(512);
            match &e.file {
                None => format!("RW {sectors} ZERO"),
                Some(f) if e.kind.eq_ignore_ascii_case("FLAT") => {
                    format!(
                        "RW {sectors} FLAT \"{}\" {}",
                        relative(f),
                        e.file_offset / 512
                    )
                }
                Some(f) if e.file_offset == 0 => {
                    format!("RW {sectors} {} \"{}\"", e.kind, relative(f))
                }
                Some(f) => format!(
                    "RW {sectors} {} \"{}\" {}",
                    e.kind,
                    relative(f),
                    e.file_offset / 512
                ),
            }
        })
        .collect();
    let cid = u32::from_le_bytes(d.disk_map.0[..4].try_into().unwrap()) & 0xffff_fffe;
    descriptor_text_with_cid(
        cid,
        &d.create_type,
        &lines,
        d.virtual_size,
        None,
        d.create_type.eq_ignore_ascii_case("vmfs"),
    )
}

/// A descriptor for a fresh single-link disk, keeping the source's disk database.
fn descriptor_text(
    create_type: &str,
    extent_lines: &[String],
    size: u64,
    source: Option<&str>,
    thin: bool,
) -> String {
    let cid = getrandom::u32().unwrap_or(0x1234_5678) & 0xffff_fffe;
    descriptor_text_with_cid(cid, create_type, extent_lines, size, source, thin)
}

/// [`descriptor_text`] with a given CID.
fn descriptor_text_with_cid(
    cid: u32,
    create_type: &str,
    extent_lines: &[String],
    size: u64,
    source: Option<&str>,
    thin: bool,
) -> String {
    let mut t = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n# Extent description\n"
    );
    for l in extent_lines {
        t.push_str(l);
        t.push('\n');
    }
    t.push_str("\n# The Disk Data Base\n#DDB\n\n");
    let mut ddb: Vec<(String, String)> = source
        .and_then(|s| crate::source::descriptor::parse(s.as_bytes(), Path::new("source")).ok())
        .map(|d| d.ddb)
        .unwrap_or_default();
    // Keys that describe the old file rather than the disk.
    ddb.retain(|(k, _)| {
        let k = k.to_ascii_lowercase();
        !matches!(
            k.as_str(),
            "ddb.longcontentid" | "ddb.grain" | "ddb.thinprovisioned" | "ddb.encryption"
        )
    });
    let has =
        |ddb: &[(String, String)], key: &str| ddb.iter().any(|(k, _)| k.eq_ignore_ascii_case(key));
    if !has(&ddb, "ddb.virtualHWVersion") {
        ddb.push(("ddb.virtualHWVersion".into(), "4".into()));
    }
    if !has(&ddb, "ddb.adapterType") {
        ddb.push(("ddb.adapterType".into(), "lsilogic".into()));
    }
    if !has(&ddb, "ddb.geometry.cylinders") {
        let ide = ddb
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("ddb.adapterType") && v == "ide");
        let (heads, max) = if ide { (16u64, 16383u64) } else { (255, 65535) };
        let cyl = (size / (heads * 63 * 512)).clamp(1, max);
        ddb.push(("ddb.geometry.cylinders".into(), cyl.to_string()));
        ddb.push(("ddb.geometry.heads".into(), heads.to_string()));
        ddb.push(("ddb.geometry.sectors".into(), "63".into()));
    }
    if thin {
        ddb.push(("ddb.thinProvisioned".into(), "1".into()));
    }
    for (k, v) in ddb {
        t.push_str(&format!("{k} = \"{v}\"\n"));
    }
    t
}

/// Calls `f(block_index, bytes)` for every block of `block` bytes of `src` in `[start, start +
/// len)` that holds a non-zero byte, in order. Allocated ranges are read in large requests;
/// holes are skipped without reading. The last block may be shorter (`bytes.len()`).
pub fn for_each_data_block(
    src: &RawFile<'_>,
    start: u64,
    len: u64,
    block: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    const BATCH: u64 = 8 << 20;
    let end = (start + len).min(src.size());
    let mut buf = Vec::new();
    let mut next = 0u64; // first block index not yet handled
    for r in src.allocated(start..end)? {
        let first = ((r.start - start) / block).max(next);
        let last = (r.end - start).div_ceil(block);
        let mut b = first;
        while b < last {
            let n = (BATCH / block).max(1).min(last - b);
            let from = start + b * block;
            let to = (from + n * block).min(end);
            buf.resize((to - from) as usize, 0);
            src.read_at(&mut buf, from)?;
            for (i, chunk) in buf.chunks(block as usize).enumerate() {
                if !crate::zero::is_zero(chunk) {
                    f(b + i as u64, chunk)?;
                }
            }
            b += n;
        }
        next = last;
    }
    Ok(())
}
