//! Snapshot chains through the real binary: parents found by hint or datastore map, and every
//! way a chain can be broken (CID mismatch, self-reference, cycle, missing or truncated link,
//! dirty seSparse journal, encrypted or external-data qcow2, physical RDM) refused with an
//! error that names the file at fault — never a panic or a hang.

mod common;
use common::vectors::*;
use common::*;
use std::fs;
use std::path::Path;

fn refused(repo: &Path, src: &Path, needles: &[&str]) {
    let r = vmrepo([s("ingest"), p(repo), p(src), s("--name"), s("x")]);
    assert_ne!(r.code, 0, "accepted {}", src.display());
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "missing {n:?} in:\n{}", r.stderr);
    }
}

fn base_and_delta(d: &Path) {
    vmfs_base(d, "db", &bytes(4 << 20, 1), 0x0000_00aa);
    cowd_delta(
        d,
        "db-000001",
        "db.vmdk",
        0xaa,
        0xbb,
        8192,
        1,
        &[(3, vec![7u8; 512])],
    );
}

#[test]
fn broken_chains_are_refused_naming_the_files() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let repo = init_repo(d);
    base_and_delta(d);

    // The parent was written to after the delta was taken: CID mismatch names both files.
    let desc = fs::read_to_string(d.join("db.vmdk")).unwrap();
    fs::write(
        d.join("db.vmdk"),
        desc.replace("CID=000000aa", "CID=000000cc"),
    )
    .unwrap();
    refused(
        &repo,
        &d.join("db-000001.vmdk"),
        &[
            "db-000001.vmdk",
            "db.vmdk",
            "CID 000000aa",
            "CID 000000cc",
            "broken snapshot chain",
        ],
    );
    fs::write(d.join("db.vmdk"), &desc).unwrap();

    // A delta that names itself, and a cycle of two.
    let child = fs::read_to_string(d.join("db-000001.vmdk")).unwrap();
    fs::write(
        d.join("db-000001.vmdk"),
        child
            .replace(
                "parentFileNameHint=\"db.vmdk\"",
                "parentFileNameHint=\"db-000001.vmdk\"",
            )
            .replace("parentCID=000000aa", "parentCID=000000bb"),
    )
    .unwrap();
    refused(
        &repo,
        &d.join("db-000001.vmdk"),
        &["db-000001.vmdk", "chain loops"],
    );
    cowd_delta(d, "loop-a", "loop-b.vmdk", 2, 1, 8192, 1, &[]);
    cowd_delta(d, "loop-b", "loop-a.vmdk", 1, 2, 8192, 1, &[]);
    refused(
        &repo,
        &d.join("loop-a.vmdk"),
        &["loop-b.vmdk", "loop-a.vmdk", "chain loops"],
    );
    fs::write(d.join("db-000001.vmdk"), &child).unwrap();

    // A missing parent; then found through --datastore-map.
    let elsewhere = d.join("ds1/db");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::rename(d.join("db.vmdk"), elsewhere.join("db.vmdk")).unwrap();
    fs::rename(d.join("db-flat.vmdk"), elsewhere.join("db-flat.vmdk")).unwrap();
    let abs = child.replace(
        "parentFileNameHint=\"db.vmdk\"",
        "parentFileNameHint=\"/vmfs/volumes/datastore1/db/db.vmdk\"",
    );
    fs::write(d.join("db-000001.vmdk"), &abs).unwrap();
    refused(
        &repo,
        &d.join("db-000001.vmdk"),
        &[
            "db-000001.vmdk",
            "/vmfs/volumes/datastore1/db/db.vmdk",
            "--datastore-map",
        ],
    );
    let map = format!("/vmfs/volumes/datastore1={}", d.join("ds1").display());
    let r = vmrepo([
        s("ingest"),
        p(&repo),
        p(&d.join("db-000001.vmdk")),
        s("--name"),
        s("mapped"),
        s("--datastore-map"),
        s(&map),
        s("--json"),
    ]);
    r.ok();
    // Sector 3 comes from the delta, the rest from the mapped base.
    let out = d.join("out");
    vmrepo([
        s("extract"),
        p(&repo),
        s("mapped"),
        p(&out),
        s("--disk-format"),
        s("raw"),
    ])
    .ok();
    let raw = fs::read(out.join("db-000001.img")).unwrap();
    let mut want = bytes(4 << 20, 1);
    want[1536..2048].fill(7);
    assert_eq!(raw, want);
}

