//! Deduplication across generations and VMs, zeros that cost nothing, and metadata that grows
//! with what changed rather than with disk size.

mod common;
use common::*;

fn stat(v: &serde_json::Value, k: &str) -> u64 {
    v["stats"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{k} in {v}"))
}

#[test]
fn unchanged_and_slightly_changed_nights_store_little() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(
        t.path(),
        "web01",
        &[(256 << 20, vec![(0, 64 << 20, 1), (128 << 20, 64 << 20, 2)])],
    );
    let repo = init_repo(t.path());
    let first = ingest(&repo, &vm, None);
    assert!(stat(&first, "bytes_new") >= 128 << 20);
    assert!(
        stat(&first, "bytes_stored") < stat(&first, "bytes_read"),
        "compression did nothing: {first}"
    );

    let second = ingest(&repo, &vm, None);
    assert_eq!(
        stat(&second, "bytes_new"),
        0,
        "an unchanged VM stored new chunks: {second}"
    );
    assert_eq!(stat(&second, "chunks_new"), 0);

    // Night 3: 20 scattered in-place 4 KiB writes (an ext4-like churn pattern).
    let flat = vm.join("web01-flat.vmdk");
    for i in 0..20u64 {
        overwrite(&flat, (i * 6 + 1) << 20, 4096, 100 + i);
    }
    let third = ingest(&repo, &vm, None);
    let new = stat(&third, "bytes_new");
    assert!(new > 0, "a change was missed: {third}");
    // Each 4 KiB write touches one or two chunks (the default maximum is 64 KiB; allow 256 KiB).
    assert!(
        new <= (20 * 512) << 10,
        "too much stored for 80 KiB of change: {new}"
    );

    // The same disk under another VM name dedups completely.
    let other = ingest(&repo, &flat, Some("web01-clone"));
    assert_eq!(stat(&other, "bytes_new"), 0, "{other}");

    // And every generation restores to what it was.
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    assert!(same_file(&flat, &out.join("web01-flat.vmdk")));
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn holes_are_not_read_and_zeros_are_not_stored() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("thin.img");
    // 100 GiB virtual, 48 MiB of data in three places, plus an allocated all-zero region.
    sparse_image(
        &img,
        100 << 30,
        &[
            (0, 16 << 20, 1),
            (40 << 30, 16 << 20, 2),
            ((100 << 30) - (16 << 20), 16 << 20, 3),
        ],
    );
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0u8; 32 << 20], 60 << 30).unwrap();
    }
    let repo = init_repo(t.path());
    let r = ingest(&repo, &img, Some("thin"));
    assert_eq!(stat(&r, "virtual_bytes"), 100 << 30);
    let read = stat(&r, "bytes_read");
    assert!(
        (48 << 20..=96 << 20).contains(&read),
        "read {read} bytes of a 100 GiB disk with 80 MiB allocated"
    );
    assert_eq!(stat(&r, "bytes_data"), 48 << 20, "zero runs were chunked");
    assert!(stat(&r, "bytes_new") <= 48 << 20);
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("thin"), p(&out)]).ok();
    let restored = out.join("thin.img");
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), 100 << 30);
    assert!(allocated(&restored) < 64 << 20, "restore is not sparse");
    // Compare only the regions with data (cmp over 100 GiB of holes would take minutes).
    for off in [0u64, 40 << 30, (100 << 30) - (16 << 20), 60 << 30] {
        let r = sh(&format!(
            "cmp -s -i {off}:{off} -n {} '{}' '{}'",
            32 << 20,
            img.display(),
            restored.display()
        ));
        assert_eq!(r.code, 0, "region at {off} differs");
    }
}

#[test]
fn metadata_of_an_unchanged_20_gib_disk_costs_under_256_kib() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("big.img");
    let repo = init_repo(t.path());
    let config = std::fs::read_to_string(repo.join("config.toml")).unwrap();
    let segment: u64 = config
        .lines()
        .find_map(|l| l.strip_prefix("segment_size = "))
        .unwrap()
        .parse()
        .unwrap();
    // Data in every segment, so every segment has a real chunk list.
    let count = (20u64 << 30) / segment;
    let regions: Vec<(u64, usize, u64)> = (0..count)
        .map(|i| (i * segment + 4096, 32 << 10, i))
        .collect();
    sparse_image(&img, 20 << 30, &regions);
    ingest(&repo, &img, Some("big"));
    let before = tree_size(&repo);
    let again = ingest(&repo, &img, Some("big"));
    assert_eq!(again["stats"]["segments_reused"], count);
    let after = tree_size(&repo);
    let grew = after.saturating_sub(before);
    assert!(
        grew < 256 << 10,
        "an unchanged 20 GiB disk added {grew} bytes to the repository"
    );
}
