//! Every disk format vmrepo reads, through the real binary: images made by qemu-img/qemu-io are
//! ingested and extracted and compared with `qemu-img compare` (and `qemu-img check`ed); the
//! formats qemu-img cannot make are built by the test-only writer in `common::vectors`, and
//! vmrepo's reading of them must equal `qemu-img convert -O raw` byte for byte.

mod common;
use common::vectors::*;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

fn run(cmd: &str) {
    let r = sh(cmd);
    assert_eq!(r.code, 0, "{cmd}\n{}{}", r.stdout, r.stderr);
}

fn check_clean(img: &Path) {
    let r = sh(&format!("qemu-img check '{}'", img.display()));
    assert!(
        r.code == 0 && r.stdout.contains("No errors were found"),
        "qemu-img check {}:\n{}{}",
        img.display(),
        r.stdout,
        r.stderr
    );
}

/// Extracts `vm` into `dir/out-vm` (optionally in `format`) and returns the directory.
fn extract(repo: &Path, vm: &str, dir: &Path, format: Option<&str>) -> PathBuf {
    let out = dir.join(format!("out-{vm}-{}", format.unwrap_or("orig")));
    let mut args = vec![s("extract"), p(repo), s(vm), p(&out)];
    if let Some(f) = format {
        args.push(s("--disk-format"));
        args.push(s(f));
    }
    vmrepo(args).ok();
    out
}

/// vmrepo's reading of `vm` as a raw image.
fn ours_raw(repo: &Path, vm: &str, dir: &Path) -> PathBuf {
    let out = extract(repo, vm, dir, Some("raw"));
    let img: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    assert_eq!(img.len(), 1, "{img:?}");
    img[0].clone()
}

/// qemu's reading of `src` as a raw image.
fn qemu_raw(src: &Path) -> PathBuf {
    let out = src.with_extension("qemu.raw");
    run(&format!(
        "qemu-img convert -O raw '{}' '{}'",
        src.display(),
        out.display()
    ));
    out
}

