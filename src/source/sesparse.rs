//! ESXi `seSparse` snapshot delta extents (`x-00000N-sesparse.vmdk`, all deltas on VMFS6): a
//! constant header, a volatile header (whose `replay_journal` marks a delta that needs its
//! journal replayed — refused, as QEMU does), a grain directory of u64 entries pointing into a
//! pool of grain tables, 4 KiB grains. Grain entries are typed by their top nibble:
//! unallocated (parent shows through), unmapped or zero (zeros), or allocated.

use super::grain::{le64, read_u64_table, Grain, GrainFormat, TableCache, TABLE_CACHE_ENTRIES};
use super::RandomRead;
use crate::error::{Advice, Error, Result, Setting};

/// seSparse constant-header magic.
pub const SESPARSE_MAGIC: u64 = 0xCAFE_BABE;
/// seSparse volatile-header magic.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0xCAFE_CAFE;
/// Version "2.1".
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;
/// Entries per grain table.
pub const SESPARSE_GT_ENTRIES: u64 = 4096;
const MAX_GD_ENTRIES: u64 = 32 << 20;
const MAX_CAPACITY_SECTORS: u64 = 1 << 40;

/// An open seSparse extent.
pub struct SeSparse {
    file: Box<dyn RandomRead>,
    capacity: u64,
    gd: Vec<u64>,
    gt_offset: u64,
    gt_count: u64,
    grains_offset: u64,
    cache: TableCache,
}

impl SeSparse {
    /// Opens and checks a seSparse file.
    pub fn open(file: Box<dyn RandomRead>) -> Result<SeSparse> {
        let bad = |why: String| Error::bad_input(file.path(), format!("seSparse header: {why}"));
        if file.len() < 512 {
            return Err(bad(
                "the file is shorter than its 512-byte header (truncated)".into(),
            ));
        }
        let h = file.read_vec(0, 512, "seSparse header")?;
        let f = |i: usize| le64(&h, i);
        if f(0) != SESPARSE_MAGIC {
            return Err(bad(
                "no 0xCAFEBABE magic: not a seSparse delta extent".into()
            ));
        }
        if f(8) != SESPARSE_VERSION {
            return Err(bad(format!("version {:#x} is not 2.1", f(8))));
        }
        let capacity = f(16);
        if capacity == 0 || capacity > MAX_CAPACITY_SECTORS {
            return Err(bad(format!(
                "capacity of {capacity} sectors is out of range"
            )));
        }
        if f(24) != 8 {
            return Err(bad(format!("grain size of {} sectors is not 8", f(24))));
        }
        if f(32) != 64 {
            return Err(bad(format!(
                "grain table size of {} sectors is not 64",
                f(32)
            )));
        }
        if f(40) != 0 {
            return Err(bad(format!("unknown flags {:#x}", f(40))));
        }
        let (vol_off, gd_off, gd_size) = (f(80), f(128), f(136));
        let (gt_off, gt_size, grains_off) = (f(144), f(152), f(192));
        if vol_off == 0 || gd_off == 0 || gt_off == 0 || grains_off == 0 {
            return Err(bad("a table offset is 0".into()));
        }
        let v = file.read_vec(vol_off.saturating_mul(512), 512, "seSparse volatile header")?;
        if le64(&v, 0) != SESPARSE_VOLATILE_MAGIC {
            return Err(bad("the volatile header has no 0xCAFECAFE magic".into()));
        }
        if le64(&v, 24) != 0 {
            return Err(Advice::new(format!(
                "{}: seSparse delta has a journal that must be replayed (it was open for \
                 writing, e.g. the running VM's newest delta): back up the frozen links below it \
                 (",
                file.path().display()
            ))
            .setting(Setting::AtSnapshot)
            .text("), or consolidate the snapshot first")
            .into());
        }
        let entries = gd_size.saturating_mul(512) / 8;
        let need = capacity.div_ceil(SESPARSE_GT_ENTRIES * 8);
        if entries < need || need > MAX_GD_ENTRIES {
            return Err(bad(format!(
                "grain directory of {entries} entries cannot cover {capacity} sectors (need {need})"
            )));
        }
        let gd = read_u64_table(
            file.as_ref(),
            gd_off.saturating_mul(512),
            need,
            false,
            "seSparse grain directory",
        )?;
        Ok(SeSparse {
            file,
            capacity: capacity * 512,
            gd,
            gt_offset: gt_off,
            gt_count: gt_size / 64,
            grains_offset: grains_off,
            cache: TableCache::new(TABLE_CACHE_ENTRIES),
        })
    }
}

