//! Segments stored as differences from the night before: a night stores a few edits instead
//! of every changed segment's whole chunk list, and every generation stays restorable through
//! prune, gc, an index rebuilt from the data files, and a copy to another repository.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A 16 MiB disk (four 4 MiB segments) of unique lines that compress well, so that a night's
/// new chunks weigh little next to the chunk lists.
fn make_disk(path: &Path) {
    let mut text = Vec::with_capacity(16 << 20);
    let mut n = 0u64;
    while text.len() < 16 << 20 {
        text.extend_from_slice(
            format!("block {n:012} of the sample disk, all unique\n").as_bytes(),
        );
        n += 1;
    }
    text.truncate(16 << 20);
    fs::write(path, text).unwrap();
}

/// Overwrites 4 KiB at `places` (in KiB) with lines of their own.
fn change(path: &Path, places: &[u64], night: u32) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    for &kib in places {
        let mut line = format!("night {night} rewrote the block at {kib} KiB. ").into_bytes();
        line.resize(4096, b'.');
        f.write_all_at(&line, kib << 10).unwrap();
    }
}

fn data_bytes(repo: &Path) -> u64 {
    tree_size(&repo.join("data"))
}

fn extract(repo: &Path, generation: &str, out: &Path) -> std::path::PathBuf {
    let _ = fs::remove_dir_all(out);
    vmrepo([s("extract"), p(repo), s(generation), p(out)]).ok();
    out.join("d.img")
}

/// Ingests the changes at `places` (KiB) as a change-aware night at `time`.
fn change_aware_night(repo: &Path, img: &Path, places: &[u64], night: u32, time: &str) -> Run {
    change(img, places, night);
    let list = img.with_file_name("changes.json");
    let ranges: Vec<_> = places
        .iter()
        .map(|kib| serde_json::json!({"offset": kib << 10, "length": 4096}))
        .collect();
    fs::write(&list, serde_json::to_string(&ranges).unwrap()).unwrap();
    vmrepo([
        s("ingest"),
        p(repo),
        p(img),
        s("--name"),
        s("d"),
        s("--time"),
        s(time),
        s("--changed-ranges"),
        p(&list),
        s("--since"),
        s("d"),
        s("--json"),
    ])
}

/// The first segment of `generation`'s first disk, and the base it is stored against.
fn first_segment(repo: &Path, generation: &str) -> (vmrepo::ObjectId, Option<vmrepo::ObjectId>) {
    use vmrepo::repo::lock::LockMode;
    let r = vmrepo::Repository::open(repo, LockMode::Shared).unwrap();
    let g = r.open_index().unwrap().resolve(generation).unwrap();
    let m = r.load_manifest(&g.manifest).unwrap();
    let seg = r.load_disk_map(&m.disks[0].disk_map).unwrap().get(0);
    let stored = vmrepo::repo::decode_stored_segment(&seg, &r.read_object(&seg).unwrap()).unwrap();
    (seg, stored.base())
}

/// Flips bit `bit` in the middle of object `id`'s stored payload.
fn damage_record(repo: &Path, id: &vmrepo::ObjectId, bit: u8) {
    use vmrepo::repo::lock::LockMode;
    let r = vmrepo::Repository::open(repo, LockMode::Shared).unwrap();
    let at = r
        .open_index()
        .unwrap()
        .lookup(id)
        .unwrap()
        .expect("indexed");
    let pack = repo
        .join("data")
        .join(&at.pack[..2])
        .join(format!("{}.pack", at.pack));
    flip_bit(&pack, at.offset + 52 + at.header.stored_len as u64 / 2, bit);
}

/// The lines of `check`'s output that name a damaged generation.
fn damaged_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("DAMAGED"))
        .collect()
}

