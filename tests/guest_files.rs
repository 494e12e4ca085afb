//! Single files out of a generation without root, FUSE or a VM: `vmrepo ls` and `vmrepo cat` on
//! disks partitioned by the real tools (sgdisk for GPT, sfdisk for MBR with logical partitions)
//! holding filesystems made by the real tools (`mkfs.ext4 -d`, `mkfs.vfat`, `mkfs.xfs -p`, ntfs-3g,
//! and an exFAT volume written by mkfs.exfat and exfat-fuse, kept as a fixture), ingested raw, as
//! qcow2 and as VMDK; the filesystems' own tools (debugfs, xfs_db, ntfscat) read the same images. Every file the tree holds is compared with what `cat` gives, every directory with
//! what `ls` lists.

mod common;
#[path = "common/live.rs"]
mod live;
use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn run(cmd: &str) {
    let r = sh(cmd);
    assert_eq!(r.code, 0, "{cmd}\n{}{}", r.stdout, r.stderr);
}

/// A repository holding generation `web` of the GPT disk of [`gpt_disk`] made from
/// [`guest_tree`]: the work directory, the tree and the repository.
fn web_generation() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    guest_tree(&tree);
    let repo = init_repo(t.path());
    let gpt = gpt_disk(t.path(), &tree);
    ingest(&repo, &gpt, Some("web"));
    (t, tree, repo)
}

/// `n` bytes from /dev/urandom: incompressible, so stored verbatim.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b
}

/// What `vmrepo cat REPO GEN ADDRESS` writes, as bytes; it must succeed.
fn cat_bytes(repo: &Path, gen: &str, address: &str) -> Vec<u8> {
    let out = std::process::Command::new(BIN)
        .arg("cat")
        .arg(repo)
        .arg(gen)
        .arg(address)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cat {address}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `COMMAND | READER` in bash: COMMAND's exit status (`status N` on stdout) and its stderr.
fn with_reader(command: &str, reader: &str) -> Run {
    Run::from(
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{command} | {reader} >/dev/null; echo \"status ${{PIPESTATUS[0]}}\""
            ))
            .output()
            .unwrap(),
    )
}

/// A tree for the guest filesystem: nested directories, a setuid binary, a file of random bytes
/// larger than a segment, an empty file, a symlink, a name with spaces and non-ASCII letters.
fn guest_tree(dir: &Path) {
    fs::create_dir_all(dir.join("etc/nginx/sites")).unwrap();
    fs::create_dir_all(dir.join("home/anna/Documents")).unwrap();
    fs::write(
        dir.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )
    .unwrap();
    fs::write(
        dir.join("etc/nginx/nginx.conf"),
        "worker_processes auto;\n".repeat(400),
    )
    .unwrap();
    fs::write(
        dir.join("etc/nginx/sites/default"),
        "server { listen 80; }\n",
    )
    .unwrap();
    // Incompressible, so that it is stored verbatim (see the damage test).
    fs::write(
        dir.join("home/anna/Documents/big.bin"),
        random_bytes(5 << 20),
    )
    .unwrap();
    fs::write(dir.join("home/anna/Documents/Résumé 2026.txt"), "Ünïcödé\n").unwrap();
    fs::write(dir.join("home/anna/empty"), "").unwrap();
    fs::write(dir.join("home/anna/tool"), bytes(10_000, 8)).unwrap();
    fs::set_permissions(
        dir.join("home/anna/tool"),
        fs::Permissions::from_mode(0o4750),
    )
    .unwrap();
    std::os::unix::fs::symlink("../../etc/hosts", dir.join("home/anna/hosts-link")).unwrap();
    // A directory of many small files (a listing larger than a pipe holds).
    fs::create_dir_all(dir.join("usr/share/many")).unwrap();
    for i in 0..1200 {
        fs::write(dir.join(format!("usr/share/many/file-{i:04}")), "x").unwrap();
    }
    // 4 MiB with data only at its end: a hole for restore-file to keep.
    let sparse = fs::File::create(dir.join("home/anna/sparse.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (4 << 20) - 3).unwrap();
    // Owned by someone else (mkfs.ext4 -d keeps owners), where this test may set owners.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::lchown(dir.join("home/anna"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(dir.join("home/anna/hosts-link"), Some(1234), Some(5678))
            .unwrap();
    }
}

/// `got` holds what `want` holds: names, kinds, contents, symlink targets, modes, modification
/// times and (as root) owners.
fn same_tree(got: &Path, want: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(got), names(want), "{}", got.display());
    for name in names(want) {
        let (g, w) = (got.join(&name), want.join(&name));
        let (gm, wm) = (
            fs::symlink_metadata(&g).unwrap(),
            fs::symlink_metadata(&w).unwrap(),
        );
        assert_eq!(gm.mode(), wm.mode(), "{}", g.display());
        assert_eq!(gm.mtime(), wm.mtime(), "{}", g.display());
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(
                (gm.uid(), gm.gid()),
                (wm.uid(), wm.gid()),
                "{}",
                g.display()
            );
        }
        if wm.is_dir() {
            same_tree(&g, &w);
        } else if wm.file_type().is_symlink() {
            assert_eq!(fs::read_link(&g).unwrap(), fs::read_link(&w).unwrap());
        } else {
            assert!(
                fs::read(&g).unwrap() == fs::read(&w).unwrap(),
                "{} differs",
                g.display()
            );
        }
    }
}

/// Writes `part` (a filesystem image) into `disk` at sector `start`.
fn place(part: &Path, disk: &Path, start: u64) {
    run(&format!(
        "dd if={} of={} bs=512 seek={start} conv=notrunc status=none",
        part.display(),
        disk.display()
    ));
}

