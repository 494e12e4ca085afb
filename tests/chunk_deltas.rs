//! Chunks stored as zstd deltas of the chunks they replace (format 4): a night that rewrites a
//! few 4 KiB blocks stores about those blocks, not the whole chunks around them, and every
//! generation stays restorable when the generation holding a base is forgotten, the index is
//! rebuilt from the data files or is older than they are, and the repository is copied.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A 16 MiB disk of bytes that compress by about half (see `common::bytes`).
fn make_disk(path: &Path) {
    fs::write(path, bytes(16 << 20, 41)).unwrap();
}

/// Overwrites 4 KiB at each of `places` (in KiB) with bytes of their own.
fn change(path: &Path, places: &[u64], night: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    for &kib in places {
        f.write_all_at(&bytes(4096, night * 1_000_003 + kib), kib << 10)
            .unwrap();
    }
}

fn data_bytes(repo: &Path) -> u64 {
    tree_size(&repo.join("data"))
}

fn extract(repo: &Path, generation: &str, out: &Path) -> PathBuf {
    let _ = fs::remove_dir_all(out);
    vmrepo([s("extract"), p(repo), s(generation), p(out)]).ok();
    out.join("d.img")
}

/// How many of the index's object rows are deltas.
fn deltas(repo: &Path) -> i64 {
    let c = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
    c.query_row(
        "SELECT count(*) FROM all_objects WHERE base IS NOT NULL",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// A work directory holding the disk `d.img` ([`make_disk`]) and a repository with VM `d`'s
/// first night (2026-12-01) of it.
fn first_night() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    ingest_at(&repo, &img, "d", "2026-12-01T01:00:00Z");
    (t, img, repo)
}

/// Eight blocks spread over the disk's four segments.
const PLACES: [u64; 8] = [100, 1700, 4500, 6000, 9000, 11111, 13000, 16000];

#[test]
fn a_night_that_rewrites_a_few_blocks_stores_about_those_blocks() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let (new, old) = (t.path().join("new"), t.path().join("old"));
    vmrepo([s("init"), p(&new)]).ok();
    // Format 3, as builds before chunk deltas made it: chunks are stored whole.
    vmrepo([s("init"), p(&old), s("--format"), s("3")]).ok();
    let config = fs::read_to_string(old.join("config.toml")).unwrap();
    assert!(config.contains("format_version = 3"), "{config}");
    for (format, encryption) in [("5", "none"), ("0", "none"), ("1", "aes-256-gcm")] {
        let r = vmrepo([
            s("init"),
            p(&t.path().join(format!("bad{format}"))),
            s("--format"),
            s(format),
            s("--encryption"),
            s(encryption),
        ]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("format {format} cannot be made")),
            "{}",
            r.stderr
        );
        assert!(!t
            .path()
            .join(format!("bad{format}"))
            .join("config.toml")
            .exists());
    }
    for r in [&new, &old] {
        ingest_at(r, &img, "d", "2026-12-01T01:00:00Z");
    }
    change(&img, &PLACES, 2);
    let before = [&new, &old].map(|r| data_bytes(r));
    for r in [&new, &old] {
        ingest_at(r, &img, "d", "2026-12-02T01:00:00Z");
    }
    let grew: Vec<u64> = [&new, &old]
        .iter()
        .zip(before)
        .map(|(r, b)| data_bytes(r) - b)
        .collect();
    // The new blocks compress to about 8 × 2.2 KB; the chunks around them (16 KiB on average,
    // often two per block) to ten times that.
    assert!(
        grew[0] * 3 < grew[1],
        "format 4 stored {} bytes for the night, format 3 {}",
        grew[0],
        grew[1]
    );
    assert!(grew[0] < 60_000, "the night stored {} bytes", grew[0]);
    assert!(deltas(&new) > 0);
    assert_eq!(deltas(&old), 0);
    for r in [&new, &old] {
        let out = extract(r, "d@2026-12-02T01:00:00Z", &t.path().join("o"));
        assert!(same_file(&out, &img));
        vmrepo([s("check"), p(r), s("--read-data")]).ok();
    }
}

