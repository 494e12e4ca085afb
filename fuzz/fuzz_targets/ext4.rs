//! Fuzz target: the ext2/3/4 reader, a tree walked (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run ext4`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("ext4", data);
});
