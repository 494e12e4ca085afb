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

fn walk<F: GrainFormat>(f: F) {
    let layer = GrainLayer(f);
    let size = layer.size();
    let mut buf = Vec::new();
    for start in [0, size.saturating_sub(READ_WINDOW)] {
        let end = (start + READ_WINDOW).min(size);
        if layer.map(start..end).is_err() {
            return;
        }
        buf.resize((end - start) as usize, 0);
        let _ = layer.read(&mut buf, start);
    }
}

/// Runs parser `which` (one of [`PARSERS`]) over `data`.
pub fn exercise(which: &str, data: &[u8]) {
    let path = Path::new("fuzz-input");
    let file = || Box::new(MemFile::new(path, data.to_vec()));
    match which {
        "descriptor" => {
            let _ = crate::descriptor::parse(data, path);
        }
        "vmx" => {
            let v = crate::vmx::Vmx::parse(&String::from_utf8_lossy(data));
            let _ = v.disks();
        }
        "vmsd" => {
            let v = crate::vmsd::Vmsd::parse(&String::from_utf8_lossy(data));
            let _ = v.select("latest", path);
        }
        "kdmv" => {
            if let Ok(k) = Kdmv::open(file(), false) {
                if let Some(d) = k.descriptor() {
                    let _ = crate::descriptor::parse(d, path);
                }
                walk(k);
            }
        }
        "cowd" => {
            if let Ok(c) = Cowd::open(file()) {
                walk(c);
            }
        }
        "sesparse" => {
            if let Ok(s) = SeSparse::open(file()) {
                walk(s);
            }
        }
        "qcow2" => {
            if let Ok(q) = Qcow2::open(file()) {
                walk(q);
            }
        }
        other => panic!("unknown parser {other}"),
    }
}
