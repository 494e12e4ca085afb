//! Retention end to end: prune by policy (output, dry run, refusals, policy files), tombstones
//! across an index rebuild, gc that is killed or races an ingest, and two months of nightly
//! backups pruned and collected.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Ingests `img` as `vm` at `time`.
/// Changes a few pseudo-random 256 KiB pieces of the image (a night's churn).
fn churn(img: &Path, size: u64, night: u64, pieces: u64) {
    for k in 0..pieces {
        let x = (night * 7919 + k * 104_729).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
        let off = (x % (size / (256 << 10))) * (256 << 10);
        overwrite(img, off, 256 << 10, night * 1000 + k);
    }
}

fn gen_times(repo: &Path, vm: &str) -> Vec<String> {
    generations(repo, vm)
        .into_iter()
        .map(|g| g.split_once('@').unwrap().1.to_string())
        .collect()
}

#[test]
fn prune_explains_every_generation_and_changes_nothing_on_dry_run() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 8 << 20, &[(0, 8 << 20, 1)]);
    let repo = init_repo(t.path());
    let times = [
        "2026-11-20T01:00:03Z",
        "2026-11-21T01:00:03Z",
        "2026-11-21T13:00:00Z",
        "2026-11-22T01:00:03Z",
    ];
    for (i, time) in times.iter().enumerate() {
        churn(&img, 8 << 20, i as u64, 2);
        ingest_at(&repo, &img, "web01", time);
    }
    // The same time twice is refused and names the clash.
    let r = vmrepo([
        s("ingest"),
        p(&repo),
        p(&img),
        s("--name"),
        s("web01"),
        s("--time"),
        s(times[0]),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("already has a generation at 2026-11-20T01:00:03Z"),
        "{}",
        r.stderr
    );

    let r = vmrepo([
        s("prune"),
        p(&repo),
        s("--keep-daily"),
        s("2"),
        s("--keep-last"),
        s("1"),
        s("--dry-run"),
    ])
    .ok()
    .stdout
    .clone();
    assert!(
        r.contains("keep    web01@2026-11-22T01:00:03Z  last #1, daily #1"),
        "{r}"
    );
    assert!(
        r.contains("keep    web01@2026-11-21T13:00:00Z  daily #2"),
        "{r}"
    );
    assert!(r.contains("remove  web01@2026-11-21T01:00:03Z"), "{r}");
    assert!(r.contains("remove  web01@2026-11-20T01:00:03Z"), "{r}");
    assert!(r.contains("would remove 2 generation(s), kept 2"), "{r}");
    assert_eq!(
        gen_times(&repo, "web01").len(),
        4,
        "dry run removed something"
    );

    // A policy that keeps nothing is refused, and nothing is removed.
    let r = vmrepo([s("prune"), p(&repo)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("keeps nothing"), "{}", r.stderr);
    assert!(r.stderr.contains("--allow-empty"), "{}", r.stderr);
    let r = vmrepo([
        s("prune"),
        p(&repo),
        s("nosuchvm"),
        s("--keep-last"),
        s("1"),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("no VM named \"nosuchvm\""),
        "{}",
        r.stderr
    );
    assert_eq!(gen_times(&repo, "web01").len(), 4);

    vmrepo([
        s("prune"),
        p(&repo),
        s("--keep-daily"),
        s("2"),
        s("--keep-last"),
        s("1"),
    ])
    .ok();
    assert_eq!(
        gen_times(&repo, "web01"),
        ["2026-11-21T13:00:00Z", "2026-11-22T01:00:03Z"]
    );
    vmrepo([s("check"), p(&repo)]).ok();
}

#[test]
fn a_policy_file_touches_only_the_vms_it_has_a_policy_for() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 4 << 20, 1)]);
    let repo = init_repo(t.path());
    for vm in ["web01", "db01", "scratch"] {
        for day in 1..=5 {
            ingest_at(&repo, &img, vm, &format!("2026-05-0{day}T02:00:00Z"));
        }
    }
    let policy = t.path().join("retention.toml");
    fs::write(
        &policy,
        "[vm.web01]\nkeep-last = 2\n\n[vm.db01]\nkeep-within = \"2d\"\n",
    )
    .unwrap();
    let out = vmrepo([s("prune"), p(&repo), s("--policy"), p(&policy)])
        .ok()
        .stdout
        .clone();
    assert!(
        out.contains("scratch: no policy for this VM: left alone"),
        "{out}"
    );
    assert_eq!(gen_times(&repo, "web01").len(), 2);
    // within 2d of 05-05 02:00 keeps 05-04 and 05-05 (05-03 02:00 is exactly 2 days older).
    assert_eq!(
        gen_times(&repo, "db01"),
        ["2026-05-04T02:00:00Z", "2026-05-05T02:00:00Z"]
    );
    assert_eq!(gen_times(&repo, "scratch").len(), 5);

    // A bad policy file is named with the reason.
    fs::write(&policy, "[vm.web01]\nkeep-lats = 2\n").unwrap();
    let r = vmrepo([s("prune"), p(&repo), s("--policy"), p(&policy)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("retention.toml"), "{}", r.stderr);
    assert!(r.stderr.contains("keep-lats"), "{}", r.stderr);
}

