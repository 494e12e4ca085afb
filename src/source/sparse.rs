//! Hosted sparse VMDK extents (`KDMV`): monolithicSparse, the extents of twoGbMaxExtentSparse,
//! hosted snapshot deltas, and streamOptimized in both layouts (grain directory at the front as
//! QEMU writes it, or at the end behind a footer as VMware writes it), with zeroed-grain entries
//! and zlib (or raw deflate) compressed grains.
//!
//! Every header field is checked before it is used; tables are read only after their extent in
//! the file has been checked, so a garbled header cannot make us allocate more than the file.

use std::io::Read;
use std::ops::Range;

use super::grain::{
    le32, le64, read_u32_table, Grain, GrainFormat, TableCache, TABLE_CACHE_ENTRIES,
};
use super::inflate::{self, Deflate};
use super::RandomRead;
use crate::error::{Error, Result};

/// `gdOffset` value meaning "the grain directory is found through the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// Header flag: the newline-detection bytes are valid.
pub const FLAG_NEWLINE_CHECK: u32 = 1;
/// Header flag: a redundant grain directory is kept.
pub const FLAG_RGD: u32 = 2;
/// Header flag: a grain table entry of 1 means a zeroed grain.
pub const FLAG_ZEROED_GRAINS: u32 = 4;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 0x1_0000;
/// Header flag: grains and metadata carry markers.
pub const FLAG_MARKERS: u32 = 0x2_0000;

const MAX_GD_ENTRIES: u64 = 32 << 20;
const MAX_GRAIN_SECTORS: u64 = 1 << 16;
/// 512 TiB: the header's capacity is 64 bits; qemu-img makes hosted sparse disks above
/// VMware's 2 TiB, and the grain directory this needs stays within [`MAX_GD_ENTRIES`].
const MAX_CAPACITY_SECTORS: u64 = 1 << 40;
const MAX_DESCRIPTOR_SECTORS: u64 = 2048;

/// The fields of a SparseExtentHeader (all sizes and offsets in sectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 or 3.
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sectors in this extent.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_size: u64,
    /// Embedded descriptor position.
    pub descriptor_offset: u64,
    /// Embedded descriptor length.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory.
    pub rgd_offset: u64,
    /// Grain directory, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Metadata sectors before the first grain.
    pub overhead: u64,
    /// 0 none, 1 deflate.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parses and checks a 512-byte header; `file` names the file in errors.
    pub fn parse(b: &[u8], file: &dyn RandomRead, what: &str) -> Result<SparseHeader> {
        let bad = |why: String| Error::bad_input(file.path(), format!("{what}: {why}"));
        if b.len() < 512 {
            return Err(bad("shorter than one 512-byte sector".into()));
        }
        if &b[0..4] == b"kdmv" {
            return Err(bad(
                "the magic is lowercase \"kdmv\": the file was still being written when it was copied; copy it again once it is complete".into(),
            ));
        }
        if &b[0..4] != b"KDMV" {
            return Err(bad("no KDMV magic: not a hosted sparse VMDK extent".into()));
        }
        let h = SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_size: le64(b, 20),
            descriptor_offset: le64(b, 28),
            descriptor_size: le64(b, 36),
            num_gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(bad(format!(
                "version {} is not 1, 2 or 3 (unknown or damaged)",
                h.version
            )));
        }
        let unknown = h.flags & 0xFFFF_0000 & !(FLAG_COMPRESSED | FLAG_MARKERS);
        if unknown != 0 {
            return Err(bad(format!(
                "unknown incompatible flags {unknown:#x}: written by a newer VMware product or damaged"
            )));
        }
        if h.flags & FLAG_MARKERS != 0 && h.flags & FLAG_COMPRESSED == 0 {
            return Err(bad("markers flag set without the compressed flag".into()));
        }
        if h.flags & FLAG_NEWLINE_CHECK != 0 && b[73..77] != [b'\n', b' ', b'\r', b'\n'] {
            return Err(bad(
                "its newline-detection bytes were changed: the file was copied in text mode (e.g. ASCII FTP); copy it again in binary mode".into(),
            ));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress_algorithm != 1 {
            return Err(bad(format!(
                "compressed grains with compressAlgorithm {} (only 1, deflate, exists)",
                h.compress_algorithm
            )));
        }
        if h.capacity == 0 || h.capacity > MAX_CAPACITY_SECTORS {
            return Err(bad(format!(
                "capacity of {} sectors is out of range (1 to 2^40, 512 TiB)",
                h.capacity
            )));
        }
        if !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS {
            return Err(bad(format!(
                "grain size of {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                h.grain_size
            )));
        }
        if h.num_gtes_per_gt == 0 || h.num_gtes_per_gt > 512 {
            return Err(bad(format!(
                "{} entries per grain table (must be 1 to 512)",
                h.num_gtes_per_gt
            )));
        }
        if h.gd_offset == 0 {
            return Err(bad("no grain directory (gdOffset is 0)".into()));
        }
        Ok(h)
    }

    /// Number of grain directory entries.
    pub fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(self.num_gtes_per_gt as u64 * self.grain_size)
    }
}

