//! `vmrepo extract --datastore-map OLD=NEW`: a VM whose .vmx and descriptor name absolute
//! datastore paths is restored for another datastore; only those paths change.

mod common;
use common::*;
use std::fs;

#[test]
fn datastore_paths_in_the_vmx_and_descriptors_are_rewritten_and_nothing_else() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(
        t.path(),
        "web01",
        &[
            (8 << 20, vec![(0, 1 << 20, 1)]),
            (4 << 20, vec![(1 << 20, 256 << 10, 2)]),
        ],
    );
    // The second disk is named by its datastore path, as ESXi writes a disk that lives in
    // another VM's folder; its descriptor names its flat file the same way. Ingest finds both
    // next to the .vmx (the VM directory was copied off the datastore).
    let ds1 = "/vmfs/volumes/ds1/web01";
    let vmx_path = vm.join("web01.vmx");
    let vmx = fs::read_to_string(&vmx_path).unwrap().replace(
        "scsi0:1.fileName = \"web01_1.vmdk\"",
        &format!("scsi0:1.fileName = \"{ds1}/web01_1.vmdk\""),
    ) + "workingDir = \"/vmfs/volumes/ds10/elsewhere\"\n";
    fs::write(&vmx_path, &vmx).unwrap();
    let desc_path = vm.join("web01_1.vmdk");
    let desc = fs::read_to_string(&desc_path).unwrap().replace(
        "\"web01_1-flat.vmdk\"",
        &format!("\"{ds1}/web01_1-flat.vmdk\""),
    );
    fs::write(&desc_path, &desc).unwrap();
    let repo = init_repo(t.path());
    ingest(&repo, &vm, None);

    // Without a map everything comes back as it was.
    let plain = t.path().join("plain");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&plain)]).ok();
    assert!(same_file(&vmx_path, &plain.join("web01.vmx")));
    assert!(same_file(&desc_path, &plain.join("web01_1.vmdk")));

    let out = t.path().join("ds2");
    let r = vmrepo([
        s("extract"),
        p(&repo),
        s("web01"),
        p(&out),
        s("--datastore-map"),
        s("/vmfs/volumes/ds1=/vmfs/volumes/ds2"),
        s("--json"),
    ])
    .ok()
    .json();
    // The disk path and the ISO path in the .vmx (both on ds1), and the extent in the
    // descriptor; not ds10, not the relative names.
    let relocated = r["relocated"].as_array().unwrap();
    assert_eq!(relocated.len(), 3, "{r}");
    assert_eq!(r["unused_datastore_maps"].as_array().unwrap().len(), 0);
    let want_vmx = vmx
        .replace("\"/vmfs/volumes/ds1/", "\"/vmfs/volumes/ds2/")
        .into_bytes();
    assert_eq!(fs::read(out.join("web01.vmx")).unwrap(), want_vmx);
    assert!(String::from_utf8(want_vmx)
        .unwrap()
        .contains("/vmfs/volumes/ds10/elsewhere"));
    assert_eq!(
        fs::read_to_string(out.join("web01_1.vmdk")).unwrap(),
        desc.replace(ds1, "/vmfs/volumes/ds2/web01")
    );
    for f in [
        "web01.vmdk",
        "web01-flat.vmdk",
        "web01_1-flat.vmdk",
        "web01.nvram",
        "vmware.log",
        "web01.vmsd",
    ] {
        assert!(same_file(&vm.join(f), &out.join(f)), "{f} changed");
    }

    // A rule that matches nothing is reported; a malformed one is refused.
    let r = vmrepo([
        s("extract"),
        p(&repo),
        s("web01"),
        p(&t.path().join("x")),
        s("--datastore-map"),
        s("/vmfs/volumes/nowhere=/x"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("matched no path"), "{}", r.stderr);
    let r = vmrepo([
        s("extract"),
        p(&repo),
        s("web01"),
        p(&t.path().join("y")),
        s("--datastore-map"),
        s("/vmfs/volumes/ds1"),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("expected OLD=NEW"), "{}", r.stderr);
    assert!(
        !t.path().join("y").exists(),
        "nothing is written for a bad option"
    );
}
