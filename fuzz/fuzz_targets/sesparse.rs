//! Fuzz target: the sesparse parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run sesparse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("sesparse", data);
});
