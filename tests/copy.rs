//! `vmrepo copy` between repositories on this machine (object storage: tests/s3.rs): every copied
//! generation restores byte for byte from the destination; a repeated copy sends nothing; only
//! new data goes; other keys re-encrypt; a killed copy leaves nothing half-visible; bad requests
//! are refused in words; a nightly job copies after its ingests.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `vmrepo ARGS` with a passphrase for the source and one for the destination.
fn vmrepo_pw(src_pw: &str, dst_pw: &str, args: &[std::ffi::OsString]) -> Run {
    Run::from(
        Command::new(BIN)
            .args(args)
            .env("VMREPO_PASSWORD", src_pw)
            .env("VMREPO_TO_PASSWORD", dst_pw)
            .output()
            .unwrap(),
    )
}

/// A VM with two disks, and a repository holding two nights of it.
fn two_nights(t: &Path, encryption: Option<&str>) -> (PathBuf, PathBuf) {
    let vm = make_vm(
        &t.join("ds"),
        "web01",
        &[
            (48 << 20, vec![(0, 10 << 20, 1), (30 << 20, 4 << 20, 2)]),
            (16 << 20, vec![(1 << 20, 3 << 20, 3)]),
        ],
    );
    let repo = t.join("src");
    let mut init = vec![s("init"), p(&repo)];
    if let Some(pw) = encryption {
        init.extend([s("--encryption"), s("aes-256-gcm")]);
        vmrepo_pw(pw, "", &init).ok();
    } else {
        vmrepo(init).ok();
    }
    for night in 0..2 {
        overwrite(&vm.join("web01-flat.vmdk"), 2 << 20, 1 << 20, 10 + night);
        vmrepo_pw(
            encryption.unwrap_or(""),
            "",
            &[s("ingest"), p(&repo), p(&vm), s("--json")],
        )
        .ok();
    }
    (vm, repo)
}

/// Extracts `spec` from `repo` and compares every file with the VM directory as it was.
fn restores_as(repo: &Path, pw: &str, spec: &str, want: &Path, out: &Path) {
    vmrepo_pw(pw, "", &[s("extract"), p(repo), s(spec), p(out)]).ok();
    for f in [
        "web01-flat.vmdk",
        "web01_1-flat.vmdk",
        "web01.vmx",
        "web01.nvram",
    ] {
        assert!(
            same_file(&out.join(f), &want.join(f)),
            "{spec}: {f} differs"
        );
    }
}

#[test]
fn copies_restore_byte_for_byte_under_other_keys_and_a_second_copy_sends_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (vm, src) = two_nights(t.path(), Some("source pw"));
    // Keep the first night's disk to compare with.
    let first = t.path().join("first");
    vmrepo_pw(
        "source pw",
        "",
        &[s("extract"), p(&src), s("web01@-1"), p(&first)],
    )
    .ok();
    for (name, dst_pw) in [("dst-encrypted", Some("other pw")), ("dst-plain", None)] {
        let dst = t.path().join(name);
        let mut init = vec![s("init"), p(&dst)];
        if dst_pw.is_some() {
            init.extend([s("--encryption"), s("aes-256-gcm")]);
        }
        vmrepo_pw(dst_pw.unwrap_or(""), "", &init).ok();
        let pw = dst_pw.unwrap_or("");
        let r = vmrepo_pw("source pw", pw, &[s("copy"), p(&src), p(&dst), s("--json")]);
        r.ok();
        let j = r.json();
        assert_eq!(j["copied"].as_array().unwrap().len(), 2, "{j}");
        assert_eq!(j["same_ids"], false, "{j}");
        if dst_pw.is_none() {
            assert!(r.stderr.contains("is encrypted and"), "{}", r.stderr);
        }
        restores_as(
            &dst,
            pw,
            "web01",
            &vm,
            &t.path().join(format!("{name}-out")),
        );
        restores_as(
            &dst,
            pw,
            "web01@-1",
            &first,
            &t.path().join(format!("{name}-out1")),
        );
        vmrepo_pw(pw, "", &[s("check"), p(&dst), s("--read-data")]).ok();
        // The copies carry the destination's own segment fingerprints: backing the VM up
        // there directly reuses every segment through the segment cache, reading no chunk.
        let direct = vmrepo_pw(pw, "", &[s("ingest"), p(&dst), p(&vm), s("--json")]);
        direct.ok();
        let st = &direct.json()["stats"];
        assert_eq!(st["bytes_new"], 0, "{st}");
        assert_eq!(
            st["segments_reused"].as_u64().unwrap(),
            st["segments_total"].as_u64().unwrap() - st["segments_zero"].as_u64().unwrap(),
            "{st}"
        );
        // Again: nothing to do.
        let again = vmrepo_pw("source pw", pw, &[s("copy"), p(&src), p(&dst), s("--json")]);
        again.ok();
        let j = again.json();
        assert_eq!(j["copied"].as_array().unwrap().len(), 0, "{j}");
        assert_eq!(j["present"].as_array().unwrap().len(), 2, "{j}");
        assert_eq!(j["bytes_stored"], 0, "{j}");
        vmrepo_pw(pw, "", &[s("check"), p(&dst)]).ok();
    }
}

