//! Partition tables of a guest disk: MBR (with its extended partitions) and GPT. Only the table
//! is read; what each partition holds is [`super::probe`]'s business.
//!
//! Partitions are numbered as Linux numbers them: GPT entries by their slot in the table (1-based,
//! empty slots skipped but counted), MBR primaries 1-4, logical partitions from 5 in chain order.
//! A table that does not fit the disk, loops, or claims absurd sizes is an error naming what is
//! wrong; nothing is guessed.

use crate::error::{Error, Result};

/// A partition: where it is on the disk and what the table says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its number (`p<number>`).
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The table's type: a GPT type name or GUID, or `MBR 0xNN`.
    pub kind: String,
    /// The GPT partition name, if any.
    pub name: Option<String>,
}

/// What the disk's first sectors hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Table {
    /// No partition table: the disk may hold a filesystem itself.
    None,
    /// An MBR table.
    Mbr(Vec<Partition>),
    /// A GPT table (behind a protective MBR).
    Gpt(Vec<Partition>),
}

/// Logical partitions followed at most (each needs its own extended boot record).
const MAX_LOGICAL: u32 = 256;
/// GPT entries read at most, and the largest entry size accepted.
const MAX_GPT_ENTRIES: u32 = 4096;
const MAX_GPT_ENTRY_SIZE: u32 = 4096;

/// Reads the partition table of a disk of `size` bytes through `read(offset, buf)`.
pub fn read_table(size: u64, read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>) -> Result<Table> {
    if size < 512 {
        return Ok(Table::None);
    }
    let mut mbr = [0u8; 512];
    read(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(Table::None);
    }
    let entries = mbr_entries(&mbr);
    // A boot sector of a filesystem also ends in 55 AA: a table has sane entries only.
    if entries.iter().any(|e| e.status & 0x7f != 0) {
        return Ok(Table::None);
    }
    if entries.iter().any(|e| e.kind == 0xEE) {
        for sector in [512u64, 4096] {
            if let Some(parts) = read_gpt(size, sector, read)? {
                return Ok(Table::Gpt(parts));
            }
        }
        return Err(Error::Corrupt(
            "the disk has a protective MBR but no valid GPT header at sector 1".into(),
        ));
    }
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let part = mbr_partition(size, i as u32 + 1, 0, e)?;
        if is_extended(e.kind) {
            read_logical(size, part.start, part.len, read, &mut parts)?;
        } else {
            parts.push(part);
        }
    }
    if parts.is_empty() {
        return Ok(Table::None);
    }
    parts.sort_by_key(|p| p.number);
    Ok(Table::Mbr(parts))
}

struct MbrEntry {
    status: u8,
    kind: u8,
    first: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8; 512]) -> Vec<MbrEntry> {
    (0..4)
        .map(|i| {
            let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            MbrEntry {
                status: e[0],
                kind: e[4],
                first: u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64,
                sectors: u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64,
            }
        })
        .collect()
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

fn mbr_partition(size: u64, number: u32, base: u64, e: &MbrEntry) -> Result<Partition> {
    let start = (base + e.first) * 512;
    let len = e.sectors * 512;
    if start.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::Corrupt(format!(
            "MBR partition {number} ({len} bytes at byte {start}) runs past the end of the disk \
             ({size} bytes)"
        )));
    }
    Ok(Partition {
        number,
        start,
        len,
        kind: format!("MBR 0x{:02x}", e.kind),
        name: None,
    })
}

