//! VMDK text descriptors: header keys (createType, CID, parentCID, parentFileNameHint), extent
//! lines, the disk database, and which createTypes vmrepo reads.

use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Largest descriptor file accepted (QEMU caps at 1 MiB too).
pub const MAX_DESCRIPTOR_LEN: u64 = 1 << 20;

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Length in 512-byte sectors.
    pub sectors: u64,
    /// Extent type, uppercase (`FLAT`, `VMFS`, `ZERO`, ...).
    pub kind: String,
    /// File name as written (relative to the descriptor's directory or absolute).
    pub file: Option<String>,
    /// Offset in sectors inside the file (FLAT only).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// `createType` as written.
    pub create_type: String,
    /// `parentFileNameHint`, set on snapshot deltas.
    pub parent_hint: Option<String>,
    /// Extents in guest-address order.
    pub extents: Vec<ExtentLine>,
    /// `CID`: content id of this link.
    pub cid: Option<u32>,
    /// `parentCID`: the CID the parent had when this delta was made (`ffffffff`: none).
    pub parent_cid: Option<u32>,
    /// Disk database lines (`ddb.adapterType`, geometry, uuid, ...), keys as written.
    pub ddb: Vec<(String, String)>,
}

/// `parentCID` value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// createTypes whose extents are all flat files (restored byte for byte as they were).
pub const FLAT_TYPES: &[&str] = &[
    "monolithicflat",
    "vmfs",
    "vmfsthin",
    "vmfspreallocated",
    "vmfseagerzeroedthick",
    "vmfsthick",
    "twogbmaxextentflat",
    "2gbmaxextentflat",
];

/// createTypes with sparse extents (KDMV, COWD, seSparse) or mixed extents.
pub const SPARSE_TYPES: &[&str] = &[
    "monolithicsparse",
    "twogbmaxextentsparse",
    "2gbmaxextentsparse",
    "streamoptimized",
    "vmfssparse",
    "sesparse",
    "custom",
];

/// createTypes that exist but cannot be read from files.
const LATER_TYPES: &[&str] = &[
    "vmfsrdm",
    "vmfsrawdevicemap",
    "vmfsrdmp",
    "vmfspassthroughrawdevicemap",
    "vmfsraw",
    "fulldevice",
    "partitioneddevice",
    "vsansparse",
];

/// What the first bytes of a `.vmdk` say it is.
pub fn sniff_binary(head: &[u8]) -> Option<&'static str> {
    // Lowercase "kdmv": a KDMV file still being written (the sparse reader says so).
    if head.starts_with(b"KDMV") || head.starts_with(b"kdmv") {
        Some("hosted sparse VMDK extent (monolithicSparse or streamOptimized, KDMV)")
    } else if head.starts_with(b"COWD") {
        Some("vmfsSparse snapshot delta extent (COWD)")
    } else if head.len() >= 8 && u64::from_le_bytes(head[..8].try_into().unwrap()) == 0xCAFE_BABE {
        Some("seSparse snapshot delta extent")
    } else if head.starts_with(b"QFI\xfb") {
        Some("qcow2 image")
    } else {
        None
    }
}

/// Reads and parses the descriptor at `path`; returns its exact bytes too (stored verbatim).
/// Only for paths the user named or [`crate::source::confine`] checked; [`read_from`] reads a file
/// already opened through it.
pub fn read(path: &Path) -> Result<(Vec<u8>, Descriptor)> {
    let file = crate::source::confine::open_read_only(path, false).ctx("open descriptor", path)?;
    read_from(&file, path)
}

