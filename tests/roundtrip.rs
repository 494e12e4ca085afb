//! Ingest then extract, on real VM directories and qemu-img made VMDKs: what comes back must be
//! byte-identical (`cmp`) and identical to qemu-img.

mod common;
use common::*;
use std::fs;

#[test]
fn vm_directory_round_trip_is_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(
        t.path(),
        "web01",
        &[
            (
                200 << 20,
                vec![
                    (0, 3 << 20, 1),
                    (50 << 20, 5 << 20, 2),
                    ((200 << 20) - 4096, 4096, 3),
                ],
            ),
            (40 << 20, vec![(1 << 20, 1 << 20, 4)]),
        ],
    );
    let repo = init_repo(t.path());
    let summary = ingest(&repo, &vm, None);
    assert!(summary["generation"]
        .as_str()
        .unwrap()
        .starts_with("web01@"));
    assert_eq!(summary["disks"], 2);
    // .vmx, .vmxf, .vmsd, .nvram, two logs, two descriptors.
    assert_eq!(summary["files"], 8);

    let out = t.path().join("restore");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    for name in [
        "web01.vmx",
        "web01.vmxf",
        "web01.vmsd",
        "web01.nvram",
        "vmware.log",
        "vmware-1.log",
        "web01.vmdk",
        "web01-flat.vmdk",
        "web01_1.vmdk",
        "web01_1-flat.vmdk",
    ] {
        assert!(
            same_file(&vm.join(name), &out.join(name)),
            "{name} differs after restore"
        );
    }
    assert!(qemu_identical(
        &vm.join("web01.vmdk"),
        &out.join("web01.vmdk")
    ));
    // Restored disks are sparse: 200 MiB virtual, ~8 MiB of data.
    assert!(allocated(&out.join("web01-flat.vmdk")) < 20 << 20);
    // No temporary files are left behind.
    let leftovers: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("vmrepo-partial"))
        .collect();
    assert!(leftovers.is_empty());
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn qemu_made_flat_vmdks_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // monolithicFlat and twoGbMaxExtentFlat (3 extent files) written by qemu-img/qemu-io.
    sh(&format!(
        "cd {} && qemu-img create -q -f vmdk -o subformat=monolithicFlat mf.vmdk 64M && \
         qemu-io -c 'write -P 0xab 1M 64k' -c 'write -P 0xcd 40M 3M' mf.vmdk && \
         qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentFlat tg.vmdk 5G && \
         qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 2047M 2M' -c 'write -P 0x33 4G 1M' tg.vmdk",
        d.display()
    ))
    .ok();
    let repo = init_repo(d);
    for (file, vm) in [("mf.vmdk", "mf"), ("tg.vmdk", "tg")] {
        let summary = ingest(&repo, &d.join(file), Some(vm));
        assert_eq!(summary["disks"], 1);
        let out = d.join(format!("out-{vm}"));
        vmrepo([s("extract"), p(&repo), s(vm), p(&out)]).ok();
        assert!(
            qemu_identical(&d.join(file), &out.join(file)),
            "{file}: qemu-img compare differs"
        );
    }
    // twoGbMaxExtentFlat: every extent file back byte for byte, and only ~4 MiB was read.
    for f in ["tg-f001.vmdk", "tg-f002.vmdk", "tg-f003.vmdk", "tg.vmdk"] {
        assert!(
            same_file(&d.join(f), &d.join("out-tg").join(f)),
            "{f} differs"
        );
    }
    let gens = vmrepo([s("list"), p(&repo), s("tg"), s("--json")])
        .ok()
        .json();
    assert!(
        gens[0]["bytes_read"].as_u64().unwrap() < 16 << 20,
        "holes were read: {gens}"
    );
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn zero_extents_and_offsets_in_descriptors() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // A hand-written descriptor: FLAT with a file offset (a header before the data), a ZERO
    // extent, and a FLAT extent whose file is longer than the extent.
    let mut head = vec![0x5au8; 4096];
    head.extend(bytes(2 << 20, 5));
    fs::write(d.join("a.bin"), &head).unwrap();
    let mut b = bytes(1 << 20, 6);
    b.extend(vec![0x77u8; 8192]); // trailing bytes outside the extent
    fs::write(d.join("b.bin"), &b).unwrap();
    fs::write(
        d.join("custom.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 4096 FLAT \"a.bin\" 8\nRW 2048 ZERO\nRW 2048 FLAT \"b.bin\" 0\n",
    )
    .unwrap();
    let repo = init_repo(d);
    let summary = ingest(&repo, &d.join("custom.vmdk"), Some("custom"));
    assert_eq!(
        summary["stats"]["virtual_bytes"],
        (4096 + 2048 + 2048) * 512
    );
    let out = d.join("out");
    vmrepo([s("extract"), p(&repo), s("custom"), p(&out)]).ok();
    for f in ["custom.vmdk", "a.bin", "b.bin"] {
        assert!(same_file(&d.join(f), &out.join(f)), "{f} differs");
    }
}

