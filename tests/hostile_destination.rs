//! Issue #15, "no ordinary command may lose a backup": extract and `key export` write into
//! directories someone else may have prepared. A symbolic link planted where vmrepo writes (a
//! partial file, a final file, a subdirectory) is never followed, so nothing is ever written
//! outside the destination; and a VM with two disks of the same file name (the same VM folder
//! on two datastores) comes back whole, from extract and through the mount, with no partial
//! directory or files left behind when an extract fails.

mod common;
#[path = "common/live.rs"]
mod live;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A VM ingested into a new repository: (repository, VM directory).
fn ingested_vm(t: &Path, disks: &[(u64, Regions)]) -> (PathBuf, PathBuf) {
    let vm = make_vm(t, "web01", disks);
    let repo = init_repo(t);
    ingest(&repo, &vm, None);
    (repo, vm)
}

fn one_disk() -> Vec<(u64, Regions)> {
    vec![(8 << 20, vec![(0, 1 << 20, 1), (5 << 20, 256 << 10, 2)])]
}

fn is_link(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

fn is_regular(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
}

/// Every name under `dir` (relative, sorted), links not followed.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if e.file_type().unwrap().is_dir() {
                walk(base, &e.path(), out);
            }
            out.push(rel);
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn a_link_planted_at_a_partial_file_name_is_never_followed() {
    let t = tempfile::tempdir().unwrap();
    let (repo, vm) = ingested_vm(t.path(), &one_disk());
    let d = t.path().join("d");
    fs::create_dir(&d).unwrap();
    let victim = t.path().join("victim");
    fs::write(&victim, "victim\n").unwrap();
    let victim2 = t.path().join("victim2");
    fs::write(&victim2, "victim2\n").unwrap();
    // The reproduction from the issue, plus a link at the flat disk's partial name, a dangling
    // one at the descriptor's, and a stale regular partial file a killed run left behind.
    symlink("../victim", d.join(".web01.vmx.vmrepo-partial")).unwrap();
    symlink(&victim2, d.join(".web01-flat.vmdk.vmrepo-partial")).unwrap();
    symlink(
        "../created-by-extract",
        d.join(".web01.vmdk.vmrepo-partial"),
    )
    .unwrap();
    fs::write(
        d.join(".web01.nvram.vmrepo-partial"),
        "stale bytes of a killed run",
    )
    .unwrap();

    vmrepo([s("extract"), p(&repo), s("web01"), p(&d)]).ok();

    assert_eq!(fs::read_to_string(&victim).unwrap(), "victim\n");
    assert_eq!(fs::read_to_string(&victim2).unwrap(), "victim2\n");
    assert!(!t.path().join("created-by-extract").exists());
    for f in [
        "web01.vmx",
        "web01.vmdk",
        "web01-flat.vmdk",
        "web01.nvram",
        "vmware.log",
    ] {
        assert!(is_regular(&d.join(f)), "{f} is not a regular file");
        assert!(same_file(&vm.join(f), &d.join(f)), "{f} differs");
    }
    let left: Vec<String> = tree(&d)
        .into_iter()
        .filter(|n| n.contains("vmrepo-partial"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

#[test]
fn a_link_at_a_final_name_is_refused_without_force_and_replaced_itself_with_force() {
    let t = tempfile::tempdir().unwrap();
    let (repo, vm) = ingested_vm(t.path(), &one_disk());
    let victim = t.path().join("victim");
    fs::write(&victim, "victim\n").unwrap();

    // Without --force: a link to a file, and a dangling link, are both existing names.
    for (target, tag) in [("../victim", "live"), ("../nowhere", "dangling")] {
        let d = t.path().join(format!("d-{tag}"));
        fs::create_dir(&d).unwrap();
        symlink(target, d.join("web01.vmx")).unwrap();
        let r = vmrepo([s("extract"), p(&repo), s("web01"), p(&d)]);
        assert_eq!(r.code, 1, "{tag}: {}", r.stdout);
        assert!(
            r.stderr
                .contains(&d.join("web01.vmx").display().to_string())
                && r.stderr.contains("symbolic link")
                && r.stderr.contains("--force"),
            "{tag}: the error names the file, says it is a link and what to do: {}",
            r.stderr
        );
        assert!(is_link(&d.join("web01.vmx")), "{tag}: the link was touched");
        assert_eq!(tree(&d), ["web01.vmx"], "{tag}: something was written");
        assert!(!t.path().join("nowhere").exists());
    }
    assert_eq!(fs::read_to_string(&victim).unwrap(), "victim\n");

    // With --force: each link is replaced by the restored file, never followed; a hostile
    // destination has links at the partial names too.
    let d = t.path().join("d-force");
    fs::create_dir(&d).unwrap();
    symlink("../victim", d.join("web01.vmx")).unwrap();
    symlink("../nowhere", d.join("web01-flat.vmdk")).unwrap();
    symlink("../victim", d.join(".web01.vmx.vmrepo-partial")).unwrap();
    symlink("../victim", d.join(".web01-flat.vmdk.vmrepo-partial")).unwrap();
    vmrepo([s("extract"), p(&repo), s("web01"), p(&d), s("--force")]).ok();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "victim\n");
    assert!(!t.path().join("nowhere").exists());
    for f in ["web01.vmx", "web01-flat.vmdk"] {
        assert!(is_regular(&d.join(f)), "{f} is still a link");
        assert!(same_file(&vm.join(f), &d.join(f)), "{f} differs");
    }
    assert!(!tree(&d).iter().any(|n| n.contains("vmrepo-partial")));
}

#[test]
fn a_symlinked_subdirectory_in_the_destination_is_refused_and_nothing_is_written_outside() {
    let t = tempfile::tempdir().unwrap();
    // The second disk lives in a subdirectory of the VM folder: restored as disks/...
    let vm = make_vm(
        t.path(),
        "web01",
        &[
            (4 << 20, vec![(0, 512 << 10, 1)]),
            (4 << 20, vec![(1 << 20, 512 << 10, 2)]),
        ],
    );
    fs::create_dir(vm.join("disks")).unwrap();
    for f in ["web01_1.vmdk", "web01_1-flat.vmdk"] {
        fs::rename(vm.join(f), vm.join("disks").join(f)).unwrap();
    }
    let vmx = fs::read_to_string(vm.join("web01.vmx"))
        .unwrap()
        .replace("\"web01_1.vmdk\"", "\"disks/web01_1.vmdk\"");
    fs::write(vm.join("web01.vmx"), vmx).unwrap();
    let repo = init_repo(t.path());
    ingest(&repo, &vm, None);

    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    for force in [false, true] {
        let d = t.path().join(format!("d-{force}"));
        fs::create_dir(&d).unwrap();
        symlink("../outside", d.join("disks")).unwrap();
        let mut args = vec![s("extract"), p(&repo), s("web01"), p(&d)];
        if force {
            args.push(s("--force"));
        }
        let r = vmrepo(args);
        assert_eq!(r.code, 1, "force {force}: {}", r.stdout);
        assert!(
            r.stderr.contains(&d.join("disks").display().to_string())
                && r.stderr.contains("symbolic link"),
            "force {force}: {}",
            r.stderr
        );
        assert!(
            tree(&outside).is_empty(),
            "force {force}: written outside the destination: {:?}",
            tree(&outside)
        );
        assert_eq!(tree(&d), ["disks"], "force {force}: files left behind");
        assert!(is_link(&d.join("disks")));
    }
    // Where the subdirectory is a real one, everything comes back.
    let d = t.path().join("d-ok");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&d)]).ok();
    assert!(same_file(
        &vm.join("disks/web01_1-flat.vmdk"),
        &d.join("disks/web01_1-flat.vmdk")
    ));
}

