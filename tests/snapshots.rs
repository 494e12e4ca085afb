//! Snapshots of a running ESXi VM: `inspect` shows chains, snapshots and what needs attention;
//! `ingest --at-snapshot` reads each disk as a snapshot froze it while the live delta (with a
//! dirty journal) is left alone, and the disk restores under the name the .vmx uses.

mod common;
use common::vectors::*;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

const MIB: usize = 1 << 20;

fn create_time(days_ago: f64) -> (i64, i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let t = now - (days_ago * 86400e6) as i64;
    (t >> 32, (t & 0xffff_ffff) as u32 as i32 as i64)
}

/// A VM whose disk is base ← 000001 ← 000002 (seSparse; the leaf's journal dirty when `live`),
/// an independent data disk and a physical RDM, with a .vmsd of two snapshots.
fn running_vm(root: &Path, live: bool) -> PathBuf {
    let vm = root.join("app");
    fs::create_dir_all(&vm).unwrap();
    vmfs_base(&vm, "app", &bytes(8 * MIB, 1), 0xaa);
    sesparse_delta(
        &vm,
        "app-000001",
        "app.vmdk",
        0xaa,
        0xbb,
        (8 * MIB / 512) as u64,
        &[(5, SeGrain::Data(vec![0x51; 4096])), (6, SeGrain::Zero)],
        false,
    );
    sesparse_delta(
        &vm,
        "app-000002",
        "app-000001.vmdk",
        0xbb,
        0xcc,
        (8 * MIB / 512) as u64,
        &[
            (5, SeGrain::Data(vec![0x52; 4096])),
            (100, SeGrain::Data(vec![0x53; 4096])),
        ],
        live,
    );
    vmfs_base(&vm, "data", &bytes(MIB, 2), 0xdd);
    fs::write(
        vm.join("rdm.vmdk"),
        "version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfsPassthroughRawDeviceMap\"\nRW 8192 VMFSRDM \"rdm-rdmp.vmdk\"\n",
    )
    .unwrap();
    fs::write(
        vm.join("app.vmx"),
        "displayName = \"app\"\nscsi0.present = \"TRUE\"\n\
         scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"app-000002.vmdk\"\n\
         scsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"data.vmdk\"\nscsi0:1.mode = \"independent-persistent\"\n",
    )
    .unwrap();
    let (h1, l1) = create_time(10.0);
    let (h2, l2) = create_time(0.05);
    fs::write(
        vm.join("app.vmsd"),
        format!(
            ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"2\"\nsnapshot.current = \"2\"\nsnapshot.numSnapshots = \"2\"\n\
             snapshot0.uid = \"1\"\nsnapshot0.displayName = \"before patch\"\nsnapshot0.createTimeHigh = \"{h1}\"\n\
             snapshot0.createTimeLow = \"{l1}\"\nsnapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"app.vmdk\"\n\
             snapshot0.disk0.node = \"scsi0:0\"\n\
             snapshot1.uid = \"2\"\nsnapshot1.parent = \"1\"\nsnapshot1.displayName = \"nightly\"\n\
             snapshot1.createTimeHigh = \"{h2}\"\nsnapshot1.createTimeLow = \"{l2}\"\nsnapshot1.numDisks = \"1\"\n\
             snapshot1.disk0.fileName = \"app-000001.vmdk\"\nsnapshot1.disk0.node = \"scsi0:0\"\n"
        ),
    )
    .unwrap();
    vm
}

fn qemu_raw(src: &Path, out: &Path) -> Vec<u8> {
    sh(&format!(
        "qemu-img convert -O raw '{}' '{}'",
        src.display(),
        out.display()
    ))
    .ok();
    fs::read(out).unwrap()
}