fn create_type(img: &Path) -> String {
    let r = sh(&format!("qemu-img info --output=json '{}'", img.display()));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["format-specific"]["data"]["create-type"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn qemu_made_vmdks_round_trip_in_their_own_format() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run(&format!(
        "cd {} && \
         qemu-img create -q -f vmdk base.vmdk 64M && \
         qemu-io -c 'write -P 0xab 1M 64k' -c 'write -P 0xcd 40M 3M' -c 'write -P 0x11 60M 128k' base.vmdk && \
         qemu-img create -q -f vmdk -o zeroed_grain=on -b base.vmdk -F vmdk child.vmdk && \
         qemu-io -c 'write -P 0xef 1M 4k' -c 'write -z 40M 64k' -c 'write -P 0x22 10M 1M' child.vmdk && \
         qemu-img create -q -f vmdk -b child.vmdk -F vmdk grandchild.vmdk && \
         qemu-io -c 'write -P 0x33 60M 4k' grandchild.vmdk && \
         qemu-img convert -O vmdk -o subformat=streamOptimized grandchild.vmdk stream.vmdk && \
         qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse tg.vmdk 5G && \
         qemu-io -c 'write -P 0x44 0 1M' -c 'write -P 0x55 2047M 2M' -c 'write -P 0x66 4G 1M' tg.vmdk",
        d.display()
    ));
    let repo = init_repo(d);
    for (file, vm, ct) in [
        ("base.vmdk", "base", "monolithicSparse"),
        ("grandchild.vmdk", "grandchild", "monolithicSparse"),
        ("stream.vmdk", "stream", "streamOptimized"),
        ("tg.vmdk", "tg", "twoGbMaxExtentSparse"),
    ] {
        let src = d.join(file);
        let summary = ingest(&repo, &src, Some(vm));
        assert_eq!(summary["disks"], 1);
        let out = extract(&repo, vm, d, None);
        let restored = out.join(file);
        assert!(qemu_identical(&src, &restored), "{file}: content differs");
        check_clean(&restored);
        assert_eq!(
            create_type(&restored),
            ct,
            "{file}: restored in another format"
        );
    }
    // The chain was flattened: the restored grandchild has no parent.
    let r = sh(&format!(
        "qemu-img info --backing-chain '{}'",
        d.join("out-grandchild-orig/grandchild.vmdk").display()
    ));
    assert!(!r.stdout.contains("backing file"), "{}", r.stdout);
    // twoGbMaxExtentSparse comes back as extents of at most 2 GiB; only ~4 MiB was read.
    assert!(d.join("out-tg-orig/tg-s003.vmdk").exists());
    let gens = vmrepo([s("list"), p(&repo), s("tg"), s("--json")])
        .ok()
        .json();
    assert!(gens[0]["bytes_read"].as_u64().unwrap() < 8 << 20, "{gens}");
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn every_output_format_is_clean_and_identical() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // 10 MiB + 512 bytes: not a whole number of grains or clusters.
    sparse_image(
        &d.join("disk.img"),
        (10 << 20) + 512,
        &[
            (0, 300_000, 1),
            (5 << 20, 1 << 20, 2),
            ((10 << 20) - 1000, 1512, 3),
        ],
    );
    let repo = init_repo(d);
    ingest(&repo, &d.join("disk.img"), Some("disk"));
    for (fmt, file) in [
        ("flat", "disk.vmdk"),
        ("monolithicSparse", "disk.vmdk"),
        ("twoGbMaxExtentSparse", "disk.vmdk"),
        ("streamOptimized", "disk.vmdk"),
        ("qcow2", "disk.qcow2"),
    ] {
        let out = extract(&repo, "disk", d, Some(fmt));
        let img = out.join(file);
        // VMDKs hold whole sectors: compare the first 10 MiB + 512 bytes exactly.
        assert!(qemu_identical(&d.join("disk.img"), &img), "{fmt} differs");
        if fmt != "flat" {
            check_clean(&img);
        }
        // A converted disk can be ingested again and dedups completely.
        let again = ingest(&repo, &img, Some(&format!("again-{fmt}")));
        assert_eq!(again["stats"]["bytes_new"], 0, "{fmt}: {again}");
    }
    // The default for a raw image is raw, byte for byte.
    let out = extract(&repo, "disk", d, None);
    assert!(same_file(&d.join("disk.img"), &out.join("disk.img")));
}

#[test]
fn qcow2_chains_zero_and_compressed_clusters() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run(&format!(
        "cd {} && \
         qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 32M && \
         qemu-io -c 'write -P 0x01 0 1M' -c 'write -P 0x02 20M 64k' v2.qcow2 && \
         qemu-img create -q -f qcow2 -b v2.qcow2 -F qcow2 mid.qcow2 && \
         qemu-io -c 'write -z 0 128k' -c 'write -P 0x03 20M 4k' -c 'write -P 0x04 30M 2M' mid.qcow2 && \
         qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 40M && \
         qemu-io -c 'write -P 0x05 35M 1M' -c 'write -z 30M 64k' top.qcow2 && \
         qemu-img convert -c -O qcow2 top.qcow2 zlib.qcow2 && \
         qemu-img convert -c -O qcow2 -o compression_type=zstd top.qcow2 zstd.qcow2 && \
         qemu-img create -q -f raw rawbase.img 16M && qemu-io -f raw -c 'write -P 0x06 1M 1M' rawbase.img && \
         qemu-img create -q -f qcow2 -b rawbase.img -F raw onraw.qcow2 && qemu-io -c 'write -P 0x07 1M 4k' onraw.qcow2",
        d.display()
    ));
    let repo = init_repo(d);
    for file in [
        "v2.qcow2",
        "top.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "onraw.qcow2",
    ] {
        let vm = file.trim_end_matches(".qcow2");
        let src = d.join(file);
        ingest(&repo, &src, Some(vm));
        let out = extract(&repo, vm, d, None);
        assert!(qemu_identical(&src, &out.join(file)), "{file} differs");
        check_clean(&out.join(file));
        // And vmrepo's raw reading equals qemu's.
        assert!(
            same_file(&ours_raw(&repo, vm, d), &qemu_raw(&src)),
            "{file}: raw reading differs from qemu's"
        );
    }
    // The chain is recorded in the manifest-backed listing: one disk, 40 MiB virtual.
    let gens = vmrepo([s("list"), p(&repo), s("top"), s("--json")])
        .ok()
        .json();
    assert_eq!(gens[0]["virtual_bytes"], 40 << 20);
}