/// An open KDMV extent.
pub struct Kdmv {
    file: Box<dyn RandomRead>,
    header: SparseHeader,
    gd: Vec<u64>,
    descriptor: Option<Vec<u8>>,
    cache: TableCache,
}

impl Kdmv {
    /// Opens a KDMV file. With `as_extent` (opened through a separate descriptor) the embedded
    /// descriptor fields are ignored, as QEMU's split extents point them at zeros.
    pub fn open(file: Box<dyn RandomRead>, as_extent: bool) -> Result<Kdmv> {
        let head = file.read_vec(0, 512.min(file.len()), "KDMV header")?;
        let mut header = SparseHeader::parse(&head, file.as_ref(), "KDMV header")?;
        if header.gd_offset == GD_AT_END {
            // VMware stream layout: the real header is the footer, 1024 bytes before the end.
            if file.len() < 512 * 4 {
                return Err(Error::bad_input(
                    file.path(),
                    "stream-optimized VMDK with its grain directory at the end, but the file is too short to hold a footer (truncated)",
                ));
            }
            let marker = file.read_vec(file.len() - 1536, 512, "footer marker")?;
            let footer = file.read_vec(file.len() - 1024, 512, "footer")?;
            if le64(&marker, 0) != 1 || le32(&marker, 8) != 0 || le32(&marker, 12) != 3 {
                return Err(Error::bad_input(
                    file.path(),
                    "stream-optimized VMDK with its grain directory at the end, but no footer marker 1536 bytes before the end (truncated or still being written)",
                ));
            }
            let f = SparseHeader::parse(&footer, file.as_ref(), "KDMV footer")?;
            if f.gd_offset == GD_AT_END {
                return Err(Error::bad_input(
                    file.path(),
                    "the footer's grain directory offset is GD_AT_END too (damaged footer)",
                ));
            }
            header = f;
        }
        let n = header.gd_entries();
        if n > MAX_GD_ENTRIES {
            return Err(Error::bad_input(
                file.path(),
                format!("grain directory of {n} entries is larger than any real disk needs"),
            ));
        }
        let gd = read_u32_table(
            file.as_ref(),
            header.gd_offset.saturating_mul(512),
            n,
            "grain directory",
        )?;
        let descriptor =
            if !as_extent && header.descriptor_offset != 0 && header.descriptor_size != 0 {
                if header.descriptor_size > MAX_DESCRIPTOR_SECTORS {
                    return Err(Error::bad_input(
                        file.path(),
                        format!(
                            "embedded descriptor of {} sectors is larger than 1 MiB",
                            header.descriptor_size
                        ),
                    ));
                }
                let mut d = file.read_vec(
                    header.descriptor_offset.saturating_mul(512),
                    header.descriptor_size * 512,
                    "embedded descriptor",
                )?;
                let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
                d.truncate(end);
                Some(d)
            } else {
                None
            };
        Ok(Kdmv {
            file,
            header,
            gd,
            descriptor,
            cache: TableCache::new(TABLE_CACHE_ENTRIES),
        })
    }

    /// The header in use (the footer's for a GD_AT_END stream).
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The embedded descriptor text, cut at the first NUL, if any.
    pub fn descriptor(&self) -> Option<&[u8]> {
        self.descriptor.as_deref()
    }

    fn compressed(&self) -> bool {
        self.header.flags & FLAG_COMPRESSED != 0
    }
}

impl GrainFormat for Kdmv {
    fn file(&self) -> &dyn RandomRead {
        self.file.as_ref()
    }

    fn size(&self) -> u64 {
        self.header.capacity * 512
    }

    fn grain_bytes(&self) -> u64 {
        self.header.grain_size * 512
    }

