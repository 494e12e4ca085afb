//! One disk's bytes written to its extent files (sparse: zero runs stay holes), or through a
//! [`crate::restore::writer`] for another format, with damage handled by policy.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::maintain::damage::{self, DamagedRange};
use crate::progress::Progress;
use crate::repo::manifest::{DiskEntry, ExtentFile};
use crate::repo::Repository;
use crate::restore::reader::{DiskImage, ReadCache};
use crate::restore::writer::{Output, WritePlan};

use super::target::Target;

/// Writes a disk through a writer: its bytes first into a sparse raw file (the output itself for
/// raw and flat formats, else a scratch file beside the outputs), then the target format.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_disk_as(
    repo: &Repository,
    d: &DiskEntry,
    plan: &WritePlan,
    outputs: &[&Target],
    source_descriptor: Option<&str>,
    allow_damaged: bool,
    damaged: &Mutex<Vec<DamagedRange>>,
    progress: &dyn Progress,
) -> Result<u64> {
    const RAW: &str = "\0raw";
    let files: Vec<(File, PathBuf)> = outputs.iter().map(|t| t.create()).collect::<Result<_>>()?;
    // The scratch raw file, when the output is not the raw data itself.
    let scratch = match plan.data_output {
        Some(_) => None,
        None => {
            let t = outputs[0];
            let name = format!("{}.raw", t.partial);
            let f = t.dir.create_replacing(&name, 0o600)?;
            Some((t.dir.clone(), name, f))
        }
    };
    let result = (|| {
        let (raw_file, raw_path): (&File, PathBuf) = match (&scratch, plan.data_output) {
            (Some((dir, name, f)), _) => (f, dir.path_of(name)),
            (None, Some(i)) => (&files[i].0, files[i].1.clone()),
            (None, None) => unreachable!("a scratch file when there is no data output"),
        };
        let flat = DiskEntry {
            extents: vec![ExtentFile {
                kind: "RAW".into(),
                start: 0,
                len: d.virtual_size,
                file: Some(RAW.into()),
                file_offset: 0,
                file_size: d.virtual_size,
                head: None,
                tail: None,
            }],
            layout: None,
            ..d.clone()
        };
        let open = |n: &str| -> Result<(File, PathBuf)> {
            debug_assert_eq!(n, RAW);
            Ok((
                raw_file.try_clone().ctx("reopen", &raw_path)?,
                raw_path.clone(),
            ))
        };
        let n = write_disk(repo, &flat, &open, allow_damaged, damaged, progress)?;
        let outs: Vec<Output<'_>> = files
            .iter()
            .map(|(file, path)| Output { file, path })
            .collect();
        let raw = Output {
            file: raw_file,
            path: &raw_path,
        };
        crate::restore::writer::write(plan, d, raw, &outs, source_descriptor)?;
        for (f, path) in &files {
            f.sync_all().ctx("fsync", path)?;
        }
        Ok(n)
    })();
    if let Some((dir, name, _)) = &scratch {
        let _ = dir.remove_file(name);
    }
    result
}

pub(super) struct OpenExtent {
    start: u64,
    len: u64,
    file: Option<(File, u64, PathBuf)>,
}

/// Memory for decoded segments while a disk is extracted (each is used twice: for its data
/// ranges, then to read them). Chunks are read once, so they are not cached.
const EXTRACT_SEGMENT_CACHE_BYTES: usize = 4 << 20;