/// A 160 MiB GPT disk: p1 an EFI system partition (FAT), p2 an ext4 root holding `tree`.
fn gpt_disk(work: &Path, tree: &Path) -> PathBuf {
    let disk = work.join("gpt.img");
    run(&format!("truncate -s 160M {}", disk.display()));
    run(&format!(
        "sgdisk -n 1:2048:+16M -t 1:EF00 -c 1:EFI -n 2:0:+96M -t 2:8300 -c 2:root {} >/dev/null",
        disk.display()
    ));
    let efi = work.join("efi.img");
    run(&format!("mkfs.vfat -C {} 16384 >/dev/null", efi.display()));
    // The EFI partition's files, put there by mtools.
    let loader = work.join("grubx64.efi");
    fs::write(&loader, bytes(300_000, 5)).unwrap();
    run(&format!(
        "mmd -i {0} ::/EFI ::/EFI/debian && mcopy -i {0} {1} ::/EFI/debian/ && \
         mcopy -i {0} {1} '::/EFI/A long name.efi'",
        efi.display(),
        loader.display()
    ));
    place(&efi, &disk, 2048);
    let root = work.join("root.img");
    run(&format!(
        "mkfs.ext4 -q -L guestroot -d {} {} 96M",
        tree.display(),
        root.display()
    ));
    place(&root, &disk, 2048 + 16 * 2048);
    disk
}

/// A 64 MiB MBR disk: p1 primary (ext4, holding `tree`), p2 extended holding logical p5 (empty)
/// and p6 (ext2, one file).
fn mbr_disk(work: &Path, tree: &Path) -> PathBuf {
    let disk = work.join("mbr.img");
    run(&format!("truncate -s 64M {}", disk.display()));
    run(&format!(
        "printf 'start=2048, size=40960, type=83\\nstart=43008, type=5\\nstart=45056, \
         size=8192, type=83\\nstart=55296, size=8192, type=83\\n' | sfdisk -q {}",
        disk.display()
    ));
    let p1 = work.join("p1.img");
    run(&format!(
        "mkfs.ext4 -q -d {} {} 20M",
        tree.display(),
        p1.display()
    ));
    place(&p1, &disk, 2048);
    let small = work.join("small");
    fs::create_dir_all(&small).unwrap();
    fs::write(small.join("note.txt"), "on a logical partition\n").unwrap();
    let p6 = work.join("p6.img");
    run(&format!(
        "mkfs.ext2 -q -d {} {} 4M",
        small.display(),
        p6.display()
    ));
    place(&p6, &disk, 55296);
    disk
}

/// Every directory `ls` lists as the tree holds it (names, kinds, sizes, modes), and every
/// file `cat` gives byte for byte.
fn compare_tree(repo: &Path, gen: &str, volume: &str, tree: &Path, rel: &str) {
    let dir = tree.join(rel.trim_start_matches('/'));
    let listed = vmrepo([
        s("ls"),
        p(repo),
        s(gen),
        s(&format!("{volume}:{rel}")),
        s("--json"),
    ])
    .ok()
    .json();
    let mut names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .filter(|n| n != "lost+found")
        .collect();
    let mut want: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "{volume}:{rel}");
    for e in listed.as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "lost+found" {
            continue;
        }
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path).unwrap();
        let guest = format!("{}/{name}", rel.trim_end_matches('/'));
        assert_eq!(
            e["mode"].as_u64().unwrap() as u32,
            meta.mode() & 0o7777,
            "{guest}"
        );
        match e["kind"].as_str().unwrap() {
            "dir" => compare_tree(repo, gen, volume, tree, &guest),
            "symlink" => assert_eq!(
                e["target"].as_str().unwrap(),
                fs::read_link(&path).unwrap().to_str().unwrap()
            ),
            // The 1200 one-byte files are compared by size (a process per file costs more
            // than the rest of the test).
            "file" if guest.contains("/many/") => {
                assert_eq!(e["size"].as_u64().unwrap(), meta.len(), "{guest}")
            }
            "file" => {
                assert_eq!(e["size"].as_u64().unwrap(), meta.len(), "{guest}");
                let got = cat_bytes(repo, gen, &format!("{volume}:{guest}"));
                assert!(got == fs::read(&path).unwrap(), "{guest} differs");
            }
            other => panic!("{guest}: unexpected kind {other}"),
        }
    }
}

#[test]
fn files_inside_gpt_and_mbr_disks_list_and_read_back_exactly() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    let tree = work.join("tree");
    guest_tree(&tree);
    let repo = init_repo(work);
    let gpt = gpt_disk(work, &tree);
    let mbr = mbr_disk(work, &tree);
    // The GPT disk also as qcow2: the same files come out of either format.
    let qcow = work.join("gpt.qcow2");
    run(&format!(
        "qemu-img convert -f raw -O qcow2 {} {}",
        gpt.display(),
        qcow.display()
    ));
    // And as a VMDK (monolithic sparse, as VMware Workstation and exports write it).
    let vmdk = work.join("gpt.vmdk");
    run(&format!(
        "qemu-img convert -f raw -O vmdk {} {}",
        gpt.display(),
        vmdk.display()
    ));
    ingest(&repo, &gpt, Some("gpt"));
    ingest(&repo, &qcow, Some("qcow"));
    ingest(&repo, &vmdk, Some("vmdk"));
    ingest(&repo, &mbr, Some("mbr"));

    let vols = vmrepo([s("ls"), p(&repo), s("gpt"), s("--json")])
        .ok()
        .json();
    let summary: Vec<(String, String, Option<String>)> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["content"].as_str().unwrap().to_string(),
                v["label"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("disk0/p1".into(), "fat".into(), None),
            (
                "disk0/p2".into(),
                "ext2/3/4".into(),
                Some("guestroot".into())
            )
        ]
    );
    // The EFI system partition (FAT, filled by mtools), names found whatever their case.
    let want = fs::read(work.join("grubx64.efi")).unwrap();
    for path in [
        "disk0/p1:/EFI/debian/grubx64.efi",
        "disk0/p1:/efi/A LONG NAME.EFI",
    ] {
        let got = cat_bytes(&repo, "gpt", path);
        assert!(got == want, "{path} differs");
    }
    let text = vmrepo([s("ls"), p(&repo), s("mbr")]).ok().stdout.clone();
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, ["disk0/p1", "disk0/p5", "disk0/p6"], "{text}");
    assert!(text.contains("MBR 0x83"), "{text}");

    for gen in ["gpt", "qcow", "vmdk"] {
        compare_tree(&repo, gen, "disk0/p2", &tree, "/");
    }
    // e2fsprogs' own reader agrees on the partition image: the same bytes, size and mode.
    let root = work.join("root.img");
    for path in ["/etc/nginx/nginx.conf", "/home/anna/tool"] {
        let want = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(&root)
            .output()
            .unwrap();
        assert!(want.status.success(), "debugfs cat {path}");
        assert!(
            cat_bytes(&repo, "vmdk", &format!("disk0/p2:{path}")) == want.stdout,
            "{path} differs from what debugfs reads"
        );
    }
    let stat = sh(&format!(
        "debugfs -R 'stat /home/anna/tool' {}",
        root.display()
    ));
    assert!(
        stat.stdout.contains("Mode:  04750") && stat.stdout.contains("Size: 10000"),
        "{}",
        stat.stdout
    );
    compare_tree(&repo, "mbr", "disk0/p1", &tree, "/");
    let note = vmrepo([s("cat"), p(&repo), s("mbr"), s("disk0/p6:/note.txt")])
        .ok()
        .stdout
        .clone();
    assert_eq!(note, "on a logical partition\n");

    // ls -r lists every path below WHERE.
    let all = vmrepo([
        s("ls"),
        p(&repo),
        s("gpt"),
        s("disk0/p2:/"),
        s("-r"),
        s("--json"),
    ])
    .ok()
    .json();
    let mut listed: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .filter(|n| !n.starts_with("lost+found"))
        .collect();
    listed.sort();
    let mut want: Vec<String> = sh(&format!("cd {} && find . -mindepth 1", tree.display()))
        .stdout
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect();
    want.sort();
    assert_eq!(listed, want);

    // A symlink is shown by ls and followed by cat; a path without its leading slash works.
    let r = vmrepo([
        s("ls"),
        p(&repo),
        s("gpt"),
        s("disk0/p2:home/anna/hosts-link"),
    ]);
    assert!(
        r.ok().stdout.contains("hosts-link -> ../../etc/hosts"),
        "{}",
        r.stdout
    );
    let r = vmrepo([
        s("cat"),
        p(&repo),
        s("gpt"),
        s("disk0/p2:/home/anna/hosts-link"),
    ]);
    assert_eq!(
        r.ok().stdout,
        fs::read_to_string(tree.join("etc/hosts")).unwrap()
    );
}

