//! Hosted sparse VMDK writers: a monolithicSparse file (or one twoGbMaxExtentSparse extent) laid
//! out as QEMU and VMware Workstation do (header, embedded descriptor, redundant and primary
//! grain directories with preallocated grain tables, then grains), and a streamOptimized file in
//! VMware's stream layout (zlib grains with markers, grain tables after their grains, grain
//! directory, footer and end-of-stream marker at the end).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use super::{for_each_data_block, Output, RawFile};
use crate::error::{Error, IoContext, Result};
use crate::source::sparse::{
    FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_CHECK, FLAG_RGD, GD_AT_END,
};

const GRAIN_SECTORS: u64 = 128;
const GTES: u64 = 512;

struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    rgd_offset: u64,
    gd_offset: u64,
    overhead: u64,
    compressed: bool,
}

fn header_bytes(h: &Header) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..4].copy_from_slice(b"KDMV");
    b[4..8].copy_from_slice(&h.version.to_le_bytes());
    b[8..12].copy_from_slice(&h.flags.to_le_bytes());
    b[12..20].copy_from_slice(&h.capacity.to_le_bytes());
    b[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    b[28..36].copy_from_slice(&h.descriptor_offset.to_le_bytes());
    b[36..44].copy_from_slice(&h.descriptor_size.to_le_bytes());
    b[44..48].copy_from_slice(&(GTES as u32).to_le_bytes());
    b[48..56].copy_from_slice(&h.rgd_offset.to_le_bytes());
    b[56..64].copy_from_slice(&h.gd_offset.to_le_bytes());
    b[64..72].copy_from_slice(&h.overhead.to_le_bytes());
    b[73..77].copy_from_slice(b"\n \r\n");
    if h.compressed {
        b[77..79].copy_from_slice(&1u16.to_le_bytes());
    }
    b
}

