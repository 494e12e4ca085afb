//! Opening one link of a disk (any supported file: VMDK descriptor with any extent types, hosted
//! sparse KDMV, qcow2, raw), following parents (`parentFileNameHint`, qcow2 backing files) with
//! CID checks, loop and depth limits, and stacking the links into one [`DiskReader`].
//!
//! Reads of a chain resolve per byte range: the leaf answers first; where it says "absent" the
//! parent answers, down to the base; past the base (or past a shorter parent's end) is zeros.
//! Every file is opened read-only, and only where [`Confine`] allows: a hostile VM directory
//! must not make a parent, backing file or extent name a host file.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    Cowd, DiskReader, ExtentDisk, ExtentSpec, ExtentTarget, GrainLayer, Kdmv, Layer, Qcow2,
    SeSparse, State,
};
use crate::error::{Advice, Error, Result, Setting};
use crate::source::confine::{Confine, Opened};
use crate::source::descriptor::{self, Descriptor, NO_PARENT_CID};

/// Links a chain may have before it is considered a loop or garbage.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// How paths named inside disk files are resolved.
#[derive(Debug, Default, Clone)]
pub struct ChainOptions {
    /// `(datastore prefix, local directory)`: an absolute path under the prefix is read from
    /// the local directory instead (`/vmfs/volumes/ds1=/mnt/ds1`). Every local directory is a
    /// root [`Confine`] lets an ingest read; `--allow-path DIR` is the entry `DIR=DIR`
    /// ([`crate::source::confine::with_allowed`]).
    pub datastore_map: Vec<(PathBuf, PathBuf)>,
}

impl ChainOptions {
    /// Parses `--datastore-map` values of the form `/vmfs/volumes/ds1=/mnt/ds1`.
    pub fn parse_map(s: &str) -> std::result::Result<(PathBuf, PathBuf), String> {
        match s.split_once('=') {
            Some((a, b)) if a.starts_with('/') && !b.is_empty() => {
                Ok((PathBuf::from(a), PathBuf::from(b)))
            }
            _ => Err(format!(
                "{s:?} is not DATASTORE=DIR with an absolute datastore path (e.g. /vmfs/volumes/ds1=/mnt/ds1)"
            )),
        }
    }
}

/// One opened link.
pub struct Link {
    /// The file opened (descriptor, KDMV or qcow2 image, raw file).
    pub path: PathBuf,
    /// createType, or `qcow2` / `raw`.
    pub format: String,
    /// `CID` (VMDK only).
    pub cid: Option<u32>,
    /// `parentCID` (VMDK deltas only).
    pub parent_cid: Option<u32>,
    /// The parent as named inside the file (`parentFileNameHint`, qcow2 backing file).
    pub parent_hint: Option<String>,
    /// The parent's format when the file says it (qcow2 backing format).
    pub parent_format: Option<String>,
    /// Descriptor text (separate file or embedded), verbatim.
    pub descriptor: Option<Vec<u8>>,
    /// The parsed descriptor.
    pub parsed: Option<Descriptor>,
    /// Data files other than `path` (extent files).
    pub extent_files: Vec<PathBuf>,
    /// The link's contents.
    pub layer: Box<dyn Layer>,
}

impl Link {
    /// Bytes this link itself stores (its allocation map's data ranges), counted in 1 GiB
    /// windows so that memory stays small however fragmented the map is.
    pub fn allocated_bytes(&self) -> Result<u64> {
        const WINDOW: u64 = 1 << 30;
        let size = self.layer.size();
        let (mut total, mut at) = (0, 0);
        while at < size {
            let end = (at + WINDOW).min(size);
            total += self
                .layer
                .map(at..end)?
                .iter()
                .filter(|s| s.state == State::Data)
                .map(|s| s.range.end - s.range.start)
                .sum::<u64>();
            at = end;
        }
        Ok(total)
    }
}

/// What kind of file `head` (its first bytes) starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Hosted sparse VMDK.
    Kdmv,
    /// vmfsSparse delta extent.
    Cowd,
    /// seSparse delta extent.
    SeSparse,
    /// qcow2 image.
    Qcow2,
    /// Anything else: a text descriptor or raw data.
    Other,
}

