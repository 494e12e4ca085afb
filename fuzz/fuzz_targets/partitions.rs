//! Fuzz target: the MBR and GPT partition tables (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run partitions`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("partitions", data);
});