#[test]
fn esxi_deltas_and_vmware_streams_read_like_qemu_reads_them() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let size = 16u64 << 20;
    let mut base = vec![0u8; size as usize];
    base[..3 << 20].copy_from_slice(&bytes(3 << 20, 1));
    base[(12 << 20)..(13 << 20)].copy_from_slice(&bytes(1 << 20, 2));
    vmfs_base(d, "app", &base, 0x3729b687);
    // COWD child, 1-sector grains, spanning two grain tables.
    let grains: Vec<(u64, Vec<u8>)> = [7u64, 8, 4095, 4096, 30000]
        .iter()
        .map(|&g| (g, vec![0x40 + (g % 7) as u8; 512]))
        .collect();
    cowd_delta(
        d,
        "app-000001",
        "app.vmdk",
        0x3729b687,
        0x11111111,
        size / 512,
        1,
        &grains,
    );
    // seSparse grandchild: data, zero (hides the base's data) and unmapped grains.
    sesparse_delta(
        d,
        "app-000002",
        "app-000001.vmdk",
        0x11111111,
        0x22222222,
        size / 512,
        &[
            (0, SeGrain::Zero),
            (1, SeGrain::Unmapped),
            (2, SeGrain::Data(bytes(4096, 3))),
            (3000, SeGrain::Data(bytes(4096, 4))),
            (3001, SeGrain::Zero),
            (4095, SeGrain::Data(vec![0x77; 4096])),
        ],
        false,
    );
    let repo = init_repo(d);
    for leaf in ["app-000001", "app-000002"] {
        let src = d.join(format!("{leaf}.vmdk"));
        ingest(&repo, &src, Some(leaf));
        assert!(
            same_file(&ours_raw(&repo, leaf, d), &qemu_raw(&src)),
            "{leaf}: vmrepo and qemu read different bytes"
        );
        // The default restore is the base's format (an ESXi vmfs pair) under the leaf's name.
        let out = extract(&repo, leaf, d, None);
        assert!(qemu_identical(&src, &out.join(format!("{leaf}.vmdk"))));
        let desc = fs::read_to_string(out.join(format!("{leaf}.vmdk"))).unwrap();
        assert!(desc.contains("createType=\"vmfs\""), "{desc}");
        assert!(
            desc.contains(&format!("VMFS \"{leaf}-flat.vmdk\"")),
            "{desc}"
        );
        assert!(desc.contains("ddb.adapterType = \"lsilogic\""), "{desc}");
    }

    // A VMware stream (GD at the end), and one with a raw-deflate grain qemu cannot read.
    stream_gd_at_end(&d.join("ova.vmdk"), &base, &[]);
    ingest(&repo, &d.join("ova.vmdk"), Some("ova"));
    assert!(same_file(
        &ours_raw(&repo, "ova", d),
        &qemu_raw(&d.join("ova.vmdk"))
    ));
    stream_gd_at_end(&d.join("deflate.vmdk"), &base, &[0, 1]);
    ingest(&repo, &d.join("deflate.vmdk"), Some("deflate"));
    assert_eq!(fs::read(ours_raw(&repo, "deflate", d)).unwrap(), base);
}