#[test]
fn garbled_and_truncated_links_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let repo = init_repo(d);
    base_and_delta(d);

    // A truncated COWD file: its grain table lies past the end.
    let delta = d.join("db-000001-delta.vmdk");
    let f = fs::OpenOptions::new().write(true).open(&delta).unwrap();
    f.set_len(2048 + 512).unwrap();
    drop(f);
    refused(
        &repo,
        &d.join("db-000001.vmdk"),
        &["db-000001-delta.vmdk", "truncated"],
    );
    // Garbage in the COWD header.
    fs::write(&delta, vec![0x43; 4096]).unwrap();
    refused(&repo, &d.join("db-000001.vmdk"), &["db-000001-delta.vmdk"]);
    // The data file of a delta given directly.
    base_and_delta(d);
    refused(
        &repo,
        &delta,
        &["db-000001-delta.vmdk", "give its descriptor"],
    );

    // A seSparse delta whose journal must be replayed.
    sesparse_delta(
        d,
        "live",
        "db.vmdk",
        0xaa,
        0xdd,
        8192,
        &[(1, SeGrain::Zero)],
        true,
    );
    refused(
        &repo,
        &d.join("live.vmdk"),
        &["live-sesparse.vmdk", "journal", "--at-snapshot"],
    );

    // A KDMV file cut short, and one whose grain size field is garbage.
    sh(&format!(
        "cd {} && qemu-img create -q -f vmdk k.vmdk 64M && qemu-io -c 'write -P 1 0 1M' k.vmdk",
        d.display()
    ))
    .ok();
    let k = fs::read(d.join("k.vmdk")).unwrap();
    fs::write(d.join("cut.vmdk"), &k[..k.len() - 4096]).unwrap();
    refused(&repo, &d.join("cut.vmdk"), &["cut.vmdk"]);
    let mut bad = k.clone();
    bad[20] = 3;
    fs::write(d.join("grain.vmdk"), &bad).unwrap();
    refused(
        &repo,
        &d.join("grain.vmdk"),
        &["grain.vmdk", "grain size of 3 sectors"],
    );
    let mut lower = k.clone();
    lower[..4].copy_from_slice(b"kdmv");
    fs::write(d.join("lower.vmdk"), &lower).unwrap();
    refused(
        &repo,
        &d.join("lower.vmdk"),
        &["lower.vmdk", "still being written"],
    );

    // qcow2 that cannot be read from its file alone.
    sh(&format!(
        "cd {} && qemu-img create -q -f qcow2 --object secret,id=s0,data=pw -o encrypt.format=luks,encrypt.key-secret=s0 enc.qcow2 1M && \
         qemu-img create -q -f qcow2 -o data_file=ext.raw ext.qcow2 1M",
        d.display()
    ))
    .ok();
    refused(&repo, &d.join("enc.qcow2"), &["enc.qcow2", "encrypted"]);
    refused(
        &repo,
        &d.join("ext.qcow2"),
        &["ext.qcow2", "external data file"],
    );

    // A physical RDM cannot be backed up from files.
    fs::write(
        d.join("rdm.vmdk"),
        "version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfsPassthroughRawDeviceMap\"\nRW 8192 VMFSRDM \"rdm-rdmp.vmdk\"\n",
    )
    .unwrap();
    refused(
        &repo,
        &d.join("rdm.vmdk"),
        &["rdm.vmdk", "physical-mode RDM"],
    );
    // Nothing was recorded by any refused ingest.
    assert!(generations(&repo, "x").is_empty());
}
