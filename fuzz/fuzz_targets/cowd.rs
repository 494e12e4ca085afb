//! Fuzz target: the cowd parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run cowd`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("cowd", data);
});