#[test]
fn bases_outlive_the_generations_that_listed_them_through_gc_rebuild_and_copy() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    make_disk(&img);
    let repo = init_repo(t.path());
    let saved = t.path().join("saved");
    fs::create_dir(&saved).unwrap();
    let mut nights = Vec::new();
    for night in 1..=4u64 {
        if night > 1 {
            // The same blocks each night: every later version is stored against night 1's
            // chunks there.
            change(&img, &PLACES, night);
        }
        let time = format!("2026-12-0{night}T01:00:00Z");
        ingest_at(&repo, &img, "d", &time);
        let copy = saved.join(format!("n{night}"));
        fs::copy(&img, &copy).unwrap();
        nights.push((format!("d@{time}"), copy));
    }
    assert!(deltas(&repo) > 8, "{} deltas", deltas(&repo));
    // Night 1 alone lists the bases: forget it and the nights after it but the last, and make
    // gc rewrite every data file down to what is live.
    for (name, _) in &nights[..3] {
        vmrepo([s("forget"), p(&repo), s(name)]).ok();
    }
    let gc = [
        s("gc"),
        p(&repo),
        s("--repack-threshold"),
        s("100"),
        s("--max-unused"),
        s("0"),
    ];
    vmrepo(gc.clone()).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let (last, last_copy) = &nights[3];
    let out = extract(&repo, last, &t.path().join("o"));
    assert!(same_file(&out, last_copy), "after gc");

    // What forgetting the last night would free counts the bases it needs.
    let stats = vmrepo([s("stats"), p(&repo), s("--json")]).ok().json();
    let unique = &stats["vms"][0]["generations"][0]["unique"]["stored"];
    let total = stats["stored"]["stored"].as_u64().unwrap();
    assert!(
        unique.as_u64().unwrap() * 10 > total * 9,
        "the one generation left owns {unique} of {total} stored bytes"
    );

    // The index is a cache: rebuilt from the data files, it knows every base, and a gc with
    // it keeps them.
    fs::remove_file(repo.join("index.sqlite")).unwrap();
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    assert!(deltas(&repo) > 8);
    vmrepo(gc.clone()).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = extract(&repo, last, &t.path().join("o"));
    assert!(same_file(&out, last_copy), "after a rebuild and a gc");

    // A copy holds whole chunks and restores the same bytes.
    let other = t.path().join("other");
    vmrepo([s("init"), p(&other)]).ok();
    vmrepo([s("copy"), p(&repo), p(&other)]).ok();
    vmrepo([s("check"), p(&other), s("--read-data")]).ok();
    let out = extract(&other, last, &t.path().join("o"));
    assert!(same_file(&out, last_copy), "in the copy");
}

#[test]
fn an_index_older_than_the_deltas_costs_no_base() {
    let (t, img, repo) = first_night();
    let stale = t.path().join("index.stale");
    fs::copy(repo.join("index.sqlite"), &stale).unwrap();
    for night in 2..=3u64 {
        change(&img, &PLACES, night);
        ingest_at(&repo, &img, "d", &format!("2026-12-0{night}T01:00:00Z"));
    }
    // The index goes back to the night-1 state (a restored backup of it) and night 1 is
    // forgotten with it: the deltas of nights 2 and 3 are in data files it does not know.
    for ext in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(repo.join(format!("index.sqlite{ext}")));
    }
    fs::copy(&stale, repo.join("index.sqlite")).unwrap();
    // gc adopts the nights the index does not list, with their deltas, and keeps their bases.
    let r = vmrepo([
        s("gc"),
        p(&repo),
        s("--repack-threshold"),
        s("100"),
        s("--json"),
    ])
    .ok()
    .json();
    assert_eq!(r["adopted"].as_array().unwrap().len(), 2, "{r}");
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = extract(&repo, "d@2026-12-03T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
    // And so does one with an index rebuilt from the data files.
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    vmrepo([s("forget"), p(&repo), s("d@2026-12-01T01:00:00Z")]).ok();
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
    let out = extract(&repo, "d@2026-12-03T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
}

#[test]
fn a_damaged_base_is_named_for_each_generation_stored_against_it() {
    let (t, img, repo) = first_night();
    change(&img, &PLACES[..1], 2);
    ingest_at(&repo, &img, "d", "2026-12-02T01:00:00Z");
    // The one delta, and the night-1 chunk it is stored against.
    let c = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
    let (base, pack, offset, stored): (Vec<u8>, String, i64, i64) = c
        .query_row(
            "SELECT b.id, p.name, b.offset, b.stored_len
             FROM all_objects d JOIN all_objects b ON b.id = d.base JOIN packs p ON p.id = b.pack
             WHERE d.base IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    drop(c);
    let file = repo
        .join("data")
        .join(&pack[..2])
        .join(format!("{pack}.pack"));
    flip_bit(&file, offset as u64 + 52 + stored as u64 / 2, 3);
    let run = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let short = &hex::encode(&base)[..12];
    for night in ["2026-12-01", "2026-12-02"] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.starts_with("DAMAGED") && l.contains(night)),
            "night {night} not reported damaged:\n{}",
            run.stdout
        );
    }
    assert!(
        run.stdout
            .contains(&format!("stored against chunk {short}")),
        "{}",
        run.stdout
    );
    // A restore of night 2 stops with the damage named, and writes no wrong bytes.
    let out = t.path().join("o");
    let run = vmrepo([s("extract"), p(&repo), s("d@2026-12-02T01:00:00Z"), p(&out)]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains(short), "{}", run.stderr);
    assert!(!out.join("d.img").exists());

    // Repair forgets the base and the delta with it: the next ingest of the same disk cannot
    // deduplicate against a chunk it could not read back, stores both again, and heals.
    let r = vmrepo([s("check"), p(&repo), s("--repair")]);
    assert_eq!(r.code, 1, "repair must say data was lost\n{}", r.stdout);
    assert_eq!(deltas(&repo), 0);
    let r = vmrepo([s("ingest"), p(&repo), p(&img), s("--name"), s("d")])
        .ok()
        .stdout
        .clone();
    assert!(r.contains("healed      d@2026-12-02T01:00:00Z"), "{r}");
    let out = extract(&repo, "d@2026-12-02T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
    let out = extract(&repo, "d", &t.path().join("o"));
    assert!(same_file(&out, &img));
}

