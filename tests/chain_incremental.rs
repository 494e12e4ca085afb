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
    let r = vmrepo::Repository::open(repo, vmrepo::repo::lock::LockMode::Shared).unwrap();
    let g = r.open_index().unwrap().resolve(gen).unwrap();
    r.load_manifest(&g.manifest).unwrap().disks[0].disk_map
}

/// Converts `image` (a chain) to raw with qemu-img, ingests the copy as VM `full`, and asserts
/// that generation `gen` has the same disk map as that full ingest; returns the raw copy.
fn same_as_a_full_ingest(repo: &Path, image: &Path, raw: &Path, gen: &str) -> std::path::PathBuf {
    qemu(&format!(
        "qemu-img convert -O raw '{}' '{}'",
        image.display(),
        raw.display()
    ));
    ingest(repo, raw, Some("full"));
    assert_eq!(disk_map(repo, gen), disk_map(repo, "full"));
    raw.to_path_buf()
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
    let g = generations(&repo, "kvm");
    let flat = same_as_a_full_ingest(&repo, &ov1, &d.join("flat.raw"), &g[1]);
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

    // --full-read reads the whole chain all the same, and stores nothing new.
    let j = vmrepo([
        s("ingest"),
        p(&repo),
        p(&ov1),
        s("--name"),
        s("kvm"),
        s("--full-read"),
        s("--json"),
    ])
    .ok()
    .json();
    assert!(j["incremental"].is_null(), "{j}");
    assert!(
        j["stats"]["bytes_read"].as_u64().unwrap() >= 40 << 20,
        "{j}"
    );
    assert_eq!(j["stats"]["chunks_new"], 0, "{j}");

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

/// The ESXi daily-snapshot scheme: night 1 backs up the `vmfs` base frozen under snapshot 1
/// while the VM writes into the seSparse delta 000001; night 2 takes snapshot 2 (the VM now
/// writes into 000002) and backs up base ← 000001 as snapshot 2 froze it. Only what 000001
/// holds is read; the result equals a full ingest of the same content.
#[test]
fn esxi_daily_snapshots_read_only_the_newly_frozen_delta() {
    use common::vectors::*;
    const MIB: usize = 1 << 20;
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let vm = d.join("app");
    std::fs::create_dir_all(&vm).unwrap();
    let sectors = (64 * MIB / 512) as u64;
    let vmx = |leaf: &str| {
        std::fs::write(
            vm.join("app.vmx"),
            format!(
                "displayName = \"app\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\n\
                 scsi0:0.fileName = \"{leaf}\"\n"
            ),
        )
        .unwrap()
    };
    let vmsd = |snaps: &[(u32, &str)]| {
        let mut s = format!(
            "snapshot.lastUID = \"{0}\"\nsnapshot.current = \"{0}\"\nsnapshot.numSnapshots = \"{0}\"\n",
            snaps.len()
        );
        for (i, (uid, frozen)) in snaps.iter().enumerate() {
            s += &format!(
                "snapshot{i}.uid = \"{uid}\"\nsnapshot{i}.displayName = \"nightly {uid}\"\n\
                 snapshot{i}.numDisks = \"1\"\nsnapshot{i}.disk0.fileName = \"{frozen}\"\n\
                 snapshot{i}.disk0.node = \"scsi0:0\"\n"
            );
            if *uid > 1 {
                s += &format!("snapshot{i}.parent = \"{}\"\n", uid - 1);
            }
        }
        std::fs::write(vm.join("app.vmsd"), s).unwrap()
    };
    let grains = [
        (5, SeGrain::Data(vec![0x51; 4096])),
        (2100, SeGrain::Data(vec![0x52; 4096])),
        (3000, SeGrain::Zero),
    ];

    // Night 1: snapshot 1 froze the base; the VM writes into 000001 (journal dirty).
    vmfs_base(&vm, "app", &bytes(64 * MIB, 9), 0xaa);
    sesparse_delta(
        &vm,
        "app-000001",
        "app.vmdk",
        0xaa,
        0xbb,
        sectors,
        &grains,
        true,
    );
    vmx("app-000001.vmdk");
    vmsd(&[(1, "app.vmdk")]);
    let repo = init_repo(d);
    let night = || {
        vmrepo([
            s("ingest"),
            p(&repo),
            p(&vm),
            s("--at-snapshot"),
            s("latest"),
            s("--json"),
        ])
        .ok()
        .json()
    };
    let j = night();
    assert!(j["incremental"].is_null(), "{j}");

    // Night 2: snapshot 2 closes 000001 (journal clean) and the VM writes into 000002.
    sesparse_delta(
        &vm,
        "app-000001",
        "app.vmdk",
        0xaa,
        0xbb,
        sectors,
        &grains,
        false,
    );
    sesparse_delta(
        &vm,
        "app-000002",
        "app-000001.vmdk",
        0xbb,
        0xcc,
        sectors,
        &[(7, SeGrain::Data(vec![0x53; 4096]))],
        true,
    );
    vmx("app-000002.vmdk");
    vmsd(&[(1, "app.vmdk"), (2, "app-000001.vmdk")]);
    let j = night();
    let inc = &j["incremental"];
    assert_eq!(inc["source"], "snapshot chain", "{j}");
    // 000001's grains lie in segments 0 and 2 of 16: the other 14 are taken unread.
    assert_eq!(inc["segments_taken"], 14, "{j}");
    assert!(j["stats"]["bytes_read"].as_u64().unwrap() <= 9 << 20, "{j}");

    // The same content read in full gives the same disk map, and restores byte for byte.
    let g = generations(&repo, "app");
    let frozen = vm.join("app-000001.vmdk");
    let flat = same_as_a_full_ingest(&repo, &frozen, &d.join("frozen.raw"), &g[1]);
    let out = d.join("out");
    vmrepo([s("extract"), p(&repo), s(&g[1]), p(&out)]).ok();
    // Restored under the name the .vmx uses, as one vmfs link.
    assert!(same_file(&out.join("app-000002-flat.vmdk"), &flat));

    // Night 3: the base was written behind the snapshots' back (a consolidation, a tool
    // writing to it): nothing below the new link can be trusted, so everything is read.
    common::overwrite(&vm.join("app-flat.vmdk"), 0, 4096, 3);
    sesparse_delta(
        &vm,
        "app-000002",
        "app-000001.vmdk",
        0xbb,
        0xcc,
        sectors,
        &[],
        false,
    );
    vmx("app-000003.vmdk");
    sesparse_delta(
        &vm,
        "app-000003",
        "app-000002.vmdk",
        0xcc,
        0xdd,
        sectors,
        &[],
        true,
    );
    vmsd(&[
        (1, "app.vmdk"),
        (2, "app-000001.vmdk"),
        (3, "app-000002.vmdk"),
    ]);
    let j = night();
    assert_eq!(j["incremental"]["segments_taken"], 0, "{j}");
    let why = j["incremental"]["full_reads"][0].as_str().unwrap_or("");
    assert!(why.contains("app.vmdk changed since"), "{j}");
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}