/// A VM whose two disks have the same file name on two datastores: `ds1/web01/web01.vmdk`
/// (next to the .vmx) and `ds2/web01/web01.vmdk`, both named by absolute paths as ESXi writes
/// them. Returns (VM directory, second disk's directory).
fn two_datastore_vm(t: &Path) -> (PathBuf, PathBuf) {
    let ds1 = t.join("ds1/web01");
    let ds2 = t.join("ds2/web01");
    fs::create_dir_all(&ds1).unwrap();
    fs::create_dir_all(&ds2).unwrap();
    let disks: [(&Path, u64, Regions); 2] = [
        (
            &ds1,
            8 << 20,
            vec![(0, 1 << 20, 1), (5 << 20, 256 << 10, 2)],
        ),
        (
            &ds2,
            12 << 20,
            vec![(1 << 20, 1 << 20, 3), ((12 << 20) - 4096, 4096, 4)],
        ),
    ];
    for (dir, size, regions) in &disks {
        sparse_image(&dir.join("web01-flat.vmdk"), *size, regions);
        fs::write(
            dir.join("web01.vmdk"),
            vmfs_descriptor("web01-flat.vmdk", *size),
        )
        .unwrap();
    }
    let vmx = format!(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\n\
         displayName = \"web01\"\nguestOS = \"debian12-64\"\nnvram = \"web01.nvram\"\n\
         scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n\
         scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"{}\"\n\
         scsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"{}\"\n",
        ds1.join("web01.vmdk").display(),
        ds2.join("web01.vmdk").display()
    );
    fs::write(ds1.join("web01.vmx"), vmx).unwrap();
    fs::write(ds1.join("web01.nvram"), bytes(8192, 9)).unwrap();
    (ds1, ds2)
}

