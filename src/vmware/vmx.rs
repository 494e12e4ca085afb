//! Parsing `.vmx` files: `key = "value"` lines with VMware's `|XX` escapes, case-insensitive
//! keys, and the disks a VM has (`scsiX:Y`, `sataX:Y`, `ideX:Y`, `nvmeX:Y`).

use std::collections::HashMap;

/// A parsed .vmx: a flat map of lowercase keys to decoded values.
#[derive(Debug, Default)]
pub struct Vmx {
    map: HashMap<String, String>,
}

/// A disk attached to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmxDisk {
    /// Controller slot, e.g. `scsi0:1`.
    pub slot: String,
    /// The `.fileName` value (descriptor path, relative to the .vmx or absolute).
    pub file_name: String,
    /// The `.mode` value, if set (`independent-persistent`, ...).
    pub mode: Option<String>,
}

/// Decodes `|XX` hex escapes (`|22` is `"`, `|7C` is `|`, `|0A` a newline).
pub fn unescape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'|' && i + 2 < b.len() {
            if let Some(x) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Vmx {
    /// Parses the text; lines that are not `key = value` (comments, `#!` lines) are skipped.
    pub fn parse(text: &str) -> Vmx {
        let mut map = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            map.insert(k, unescape(v));
        }
        Vmx { map }
    }

    /// The decoded value of `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(&key.to_ascii_lowercase()).map(|s| s.as_str())
    }

    fn is_true(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// Disks that are present, in bus/controller/unit order. CD-ROMs and other non-disk
    /// devices are left out, as are slots whose controller is absent.
    pub fn disks(&self) -> Vec<VmxDisk> {
        let mut found: Vec<((u8, u32, u32), VmxDisk)> = Vec::new();
        for (key, value) in &self.map {
            let Some(prefix) = key.strip_suffix(".filename") else {
                continue;
            };
            let Some((bus_ctl, unit)) = prefix.split_once(':') else {
                continue;
            };
            let (bus_rank, bus) = match ["scsi", "sata", "ide", "nvme"]
                .iter()
                .enumerate()
                .find(|(_, b)| bus_ctl.starts_with(*b))
            {
                Some((i, b)) => (i as u8, *b),
                None => continue,
            };
            let (Ok(ctl), Ok(unit)) = (bus_ctl[bus.len()..].parse::<u32>(), unit.parse::<u32>())
            else {
                continue;
            };
            if !self.is_true(&format!("{prefix}.present")) {
                continue;
            }
            // IDE controllers have no .present key of their own.
            if bus != "ide"
                && self.get(&format!("{bus_ctl}.present")).is_some()
                && !self.is_true(&format!("{bus_ctl}.present"))
            {
                continue;
            }
            let device = self
                .get(&format!("{prefix}.devicetype"))
                .map(|d| d.to_ascii_lowercase());
            let is_disk = match device.as_deref() {
                None => value.to_ascii_lowercase().ends_with(".vmdk"),
                Some(d) => matches!(
                    d,
                    "scsi-harddisk" | "ata-harddisk" | "disk" | "rawdisk" | "plaindisk"
                ),
            };
            if !is_disk {
                continue;
            }
            found.push((
                (bus_rank, ctl, unit),
                VmxDisk {
                    slot: format!("{bus}{ctl}:{unit}"),
                    file_name: value.clone(),
                    mode: self.get(&format!("{prefix}.mode")).map(str::to_string),
                },
            ));
        }
        found.sort_by_key(|(k, _)| *k);
        found.into_iter().map(|(_, d)| d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#".encoding = "UTF-8"
config.version = "8"
displayName = "web|2201"
uuid.bios = "56 4d 09 6b b0 ff 56 dd-bd 74 a4 03 97 2b f3 37"
nvram = "web01.nvram"
scsi0.present = "TRUE"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "web01_1.vmdk"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web01.vmdk"
scsi0:0.deviceType = "scsi-hardDisk"
scsi0:2.present = "FALSE"
scsi0:2.fileName = "old.vmdk"
ide1:0.present = "TRUE"
ide1:0.fileName = "/vmfs/volumes/ds1/iso/debian.iso"
ide1:0.deviceType = "cdrom-image"
SATA0:0.Present = "true"
sata0:0.fileName = "data.vmdk"
sata0:0.mode = "independent-persistent"
nvme0.present = "FALSE"
nvme0:0.present = "TRUE"
nvme0:0.fileName = "gone.vmdk"
annotation = "line one|0Aline |7C two"
"#;

    #[test]
    fn parses_keys_escapes_and_disks() {
        let v = Vmx::parse(SAMPLE);
        assert_eq!(v.get("DISPLAYNAME"), Some("web\"01"));
        assert_eq!(v.get("annotation"), Some("line one\nline | two"));
        let disks = v.disks();
        let slots: Vec<_> = disks.iter().map(|d| d.slot.as_str()).collect();
        assert_eq!(slots, ["scsi0:0", "scsi0:1", "sata0:0"]);
        assert_eq!(disks[2].mode.as_deref(), Some("independent-persistent"));
    }
}
