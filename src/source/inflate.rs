//! Whole-buffer decompression of one compressed grain or cluster, the fast path of
//! [`super::sparse`] and [`super::qcow2`]: libdeflate for zlib and raw deflate, zstd's one-shot
//! decoder for zstd, each with a decompressor kept per thread.
//!
//! These functions only answer "here is the whole output" or "no": on any failure (damaged
//! data, or more output than the buffer holds) the caller falls back to its streaming decoder,
//! which stays the reference for what is accepted and for the error messages.

use std::cell::RefCell;

thread_local! {
    static DEFLATE: RefCell<libdeflater::Decompressor> =
        RefCell::new(libdeflater::Decompressor::new());
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// How a deflate stream is wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deflate {
    /// zlib header and Adler-32 trailer.
    Zlib,
    /// Bare deflate blocks.
    Raw,
}

/// Decompresses one deflate stream at the start of `data` into `out`; bytes after the end of the
/// stream are ignored (qcow2 pads clusters to whole sectors). Returns the number of bytes
/// written, or `None` when the stream is damaged or does not fit in `out`.
pub fn deflate(data: &[u8], wrapper: Deflate, out: &mut [u8]) -> Option<usize> {
    DEFLATE.with(|d| {
        let mut d = d.borrow_mut();
        match wrapper {
            Deflate::Zlib => d.zlib_decompress(data, out),
            Deflate::Raw => d.deflate_decompress(data, out),
        }
        .ok()
    })
}

/// Decompresses the zstd frame at the start of `data` into `out`; bytes after the frame are
/// ignored (sector padding). Returns the number of bytes written, or `None` when the frame is
/// damaged or does not fit in `out`.
pub fn zstd_frame(data: &[u8], out: &mut [u8]) -> Option<usize> {
    let frame = zstd::zstd_safe::find_frame_compressed_size(data).ok()?;
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        let dctx = z.get_or_insert_with(zstd::zstd_safe::DCtx::create);
        dctx.decompress(out, data.get(..frame)?).ok()
    })
}

/// The fast path shared by the grain readers: runs `decode` (one of the functions above) into
/// `out` when `out` is a whole grain of `whole` bytes, else into a `whole`-byte buffer whose
/// first `out.len()` bytes are kept (the last grain of a disk cut short by its end). True when
/// at least `need` bytes came out; false sends the caller to its streaming decoder.
pub fn into_grain(
    out: &mut [u8],
    whole: usize,
    need: usize,
    decode: impl Fn(&mut [u8]) -> Option<usize>,
) -> bool {
    if out.len() == whole {
        return decode(out).is_some_and(|n| n >= need);
    }
    if out.len() > whole {
        return false;
    }
    let mut buf = vec![0u8; whole];
    match decode(&mut buf) {
        Some(n) if n >= need.max(out.len()) => {
            out.copy_from_slice(&buf[..out.len()]);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 / 13 % 251) as u8).collect()
    }

    #[test]
    fn raw_deflate_ignores_trailing_padding() {
        let plain = sample(65536);
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&plain).unwrap();
        let mut packed = e.finish().unwrap();
        for pad in [0usize, 1, 511, 4096] {
            let mut p = packed.clone();
            p.extend(std::iter::repeat_n(0u8, pad));
            let mut out = vec![0u8; plain.len()];
            assert_eq!(
                deflate(&p, Deflate::Raw, &mut out),
                Some(plain.len()),
                "pad {pad}"
            );
            assert_eq!(out, plain);
        }
        // Garbage after the stream is padding too.
        packed.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; plain.len()];
        assert_eq!(deflate(&packed, Deflate::Raw, &mut out), Some(plain.len()));
        assert_eq!(out, plain);
    }

    #[test]
    fn zlib_checks_and_limits() {
        let plain = sample(65536);
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&plain).unwrap();
        let mut packed = e.finish().unwrap();
        let mut out = vec![0u8; plain.len()];
        assert_eq!(deflate(&packed, Deflate::Zlib, &mut out), Some(plain.len()));
        assert_eq!(out, plain);
        // Output larger than the buffer: refused, not truncated.
        let mut small = vec![0u8; plain.len() - 1];
        assert_eq!(deflate(&packed, Deflate::Zlib, &mut small), None);
        // Truncated stream, bad checksum.
        assert_eq!(
            deflate(&packed[..packed.len() / 2], Deflate::Zlib, &mut out),
            None
        );
        let last = packed.len() - 1;
        packed[last] ^= 1;
        assert_eq!(deflate(&packed, Deflate::Zlib, &mut out), None);
    }

    #[test]
    fn zstd_frame_ignores_padding_and_refuses_overflow() {
        let plain = sample(65536);
        let mut packed = zstd::stream::encode_all(&plain[..], 3).unwrap();
        packed.extend(std::iter::repeat_n(0u8, 700));
        let mut out = vec![0u8; plain.len()];
        assert_eq!(zstd_frame(&packed, &mut out), Some(plain.len()));
        assert_eq!(out, plain);
        let mut small = vec![0u8; 1000];
        assert_eq!(zstd_frame(&packed, &mut small), None);
        assert_eq!(zstd_frame(&packed[..20], &mut out), None);
        assert_eq!(zstd_frame(&[], &mut out), None);
    }
}