#[test]
fn inspect_shows_chains_snapshots_and_warnings() {
    let t = tempfile::tempdir().unwrap();
    let vm = running_vm(t.path(), false);
    // The RDM is attached too: inspect reports it instead of failing.
    let vmx = fs::read_to_string(vm.join("app.vmx")).unwrap()
        + "scsi0:2.present = \"TRUE\"\nscsi0:2.fileName = \"rdm.vmdk\"\n";
    fs::write(vm.join("app.vmx"), vmx).unwrap();
    let r = vmrepo([s("inspect"), p(&vm), s("--json")]);
    assert_eq!(r.code, 1, "the RDM cannot be read: {}", r.stderr);
    let j = r.json();
    assert_eq!(j["vm"], "app");
    let chain = j["disks"][0]["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0]["create_type"], "seSparse");
    assert_eq!(chain[0]["cid"], "000000cc");
    assert_eq!(chain[0]["parent_cid"], "000000bb");
    assert_eq!(chain[0]["allocated_bytes"], 8192);
    assert_eq!(chain[2]["create_type"], "vmfs");
    assert_eq!(chain[2]["virtual_size"], 8 * MIB);
    assert_eq!(j["snapshots"].as_array().unwrap().len(), 2);
    assert_eq!(j["snapshots"][1]["current"], true);
    let warnings = j["warnings"].to_string();
    for w in [
        "\\\"before patch\\\" (uid 1) is 10 days old",
        "chain of 3 links (2 snapshot deltas)",
        "scsi0:1 (data.vmdk) is independent-persistent",
        "scsi0:2 (rdm.vmdk) is a physical-mode RDM",
    ] {
        assert!(warnings.contains(w), "missing {w:?} in {warnings}");
    }
    assert!(!warnings.contains("nightly"), "{warnings}");
    // The text form says the same.
    let text = vmrepo([s("inspect"), p(&vm)]).stdout;
    assert!(
        text.contains("app-000002.vmdk (seSparse)  CID 000000cc parent 000000bb"),
        "{text}"
    );
    assert!(
        text.contains("warning: snapshot \"before patch\""),
        "{text}"
    );

    // A single disk file, and a broken chain.
    let r = vmrepo([s("inspect"), p(&vm.join("app-000001.vmdk")), s("--json")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["disks"][0]["chain"].as_array().unwrap().len(), 2);
    fs::remove_file(vm.join("app.vmdk")).unwrap();
    let r = vmrepo([s("inspect"), p(&vm.join("app-000001.vmdk")), s("--json")]);
    assert_eq!(r.code, 1);
    let j = r.json();
    assert!(
        j["disks"][0]["error"]
            .as_str()
            .unwrap()
            .contains("is missing"),
        "{j}"
    );
    assert!(
        j["warnings"][0].as_str().unwrap().contains("broken chain"),
        "{j}"
    );
}

#[test]
fn at_snapshot_reads_the_frozen_links_of_a_running_vm() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let vm = running_vm(d, true);
    let repo = init_repo(d);
    // The live leaf's journal is dirty: a plain ingest refuses and points at --at-snapshot.
    let r = vmrepo([s("ingest"), p(&repo), p(&vm)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("app-000002-sesparse.vmdk"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--at-snapshot"), "{}", r.stderr);

    for (which, frozen) in [("latest", "app-000001.vmdk"), ("before patch", "app.vmdk")] {
        let name = format!("app-{}", which.replace(' ', "-"));
        let r = vmrepo([
            s("ingest"),
            p(&repo),
            p(&vm),
            s("--name"),
            s(&name),
            s("--at-snapshot"),
            s(which),
            s("--json"),
        ]);
        let j = r.ok().json();
        assert!(
            j["warnings"].to_string().contains("independent-persistent"),
            "{j}"
        );
        let out = d.join(format!("out-{name}"));
        vmrepo([s("extract"), p(&repo), s(&name), p(&out)]).ok();
        // Restored under the name the .vmx uses, as one vmfs link with the frozen content.
        let desc = fs::read_to_string(out.join("app-000002.vmdk")).unwrap();
        assert!(desc.contains("createType=\"vmfs\""), "{desc}");
        assert!(!desc.contains("parentFileNameHint"), "{desc}");
        let want = qemu_raw(&vm.join(frozen), &d.join(format!("{name}.raw")));
        assert_eq!(
            fs::read(out.join("app-000002-flat.vmdk")).unwrap(),
            want,
            "{which}"
        );
        assert!(same_file(&vm.join("app.vmx"), &out.join("app.vmx")));
    }
    let r = vmrepo([s("ingest"), p(&repo), p(&vm), s("--at-snapshot"), s("nope")]);
    assert!(
        r.stderr.contains("no snapshot named \"nope\""),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("\"nightly\" (uid 2)"), "{}", r.stderr);
}
