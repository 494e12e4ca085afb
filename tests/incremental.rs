//! Change-aware ingest with --changed-ranges: exactly what a full ingest gives, reading only
//! what changed; a wrong list caught by --verify-unchanged; fallbacks said out loud; bad lists
//! refused with the file and the reason.

mod common;
#[path = "common/live.rs"]
mod live;
use common::*;
use std::fs;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn ingest_changes(repo: &Path, img: &Path, changes: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        s("ingest"),
        p(repo),
        p(img),
        s("--name"),
        s("vm"),
        s("--changed-ranges"),
        p(changes),
        s("--json"),
    ];
    args.extend(extra.iter().map(|a| s(a)));
    vmrepo(args)
}

/// The disk map ids of a generation's disks, read through the library.
fn disk_maps(repo: &Path, gen: &str) -> Vec<vmrepo::ObjectId> {
    let r = vmrepo::Repository::open(repo, vmrepo::repo::lock::LockMode::Shared).unwrap();
    let g = r.open_index().unwrap().resolve(gen).unwrap();
    r.load_manifest(&g.manifest)
        .unwrap()
        .disks
        .iter()
        .map(|d| d.disk_map)
        .collect()
}

#[test]
fn change_aware_ingest_equals_a_full_ingest_and_reads_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 48 * MIB, &[(0, 40 << 20, 1)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    // Three changes in three segments (4 MiB each): one inside a segment, one crossing into
    // a hole, one at the very end of the disk.
    let changes = [
        (5 * MIB + 4096, 65536u64),
        (39 * MIB + 512, 2 * MIB),
        (48 * MIB - 4096, 4096),
    ];
    for (i, (off, len)) in changes.iter().enumerate() {
        overwrite(&img, *off, *len as usize, 100 + i as u64);
    }
    let list = t.path().join("changes.json");
    fs::write(
        &list,
        serde_json::to_string(
            &changes
                .iter()
                .map(|(o, l)| serde_json::json!({"offset": o, "length": l}))
                .collect::<Vec<_>>(),
        )
        .unwrap(),
    )
    .unwrap();
    let r = ingest_changes(&repo, &img, &list, &["--since", "vm"]);
    r.ok();
    let j = r.json();
    let inc = &j["incremental"];
    assert_eq!(inc["full_reads"].as_array().unwrap().len(), 0, "{j}");
    // 12 segments; the changes touch 4 (5 MiB, 39 MiB, 40-41 MiB, 47 MiB).
    assert_eq!(inc["segments_taken"], 8, "{j}");
    assert!(j["stats"]["bytes_read"].as_u64().unwrap() < 17 * MIB, "{j}");
    let gens = generations(&repo, "vm");
    let changed_gen = gens.last().unwrap().clone();

    // A full ingest of the same image stores nothing new and yields the same disk map.
    let full = ingest(&repo, &img, Some("vm"));
    assert_eq!(full["stats"]["bytes_new"], 0, "{full}");
    let full_gen = generations(&repo, "vm").last().unwrap().clone();
    assert_eq!(disk_maps(&repo, &changed_gen), disk_maps(&repo, &full_gen));

    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s(&changed_gen), p(&out)]).ok();
    assert!(same_file(&out.join("vm.img"), &img));

    // With a right list, verifying every untouched segment passes.
    let r = ingest_changes(
        &repo,
        &img,
        &list,
        &["--since", &changed_gen, "--verify-unchanged", "100%"],
    );
    assert_eq!(r.ok().json()["incremental"]["segments_verified"], 8);
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

/// Writes a changed-ranges list of `(offset, length)` pairs.
fn write_list(path: &Path, changes: &[(u64, u64)]) {
    let list: Vec<_> = changes
        .iter()
        .map(|(o, l)| serde_json::json!({"offset": o, "length": l}))
        .collect();
    fs::write(path, serde_json::to_string(&list).unwrap()).unwrap();
}