/// Unencrypted repositories name objects alike: a night's copy reads and stores about what
/// the night changed, not the disk.
#[test]
fn a_nightly_copy_moves_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let (vm, src) = two_nights(t.path(), None);
    let dst = t.path().join("dst");
    vmrepo([s("init"), p(&dst)]).ok();
    vmrepo([s("copy"), p(&src), p(&dst), s("web01@-1")]).ok();
    let r = vmrepo([s("copy"), p(&src), p(&dst), s("web01"), s("--json")]);
    r.ok();
    let j = r.json();
    assert_eq!(j["same_ids"], true, "{j}");
    assert_eq!(j["copied"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["present"].as_array().unwrap().len(), 1, "{j}");
    // One MiB changed (in a 4 MiB segment); the rest was taken whole, unread.
    let read = j["bytes_read"].as_u64().unwrap();
    assert!(read <= 5 << 20, "read {read} bytes: {j}");
    let stored = j["bytes_stored"].as_u64().unwrap();
    assert!(stored <= 2 << 20, "stored {stored} bytes: {j}");
    restores_as(&dst, "", "web01", &vm, &t.path().join("out"));
    vmrepo([s("check"), p(&dst), s("--read-data")]).ok();
}

/// A copy killed at random points leaves the destination with whole generations only, passing
/// check; the next copy finishes the job.
#[test]
fn a_killed_copy_leaves_nothing_half_visible() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("big.img");
    sparse_image(&img, 96 << 20, &[(0, 64 << 20, 7)]);
    let src = t.path().join("src");
    vmrepo([s("init"), p(&src)]).ok();
    ingest(&src, &img, Some("big"));
    let dst = t.path().join("dst");
    vmrepo_pw(
        "pw",
        "",
        &[s("init"), p(&dst), s("--encryption"), s("aes-256-gcm")],
    )
    .ok();
    for delay_ms in [30u64, 120, 300] {
        let mut child = Command::new(BIN)
            .args([s("copy"), p(&src), p(&dst)])
            .env("VMREPO_TO_PASSWORD", "pw")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        signal(&child, 9);
        child.wait().unwrap();
        let check = vmrepo_pw("pw", "", &[s("check"), p(&dst)]);
        assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
        let listed = vmrepo_pw("pw", "", &[s("list"), p(&dst), s("--json")]);
        listed.ok();
        let n = listed.json().as_array().unwrap().len();
        assert!(n <= 1, "{}", listed.stdout);
    }
    vmrepo_pw("", "pw", &[s("copy"), p(&src), p(&dst)]).ok();
    let out = t.path().join("out");
    vmrepo_pw("pw", "", &[s("extract"), p(&dst), s("big"), p(&out)]).ok();
    assert!(same_file(&out.join("big.img"), &img));
    vmrepo_pw("pw", "", &[s("check"), p(&dst), s("--read-data")]).ok();
}

