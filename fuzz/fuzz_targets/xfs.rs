//! Fuzz target: the XFS reader, a tree walked (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run xfs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("xfs", data);
});