thread_local! {
    /// This thread's buffer for the data runs it restores (at most a segment), kept from one
    /// segment to the next.
    static RUN_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Writes disk `d` into its extent files (opened by `open`): the bytes come from the reader
/// ([`DiskImage`]) that the mount and the NBD server use, a data run at a time; zero segments
/// and zero runs stay holes. Damaged data is an error naming the range, or with
/// `allow_damaged` a hole listed in `damaged` (a segment that fails is retried a chunk at a
/// time, so only the damaged chunks are lost).
pub(super) fn write_disk(
    repo: &Repository,
    d: &DiskEntry,
    open: &dyn Fn(&str) -> Result<(File, PathBuf)>,
    allow_damaged: bool,
    damaged: &Mutex<Vec<DamagedRange>>,
    progress: &dyn Progress,
) -> Result<u64> {
    let label = damage::disk_label(d);
    let image = DiskImage::open(
        repo,
        d,
        Arc::new(ReadCache::single_pass(EXTRACT_SEGMENT_CACHE_BYTES)),
    )?;
    let mut extents = Vec::new();
    for e in &d.extents {
        let file = match &e.file {
            Some(name) => {
                let (f, tmp) = open(name)?;
                f.set_len(e.file_size).ctx("set the size of", &tmp)?;
                for (edge, at) in [(e.head, 0), (e.tail, e.file_offset + e.len)] {
                    if let Some(id) = edge {
                        match repo.read_object(&id) {
                            Ok(data) => f.write_all_at(&data, at).ctx("write", &tmp)?,
                            Err(e) if allow_damaged && is_repository_damage(&e) => {
                                progress.note(&format!(
                                    "damaged: bytes of {name} outside its extent not restored: {e}"
                                ));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Some((f, e.file_offset, tmp))
            }
            None => None,
        };
        extents.push(OpenExtent {
            start: e.start,
            len: e.len,
            file,
        });
    }
    // Zero segments are holes already: count them done, then write the others.
    let nonzero: Vec<u64> = image.nonzero_segments().collect();
    let data_span: u64 = nonzero
        .iter()
        .map(|&i| image.segment_range(i))
        .map(|r| r.end - r.start)
        .sum();
    progress.advance(image.size() - data_span);
    let write_segment = |i: u64| -> Result<u64> {
        let seg = image.segment_range(i);
        let damaged_range = |r: Range<u64>, e: Error| -> Result<()> {
            let r = DamagedRange {
                disk: label.clone(),
                start: r.start,
                end: r.end,
                reason: e.to_string(),
            };
            if allow_damaged && is_repository_damage(&e) {
                progress.note(&format!("damaged: {r}"));
                damaged.lock().unwrap().push(r);
                Ok(())
            } else if is_repository_damage(&e) {
                Err(Error::Damaged {
                    generation: String::new(),
                    detail: format!(
                        "{r}\n  run `vmrepo check --repair` to find every damaged range, or pass \
                             --allow-damaged to write what is left"
                    ),
                })
            } else {
                Err(e)
            }
        };
        let mut buf = RUN_BUFFER.take();
        let whole = image
            .data_ranges(i, false)
            .and_then(|runs| copy_ranges(&image, &runs, &extents, &mut buf));
        let n = match whole {
            Ok(n) => n,
            Err(e) if allow_damaged && is_repository_damage(&e) => {
                // Find exactly which chunks are bad; restore the others.
                match image.data_ranges(i, true) {
                    Ok(chunks) => {
                        let mut n = 0;
                        for c in chunks {
                            match copy_ranges(&image, std::slice::from_ref(&c), &extents, &mut buf)
                            {
                                Ok(k) => n += k,
                                Err(e) => damaged_range(c, e)?,
                            }
                        }
                        n
                    }
                    Err(e) => {
                        damaged_range(seg.clone(), e)?;
                        0
                    }
                }
            }
            Err(e) => {
                damaged_range(seg.clone(), e)?;
                0
            }
        };
        RUN_BUFFER.set(buf);
        progress.advance(seg.end - seg.start);
        Ok(n)
    };
    let written = match repo.remote_readers() {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("vmrepo-restore-{i}"))
            .build()
            .map_err(|e| Error::Usage(format!("cannot start the restore's reader threads: {e}")))?
            .install(|| write_prefetched(&image, &nonzero, n, &write_segment))?,
        None => nonzero
            .into_par_iter()
            .map(write_segment)
            .try_reduce(|| 0, |a, b| Ok(a + b))?,
    };
    for e in &extents {
        if let Some((f, _, path)) = &e.file {
            f.sync_all().ctx("fsync", path)?;
        }
    }
    Ok(written)
}

/// Segments a restore from object storage asks for ahead of its readers (about 64 MiB of disk
/// with 4 MiB segments), in batches of [`PREFETCH_BATCH`].
const PREFETCH_AHEAD: usize = 16;
const PREFETCH_BATCH: usize = 8;

/// From object storage: `readers` threads write the segments in disk order, each taking the
/// next one, while whichever reader finds the prefetched window running short asks for the
/// next batch ([`DiskImage::prefetch`]). So many ranged GETs are in flight while the readers
/// decompress, instead of one round trip at a time per reader.
fn write_prefetched(
    image: &DiskImage<&Repository>,
    segments: &[u64],
    readers: usize,
    write_segment: &(dyn Fn(u64) -> Result<u64> + Sync),
) -> Result<u64> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // Segments (positions in `segments`) asked for so far; one reader at a time extends it,
    // and a reader whose segment was not asked for yet waits for that.
    let asking = Mutex::new(());
    let asked = AtomicUsize::new(0);
    let ask_up_to = |at: usize| {
        while asked.load(Ordering::Acquire) < segments.len().min(at + PREFETCH_AHEAD) {
            let from = asked.load(Ordering::Acquire);
            let end = (from + PREFETCH_BATCH).min(segments.len());
            image.prefetch(&segments[from..end]);
            asked.store(end, Ordering::Release);
        }
    };
    (0..readers)
        .into_par_iter()
        .map(|_| -> Result<u64> {
            let mut n = 0;
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                if at >= segments.len() || failed.load(Ordering::Relaxed) {
                    return Ok(n);
                }
                if asked.load(Ordering::Acquire) <= at {
                    let _one = asking.lock().unwrap();
                    ask_up_to(at);
                } else if let Ok(_one) = asking.try_lock() {
                    ask_up_to(at);
                }
                match write_segment(segments[at]) {
                    Ok(k) => n += k,
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))
}

/// Reads each of `ranges` through `image` and writes it to the extent files; returns the bytes
/// written.
fn copy_ranges(
    image: &DiskImage<&Repository>,
    ranges: &[Range<u64>],
    extents: &[OpenExtent],
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let mut n = 0;
    for r in ranges {
        let len = (r.end - r.start) as usize;
        // Every byte is written by the read: grow the buffer, never clear it again.
        if buf.len() < len {
            buf.resize(len, 0);
        }
        image.read_at(r.start, &mut buf[..len])?;
        write_virtual(extents, r.start, &buf[..len])?;
        n += len as u64;
    }
    Ok(n)
}

/// True for errors that mean the repository's data is missing or damaged (as opposed to a
/// failure writing the destination).
pub(super) fn is_repository_damage(e: &Error) -> bool {
    matches!(e, Error::Corrupt(_) | Error::Damaged { .. })
}

fn write_virtual(extents: &[OpenExtent], offset: u64, data: &[u8]) -> Result<()> {
    let end = offset + data.len() as u64;
    for e in extents
        .iter()
        .filter(|e| e.start < end && e.start + e.len > offset)
    {
        let s = e.start.max(offset);
        let t = (e.start + e.len).min(end);
        let part = &data[(s - offset) as usize..(t - offset) as usize];
        match &e.file {
            Some((f, file_offset, path)) => f
                .write_all_at(part, file_offset + (s - e.start))
                .ctx("write", path)?,
            None => {
                if !crate::zero::is_zero(part) {
                    return Err(Error::Corrupt(
                        "non-zero data stored for a ZERO extent".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}
