//! Fuzz target: the kdmv parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run kdmv`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("kdmv", data);
});
