//! A small test-only writer for the disk formats qemu-img cannot create: ESXi `vmfs` bases,
//! vmfsSparse (COWD) and seSparse deltas, VMware-style streamOptimized files (grain directory at
//! the end, markers, footer), and hand-written descriptors. Written from the format reference,
//! independently of vmrepo's own writers, so that reader and writer bugs cannot cancel out.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A delta descriptor naming `parent`.
pub fn delta_descriptor(
    create_type: &str,
    cid: u32,
    parent_cid: u32,
    parent: &str,
    sectors: u64,
    kind: &str,
    file: &str,
) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID={parent_cid:08x}\n\
         isNativeSnapshot=\"no\"\ncreateType=\"{create_type}\"\nparentFileNameHint=\"{parent}\"\n\
         # Extent description\nRW {sectors} {kind} \"{file}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.longContentID = \"0000000000000000000000000000{cid:08x}\"\n"
    )
}

/// An ESXi `vmfs` base: `NAME.vmdk` (CID `cid`) and `NAME-flat.vmdk` holding `data`.
pub fn vmfs_base(dir: &Path, name: &str, data: &[u8], cid: u32) {
    let flat = format!("{name}-flat.vmdk");
    fs::write(dir.join(&flat), data).unwrap();
    fs::write(
        dir.join(format!("{name}.vmdk")),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"vmfs\"\n\n# Extent description\nRW {} VMFS \"{flat}\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.adapterType = \"lsilogic\"\nddb.thinProvisioned = \"1\"\nddb.virtualHWVersion = \"19\"\n\
             ddb.uuid = \"60 00 C2 99 3c 3b c5 c0-29 99 4b e2 5b 11 a2 45\"\n",
            data.len() / 512
        ),
    )
    .unwrap();
}

/// A vmfsSparse delta `NAME.vmdk` + `NAME-delta.vmdk` over `parent` (a descriptor name).
/// `grains` are (grain index, bytes of one grain of `grain_sectors` sectors).
#[allow(clippy::too_many_arguments)]
pub fn cowd_delta(
    dir: &Path,
    name: &str,
    parent: &str,
    parent_cid: u32,
    cid: u32,
    sectors: u64,
    grain_sectors: u64,
    grains: &[(u64, Vec<u8>)],
) {
    let data_name = format!("{name}-delta.vmdk");
    let gd_entries = sectors.div_ceil(4096 * grain_sectors);
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    let mut gd = vec![0u32; gd_entries as usize];
    let mut gts: Vec<Vec<u32>> = vec![Vec::new(); gd_entries as usize];
    let f = fs::File::create(dir.join(&data_name)).unwrap();
    let mut next = 4 + gd_sectors;
    let mut sorted = grains.to_vec();
    sorted.sort_by_key(|g| g.0);
    for (g, bytes) in &sorted {
        assert_eq!(bytes.len() as u64, grain_sectors * 512);
        let t = (g / 4096) as usize;
        if gd[t] == 0 {
            gd[t] = next as u32;
            gts[t] = vec![0; 4096];
            next += 32;
        }
        gts[t][(g % 4096) as usize] = next as u32;
        f.write_all_at(bytes, next * 512).unwrap();
        next += grain_sectors;
    }
    for (t, gt) in gts.iter().enumerate() {
        if gd[t] != 0 {
            let b: Vec<u8> = gt.iter().flat_map(|x| x.to_le_bytes()).collect();
            f.write_all_at(&b, gd[t] as u64 * 512).unwrap();
        }
    }
    let b: Vec<u8> = gd.iter().flat_map(|x| x.to_le_bytes()).collect();
    f.write_all_at(&b, 4 * 512).unwrap();
    let mut h = vec![0u8; 2048];
    h[0..4].copy_from_slice(b"COWD");
    put32(&mut h, 4, 1);
    put32(&mut h, 8, 3);
    put32(&mut h, 12, sectors as u32);
    put32(&mut h, 16, grain_sectors as u32);
    put32(&mut h, 20, 4);
    put32(&mut h, 24, gd_entries as u32);
    put32(&mut h, 28, next as u32);
    f.write_all_at(&h, 0).unwrap();
    f.set_len(next * 512).unwrap();
    fs::write(
        dir.join(format!("{name}.vmdk")),
        delta_descriptor(
            "vmfsSparse",
            cid,
            parent_cid,
            parent,
            sectors,
            "VMFSSPARSE",
            &data_name,
        ),
    )
    .unwrap();
}