/// Reads and parses the descriptor in the open `file` (named `path` in messages); returns its
/// exact bytes too.
pub fn read_from(file: &std::fs::File, path: &Path) -> Result<(Vec<u8>, Descriptor)> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let meta = file.metadata().ctx("stat descriptor", path)?;
    if meta.len() > MAX_DESCRIPTOR_LEN || !meta.is_file() {
        let mut head = [0u8; 8];
        let n = file.read_at(&mut head, 0).ctx("read", path)?;
        if let Some(what) = sniff_binary(&head[..n]) {
            return Err(Error::Unsupported {
                what: what.into(),
                path: path.to_path_buf(),
            });
        }
        return Err(Error::bad_input(
            path,
            if meta.is_file() {
                format!(
                    "is {} bytes, too large to be a VMDK text descriptor",
                    meta.len()
                )
            } else {
                "is not a regular file, so not a VMDK text descriptor".to_string()
            },
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let mut reader = file;
    // A descriptor is read from its start, whatever the descriptor's offset.
    std::io::Seek::rewind(&mut reader).ctx("read descriptor", path)?;
    reader
        .take(MAX_DESCRIPTOR_LEN + 1)
        .read_to_end(&mut bytes)
        .ctx("read descriptor", path)?;
    if bytes.len() as u64 > MAX_DESCRIPTOR_LEN {
        return Err(Error::bad_input(
            path,
            "grew past 1 MiB while being read: not a VMDK text descriptor",
        ));
    }
    if let Some(what) = sniff_binary(&bytes) {
        return Err(Error::Unsupported {
            what: what.into(),
            path: path.to_path_buf(),
        });
    }
    let d = parse(&bytes, path)?;
    Ok((bytes, d))
}

/// [`read_from`] for a file opened through [`crate::source::confine::Confine::open`], which may
/// stand for a file on a remote datastore.
pub fn read_opened(
    opened: &crate::source::confine::Opened,
    path: &Path,
) -> Result<(Vec<u8>, Descriptor)> {
    if opened.remote.is_none() {
        return read_from(&opened.file, path);
    }
    if let Some(what) = sniff_binary(&opened.head(8, path)?) {
        return Err(Error::Unsupported {
            what: what.into(),
            path: path.to_path_buf(),
        });
    }
    if opened.len() > MAX_DESCRIPTOR_LEN {
        return Err(Error::bad_input(
            path,
            format!(
                "is {} bytes, too large to be a VMDK text descriptor",
                opened.len()
            ),
        ));
    }
    let bytes = opened.read_all(path, MAX_DESCRIPTOR_LEN)?;
    if let Some(what) = sniff_binary(&bytes) {
        return Err(Error::Unsupported {
            what: what.into(),
            path: path.to_path_buf(),
        });
    }
    let d = parse(&bytes, path)?;
    Ok((bytes, d))
}

/// Parses descriptor text; errors name the file and the offending line.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Descriptor> {
    // Descriptors rewritten by QEMU are NUL-padded to a sector: text ends at the first NUL.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    if bytes[end..].iter().any(|&b| b != 0) {
        return Err(Error::bad_input(
            path,
            "not a VMDK text descriptor (contains binary data)",
        ));
    }
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut create_type = None;
    let mut parent_hint = None;
    let mut version_seen = false;
    let mut extents = Vec::new();
    let (mut cid, mut parent_cid, mut ddb) = (None, None, Vec::new());
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if ["RW", "RDONLY", "NOACCESS"]
            .iter()
            .any(|a| first.eq_ignore_ascii_case(a))
        {
            extents.push(parse_extent(line).map_err(|why| {
                Error::bad_input(
                    path,
                    format!("line {}: bad extent line {line:?}: {why}", n + 1),
                )
            })?);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::bad_input(
                path,
                format!("line {}: not a VMDK descriptor line: {line:?}", n + 1),
            ));
        };
        let key = k.trim();
        let k = key.to_ascii_lowercase();
        let v = v.trim().trim_matches('"').to_string();
        let hex = |v: &str| {
            u32::from_str_radix(v, 16).map_err(|_| {
                Error::bad_input(
                    path,
                    format!("line {}: {key} {v:?} is not 8 hex digits", n + 1),
                )
            })
        };
        match k.as_str() {
            "version" => version_seen = true,
            "createtype" => create_type = Some(v),
            "parentfilenamehint" => parent_hint = Some(v),
            "cid" => cid = Some(hex(&v)?),
            "parentcid" => parent_cid = Some(hex(&v)?),
            _ if k.starts_with("ddb.") => ddb.push((key.to_string(), v)),
            _ => {}
        }
    }
    let Some(create_type) = create_type else {
        return Err(Error::bad_input(
            path,
            if version_seen {
                "VMDK descriptor has no createType line"
            } else {
                "not a VMDK descriptor (no version= or createType= line)"
            },
        ));
    };
    let ct = create_type.to_ascii_lowercase();
    if ct.contains("passthrough") || ct == "vmfsrdmp" {
        return Err(Error::Unsupported {
            what: format!(
                "{create_type} (a physical-mode RDM: its data is on a SAN LUN, not in files, so it \
                 cannot be backed up from the VM directory; back it up from inside the guest)"
            ),
            path: path.to_path_buf(),
        });
    }
    if LATER_TYPES.contains(&ct.as_str()) {
        return Err(Error::Unsupported {
            what: create_type,
            path: path.to_path_buf(),
        });
    }
    if !FLAT_TYPES.contains(&ct.as_str()) && !SPARSE_TYPES.contains(&ct.as_str()) {
        return Err(Error::bad_input(
            path,
            format!("unknown VMDK createType {create_type:?}"),
        ));
    }
    if extents.is_empty() {
        return Err(Error::bad_input(
            path,
            "VMDK descriptor has no extent lines",
        ));
    }
    for e in &extents {
        match e.kind.as_str() {
            "FLAT" | "VMFS" | "SPARSE" | "VMFSSPARSE" | "SESPARSE" if e.file.is_some() => {}
            "ZERO" => {}
            "FLAT" | "VMFS" | "SPARSE" | "VMFSSPARSE" | "SESPARSE" => {
                return Err(Error::bad_input(
                    path,
                    format!("{} extent without a file name", e.kind),
                ))
            }
            other => {
                return Err(Error::Unsupported {
                    what: format!("{other} extent of a {create_type} disk"),
                    path: path.to_path_buf(),
                })
            }
        }
    }
    if parent_hint.as_deref().is_some_and(|h| h.trim().is_empty()) {
        parent_hint = None;
    }
    Ok(Descriptor {
        create_type,
        parent_hint,
        extents,
        cid,
        parent_cid,
        ddb,
    })
}