#[test]
fn pruned_generations_stay_gone_after_an_index_rebuild() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 8 << 20, &[(0, 8 << 20, 1)]);
    let repo = init_repo(t.path());
    for day in 1..=4 {
        churn(&img, 8 << 20, day, 2);
        ingest_at(&repo, &img, "vm", &format!("2026-05-0{day}T02:00:00Z"));
    }
    vmrepo([s("prune"), p(&repo), s("--keep-last"), s("2")]).ok();
    let kept = gen_times(&repo, "vm");
    fs::remove_file(repo.join("index.sqlite")).unwrap();
    let out = vmrepo([s("check"), p(&repo), s("--rebuild-index")])
        .ok()
        .stdout
        .clone();
    assert!(out.contains("2 generations"), "{out}");
    assert_eq!(gen_times(&repo, "vm"), kept);
}

/// Spawns `vmrepo ARGS` with output discarded.
fn spawn(args: &[std::ffi::OsString]) -> std::process::Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Extracts `gen` into `out` and compares the restored image `file` with `expected`.
fn extract_equals(repo: &Path, gen: &str, file: &str, expected: &Path, out: &Path) {
    let _ = fs::remove_dir_all(out);
    vmrepo([s("extract"), p(repo), s(gen), p(out)]).ok();
    assert!(
        same_file(&out.join(file), expected),
        "{gen} does not restore byte-identical"
    );
}

#[test]
fn killed_gc_never_loses_a_kept_generation() {
    let t = tempfile::tempdir().unwrap();
    let size = 48u64 << 20;
    let img = t.path().join("disk.img");
    sparse_image(&img, size, &[(0, size as usize, 3)]);
    let repo = init_repo(t.path());
    let saved = |night: u64| t.path().join(format!("night{night}.img"));
    let mut interrupted = 0;
    for night in 0..9u64 {
        // A night with real churn, so each gc has dead data to delete and packs to rewrite.
        churn(&img, size, night, 24);
        ingest_at(
            &repo,
            &img,
            "vm",
            &format!("2026-06-{:02}T01:00:00Z", night + 1),
        );
        fs::copy(&img, saved(night)).unwrap();
        vmrepo([s("prune"), p(&repo), s("--keep-last"), s("2")]).ok();
        let mut child = spawn(&[s("gc"), p(&repo), s("--repack-threshold"), s("100%")]);
        std::thread::sleep(Duration::from_millis(5 + night * 53 % 400));
        let _ = child.kill();
        if !child.wait().unwrap().success() {
            interrupted += 1;
        }
        vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
        let gens = generations(&repo, "vm");
        assert_eq!(gens.len(), (night + 1).min(2) as usize, "{gens:?}");
        let out = t.path().join("out");
        extract_equals(
            &repo,
            &gens[gens.len() - 1],
            "disk.img",
            &saved(night),
            &out,
        );
        if night > 0 {
            extract_equals(&repo, &gens[0], "disk.img", &saved(night - 1), &out);
        }
    }
    assert!(
        interrupted >= 2,
        "only {interrupted} gc runs were interrupted"
    );
    // A full gc afterwards finishes the job: nothing unreferenced, no left-overs. (Rewriting
    // every pack with garbage; the chunks that the deltas one gc removes were stored against
    // are freed by the next.)
    let full = [
        s("gc"),
        p(&repo),
        s("--repack-threshold"),
        s("100%"),
        s("--max-unused"),
        s("0"),
        s("--json"),
    ];
    let r = vmrepo(full.clone()).ok().json();
    vmrepo(full.clone()).ok();
    let r2 = vmrepo(full.clone()).ok().json();
    assert_eq!(r2["objects_dead"], 0, "{r}\n{r2}");
    assert_eq!(r2["orphan_packs"], 0, "{r}\n{r2}");
    let check = vmrepo([s("check"), p(&repo), s("--read-data")])
        .ok()
        .stdout
        .clone();
    assert!(!check.contains("left over"), "{check}");
}

