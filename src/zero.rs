//! All-zero detection: the chunker finds zero runs with it, and the writers and ghettoVCB import
//! leave holes where it says a block is zero.

/// True if every byte of `b` is zero.
#[inline]
pub fn is_zero(b: &[u8]) -> bool {
    // Most data blocks differ from zero in their first bytes: check those before the full scan.
    let head = b.len().min(16);
    if b[..head].iter().any(|&x| x != 0) {
        return false;
    }
    // SAFETY: u128 has no invalid bit patterns; align_to only splits the slice.
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0)
        && post.iter().all(|&x| x == 0)
        && mid
            .chunks(16)
            .all(|c| c.iter().fold(0u128, |a, &x| a | x) == 0)
}