#[test]
fn zero_and_rdonly_extents_keep_their_place() {
    // QEMU drops ZERO extents and ignores RDONLY ones (shifting later extents); vmrepo keeps
    // the descriptor's address space, so compare with the bytes the descriptor describes.
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (a, b, c) = (bytes(1 << 20, 1), bytes(1 << 20, 2), bytes(1 << 20, 3));
    fs::write(d.join("a.bin"), &a).unwrap();
    fs::write(d.join("b.bin"), &b).unwrap();
    fs::write(d.join("c.bin"), &c).unwrap();
    fs::write(
        d.join("mixed.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 2048 FLAT \"a.bin\" 0\nRDONLY 2048 FLAT \"b.bin\" 0\nRW 4096 ZERO\nRW 2048 FLAT \"c.bin\" 0\n",
    )
    .unwrap();
    let repo = init_repo(d);
    ingest(&repo, &d.join("mixed.vmdk"), Some("mixed"));
    let mut want = a.clone();
    want.extend(&b);
    want.extend(vec![0u8; 2 << 20]);
    want.extend(&c);
    assert_eq!(fs::read(ours_raw(&repo, "mixed", d)).unwrap(), want);
    // The default restore keeps the descriptor and files byte for byte.
    let out = extract(&repo, "mixed", d, None);
    for f in ["mixed.vmdk", "a.bin", "b.bin", "c.bin"] {
        assert!(same_file(&d.join(f), &out.join(f)), "{f}");
    }
    // A twoGbMaxExtentSparse-style descriptor mixing a SPARSE extent and a ZERO extent.
    run(&format!(
        "cd {} && qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse sp.vmdk 4M && \
         qemu-io -c 'write -P 0x99 1M 64k' sp.vmdk",
        d.display()
    ));
    let desc = fs::read_to_string(d.join("sp.vmdk")).unwrap().replace(
        "RW 8192 SPARSE \"sp-s001.vmdk\"",
        "RW 8192 SPARSE \"sp-s001.vmdk\"\nRW 2048 ZERO",
    );
    fs::write(d.join("sp.vmdk"), desc).unwrap();
    ingest(&repo, &d.join("sp.vmdk"), Some("sp"));
    let raw = fs::read(ours_raw(&repo, "sp", d)).unwrap();
    assert_eq!(raw.len(), 5 << 20);
    assert!(raw[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x99));
    assert!(raw[4 << 20..].iter().all(|&x| x == 0));
}

#[test]
fn the_same_guest_in_three_formats_is_stored_once() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let size = 64u64 << 20;
    let mut guest = vec![0u8; size as usize];
    for (i, off) in [0usize, 9 << 20, 30 << 20, 50 << 20].iter().enumerate() {
        guest[*off..off + (6 << 20)].copy_from_slice(&bytes(6 << 20, 10 + i as u64));
    }
    vmfs_base(d, "g", &guest, 0xabcdef01);
    run(&format!(
        "cd {} && qemu-img convert -O vmdk g.vmdk g-sparse.vmdk && qemu-img convert -O qcow2 g.vmdk g.qcow2",
        d.display()
    ));
    let repo = init_repo(d);
    ingest(&repo, &d.join("g.vmdk"), Some("flat"));
    let mut before = tree_size(&repo);
    for (file, vm) in [("g-sparse.vmdk", "sparse"), ("g.qcow2", "qcow2")] {
        let s = ingest(&repo, &d.join(file), Some(vm));
        assert_eq!(s["stats"]["bytes_new"], 0, "{file}: {s}");
        let after = tree_size(&repo);
        let growth = (after - before) as f64 / before as f64;
        assert!(
            growth < 0.02,
            "{file}: repository grew {:.2}%",
            growth * 100.0
        );
        before = after;
    }
}

#[test]
fn a_200_gib_sparse_disk_reads_only_what_is_allocated() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run(&format!(
        "cd {} && qemu-img create -q -f qcow2 big.qcow2 200G && \
         qemu-io -c 'write -P 0x01 0 1M' -c 'write -P 0x02 100G 1M' -c 'write -P 0x03 199G 1M' big.qcow2 && \
         qemu-img create -q -f vmdk big.vmdk 200G && \
         qemu-io -c 'write -P 0x01 0 1M' -c 'write -P 0x02 100G 1M' -c 'write -P 0x03 199G 1M' big.vmdk",
        d.display()
    ));
    let repo = init_repo(d);
    for file in ["big.qcow2", "big.vmdk"] {
        let s = ingest(&repo, &d.join(file), Some(file));
        assert_eq!(s["stats"]["virtual_bytes"], 200u64 << 30);
        let read = s["stats"]["bytes_read"].as_u64().unwrap();
        assert!(
            (3 << 20..=4 << 20).contains(&read),
            "{file}: read {read} bytes"
        );
    }
}