#[test]
fn gc_and_ingest_wait_for_each_other_and_the_ingest_is_complete() {
    let t = tempfile::tempdir().unwrap();
    let size = 24u64 << 20;
    let first = t.path().join("first.img");
    sparse_image(&first, size, &[(0, size as usize, 11)]);
    for round in 0..3u64 {
        let dir = t.path().join(format!("round{round}"));
        fs::create_dir(&dir).unwrap();
        let repo = init_repo(&dir);
        // VM a: its first generation's data is replaced entirely by the second's.
        ingest_at(&repo, &first, "a", "2026-01-01T00:00:00Z");
        let second = dir.join("second.img");
        sparse_image(&second, size, &[(0, size as usize, 12 + round)]);
        ingest_at(&repo, &second, "a", "2026-01-02T00:00:00Z");
        vmrepo([s("prune"), p(&repo), s("a"), s("--keep-last"), s("1")]).ok();
        // gc is about to delete the first image's chunks; VM b holds the same data and its
        // ingest dedups against them. Start them together, in both orders.
        let gc_args = [s("gc"), p(&repo), s("--lock-wait"), s("60")];
        let ingest_args = [
            s("ingest"),
            p(&repo),
            p(&first),
            s("--name"),
            s("b"),
            s("--lock-wait"),
            s("60"),
        ];
        let (x, y) = if round % 2 == 0 {
            (&gc_args[..], &ingest_args[..])
        } else {
            (&ingest_args[..], &gc_args[..])
        };
        let mut c1 = spawn(x);
        std::thread::sleep(Duration::from_millis(round * 30));
        let mut c2 = spawn(y);
        assert!(c1.wait().unwrap().success());
        assert!(c2.wait().unwrap().success());
        vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
        extract_equals(&repo, "b", "first.img", &first, &dir.join("out-b"));
        let out = dir.join("out-a");
        vmrepo([s("extract"), p(&repo), s("a"), p(&out)]).ok();
        assert!(same_file(&out.join("second.img"), &second));
    }
}