    fn lookup(&self, index: u64) -> Result<(Grain, u64)> {
        let per = self.header.num_gtes_per_gt as u64;
        let (gti, i) = ((index / per) as usize, index % per);
        let gde = *self.gd.get(gti).ok_or_else(|| {
            Error::bad_input(
                self.file.path(),
                format!("grain {index} lies beyond the grain directory"),
            )
        })?;
        if gde == 0 {
            return Ok((Grain::Absent, per - i));
        }
        let gt = self.cache.get(gde, || {
            read_u32_table(self.file.as_ref(), gde * 512, per, "grain table")
        })?;
        let e = gt[i as usize];
        let zeroed = self.header.flags & FLAG_ZEROED_GRAINS != 0 && e == 1;
        if e == 0 || zeroed {
            let run = gt[i as usize..].iter().take_while(|&&x| x == e).count() as u64;
            return Ok((if e == 0 { Grain::Absent } else { Grain::Zero }, run));
        }
        Ok((
            if self.compressed() {
                Grain::Packed(e * 512)
            } else {
                Grain::At(e * 512)
            },
            1,
        ))
    }

    fn packed_span(&self, at: u64) -> Range<u64> {
        // The stored size is in the grain's own header: bound it by what unpack accepts.
        let header = if self.header.flags & FLAG_MARKERS != 0 {
            12
        } else {
            4
        };
        at..at.saturating_add(header + 2 * self.grain_bytes() + 4096)
    }

    fn unpack(&self, index: u64, at: u64, src: &dyn RandomRead, out: &mut [u8]) -> Result<()> {
        let markers = self.header.flags & FLAG_MARKERS != 0;
        let path = self.file.path();
        let (size, data_at) = if markers {
            let h = src.read_cow(at, 12, "grain marker")?;
            let lba = le64(&h, 0);
            if lba != index * self.header.grain_size {
                return Err(Error::bad_input(
                    path,
                    format!(
                        "grain marker at byte {at} says guest sector {lba}, but its grain table entry is for sector {}",
                        index * self.header.grain_size
                    ),
                ));
            }
            (le32(&h, 8) as u64, at + 12)
        } else {
            (le32(&src.read_cow(at, 4, "grain size")?, 0) as u64, at + 4)
        };
        let gb = self.grain_bytes();
        if size == 0 || size > 2 * gb + 4096 {
            return Err(Error::bad_input(
                path,
                format!("compressed grain at byte {at} claims {size} bytes (bad marker)"),
            ));
        }
        let data = src.read_cow(data_at, size, "compressed grain")?;
        inflate_grain(&data, gb, out).map_err(|why| {
            Error::bad_input(
                path,
                format!("compressed grain {index} at byte {at}: {why}"),
            )
        })
    }
}

/// Decompresses a zlib stream (or raw deflate when the first bytes are not a zlib header) into
/// `out`, which must be filled; at most `limit` bytes are accepted.
pub fn inflate_grain(data: &[u8], limit: u64, out: &mut [u8]) -> std::result::Result<(), String> {
    let zlib = data.len() >= 2
        && data[0] & 0x0f == 8
        && data[0] >> 4 <= 7
        && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0;
    let wrapper = if zlib { Deflate::Zlib } else { Deflate::Raw };
    // Fast path: libdeflate, straight into `out` for a whole grain. A shorter `out` (the last
    // grain of a disk whose size is not a multiple of the grain) goes through a buffer of
    // `limit` bytes, as the stream may hold the whole grain.
    let need = out.len();
    if inflate::into_grain(out, limit as usize, need, |b| {
        inflate::deflate(data, wrapper, b)
    }) {
        return Ok(());
    }
    // Damaged or unusual: the streaming decoder decides, and says why.
    let mut got = Vec::with_capacity(out.len());
    let r = if zlib {
        flate2::read::ZlibDecoder::new(data)
            .take(limit + 1)
            .read_to_end(&mut got)
    } else {
        flate2::read::DeflateDecoder::new(data)
            .take(limit + 1)
            .read_to_end(&mut got)
    };
    r.map_err(|e| format!("cannot be decompressed ({e})"))?;
    if got.len() < out.len() || got.len() as u64 > limit {
        return Err(format!(
            "decompresses to {} bytes, expected {}",
            got.len(),
            out.len()
        ));
    }
    out.copy_from_slice(&got[..out.len()]);
    Ok(())
}