#[test]
fn generations_are_selected_by_offset_and_time() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("db.img");
    sparse_image(&img, 8 << 20, &[(0, 1 << 20, 1)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("db01"));
    overwrite(&img, 0, 4096, 2);
    ingest(&repo, &img, Some("db01"));
    let gens = generations(&repo, "db01");
    assert_eq!(gens.len(), 2);
    assert!(gens[0] < gens[1], "generation names sort by time: {gens:?}");
    let first = t.path().join("first");
    vmrepo([s("extract"), p(&repo), s("db01@-1"), p(&first)]).ok();
    let by_time = t.path().join("by-time");
    vmrepo([s("extract"), p(&repo), s(&gens[0]), p(&by_time)]).ok();
    assert!(same_file(&first.join("db.img"), &by_time.join("db.img")));
    assert!(!same_file(&first.join("db.img"), &img));
    let latest = t.path().join("latest");
    vmrepo([s("extract"), p(&repo), s("db01"), p(&latest)]).ok();
    assert!(same_file(&latest.join("db.img"), &img));

    let r = vmrepo([s("extract"), p(&repo), s("db01@-5"), p(&t.path().join("x"))]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("has no generation \"-5\""),
        "{}",
        r.stderr
    );
    let r = vmrepo([s("extract"), p(&repo), s("nosuch"), p(&t.path().join("x"))]);
    assert!(r.stderr.contains("no VM named \"nosuch\""), "{}", r.stderr);
}