#[test]
fn a_held_lock_makes_gc_fail_at_once_or_wait_with_lock_wait() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let lock = repo.join("locks/repository.lock");
    // Another process (here: flock) holds the shared lock, as a running ingest would.
    let mut holder = Command::new("flock")
        .args([s("-s"), p(&lock), s("sleep"), s("3")])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = vmrepo([s("gc"), p(&repo)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("in use by another vmrepo process"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--lock-wait"), "{}", r.stderr);
    let r = vmrepo([s("gc"), p(&repo), s("--lock-wait"), s("30")])
        .ok()
        .stderr
        .clone();
    assert!(r.contains("waiting up to 30 s"), "{r}");
    holder.wait().unwrap();
}

/// The acceptance scenario: 30 nightly ingests (every other day over two months), prune with
/// keep-daily 7, keep-weekly 4, keep-monthly 2, gc; then the kept set is as computed by hand,
/// every kept generation restores byte-identical, the repository is within 10% of a fresh one
/// holding only the kept generations, and `check --read-data` passes.
#[test]
fn two_months_of_nightly_backups_pruned_and_collected() {
    let t = tempfile::tempdir().unwrap();
    let size = 32u64 << 20;
    let img = t.path().join("disk.img");
    sparse_image(&img, size, &[(0, 24 << 20, 5)]);
    let repo = init_repo(t.path());
    // Hand-computed: daily 7 = Oct 17..29 (odd days); ISO weeks: W44 (Oct 26-Nov 1) Oct 29,
    // W43 Oct 25, W42 Oct 17, W41 (Oct 5-11) Oct 11; months: Oct 29, Sep 29.
    let expected: BTreeSet<String> = [
        "2026-09-29",
        "2026-10-11",
        "2026-10-17",
        "2026-10-19",
        "2026-10-21",
        "2026-10-23",
        "2026-10-25",
        "2026-10-27",
        "2026-10-29",
    ]
    .iter()
    .map(|d| format!("{d}T01:00:00Z"))
    .collect();
    let saved_dir = t.path().join("saved");
    fs::create_dir(&saved_dir).unwrap();
    let mut saved: Vec<(String, PathBuf)> = Vec::new();
    for night in 0..30u64 {
        let day = 1 + 2 * night;
        let date = if day <= 30 {
            format!("2026-09-{day:02}")
        } else {
            format!("2026-10-{:02}", day - 30)
        };
        let time = format!("{date}T01:00:00Z");
        if night > 0 {
            churn(&img, size, night, 6);
        }
        ingest_at(&repo, &img, "web01", &time);
        if expected.contains(&time) {
            let copy = saved_dir.join(format!("{date}.img"));
            fs::copy(&img, &copy).unwrap();
            saved.push((time, copy));
        }
    }
    let r = vmrepo([
        s("prune"),
        p(&repo),
        s("--keep-daily"),
        s("7"),
        s("--keep-weekly"),
        s("4"),
        s("--keep-monthly"),
        s("2"),
        s("--gc"),
    ])
    .ok()
    .stdout
    .clone();
    assert!(r.contains("removed 21 generation(s), kept 9"), "{r}");
    assert!(
        r.contains("keep    web01@2026-10-11T01:00:00Z  weekly #4"),
        "{r}"
    );
    assert!(
        r.contains("keep    web01@2026-09-29T01:00:00Z  monthly #2"),
        "{r}"
    );
    let kept: BTreeSet<String> = gen_times(&repo, "web01").into_iter().collect();
    assert_eq!(kept, expected);

    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = t.path().join("out");
    for (time, copy) in &saved {
        let _ = fs::remove_dir_all(&out);
        vmrepo([s("extract"), p(&repo), s(&format!("web01@{time}")), p(&out)]).ok();
        assert!(
            same_file(&out.join("disk.img"), copy),
            "web01@{time} does not restore byte-identical"
        );
    }

    let fresh_dir = t.path().join("fresh");
    fs::create_dir(&fresh_dir).unwrap();
    let fresh = init_repo(&fresh_dir);
    for (time, copy) in &saved {
        fs::copy(copy, &img).unwrap();
        ingest_at(&fresh, &img, "web01", time);
    }
    let (ours, theirs) = (tree_size(&repo), tree_size(&fresh));
    assert!(
        (ours as f64) <= theirs as f64 * 1.10,
        "pruned repository {ours} bytes, fresh repository with the kept generations {theirs} bytes"
    );
}

#[test]
fn local_time_buckets_follow_the_zone_in_tz_across_a_dst_change() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 4 << 20, 1)]);
    let repo = init_repo(t.path());
    // Berlin leaves CEST (UTC+2) for CET (UTC+1) at 03:00 local on 2026-10-25.
    for time in [
        "2026-10-24T21:30:00Z", // 10-24 23:30 CEST
        "2026-10-24T22:30:00Z", // 10-25 00:30 CEST
        "2026-10-25T00:30:00Z", // 10-25 02:30 CEST
        "2026-10-25T01:30:00Z", // 10-25 02:30 CET, the repeated hour
        "2026-10-25T22:30:00Z", // 10-25 23:30 CET
        "2026-10-25T23:30:00Z", // 10-26 00:30 CET
    ] {
        ingest_at(&repo, &img, "vm", time);
    }
    let prune = |args: &[&str]| {
        let out = Command::new(BIN)
            .env("TZ", "Europe/Berlin")
            .args([s("prune"), p(&repo), s("--dry-run"), s("--json")])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["prune"]["vms"][0]["generations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["keep"].as_bool().unwrap())
            .map(|g| {
                g["generation"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("vm@")
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    // Local days: 10-24 (one), 10-25 (newest 23:30 CET), 10-26.
    assert_eq!(
        prune(&["--keep-daily", "3", "--local-time"]),
        [
            "2026-10-25T23:30:00Z",
            "2026-10-25T22:30:00Z",
            "2026-10-24T21:30:00Z"
        ]
    );
    // UTC days: 10-25 (newest 23:30Z), 10-24 (newest 22:30Z).
    assert_eq!(
        prune(&["--keep-daily", "3"]),
        ["2026-10-25T23:30:00Z", "2026-10-24T22:30:00Z"]
    );
    // The repeated local hour is one hourly bucket: 6 generations, 5 local hours.
    assert_eq!(prune(&["--keep-hourly", "24", "--local-time"]).len(), 5);
    assert_eq!(prune(&["--keep-hourly", "24"]).len(), 6);
}

/// `forget` removes exactly the generations named, all or none, refuses a bare VM name, and the
/// removal survives an index rebuild (its tombstone); gc then frees what only they used, and
/// every other generation restores byte for byte.
#[test]
fn forget_removes_named_generations_all_or_none() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 8 << 20, &[(0, 8 << 20, 1)]);
    let repo = init_repo(t.path());
    let times = [
        "2026-11-20T01:00:00Z",
        "2026-11-21T01:00:00Z",
        "2026-11-22T01:00:00Z",
    ];
    let mut copies = Vec::new();
    for (i, time) in times.iter().enumerate() {
        churn(&img, 8 << 20, i as u64, 8);
        ingest_at(&repo, &img, "web01", time);
        let copy = t.path().join(format!("night{i}.img"));
        fs::copy(&img, &copy).unwrap();
        copies.push(copy);
    }
    ingest_at(&repo, &img, "db01", times[0]);

    // A bare VM name would mean its newest generation: refused.
    let r = vmrepo([s("forget"), p(&repo), s("web01")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("names a VM, not one of its generations"),
        "{}",
        r.stderr
    );
    // One unknown name: nothing is removed.
    let r = vmrepo([
        s("forget"),
        p(&repo),
        s("web01@-1"),
        s("web01@2026-01-01T00:00:00Z"),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no generation"), "{}", r.stderr);
    assert!(
        r.stderr.contains("no generation was removed"),
        "{}",
        r.stderr
    );
    assert_eq!(gen_times(&repo, "web01").len(), 3);
    // A dry run says what would go and changes nothing.
    let r = vmrepo([s("forget"), p(&repo), s("web01@-1"), s("--dry-run")]);
    r.ok();
    assert!(
        r.stdout
            .contains(&format!("would remove  web01@{}", times[1])),
        "{}",
        r.stdout
    );
    assert_eq!(gen_times(&repo, "web01").len(), 3);

    // web01@-1 is the middle night; naming it twice removes it once.
    let r = vmrepo([
        s("forget"),
        p(&repo),
        s("web01@-1"),
        s(&format!("web01@{}", times[1])),
        s("--json"),
    ]);
    r.ok();
    let removed = r.json()["forget"]["removed"].clone();
    assert_eq!(removed, serde_json::json!([format!("web01@{}", times[1])]));
    assert!(r.json()["forget"]["bytes_unreferenced"].as_u64().unwrap() > 0);
    assert_eq!(gen_times(&repo, "web01"), [times[0], times[2]]);
    assert_eq!(gen_times(&repo, "db01"), [times[0]]);

    // The tombstone keeps it removed when the index is rebuilt from the data files.
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
    assert_eq!(gen_times(&repo, "web01"), [times[0], times[2]]);

    vmrepo([s("gc"), p(&repo)]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    for (i, time) in [(0, times[0]), (2, times[2])] {
        let out = t.path().join(format!("out{i}"));
        vmrepo([s("extract"), p(&repo), s(&format!("web01@{time}")), p(&out)]).ok();
        assert!(same_file(&out.join("d.img"), &copies[i]), "night {i}");
    }
    let r = vmrepo([
        s("extract"),
        p(&repo),
        s(&format!("web01@{}", times[1])),
        p(&t.path().join("gone")),
    ]);
    assert_ne!(r.code, 0);
}

#[test]
fn stats_gc_and_check_in_bounded_memory_decide_exactly_as_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let img = t.path().join("disk.img");
    sparse_image(&img, size, &[(0, 12 << 20, 9)]);
    let repo = init_repo(t.path());
    let saved_dir = t.path().join("saved");
    fs::create_dir(&saved_dir).unwrap();
    let mut saved = Vec::new();
    for night in 0..10u64 {
        if night > 0 {
            churn(&img, size, night, 8);
        }
        let time = format!("2026-10-{:02}T01:00:00Z", night + 1);
        ingest_at(&repo, &img, "web01", &time);
        if night >= 6 {
            let copy = saved_dir.join(format!("{night}.img"));
            fs::copy(&img, &copy).unwrap();
            saved.push((time, copy));
        }
    }
    // A VM of its own data, then forgotten: its packs hold nothing live.
    let other = t.path().join("other.img");
    sparse_image(&other, 4 << 20, &[(0, 4 << 20, 77)]);
    ingest_at(&repo, &other, "old01", "2026-09-01T01:00:00Z");
    vmrepo([s("forget"), p(&repo), s("old01@2026-09-01T01:00:00Z")]).ok();
    vmrepo([s("prune"), p(&repo), s("web01"), s("--keep-last"), s("4")]).ok();
    let twin = t.path().join("twin");
    sh(&format!("cp -a {} {}", repo.display(), twin.display())).ok();

    // stats files every use of every object by id, on disk in many partitions here.
    let stats = |r: &Path| vec![s("stats"), p(r), s("--generations"), s("--json")];
    let plain = vmrepo(stats(&repo)).ok().json();
    let tiny = vmrepo_batches(true, stats(&twin)).ok().json();
    assert_eq!(plain, tiny, "stats differ when filed on disk");
    assert!(
        plain["referenced"]["objects"].as_u64().unwrap() > 64 * 4,
        "{plain}"
    );

    // --max-unused 0 rewrites every pack with garbage left in it, so both paths rewrite.
    let gc = |r: &Path| vec![s("gc"), p(r), s("--max-unused"), s("0"), s("--json")];
    let plain = vmrepo(gc(&repo)).ok().json();
    let tiny = vmrepo_batches(true, gc(&twin)).ok().json();
    for field in [
        "objects_live",
        "objects_dead",
        "bytes_dead",
        "packs_deleted",
        "packs_rewritten",
        "bytes_copied",
        "bytes_freed",
    ] {
        assert_eq!(plain[field], tiny[field], "{field}:\n{plain}\n{tiny}");
    }
    assert!(plain["objects_live"].as_u64().unwrap() > 64 * 4, "{plain}");
    assert!(plain["packs_deleted"].as_u64().unwrap() > 0, "{plain}");
    assert!(plain["packs_rewritten"].as_u64().unwrap() > 1, "{plain}");

    let check = |r: &Path| vec![s("check"), p(r), s("--read-data"), s("--json")];
    let plain = vmrepo(check(&repo)).ok().json();
    let tiny = vmrepo_batches(true, check(&twin)).ok().json();
    assert_eq!(tiny["ok"], true, "{tiny}");
    let (plain, tiny) = (&plain["check"], &tiny["check"]);
    assert_eq!(plain["objects"], tiny["objects"]);
    assert!(tiny["objects"].as_u64().unwrap() > 64 * 4, "{tiny}");
    assert_eq!(tiny["objects_read"], tiny["objects"]);

    // An index rebuilt with its rows filed by id in many partitions on disk, then added sorted,
    // holds what one rebuilt with them in memory does, and the same as before the rebuild.
    let rebuild = |r: &Path| vec![s("check"), p(r), s("--rebuild-index"), s("--json")];
    let listed = |r: &Path| {
        vmrepo([s("list"), p(r), s("web01"), s("--json")])
            .ok()
            .json()
    };
    let before = listed(&twin);
    let plain = vmrepo(rebuild(&repo)).ok().json();
    let tiny = vmrepo_batches(true, rebuild(&twin)).ok().json();
    assert_eq!(tiny["ok"], true, "{tiny}");
    for field in ["objects", "generations", "packs", "damaged", "incomplete"] {
        assert_eq!(plain["rebuild"][field], tiny["rebuild"][field], "{field}");
    }
    assert_eq!(plain["check"]["objects"], tiny["check"]["objects"]);
    assert_eq!(tiny["check"]["objects"], tiny["rebuild"]["objects"]);
    assert_eq!(listed(&twin), before);
    assert_eq!(listed(&repo), before);
    let out = t.path().join("out");
    for (time, copy) in &saved {
        let _ = fs::remove_dir_all(&out);
        vmrepo([s("extract"), p(&twin), s(&format!("web01@{time}")), p(&out)]).ok();
        assert!(
            same_file(&out.join("disk.img"), copy),
            "web01@{time} does not restore byte-identical after gc in bounded memory"
        );
    }
    let left: Vec<String> = fs::read_dir(&twin)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("idset-"))
        .collect();
    assert!(left.is_empty(), "temporary id sets left behind: {left:?}");
}