fn descriptor_sectors(text: Option<&str>) -> u64 {
    text.map_or(0, |t| ((t.len() as u64 + 1).div_ceil(512)).max(20))
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a monolithicSparse file (with `descriptor`) or a bare sparse extent (without) holding
/// `sectors` sectors of `src` from byte `start` into `out` (a new, empty file).
pub fn write_sparse(
    out: Output<'_>,
    src: &RawFile<'_>,
    start: u64,
    sectors: u64,
    descriptor: Option<&str>,
) -> Result<()> {
    let n_gt = sectors.div_ceil(GRAIN_SECTORS * GTES);
    let gd_sectors = (n_gt * 4).div_ceil(512);
    let gt_sectors = n_gt * 4;
    let desc_sectors = descriptor_sectors(descriptor);
    let rgd = 1 + desc_sectors;
    let rgt = rgd + gd_sectors;
    let gd = rgt + gt_sectors;
    let gt = gd + gd_sectors;
    let overhead = (gt + gt_sectors).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
    let (f, path) = (out.file, out.path);
    let mut table = vec![0u32; (n_gt * GTES) as usize];
    let mut next = overhead;
    let grain_bytes = GRAIN_SECTORS * 512;
    for_each_data_block(src, start, sectors * 512, grain_bytes, |g, data| {
        f.write_all_at(data, next * 512).ctx("write", path)?;
        table[g as usize] = u32::try_from(next).map_err(|_| {
            Error::Usage(format!(
                "{} would exceed the 2 TiB a hosted sparse VMDK can address",
                path.display()
            ))
        })?;
        next += GRAIN_SECTORS;
        Ok(())
    })?;
    // A last grain shorter than a grain still occupies a whole grain.
    f.set_len(next * 512).ctx("set the size of", path)?;
    let header = Header {
        version: 1,
        flags: FLAG_NEWLINE_CHECK | FLAG_RGD,
        capacity: sectors,
        descriptor_offset: if descriptor.is_some() { 1 } else { 0 },
        descriptor_size: desc_sectors,
        rgd_offset: rgd,
        gd_offset: gd,
        overhead,
        compressed: false,
    };
    f.write_all_at(&header_bytes(&header), 0)
        .ctx("write", path)?;
    if let Some(t) = descriptor {
        f.write_all_at(t.as_bytes(), 512).ctx("write", path)?;
    }
    for (dir, tables) in [(rgd, rgt), (gd, gt)] {
        let entries: Vec<u32> = (0..n_gt).map(|i| (tables + i * 4) as u32).collect();
        f.write_all_at(&u32s(&entries), dir * 512)
            .ctx("write", path)?;
        f.write_all_at(&u32s(&table), tables * 512)
            .ctx("write", path)?;
    }
    f.sync_all().ctx("fsync", path)
}

/// A marker sector: `val`, `size` 0, `kind`.
fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Writes a streamOptimized file in VMware's layout (grain directory at the end) into `dest` (a
/// new, empty file, written from its start).
pub fn write_stream(
    dest: Output<'_>,
    src: &RawFile<'_>,
    sectors: u64,
    descriptor: &str,
) -> Result<()> {
    let n_gt = sectors.div_ceil(GRAIN_SECTORS * GTES);
    let gd_sectors = (n_gt * 4).div_ceil(512);
    let desc_sectors = descriptor_sectors(Some(descriptor));
    let (f, path) = (dest.file, dest.path);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut header = Header {
        version: 3,
        flags: FLAG_NEWLINE_CHECK | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity: sectors,
        descriptor_offset: 1,
        descriptor_size: desc_sectors,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        overhead: 1 + desc_sectors,
        compressed: true,
    };
    let w = |out: &mut std::io::BufWriter<&File>, b: &[u8]| out.write_all(b).ctx("write", path);
    w(&mut out, &header_bytes(&header))?;
    let mut desc = descriptor.as_bytes().to_vec();
    desc.resize((desc_sectors * 512) as usize, 0);
    w(&mut out, &desc)?;
    let mut pos = 1 + desc_sectors; // next free sector
    let mut gd = vec![0u32; n_gt as usize];
    let mut gt = vec![0u32; GTES as usize];
    let mut gt_index: Option<u64> = None;
    let grain_bytes = (GRAIN_SECTORS * 512) as usize;
    let mut full = vec![0u8; grain_bytes];
    // Writes the finished grain table of `index` (after its grains).
    let flush_gt = |out: &mut std::io::BufWriter<&File>,
                    pos: &mut u64,
                    gd: &mut [u32],
                    gt: &mut [u32],
                    index: u64|
     -> Result<()> {
        w(out, &marker(4, 1))?;
        gd[index as usize] = (*pos + 1) as u32;
        w(out, &u32s(gt))?;
        *pos += 5;
        gt.fill(0);
        Ok(())
    };
    for_each_data_block(src, 0, sectors * 512, grain_bytes as u64, |g, data| {
        let table = g / GTES;
        if gt_index.is_some_and(|t| t != table) {
            flush_gt(&mut out, &mut pos, &mut gd, &mut gt, gt_index.unwrap())?;
        }
        gt_index = Some(table);
        // Every grain is compressed whole (QEMU insists), the last one zero-padded.
        full[..data.len()].copy_from_slice(data);
        full[data.len()..].fill(0);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&full).ctx("compress a grain for", path)?;
        let comp = z.finish().ctx("compress a grain for", path)?;
        let mut rec = Vec::with_capacity(12 + comp.len() + 512);
        rec.extend_from_slice(&(g * GRAIN_SECTORS).to_le_bytes());
        rec.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        rec.extend_from_slice(&comp);
        rec.resize(rec.len().div_ceil(512) * 512, 0);
        gt[(g % GTES) as usize] = u32::try_from(pos).map_err(|_| {
            Error::Usage(format!(
                "{} would exceed the 2 TiB a stream-optimized VMDK can address",
                path.display()
            ))
        })?;
        w(&mut out, &rec)?;
        pos += rec.len() as u64 / 512;
        Ok(())
    })?;
    if let Some(t) = gt_index {
        flush_gt(&mut out, &mut pos, &mut gd, &mut gt, t)?;
    }
    w(&mut out, &marker(gd_sectors, 2))?;
    let gd_offset = pos + 1;
    let mut gdb = u32s(&gd);
    gdb.resize((gd_sectors * 512) as usize, 0);
    w(&mut out, &gdb)?;
    w(&mut out, &marker(1, 3))?;
    header.gd_offset = gd_offset;
    w(&mut out, &header_bytes(&header))?;
    w(&mut out, &[0u8; 512])?;
    out.flush().ctx("write", path)?;
    drop(out);
    f.sync_all().ctx("fsync", path)
}
