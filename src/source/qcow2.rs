//! qcow2 images (versions 2 and 3), as KVM/Proxmox hosts leave them: big-endian header, L1/L2
//! cluster tables, zero clusters (v3), deflate or zstd compressed clusters, and a backing file
//! (the chain is followed by [`super::chain`]). Encrypted images, external data files and
//! extended L2 entries are refused with a message saying so.

use std::io::Read;
use std::ops::Range;

use super::grain::{read_u64_table, Grain, GrainFormat, TableCache, TABLE_CACHE_ENTRIES};
use super::inflate::{self, Deflate};
use super::RandomRead;
use crate::error::{Error, Result};

/// qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const MAX_L1_ENTRIES: u64 = 4 << 20;
const MAX_SIZE: u64 = 1 << 55;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// An open qcow2 image.
pub struct Qcow2 {
    file: Box<dyn RandomRead>,
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    compression_type: u8,
    backing: Option<String>,
    backing_format: Option<String>,
    cache: TableCache,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl Qcow2 {
    /// Opens and checks a qcow2 image.
    pub fn open(file: Box<dyn RandomRead>) -> Result<Qcow2> {
        let path = file.path().to_path_buf();
        let bad = |why: String| Error::bad_input(&path, format!("qcow2 header: {why}"));
        if file.len() < 72 {
            return Err(bad(
                "the file is shorter than a qcow2 header (truncated)".into()
            ));
        }
        let h = file.read_vec(0, 112.min(file.len()), "qcow2 header")?;
        if &h[0..4] != QCOW2_MAGIC {
            return Err(bad("no QFI\\xfb magic: not a qcow2 image".into()));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!("version {version} (only 2 and 3 exist)")));
        }
        let backing_offset = be64(&h, 8);
        let backing_size = be32(&h, 16) as u64;
        let cluster_bits = be32(&h, 20);
        let size = be64(&h, 24);
        let crypt = be32(&h, 32);
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster bits {cluster_bits} out of range 9..21"
            )));
        }
        let cluster = 1u64 << cluster_bits;
        if crypt != 0 {
            return Err(Error::Unsupported {
                what: format!(
                    "encrypted qcow2 image (crypt_method {crypt}): vmrepo cannot read encrypted images; \
                     decrypt it first (qemu-img convert with its secret) and ingest the result"
                ),
                path,
            });
        }
        let (mut header_len, mut compression_type) = (72u64, 0u8);
        if version == 3 {
            if h.len() < 104 {
                return Err(bad("version 3 header is truncated".into()));
            }
            let incompatible = be64(&h, 72);
            header_len = be32(&h, 100) as u64;
            if header_len < 104 || header_len > cluster {
                return Err(bad(format!("header length {header_len} out of range")));
            }
            if incompatible & 2 != 0 {
                return Err(bad(
                    "the image is marked corrupt; repair it with `qemu-img check -r all` first"
                        .into(),
                ));
            }
            if incompatible & 4 != 0 {
                return Err(Error::Unsupported {
                    what:
                        "qcow2 image with an external data file (its data lives in another file); \
                           convert it to a self-contained image with qemu-img convert first"
                            .into(),
                    path,
                });
            }
            if incompatible & 16 != 0 {
                return Err(Error::Unsupported {
                    what: "qcow2 image with extended L2 entries (subclusters); convert it with \
                           qemu-img convert -O qcow2 first"
                        .into(),
                    path,
                });
            }
            let unknown = incompatible & !(1 | 2 | 4 | 8 | 16);
            if unknown != 0 {
                return Err(bad(format!(
                    "unknown incompatible features {unknown:#x} (written by a newer QEMU?)"
                )));
            }
            if header_len > 104 && h.len() > 104 {
                compression_type = h[104];
            }
            if compression_type > 1 || (compression_type != 0 && incompatible & 8 == 0) {
                return Err(bad(format!("unknown compression type {compression_type}")));
            }
        }
        if size > MAX_SIZE {
            return Err(bad(format!("virtual size {size} is out of range")));
        }
        let l2_entries = cluster / 8;
        let need = size.div_ceil(cluster * l2_entries);
        if l1_size < need || need > MAX_L1_ENTRIES {
            return Err(bad(format!(
                "L1 table of {l1_size} entries cannot cover {size} bytes (need {need})"
            )));
        }
        if need > 0 && !l1_offset.is_multiple_of(cluster) {
            return Err(bad(format!(
                "L1 table offset {l1_offset} is not cluster aligned"
            )));
        }
        let l1 = read_u64_table(file.as_ref(), l1_offset, need, true, "qcow2 L1 table")?;
        let backing = if backing_offset != 0 {
            if backing_size == 0 || backing_size > 1023 || backing_offset > cluster {
                return Err(bad(format!(
                    "backing file name at {backing_offset} ({backing_size} bytes) out of range"
                )));
            }
            let b = file.read_vec(backing_offset, backing_size, "qcow2 backing file name")?;
            Some(String::from_utf8_lossy(&b).into_owned())
        } else {
            None
        };
        // Header extensions: (type, length, data padded to 8 bytes) until type 0.
        let mut backing_format = None;
        let mut at = header_len;
        let limit = if backing_offset != 0 {
            backing_offset
        } else {
            cluster
        }
        .min(file.len());
        while at + 8 <= limit {
            let e = file.read_vec(at, 8, "qcow2 header extension")?;
            let (kind, len) = (be32(&e, 0), be32(&e, 4) as u64);
            if kind == 0 {
                break;
            }
            if at + 8 + len > limit {
                return Err(bad(format!(
                    "header extension {kind:#x} runs past its area"
                )));
            }
            if kind == EXT_BACKING_FORMAT {
                let f = file.read_vec(at + 8, len, "qcow2 backing format")?;
                backing_format = Some(String::from_utf8_lossy(&f).into_owned());
            }
            at += 8 + len.div_ceil(8) * 8;
        }
        Ok(Qcow2 {
            file,
            version,
            cluster_bits,
            size,
            l1,
            compression_type,
            backing,
            backing_format,
            cache: TableCache::new(TABLE_CACHE_ENTRIES),
        })
    }

    /// The backing file name as stored, if any.
    pub fn backing(&self) -> Option<&str> {
        self.backing.as_deref()
    }

    /// The backing format from the header extension (`qcow2`, `raw`, `vmdk`), if given.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Where the compressed cluster described by L2 entry bits `e` is stored: its file offset
    /// and how many bytes it may take (whole sectors from the offset, within the file).
    fn compressed_at(&self, e: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = e & ((1u64 << x) - 1);
        let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
        let csize = (sectors * 512)
            .saturating_sub(offset & 511)
            .min(self.file.len().saturating_sub(offset));
        (offset, csize)
    }

    fn classify(&self, e: u64) -> Result<Grain> {
        if e & COMPRESSED != 0 {
            return Ok(Grain::Packed(e));
        }
        if self.version >= 3 && e & 1 != 0 {
            return Ok(Grain::Zero);
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(Grain::Absent);
        }
        if !off.is_multiple_of(1 << self.cluster_bits) {
            return Err(Error::bad_input(
                self.file.path(),
                format!("L2 entry {e:#x} points at an unaligned cluster"),
            ));
        }
        Ok(Grain::At(off))
    }
}