/// What a seSparse grain holds.
#[derive(Clone)]
pub enum SeGrain {
    /// 4096 bytes of data.
    Data(Vec<u8>),
    /// A zero grain.
    Zero,
    /// A grain the guest unmapped (reads as zeros).
    Unmapped,
}

/// A seSparse delta `NAME.vmdk` + `NAME-sesparse.vmdk` over `parent`. Data grains are placed
/// from slot 4100 on, so their entries use the high bits of the rotated index encoding.
/// `replay_journal` sets the volatile header's journal flag.
#[allow(clippy::too_many_arguments)]
pub fn sesparse_delta(
    dir: &Path,
    name: &str,
    parent: &str,
    parent_cid: u32,
    cid: u32,
    sectors: u64,
    grains: &[(u64, SeGrain)],
    replay_journal: bool,
) {
    sesparse_delta_at(
        dir,
        name,
        parent,
        parent_cid,
        cid,
        sectors,
        grains,
        replay_journal,
        4100,
    )
}

/// [`sesparse_delta`] with data grains from slot `first_slot` on.
#[allow(clippy::too_many_arguments)]
pub fn sesparse_delta_at(
    dir: &Path,
    name: &str,
    parent: &str,
    parent_cid: u32,
    cid: u32,
    sectors: u64,
    grains: &[(u64, SeGrain)],
    replay_journal: bool,
    first_slot: u64,
) {
    let data_name = format!("{name}-sesparse.vmdk");
    let n_gt = sectors.div_ceil(4096 * 8);
    let gd_sectors = (n_gt * 8).div_ceil(512).max(1);
    let gd_off = 16u64;
    let gt_off = gd_off + gd_sectors;
    let gt_sectors = n_gt * 64;
    let bitmap_off = gt_off + gt_sectors;
    let backmap_off = bitmap_off + 1;
    let grains_off = backmap_off + 1;
    let f = fs::File::create(dir.join(&data_name)).unwrap();
    let mut gd = vec![0u64; n_gt as usize];
    let mut gts: Vec<Vec<u64>> = vec![vec![0; 4096]; n_gt as usize];
    let mut used = 0u64;
    let mut slot = first_slot;
    for (g, kind) in grains {
        let t = (g / 4096) as usize;
        if gd[t] == 0 {
            gd[t] = 0x1000_0000_0000_0000 | used;
            used += 1;
        }
        let e = match kind {
            SeGrain::Data(bytes) => {
                assert_eq!(bytes.len(), 4096);
                f.write_all_at(bytes, (grains_off + slot * 8) * 512)
                    .unwrap();
                let e = 0x3000_0000_0000_0000 | ((slot & 0xFFF) << 48) | (slot >> 12);
                slot += 1;
                e
            }
            SeGrain::Zero => 0x2000_0000_0000_0000,
            SeGrain::Unmapped => 0x1000_0000_0000_0000,
        };
        gts[(gd[t] & 0xFFFF_FFFF) as usize][(g % 4096) as usize] = e;
    }
    // GT pool: tables in allocation order (index = low bits of the GD entry).
    for (i, gt) in gts.iter().take(used as usize).enumerate() {
        let b: Vec<u8> = gt.iter().flat_map(|x| x.to_le_bytes()).collect();
        f.write_all_at(&b, (gt_off + i as u64 * 64) * 512).unwrap();
    }
    let b: Vec<u8> = gd.iter().flat_map(|x| x.to_le_bytes()).collect();
    f.write_all_at(&b, gd_off * 512).unwrap();
    let mut h = vec![0u8; 512];
    for (at, v) in [
        (0, 0xCAFE_BABEu64),
        (8, 0x0000_0002_0000_0001),
        (16, sectors),
        (24, 8),
        (32, 64),
        (80, 1),
        (88, 1),
        (96, 2),
        (104, 2),
        (112, 4),
        (120, 12),
        (128, gd_off),
        (136, gd_sectors),
        (144, gt_off),
        (152, gt_sectors),
        (160, bitmap_off),
        (168, 1),
        (176, backmap_off),
        (184, 1),
        (192, grains_off),
        (200, (slot + 1) * 8),
    ] {
        put64(&mut h, at, v);
    }
    f.write_all_at(&h, 0).unwrap();
    let mut v = vec![0u8; 512];
    put64(&mut v, 0, 0xCAFE_CAFE);
    put64(&mut v, 8, used);
    put64(&mut v, 24, replay_journal as u64);
    f.write_all_at(&v, 512).unwrap();
    f.set_len((grains_off + (slot + 1) * 8) * 512).unwrap();
    fs::write(
        dir.join(format!("{name}.vmdk")),
        delta_descriptor(
            "seSparse", cid, parent_cid, parent, sectors, "SESPARSE", &data_name,
        ),
    )
    .unwrap();
}