impl GrainFormat for SeSparse {
    fn file(&self) -> &dyn RandomRead {
        self.file.as_ref()
    }

    fn size(&self) -> u64 {
        self.capacity
    }

    fn grain_bytes(&self) -> u64 {
        4096
    }

    fn lookup(&self, index: u64) -> Result<(Grain, u64)> {
        let path = self.file.path();
        let (gdi, i) = (
            (index / SESPARSE_GT_ENTRIES) as usize,
            (index % SESPARSE_GT_ENTRIES) as usize,
        );
        let gde = *self.gd.get(gdi).ok_or_else(|| {
            Error::bad_input(
                path,
                format!("grain {index} lies beyond the grain directory"),
            )
        })?;
        if gde == 0 {
            return Ok((Grain::Absent, SESPARSE_GT_ENTRIES - i as u64));
        }
        if gde >> 32 != 0x1000_0000 {
            return Err(Error::bad_input(
                path,
                format!("grain directory entry {gdi} is {gde:#x}, not a grain table reference"),
            ));
        }
        let gt_index = gde & 0xFFFF_FFFF;
        if gt_index >= self.gt_count {
            return Err(Error::bad_input(
                path,
                format!("grain directory entry {gdi} names grain table {gt_index}, beyond the {} the file has", self.gt_count),
            ));
        }
        let at = self
            .gt_offset
            .saturating_add(gt_index * 64)
            .saturating_mul(512);
        let gt = self.cache.get(at, || {
            read_u64_table(
                self.file.as_ref(),
                at,
                SESPARSE_GT_ENTRIES,
                false,
                "seSparse grain table",
            )
        })?;
        let e = gt[i];
        let kind = |x: u64| x >> 60;
        match kind(e) {
            0 if e == 0 => Ok((
                Grain::Absent,
                gt[i..].iter().take_while(|&&x| x == 0).count() as u64,
            )),
            1 | 2 => Ok((
                Grain::Zero,
                gt[i..]
                    .iter()
                    .take_while(|&&x| matches!(kind(x), 1 | 2))
                    .count() as u64,
            )),
            3 => {
                let slot = |x: u64| {
                    ((x & 0x0FFF_0000_0000_0000) >> 48) | ((x & 0x0000_FFFF_FFFF_FFFF) << 12)
                };
                let idx = slot(e);
                // Grains in consecutive slots are back to back in the file: one answer.
                let run = 1 + gt[i + 1..]
                    .iter()
                    .zip(1u64..)
                    .take_while(|(&x, k)| kind(x) == 3 && idx.checked_add(*k) == Some(slot(x)))
                    .count() as u64;
                Ok((
                    Grain::At(
                        self.grains_offset
                            .saturating_add(idx.saturating_mul(8))
                            .saturating_mul(512),
                    ),
                    run,
                ))
            }
            _ => Err(Error::bad_input(
                path,
                format!("grain table entry {e:#x} for grain {index} has an unknown type"),
            )),
        }
    }

    fn unpack(&self, index: u64, _: u64, _: &dyn RandomRead, _: &mut [u8]) -> Result<()> {
        Err(Error::bad_input(
            self.file.path(),
            format!("grain {index}: seSparse grains are never compressed"),
        ))
    }
}
