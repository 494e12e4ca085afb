//! Fuzz target: the exFAT reader, a tree walked (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run exfat`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("exfat", data);
});
