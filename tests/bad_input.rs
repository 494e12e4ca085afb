//! Bad input gets one clear error naming the file and the reason, a non-zero exit, no
//! generation, and no damage to what was there.

mod common;
use common::*;
use std::fs;
use std::path::Path;

/// A repository with one good generation, to show nothing older is damaged.
fn repo_with_history(t: &Path) -> std::path::PathBuf {
    let repo = init_repo(t);
    let img = t.join("good.img");
    sparse_image(&img, 8 << 20, &[(0, 2 << 20, 1)]);
    ingest(&repo, &img, Some("good"));
    repo
}

fn assert_refused(repo: &Path, args: &[std::ffi::OsString], needles: &[&str]) {
    let mut full = vec![s("ingest"), p(repo)];
    full.extend_from_slice(args);
    let r = vmrepo(&full);
    assert_ne!(r.code, 0, "accepted: {args:?}");
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "error for {args:?} lacks {n:?}:\n{}",
            r.stderr
        );
    }
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "expected one error line:\n{}",
        r.stderr
    );
    let list = vmrepo([s("list"), p(repo), s("--json")]).ok().json();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "a generation was recorded: {list}"
    );
    vmrepo([s("check"), p(repo), s("--read-data")]).ok();
}

#[test]
fn broken_vm_directories_and_disks_are_refused_clearly() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_history(t.path());

    // A directory without a .vmx.
    let empty = t.path().join("novmx");
    fs::create_dir(&empty).unwrap();
    fs::write(empty.join("disk.vmdk"), "x").unwrap();
    assert_refused(&repo, &[p(&empty)], &["novmx", "no .vmx file"]);

    // A missing disk file.
    assert_refused(
        &repo,
        &[p(&t.path().join("nope.img")), s("--name"), s("x")],
        &["nope.img", "No such file"],
    );

    // A flat extent shorter than its descriptor says.
    let vm = make_vm(t.path(), "short", &[(16 << 20, vec![(0, 1 << 20, 1)])]);
    fs::OpenOptions::new()
        .write(true)
        .open(vm.join("short-flat.vmdk"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    assert_refused(
        &repo,
        &[p(&vm)],
        &["short-flat.vmdk", "needs 16777216", "short.vmdk"],
    );

    // A missing extent file.
    let vm = make_vm(t.path(), "noflat", &[(16 << 20, vec![])]);
    fs::remove_file(vm.join("noflat-flat.vmdk")).unwrap();
    assert_refused(&repo, &[p(&vm)], &["noflat-flat.vmdk", "is missing"]);

    // A garbage descriptor.
    let vm = make_vm(t.path(), "garbage", &[(16 << 20, vec![])]);
    fs::write(
        vm.join("garbage.vmdk"),
        "this is not\na descriptor at all\n",
    )
    .unwrap();
    assert_refused(&repo, &[p(&vm)], &["garbage.vmdk", "not a VMDK descriptor"]);

    // An unknown createType, and one that cannot be read from files.
    let vm = make_vm(t.path(), "unknown", &[(16 << 20, vec![])]);
    let d = fs::read_to_string(vm.join("unknown.vmdk"))
        .unwrap()
        .replace("\"vmfs\"", "\"fancyNewType\"");
    fs::write(vm.join("unknown.vmdk"), d).unwrap();
    assert_refused(
        &repo,
        &[p(&vm)],
        &["unknown.vmdk", "unknown VMDK createType \"fancyNewType\""],
    );
    let vm = make_vm(t.path(), "later", &[(16 << 20, vec![])]);
    let d = fs::read_to_string(vm.join("later.vmdk"))
        .unwrap()
        .replace("\"vmfs\"", "\"vsanSparse\"");
    fs::write(vm.join("later.vmdk"), d).unwrap();
    assert_refused(
        &repo,
        &[p(&vm)],
        &["not supported yet: vsanSparse in ", "later.vmdk"],
    );
}

#[test]
fn bad_vm_names_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_history(t.path());
    let img = t.path().join("disk.img");
    sparse_image(&img, 1 << 20, &[(0, 4096, 1)]);
    for (name, why) in [
        ("", "it is empty"),
        ("a/b", "contains '/'"),
        ("a@b", "contains '@'"),
        ("a\u{1}b", "control characters"),
    ] {
        assert_refused(
            &repo,
            &[p(&img), s("--name"), s(name)],
            &["invalid VM name", why],
        );
    }
    // A displayName that is not a valid name says where it came from.
    let vm = make_vm(t.path(), "okdir", &[(1 << 20, vec![])]);
    let vmx = fs::read_to_string(vm.join("okdir.vmx"))
        .unwrap()
        .replace("displayName = \"okdir\"", "displayName = \"db|40prod\"");
    fs::write(vm.join("okdir.vmx"), vmx).unwrap();
    assert_refused(
        &repo,
        &[p(&vm)],
        &["\"db@prod\"", "displayName", "use --name NAME"],
    );
}