#[test]
fn small_changes_inside_segments_are_patched_reading_little_more_than_they_changed() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 32 * MIB, &[(0, 32 << 20, 5)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    // Five small writes in five 4 MiB segments: at a segment's start, in the middle, across
    // a 64 KiB leaf boundary, two in one segment, at the disk's end.
    let changes = [
        (4 * MIB, 8192u64),
        (9 * MIB + 12345, 3000),
        (14 * MIB + 65536 - 100, 200),
        (15 * MIB + 5, 4096),
        (21 * MIB + 777, 50_000),
        (32 * MIB - 4096, 4096),
    ];
    for (i, (off, len)) in changes.iter().enumerate() {
        overwrite(&img, *off, *len as usize, 300 + i as u64);
    }
    let list = t.path().join("changes.json");
    write_list(&list, &changes);
    let r = ingest_changes(&repo, &img, &list, &["--since", "vm"]);
    let j = r.ok().json();
    assert_eq!(j["incremental"]["segments_patched"], 5, "{j}");
    assert_eq!(j["incremental"]["segments_taken"], 3, "{j}");
    // Whole segments would be 20 MiB; each patch reads its change and some 200-300 KiB around.
    let read = j["stats"]["bytes_read"].as_u64().unwrap();
    assert!(read < 2 * MIB, "read {read} bytes: {j}");
    let patched_gen = generations(&repo, "vm").last().unwrap().clone();

    // Exactly what a full ingest of the same image gives: nothing new, the same disk map.
    let full = ingest(&repo, &img, Some("vm"));
    assert_eq!(full["stats"]["bytes_new"], 0, "{full}");
    let full_gen = generations(&repo, "vm").last().unwrap().clone();
    assert_eq!(disk_maps(&repo, &patched_gen), disk_maps(&repo, &full_gen));
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s(&patched_gen), p(&out)]).ok();
    assert!(same_file(&out.join("vm.img"), &img));
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn an_index_of_schema_3_is_upgraded_and_its_segments_are_read_whole_until_they_change() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 16 * MIB, &[(0, 16 << 20, 6)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    // Make the index what vmrepo wrote before schema 4: one object table, no leaves.
    {
        let db = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
        db.execute_batch(
            "INSERT OR IGNORE INTO objects SELECT * FROM recent_objects;
             DROP VIEW all_objects; DROP TABLE recent_objects; DROP TABLE segment_leaves;
             UPDATE meta SET value = '3' WHERE key = 'schema_version';",
        )
        .unwrap();
    }
    overwrite(&img, 5 * MIB, 4096, 40);
    let list = t.path().join("changes.json");
    write_list(&list, &[(5 * MIB, 4096)]);
    let j = ingest_changes(&repo, &img, &list, &["--since", "vm"])
        .ok()
        .json();
    // No leaves were kept for the old segment: it is read whole, and gets them now.
    assert_eq!(j["incremental"]["segments_patched"], 0, "{j}");
    assert_eq!(j["stats"]["bytes_read"], 4 * MIB, "{j}");
    overwrite(&img, 5 * MIB + 8192, 4096, 41);
    write_list(&list, &[(5 * MIB + 8192, 4096)]);
    let j = ingest_changes(&repo, &img, &list, &["--since", "vm"])
        .ok()
        .json();
    assert_eq!(j["incremental"]["segments_patched"], 1, "{j}");
    let gen = generations(&repo, "vm").last().unwrap().clone();
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s(&gen), p(&out)]).ok();
    assert!(same_file(&out.join("vm.img"), &img));
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn a_wrong_list_is_caught_by_verify_unchanged_and_records_nothing() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 32 * MIB, &[(0, 32 << 20, 2)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    overwrite(&img, 2 * MIB, 4096, 7);
    overwrite(&img, 20 * MIB, 4096, 8); // not in the list
    let list = t.path().join("changes.json");
    fs::write(
        &list,
        format!(
            r#"{{"since": "vm", "disks": {{"image": [{{"start": {}, "length": 4096}}]}}}}"#,
            2 * MIB
        ),
    )
    .unwrap();
    let r = ingest_changes(&repo, &img, &list, &["--verify-unchanged", "100%"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("changed in bytes 20971520..25165824"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("no generation was recorded"),
        "{}",
        r.stderr
    );
    assert_eq!(generations(&repo, "vm").len(), 1);
    vmrepo([s("check"), p(&repo)]).ok();
}

#[test]
fn a_disk_that_changed_size_is_read_in_full_and_the_summary_says_why() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 16 * MIB, &[(0, 8 << 20, 3)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(24 * MIB)
        .unwrap();
    overwrite(&img, 20 * MIB, 4096, 9);
    let list = t.path().join("changes.json");
    fs::write(
        &list,
        format!(r#"[{{"offset": {}, "length": 4096}}]"#, 20 * MIB),
    )
    .unwrap();
    let r = ingest_changes(&repo, &img, &list, &["--since", "vm@-0"]);
    r.ok();
    let why = r.json()["incremental"]["full_reads"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("size changed from 16777216 to 25165824"),
        "{why}"
    );
    let text = vmrepo([
        s("ingest"),
        p(&repo),
        p(&img),
        s("--name"),
        s("vm"),
        s("--changed-ranges"),
        p(&list),
        s("--since"),
        s("vm@-1"),
    ]);
    assert!(
        text.ok()
            .stdout
            .contains("full read   disk image: its size changed"),
        "{}",
        text.stdout
    );
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("vm"), p(&out)]).ok();
    assert!(same_file(&out.join("vm.img"), &img));
}

#[test]
fn bad_change_lists_are_refused_with_the_file_and_the_reason() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 8 * MIB, &[(0, 4 << 20, 4)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    let list = t.path().join("changes.json");
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "[]",
            &[],
            "needs the generation the changes are relative to",
        ),
        (
            "{\"ranges\": 3}",
            &["--since", "vm"],
            "not a changed-ranges file",
        ),
        (
            r#"[{"offset": 8388000, "length": 4096}]"#,
            &["--since", "vm"],
            "ends past the disk",
        ),
        (
            r#"{"disks": {"scsi0:9": []}}"#,
            &["--since", "vm"],
            "names disk(s) scsi0:9",
        ),
        ("[]", &["--since", "other@-0"], "no VM named \"other\""),
    ];
    for (text, extra, want) in cases {
        fs::write(&list, text).unwrap();
        let r = ingest_changes(&repo, &img, &list, extra);
        assert_eq!(r.code, 1, "{text}: {}", r.stdout);
        assert!(r.stderr.contains(want), "{text}: {}", r.stderr);
    }
    assert_eq!(generations(&repo, "vm").len(), 1);
}