fn parse_extent(line: &str) -> std::result::Result<ExtentLine, String> {
    // Split off the quoted file name first: it may contain spaces.
    let (before, file, after) = match line.find('"') {
        Some(q) => {
            let rest = &line[q + 1..];
            let end = rest.find('"').ok_or("unterminated file name")?;
            (&line[..q], Some(rest[..end].to_string()), &rest[end + 1..])
        }
        None => (line, None, ""),
    };
    let mut parts = before.split_whitespace();
    let access = parts.next().ok_or("missing access")?.to_ascii_uppercase();
    let sectors: u64 = parts
        .next()
        .ok_or("missing size")?
        .parse()
        .map_err(|_| "size is not a number")?;
    let kind = parts.next().ok_or("missing type")?.to_ascii_uppercase();
    if parts.next().is_some() {
        return Err("unexpected text before the file name".into());
    }
    let offset = match after.split_whitespace().next() {
        Some(o) => o.parse().map_err(|_| "offset is not a number")?,
        None => 0,
    };
    if sectors == 0 || sectors > (1u64 << 50) / 512 {
        return Err("extent size out of range".into());
    }
    if offset > (1u64 << 50) / 512 {
        return Err(format!(
            "extent offset of {offset} sectors is out of range (files up to 1 PiB)"
        ));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Descriptor> {
        parse(text.as_bytes(), Path::new("t.vmdk"))
    }

    #[test]
    fn parses_vmfs_and_two_gb_flat() {
        let d = p("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 8388608 VMFS \"web 01-flat.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n").unwrap();
        assert_eq!(d.extents[0].file.as_deref(), Some("web 01-flat.vmdk"));
        assert_eq!(d.extents[0].sectors, 8388608);
        let d = p("version=1\r\ncreateType=\"twoGbMaxExtentFlat\"\r\nRW 4192256 FLAT \"a-f001.vmdk\" 0\r\nRW 100 FLAT \"a-f002.vmdk\" 0\r\nRW 50 ZERO\r\n").unwrap();
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[2].kind, "ZERO");
    }

    #[test]
    fn reads_delta_headers() {
        let d = p("version=1\nCID=8b1e5a02\nparentCID=3729b687\ncreateType=\"seSparse\"\nparentFileNameHint=\"app01.vmdk\"\nRW 8192 SESPARSE \"app01-000001-sesparse.vmdk\"\nddb.grain = \"8\"\n").unwrap();
        assert_eq!(d.cid, Some(0x8b1e5a02));
        assert_eq!(d.parent_cid, Some(0x3729b687));
        assert_eq!(d.parent_hint.as_deref(), Some("app01.vmdk"));
        assert_eq!(d.ddb, vec![("ddb.grain".to_string(), "8".to_string())]);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let e = p("version=1\ncreateType=\"vmfsPassthroughRawDeviceMap\"\nRW 100 VMFSRDM \"x-rdmp.vmdk\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("physical-mode RDM"), "{e}");
        let e = p("version=1\ncreateType=\"vsanSparse\"\nRW 100 VSANSPARSE \"vsan://x\"\n")
            .unwrap_err();
        assert_eq!(e.to_string(), "not supported yet: vsanSparse in t.vmdk");
        let e = p("version=1\ncreateType=\"bogus\"\nRW 100 FLAT \"x\" 0\n").unwrap_err();
        assert!(e.to_string().contains("unknown VMDK createType"), "{e}");
        let e = p("hello world\n").unwrap_err();
        assert!(e.to_string().contains("not a VMDK descriptor"), "{e}");
        let e = p("version=1\ncreateType=\"vmfs\"\nRW abc VMFS \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("size is not a number"), "{e}");
    }
}