#[test]
fn extract_refuses_to_overwrite_unless_forced_and_disk_only_skips_small_files() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "app", &[(16 << 20, vec![(0, 1 << 20, 1)])]);
    let repo = init_repo(t.path());
    ingest(&repo, &vm, None);
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("app.vmx"), "precious").unwrap();
    let r = vmrepo([s("extract"), p(&repo), s("app"), p(&out)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("app.vmx already exists; pass --force"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read_to_string(out.join("app.vmx")).unwrap(), "precious");
    assert!(
        !out.join("app-flat.vmdk").exists(),
        "nothing may be written when refusing"
    );
    vmrepo([s("extract"), p(&repo), s("app"), p(&out), s("--force")]).ok();
    assert!(same_file(&vm.join("app.vmx"), &out.join("app.vmx")));

    let disks = t.path().join("disks");
    vmrepo([
        s("extract"),
        p(&repo),
        s("app"),
        p(&disks),
        s("--disk-only"),
    ])
    .ok();
    assert!(same_file(
        &vm.join("app-flat.vmdk"),
        &disks.join("app-flat.vmdk")
    ));
    assert!(disks.join("app.vmdk").exists());
    assert!(!disks.join("app.vmx").exists() && !disks.join("vmware.log").exists());
}

#[test]
fn help_explains_every_command() {
    let top = vmrepo(["--help"]);
    top.ok();
    for cmd in ["init", "ingest", "list", "extract", "check"] {
        assert!(top.stdout.contains(cmd), "top-level help lacks {cmd}");
        let h = vmrepo([cmd, "--help"]);
        h.ok();
        assert!(h.stdout.contains("Usage: vmrepo"), "{cmd} --help");
    }
    assert!(vmrepo(["ingest", "--help"]).stdout.contains("--name"));
    assert!(vmrepo(["check", "--help"])
        .stdout
        .contains("--rebuild-index"));
}

#[test]
fn threads_option_limits_workers_and_gives_the_same_result() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("disk.img");
    sparse_image(&img, 48 << 20, &[(0, 5 << 20, 1), (20 << 20, 9 << 20, 2)]);
    let repo = init_repo(d);
    let one = vmrepo([
        s("--threads"),
        s("1"),
        s("ingest"),
        p(&repo),
        p(&img),
        s("--name"),
        s("one"),
        s("--json"),
    ])
    .ok()
    .json();
    let many = ingest(&repo, &img, Some("many"));
    // Same content, same chunks: the second ingest stores nothing new.
    assert_eq!(many["stats"]["chunks_new"], 0, "{many} after {one}");
    let out = d.join("out");
    vmrepo([
        s("--threads"),
        s("1"),
        s("extract"),
        p(&repo),
        s("one"),
        p(&out),
    ])
    .ok();
    assert!(same_file(&out.join("disk.img"), &img));
    let r = vmrepo([s("--threads"), s("0"), s("list"), p(&repo)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("'--threads <N>'"), "{}", r.stderr);
}

#[test]
fn without_a_terminal_progress_comes_as_log_lines() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = d.join("disk.img");
    sparse_image(&img, 64 << 20, &[(0, 40 << 20, 3)]);
    let repo = init_repo(d);
    // Output captured (as under cron): no bar, but a line per interval.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmrepo"))
        .args([s("ingest"), p(&repo), p(&img), s("--name"), s("logged")])
        .env("VMREPO_PROGRESS_INTERVAL", "0")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("ingest logged: "))
        .unwrap_or_else(|| panic!("no progress line in: {err}"));
    assert!(
        line.contains(" of 40.0 MiB (") && line.contains("/s"),
        "{line}"
    );
    assert!(!err.contains('\r'), "terminal control in a log: {err:?}");
    // The default interval (a minute) prints nothing for a short ingest.
    let quiet = vmrepo([s("ingest"), p(&repo), p(&img), s("--name"), s("quiet")])
        .ok()
        .stderr
        .clone();
    assert!(!quiet.contains("ingest quiet: "), "{quiet}");
}

#[test]
fn a_chunk_repeated_within_a_segment_and_short_runs_restore_exactly() {
    // Restores decode each chunk straight into place and copy its repeats from there: a
    // pattern repeated across a segment boundary, next to unique data, short runs and holes.
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("rep.img");
    let pattern = bytes(48 << 10, 7);
    let mut data = bytes(1 << 20, 1);
    for _ in 0..100 {
        data.extend_from_slice(&pattern);
    }
    data.extend_from_slice(&bytes(300 << 10, 2));
    sparse_image(&img, 16 << 20, &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&data, 2 << 20).unwrap();
    f.write_all_at(&bytes(5000, 3), 11 << 20).unwrap();
    f.write_all_at(&pattern[..4096], (12 << 20) + 12288)
        .unwrap();
    drop(f);
    let repo = init_repo(t.path());
    let first = ingest(&repo, &img, Some("rep"));
    let chunks = first["stats"]["chunks_new"].as_u64().unwrap();
    assert!(
        chunks < (data.len() as u64 >> 14) / 2,
        "the repeated pattern did not dedup, so this test would not repeat a chunk: {first}"
    );
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("rep"), p(&out)]).ok();
    assert!(same_file(&img, &out.join("rep.img")));
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}