#[test]
fn wrong_addresses_and_unreadable_volumes_get_errors_that_say_what_to_do() {
    let (t, tree, repo) = web_generation();
    let work = t.path();
    let fail = |args: &[&str], want: &str| {
        let mut all = vec![s(args[0]), p(&repo)];
        all.extend(args[1..].iter().map(|a| s(a)));
        let r = vmrepo(all);
        assert_eq!(r.code, 1, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    };
    fail(
        &["ls", "web", "disk0/p7"],
        "has no volume disk0/p7 (its volumes: disk0/p1, disk0/p2)",
    );
    fail(
        &["ls", "web", "disk0/p2:/nope"],
        "disk0/p2:/nope: no such file or directory",
    );
    fail(
        &["cat", "web", "disk0/p2:/etc"],
        "disk0/p2:/etc is a directory",
    );
    fail(&["cat", "web", "disk0/p2:/etc/hosts/x"], "not a directory");
    fail(
        &["ls", "web", "disk0/p1:/nope"],
        "disk0/p1:/nope: no such file or directory",
    );
    fail(&["ls", "nosuchvm"], "nosuchvm");
    // A volume holding nothing known is refused by name.
    let mbr = mbr_disk(work, &tree);
    ingest(&repo, &mbr, Some("mbr"));
    let r = vmrepo([s("ls"), p(&repo), s("mbr"), s("disk0/p5:/")]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("volume disk0/p5 holds no filesystem this build recognises"),
        "{}",
        r.stderr
    );

    // The reader closing the pipe early stops cat quietly, as SIGPIPE stops a shell tool.
    let r = with_reader(
        &format!(
            "{BIN} cat {} web disk0/p2:/home/anna/Documents/big.bin",
            repo.display()
        ),
        "head -c 100",
    );
    assert!(r.stdout.contains("status 141"), "{}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("error"), "{}", r.stderr);
    let r = with_reader(
        &format!("{BIN} ls {} web disk0/p2:/ -r", repo.display()),
        "head -n 3",
    );
    assert!(r.stdout.contains("status 141"), "{}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("error"), "{}", r.stderr);
}

/// A damaged guest filesystem (its metadata overwritten with noise) gives errors, never a
/// panic or a hang; the other volumes stay readable.
#[test]
fn a_hostile_guest_filesystem_gives_errors_not_panics() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    let tree = work.join("tree");
    guest_tree(&tree);
    let repo = init_repo(work);
    let disk = mbr_disk(work, &tree);
    // p1's block group descriptors and inode table start at its block 1: noise over 2 MiB of
    // it, from byte 2048 of the partition on.
    let noise = bytes(2 << 20, 99);
    let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &noise, 2048 * 512 + 4096).unwrap();
    ingest(&repo, &disk, Some("bad"));
    let listed = vmrepo([s("ls"), p(&repo), s("bad")]);
    assert_ne!(listed.code, 101, "panicked: {}", listed.stderr);
    for args in [
        ["ls", "disk0/p1:/"],
        ["ls", "disk0/p1:/etc/nginx"],
        ["cat", "disk0/p1:/etc/hosts"],
        ["cat", "disk0/p1:/home/anna/Documents/big.bin"],
    ] {
        let r = std::process::Command::new("timeout")
            .args([s("60"), s(BIN), s(args[0]), p(&repo), s("bad"), s(args[1])])
            .output()
            .unwrap();
        let code = r.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "{args:?} exited {code}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let r = vmrepo([s("cat"), p(&repo), s("bad"), s("disk0/p6:/note.txt")]);
    assert_eq!(r.ok().stdout, "on a logical partition\n");
}

/// Flips a bit of the stored copy of byte `2 MiB + 10` of the tree's big.bin: it is random,
/// so stored verbatim, and a piece of its middle is found in a pack file.
fn damage_big_bin(repo: &Path, tree: &Path) {
    let big = fs::read(tree.join("home/anna/Documents/big.bin")).unwrap();
    let needle = &big[(2 << 20)..(2 << 20) + 64];
    let (pack, at) = packs(repo)
        .into_iter()
        .find_map(|pack| {
            let data = fs::read(&pack).unwrap();
            let at = data.windows(needle.len()).position(|w| w == needle)?;
            Some((pack, at as u64))
        })
        .expect("a stored piece of big.bin");
    flip_bit(&pack, at + 10, 3);
}

/// A damaged chunk under one file: `cat` of that file fails naming it and pointing to `check`,
/// other files of the volume still read back exactly.
#[test]
fn a_damaged_chunk_names_the_file_and_the_rest_stays_readable() {
    let (t, tree, repo) = web_generation();
    let work = t.path();
    damage_big_bin(&repo, &tree);
    let r = vmrepo([
        s("cat"),
        p(&repo),
        s("web"),
        s("disk0/p2:/home/anna/Documents/big.bin"),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("disk0/p2:/home/anna/Documents/big.bin")
            && r.stderr.contains("vmrepo check --read-data"),
        "{}",
        r.stderr
    );
    // It says which bytes are damaged: a range around the flipped bit, not the whole file.
    let flipped = (2u64 << 20) + 10;
    let listed = r
        .stderr
        .split("damaged in ")
        .nth(1)
        .and_then(|l| l.split("bytes ").nth(1))
        .and_then(|l| l.split(" (").next())
        .unwrap_or_else(|| panic!("no damaged ranges in: {}", r.stderr));
    let ranges: Vec<(u64, u64)> = listed
        .split(", ")
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse::<u64>().unwrap() + 1)
        })
        .collect();
    assert!(
        ranges.iter().any(|&(a, b)| a <= flipped && flipped < b),
        "{ranges:?}"
    );
    let total: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert!(total <= 1 << 20, "{ranges:?} of a 5 MiB file");
    let r = vmrepo([
        s("cat"),
        p(&repo),
        s("web"),
        s("disk0/p2:/etc/nginx/nginx.conf"),
    ]);
    assert_eq!(
        r.ok().stdout,
        fs::read_to_string(tree.join("etc/nginx/nginx.conf")).unwrap()
    );
    // restore-file names the file it could not restore, restores the rest, and exits 1.
    let out = work.join("out");
    let r = vmrepo([
        s("restore-file"),
        p(&repo),
        s("web"),
        s("disk0/p2:/home"),
        p(&out),
    ]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("NOT RESTORED web@")
            && r.stdout.contains("disk0/p2:/home/anna/Documents/big.bin"),
        "{}",
        r.stdout
    );
    assert!(!out.join("home/anna/Documents/big.bin").exists());
    let json = vmrepo([
        s("restore-file"),
        p(&repo),
        s("web"),
        s("disk0/p2:/home/anna/Documents"),
        p(&work.join("out-json")),
        s("--json"),
    ]);
    assert_eq!(json.code, 1, "{}", json.stderr);
    let damaged = &json.json()["damaged"];
    assert!(
        damaged[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("disk0/p2:/home/anna/Documents/big.bin"),
        "{damaged}"
    );
    let json_ranges: Vec<(u64, u64)> = damaged[0]["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(json_ranges, ranges);
    assert!(same_file(
        &out.join("home/anna/tool"),
        &tree.join("home/anna/tool")
    ));
    let leftovers = sh(&format!("find {} -name '*.vmrepo-partial'", out.display()));
    assert_eq!(leftovers.stdout, "");
}

/// restore-file copies files and trees out with modes, times, symlinks, holes and (as root)
/// owners; refuses existing files without --force; never writes through a link planted in the
/// destination.
#[test]
fn restore_file_copies_trees_exactly_and_only_into_the_destination() {
    let (t, tree, repo) = web_generation();
    let work = t.path();
    let restore = |what: &str, dest: &Path, force: bool| {
        let mut args = vec![s("restore-file"), p(&repo), s("web"), s(what), p(dest)];
        if force {
            args.push(s("--force"));
        }
        vmrepo(args)
    };

    // A tree, then the whole volume.
    let out = work.join("out");
    let r = restore("disk0/p2:/home/anna", &out, false);
    r.ok();
    assert!(r.stdout.contains("restored 5 file(s)"), "{}", r.stdout);
    same_tree(&out.join("anna"), &tree.join("home/anna"));
    let sparse = out.join("anna/sparse.img");
    assert!(allocated(&sparse) < 1 << 20, "the hole was written");
    let all = work.join("all");
    restore("disk0/p2:/", &all, false).ok();
    fs::remove_dir_all(all.join("lost+found")).ok();
    same_tree(&all, &tree);
    // One file.
    let one = work.join("one");
    restore("disk0/p2:/etc/nginx/nginx.conf", &one, false).ok();
    assert!(same_file(
        &one.join("nginx.conf"),
        &tree.join("etc/nginx/nginx.conf")
    ));

    // Existing files are refused and left alone, replaced with --force.
    fs::write(out.join("anna/empty"), "mine").unwrap();
    let r = restore("disk0/p2:/home/anna", &out, false);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("pass --force"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(out.join("anna/empty")).unwrap(), "mine");
    restore("disk0/p2:/home/anna", &out, true).ok();
    same_tree(&out.join("anna"), &tree.join("home/anna"));

    // A link planted where a directory of the tree goes is refused, never followed.
    let planted = work.join("planted");
    let outside = work.join("outside");
    fs::create_dir_all(&planted).unwrap();
    fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, planted.join("anna")).unwrap();
    let r = restore("disk0/p2:/home/anna", &planted, true);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    // No partial file is left anywhere.
    let leftovers = sh(&format!("find {} -name '*.vmrepo-partial'", work.display()));
    assert_eq!(leftovers.stdout, "");
}

/// diff names what changed between two nights inside the guest, and log follows one file
/// through every night: added, changed (content, mode), removed.
#[test]
fn diff_and_log_follow_files_through_the_nights() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    let tree = work.join("tree");
    guest_tree(&tree);
    let repo = init_repo(work);
    let night = |n: u32| {
        let dir = work.join(format!("night{n}"));
        fs::create_dir_all(&dir).unwrap();
        let disk = gpt_disk(&dir, &tree);
        ingest_at(&repo, &disk, "web", &format!("2026-12-0{n}T01:00:00Z"));
    };
    night(1);
    // Night 2: hosts edited, a file and a directory tree added, a symlink removed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(tree.join("etc/hosts"), "127.0.0.1 localhost\n10.0.0.7 db\n").unwrap();
    fs::write(tree.join("etc/new.conf"), "x = 1\n").unwrap();
    fs::create_dir_all(tree.join("srv/www")).unwrap();
    fs::write(tree.join("srv/www/index.html"), "<p>hi</p>\n").unwrap();
    fs::remove_file(tree.join("home/anna/hosts-link")).unwrap();
    night(2);
    // Night 3: a mode changed, a file removed.
    fs::set_permissions(
        tree.join("home/anna/tool"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::remove_file(tree.join("etc/nginx/nginx.conf")).unwrap();
    night(3);

    let d = vmrepo([s("diff"), p(&repo), s("web@-2"), s("web@-1"), s("disk0/p2")]);
    let lines: Vec<&str> = d.ok().stdout.lines().collect();
    // Without WHERE every readable volume is compared: the root's changes are among them.
    let all = vmrepo([s("diff"), p(&repo), s("web@-2"), s("web@-1")]);
    for l in &lines {
        assert!(
            all.ok().stdout.lines().any(|a| a == *l),
            "{l}: {}",
            all.stdout
        );
    }
    assert_eq!(
        lines,
        [
            "M disk0/p2:/etc/hosts  (size 34 -> 32, mtime)",
            "+ disk0/p2:/etc/new.conf  (file, 6 bytes)",
            "- disk0/p2:/home/anna/hosts-link  (symlink, 15 bytes)",
            "+ disk0/p2:/srv  (directory, 2 entries)",
        ],
        "{}",
        d.stdout
    );
    let d = vmrepo([
        s("diff"),
        p(&repo),
        s("web@-1"),
        s("web"),
        s("disk0/p2:/home"),
    ]);
    assert_eq!(
        d.ok().stdout.trim(),
        "M disk0/p2:/home/anna/tool  (mode 4750 -> 755)"
    );

    let log = |file: &str| {
        let j = vmrepo([s("log"), p(&repo), s("web"), s(file), s("--json")])
            .ok()
            .json();
        j.as_array()
            .unwrap()
            .iter()
            .map(|v| {
                format!(
                    "{} {}",
                    v["generation"].as_str().unwrap(),
                    v["what"].as_str().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        log("disk0/p2:/etc/hosts"),
        [
            "web@2026-12-01T01:00:00Z added",
            "web@2026-12-02T01:00:00Z changed"
        ]
    );
    assert_eq!(
        log("disk0/p2:/etc/nginx/nginx.conf"),
        [
            "web@2026-12-01T01:00:00Z added",
            "web@2026-12-03T01:00:00Z removed"
        ]
    );
    assert_eq!(
        log("disk0/p2:/srv/www/index.html"),
        ["web@2026-12-02T01:00:00Z added"]
    );
    let r = vmrepo([s("log"), p(&repo), s("web"), s("disk0/p2:/nowhere")]);
    assert!(
        r.ok().stdout.contains("is in no generation of web"),
        "{}",
        r.stdout
    );

    // Night 4 backs up the same disk again: every volume is stored as the same segments, so
    // diff knows nothing changed without walking either tree, and says so.
    ingest_at(
        &repo,
        &work.join("night3/gpt.img"),
        "web",
        "2026-12-04T01:00:00Z",
    );
    let d = vmrepo([s("diff"), p(&repo), s("web@-1"), s("web")]);
    assert_eq!(d.ok().stdout, "");
    for v in ["disk0/p1", "disk0/p2"] {
        assert!(
            d.stderr
                .contains(&format!("{v}: the same stored data in both generations")),
            "{}",
            d.stderr
        );
    }
    // Night 3 against night 2 walks the root (it changed) and reports its change.
    let d = vmrepo([s("diff"), p(&repo), s("web@-3"), s("web@-2")]);
    assert!(
        !d.ok().stderr.contains("disk0/p2: the same"),
        "{}",
        d.stderr
    );
}

/// An NTFS volume (made by mkntfs, filled through ntfs-3g) on an MBR disk: `ls`, `cat` (with
/// Windows' case-insensitive names) and `restore-file` give what ntfscat reads from the same
/// image, and NTFS's own metadata files are not listed.
#[test]
fn files_on_an_ntfs_volume_read_back_as_ntfscat_reads_them() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    let part = work.join("ntfs.img");
    run(&format!(
        "truncate -s 48M {0} && mkntfs -q -F -f -L WINDATA {0} 2>/dev/null",
        part.display()
    ));
    let mnt = work.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    run(&format!("ntfs-3g {} {}", part.display(), mnt.display()));
    let filled = (|| -> std::io::Result<()> {
        fs::create_dir_all(mnt.join("Users/Anna/Documents"))?;
        fs::write(
            mnt.join("Users/Anna/Documents/Report 2026.txt"),
            "quarterly\r\n",
        )?;
        fs::write(mnt.join("Users/Anna/big.bin"), random_bytes(3 << 20))?;
        fs::create_dir_all(mnt.join("Windows/System32/drivers/etc"))?;
        fs::write(
            mnt.join("Windows/System32/drivers/etc/hosts"),
            "127.0.0.1 localhost\r\n",
        )
    })();
    run(&format!("umount {}", mnt.display()));
    filled.unwrap();
    let disk = work.join("win.img");
    run(&format!("truncate -s 64M {}", disk.display()));
    run(&format!(
        "printf 'start=2048, size=98304, type=7\\n' | sfdisk -q {}",
        disk.display()
    ));
    place(&part, &disk, 2048);
    let repo = init_repo(work);
    ingest(&repo, &disk, Some("win"));

    let vols = vmrepo([s("ls"), p(&repo), s("win")]).ok().stdout.clone();
    assert!(
        vols.contains("disk0/p1") && vols.contains("ntfs") && vols.contains("\"WINDATA\""),
        "{vols}"
    );
    let root = vmrepo([s("ls"), p(&repo), s("win"), s("disk0/p1:/"), s("--json")])
        .ok()
        .json();
    let names: Vec<&str> = root
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Users", "Windows"]);
    for (path, asked) in [
        (
            "/Users/Anna/Documents/Report 2026.txt",
            "/users/anna/documents/REPORT 2026.TXT",
        ),
        ("/Users/Anna/big.bin", "/Users/Anna/big.bin"),
        (
            "/Windows/System32/drivers/etc/hosts",
            "/windows/system32/drivers/etc/hosts",
        ),
    ] {
        let want = std::process::Command::new("ntfscat")
            .arg(&part)
            .arg(path)
            .output()
            .unwrap();
        assert!(want.status.success(), "ntfscat {path}");
        let got = cat_bytes(&repo, "win", &format!("disk0/p1:{asked}"));
        assert!(got == want.stdout, "{path} differs from what ntfscat reads");
    }
    let out = work.join("out");
    vmrepo([
        s("restore-file"),
        p(&repo),
        s("win"),
        s("disk0/p1:/Users"),
        p(&out),
    ])
    .ok();
    let want = std::process::Command::new("ntfscat")
        .arg(&part)
        .arg("/Users/Anna/big.bin")
        .output()
        .unwrap();
    assert!(fs::read(out.join("Users/Anna/big.bin")).unwrap() == want.stdout);
    let r = vmrepo([
        s("cat"),
        p(&repo),
        s("win"),
        s("disk0/p1:/Users/nobody.txt"),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no such file or directory"),
        "{}",
        r.stderr
    );
}

/// Logical volumes of an LVM2 physical volume on an MBR partition. The PV's first 8 KiB
/// (label and metadata area) were written by lvm itself (pvcreate, vgcreate, then vgcfgrestore
/// of metadata with two linear LVs: root in two segments, extents 0-2 and 6-7, home in extents
/// 3-5, 4 MiB each, data from 1 MiB on), kept in tests/fixtures/lvm2-pv-head.bin; the LVs'
/// filesystems are made here and written where those extents lie.
#[test]
fn files_on_lvm2_logical_volumes_read_back_exactly() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    let tree = work.join("tree");
    guest_tree(&tree);
    // 9 MiB more, so that root's files fill its second segment too.
    fs::write(
        tree.join("home/anna/Documents/more.bin"),
        random_bytes(9 << 20),
    )
    .unwrap();
    let small = work.join("small");
    fs::create_dir_all(small.join("anna")).unwrap();
    fs::write(small.join("anna/notes.txt"), "on the home LV\n").unwrap();
    let disk = work.join("lvm.img");
    run(&format!("truncate -s 80M {}", disk.display()));
    run(&format!(
        "printf 'start=2048, size=131072, type=8e\\n' | sfdisk -q {}",
        disk.display()
    ));
    let pv = 2048 * 512u64;
    let head =
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lvm2-pv-head.bin"))
            .unwrap();
    let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &head, pv).unwrap();
    let (root, home) = (work.join("root.img"), work.join("home.img"));
    run(&format!(
        "mkfs.ext4 -q -L lvroot -d {} {} 20M",
        tree.display(),
        root.display()
    ));
    run(&format!(
        "mkfs.ext4 -q -d {} {} 12M",
        small.display(),
        home.display()
    ));
    let (root, home) = (fs::read(&root).unwrap(), fs::read(&home).unwrap());
    let mib = 1u64 << 20;
    // The second segment of root holds filesystem data, so reading root crosses the seam.
    assert!(root[12 << 20..].iter().any(|&b| b != 0));
    let data = pv + mib;
    std::os::unix::fs::FileExt::write_all_at(&f, &root[..12 << 20], data).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &root[12 << 20..], data + 24 * mib).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &home, data + 12 * mib).unwrap();
    drop(f);
    let repo = init_repo(work);
    ingest(&repo, &disk, Some("lvm"));

    let vols = vmrepo([s("ls"), p(&repo), s("lvm"), s("--json")])
        .ok()
        .json();
    let summary: Vec<(String, String, u64)> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["content"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("disk0/p1".into(), "lvm2 physical volume".into(), 64 * mib),
            ("disk0/lvm/vgtest/home".into(), "ext2/3/4".into(), 12 * mib),
            ("disk0/lvm/vgtest/root".into(), "ext2/3/4".into(), 20 * mib),
        ]
    );
    // Root spans both of its segments: every file compares, big.bin crosses the seam or not.
    compare_tree(&repo, "lvm", "disk0/lvm/vgtest/root", &tree, "/");
    let r = vmrepo([
        s("cat"),
        p(&repo),
        s("lvm"),
        s("disk0/lvm/vgtest/home:/anna/notes.txt"),
    ]);
    assert_eq!(r.ok().stdout, "on the home LV\n");
}