impl GrainFormat for Qcow2 {
    fn file(&self) -> &dyn RandomRead {
        self.file.as_ref()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn grain_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn lookup(&self, index: u64) -> Result<(Grain, u64)> {
        let per = (1u64 << self.cluster_bits) / 8;
        let (l1i, i) = ((index / per) as usize, (index % per) as usize);
        let l1e = *self.l1.get(l1i).ok_or_else(|| {
            Error::bad_input(
                self.file.path(),
                format!("cluster {index} lies beyond the L1 table"),
            )
        })?;
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            return Ok((Grain::Absent, per - i as u64));
        }
        if !off.is_multiple_of(1 << self.cluster_bits) {
            return Err(Error::bad_input(
                self.file.path(),
                format!("L1 entry {l1i} points at an unaligned L2 table"),
            ));
        }
        let l2 = self.cache.get(off, || {
            read_u64_table(self.file.as_ref(), off, per, true, "qcow2 L2 table")
        })?;
        let g = self.classify(l2[i])?;
        let mut run = 1u64;
        if matches!(g, Grain::Absent | Grain::Zero) {
            for &e in &l2[i + 1..] {
                if self.classify(e)? != g {
                    break;
                }
                run += 1;
            }
        }
        Ok((g, run))
    }

    fn packed_span(&self, e: u64) -> Range<u64> {
        let (offset, csize) = self.compressed_at(e);
        offset..offset.saturating_add(csize)
    }

    fn unpack(&self, index: u64, e: u64, src: &dyn RandomRead, out: &mut [u8]) -> Result<()> {
        let cluster = 1u64 << self.cluster_bits;
        let (offset, csize) = self.compressed_at(e);
        let data = src.read_cow(offset, csize, "qcow2 compressed cluster")?;
        // Fast path: whole-buffer decompression of the one stream at the start of `data` (the
        // rest is sector padding), straight into `out` for a whole cluster. The last cluster of
        // an image whose size is not a multiple of the cluster still holds a whole cluster.
        let fast = |into: &mut [u8]| match self.compression_type {
            0 => inflate::deflate(&data, Deflate::Raw, into),
            _ => inflate::zstd_frame(&data, into),
        };
        if inflate::into_grain(out, cluster as usize, cluster as usize, fast) {
            return Ok(());
        }
        // Damaged or unusual: the streaming decoders decide, and say why.
        let mut got = Vec::with_capacity(cluster as usize);
        let r = match self.compression_type {
            0 => flate2::read::DeflateDecoder::new(&data[..])
                .take(cluster)
                .read_to_end(&mut got),
            _ => zstd::stream::read::Decoder::with_buffer(&data[..])
                .map(|d| d.single_frame())
                .and_then(|d| d.take(cluster).read_to_end(&mut got)),
        };
        if let Err(err) = r {
            // Trailing bytes after a complete cluster are padding; only a short result is fatal.
            if (got.len() as u64) < cluster {
                return Err(Error::bad_input(
                    self.file.path(),
                    format!(
                        "compressed cluster {index} at byte {offset} cannot be decompressed: {err}"
                    ),
                ));
            }
        }
        if (got.len() as u64) < cluster {
            return Err(Error::bad_input(
                self.file.path(),
                format!(
                    "compressed cluster {index} at byte {offset} decompresses to {} bytes, expected {cluster}",
                    got.len()
                ),
            ));
        }
        out.copy_from_slice(&got[..out.len()]);
        Ok(())
    }
}
