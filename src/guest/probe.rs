//! What a volume holds, told by its signature bytes: the filesystems and containers a VM disk
//! commonly carries. Only signatures are read; a volume no rule recognises is `unknown`.

use crate::error::Result;

/// A volume's content, as far as its signature tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// ext2, ext3 or ext4: readable.
    Ext,
    /// XFS: readable.
    Xfs,
    /// NTFS: readable.
    Ntfs,
    /// FAT12/16/32: readable.
    Fat,
    /// exFAT: readable.
    ExFat,
    /// A LUKS-encrypted volume.
    Luks,
    /// A BitLocker-encrypted volume.
    BitLocker,
    /// An LVM2 physical volume.
    LvmPv,
    /// Linux swap.
    Swap,
    /// Nothing recognised.
    Unknown,
}

impl Content {
    /// The name `ls` shows.
    pub fn name(self) -> &'static str {
        match self {
            Content::Ext => "ext2/3/4",
            Content::Xfs => "xfs",
            Content::Ntfs => "ntfs",
            Content::Fat => "fat",
            Content::ExFat => "exfat",
            Content::Luks => "luks (encrypted)",
            Content::BitLocker => "bitlocker (encrypted)",
            Content::LvmPv => "lvm2 physical volume",
            Content::Swap => "swap",
            Content::Unknown => "unknown",
        }
    }

    /// Whether this build reads the files in it.
    pub fn readable(self) -> bool {
        matches!(
            self,
            Content::Ext | Content::Ntfs | Content::Fat | Content::Xfs | Content::ExFat
        )
    }
}

/// Bytes of a volume's start that [`probe`] looks at.
pub const PROBE_LEN: usize = 8192;

/// Tells what a volume holds from its first [`PROBE_LEN`] bytes (fewer if it is shorter).
pub fn probe(head: &[u8]) -> Content {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    if at(1024 + 56, &[0x53, 0xEF]) {
        Content::Ext
    } else if at(0, b"XFSB") {
        Content::Xfs
    } else if at(3, b"NTFS    ") {
        Content::Ntfs
    } else if at(3, b"EXFAT   ") {
        Content::ExFat
    } else if at(3, b"-FVE-FS-") {
        Content::BitLocker
    } else if at(0, b"LUKS\xba\xbe") {
        Content::Luks
    } else if at(512, b"LABELONE") && at(512 + 24, b"LVM2 001") {
        Content::LvmPv
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        Content::Swap
    } else if at(510, &[0x55, 0xAA]) && (at(0x36, b"FAT") || at(0x52, b"FAT32")) {
        Content::Fat
    } else {
        Content::Unknown
    }
}

/// Reads the head of a volume of `len` bytes at `start` and probes it.
pub fn probe_at(
    start: u64,
    len: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Content> {
    let mut head = vec![0u8; (PROBE_LEN as u64).min(len) as usize];
    read(start, &mut head)?;
    Ok(probe(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_told_apart_and_short_volumes_are_unknown() {
        let mut ext = vec![0u8; PROBE_LEN];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        assert_eq!(probe(&ext), Content::Ext);
        let mut luks = vec![0u8; PROBE_LEN];
        luks[..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(probe(&luks), Content::Luks);
        assert!(!Content::Luks.readable());
        assert_eq!(probe(&[0u8; 100]), Content::Unknown);
        assert_eq!(probe(&[]), Content::Unknown);
    }
}