/// In an encrypted repository (keyed cut points, keyed ids) a patched night restores byte for
/// byte and passes a full check. (That a patch cuts exactly where a full read cuts, with either
/// gear table, is the unit test `random_changes_always_give_what_a_full_read_gives`.)
#[test]
fn change_aware_ingest_works_in_an_encrypted_repository() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 16 * MIB, &[(0, 16 << 20, 8)]);
    let pw = t.path().join("pw");
    fs::write(&pw, "night pass\n").unwrap();
    let run = |args: &[std::ffi::OsString]| {
        let mut all = vec![s("--password-file"), p(&pw)];
        all.extend(args.iter().cloned());
        vmrepo(all)
    };
    let repo = t.path().join("repo");
    run(&[
        s("init"),
        p(&repo),
        s("--encryption"),
        s("aes-256-gcm"),
        s("--kdf-memory"),
        s("8"),
    ])
    .ok();
    run(&[s("ingest"), p(&repo), p(&img), s("--name"), s("vm")]).ok();
    let changes = [(4 * MIB, 8192u64), (9 * MIB + 12345, 3000)];
    for (i, (off, len)) in changes.iter().enumerate() {
        overwrite(&img, *off, *len as usize, 700 + i as u64);
    }
    let list = t.path().join("changes.json");
    write_list(&list, &changes);
    let pw_arg = pw.to_str().unwrap();
    let j = ingest_changes(
        &repo,
        &img,
        &list,
        &["--since", "vm", "--password-file", pw_arg],
    )
    .ok()
    .json();
    assert_eq!(j["incremental"]["segments_patched"], 2, "{j}");
    let out = t.path().join("out");
    run(&[s("extract"), p(&repo), s("vm"), p(&out)]).ok();
    assert!(same_file(&out.join("vm.img"), &img));
    run(&[s("check"), p(&repo), s("--read-data")]).ok();
}

