//! Fuzz target: the vmx parser (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run vmx`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("vmx", data);
});