/// restore-file into a filesystem that fills up: it stops with an error naming the file and the
/// reason, and leaves no partial file behind.
#[test]
fn restore_file_on_a_full_disk_fails_cleanly() {
    let (t, _tree, repo) = web_generation();
    let work = t.path();
    // A real small filesystem when we may mount one; otherwise a file-size limit (EFBIG).
    let small = work.join("small");
    fs::create_dir(&small).unwrap();
    let tmpfs = sh(&format!(
        "mount -t tmpfs -o size=2m tmpfs '{}'",
        small.display()
    ))
    .code
        == 0;
    let dest = small.join("out");
    let r = if tmpfs {
        vmrepo([
            s("restore-file"),
            p(&repo),
            s("web"),
            s("disk0/p2:/home/anna"),
            p(&dest),
        ])
    } else {
        sh(&format!(
            "trap '' XFSZ; ulimit -f 2000; exec '{BIN}' restore-file '{}' web disk0/p2:/home/anna '{}'",
            repo.display(),
            dest.display()
        ))
    };
    let leftovers = sh(&format!(
        "find {} -name '*.vmrepo-partial'",
        small.display()
    ));
    if tmpfs {
        sh(&format!("umount '{}'", small.display()));
    }
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        (r.stderr.contains("No space left on device") || r.stderr.contains("File too large"))
            && r.stderr.contains("big.bin"),
        "{}",
        r.stderr
    );
    assert_eq!(leftovers.stdout, "");
}

