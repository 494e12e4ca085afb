//! Small file helpers: atomic replace, directory fsync, read-ahead hints.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{IoContext, Result};

/// Fsyncs a directory so that entries created or renamed in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Writes `data` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, path).ctx("rename into place", path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Bytes per read-ahead hint. Linux reads at most max(read_ahead_kb, max_sectors_kb) of one
/// `POSIX_FADV_WILLNEED` call and silently drops the rest (128 KiB with the default
/// read_ahead_kb): a whole-file hint of a 55 MB index brought in its first 8 MiB on the
/// project's VM. Hints are therefore given in steps of this size.
pub const HINT_STEP: u64 = 128 << 10;

/// Asks the kernel to start reading `len` bytes of `file` at `offset` into the page cache,
/// without waiting, in [`HINT_STEP`] pieces so that all of it is read. Advisory: errors are
/// ignored (the later read reports them).
pub fn will_need(file: &File, offset: u64, len: u64) {
    let fd = file.as_raw_fd();
    let end = offset.saturating_add(len);
    let mut at = offset;
    while at < end {
        let n = HINT_STEP.min(end - at);
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        unsafe {
            libc::posix_fadvise(
                fd,
                at as libc::off_t,
                n as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        at += n;
    }
}
