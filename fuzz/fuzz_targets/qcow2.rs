//! Fuzz target: the qcow2 parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run qcow2`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("qcow2", data);
});