/// An XFS image of `tree` made by `mkfs.xfs -p` (the prototype file lists every entry with its
/// mode, owner and source), `size` long, with `options` (e.g. `-m crc=0 -n ftype=0` for a v4
/// filesystem). Small sizes are allowed by the variables xfsprogs' own test suite sets.
fn xfs_image(tree: &Path, image: &Path, size: &str, options: &str) {
    fn entries(dir: &Path, depth: usize, out: &mut String) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let m = fs::symlink_metadata(&path).unwrap();
            let pad = " ".repeat(depth);
            let special = |bit: u32, c: char| if m.mode() & bit != 0 { c } else { '-' };
            let perm = format!(
                "{}{}{:03o} {} {}",
                special(0o4000, 'u'),
                special(0o2000, 'g'),
                m.mode() & 0o777,
                m.uid(),
                m.gid()
            );
            if m.is_dir() {
                out.push_str(&format!("{pad}{name} d{perm}\n"));
                entries(&path, depth + 1, out);
                out.push_str(&format!("{pad}$\n"));
            } else if m.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.push_str(&format!("{pad}{name} l{perm} {}\n", target.display()));
            } else {
                out.push_str(&format!("{pad}{name} -{perm} {}\n", path.display()));
            }
        }
    }
    let mut proto = String::from("vmrepo-test\n0 0\nd--755 0 0\n");
    entries(tree, 1, &mut proto);
    proto.push_str("$\n");
    let proto_file = image.with_extension("proto");
    fs::write(&proto_file, proto).unwrap();
    run(&format!(
        "rm -f {0} && truncate -s {size} {0} && TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 \
         mkfs.xfs -q -f {options} -p {1} {0}",
        image.display(),
        proto_file.display()
    ));
}

