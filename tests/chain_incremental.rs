//! Change-aware ingest of snapshot chains, automatically: when tonight's chain is last night's
//! plus new links on top (a qcow2 overlay, a VMware delta), only what the new links hold is read
//! and the rest is taken from last night; a changed lower link means a full read, said out loud.

mod common;
use common::*;
use std::path::Path;

fn qemu(cmd: &str) {
    sh(cmd).ok();
}

fn disk_map(repo: &Path, gen: &str) -> vmrepo::ObjectId {
    let r = vmrepo::Repository::open(repo, vmrepo::lock::LockMode::Shared).unwrap();
    let g = r.open_index().unwrap().resolve(gen).unwrap();
    r.load_manifest(&g.manifest).unwrap().disks[0].disk_map
}

#[test]
fn a_new_overlay_is_all_that_is_read_and_the_result_equals_a_full_ingest() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = d.join("base.qcow2");
    let ov1 = d.join("ov1.qcow2");
    qemu(&format!(
        "qemu-img create -q -f qcow2 '{}' 64M",
        base.display()
    ));
    qemu(&format!(
        "qemu-io -c 'write -P 0x11 0 40M' '{}' >/dev/null",
        base.display()
    ));
    let repo = init_repo(d);
    ingest(&repo, &base, Some("kvm"));

    // The daily-snapshot scheme: the base is frozen under an overlay the VM writes into.
    qemu(&format!(
        "qemu-img create -q -f qcow2 -b '{}' -F qcow2 '{}'",
        base.display(),
        ov1.display()
    ));
    qemu(&format!(
        "qemu-io -c 'write -P 0x22 9M 1M' -c 'write -P 0x33 50M 64k' '{}' >/dev/null",
        ov1.display()
    ));
    let j = ingest(&repo, &ov1, Some("kvm"));
    let inc = &j["incremental"];
    assert_eq!(inc["source"], "snapshot chain", "{j}");
    assert_eq!(inc["segments_taken"], 14, "{j}");
    assert!(j["stats"]["bytes_read"].as_u64().unwrap() <= 8 << 20, "{j}");

    // Same content read in full (as a raw copy) gives the same disk map.
    let flat = d.join("flat.raw");
    qemu(&format!(
        "qemu-img convert -O raw '{}' '{}'",
        ov1.display(),
        flat.display()
    ));
    ingest(&repo, &flat, Some("full"));
    let g = generations(&repo, "kvm");
    assert_eq!(disk_map(&repo, &g[1]), disk_map(&repo, "full"));
    let out = d.join("out");
    vmrepo([
        s("extract"),
        p(&repo),
        s(&g[1]),
        p(&out),
        s("--disk-format"),
        s("raw"),
    ])
    .ok();
    let restored = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(same_file(&restored, &flat));

    // The base changed under the overlay (written behind the VM's back): read everything.
    qemu(&format!(
        "qemu-io -c 'write -P 0x44 0 4k' '{}' >/dev/null",
        base.display()
    ));
    let j = ingest(&repo, &ov1, Some("kvm"));
    let why = j["incremental"]["full_reads"][0]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(why.contains("base.qcow2 changed since"), "{j}");
    assert_eq!(j["incremental"]["segments_taken"], 0);
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}
