//! Fuzz target: the descriptor parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run descriptor`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("descriptor", data);
});