#[test]
fn copies_that_cannot_be_made_are_refused_in_words() {
    let t = tempfile::tempdir().unwrap();
    let (_vm, src) = two_nights(t.path(), None);
    // Another chunker: refused before anything is written.
    let other = t.path().join("other");
    vmrepo([s("init"), p(&other), s("--chunk-avg"), s("32")]).ok();
    let r = vmrepo([s("copy"), p(&src), p(&other)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("other chunker parameters"),
        "{}",
        r.stderr
    );
    assert!(generations(&other, "web01").is_empty());
    // Itself, under two names.
    let link = t.path().join("src-link");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let r = vmrepo([s("copy"), p(&src), p(&link)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("same repository"), "{}", r.stderr);
    // A VM the source does not have.
    let dst = t.path().join("dst");
    vmrepo([s("init"), p(&dst)]).ok();
    let r = vmrepo([s("copy"), p(&src), p(&dst), s("db99")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no VM named \"db99\""), "{}", r.stderr);
    assert!(r.stderr.contains("web01"), "{}", r.stderr);
    // An encrypted destination without its passphrase.
    let enc = t.path().join("enc");
    vmrepo_pw(
        "secret",
        "",
        &[s("init"), p(&enc), s("--encryption"), s("aes-256-gcm")],
    )
    .ok();
    let r = vmrepo_pw("", "wrong", &[s("copy"), p(&src), p(&enc)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("VMREPO_TO_PASSWORD"), "{}", r.stderr);
}

/// A generation whose data is damaged in the source is not copied (exit 1, named); the others
/// are, and the destination stays clean.
#[test]
fn a_damaged_generation_is_named_and_the_others_are_copied() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    vmrepo([s("init"), p(&src)]).ok();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    sparse_image(&a, 8 << 20, &[(0, 4 << 20, 21)]);
    ingest(&src, &a, Some("alpha"));
    let before = packs(&src);
    sparse_image(&b, 8 << 20, &[(0, 4 << 20, 22)]);
    ingest(&src, &b, Some("beta"));
    // Damage beta's data: a bit in the middle of its first pack.
    let beta_pack = packs(&src)
        .into_iter()
        .find(|p| !before.contains(p))
        .unwrap();
    let len = fs::metadata(&beta_pack).unwrap().len();
    flip_bit(&beta_pack, len / 2, 3);
    let dst = t.path().join("dst");
    vmrepo([s("init"), p(&dst)]).ok();
    let r = vmrepo([s("copy"), p(&src), p(&dst)]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("NOT COPIED beta@"), "{}", r.stdout);
    assert!(r.stdout.contains("copied alpha@"), "{}", r.stdout);
    assert_eq!(generations(&dst, "alpha").len(), 1);
    assert!(generations(&dst, "beta").is_empty());
    vmrepo([s("check"), p(&dst), s("--read-data")]).ok();
}

/// `[[copy]]` in a job file: after the night's ingests the generations go to the off-site
/// repository, whose passphrase comes from its own file.
#[test]
fn a_nightly_job_copies_after_its_ingests() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(
        &t.path().join("ds"),
        "db01",
        &[(32 << 20, vec![(0, 6 << 20, 31)])],
    );
    let repo = init_repo(t.path());
    let offsite = t.path().join("offsite");
    let pw = t.path().join("offsite.pass");
    fs::write(&pw, "offsite pw\n").unwrap();
    vmrepo_pw(
        "offsite pw",
        "",
        &[s("init"), p(&offsite), s("--encryption"), s("aes-256-gcm")],
    )
    .ok();
    let job = t.path().join("job.toml");
    fs::write(
        &job,
        format!(
            "repository = {:?}\nvms = [{:?}]\n\n[[copy]]\nto = {:?}\npassword_file = {:?}\n",
            repo, vm, offsite, pw
        ),
    )
    .unwrap();
    for night in 0..2 {
        overwrite(&vm.join("db01-flat.vmdk"), 0, 4096, 40 + night);
        let r = vmrepo([s("run"), p(&job)]);
        r.ok();
        assert!(
            r.stdout.contains("ok (1 generation(s) copied"),
            "{}",
            r.stdout
        );
    }
    assert_eq!(generations(&repo, "db01").len(), 2);
    let listed = vmrepo_pw(
        "offsite pw",
        "",
        &[s("list"), p(&offsite), s("db01"), s("--json")],
    );
    listed.ok();
    assert_eq!(listed.json().as_array().unwrap().len(), 2);
    let out = t.path().join("out");
    vmrepo_pw(
        "offsite pw",
        "",
        &[s("extract"), p(&offsite), s("db01"), p(&out)],
    )
    .ok();
    assert!(same_file(
        &out.join("db01-flat.vmdk"),
        &vm.join("db01-flat.vmdk")
    ));
}