/// Classifies a file by its magic.
pub fn sniff(head: &[u8]) -> Kind {
    if head.starts_with(b"KDMV") || head.starts_with(b"kdmv") {
        Kind::Kdmv
    } else if head.starts_with(b"COWD") {
        Kind::Cowd
    } else if head.len() >= 8
        && u64::from_le_bytes(head[..8].try_into().unwrap()) == super::sesparse::SESPARSE_MAGIC
    {
        Kind::SeSparse
    } else if head.starts_with(super::qcow2::QCOW2_MAGIC) {
        Kind::Qcow2
    } else {
        Kind::Other
    }
}

/// Turns "not found" into "`what` named by `by` is missing"; a file named by an absolute
/// (datastore) path may be mounted elsewhere on this host, so that message says how to map it.
pub fn missing(path: &Path, by: &Path, what: &str, absolute: bool) -> impl FnOnce(Error) -> Error {
    let (path, by, what) = (path.to_path_buf(), by.to_path_buf(), what.to_string());
    move |err| match err {
        Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
            let reason = format!("{what} named by {} is missing", by.display());
            if absolute {
                Advice::new(format!(
                    "{}: {reason}; if its datastore is mounted elsewhere on this host, map it \
                     with ",
                    path.display()
                ))
                .setting(Setting::DatastoreMap)
                .into()
            } else {
                Error::bad_input(&path, reason)
            }
        }
        other => other,
    }
}

/// Opens one link, if `confine` allows (`by`: the file that names it, for messages).
/// `format_hint` is a parent format the child names (`raw` forces raw).
pub fn open_link(
    path: &Path,
    format_hint: Option<&str>,
    opts: &ChainOptions,
    confine: &Confine,
    by: Option<&Path>,
) -> Result<Link> {
    let opened = confine.open(path, by)?;
    if format_hint.is_some_and(|f| f.eq_ignore_ascii_case("raw")) {
        return open_raw(path, opened);
    }
    let head = opened.head(512, path)?;
    match sniff(&head) {
        Kind::Kdmv => open_kdmv(path, opened),
        Kind::Qcow2 => {
            let q = Qcow2::open(Box::new(opened.into_flat(path)?))?;
            Ok(Link {
                path: path.to_path_buf(),
                format: "qcow2".into(),
                cid: None,
                parent_cid: None,
                parent_hint: q.backing().map(str::to_string),
                parent_format: q.backing_format().map(str::to_string),
                descriptor: None,
                parsed: None,
                extent_files: Vec::new(),
                layer: Box::new(GrainLayer(q)),
            })
        }
        Kind::Cowd | Kind::SeSparse => Err(Error::bad_input(
            path,
            format!(
                "is the data file of a {} snapshot delta; give its descriptor (the small .vmdk file that names it) instead",
                if sniff(&head) == Kind::Cowd { "vmfsSparse" } else { "seSparse" }
            ),
        )),
        Kind::Other => {
            let is_vmdk = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"));
            if is_vmdk && opened.is_file() && opened.len() <= descriptor::MAX_DESCRIPTOR_LEN
            {
                open_descriptor(path, opened, opts, confine)
            } else {
                open_raw(path, opened)
            }
        }
    }
}

fn open_raw(path: &Path, opened: Opened) -> Result<Link> {
    let file = Arc::new(opened.into_flat(path)?);
    let len = file.len();
    let disk = ExtentDisk::new(
        vec![ExtentSpec {
            len,
            target: ExtentTarget::File { file, offset: 0 },
        }],
        path,
    )?;
    Ok(Link {
        path: path.to_path_buf(),
        format: "raw".into(),
        cid: None,
        parent_cid: None,
        parent_hint: None,
        parent_format: None,
        descriptor: None,
        parsed: None,
        extent_files: Vec::new(),
        layer: Box::new(disk),
    })
}