/// Ingests the two-datastore VM (the second datastore made readable with an identity
/// `--datastore-map`).
fn ingest_two_datastores(t: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (vm, ds2) = two_datastore_vm(t);
    let repo = init_repo(t);
    let map = format!("{0}={0}", t.join("ds2").display());
    let r = vmrepo([
        s("ingest"),
        p(&repo),
        p(&vm),
        s("--datastore-map"),
        s(&map),
        s("--json"),
    ])
    .ok()
    .json();
    assert_eq!(r["disks"], 2, "{r}");
    (repo, vm, ds2)
}

#[test]
fn two_disks_with_the_same_file_name_both_come_back_byte_for_byte() {
    let t = tempfile::tempdir().unwrap();
    let (repo, vm, ds2) = ingest_two_datastores(t.path());

    let out = t.path().join("out");
    let r = vmrepo([s("extract"), p(&repo), s("web01"), p(&out), s("--json")])
        .ok()
        .json();
    // The first disk keeps its name; the second goes under its datastore's name.
    assert!(same_file(
        &vm.join("web01-flat.vmdk"),
        &out.join("web01-flat.vmdk")
    ));
    assert!(same_file(&vm.join("web01.vmdk"), &out.join("web01.vmdk")));
    assert!(same_file(&vm.join("web01.vmx"), &out.join("web01.vmx")));
    assert!(same_file(
        &ds2.join("web01-flat.vmdk"),
        &out.join("ds2/web01-flat.vmdk")
    ));
    let moved = r["moved_disks"].as_array().expect("moved_disks listed");
    assert_eq!(moved.len(), 1, "{r}");
    assert_eq!(moved[0]["slot"], "scsi0:1");
    assert_eq!(moved[0]["restored_as"], "ds2/web01.vmdk");
    // Its descriptor (not stored: ingest kept the first disk's under the shared name) is
    // written afresh; it opens, and names the right extent.
    let desc = fs::read_to_string(out.join("ds2/web01.vmdk")).unwrap();
    assert!(
        desc.contains(&format!(
            "RW {} VMFS \"web01-flat.vmdk\"",
            (12u64 << 20) / 512
        )),
        "{desc}"
    );
    assert!(qemu_identical(
        &ds2.join("web01.vmdk"),
        &out.join("ds2/web01.vmdk")
    ));
    assert!(qemu_identical(
        &vm.join("web01.vmdk"),
        &out.join("web01.vmdk")
    ));
    assert!(!tree(&out).iter().any(|n| n.contains("vmrepo-partial")));

    // Converted by a writer, too.
    let q = t.path().join("qcow2");
    vmrepo([
        s("extract"),
        p(&repo),
        s("web01"),
        p(&q),
        s("--disk-format"),
        s("qcow2"),
    ])
    .ok();
    assert!(qemu_identical(
        &vm.join("web01.vmdk"),
        &q.join("web01.qcow2")
    ));
    assert!(qemu_identical(
        &ds2.join("web01.vmdk"),
        &q.join("ds2/web01.qcow2")
    ));

    // A failed extract (a damaged chunk) leaves nothing: not the directory it created, not a
    // partial file.
    let damaged = t.path().join("damaged");
    live::damage_one_chunk(&repo);
    let r = vmrepo([s("extract"), p(&repo), s("web01"), p(&damaged)]);
    assert_ne!(r.code, 0, "the damaged chunk was not noticed");
    assert!(
        !damaged.exists(),
        "a failed extract left {:?}",
        tree(&damaged)
    );
    // Into an existing directory: it is left as it was.
    let existing = t.path().join("existing");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("mine.txt"), "mine").unwrap();
    let r = vmrepo([s("extract"), p(&repo), s("web01"), p(&existing)]);
    assert_ne!(r.code, 0);
    assert_eq!(tree(&existing), ["mine.txt"]);
}

