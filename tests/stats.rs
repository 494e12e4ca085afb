//! `vmrepo stats`: what each VM and generation costs after deduplication, checked against
//! what the data is built to share and against what removing a generation really frees.

mod common;
use common::*;

#[test]
fn stats_says_what_each_generation_costs_and_what_removing_it_frees() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    sparse_image(&a, 16 << 20, &[(0, 8 << 20, 1)]);
    sparse_image(&b, 16 << 20, &[(0, 4 << 20, 2)]);
    let repo = init_repo(t.path());
    let at = |img: &std::path::Path, vm: &str, time: &str| ingest_at(&repo, img, vm, time);
    at(&a, "a", "2026-11-01T00:00:00Z");
    // The second night rewrites 1 MiB in the middle.
    overwrite(&a, 3 << 20, 1 << 20, 99);
    at(&a, "a", "2026-11-02T00:00:00Z");
    at(&b, "b", "2026-11-01T00:00:00Z");

    let r = vmrepo([s("stats"), p(&repo), s("--json")]);
    let j = r.ok().json();
    let mib = |v: &serde_json::Value| v.as_u64().unwrap() as f64 / (1u64 << 20) as f64;
    assert_eq!(j["generations"], 3);
    assert_eq!(j["vm_count"], 2);
    // 8 + 8 + 4 MiB of data in the generations, kept as 8 + ~1 + 4 MiB of chunks.
    assert!((mib(&j["chunk_bytes"]) - 20.0).abs() < 0.01, "{j}");
    let kept = mib(&j["referenced"]["raw"]);
    assert!(kept > 13.0 && kept < 13.6, "{kept} MiB kept\n{j}");
    let dedup = j["dedup_ratio"].as_f64().unwrap();
    assert!(dedup > 1.45 && dedup < 1.55, "{dedup}");
    // The test data compresses somewhat: raw over stored.
    let comp = j["compression_ratio"].as_f64().unwrap();
    let expect =
        j["referenced"]["raw"].as_f64().unwrap() / j["referenced"]["stored"].as_f64().unwrap();
    assert!(comp > 1.0 && (comp - expect).abs() < 1e-9, "{comp}");
    // Nothing is unreferenced yet.
    assert_eq!(j["stored"], j["referenced"], "{j}");

    let vm = |name: &str| {
        j["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap()
            .clone()
    };
    let (va, vb) = (vm("a"), vm("b"));
    // b shares nothing: all of it is unique.
    let b_unique = mib(&vb["unique"]["raw"]);
    assert!((4.0..4.1).contains(&b_unique), "{b_unique}");
    assert_eq!(vb["generations"][0]["shared_bytes"], 0);
    // a: 8 MiB plus the ~1 MiB the second night rewrote.
    let a_unique = mib(&va["unique"]["raw"]);
    assert!(a_unique > 9.0 && a_unique < 9.6, "{a_unique}");
    let (a1, a2) = (&va["generations"][0], &va["generations"][1]);
    assert_eq!(a1["generation"], "a@2026-11-01T00:00:00Z");
    for g in [a1, a2] {
        let unique = mib(&g["unique"]["raw"]);
        assert!(unique > 1.0 && unique < 1.6, "{unique}\n{g}");
        let shared = mib(&g["shared_bytes"]);
        assert!(shared > 6.4 && shared < 7.0, "{shared}\n{g}");
        assert!((mib(&g["chunk_bytes"]) - 8.0).abs() < 0.01, "{g}");
    }

    // What removing a's first night would free is exactly its unique objects.
    let r = vmrepo([
        s("forget"),
        p(&repo),
        s("a@2026-11-01T00:00:00Z"),
        s("--dry-run"),
        s("--json"),
    ]);
    let f = r.ok().json();
    assert_eq!(
        f["forget"]["objects_unreferenced"], a1["unique"]["objects"],
        "{f}\n{a1}"
    );
    assert_eq!(
        f["forget"]["bytes_unreferenced"], a1["unique"]["stored"],
        "{f}\n{a1}"
    );

    // After the removal, before gc: that much is referenced by no generation.
    vmrepo([s("forget"), p(&repo), s("a@2026-11-01T00:00:00Z")]).ok();
    let j2 = vmrepo([s("stats"), p(&repo), s("a"), s("--json")])
        .ok()
        .json();
    let unreferenced =
        j2["stored"]["stored"].as_u64().unwrap() - j2["referenced"]["stored"].as_u64().unwrap();
    // The tombstone is referenced by nothing either, and is kept.
    assert!(
        unreferenced >= a1["unique"]["stored"].as_u64().unwrap(),
        "{j2}"
    );
    assert_eq!(j2["vms"].as_array().unwrap().len(), 1);
    let a2_now = &j2["vms"][0]["generations"][0];
    assert!(
        (mib(&a2_now["unique"]["raw"]) - 8.0).abs() < 0.2,
        "{a2_now}"
    );

    // The text form names the columns; an unknown VM is an error naming the VMs.
    let r = vmrepo([s("stats"), p(&repo), s("--generations")]);
    assert!(r.ok().stdout.contains("UNIQUE (STORED)"), "{}", r.stdout);
    assert!(r.stdout.contains("dedup "), "{}", r.stdout);
    let r = vmrepo([s("stats"), p(&repo), s("nope")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no VM named \"nope\""), "{}", r.stderr);
}