fn open_kdmv(path: &Path, opened: Opened) -> Result<Link> {
    let k = Kdmv::open(Box::new(opened.into_flat(path)?), false)?;
    let compressed = k.header().flags & super::sparse::FLAG_COMPRESSED != 0;
    let (descriptor, parsed) = match k.descriptor() {
        Some(text) if !text.is_empty() => {
            let d = descriptor::parse(text, path).map_err(|e| match e {
                Error::BadInput { path, reason } => Error::BadInput {
                    path,
                    reason: format!("embedded descriptor: {reason}"),
                },
                e => e,
            })?;
            (Some(text.to_vec()), Some(d))
        }
        _ => (None, None),
    };
    // The binary header decides the layout; the embedded createType is informational.
    let format = match parsed.as_ref().map(|d| d.create_type.clone()) {
        Some(ct)
            if ct.eq_ignore_ascii_case("monolithicSparse")
                || ct.eq_ignore_ascii_case("streamOptimized") =>
        {
            ct
        }
        _ if compressed => "streamOptimized".into(),
        _ => "monolithicSparse".into(),
    };
    Ok(Link {
        path: path.to_path_buf(),
        format,
        cid: parsed.as_ref().and_then(|d| d.cid),
        parent_cid: parsed.as_ref().and_then(|d| d.parent_cid),
        parent_hint: parsed.as_ref().and_then(|d| d.parent_hint.clone()),
        parent_format: None,
        descriptor,
        parsed,
        extent_files: Vec::new(),
        layer: Box::new(GrainLayer(k)),
    })
}