#[test]
fn the_mount_shows_both_same_named_disks_under_the_names_extract_gives() {
    let t = tempfile::tempdir().unwrap();
    let (repo, _vm, ds2) = ingest_two_datastores(t.path());
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    let m = live::mount(t.path(), &repo, Some("web01"));
    let gen = m.mp.join("web01/latest");
    // Beside what extract writes, the mount has `files/`: the files inside the disks (none
    // readable here: the disks hold no filesystem).
    let shown: Vec<String> = tree(&gen).into_iter().filter(|f| f != "files").collect();
    assert_eq!(shown, tree(&out), "mount and extract differ");
    assert!(
        shown.contains(&"ds2/web01-flat.vmdk".to_string()),
        "{shown:?}"
    );
    for f in &shown {
        if !gen.join(f).is_dir() {
            assert!(same_file(&gen.join(f), &out.join(f)), "{f} differs");
        }
    }
    assert!(same_file(
        &ds2.join("web01-flat.vmdk"),
        &gen.join("ds2/web01-flat.vmdk")
    ));
    let ended = m.signal(libc::SIGINT);
    assert_eq!(ended.code, 0, "{}", ended.stderr);
}

/// `serve-nbd` names the exports as extract names the files: the second disk's export is
/// `ds2/web01.vmdk` (both were `web01.vmdk`), and each serves its own disk's bytes.
#[test]
fn serve_nbd_names_same_named_disks_apart() {
    let t = tempfile::tempdir().unwrap();
    let (repo, vm, ds2) = ingest_two_datastores(t.path());
    for (disk, name, flat) in [
        ("0", "web01.vmdk", vm.join("web01-flat.vmdk")),
        ("1", "ds2/web01.vmdk", ds2.join("web01-flat.vmdk")),
    ] {
        let srv = live::serve_nbd(t.path(), &repo, "web01", &["--disk", disk]);
        let r = sh(&format!(
            "qemu-img info --output=json '{}/{name}'",
            srv.uri()
        ));
        assert_eq!(r.code, 0, "disk {disk} not served as {name}: {}", r.stderr);
        let r = sh(&format!(
            "qemu-img compare -f raw -F raw '{}/{name}' '{}'",
            srv.uri(),
            flat.display()
        ));
        assert!(
            r.stdout.contains("Images are identical"),
            "disk {disk}: {}{}",
            r.stdout,
            r.stderr
        );
    }
    // Asking for a disk that is not there lists both under their names.
    let r = vmrepo([s("serve-nbd"), p(&repo), s("web01"), s("--disk"), s("2")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("0: web01.vmdk, 1: ds2/web01.vmdk"),
        "{}",
        r.stderr
    );
}

#[test]
fn key_export_never_writes_through_a_link_or_over_a_file() {
    let t = tempfile::tempdir().unwrap();
    let run = |args: &[std::ffi::OsString]| {
        let out = Command::new(BIN)
            .env("VMREPO_PASSWORD", "pass phrase")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let repo = t.path().join("repo");
    let (code, err) = run(&[
        s("init"),
        p(&repo),
        s("--encryption"),
        s("aes-256-gcm"),
        s("--kdf-memory"),
        s("8"),
    ]);
    assert_eq!(code, 0, "{err}");
    let victim = t.path().join("victim");
    fs::write(&victim, "victim\n").unwrap();
    let link = t.path().join("master.key");
    symlink(&victim, &link).unwrap();
    let dangling = t.path().join("dangling.key");
    symlink(t.path().join("nowhere"), &dangling).unwrap();
    for l in [&link, &dangling] {
        let (code, err) = run(&[s("key"), s("export"), p(&repo), s("--output"), p(l)]);
        assert_eq!(code, 1);
        assert!(
            err.contains(&l.display().to_string()) && err.contains("symbolic link"),
            "the error names the file and the reason: {err}"
        );
        assert!(is_link(l));
    }
    assert_eq!(fs::read_to_string(&victim).unwrap(), "victim\n");
    assert!(!t.path().join("nowhere").exists());
    // An existing file is not overwritten either.
    let (code, err) = run(&[s("key"), s("export"), p(&repo), s("--output"), p(&victim)]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "victim\n");
    // A new name works: mode 0600, nothing else left.
    let key = t.path().join("new.key");
    let (code, err) = run(&[s("key"), s("export"), p(&repo), s("--output"), p(&key)]);
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(fs::read_to_string(&key).unwrap().contains("master_key"));
    assert!(!tree(t.path()).iter().any(|n| n.contains("vmrepo-partial")));
}

/// Restored files, a mount point and an exported key are never placed inside the repository
/// directory, whether it is named directly, through `..` past a directory not made yet, or
/// through a link that leads there: a restored file could be taken for one of the repository's
/// own (or replace it, with --force), and a key there would sit beside the data it opens. The
/// refusal names the place and the repository, nothing is written, and the repository still
/// checks clean; a destination beside the repository works.
#[test]
fn nothing_is_restored_mounted_or_exported_inside_the_repository() {
    let t = tempfile::tempdir().unwrap();
    let (repo, vm) = ingested_vm(t.path(), &one_disk());
    let before = tree(&repo);
    let link = t.path().join("looks-elsewhere");
    symlink(repo.join("data"), &link).unwrap();
    let places = [
        repo.clone(),
        repo.join("data"),
        repo.join("new/sub"),
        link.join("x"),
        t.path().join("not-yet/../repo/restored"),
    ];
    for place in &places {
        let shown = place.display().to_string();
        let runs = [
            vec![s("extract"), p(&repo), s("web01"), p(place)],
            vec![s("extract"), p(&repo), s("web01"), p(place), s("--force")],
            vec![
                s("restore-file"),
                p(&repo),
                s("web01"),
                s("disk0:/"),
                p(place),
            ],
            vec![s("mount"), p(&repo), p(place)],
            vec![s("key"), s("export"), p(&repo), s("--output"), p(place)],
        ];
        for args in runs {
            let r = vmrepo(&args);
            assert_eq!(r.code, 1, "{args:?} {}{}", r.stdout, r.stderr);
            assert!(
                r.stderr
                    .contains(&format!("{shown} is inside the repository"))
                    && r.stderr.contains(&repo.display().to_string()),
                "{args:?}: {}",
                r.stderr
            );
        }
    }
    assert!(!t.path().join("not-yet").exists());
    assert_eq!(
        tree(&repo),
        before,
        "something was written into the repository"
    );
    let c = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);

    let out = t.path().join("restored");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    assert!(same_file(
        &vm.join("web01-flat.vmdk"),
        &out.join("web01-flat.vmdk")
    ));
}