#[test]
fn not_a_repository_newer_format_and_non_empty_init() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    sparse_image(&img, 1 << 20, &[(0, 4096, 1)]);
    let r = vmrepo([s("ingest"), p(t.path()), p(&img)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("is not a vmrepo repository (config.toml is missing)"),
        "{}",
        r.stderr
    );

    let repo = init_repo(t.path());
    let cfg = fs::read_to_string(repo.join("config.toml"))
        .unwrap()
        .replace("format_version = 4", "format_version = 7");
    fs::write(repo.join("config.toml"), cfg).unwrap();
    let r = vmrepo([s("list"), p(&repo)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("repository format version 7"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("upgrade vmrepo"), "{}", r.stderr);

    let r = vmrepo([s("init"), p(t.path())]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("is not empty"), "{}", r.stderr);
}

#[test]
fn a_full_disk_fails_the_ingest_without_damage() {
    // A real small filesystem when we may mount one; otherwise a file-size limit (EFBIG).
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let tmpfs = sh(&format!(
        "mount -t tmpfs -o size=24m tmpfs '{}'",
        mnt.display()
    ))
    .code
        == 0;
    let repo_dir = if tmpfs {
        mnt.clone()
    } else {
        t.path().to_path_buf()
    };
    let repo = repo_with_history(&repo_dir);
    let img = t.path().join("big.img");
    sparse_image(&img, 64 << 20, &[(0, 64 << 20, 9)]);
    let incompressible = t.path().join("rand.img");
    sh(&format!(
        "head -c 48M /dev/urandom > '{}'",
        incompressible.display()
    ))
    .ok();
    let r = if tmpfs {
        vmrepo([
            s("ingest"),
            p(&repo),
            p(&incompressible),
            s("--name"),
            s("big"),
        ])
    } else {
        sh(&format!(
            "trap '' XFSZ; ulimit -f 20000; exec '{BIN}' ingest '{}' '{}' --name big",
            repo.display(),
            incompressible.display()
        ))
    };
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("No space left on device") || r.stderr.contains("File too large"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("pack file"),
        "the error should name the file: {}",
        r.stderr
    );
    assert!(generations(&repo, "big").is_empty());
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    // The space comes back (the unsealed pack is removed) and a smaller ingest still works.
    let small = t.path().join("small.img");
    sparse_image(&small, 4 << 20, &[(0, 1 << 20, 4)]);
    ingest(&repo, &small, Some("small"));
    let _ = img;
    if tmpfs {
        sh(&format!("umount '{}'", mnt.display()));
    }
}

/// Messages that name the real reason: a table entry pointing past the end of a truncated
/// qcow2, and a descriptor whose extent starts past the end of its file (which once said
/// "not supported yet: 18446744073709551104 bytes outside the extent's data").
#[test]
fn damaged_disk_files_are_explained() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let q = t.path().join("cut.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 '{0}' 4M && qemu-io -f qcow2 -c 'write -P 0x33 2M 1M' '{0}' >/dev/null && truncate -s -512K '{0}'",
        q.display()
    ))
    .ok();
    let r = vmrepo([s("ingest"), p(&repo), p(&q), s("--name"), s("cut")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("cut.qcow2") && r.stderr.contains("goes past the end of the file"),
        "{}",
        r.stderr
    );
    let dir = t.path().join("vm");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("d-flat.vmdk"), vec![1u8; 4096]).unwrap();
    for (offset, want) in [
        ("36028797018963967", "out of range"),
        ("64", "only 4096 bytes"),
    ] {
        fs::write(
            dir.join("d.vmdk"),
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"d-flat.vmdk\" {offset}\n"
            ),
        )
        .unwrap();
        let r = vmrepo([
            s("ingest"),
            p(&repo),
            p(&dir.join("d.vmdk")),
            s("--name"),
            s("d"),
        ]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains(want), "{offset}: {}", r.stderr);
        assert!(!r.stderr.contains("18446744073709551104"), "{}", r.stderr);
    }
    assert!(generations(&repo, "cut").is_empty() && generations(&repo, "d").is_empty());
}