/// Follows the chain of extended boot records inside the extended partition at `ext_start`.
fn read_logical(
    size: u64,
    ext_start: u64,
    ext_len: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    parts: &mut Vec<Partition>,
) -> Result<()> {
    let ext_sector = ext_start / 512;
    let mut ebr_offset = 0u64;
    let mut number = 5;
    loop {
        if number - 5 >= MAX_LOGICAL {
            return Err(Error::Corrupt(format!(
                "the extended partition's chain of boot records has more than {MAX_LOGICAL} \
                 links (a loop?)"
            )));
        }
        let at = ext_start + ebr_offset * 512;
        if ebr_offset * 512 >= ext_len {
            return Err(Error::Corrupt(format!(
                "an extended boot record at byte {at} is outside its extended partition"
            )));
        }
        let mut ebr = [0u8; 512];
        read(at, &mut ebr)?;
        if ebr[510..512] != [0x55, 0xAA] {
            return Err(Error::Corrupt(format!(
                "the extended boot record at byte {at} has no boot signature"
            )));
        }
        let e = mbr_entries(&ebr);
        if e[0].kind != 0 && e[0].sectors != 0 {
            parts.push(mbr_partition(size, number, ext_sector + ebr_offset, &e[0])?);
            number += 1;
        }
        if e[1].kind == 0 || e[1].first == 0 {
            return Ok(());
        }
        // Each link points forward; anything else would loop.
        if e[1].first <= ebr_offset {
            return Err(Error::Corrupt(format!(
                "the extended boot record at byte {at} points back into its chain"
            )));
        }
        ebr_offset = e[1].first;
    }
}

