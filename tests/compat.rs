//! Repositories made by earlier vmrepo builds keep working. `tests/fixtures/repo-v1-disk-maps.tar.gz`
//! was made by the build before sparse disk maps (commit 5f53ce1): `init`, an ingest of the
//! VM in `vm/` (a 4 MiB thin flat disk with data at both ends, a .vmx, .nvram, descriptor and
//! log), a change to the flat file (kept before it as `first-flat.vmdk`), a second ingest. Its
//! disk maps are version 1 (one id per segment, zero segments included).
//! `tests/fixtures/repo-encrypted-2026-12.tar.gz` is an encrypted repository of the same VM made
//! by the build before the cipher code changed (see its test).

mod common;
use common::*;
use std::path::Path;

fn unpack(dir: &Path) {
    unpack_fixture(dir, "repo-v1-disk-maps.tar.gz");
}

fn unpack_fixture(dir: &Path, name: &str) {
    sh(&format!(
        "tar -C '{}' -xzf '{}/tests/fixtures/{name}'",
        dir.display(),
        env!("CARGO_MANIFEST_DIR")
    ))
    .ok();
}

#[test]
fn an_older_repository_opens_checks_extracts_ingests_and_collects_unchanged() {
    let t = tempfile::tempdir().unwrap();
    unpack(t.path());
    let (repo, vm) = (t.path().join("repo"), t.path().join("vm"));

    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    assert_eq!(generations(&repo, "web01").len(), 2);

    // Both generations restore byte for byte.
    let older = t.path().join("older");
    vmrepo([s("extract"), p(&repo), s("web01@-1"), p(&older)]).ok();
    assert!(same_file(
        &t.path().join("first-flat.vmdk"),
        &older.join("web01-flat.vmdk")
    ));
    let latest = t.path().join("latest");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&latest)]).ok();
    for f in [
        "web01-flat.vmdk",
        "web01.vmdk",
        "web01.vmx",
        "web01.nvram",
        "vmware.log",
    ] {
        assert!(same_file(&vm.join(f), &latest.join(f)), "{f} differs");
    }

    // A new generation (written with today's formats) beside the old ones, deduplicated
    // against them, restores too; prune and gc keep what the remaining generations need.
    overwrite(&vm.join("web01-flat.vmdk"), 3 << 20, 65536, 7);
    let r = ingest(&repo, &vm, None);
    assert_eq!(r["stats"]["segments_total"], 1, "{r}");
    let third = t.path().join("third");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&third)]).ok();
    assert!(same_file(
        &vm.join("web01-flat.vmdk"),
        &third.join("web01-flat.vmdk")
    ));
    vmrepo([s("prune"), p(&repo), s("--keep-last"), s("2")]).ok();
    vmrepo([s("gc"), p(&repo)]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    assert_eq!(generations(&repo, "web01").len(), 2);
    let again = t.path().join("again");
    vmrepo([s("extract"), p(&repo), s("web01@-1"), p(&again)]).ok();
    assert!(same_file(
        &latest.join("web01-flat.vmdk"),
        &again.join("web01-flat.vmdk")
    ));

    // An index rebuilt from the packs reads the old maps as well.
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

/// `tests/fixtures/repo-encrypted-2026-12.tar.gz` was made by the build whose AES-256-GCM code
/// was the aes-gcm crate (commit 7e40acb), from the same VM as above: `init --encryption
/// aes-256-gcm --kdf-memory 8` with the passphrase `fixture`, an ingest of `first-flat.vmdk`'s
/// content, then one of the flat file in `vm/`. Its key file, sealed index fields and object
/// payloads must all open with today's cipher code, and what today's code writes beside them
/// must open too.
#[test]
fn an_encrypted_repository_from_the_earlier_cipher_code_opens_and_grows() {
    let t = tempfile::tempdir().unwrap();
    unpack_fixture(t.path(), "repo-encrypted-2026-12.tar.gz");
    let (repo, vm) = (t.path().join("repo"), t.path().join("vm"));
    let run = |args: &[std::ffi::OsString]| vmrepo_with_passphrase("fixture", None, args);

    // The key file written then unwraps with the right passphrase only.
    let wrong = vmrepo_with_passphrase("not it", None, &[s("list"), p(&repo)]);
    assert_eq!(wrong.code, 1, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("passphrase"), "{}", wrong.stderr);
    let listed = run(&[s("list"), p(&repo)]);
    listed.ok();
    assert!(listed.stdout.contains("web01"), "{}", listed.stdout);

    run(&[s("check"), p(&repo), s("--read-data")]).ok();
    let older = t.path().join("older");
    run(&[s("extract"), p(&repo), s("web01@-1"), p(&older)]).ok();
    assert!(same_file(
        &t.path().join("first-flat.vmdk"),
        &older.join("web01-flat.vmdk")
    ));
    let latest = t.path().join("latest");
    run(&[s("extract"), p(&repo), s("web01"), p(&latest)]).ok();
    for f in ["web01-flat.vmdk", "web01.vmdk", "web01.vmx", "web01.nvram"] {
        assert!(same_file(&vm.join(f), &latest.join(f)), "{f} differs");
    }

    // A generation written today beside them, and a key file written today, open as well.
    overwrite(&vm.join("web01-flat.vmdk"), 1 << 20, 65536, 11);
    run(&[s("ingest"), p(&repo), p(&vm), s("--name"), s("web01")]).ok();
    vmrepo_with_passphrase(
        "fixture",
        Some("added today"),
        &[s("key"), s("add"), p(&repo), s("--kdf-memory"), s("8")],
    )
    .ok();
    let third = t.path().join("third");
    vmrepo_with_passphrase(
        "added today",
        None,
        &[s("extract"), p(&repo), s("web01"), p(&third)],
    )
    .ok();
    assert!(same_file(
        &vm.join("web01-flat.vmdk"),
        &third.join("web01-flat.vmdk")
    ));

    // An index rebuilt from the packs alone reads both writers' objects.
    run(&[s("check"), p(&repo), s("--rebuild-index")]).ok();
    run(&[s("check"), p(&repo), s("--read-data")]).ok();
    assert_eq!(
        vmrepo_with_passphrase("added today", None, &[s("list"), p(&repo)]).code,
        0
    );
    let again = t.path().join("again");
    run(&[s("extract"), p(&repo), s("web01@-1"), p(&again)]).ok();
    assert!(same_file(
        &latest.join("web01-flat.vmdk"),
        &again.join("web01-flat.vmdk")
    ));
}