/// The segments whose leaves the index keeps.
fn kept_leaves(repo: &Path) -> std::collections::BTreeSet<Vec<u8>> {
    let db = rusqlite::Connection::open(repo.join("index.sqlite")).unwrap();
    let mut st = db.prepare("SELECT segment FROM segment_leaves").unwrap();
    let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// The distinct non-zero segments of a generation.
fn segments_of(repo: &Path, gen: &str) -> std::collections::BTreeSet<Vec<u8>> {
    let r = vmrepo::Repository::open(repo, vmrepo::repo::lock::LockMode::Shared).unwrap();
    let mut out = std::collections::BTreeSet::new();
    for map in disk_maps(repo, gen) {
        let map = r.load_disk_map(&map).unwrap();
        out.extend(map.nonzero().map(|(_, s)| s.0.to_vec()));
    }
    out
}

#[test]
fn leaves_are_kept_for_the_latest_generation_only_and_a_segment_that_lost_them_is_read_whole() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 32 * MIB, &[(0, 32 << 20, 9)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    // A clone of the VM shares every segment, and so their leaves.
    let twin = t.path().join("twin.img");
    fs::copy(&img, &twin).unwrap();
    ingest(&repo, &twin, Some("clone"));
    let first = generations(&repo, "vm")[0].clone();
    assert_eq!(kept_leaves(&repo), segments_of(&repo, &first));
    // Three nights of full ingests, each changing 4 KiB in two segments: the leaves of the
    // segments each night replaces are forgotten, not kept for as long as they are stored.
    for night in 0..3u64 {
        overwrite(&img, (2 * night + 1) * 4 * MIB + 8192, 4096, 50 + night);
        overwrite(&img, (2 * night + 2) * 4 * MIB + 4096, 4096, 60 + night);
        let j = ingest(&repo, &img, Some("vm"));
        assert_eq!(j["stats"]["chunks_new"], 2, "{j}");
        let latest = generations(&repo, "vm").last().unwrap().clone();
        let (kept, want) = (kept_leaves(&repo), segments_of(&repo, &latest));
        assert!(
            kept == want,
            "night {night}: {} segments keep leaves, the latest generation has {}",
            kept.len(),
            want.len()
        );
    }
    // The clone's second segment lost its leaves to the VM's first night: a change-aware
    // ingest reads that segment whole, stores what a full ingest would, and keeps its leaves
    // again, so the next night patches it.
    overwrite(&twin, 4 * MIB + 100, 200, 70);
    let list = t.path().join("changes.json");
    write_list(&list, &[(4 * MIB + 100, 200)]);
    let run = |list: &Path| {
        vmrepo([
            s("ingest"),
            p(&repo),
            p(&twin),
            s("--name"),
            s("clone"),
            s("--changed-ranges"),
            p(list),
            s("--since"),
            s("clone"),
            s("--json"),
        ])
        .ok()
        .json()
    };
    let j = run(&list);
    assert_eq!(j["incremental"]["segments_patched"], 0, "{j}");
    assert_eq!(j["stats"]["bytes_read"], 4 * MIB, "{j}");
    overwrite(&twin, 4 * MIB + 300_000, 200, 71);
    write_list(&list, &[(4 * MIB + 300_000, 200)]);
    let j = run(&list);
    assert_eq!(j["incremental"]["segments_patched"], 1, "{j}");
    // A generation put in before the latest (--time) replaces nothing the next night patches.
    let latest = generations(&repo, "vm").last().unwrap().clone();
    vmrepo([
        s("ingest"),
        p(&repo),
        p(&twin),
        s("--name"),
        s("vm"),
        s("--time"),
        s("2001-01-01T00:00:00Z"),
    ])
    .ok();
    assert_eq!(generations(&repo, "vm").last().unwrap(), &latest);
    assert!(
        kept_leaves(&repo).is_superset(&segments_of(&repo, &latest)),
        "a generation put in before the latest dropped the latest's leaves"
    );
    for (vm, file) in [("vm", &img), ("clone", &twin)] {
        let gen = generations(&repo, vm).last().unwrap().clone();
        let out = t.path().join(format!("out-{vm}"));
        vmrepo([s("extract"), p(&repo), s(&gen), p(&out)]).ok();
        let restored = fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
        assert!(same_file(&restored, file), "{vm}");
    }
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn a_previous_generation_that_cannot_be_read_fails_no_backup() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 16 * MIB, &[(0, 16 << 20, 12)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    // The only disk map in the repository is last night's.
    live::damage_one_object(&repo, 3, 1);
    overwrite(&img, 6 * MIB, 4096, 13);
    let r = vmrepo([s("ingest"), p(&repo), p(&img), s("--name"), s("vm")]);
    r.ok();
    assert!(
        r.stderr
            .contains("the index keeps the leaves of the segments tonight replaced"),
        "{}",
        r.stderr
    );
    let gen = generations(&repo, "vm").last().unwrap().clone();
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s(&gen), p(&out)]).ok();
    assert!(same_file(&out.join("vm.img"), &img));
}
