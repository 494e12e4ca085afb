//! Fuzz target: the vmsd parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run vmsd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("vmsd", data);
});