#[test]
fn files_on_xfs_volumes_read_back_exactly_in_every_directory_form() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    guest_tree(&tree);
    // The prototype file cannot name a file with a space; everything else stays.
    fs::remove_file(tree.join("home/anna/Documents/Résumé 2026.txt")).unwrap();
    fs::write(
        tree.join("home/anna/Documents/Résumé-2026.txt"),
        "Ünïcödé\n",
    )
    .unwrap();
    // A directory of 4000 entries: its blocks interleave with its files' data, so its extents
    // overflow the inode into a B+tree (checked with xfs_db below).
    fs::create_dir_all(tree.join("var/many")).unwrap();
    for i in 0..4000 {
        fs::write(tree.join(format!("var/many/f-{i:04}")), "y").unwrap();
    }
    let repo = init_repo(t.path());
    // v5 (the default: CRCs, file types in directories) on a GPT partition, and v4 without
    // file types as a whole disk.
    let v5 = t.path().join("v5.xfs");
    xfs_image(&tree, &v5, "64M", "-L xfsroot");
    let disk = t.path().join("xfs-gpt.img");
    run(&format!("truncate -s 72M {}", disk.display()));
    run(&format!(
        "sgdisk -n 1:2048:+64M -t 1:8300 {} >/dev/null",
        disk.display()
    ));
    place(&v5, &disk, 2048);
    // A target too long to sit in the inode: kept in a block of its own. Only on v4, where
    // that block is the bare target; xfsprogs 6.1 writes such a block on v5 without the header
    // v5 requires (its own xfs_repair reports "bad symlink header").
    let long = format!("/{}", "very-long-directory-name/".repeat(30));
    let long_link = tree.join("home/long-link");
    std::os::unix::fs::symlink(&long, &long_link).unwrap();
    let v4 = t.path().join("v4.xfs");
    xfs_image(&tree, &v4, "64M", "-m crc=0 -n ftype=0");
    ingest(&repo, &disk, Some("v5"));
    let qcow = t.path().join("v4.qcow2");
    run(&format!(
        "qemu-img convert -f raw -O qcow2 {} {}",
        v4.display(),
        qcow.display()
    ));
    ingest(&repo, &qcow, Some("v4"));

    let vols = vmrepo([s("ls"), p(&repo), s("v5"), s("--json")])
        .ok()
        .json();
    assert_eq!(vols[0]["name"], "disk0/p1");
    assert_eq!(vols[0]["content"], "xfs");
    assert_eq!(vols[0]["label"], "xfsroot");
    for (gen, volume) in [("v4", "disk0"), ("v5", "disk0/p1")] {
        if gen == "v5" {
            fs::remove_file(&long_link).unwrap();
        }
        compare_tree(&repo, gen, volume, &tree, "/");
        // The directory of 1200 entries spans several directory blocks (leaf or node form):
        // every name is there.
        let many = vmrepo([
            s("ls"),
            p(&repo),
            s(gen),
            s(&format!("{volume}:/usr/share/many")),
            s("--json"),
        ])
        .ok()
        .json();
        assert_eq!(many.as_array().unwrap().len(), 1200, "{gen}");
        // Paths through symlinks resolve as the kernel would.
        assert_eq!(
            cat_bytes(&repo, gen, &format!("{volume}:/home/anna/hosts-link")),
            fs::read(tree.join("etc/hosts")).unwrap()
        );
    }
    for image in [&v4, &v5] {
        let db = sh(&format!(
            "xfs_db -r -c 'path /var/many' -c 'print core.format' {}",
            image.display()
        ));
        assert!(db.stdout.contains("(btree)"), "{}", db.stdout);
    }
    // The filesystem's own tool reads the same inode for a file the test asks for.
    let db = sh(&format!(
        "xfs_db -r -c 'path /home/anna/tool' -c 'print core.size core.mode' {}",
        v4.display()
    ));
    assert!(db.stdout.contains("core.size = 10000"), "{}", db.stdout);
    let missing = vmrepo([
        s("cat"),
        p(&repo),
        s("v4"),
        s("disk0:/home/anna/no-such-file"),
    ]);
    assert_ne!(missing.code, 0);
    assert!(
        missing
            .stderr
            .contains("disk0:/home/anna/no-such-file: no such file or directory"),
        "{}",
        missing.stderr
    );
}

