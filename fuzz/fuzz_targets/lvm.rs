//! Fuzz target: LVM2 physical volume labels and metadata text (see vmrepo::fuzzing). Run: `cargo +nightly fuzz run lvm`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmrepo::fuzzing::exercise("lvm", data);
});