/// The GPT whose header is at byte `sector` (the sector size), if it is valid there.
fn read_gpt(
    size: u64,
    sector: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Option<Vec<Partition>>> {
    if size < sector * 2 {
        return Ok(None);
    }
    let mut h = vec![0u8; 512];
    read(sector, &mut h)?;
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let header_len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    if !(92..=512).contains(&header_len) {
        return Err(Error::Corrupt(format!(
            "the GPT header says it is {header_len} bytes long"
        )));
    }
    let want = u32::from_le_bytes(h[16..20].try_into().unwrap());
    let mut copy = h[..header_len].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != want {
        return Err(Error::Corrupt(
            "the GPT header's checksum does not match: the header is damaged".into(),
        ));
    }
    let entries_lba = u64::from_le_bytes(h[72..80].try_into().unwrap());
    let count = u32::from_le_bytes(h[80..84].try_into().unwrap());
    let entry_len = u32::from_le_bytes(h[84..88].try_into().unwrap());
    let entries_crc = u32::from_le_bytes(h[88..92].try_into().unwrap());
    if count > MAX_GPT_ENTRIES
        || !(128..=MAX_GPT_ENTRY_SIZE).contains(&entry_len)
        || entry_len % 8 != 0
    {
        return Err(Error::Corrupt(format!(
            "the GPT header claims {count} entries of {entry_len} bytes (at most \
             {MAX_GPT_ENTRIES} entries of 128 to {MAX_GPT_ENTRY_SIZE} bytes are read)"
        )));
    }
    let table_len = count as u64 * entry_len as u64;
    let table_at = entries_lba.saturating_mul(sector);
    if table_at.checked_add(table_len).is_none_or(|end| end > size) {
        return Err(Error::Corrupt(format!(
            "the GPT's partition entries ({table_len} bytes at byte {table_at}) run past the \
             end of the disk"
        )));
    }
    let mut table = vec![0u8; table_len as usize];
    read(table_at, &mut table)?;
    if crc32fast::hash(&table) != entries_crc {
        return Err(Error::Corrupt(
            "the GPT's partition entries do not match their checksum: the table is damaged".into(),
        ));
    }
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(entry_len as usize).enumerate() {
        let guid: [u8; 16] = e[0..16].try_into().unwrap();
        if guid == [0; 16] {
            continue;
        }
        let first = u64::from_le_bytes(e[32..40].try_into().unwrap());
        let last = u64::from_le_bytes(e[40..48].try_into().unwrap());
        let number = i as u32 + 1;
        let start = first.saturating_mul(sector);
        let end = last
            .checked_add(1)
            .map(|l| l.saturating_mul(sector))
            .unwrap_or(u64::MAX);
        if last < first || end > size {
            return Err(Error::Corrupt(format!(
                "GPT partition {number} (sectors {first} to {last}) does not lie inside the \
                 disk ({size} bytes)"
            )));
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        parts.push(Partition {
            number,
            start,
            len: end - start,
            kind: gpt_type_name(&guid),
            name: (!name.is_empty()).then_some(name),
        });
    }
    Ok(Some(parts))
}

/// A GUID as text: the first three fields are stored little-endian.
fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes(g[0..4].try_into().unwrap()),
        u16::from_le_bytes(g[4..6].try_into().unwrap()),
        u16::from_le_bytes(g[6..8].try_into().unwrap()),
        g[8],
        g[9],
        g[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

/// The common GPT partition types by name; others by GUID.
fn gpt_type_name(g: &[u8; 16]) -> String {
    let text = guid_text(g);
    let name = match text.as_str() {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        _ => return text,
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<()> + '_ {
        move |at, buf| {
            let at = at as usize;
            match disk.get(at..at + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(Error::Corrupt("read past the end".into())),
            }
        }
    }

    fn entry(disk: &mut [u8], sector: usize, slot: usize, kind: u8, first: u32, sectors: u32) {
        let e = sector * 512 + 446 + 16 * slot;
        disk[e + 4] = kind;
        disk[e + 8..e + 12].copy_from_slice(&first.to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        disk[sector * 512 + 510] = 0x55;
        disk[sector * 512 + 511] = 0xAA;
    }

    #[test]
    fn mbr_primaries_and_a_chain_of_logical_partitions() {
        let mut disk = vec![0u8; 4 << 20];
        entry(&mut disk, 0, 0, 0x83, 2048, 2048);
        entry(&mut disk, 0, 1, 0x05, 4096, 4096);
        // Two logical partitions: EBR at 4096 and at 4096 + 2048.
        entry(&mut disk, 4096, 0, 0x83, 1, 1000);
        entry(&mut disk, 4096, 1, 0x05, 2048, 1500);
        entry(&mut disk, 6144, 0, 0x82, 1, 1000);
        let t = read_table(disk.len() as u64, &mut reader(&disk)).unwrap();
        let Table::Mbr(p) = t else { panic!("{t:?}") };
        let got: Vec<(u32, u64, u64)> = p.iter().map(|p| (p.number, p.start, p.len)).collect();
        assert_eq!(
            got,
            [
                (1, 2048 * 512, 2048 * 512),
                (5, 4097 * 512, 1000 * 512),
                (6, 6145 * 512, 1000 * 512)
            ]
        );
    }

    #[test]
    fn a_looping_or_oversized_table_is_an_error() {
        let mut disk = vec![0u8; 4 << 20];
        entry(&mut disk, 0, 0, 0x05, 4096, 4096);
        entry(&mut disk, 4096, 0, 0x83, 1, 10);
        entry(&mut disk, 4096, 1, 0x05, 0, 10);
        // A link to offset 0 ends the chain; one pointing back is refused.
        assert!(read_table(disk.len() as u64, &mut reader(&disk)).is_ok());
        entry(&mut disk, 4096, 1, 0x05, 100, 10);
        entry(&mut disk, 4196, 1, 0x05, 50, 10);
        let e = read_table(disk.len() as u64, &mut reader(&disk)).unwrap_err();
        assert!(e.to_string().contains("points back"), "{e}");
        let mut disk = vec![0u8; 1 << 20];
        entry(&mut disk, 0, 0, 0x83, 2048, 1 << 20);
        let e = read_table(disk.len() as u64, &mut reader(&disk)).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }

    #[test]
    fn a_filesystem_boot_sector_is_not_a_table() {
        let mut disk = vec![0u8; 1 << 20];
        disk[510] = 0x55;
        disk[511] = 0xAA;
        disk[446] = 0x12;
        assert_eq!(
            read_table(disk.len() as u64, &mut reader(&disk)).unwrap(),
            Table::None
        );
    }

    #[test]
    fn guids_print_as_tools_print_them() {
        let g = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        assert_eq!(guid_text(&g), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(gpt_type_name(&g), "Linux filesystem");
    }
}
