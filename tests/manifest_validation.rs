//! One validation of manifests for every reader: hand-built manifests (names that leave the
//! restore directory, a VM called `../../evilvm`, duplicate names, a size the disk map
//! disagrees with) are refused by check, by an index rebuild, by extract and by the mount's
//! listing, never restored and never listed.

mod common;
use common::*;
use std::fs;
use std::io::Read;
use std::path::Path;

const RECORD_HEADER_LEN: usize = 52;

/// The manifests stored in a repository's packs (unencrypted): their JSON.
fn stored_manifests(repo: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for pack in packs(repo) {
        let b = fs::read(&pack).unwrap();
        let mut at = 16;
        while at + RECORD_HEADER_LEN <= b.len() {
            let h = &b[at..at + RECORD_HEADER_LEN];
            assert_eq!(&h[..4], b"vrOB");
            let stored = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
            let payload = &b[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + stored];
            if h[4] == 5 {
                let plain = if h[5] == 1 {
                    let mut v = Vec::new();
                    zstd::Decoder::new(payload)
                        .unwrap()
                        .read_to_end(&mut v)
                        .unwrap();
                    v
                } else {
                    payload.to_vec()
                };
                out.push(serde_json::from_slice(&plain).unwrap());
            }
            at += RECORD_HEADER_LEN + stored;
        }
    }
    out
}

/// Writes `manifest` as the only record of a new pack file, as the format describes it
/// (raw codec, no cipher).
fn plant_manifest(repo: &Path, manifest: &serde_json::Value, seed: u8) {
    let plain = serde_json::to_vec(manifest).unwrap();
    let id = blake3::hash(&plain);
    let mut rec = Vec::new();
    rec.extend_from_slice(b"vrOB");
    rec.extend_from_slice(&[5, 0, 0, 0]);
    rec.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    rec.extend_from_slice(&(plain.len() as u32).to_le_bytes());
    rec.extend_from_slice(id.as_bytes());
    let crc = crc32fast::hash(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    rec.extend_from_slice(&plain);
    let mut pack = b"VMREPACK".to_vec();
    pack.extend_from_slice(&1u32.to_le_bytes());
    pack.extend_from_slice(&0u32.to_le_bytes());
    pack.extend_from_slice(&rec);
    let name = format!("{:02x}{}", seed, "e".repeat(30));
    let dir = repo.join("data").join(&name[..2]);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("{name}.pack")), pack).unwrap();
}

#[test]
fn hand_built_manifests_are_refused_by_every_reader() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let img = t.path().join("web01.img");
    fs::write(&img, bytes(1 << 20, 3)).unwrap();
    ingest(&repo, &img, Some("web01"));
    let good = stored_manifests(&repo).pop().unwrap();

    // Each hostile variant, with its own time so that none collides with the real one.
    let mut variants: Vec<(&str, serde_json::Value)> = Vec::new();
    for (i, name) in ["../../x", "/abs", "", "."].iter().enumerate() {
        let mut m = good.clone();
        m["files"] = serde_json::json!([{ "name": name, "size": 1, "object": good["disks"][0]["disk_map"] }]);
        m["catalog"]["time"] = serde_json::json!(format!("2030-01-01T00:00:0{i}Z"));
        variants.push(("file name", m));
    }
    let mut m = good.clone();
    m["catalog"]["vm"] = serde_json::json!("../../evilvm");
    variants.push(("VM name", m));
    for (i, (_, m)) in variants.iter().enumerate() {
        plant_manifest(&repo, m, 0x10 + i as u8);
    }
    // check reports them and calls the repository not clean.
    let c = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(c.code, 1, "{}", c.stdout);
    assert!(
        c.stdout
            .contains("manifest(s) in the data files are not generations")
            || c.stdout.contains("not a relative path"),
        "{}",
        c.stdout
    );
    // A rebuild lists none of them.
    let r = vmrepo([s("check"), p(&repo), s("--rebuild-index")]);
    assert!(r.stdout.contains("not a relative path"), "{}", r.stdout);
    assert!(r.stdout.contains("evilvm"), "{}", r.stdout);
    let l = vmrepo([s("list"), p(&repo), s("--json")]).ok().json();
    let names: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web01"], "{l}");
    assert_eq!(generations(&repo, "web01").len(), 1);
    // gc neither lists nor trusts them, and the real generation restores.
    vmrepo([s("gc"), p(&repo)]).ok();
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    assert!(same_file(&img, &out.join("web01.img")));
    assert!(!t.path().join("x").exists() && !Path::new("/abs").exists());

    // A manifest whose disk size disagrees with its disk map: listed (it is well formed), but
    // check calls it damaged and extract refuses it, naming both sizes.
    let mut m = good.clone();
    m["catalog"]["time"] = serde_json::json!("2030-01-01T00:00:07Z");
    m["disks"][0]["virtual_size"] = serde_json::json!(2 << 20);
    m["disks"][0]["extents"][0]["len"] = serde_json::json!(2 << 20);
    m["disks"][0]["extents"][0]["file_size"] = serde_json::json!(2 << 20);
    plant_manifest(&repo, &m, 0x30);
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]);
    let c = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(c.code, 1, "{}", c.stdout);
    assert!(
        c.stdout
            .contains("the manifest says 2097152 bytes, its disk map 1048576"),
        "{}",
        c.stdout
    );
    let bad = t.path().join("bad");
    let x = vmrepo([
        s("extract"),
        p(&repo),
        s("web01@2030-01-01T00:00:07Z"),
        p(&bad),
    ]);
    assert_ne!(x.code, 0, "{}", x.stdout);
    assert!(
        x.stderr.contains("2097152") && x.stderr.contains("1048576"),
        "{}",
        x.stderr
    );
    assert!(
        !bad.exists(),
        "a refused extract left its destination behind"
    );
}
