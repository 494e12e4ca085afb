//! Every input parser driven from bytes in memory, for the cargo-fuzz targets in `fuzz/` and the
//! mutation test: descriptor, .vmx, .vmsd, KDMV, COWD, seSparse and qcow2. Each call parses the
//! input and, when it opens, walks its allocation map and reads its data, in bounded windows.
//! Errors are the expected outcome for most inputs; a panic, hang or huge allocation is a bug.

use std::path::Path;

use crate::source::{Cowd, GrainFormat, GrainLayer, Kdmv, Layer, MemFile, Qcow2, SeSparse};

/// The parsers [`exercise`] knows.
pub const PARSERS: &[&str] = &[
    "descriptor",
    "vmx",
    "vmsd",
    "kdmv",
    "cowd",
    "sesparse",
    "qcow2",
];

/// Guest bytes read per input at most (start and end of the disk, and the map around them).
const READ_WINDOW: u64 = 1 << 20;

/// Maps and reads the start and end windows of a grain-table layer; the first error.
fn walk<F: GrainFormat>(f: F) -> Result<(), String> {
    let layer = GrainLayer(f);
    let size = layer.size();
    let mut buf = Vec::new();
    for start in [0, size.saturating_sub(READ_WINDOW)] {
        let end = (start + READ_WINDOW).min(size);
        layer.map(start..end).map_err(|e| e.to_string())?;
        buf.resize((end - start) as usize, 0);
        layer.read(&mut buf, start).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs parser `which` (one of [`PARSERS`]) over `data`: `Ok` when the input parses (and, for
/// a disk format, opens and its windows map and read), else the parser's error. Mutated inputs
/// mostly give errors; a panic, hang or huge allocation is a bug. A valid input must give `Ok`,
/// which is how the mutation test knows its seeds reach the parsers' deeper code at all.
pub fn exercise(which: &str, data: &[u8]) -> Result<(), String> {
    let path = Path::new("fuzz-input");
    let file = || Box::new(MemFile::new(path, data.to_vec()));
    let err = |e: crate::error::Error| e.to_string();
    match which {
        "descriptor" => crate::source::descriptor::parse(data, path)
            .map(|_| ())
            .map_err(err),
        "vmx" => {
            let v = crate::vmware::vmx::Vmx::parse(&String::from_utf8_lossy(data));
            if v.disks().is_empty() {
                return Err("no disks".into());
            }
            Ok(())
        }
        "vmsd" => {
            let v = crate::vmware::vmsd::Vmsd::parse(&String::from_utf8_lossy(data));
            v.select("latest", path).map(|_| ()).map_err(err)
        }
        "kdmv" => {
            let k = Kdmv::open(file(), false).map_err(err)?;
            if let Some(d) = k.descriptor() {
                crate::source::descriptor::parse(d, path).map_err(err)?;
            }
            walk(k)
        }
        "cowd" => walk(Cowd::open(file()).map_err(err)?),
        "sesparse" => walk(SeSparse::open(file()).map_err(err)?),
        "qcow2" => walk(Qcow2::open(file()).map_err(err)?),
        other => panic!("unknown parser {other}"),
    }
}
