//! qcow2 writer: a version-3 image with 64 KiB clusters, one L2 table per 512 MiB that holds
//! data, data clusters in guest order, and refcount blocks and table at the end, every used
//! cluster counted once (so `qemu-img check` finds no leaks or errors).

use std::os::unix::fs::FileExt;

use super::{for_each_data_block, Output, RawFile};
use crate::error::{IoContext, Result};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;

/// Writes `size` bytes of `src` as a qcow2 image into `out` (a new, empty file).
pub fn write_qcow2(out: Output<'_>, src: &RawFile<'_>, size: u64) -> Result<()> {
    let (f, path) = (out.file, out.path);
    let l1_size = size.div_ceil(CLUSTER * L2_ENTRIES);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER).max(1);
    let mut l1 = vec![0u64; l1_size as usize];
    let mut next = 1 + l1_clusters; // next free cluster
    let mut l2: Vec<u64> = vec![0; L2_ENTRIES as usize];
    let mut l2_at: Option<(u64, u64)> = None; // (L1 index, cluster of the L2 table)
    let write_l2 = |l2: &[u64], at: u64| -> Result<()> {
        let b: Vec<u8> = l2.iter().flat_map(|e| e.to_be_bytes()).collect();
        f.write_all_at(&b, at * CLUSTER).ctx("write", path)
    };
    for_each_data_block(src, 0, size, CLUSTER, |c, data| {
        let l1i = c / L2_ENTRIES;
        if l2_at.is_none_or(|(i, _)| i != l1i) {
            if let Some((_, at)) = l2_at {
                write_l2(&l2, at)?;
            }
            l2.fill(0);
            l2_at = Some((l1i, next));
            l1[l1i as usize] = (next * CLUSTER) | COPIED;
            next += 1;
        }
        f.write_all_at(data, next * CLUSTER).ctx("write", path)?;
        l2[(c % L2_ENTRIES) as usize] = (next * CLUSTER) | COPIED;
        next += 1;
        Ok(())
    })?;
    if let Some((_, at)) = l2_at {
        write_l2(&l2, at)?;
    }
    // Refcount blocks and table go last; they count themselves too.
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = next + blocks + table;
        let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let t = (b * 8).div_ceil(CLUSTER).max(1);
        if (b, t) == (blocks, table) {
            break;
        }
        (blocks, table) = (b, t);
    }
    let total = next + blocks + table;
    let first_block = next;
    let table_at = next + blocks;
    let mut refblock = vec![0u8; CLUSTER as usize];
    let mut rt = vec![0u8; (table * CLUSTER) as usize];
    for b in 0..blocks {
        refblock.fill(0);
        let lo = b * REFCOUNTS_PER_BLOCK;
        for c in lo..(lo + REFCOUNTS_PER_BLOCK).min(total) {
            let i = ((c - lo) * 2) as usize;
            refblock[i..i + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        f.write_all_at(&refblock, (first_block + b) * CLUSTER)
            .ctx("write", path)?;
        rt[(b * 8) as usize..(b * 8 + 8) as usize]
            .copy_from_slice(&((first_block + b) * CLUSTER).to_be_bytes());
    }
    f.write_all_at(&rt, table_at * CLUSTER).ctx("write", path)?;
    let l1b: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    f.write_all_at(&l1b, CLUSTER).ctx("write", path)?;
    let mut h = vec![0u8; 112];
    let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    h[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut h, 4, 3);
    put32(&mut h, 20, CLUSTER_BITS);
    put64(&mut h, 24, size);
    put32(&mut h, 36, l1_size as u32);
    put64(&mut h, 40, CLUSTER);
    put64(&mut h, 48, table_at * CLUSTER);
    put32(&mut h, 56, table as u32);
    put32(&mut h, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut h, 100, 112); // header_length; byte 104 = compression type 0 (deflate)
    f.write_all_at(&h, 0).ctx("write", path)?;
    f.set_len(total * CLUSTER).ctx("set the size of", path)?;
    f.sync_all().ctx("fsync", path)
}
