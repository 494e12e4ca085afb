//! Free space on a filesystem: how much is left, and how little is too little. Below the
//! library's error type, which uses it to say that a failed write met a full filesystem.

use std::path::Path;

/// Free space below which a filesystem counts as full: SQLite cannot grow its write-ahead log,
/// nor create its shared-memory file, with less.
pub const LOW_SPACE: u64 = 4 << 20;

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