/// The contents `scripts/make-exfat-fixture.sh` wrote to `a.bin` (lower case) or `b.bin`.
fn interleaved(first: u8) -> Vec<u8> {
    (0..40u8).flat_map(|i| vec![first + i % 26; 4096]).collect()
}

#[test]
fn files_on_an_exfat_volume_read_back_as_written() {
    let t = tempfile::tempdir().unwrap();
    let work = t.path();
    // The volume made by mkfs.exfat and filled through the exfat-fuse driver (see
    // scripts/make-exfat-fixture.sh), in an MBR partition of type 7.
    let volume = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/exfat.img");
    let disk = work.join("card.img");
    run(&format!("truncate -s 8M {}", disk.display()));
    run(&format!(
        "printf 'start=2048, size=8192, type=7\\n' | sfdisk -q {}",
        disk.display()
    ));
    place(&volume, &disk, 2048);
    let repo = init_repo(work);
    ingest(&repo, &disk, Some("card"));

    let vols = vmrepo([s("ls"), p(&repo), s("card"), s("--json")])
        .ok()
        .json();
    assert_eq!(vols[0]["name"], "disk0/p1");
    assert_eq!(vols[0]["content"], "exfat");
    assert_eq!(vols[0]["label"], "CAMERA");
    let tree = vmrepo([
        s("ls"),
        p(&repo),
        s("card"),
        s("disk0/p1:/"),
        s("-r"),
        s("--json"),
    ])
    .ok()
    .json();
    let paths: Vec<&str> = tree
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 5 + 4 + 1 + 120, "{paths:?}");
    let numbers: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    let cat = |path: &str| cat_bytes(&repo, "card", &format!("disk0/p1:{path}"));
    assert_eq!(cat("/Docs/hello.txt"), b"hello from exFAT\n");
    // Names are found without regard to case, as Windows finds them.
    assert_eq!(cat("/docs/SUB/Numbers.TXT"), numbers.as_bytes());
    assert_eq!(
        cat("/Docs/A rather long file name – ünïcödé.txt"),
        "ünïcödé\n".as_bytes()
    );
    // Clusters interleaved with another file's: read through the FAT chain.
    assert_eq!(cat("/a.bin"), interleaved(b'a'));
    assert_eq!(cat("/b.bin"), interleaved(b'A'));
    assert!(cat("/empty").is_empty());
    for i in [1, 57, 120] {
        assert_eq!(
            cat(&format!("/DCIM/100CAMERA/IMG_{i:04}.JPG")),
            format!("photo {i}\n").as_bytes()
        );
    }
    // Times carry the volume's UTC offset: the fixture was written on 2026-12-04.
    let hello = vmrepo([
        s("ls"),
        p(&repo),
        s("card"),
        s("disk0/p1:/Docs/hello.txt"),
        s("--json"),
    ])
    .ok()
    .json();
    let mtime = hello[0]["mtime"].as_i64().unwrap();
    assert!(
        (1_796_342_400..1_796_428_800).contains(&mtime),
        "mtime {mtime} is not on 2026-12-04"
    );
    // A whole directory restored: every photo, as a file of the same bytes.
    let out = work.join("restored");
    vmrepo([
        s("restore-file"),
        p(&repo),
        s("card"),
        s("disk0/p1:/DCIM"),
        p(&out),
    ])
    .ok();
    let photos = out.join("DCIM/100CAMERA");
    assert_eq!(fs::read_dir(&photos).unwrap().count(), 120);
    assert_eq!(
        fs::read(photos.join("IMG_0033.JPG")).unwrap(),
        b"photo 33\n"
    );
}

