//! Fuzz target: the NTFS reader, a tree walked (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run ntfs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("ntfs", data);
});
