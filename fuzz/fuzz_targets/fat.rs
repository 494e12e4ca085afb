//! Fuzz target: the FAT reader, a tree walked (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run fat`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("fat", data);
});