/// Every file of `want` reads back through the mount under `got` byte for byte, with its mode,
/// size, symlink target and (as root) owner.
fn same_through_mount(got: &Path, want: &Path) {
    for e in fs::read_dir(want).unwrap() {
        let e = e.unwrap();
        let (g, w) = (got.join(e.file_name()), e.path());
        let (gm, wm) = (
            fs::symlink_metadata(&g).unwrap(),
            fs::symlink_metadata(&w).unwrap(),
        );
        assert_eq!(gm.mode() & 0o777, wm.mode() & 0o555, "{}", g.display());
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(
                (gm.uid(), gm.gid()),
                (wm.uid(), wm.gid()),
                "{}",
                g.display()
            );
        }
        if wm.is_dir() {
            same_through_mount(&g, &w);
        } else if wm.file_type().is_symlink() {
            assert_eq!(fs::read_link(&g).unwrap(), fs::read_link(&w).unwrap());
        } else {
            assert_eq!(gm.len(), wm.len(), "{}", g.display());
            // The 1200 one-byte files by size only.
            if !g.to_string_lossy().contains("/many/") {
                assert!(same_file(&g, &w), "{} differs", g.display());
            }
        }
    }
}

#[test]
fn the_mount_shows_the_files_inside_each_generation() {
    let (t, tree, repo) = web_generation();
    let m = live::mount(t.path(), &repo, None);
    let gen = fs::read_link(m.mp.join("web/latest")).unwrap();
    let files = m.mp.join("web").join(gen).join("files");
    let names = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&files), ["disk0"]);
    assert_eq!(names(&files.join("disk0")), ["p1", "p2"]);
    let root = files.join("disk0/p2");
    same_through_mount(&root, &tree);
    // Reads at odd offsets and lengths across the reader's 1 MiB steps.
    let big = fs::read(tree.join("home/anna/Documents/big.bin")).unwrap();
    let f = fs::File::open(root.join("home/anna/Documents/big.bin")).unwrap();
    for (off, len) in [(0u64, 1usize), ((1 << 20) - 7, 20), (3_333_333, 70_000)] {
        let mut buf = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, off).unwrap();
        assert!(buf[..] == big[off as usize..off as usize + len], "at {off}");
    }
    drop(f);
    // The FAT partition beside it.
    assert_eq!(
        fs::read(files.join("disk0/p1/EFI/debian/grubx64.efi")).unwrap(),
        bytes(300_000, 5)
    );
    // Nothing can be written, and a missing name is ENOENT, not an I/O error.
    assert!(fs::write(root.join("etc/new"), "x").is_err());
    assert_eq!(
        fs::metadata(root.join("etc/no-such-file"))
            .unwrap_err()
            .kind(),
        std::io::ErrorKind::NotFound
    );
    let end = m.fusermount_u();
    assert_eq!(end.code, 0, "{}", end.stderr);

    // A damaged chunk under one guest file: reading that file fails with EIO (never zeros),
    // the files beside it still read.
    damage_big_bin(&repo, &tree);
    let m = live::mount(t.path(), &repo, None);
    let root = m.mp.join("web/latest/files/disk0/p2");
    let err = fs::read(root.join("home/anna/Documents/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(root.join("etc/hosts")).unwrap(),
        fs::read(tree.join("etc/hosts")).unwrap()
    );
    let end = m.fusermount_u();
    assert_eq!(end.code, 0, "{}", end.stderr);
    assert!(
        end.stderr.contains("big.bin") && end.stderr.contains("EIO"),
        "the failed read is reported: {}",
        end.stderr
    );
}