/// Night 1, then night 2 (`d@2026-12-02T01:00:00Z`), which rewrites all but the first MiB and
/// edits one block in it: a delta against a night-1 chunk, whose data file is nearly all dead
/// once night 1 is forgotten. Then the index loses the row of that base (a stale or
/// hand-edited cache) while the delta's row stays. Returns the base's id too.
fn a_delta_whose_base_row_is_lost() -> (tempfile::TempDir, PathBuf, PathBuf, Vec<u8>) {
    let (t, img, repo) = first_night();
    {
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&bytes(15 << 20, 77), 1 << 20).unwrap();
    }
    change(&img, &PLACES[..1], 2);
    ingest_at(&repo, &img, "d", "2026-12-02T01:00:00Z");
    assert_eq!(deltas(&repo), 1);
    let c = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
    let base: Vec<u8> = c
        .query_row(
            "SELECT base FROM all_objects WHERE base IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let removed = c
        .execute("DELETE FROM objects WHERE id = ?1", [&base])
        .unwrap()
        + c.execute("DELETE FROM recent_objects WHERE id = ?1", [&base])
            .unwrap();
    assert_eq!(removed, 1);
    (t, img, repo, base)
}

/// The index lost the row of a base (a stale or hand-edited cache) while the delta's row stays:
/// check says which chunk is stored against what; gc, rewriting the data file that holds the
/// base after the generation that listed it is forgotten, keeps it; and the index rebuilt from
/// the data files makes the generation stored against it restorable again.
#[test]
fn an_index_that_lost_a_base_row_loses_no_base_in_gc() {
    let (t, img, repo, base) = a_delta_whose_base_row_is_lost();
    let short = &hex::encode(&base)[..12];

    // The same answer whether check holds the deltas' bases in memory or, as on a repository
    // of millions of objects, files them on disk by id.
    for tiny in [false, true] {
        let run = vmrepo_batches(tiny, [s("check"), p(&repo)]);
        assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
        assert!(
            run.stdout.contains(&format!(
                "is stored against chunk {short}, which is missing from the repository"
            )),
            "{}",
            run.stdout
        );
    }
    vmrepo([s("forget"), p(&repo), s("d@2026-12-01T01:00:00Z")]).ok();
    let gc = vmrepo([s("gc"), p(&repo)]).ok().stdout.clone();
    assert!(
        gc.contains("kept data file as it is: pack ")
            && gc.contains("it holds 1 object(s) that generations use and the index does not list"),
        "{gc}"
    );

    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = extract(&repo, "d@2026-12-02T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
}

/// The same lost row, and a gc in between that compacts the pack descriptions (it deleted
/// another VM's data file): the compacted descriptions still list the base, as the data file
/// holds it, so the gc that rewrites that file afterwards still sees the base the index lacks
/// and keeps it (descriptions written from the index alone left it out, and that gc dropped
/// the base, losing the generation stored against it).
#[test]
fn a_compaction_after_an_index_lost_a_base_row_still_describes_the_base() {
    let (t, img, repo, _) = a_delta_whose_base_row_is_lost();

    // Another VM, forgotten and collected: its data file is deleted, and the descriptions of
    // every pack are compacted.
    let other = t.path().join("other.img");
    fs::write(&other, bytes(2 << 20, 99)).unwrap();
    ingest_at(&repo, &other, "e", "2026-12-02T02:00:00Z");
    vmrepo([s("forget"), p(&repo), s("e@2026-12-02T02:00:00Z")]).ok();
    let gc = vmrepo([s("gc"), p(&repo)]).ok().stdout.clone();
    assert!(gc.contains("pack descriptions compacted"), "{gc}");

    vmrepo([s("forget"), p(&repo), s("d@2026-12-01T01:00:00Z")]).ok();
    let gc = vmrepo([s("gc"), p(&repo)]).ok().stdout.clone();
    assert!(
        gc.contains("it holds 1 object(s) that generations use and the index does not list"),
        "{gc}"
    );
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = extract(&repo, "d@2026-12-02T01:00:00Z", &t.path().join("o"));
    assert!(same_file(&out, &img));
}
