//! `vmrepo mount` on a real FUSE mount: the tree, files identical to what extract writes (cmp,
//! qemu-img compare), a file read from inside an ext4 guest filesystem with debugfs, EIO (never
//! zeros) for damaged data, read-only, the shared lock held, and clean unmounts by
//! `fusermount3 -u` and by SIGINT.

mod common;
#[path = "common/live.rs"]
mod live;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use live::*;

/// Relative paths of every file under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            } else {
                out.push(
                    path.strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A VM directory (two vmfs disks) with two generations, plus a hand-written monolithicFlat
/// disk whose extent files have bytes before and after the extent data.
fn two_vms(t: &Path) -> (PathBuf, PathBuf, Vec<String>) {
    let vm = make_vm(
        t,
        "web01",
        &[
            (
                24 << 20,
                vec![
                    (0, 1 << 20, 1),
                    (8 << 20, 3 << 20, 2),
                    ((24 << 20) - 4096, 4096, 3),
                ],
            ),
            (8 << 20, vec![(1 << 20, 512 << 10, 4)]),
        ],
    );
    let repo = init_repo(t);
    let g1 = ingest(&repo, &vm, None)["generation"]
        .as_str()
        .unwrap()
        .to_string();
    // Generation times have one-second resolution.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    overwrite(&vm.join("web01-flat.vmdk"), 9 << 20, 64 << 10, 77);
    fs::write(vm.join("vmware.log"), "a new log\n".repeat(30)).unwrap();
    let g2 = ingest(&repo, &vm, None)["generation"]
        .as_str()
        .unwrap()
        .to_string();

    let c = t.join("custom");
    fs::create_dir_all(&c).unwrap();
    let mut a = vec![0x5au8; 4096];
    a.extend(bytes(2 << 20, 5));
    fs::write(c.join("a.bin"), &a).unwrap();
    let mut b = bytes(1 << 20, 6);
    b.extend(vec![0x77u8; 8192]);
    fs::write(c.join("b.bin"), &b).unwrap();
    fs::write(
        c.join("custom.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 4096 FLAT \"a.bin\" 8\nRW 2048 ZERO\nRW 2048 FLAT \"b.bin\" 0\n",
    )
    .unwrap();
    ingest(&repo, &c.join("custom.vmdk"), Some("custom"));
    (vm, repo, vec![g1, g2])
}

#[test]
fn the_mount_shows_each_generation_exactly_as_extract_writes_it() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo, gens) = two_vms(t.path());
    let time = |g: &str| g.split_once('@').unwrap().1.to_string();
    // What extract writes, for comparison.
    let mut extracted = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        let out = t.path().join(format!("out{i}"));
        vmrepo([s("extract"), p(&repo), s(g), p(&out)]).ok();
        extracted.push(out);
    }
    let custom_out = t.path().join("out-custom");
    vmrepo([s("extract"), p(&repo), s("custom"), p(&custom_out)]).ok();

    let m = mount(t.path(), &repo, None);
    let mp = m.mp.clone();
    assert_eq!(names(&mp), ["custom", "web01"]);
    // As root, the kernel's readahead for the mount is widened to 4 MiB, so sequential reads
    // come as 1 MiB requests.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(&mp).unwrap().dev();
        let bdi = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        wait_for("the mount's readahead to be widened", 10, || {
            fs::read_to_string(&bdi).is_ok_and(|v| v.trim() == "4096")
        });
    }
    let mut want = vec![time(&gens[0]), time(&gens[1]), "latest".to_string()];
    want.sort();
    assert_eq!(names(&mp.join("web01")), want);
    assert_eq!(
        fs::read_link(mp.join("web01/latest")).unwrap(),
        PathBuf::from(time(&gens[1]))
    );
    for (g, out) in gens.iter().zip(&extracted) {
        let dir = mp.join("web01").join(time(g));
        assert_eq!(files_under(&dir), files_under(out), "{g}: file list");
        for f in files_under(out) {
            assert!(same_file(&dir.join(&f), &out.join(&f)), "{g}: {f} differs");
        }
    }
    // The generations differ where the VM changed, and the latest matches the VM now.
    assert!(!same_file(
        &mp.join("web01")
            .join(time(&gens[0]))
            .join("web01-flat.vmdk"),
        &vm.join("web01-flat.vmdk")
    ));
    assert!(qemu_identical(
        &mp.join("web01/latest/web01.vmdk"),
        &vm.join("web01.vmdk")
    ));
    assert!(same_file(
        &mp.join("web01/latest/vmware.log"),
        &vm.join("vmware.log")
    ));
    // Extent files with bytes outside the extent (head and tail) and a ZERO extent.
    let custom = mp.join("custom/latest");
    assert_eq!(files_under(&custom), files_under(&custom_out));
    for f in ["a.bin", "b.bin", "custom.vmdk"] {
        assert!(
            same_file(&custom.join(f), &t.path().join("custom").join(f)),
            "{f}"
        );
    }
    // Reads at odd offsets across a segment boundary.
    let flat = fs::File::open(mp.join("web01/latest/web01-flat.vmdk")).unwrap();
    let orig = fs::File::open(vm.join("web01-flat.vmdk")).unwrap();
    for (off, len) in [(4u64 << 20) - 5, (9 << 20) - 3]
        .into_iter()
        .zip([10usize, 70_000])
    {
        let mut a = vec![0u8; len];
        let mut b = vec![0u8; len];
        flat.read_exact_at(&mut a, off).unwrap();
        orig.read_exact_at(&mut b, off).unwrap();
        assert_eq!(a, b, "read at {off}");
    }
    // SEEK_DATA / SEEK_HOLE find the data regions (1 MiB at 0, 3 MiB at 8 MiB, 4 KiB at the end).
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence: i32| -> i64 {
        // SAFETY: lseek on an open file descriptor.
        unsafe { libc::lseek(flat.as_raw_fd(), off as i64, whence) }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), 0);
    assert_eq!(seek(0, libc::SEEK_HOLE), 1 << 20);
    assert_eq!(seek(1 << 20, libc::SEEK_DATA), 8 << 20);
    assert_eq!(seek(8 << 20, libc::SEEK_HOLE), 11 << 20);
    assert_eq!(seek(12 << 20, libc::SEEK_DATA), (24 << 20) - 4096);
    assert_eq!(seek((24 << 20) - 4096, libc::SEEK_HOLE), 24 << 20);

    // Reads answered one after another from the same FUSE threads: odd offsets across a
    // head, the data, a zero region and a tail, each file's cached pages dropped first so the
    // mount answers again, after a read of other data that left its bytes in the buffers.
    let drop_cache = |f: &fs::File| {
        // SAFETY: fadvise on an open file descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    };
    let mut noise = vec![0u8; 1 << 20];
    let pairs = [
        (custom.join("a.bin"), t.path().join("custom/a.bin")),
        (custom.join("b.bin"), t.path().join("custom/b.bin")),
        (
            mp.join("web01/latest/web01-flat.vmdk"),
            vm.join("web01-flat.vmdk"),
        ),
    ];
    for (f, orig) in &pairs {
        let mounted = fs::File::open(f).unwrap();
        let orig = fs::read(orig).unwrap();
        let f = f.display();
        for k in 0..24u64 {
            drop_cache(&flat);
            flat.read_exact_at(&mut noise, 8 << 20).unwrap();
            drop_cache(&mounted);
            let off = (k * 92_821 + k * k * 704_099) % orig.len() as u64;
            let len = [1usize, 4095, 4097, 70_000, 300_000][k as usize % 5];
            let len = len.min(orig.len() - off as usize);
            let mut got = vec![0xeeu8; len];
            mounted.read_exact_at(&mut got, off).unwrap();
            assert!(
                got == orig[off as usize..off as usize + len],
                "{f}: {len} bytes at offset {off} differ from the file extract writes"
            );
        }
    }
    drop(flat);

    // Read-only.
    let e = fs::write(mp.join("web01/latest/new-file"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = fs::OpenOptions::new()
        .write(true)
        .open(mp.join("web01/latest/web01.vmx"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(fs::remove_file(mp.join("web01/latest/web01.vmx")).is_err());

    // The shared lock is held: a command that needs the repository alone must wait.
    let r = vmrepo([s("check"), p(&repo), s("--rebuild-index")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("in use by another vmrepo process"),
        "{}",
        r.stderr
    );

    let end = m.fusermount_u();
    assert_eq!(end.code, 0, "stderr:\n{}", end.stderr);
    assert!(end.stdout.contains("unmounted"), "{}", end.stdout);
    assert!(!is_mounted(&mp));
    // The lock went with it.
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
}

#[test]
fn a_file_inside_a_mounted_ext4_disk_is_read_with_debugfs_and_ctrl_c_unmounts() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("guest");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "web01.example.com\n").unwrap();
    let big = bytes(3 << 20, 42);
    fs::write(src.join("big.bin"), &big).unwrap();
    sh(&format!(
        "mkfs.ext4 -q -F -d '{}' '{}' 32M",
        src.display(),
        d.join("fs.img").display()
    ))
    .ok();
    let repo = init_repo(d);
    ingest(&repo, &d.join("fs.img"), Some("fsvm"));
    sparse_image(&d.join("other.img"), 1 << 20, &[(0, 4096, 1)]);
    ingest(&repo, &d.join("other.img"), Some("other"));

    // Only the VM asked for is shown.
    let m = mount(d, &repo, Some("fsvm"));
    assert_eq!(names(&m.mp), ["fsvm"]);
    let img = m.mp.join("fsvm/latest/fs.img");
    let r = sh(&format!(
        "debugfs -R 'cat /etc/hostname' '{}'",
        img.display()
    ))
    .ok()
    .stdout
    .clone();
    assert_eq!(r, "web01.example.com\n");
    let out = d.join("big.out");
    sh(&format!(
        "debugfs -R 'dump /big.bin {}' '{}'",
        out.display(),
        img.display()
    ))
    .ok();
    assert!(fs::read(&out).unwrap() == big, "big.bin differs");

    let mp = m.mp.clone();
    let end = m.signal(libc::SIGINT);
    assert_eq!(end.code, 0, "stderr:\n{}", end.stderr);
    assert!(end.stdout.contains("unmounted"), "{}", end.stdout);
    assert!(!is_mounted(&mp));
}

#[test]
fn damaged_data_reads_as_eio_never_as_zeros() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("img.raw");
    sparse_image(&img, 16 << 20, &[(0, 12 << 20, 9)]);
    let repo = init_repo(d);
    let g = ingest(&repo, &img, Some("img"))["generation"]
        .as_str()
        .unwrap()
        .to_string();
    damage_one_chunk(&repo);

    // One generation, named exactly.
    let m = mount(d, &repo, Some(&g));
    let time = g.split_once('@').unwrap().1;
    let file = fs::File::open(m.mp.join("img").join(time).join("img.raw")).unwrap();
    let orig = fs::read(&img).unwrap();
    const BLOCK: usize = 64 << 10;
    let mut failed = Vec::new();
    for (i, want) in orig.chunks(BLOCK).enumerate() {
        let mut got = vec![0u8; want.len()];
        match file.read_exact_at(&mut got, (i * BLOCK) as u64) {
            Ok(()) => assert!(got == want, "block {i} read back wrong data"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "block {i}: {e}");
                failed.push(i);
            }
        }
    }
    // One chunk (at most 64 KiB) is damaged: one or two 64 KiB blocks, a few more at most if
    // the kernel's readahead pages around it failed with it.
    assert!(
        !failed.is_empty(),
        "the damaged chunk was read without an error"
    );
    assert!(failed.len() <= 4, "too many blocks fail: {failed:?}");
    drop(file);
    let end = m.fusermount_u();
    assert_eq!(end.code, 0);
    assert!(
        end.stderr.contains("damaged repository data"),
        "the damage was not reported: {}",
        end.stderr
    );
}

/// A generation directory that could not be listed (its pack out of reach for a moment) lists
/// once the pack is back, without a remount, and its disk reads back whole.
#[test]
fn a_listing_that_failed_is_tried_again_on_the_next_use() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("img.raw");
    sparse_image(&img, 8 << 20, &[(0, 3 << 20, 4)]);
    let repo = init_repo(d);
    let g = ingest(&repo, &img, Some("img"))["generation"]
        .as_str()
        .unwrap()
        .to_string();
    let m = mount(d, &repo, None);
    let gen_dir = m.mp.join("img").join(g.split_once('@').unwrap().1);

    // The packs (the manifest's among them) are out of reach: the listing fails, with EIO.
    fs::rename(repo.join("data"), repo.join("data.away")).unwrap();
    let err = fs::read_dir(&gen_dir).and_then(|it| it.collect::<std::io::Result<Vec<_>>>());
    fs::rename(repo.join("data.away"), repo.join("data")).unwrap();
    assert_eq!(
        err.expect_err("listed with the packs away").raw_os_error(),
        Some(libc::EIO)
    );

    // Back in reach: the same directory lists, and the disk reads back as ingested.
    assert_eq!(names(&gen_dir), vec!["files", "img.raw"]);
    assert!(fs::read(gen_dir.join("img.raw")).unwrap() == fs::read(&img).unwrap());
    let end = m.fusermount_u();
    assert_eq!(end.code, 0);
    assert!(
        end.stderr.contains("cannot list generation"),
        "the failed listing was not reported: {}",
        end.stderr
    );
}
