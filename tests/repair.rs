//! Check and repair: partial reads, repair of corrupt and missing data, damaged generations that
//! extract refuses (or restores partly with --allow-damaged), and healing by a later ingest.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

/// What [`one_flipped_chunk`] made.
struct Flipped {
    t: tempfile::TempDir,
    img: PathBuf,
    repo: PathBuf,
    gen: String,
    pack: PathBuf,
    at: u64,
}

/// One generation (VM `vm`) of a 24 MiB image of `seed` bytes, then one bit flipped a third of
/// the way into its pack: chunk data, not the metadata written at the end.
fn one_flipped_chunk(seed: u64) -> Flipped {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.img");
    sparse_image(&img, 24 << 20, &[(0, 24 << 20, seed)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    let gen = generations(&repo, "vm").pop().unwrap();
    let pack = packs(&repo).pop().unwrap();
    let at = fs::metadata(&pack).unwrap().len() / 3;
    flip_bit(&pack, at, 6);
    Flipped {
        t,
        img,
        repo,
        gen,
        pack,
        at,
    }
}

/// `check --repair` of a repository whose generation `gen` lost one chunk: it says data was
/// lost (exit 1), drops that chunk's index entry and marks `gen` damaged.
fn repair_drops_one_entry(repo: &Path, gen: &str) {
    let r = vmrepo([s("check"), p(repo), s("--repair")]);
    assert_eq!(r.code, 1, "repair must say data was lost\n{}", r.stdout);
    assert!(
        r.stdout.contains("dropped  1 index entries"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("DAMAGED  {gen}")),
        "{}",
        r.stdout
    );
}

#[test]
fn repair_marks_damage_extract_refuses_and_a_new_ingest_heals() {
    let Flipped {
        t, img, repo, gen, ..
    } = one_flipped_chunk(21);
    let r = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    repair_drops_one_entry(&repo, &gen);
    let list = vmrepo([s("list"), p(&repo), s("vm")]).ok().stdout.clone();
    assert!(list.contains("DAMAGED: "), "{list}");

    // extract refuses, listing the damaged range, and writes nothing.
    let out = t.path().join("out");
    let r = vmrepo([s("extract"), p(&repo), s("vm"), p(&out)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("is damaged"), "{}", r.stderr);
    assert!(
        r.stderr.contains("disk image (disk.img) bytes"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--allow-damaged"), "{}", r.stderr);
    assert!(!out.join("disk.img").exists());

    // --allow-damaged writes the rest; the damaged range is zeros, everything else is exact.
    let r = vmrepo([
        s("extract"),
        p(&repo),
        s("vm"),
        p(&out),
        s("--allow-damaged"),
        s("--json"),
    ]);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    let ranges = r.json()["damaged_ranges"].as_array().unwrap().clone();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let (a, b) = (
        ranges[0]["start"].as_u64().unwrap() as usize,
        ranges[0]["end"].as_u64().unwrap() as usize,
    );
    assert!(b > a && b - a <= 64 << 10, "one chunk: {a}..{b}");
    let mut want = fs::read(&img).unwrap();
    want[a..b].fill(0);
    assert!(fs::read(out.join("disk.img")).unwrap() == want);

    // The VM still has the data: the next ingest stores the lost chunk again and heals.
    let r = vmrepo([s("ingest"), p(&repo), p(&img), s("--name"), s("vm")])
        .ok()
        .stdout
        .clone();
    assert!(r.contains(&format!("healed      {gen}")), "{r}");
    let list = vmrepo([s("list"), p(&repo), s("vm")]).ok().stdout.clone();
    assert!(!list.contains("DAMAGED"), "{list}");
    let out2 = t.path().join("out2");
    vmrepo([s("extract"), p(&repo), s(&gen), p(&out2)]).ok();
    assert!(same_file(&out2.join("disk.img"), &img));
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn repair_rebuilds_a_lost_index_and_forgets_a_lost_data_file() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    sparse_image(&a, 8 << 20, &[(0, 8 << 20, 31)]);
    sparse_image(&b, 8 << 20, &[(0, 8 << 20, 32)]);
    ingest(&repo, &a, Some("a"));
    let before = packs(&repo);
    ingest(&repo, &b, Some("b"));

    fs::remove_file(repo.join("index.sqlite")).unwrap();
    let r = vmrepo([s("check"), p(&repo), s("--repair")])
        .ok()
        .stdout
        .clone();
    assert!(r.contains("index rebuilt from 2 data files"), "{r}");
    assert!(r.contains("ok: the repository is consistent"), "{r}");

    // Lose VM b's data file: repair forgets it and marks b's generation damaged, a stays whole.
    let lost: Vec<PathBuf> = packs(&repo)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(lost.len(), 1);
    fs::remove_file(&lost[0]).unwrap();
    let r = vmrepo([s("check"), p(&repo), s("--repair")]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("forgot   data file"), "{}", r.stdout);
    assert!(r.stdout.contains("DAMAGED  b@"), "{}", r.stdout);
    assert!(!r.stdout.contains("DAMAGED  a@"), "{}", r.stdout);
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("a"), p(&out)]).ok();
    assert!(same_file(&out.join("a.img"), &a));
    // gc still works with a damaged generation present and keeps a whole.
    vmrepo([s("gc"), p(&repo)]).ok();
    vmrepo([s("extract"), p(&repo), s("a"), p(&out), s("--force")]).ok();
    assert!(same_file(&out.join("a.img"), &a));
    // b's manifest went with the file, so b's old generation cannot heal; a new ingest of b is
    // complete, and pruning the lost one leaves a clean repository.
    vmrepo([s("ingest"), p(&repo), p(&b), s("--name"), s("b")]).ok();
    let gens = generations(&repo, "b");
    assert_eq!(gens.len(), 2);
    vmrepo([s("extract"), p(&repo), s("b"), p(&out)]).ok();
    assert!(same_file(&out.join("b.img"), &b));
    assert_eq!(vmrepo([s("check"), p(&repo)]).code, 1);
    vmrepo([
        s("prune"),
        p(&repo),
        s("b"),
        s("--keep-last"),
        s("1"),
        s("--gc"),
    ])
    .ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

/// A lost index rebuilt from data files one of whose record headers is damaged: the rebuild
/// reads on past the damaged record (it used to stop there, losing every record after it,
/// here the generation's manifest), so the generation comes back with one chunk missing, and
/// everything else restores byte for byte.
#[test]
fn a_damaged_record_header_costs_the_rebuild_that_record_only() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let a = t.path().join("a.img");
    sparse_image(&a, 8 << 20, &[(0, 8 << 20, 41)]);
    ingest(&repo, &a, Some("a"));
    let all = packs(&repo);
    assert_eq!(all.len(), 1);
    // The third record's header (docs/FORMAT.md: a 16-byte pack header, then records of a
    // 52-byte header and `stored_len` payload bytes); a bit of its id flipped.
    let bytes = fs::read(&all[0]).unwrap();
    let mut at = 16usize;
    for _ in 0..2 {
        let stored = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 52 + stored;
    }
    assert_eq!(&bytes[at..at + 4], b"vrOB");
    flip_bit(&all[0], at as u64 + 20, 3);

    for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = fs::remove_file(repo.join(f));
    }
    let r = vmrepo([s("check"), p(&repo), s("--rebuild-index")]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains(&format!("checksum mismatch at offset {at}")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("reading again from offset"),
        "{}",
        r.stdout
    );
    assert_eq!(generations(&repo, "a").len(), 1, "the generation is back");

    let out = t.path().join("out");
    let x = vmrepo([
        s("extract"),
        p(&repo),
        s("a"),
        p(&out),
        s("--allow-damaged"),
    ]);
    let said = format!("{}{}", x.stdout, x.stderr);
    let range = said
        .split("bytes ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.split_once(".."))
        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("no damaged range named: {said}"));
    assert!(range.1 - range.0 <= 64 << 10, "one chunk at most: {said}");
    let (want, got) = (fs::read(&a).unwrap(), fs::read(out.join("a.img")).unwrap());
    assert_eq!(want.len(), got.len());
    assert!(got[range.0..range.1].iter().all(|&b| b == 0));
    assert_eq!(want[..range.0], got[..range.0]);
    assert_eq!(want[range.1..], got[range.1..]);

    // The next ingest stores the missing chunk again and is whole.
    ingest(&repo, &a, Some("a"));
    let again = t.path().join("again");
    vmrepo([s("extract"), p(&repo), s("a"), p(&again)]).ok();
    assert!(same_file(&a, &again.join("a.img")));
}

#[test]
fn read_data_subsets_cover_everything_over_their_slices() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    for i in 0..6u64 {
        let img = t.path().join(format!("vm{i}.img"));
        sparse_image(&img, 2 << 20, &[(0, 2 << 20, 40 + i)]);
        ingest(&repo, &img, None);
    }
    let all = vmrepo([s("check"), p(&repo), s("--read-data"), s("--json")])
        .ok()
        .json();
    let objects = all["check"]["objects"].as_u64().unwrap();
    assert_eq!(all["check"]["objects_read"].as_u64().unwrap(), objects);
    let mut sum = 0;
    for slice in ["1/3", "2/3", "3/3"] {
        let r = vmrepo([
            s("check"),
            p(&repo),
            s("--read-data-subset"),
            s(slice),
            s("--json"),
        ])
        .ok()
        .json();
        sum += r["check"]["objects_read"].as_u64().unwrap();
    }
    assert_eq!(
        sum, objects,
        "the slices must read every object exactly once"
    );
    let r = vmrepo([
        s("check"),
        p(&repo),
        s("--read-data-subset"),
        s("30%"),
        s("--json"),
    ])
    .ok()
    .json();
    let read = r["check"]["objects_read"].as_u64().unwrap();
    assert!(read > 0 && read < objects, "30% read {read} of {objects}");
    for bad in ["0%", "101%", "0/3", "4/3", "x"] {
        let r = vmrepo([s("check"), p(&repo), s("--read-data-subset"), s(bad)]);
        assert_eq!(r.code, 2, "{bad} accepted");
        assert!(r.stderr.contains("--read-data-subset"), "{}", r.stderr);
    }
    // A flipped byte in a slice that is read is found.
    let pack = packs(&repo).remove(0);
    flip_bit(&pack, 100, 6);
    let mut found = false;
    for slice in ["1/3", "2/3", "3/3"] {
        let r = vmrepo([s("check"), p(&repo), s("--read-data-subset"), s(slice)]);
        found |= r.code == 1;
    }
    assert!(found, "no slice found the flipped byte");
}

/// Pack descriptions (`pack-index/`) are what a new host builds its cache from: check reports
/// one that cannot be read or describes another pack, names the remedy, and is clean again
/// once the bad description is deleted (the pack itself is then read).
#[test]
fn check_reports_pack_descriptions_that_do_not_fit_their_packs() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    for (name, seed) in [("a", 1), ("b", 2)] {
        let img = t.path().join(format!("{name}.img"));
        sparse_image(&img, 4 << 20, &[(0, 2 << 20, seed)]);
        ingest(&repo, &img, Some(name));
    }
    vmrepo([s("check"), p(&repo)]).ok();
    let names: Vec<String> = packs(&repo)
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let desc = |n: &str| repo.join("pack-index").join(n);
    assert!(desc(&names[0]).is_file() && desc(&names[1]).is_file());
    let first = fs::read(desc(&names[0])).unwrap();

    // The first pack's description under the second's name.
    fs::write(desc(&names[1]), &first).unwrap();
    let r = vmrepo([s("check"), p(&repo)]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 pack description(s)"), "{}", r.stdout);
    assert!(r.stdout.contains("describes other packs"), "{}", r.stdout);
    assert!(r.stdout.contains(&names[1]), "{}", r.stdout);
    assert!(
        r.stdout.contains("delete those objects under pack-index/"),
        "{}",
        r.stdout
    );

    // Garbage where a description should be.
    fs::write(desc(&names[1]), b"not a description").unwrap();
    let r = vmrepo([s("check"), p(&repo)]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("cannot be read"), "{}", r.stdout);

    // The remedy: without a description the pack is read itself.
    fs::remove_file(desc(&names[1])).unwrap();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

/// The index is a cache: a chunk row it lost, or one that gives the chunk another length, makes
/// check name the generation that uses the chunk (and only that one), whichever of its segments
/// holds it; rebuilding the index from the data files makes the repository whole again.
#[test]
fn check_names_the_generation_whose_chunks_the_index_lost_or_misstates() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    sparse_image(&a, 16 << 20, &[(0, 12 << 20, 1)]);
    sparse_image(&b, 16 << 20, &[(0, 12 << 20, 2)]);
    let chunk_ids = || -> std::collections::BTreeSet<Vec<u8>> {
        let db = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
        let mut st = db
            .prepare("SELECT id FROM objects WHERE kind = 1 UNION SELECT id FROM recent_objects WHERE kind = 1")
            .unwrap();
        let ids = st.query_map([], |r| r.get(0)).unwrap();
        ids.map(|r| r.unwrap()).collect()
    };
    ingest(&repo, &a, Some("a"));
    let of_a = chunk_ids();
    ingest(&repo, &b, Some("b"));
    let of_b: Vec<Vec<u8>> = chunk_ids().difference(&of_a).cloned().collect();
    assert!(of_b.len() > 100, "{}", of_b.len());
    vmrepo([s("check"), p(&repo)]).ok();

    // One of b's chunks loses its row, then (the index rebuilt) another gets a wrong length.
    let rounds = [
        (
            "DELETE FROM {table} WHERE id = ?1",
            &of_b[3],
            "is missing from the repository",
        ),
        (
            "UPDATE {table} SET raw_len = raw_len + 1 WHERE id = ?1",
            &of_b[of_b.len() - 3],
            "has the wrong length",
        ),
    ];
    for (sql, id, why) in rounds {
        let db = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
        let changed: usize = ["objects", "recent_objects"]
            .iter()
            .map(|table| db.execute(&sql.replace("{table}", table), [id]).unwrap())
            .sum();
        assert_eq!(changed, 1);
        drop(db);
        // The same report whether check files the listed chunks in memory or, as on a
        // repository of millions of objects, on disk.
        for tiny in [false, true] {
            let r = vmrepo_batches(tiny, [s("check"), p(&repo)]);
            assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
            let damaged: Vec<&str> = r
                .stdout
                .lines()
                .filter(|l| l.starts_with("DAMAGED"))
                .collect();
            assert_eq!(damaged.len(), 1, "{}", r.stdout);
            assert!(damaged[0].starts_with("DAMAGED  b@"), "{}", r.stdout);
            assert!(
                r.stdout
                    .contains("1 damaged segment(s) of 4 MiB; first: bytes "),
                "{}",
                r.stdout
            );
            assert!(
                r.stdout.contains("1 bad chunk(s), first: chunk "),
                "{}",
                r.stdout
            );
            assert!(r.stdout.contains(why), "{why}: {}", r.stdout);
        }
        vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
        vmrepo([s("check"), p(&repo)]).ok();
    }
    // Every one of b's chunks loses its row: more wrong chunks than check holds with tiny
    // batches (it then asks about each as it walks again), the same report either way.
    let db = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
    for id in &of_b {
        for table in ["objects", "recent_objects"] {
            db.execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id])
                .unwrap();
        }
    }
    drop(db);
    let reports: Vec<String> = [false, true]
        .into_iter()
        .map(|tiny| {
            let r = vmrepo_batches(tiny, [s("check"), p(&repo)]);
            assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
            r.stdout
        })
        .collect();
    assert_eq!(reports[0], reports[1]);
    assert!(reports[0].contains("DAMAGED  b@"), "{}", reports[0]);
    assert!(!reports[0].contains("DAMAGED  a@"), "{}", reports[0]);
    assert!(
        reports[0].contains("3 damaged segment(s) of 4 MiB")
            && reports[0].contains("is missing from the repository"),
        "{}",
        reports[0]
    );
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("b"), p(&out)]).ok();
    let restored = fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    assert!(same_file(&b, &restored));
}

/// A read that failed during `check --repair` (here a flipped bit, put back afterwards, as a
/// disk or network share that answers wrongly for a while): repair dropped the object's index
/// entry and marked its generation damaged. Once the data file reads whole again, the next
/// repair finds the object in the pack's description, reads it back, indexes it again and
/// unmarks the generation, which restores byte for byte without --allow-damaged (it used to
/// stay damaged until an index rebuild, or until a later ingest read the same bytes again).
#[test]
fn a_repair_after_the_storage_reads_whole_again_heals_what_an_earlier_one_dropped() {
    let Flipped {
        t,
        img,
        repo,
        gen,
        pack,
        at,
    } = one_flipped_chunk(23);
    repair_drops_one_entry(&repo, &gen);

    flip_bit(&pack, at, 6);
    let r = vmrepo([s("check"), p(&repo), s("--repair")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("indexed  1 object(s) again"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("healed   {gen}")),
        "{}",
        r.stdout
    );
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("vm"), p(&out)]).ok();
    assert!(same_file(&img, &out.join("disk.img")));
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}