/// A VMware-style streamOptimized file (GD_AT_END, markers, footer, EOS) of `data`
/// (a multiple of 512 bytes), 64 KiB grains. Grains listed in `raw_deflate` are stored as raw
/// deflate instead of zlib (readers must fall back).
pub fn stream_gd_at_end(path: &Path, data: &[u8], raw_deflate: &[u64]) {
    let sectors = data.len() as u64 / 512;
    let grain = 128u64;
    let n_gt = sectors.div_ceil(grain * 512);
    let gd_sectors = (n_gt * 4).div_ceil(512);
    let header = |gd_offset: u64| {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        put32(&mut h, 4, 3);
        put32(&mut h, 8, 0x30001);
        put64(&mut h, 12, sectors);
        put64(&mut h, 20, grain);
        put64(&mut h, 28, 1);
        put64(&mut h, 36, 20);
        put32(&mut h, 44, 512);
        put64(&mut h, 56, gd_offset);
        put64(&mut h, 64, 128);
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77] = 1;
        h
    };
    let marker = |val: u64, kind: u32| {
        let mut m = vec![0u8; 512];
        put64(&mut m, 0, val);
        put32(&mut m, 12, kind);
        m
    };
    let mut out = header(u64::MAX);
    let mut desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=5a5a5a5a\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\
         RW {sectors} SPARSE \"{}\"\nddb.adapterType = \"lsilogic\"\n",
        path.file_name().unwrap().to_string_lossy()
    )
    .into_bytes();
    desc.resize(20 * 512, 0);
    out.extend(desc);
    // Start the grains at sector 128 like VMware's overHead.
    out.resize(128 * 512, 0);
    let mut gd = vec![0u32; n_gt as usize];
    let gbytes = (grain * 512) as usize;
    for t in 0..n_gt {
        let mut gt = vec![0u32; 512];
        let mut any = false;
        for i in 0..512u64 {
            let g = t * 512 + i;
            let start = g as usize * gbytes;
            if start >= data.len() {
                break;
            }
            let mut chunk = data[start..(start + gbytes).min(data.len())].to_vec();
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            chunk.resize(gbytes, 0);
            let comp = if raw_deflate.contains(&g) {
                let mut z =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                z.write_all(&chunk).unwrap();
                z.finish().unwrap()
            } else {
                let mut z =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                z.write_all(&chunk).unwrap();
                z.finish().unwrap()
            };
            gt[i as usize] = (out.len() / 512) as u32;
            any = true;
            out.extend((g * grain).to_le_bytes());
            out.extend((comp.len() as u32).to_le_bytes());
            out.extend(comp);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        if any {
            out.extend(marker(4, 1));
            gd[t as usize] = (out.len() / 512) as u32;
            out.extend(gt.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    out.extend(marker(gd_sectors, 2));
    let gd_offset = out.len() as u64 / 512;
    let mut gdb: Vec<u8> = gd.iter().flat_map(|x| x.to_le_bytes()).collect();
    gdb.resize((gd_sectors * 512) as usize, 0);
    out.extend(gdb);
    out.extend(marker(1, 3));
    out.extend(header(gd_offset));
    out.extend(vec![0u8; 512]);
    fs::write(path, out).unwrap();
}
