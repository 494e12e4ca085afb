//! VMDK text descriptors: header keys, extent lines, and which createTypes this version reads.

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
}

/// createTypes this version ingests.
const FLAT_TYPES: &[&str] = &[
    "monolithicflat",
    "vmfs",
    "vmfsthin",
    "vmfspreallocated",
    "vmfseagerzeroedthick",
    "vmfsthick",
    "twogbmaxextentflat",
    "2gbmaxextentflat",
];

/// createTypes that exist but come in a later version.
const LATER_TYPES: &[&str] = &[
    "monolithicsparse",
    "twogbmaxextentsparse",
    "2gbmaxextentsparse",
    "streamoptimized",
    "vmfssparse",
    "sesparse",
    "vmfsrdm",
    "vmfsrawdevicemap",
    "vmfsrdmp",
    "vmfspassthroughrawdevicemap",
    "vmfsraw",
    "fulldevice",
    "partitioneddevice",
    "vsansparse",
    "custom",
];

/// What the first bytes of a `.vmdk` say it is.
pub fn sniff_binary(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"KDMV") {
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
pub fn read(path: &Path) -> Result<(Vec<u8>, Descriptor)> {
    let meta = std::fs::metadata(path).ctx("open descriptor", path)?;
    if meta.len() > MAX_DESCRIPTOR_LEN {
        let mut head = [0u8; 8];
        use std::io::Read;
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut head))
            .ctx("read", path)?;
        if let Some(what) = sniff_binary(&head[..n]) {
            return Err(Error::Unsupported {
                what: what.into(),
                path: path.to_path_buf(),
            });
        }
        return Err(Error::bad_input(
            path,
            format!(
                "is {} bytes, too large to be a VMDK text descriptor",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).ctx("read descriptor", path)?;
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
        let k = k.trim().to_ascii_lowercase();
        let v = v.trim().trim_matches('"').to_string();
        match k.as_str() {
            "version" => version_seen = true,
            "createtype" => create_type = Some(v),
            "parentfilenamehint" => parent_hint = Some(v),
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
    if LATER_TYPES.contains(&ct.as_str()) {
        return Err(Error::Unsupported {
            what: create_type,
            path: path.to_path_buf(),
        });
    }
    if !FLAT_TYPES.contains(&ct.as_str()) {
        return Err(Error::bad_input(
            path,
            format!("unknown VMDK createType {create_type:?}"),
        ));
    }
    if parent_hint.is_some() {
        return Err(Error::Unsupported {
            what: format!("{create_type} snapshot delta (parentFileNameHint)"),
            path: path.to_path_buf(),
        });
    }
    if extents.is_empty() {
        return Err(Error::bad_input(
            path,
            "VMDK descriptor has no extent lines",
        ));
    }
    for e in &extents {
        match e.kind.as_str() {
            "FLAT" | "VMFS" if e.file.is_some() => {}
            "ZERO" => {}
            "FLAT" | "VMFS" => {
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
    Ok(Descriptor {
        create_type,
        parent_hint,
        extents,
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
    fn refuses_what_it_cannot_read() {
        let e = p("version=1\ncreateType=\"monolithicSparse\"\nRW 100 SPARSE \"x.vmdk\"\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "not supported yet: monolithicSparse in t.vmdk"
        );
        let e = p("version=1\ncreateType=\"bogus\"\nRW 100 FLAT \"x\" 0\n").unwrap_err();
        assert!(e.to_string().contains("unknown VMDK createType"), "{e}");
        let e = p("hello world\n").unwrap_err();
        assert!(e.to_string().contains("not a VMDK descriptor"), "{e}");
        let e = p("version=1\ncreateType=\"vmfs\"\nRW abc VMFS \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("size is not a number"), "{e}");
    }
}