#[test]
fn a_night_that_changes_a_few_blocks_stores_edits_not_chunk_lists() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let (with, without, old) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    for r in [&with, &without, &old] {
        vmrepo([s("init"), p(r)]).ok();
    }
    // A repository of format 1, as older builds made it, which they must go on reading.
    let config = fs::read_to_string(old.join("config.toml")).unwrap();
    assert!(config.contains("format_version = 4"), "{config}");
    fs::write(
        old.join("config.toml"),
        config.replace("format_version = 4", "format_version = 1"),
    )
    .unwrap();
    for r in [&with, &without, &old] {
        ingest_at(r, &img, "d", "2026-12-01T01:00:00Z");
    }
    // A block in each of the four segments.
    change(&img, &[100, 5000, 9000, 14000], 2);
    let before = [&with, &without, &old].map(|r| data_bytes(r));
    ingest_at(&with, &img, "d", "2026-12-02T01:00:00Z");
    // A VM of another name has no night before to be stored against.
    ingest_at(&without, &img, "other", "2026-12-02T01:00:00Z");
    ingest_at(&old, &img, "d", "2026-12-02T01:00:00Z");
    let grew = [&with, &without, &old].map(|r| data_bytes(r));
    let grew: Vec<u64> = grew.iter().zip(before).map(|(a, b)| a - b).collect();
    // Four whole lists of 256 chunk ids are about 37 KB; four deltas a few hundred bytes.
    assert!(
        grew[0] + 25_000 < grew[1],
        "the night stored {} bytes against {} with whole segments",
        grew[0],
        grew[1]
    );
    assert!(
        grew[0] + 25_000 < grew[2],
        "format 1: the night stored {} bytes against {} in format 3",
        grew[2],
        grew[0]
    );
    let out = extract(&old, "d@2026-12-02T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
    let out = extract(&with, "d@2026-12-02T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
    vmrepo([s("check"), p(&with), s("--read-data")]).ok();
}

#[test]
fn nights_stored_as_deltas_survive_prune_gc_rebuild_and_copy() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    let saved = t.path().join("saved");
    fs::create_dir(&saved).unwrap();
    let mut nights = Vec::new();
    for night in 1..=4u32 {
        if night > 1 {
            let k = night as u64;
            change(
                &img,
                &[k * 64, 4096 + k * 300, 8192 + k * 40, 16380 - k * 8],
                night,
            );
        }
        let time = format!("2026-12-0{night}T01:00:00Z");
        ingest_at(&repo, &img, "d", &time);
        let copy = saved.join(format!("n{night}"));
        fs::copy(&img, &copy).unwrap();
        nights.push((format!("d@{time}"), copy));
    }
    // Night 1 holds the whole segments the later nights are stored against: forget it, and
    // make gc rewrite every data file down to what is live.
    vmrepo([s("forget"), p(&repo), s(&nights[0].0)]).ok();
    vmrepo([
        s("gc"),
        p(&repo),
        s("--repack-threshold"),
        s("100"),
        s("--max-unused"),
        s("0"),
    ])
    .ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    for (name, copy) in &nights[1..] {
        let out = extract(&repo, name, &t.path().join("o"));
        assert!(same_file(&out, copy), "{name} after gc");
    }

    // The index is a cache: rebuilt from the data files, it knows the same generations.
    fs::remove_file(repo.join("index.sqlite")).unwrap();
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = extract(&repo, &nights[3].0, &t.path().join("o"));
    assert!(same_file(&out, &nights[3].1), "after the rebuild");

    // A copy holds every segment it needs.
    let other = t.path().join("other");
    vmrepo([s("init"), p(&other)]).ok();
    vmrepo([s("copy"), p(&repo), p(&other)]).ok();
    vmrepo([s("check"), p(&other), s("--read-data")]).ok();
    for (name, copy) in &nights[1..] {
        let out = extract(&other, name, &t.path().join("o"));
        assert!(same_file(&out, copy), "{name} in the copy");
    }
    // A night ingested after the copy is stored against what the copy holds.
    change(&img, &[200, 12000], 5);
    ingest_at(&other, &img, "d", "2026-12-05T01:00:00Z");
    let out = extract(&other, "d@2026-12-05T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
    vmrepo([s("check"), p(&other), s("--read-data")]).ok();
}

#[test]
fn change_aware_nights_patch_segments_stored_as_deltas() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    ingest_at(&repo, &img, "d", "2026-12-01T01:00:00Z");
    for night in 2..=5u32 {
        let k = night as u64;
        let places = [k * 64, 4096 + k * 300, 12000 + k * 8];
        let before = data_bytes(&repo);
        let time = format!("2026-12-0{night}T01:00:00Z");
        let j = change_aware_night(&repo, &img, &places, night, &time)
            .ok()
            .json();
        assert_eq!(
            j["incremental"]["segments_patched"], 3,
            "night {night}: {j}"
        );
        // Three whole chunk lists would be 28 KB on their own.
        let grew = data_bytes(&repo) - before;
        assert!(grew < 20_000, "night {night} stored {grew} bytes: {j}");
        let out = extract(&repo, &format!("d@{time}"), &t.path().join("o"));
        assert!(same_file(&out, &img), "night {night}");
    }
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn a_damaged_base_is_named_in_every_generation_stored_against_it_and_never_restored() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    for night in 1..=3u32 {
        if night > 1 {
            change(&img, &[night as u64 * 100, 9000 + night as u64], night);
        }
        ingest_at(&repo, &img, "d", &format!("2026-12-0{night}T01:00:00Z"));
    }
    let other = t.path().join("e.img");
    sparse_image(&other, 8 << 20, &[(0, 8 << 20, 77)]);
    ingest_at(&repo, &other, "e", "2026-12-03T02:00:00Z");

    // The whole segment night 2's first segment is stored against: night 1's.
    let (_, base) = first_segment(&repo, "d@2026-12-02T01:00:00Z");
    damage_record(&repo, &base.expect("night 2's first segment is a delta"), 2);

    let r = vmrepo([s("check"), p(&repo)]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let damaged = damaged_lines(&r.stdout);
    for night in 1..=3 {
        let name = format!("DAMAGED  d@2026-12-0{night}T01:00:00Z");
        assert!(damaged.iter().any(|l| l.starts_with(&name)), "{}", r.stdout);
    }
    assert_eq!(damaged.len(), 3, "{}", r.stdout);

    let out = t.path().join("o");
    let r = vmrepo([s("extract"), p(&repo), s("d@2026-12-02T01:00:00Z"), p(&out)]);
    assert_ne!(r.code, 0, "a generation whose base is damaged was restored");
    assert!(r.stderr.contains("stored against segment"), "{}", r.stderr);
    let out = extract(&repo, "e@2026-12-03T02:00:00Z", &t.path().join("o2"));
    assert!(same_file(&out.with_file_name("e.img"), &other));
}

#[test]
fn an_upgraded_repository_stores_its_next_nights_as_deltas() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    // A repository of format 1, as older builds made it.
    let config = repo.join("config.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("format_version = 4", "format_version = 1"),
    )
    .unwrap();
    let saved = t.path().join("n1");
    ingest_at(&repo, &img, "d", "2026-12-01T01:00:00Z");
    fs::copy(&img, &saved).unwrap();
    change(&img, &[100, 5000, 9000, 14000], 2);
    let before = data_bytes(&repo);
    ingest_at(&repo, &img, "d", "2026-12-02T01:00:00Z");
    let whole = data_bytes(&repo) - before;

    let r = vmrepo([s("upgrade"), p(&repo), s("--dry-run")]);
    r.ok();
    assert!(r.stdout.contains("would upgrade"), "{}", r.stdout);
    assert!(fs::read_to_string(&config)
        .unwrap()
        .contains("format_version = 1"));
    let r = vmrepo([s("upgrade"), p(&repo)]);
    r.ok();
    assert!(r.stdout.contains("from format 1 to 4"), "{}", r.stdout);
    assert!(fs::read_to_string(&config)
        .unwrap()
        .contains("format_version = 4"));
    let r = vmrepo([s("upgrade"), p(&repo)]);
    r.ok();
    assert!(r.stdout.contains("already format 4"), "{}", r.stdout);

    change(&img, &[200, 5100, 9100, 14100], 3);
    let before = data_bytes(&repo);
    ingest_at(&repo, &img, "d", "2026-12-03T01:00:00Z");
    let delta = data_bytes(&repo) - before;
    assert!(
        delta + 25_000 < whole,
        "after the upgrade a night stored {delta} bytes, before it {whole}"
    );
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = extract(&repo, "d@2026-12-01T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &saved));
    let out = extract(&repo, "d@2026-12-03T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
}

#[test]
fn a_damaged_base_costs_a_change_aware_night_a_full_read_of_its_segment_not_the_backup() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    ingest_at(&repo, &img, "d", "2026-12-01T01:00:00Z");
    let j = change_aware_night(&repo, &img, &[100], 2, "2026-12-02T01:00:00Z")
        .ok()
        .json();
    assert_eq!(j["incremental"]["segments_patched"], 1, "{j}");
    // Night 1's first segment, which night 2's is stored against, is damaged.
    let (base, _) = first_segment(&repo, "d@2026-12-01T01:00:00Z");
    damage_record(&repo, &base, 5);

    let r = change_aware_night(&repo, &img, &[200], 3, "2026-12-03T01:00:00Z");
    let j = r.ok().json();
    assert_eq!(j["incremental"]["segments_patched"], 0, "{j}");
    let out = extract(&repo, "d@2026-12-03T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img), "tonight's generation");
    let r = vmrepo([s("check"), p(&repo)]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let damaged = damaged_lines(&r.stdout);
    assert_eq!(damaged.len(), 2, "{}", r.stdout);
    assert!(!r.stdout.contains("DAMAGED  d@2026-12-03"), "{}", r.stdout);
}
