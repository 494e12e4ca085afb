//! ESXi `vmfsSparse` snapshot delta extents (`COWD`, `x-00000N-delta.vmdk`): a 2 KiB header, a
//! grain directory of u32 sector offsets, grain tables of 4096 entries, grains of (usually) one
//! sector. An entry of 0 means "not in this delta": the parent's bytes show through.

use super::grain::{le32, read_u32_table, Grain, GrainFormat, TableCache, TABLE_CACHE_ENTRIES};
use super::RandomRead;
use crate::error::{Error, Result};

/// Entries per COWD grain table.
pub const COWD_GT_ENTRIES: u64 = 4096;
const MAX_GRAIN_SECTORS: u64 = 1 << 16;

/// An open COWD extent.
pub struct Cowd {
    file: Box<dyn RandomRead>,
    capacity: u64,
    grain_size: u64,
    gd: Vec<u64>,
    cache: TableCache,
}

impl Cowd {
    /// Opens and checks a COWD file.
    pub fn open(file: Box<dyn RandomRead>) -> Result<Cowd> {
        let bad = |why: String| Error::bad_input(file.path(), format!("COWD header: {why}"));
        if file.len() < 2048 {
            return Err(bad(format!(
                "the file is {} bytes, shorter than the 2048-byte header (truncated)",
                file.len()
            )));
        }
        let h = file.read_vec(0, 2048, "COWD header")?;
        if &h[0..4] != b"COWD" {
            return Err(bad("no COWD magic: not a vmfsSparse delta extent".into()));
        }
        let version = le32(&h, 4);
        if version != 1 {
            return Err(bad(format!("version {version} is not 1")));
        }
        let capacity = le32(&h, 12) as u64;
        let grain_size = le32(&h, 16) as u64;
        let gd_offset = le32(&h, 20) as u64;
        let gd_entries = le32(&h, 24) as u64;
        if capacity == 0 {
            return Err(bad("capacity is 0 sectors".into()));
        }
        if !grain_size.is_power_of_two() || grain_size > MAX_GRAIN_SECTORS {
            return Err(bad(format!(
                "grain size of {grain_size} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
            )));
        }
        if gd_offset < 4 {
            return Err(bad(format!(
                "grain directory at sector {gd_offset} overlaps the header"
            )));
        }
        let need = capacity.div_ceil(COWD_GT_ENTRIES * grain_size);
        if gd_entries < need {
            return Err(bad(format!(
                "{gd_entries} grain directory entries cannot cover {capacity} sectors (need {need})"
            )));
        }
        let gd = read_u32_table(file.as_ref(), gd_offset * 512, need, "COWD grain directory")?;
        Ok(Cowd {
            file,
            capacity: capacity * 512,
            grain_size,
            gd,
            cache: TableCache::new(TABLE_CACHE_ENTRIES),
        })
    }
}

impl GrainFormat for Cowd {
    fn file(&self) -> &dyn RandomRead {
        self.file.as_ref()
    }

    fn size(&self) -> u64 {
        self.capacity
    }

    fn grain_bytes(&self) -> u64 {
        self.grain_size * 512
    }

    fn lookup(&self, index: u64) -> Result<(Grain, u64)> {
        let (gti, i) = (
            (index / COWD_GT_ENTRIES) as usize,
            (index % COWD_GT_ENTRIES) as usize,
        );
        let gde = *self.gd.get(gti).ok_or_else(|| {
            Error::bad_input(
                self.file.path(),
                format!("grain {index} lies beyond the grain directory"),
            )
        })?;
        if gde == 0 {
            return Ok((Grain::Absent, COWD_GT_ENTRIES - i as u64));
        }
        let gt = self.cache.get(gde, || {
            read_u32_table(
                self.file.as_ref(),
                gde * 512,
                COWD_GT_ENTRIES,
                "COWD grain table",
            )
        })?;
        match gt[i] {
            0 => Ok((
                Grain::Absent,
                gt[i..].iter().take_while(|&&x| x == 0).count() as u64,
            )),
            // Grains stored back to back (ESXi writes a delta's 512-byte grains in guest order
            // when the guest writes sequentially) are one answer, so a run costs one lookup.
            s => {
                let step = self.grain_size;
                let run = 1 + gt[i + 1..]
                    .iter()
                    .zip(1u64..)
                    .take_while(|(&x, k)| s.checked_add(k * step) == Some(x))
                    .count() as u64;
                Ok((Grain::At(s * 512), run))
            }
        }
    }

    fn unpack(&self, index: u64, _: u64, _: &dyn RandomRead, _: &mut [u8]) -> Result<()> {
        Err(Error::bad_input(
            self.file.path(),
            format!("grain {index}: COWD grains are never compressed"),
        ))
    }
}