fn open_descriptor(
    path: &Path,
    opened: Opened,
    opts: &ChainOptions,
    confine: &Confine,
) -> Result<Link> {
    let (bytes, d) = descriptor::read_opened(&opened, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut specs = Vec::new();
    let mut files = Vec::new();
    let mut used = HashSet::new();
    for e in &d.extents {
        let len = e.sectors * 512;
        if e.access == "NOACCESS" {
            return Err(Error::Unsupported {
                what: "a NOACCESS extent (its data cannot be read)".into(),
                path: path.to_path_buf(),
            });
        }
        let Some(name) = e.file.as_deref() else {
            specs.push(ExtentSpec {
                len,
                target: ExtentTarget::Zero,
            });
            continue;
        };
        let file_path = resolve(dir, name, opts).ok_or_else(|| {
            if confine.is_staged() {
                return Error::bad_input(
                    path,
                    format!(
                        "extent file {name:?} is not a file of the host's datastores (only names \
                         relative to the descriptor and /vmfs/volumes/DATASTORE/... are read)"
                    ),
                );
            }
            Error::from(
                Advice::new(format!(
                    "{}: extent file {name:?} is not in the VM directory; map its datastore with ",
                    path.display()
                ))
                .setting(Setting::DatastoreMap),
            )
        })?;
        if !used.insert(file_path.clone()) {
            return Err(Error::Unsupported {
                what: format!("the file {name:?} used by several extents"),
                path: path.to_path_buf(),
            });
        }
        let opened = confine
            .open(&file_path, Some(path))
            .and_then(|o| o.into_flat(&file_path))
            .map_err(missing(
                &file_path,
                path,
                "extent file",
                Path::new(name).is_absolute() && !confine.is_staged(),
            ))?;
        let target = match e.kind.as_str() {
            "FLAT" | "VMFS" => ExtentTarget::File {
                file: Arc::new(opened),
                offset: e.offset * 512,
            },
            "SPARSE" => {
                ExtentTarget::Layer(Box::new(GrainLayer(Kdmv::open(Box::new(opened), true)?)))
            }
            "VMFSSPARSE" => {
                ExtentTarget::Layer(Box::new(GrainLayer(Cowd::open(Box::new(opened))?)))
            }
            "SESPARSE" => {
                ExtentTarget::Layer(Box::new(GrainLayer(SeSparse::open(Box::new(opened))?)))
            }
            other => {
                return Err(Error::Unsupported {
                    what: format!("{other} extent"),
                    path: path.to_path_buf(),
                })
            }
        };
        files.push(file_path);
        specs.push(ExtentSpec { len, target });
    }
    let disk = ExtentDisk::new(specs, path)?;
    Ok(Link {
        path: path.to_path_buf(),
        format: d.create_type.clone(),
        cid: d.cid,
        parent_cid: d.parent_cid,
        parent_hint: d.parent_hint.clone(),
        parent_format: None,
        descriptor: Some(bytes),
        parsed: Some(d),
        extent_files: files,
        layer: Box::new(disk),
    })
}

/// Resolves a file name found inside a disk file: relative names against `dir`; absolute names
/// through the datastore map, else the same base name inside `dir`, else the absolute path
/// itself only when it is on an ESXi datastore (`/vmfs/volumes/...`). `None` when none exists.
/// Whether the file may then be read is [`Confine`]'s decision (`..` and symlinks included).
pub fn resolve(dir: &Path, name: &str, opts: &ChainOptions) -> Option<PathBuf> {
    // Windows hosts write hints with backslashes and drive letters.
    let unix = name.replace('\\', "/");
    let p = Path::new(&unix);
    let windows_abs = unix.len() > 2 && unix.as_bytes()[1] == b':' && unix.as_bytes()[2] == b'/';
    if !p.is_absolute() && !windows_abs {
        return Some(dir.join(p));
    }
    for (prefix, local) in &opts.datastore_map {
        if let Ok(rest) = p.strip_prefix(prefix) {
            return Some(local.join(rest));
        }
    }
    if let Some(base) = p.file_name() {
        let here = dir.join(base);
        if here.exists() {
            return Some(here);
        }
    }
    if p.starts_with("/vmfs/volumes") && p.exists() {
        return Some(p.to_path_buf());
    }
    None
}

/// Opens `leaf` and every parent below it, leaf first, reading only what `confine` allows.
/// Errors name the file at fault; a broken link stops the walk, and the links opened so far are
/// returned with the error.
pub fn walk(leaf: &Path, opts: &ChainOptions, confine: &Confine) -> (Vec<Link>, Option<Error>) {
    let mut links: Vec<Link> = Vec::new();
    let mut seen = HashSet::new();
    let mut next = (leaf.to_path_buf(), None::<String>);
    loop {
        let (path, format) = next;
        let child = links.last().map(|l| l.path.clone());
        let canonical = match std::fs::canonicalize(&path) {
            Ok(c) => c,
            Err(e) => {
                let err = match &child {
                    Some(c) if e.kind() == std::io::ErrorKind::NotFound => Error::bad_input(
                        c,
                        format!(
                            "broken snapshot chain: its parent {} is missing",
                            path.display()
                        ),
                    ),
                    _ => Error::io("open", &path, e),
                };
                return (links, Some(err));
            }
        };
        if !seen.insert(canonical) {
            let c = child.unwrap_or_else(|| path.clone());
            return (
                links,
                Some(Error::bad_input(
                    &c,
                    format!(
                        "snapshot chain loops: it names {} as its parent, which is already in the chain",
                        path.display()
                    ),
                )),
            );
        }
        if links.len() >= MAX_CHAIN_DEPTH {
            return (
                links,
                Some(Error::bad_input(
                    &path,
                    format!("snapshot chain is deeper than {MAX_CHAIN_DEPTH} links"),
                )),
            );
        }
        let link = match open_link(&path, format.as_deref(), opts, confine, child.as_deref()) {
            Ok(l) => l,
            Err(e) => return (links, Some(e)),
        };
        let cid_error = links.last().and_then(|c| match (c.parent_cid, link.cid) {
            (Some(want), Some(have)) if want != have && want != NO_PARENT_CID => {
                Some(Error::bad_input(
                    &c.path,
                    format!(
                        "broken snapshot chain: it expects its parent {} to have CID {want:08x}, but the parent has CID {have:08x} \
                         (the parent was written to after this delta was taken); this chain cannot be read consistently",
                        link.path.display()
                    ),
                ))
            }
            _ => None,
        });
        if cid_error.is_some() {
            return (links, cid_error);
        }
        let parent = match &link.parent_hint {
            None => None,
            Some(hint) => {
                let dir = link.path.parent().unwrap_or(Path::new("."));
                match resolve(dir, hint, opts) {
                    Some(p) => Some((p, link.parent_format.clone())),
                    None if confine.is_staged() => {
                        let err = Error::bad_input(
                            &link.path,
                            format!(
                                "broken snapshot chain: its parent {hint:?} is not a file of the \
                                 host's datastores"
                            ),
                        );
                        links.push(link);
                        return (links, Some(err));
                    }
                    None => {
                        let err: Error = Advice::new(format!(
                            "{}: broken snapshot chain: its parent {hint:?} is not found (not in \
                             {}); map its datastore with ",
                            link.path.display(),
                            dir.display()
                        ))
                        .setting(Setting::DatastoreMap)
                        .text(" (or use ")
                        .setting(Setting::AllowPath)
                        .text(" for the directory it is in, if you trust it)")
                        .into();
                        links.push(link);
                        return (links, Some(err));
                    }
                }
            }
        };
        links.push(link);
        match parent {
            Some(p) => next = (p.0, p.1),
            None => return (links, None),
        }
    }
}

/// Opens a whole chain or fails naming the file at fault.
pub fn open_chain(leaf: &Path, opts: &ChainOptions, confine: &Confine) -> Result<Vec<Link>> {
    match walk(leaf, opts, confine) {
        (links, None) => Ok(links),
        (_, Some(e)) => Err(e),
    }
}

/// A chain of layers (leaf first) read as one disk.
pub struct Chain {
    layers: Vec<Box<dyn Layer>>,
}

/// A guest range and the layer that supplies it (`None`: zeros).
type Piece = (Range<u64>, Option<usize>);

impl Chain {
    /// Stacks `links` (leaf first).
    pub fn new(links: Vec<Link>) -> Chain {
        Chain {
            layers: links.into_iter().map(|l| l.layer).collect(),
        }
    }

    fn resolve(&self, level: usize, range: Range<u64>, out: &mut Vec<Piece>) -> Result<()> {
        let push = |out: &mut Vec<Piece>, r: Range<u64>, src: Option<usize>| {
            if r.is_empty() {
                return;
            }
            match out.last_mut() {
                Some((last, s)) if last.end == r.start && *s == src => last.end = r.end,
                _ => out.push((r, src)),
            }
        };
        let layer = &self.layers[level];
        let inside = range.end.min(layer.size());
        if range.start < inside {
            for sp in layer.map(range.start..inside)? {
                match sp.state {
                    State::Data => push(out, sp.range, Some(level)),
                    State::Zero => push(out, sp.range, None),
                    State::Absent if level + 1 < self.layers.len() => {
                        self.resolve(level + 1, sp.range, out)?
                    }
                    State::Absent => push(out, sp.range, None),
                }
            }
        }
        push(out, range.start.max(inside)..range.end, None);
        Ok(())
    }
}

impl DiskReader for Chain {
    fn size(&self) -> u64 {
        self.layers[0].size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pieces = Vec::new();
        self.resolve(0, offset..offset + buf.len() as u64, &mut pieces)?;
        for (r, src) in pieces {
            let dst = &mut buf[(r.start - offset) as usize..(r.end - offset) as usize];
            match src {
                Some(l) => self.layers[l].read(dst, r.start)?,
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn prefetch(&self, range: Range<u64>) {
        let mut pieces = Vec::new();
        if self.resolve(0, range, &mut pieces).is_ok() {
            for (r, src) in pieces {
                if let Some(l) = src {
                    self.layers[l].prefetch(r);
                }
            }
        }
    }

    fn link_ranges(&self, level: usize) -> Option<Result<Vec<Range<u64>>>> {
        let layer = self.layers.get(level)?;
        Some(layer.map(0..layer.size()).map(|spans| {
            let mut out: Vec<Range<u64>> = Vec::new();
            for s in spans.into_iter().filter(|s| s.state != State::Absent) {
                match out.last_mut() {
                    Some(last) if last.end == s.range.start => last.end = s.range.end,
                    _ => out.push(s.range),
                }
            }
            out
        }))
    }

    fn allocated(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let mut pieces = Vec::new();
        self.resolve(0, range, &mut pieces)?;
        let mut out: Vec<Range<u64>> = Vec::new();
        for (r, src) in pieces {
            if src.is_some() {
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r),
                }
            }
        }
        Ok(out)
    }
}
