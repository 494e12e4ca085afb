//! The index is a cache; the data files are the truth. An index that is deleted, emptied,
//! truncated, older than the data, or another repository's never makes a command delete data
//! a generation needs, `check` says what is wrong and how to recover, and following that advice
//! brings every saved generation back byte for byte.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// A repository with generations of three VMs, and what each generation must restore to.
struct Fixture {
    _dir: tempfile::TempDir,
    work: PathBuf,
    repo: PathBuf,
    /// generation name -> (image file name, digest)
    saved: BTreeMap<String, (String, String)>,
}

fn digest(path: &Path) -> String {
    blake3::hash(&fs::read(path).unwrap()).to_hex().to_string()
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().to_path_buf();
        let repo = init_repo(&work);
        let mut f = Fixture {
            _dir: dir,
            work,
            repo,
            saved: BTreeMap::new(),
        };
        for (i, vm) in ["a", "b", "c"].iter().enumerate() {
            f.night(vm, 100 + i as u64);
        }
        f
    }

    /// One more generation of `vm`, its image partly changed (seed).
    fn night(&mut self, vm: &str, seed: u64) {
        let img = self.work.join(format!("{vm}.img"));
        if !img.exists() {
            fs::write(&img, bytes(6 << 20, seed)).unwrap();
        } else {
            overwrite(&img, (seed % 5) << 20, 1 << 20, seed);
        }
        // Generations are named by the second; two of one VM in one second collide.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let g = ingest(&self.repo, &img, Some(vm));
        self.saved.insert(
            g["generation"].as_str().unwrap().to_string(),
            (format!("{vm}.img"), digest(&img)),
        );
    }

    fn index(&self) -> PathBuf {
        self.repo.join("index.sqlite")
    }

    /// A copy of the index files as they are now (checkpointed by the last command).
    fn save_index(&self, name: &str) -> PathBuf {
        let copy = self.work.join(name);
        fs::copy(self.index(), &copy).unwrap();
        copy
    }

    fn put_index(&self, from: &Path) {
        for suffix in ["-wal", "-shm"] {
            let _ = fs::remove_file(self.repo.join(format!("index.sqlite{suffix}")));
        }
        fs::copy(from, self.index()).unwrap();
    }

    /// Every saved generation is listed and restores to exactly what was read.
    fn all_restore(&self) {
        let listed: Vec<String> = ["a", "b", "c"]
            .iter()
            .flat_map(|vm| generations(&self.repo, vm))
            .collect();
        for (g, (file, want)) in &self.saved {
            assert!(listed.contains(g), "{g} is gone; listed: {listed:?}");
            let out = self.work.join("restore");
            let _ = fs::remove_dir_all(&out);
            vmrepo([s("extract"), p(&self.repo), s(g), p(&out)]).ok();
            assert_eq!(&digest(&out.join(file)), want, "{g} restores wrong bytes");
        }
        let c = vmrepo([s("check"), p(&self.repo), s("--read-data")]);
        assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    }
}

#[test]
fn an_emptied_index_is_not_trusted_and_gc_deletes_nothing_needed() {
    let f = Fixture::new();
    let packs = packs(&f.repo);
    fs::write(f.index(), b"").unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(f.repo.join(format!("index.sqlite{suffix}")));
    }
    let c = vmrepo([s("check"), p(&f.repo)]);
    assert_eq!(
        c.code, 1,
        "check must not pass an empty index: {}",
        c.stdout
    );
    assert!(
        c.stdout
            .contains("3 generation(s) are in the data files but not in the index"),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("vmrepo check --repair"), "{}", c.stdout);
    assert!(
        !c.stdout.contains("hold nothing any generation uses"),
        "{}",
        c.stdout
    );
    // `gc` lists them again before it decides what is dead, and deletes nothing.
    let g = vmrepo([s("gc"), p(&f.repo)]);
    assert_eq!(g.code, 0, "{}{}", g.stdout, g.stderr);
    assert_eq!(common::packs(&f.repo), packs, "gc deleted data files");
    f.all_restore();
}

#[test]
fn repair_of_an_emptied_index_lists_every_generation_again() {
    let f = Fixture::new();
    fs::write(f.index(), b"").unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(f.repo.join(format!("index.sqlite{suffix}")));
    }
    let r = vmrepo([s("check"), p(&f.repo), s("--repair")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("listed"), "{}", r.stdout);
    vmrepo([s("gc"), p(&f.repo)]).ok();
    f.all_restore();
}

#[test]
fn an_older_index_copy_never_makes_gc_delete_newer_generations() {
    let mut f = Fixture::new();
    let old = f.save_index("old.sqlite");
    f.night("a", 7);
    f.night("b", 8);
    let packs = packs(&f.repo);
    f.put_index(&old);
    let c = vmrepo([s("check"), p(&f.repo)]);
    assert_eq!(c.code, 1, "{}", c.stdout);
    assert!(
        c.stdout
            .contains("2 generation(s) are in the data files but not in the index"),
        "{}",
        c.stdout
    );
    // gc's own advice path: gc, then check --repair, then gc.
    vmrepo([s("gc"), p(&f.repo)]).ok();
    vmrepo([s("check"), p(&f.repo), s("--repair")]).ok();
    vmrepo([s("gc"), p(&f.repo)]).ok();
    assert_eq!(common::packs(&f.repo), packs, "gc deleted data files");
    f.all_restore();
}

#[test]
fn an_index_older_than_a_gc_is_refused_until_rebuilt() {
    let mut f = Fixture::new();
    let old = f.save_index("old.sqlite");
    // Newer nights, then prune and gc rewrite the packs the old index names.
    for i in 0..3 {
        f.night("c", 20 + i);
    }
    vmrepo([s("prune"), p(&f.repo), s("c"), s("--keep-last"), s("1")]).ok();
    f.saved.retain(|g, _| !g.starts_with("c@"));
    let newest_c = generations(&f.repo, "c").pop().unwrap();
    f.saved
        .insert(newest_c, ("c.img".into(), digest(&f.work.join("c.img"))));
    vmrepo([
        s("gc"),
        p(&f.repo),
        s("--repack-threshold"),
        s("100"),
        s("--max-unused"),
        s("0"),
    ])
    .ok();
    let packs = packs(&f.repo);
    f.put_index(&old);
    // An ingest must not deduplicate against rows that name deleted packs: the new generation
    // would be reported saved and could not be restored.
    let img = f.work.join("a.img");
    let i = vmrepo([s("ingest"), p(&f.repo), p(&img), s("--name"), s("a")]);
    assert_ne!(i.code, 0, "ingest trusted a stale index: {}", i.stdout);
    assert!(
        i.stderr.contains("older than the data files"),
        "{}",
        i.stderr
    );
    let c = vmrepo([s("check"), p(&f.repo)]);
    assert_eq!(c.code, 1, "{}", c.stdout);
    assert!(
        c.stdout.contains("older than the data files"),
        "{}",
        c.stdout
    );
    let g = vmrepo([s("gc"), p(&f.repo)]);
    assert_ne!(g.code, 0, "gc must refuse: {}", g.stdout);
    assert!(
        g.stderr.contains("gc stopped before deleting anything"),
        "{}",
        g.stderr
    );
    assert!(g.stderr.contains("--rebuild-index"), "{}", g.stderr);
    let r = vmrepo([s("check"), p(&f.repo), s("--repair")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("index rebuilt"), "{}", r.stdout);
    assert_eq!(common::packs(&f.repo), packs, "data files changed");
    vmrepo([s("gc"), p(&f.repo)]).ok();
    f.all_restore();
}

#[test]
fn another_repositorys_index_is_refused() {
    let f = Fixture::new();
    let other = Fixture::new();
    let packs = packs(&f.repo);
    f.put_index(&other.index());
    for cmd in [vec!["gc"], vec!["list"], vec!["check"]] {
        let mut args: Vec<std::ffi::OsString> = cmd.iter().map(|c| s(c)).collect();
        args.push(p(&f.repo));
        let r = vmrepo(args);
        assert_ne!(r.code, 0, "{cmd:?} accepted a foreign index: {}", r.stdout);
        assert!(
            r.stderr.contains("belongs to another repository"),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    assert_eq!(common::packs(&f.repo), packs, "data files changed");
    vmrepo([s("check"), p(&f.repo), s("--rebuild-index")]).ok();
    f.all_restore();
}

#[test]
fn a_truncated_or_deleted_index_deletes_nothing() {
    let f = Fixture::new();
    let packs = packs(&f.repo);
    let len = fs::metadata(f.index()).unwrap().len();
    let idx = fs::OpenOptions::new().write(true).open(f.index()).unwrap();
    idx.set_len(len / 2).unwrap();
    drop(idx);
    let g = vmrepo([s("gc"), p(&f.repo)]);
    assert_ne!(g.code, 0, "gc ran on a truncated index: {}", g.stdout);
    assert_eq!(common::packs(&f.repo), packs);
    let c = vmrepo([s("check"), p(&f.repo)]);
    assert_ne!(c.code, 0);
    vmrepo([s("check"), p(&f.repo), s("--repair")]).ok();
    f.all_restore();

    fs::remove_file(f.index()).unwrap();
    let g = vmrepo([s("gc"), p(&f.repo)]);
    assert_ne!(g.code, 0);
    assert!(g.stderr.contains("--rebuild-index"), "{}", g.stderr);
    assert_eq!(common::packs(&f.repo), packs);
    vmrepo([s("check"), p(&f.repo), s("--rebuild-index")]).ok();
    f.all_restore();
}

/// An ingest killed after sealing its last pack (which holds its manifest) and before its
/// commit left an `uncommitted-<pack>` marker: that pack is the left-over of a generation never
/// reported saved, not one the index lost. check stays clean, gc deletes it, nothing appears.
#[test]
fn an_ingest_killed_before_its_commit_leaves_no_generation() {
    let f = Fixture::new();
    let before = f.save_index("before.sqlite");
    let old_packs = packs(&f.repo);
    let img = f.work.join("a.img");
    overwrite(&img, 0, 1 << 20, 77);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    ingest(&f.repo, &img, Some("a"));
    // As if killed before the commit: the index without it, the marker of its last pack.
    f.put_index(&before);
    let new: Vec<PathBuf> = packs(&f.repo)
        .into_iter()
        .filter(|p| !old_packs.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let name = new[0].file_stem().unwrap().to_str().unwrap();
    fs::write(
        f.repo.join("locks").join(format!("uncommitted-{name}")),
        b"",
    )
    .unwrap();
    let c = vmrepo([s("check"), p(&f.repo), s("--read-data")]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(
        c.stdout.contains("left over from interrupted runs"),
        "{}",
        c.stdout
    );
    vmrepo([s("gc"), p(&f.repo)]).ok();
    assert_eq!(packs(&f.repo), old_packs, "the left-over was not deleted");
    assert!(fs::read_dir(f.repo.join("locks")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("uncommitted-")));
    f.all_restore();
}

/// An ingest killed before its commit whose marker a crash lost, then the next ingest of that
/// VM in the same second: two manifests name one generation. The committed one stays listed
/// and restores; `check` says what the other is and stays clean; a rebuilt index lists the one
/// that finished last; gc drops the other.
#[test]
fn a_generation_name_recorded_twice_lists_the_committed_one() {
    let mut f = Fixture::new();
    let before = f.save_index("before.sqlite");
    let img = f.work.join("a.img");
    let time = "2026-12-04T03:00:00Z";
    overwrite(&img, 0, 1 << 20, 91);
    ingest_at(&f.repo, &img, "a", time);
    // Killed before the commit, and no marker: the index without it.
    f.put_index(&before);
    // Finish times are in seconds: the rerun finishes in a later one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    overwrite(&img, 0, 1 << 20, 92);
    ingest_at(&f.repo, &img, "a", time);
    f.saved
        .insert(format!("a@{time}"), ("a.img".into(), digest(&img)));
    let shadowed = "1 manifest(s) are not generations because a generation of their name";
    let c = vmrepo([s("check"), p(&f.repo)]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(c.stdout.contains(shadowed), "{}", c.stdout);
    f.all_restore();

    let r = vmrepo([s("check"), p(&f.repo), s("--rebuild-index")]);
    r.ok();
    assert!(
        r.stdout
            .contains(&format!("not listed: a@{time} (manifest")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(shadowed), "{}", r.stdout);
    f.all_restore();

    vmrepo([s("gc"), p(&f.repo)]).ok();
    let c = vmrepo([s("check"), p(&f.repo)]);
    assert!(!c.stdout.contains("are not generations"), "{}", c.stdout);
    f.all_restore();
}

/// An index rebuild killed at any point, its object rows filed on disk in many partitions
/// (tiny batches) or being added to the new index, leaves the live index as it was: every
/// generation listed and restorable, `check` clean. The next rebuild removes what the killed
/// ones left (the half-built index, the partition files) and completes.
#[test]
fn an_index_rebuild_killed_at_any_point_leaves_the_index_as_it_was() {
    let mut f = Fixture::new();
    f.night("a", 7);
    let listing = || -> Vec<String> {
        ["a", "b", "c"]
            .iter()
            .flat_map(|vm| generations(&f.repo, vm))
            .collect()
    };
    let before = listing();
    let left_overs = |repo: &Path| -> Vec<String> {
        fs::read_dir(repo)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("idset-") || n.contains(".rebuild"))
            .collect()
    };
    let mut killed_with_left_overs = 0;
    for delay_ms in [5u64, 15, 30, 50, 80, 120, 180] {
        let mut child = std::process::Command::new(BIN)
            .args([s("check"), p(&f.repo), s("--rebuild-index")])
            .env("VMREPO_TEST_TINY_BATCHES", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !left_overs(&f.repo).is_empty() {
            killed_with_left_overs += 1;
        }
        // Killed (or finished): either way nothing a generation needs is gone.
        assert_eq!(
            listing(),
            before,
            "after a kill at {delay_ms} ms ({status})"
        );
        let c = vmrepo([s("check"), p(&f.repo)]);
        assert_eq!(
            c.code, 0,
            "after a kill at {delay_ms} ms:\n{}{}",
            c.stdout, c.stderr
        );
    }
    assert!(
        killed_with_left_overs > 0,
        "no kill landed while the rebuild had its files out"
    );
    f.all_restore();
    // What a run killed while no other ran would leave (a process long gone): the next
    // rebuild removes it, though its own rows fit in memory.
    let dead = f.repo.join("idset-999999999-00000000000000ff");
    fs::create_dir(&dead).unwrap();
    fs::write(dead.join("00"), [7u8; 66]).unwrap();
    let r = vmrepo([s("check"), p(&f.repo), s("--rebuild-index")]);
    r.ok();
    assert_eq!(listing(), before);
    assert!(left_overs(&f.repo).is_empty(), "{:?}", left_overs(&f.repo));
    f.all_restore();
}

/// The records of pack file `pack`: (offset, kind, stored length), read as docs/FORMAT.md
/// lays them out (a 16-byte pack header, then records of a 52-byte header and a payload).
fn records_of(pack: &Path) -> Vec<(usize, u8, usize)> {
    let bytes = fs::read(pack).unwrap();
    let mut out = Vec::new();
    let mut at = 16usize;
    while at + 52 <= bytes.len() {
        assert_eq!(&bytes[at..at + 4], b"vrOB", "not a record at {at}");
        let stored = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push((at, bytes[at + 4], stored));
        at += 52 + stored;
    }
    out
}

/// An index copy older than the data, a newer generation spread over two data files, and one
/// bit of rot in a record header before that generation's manifest, in a data file whose
/// description is gone. gc reads on past the damaged header, so it still sees the newer
/// generation (it used to stop there, miss the manifest, and delete the other data file as a
/// left-over, losing the generation); it deletes nothing, and after a repair the generation
/// restores byte for byte but for the one damaged record.
#[test]
fn a_damaged_record_header_never_hides_a_newer_generation_from_gc() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let img = t.path().join("a.img");
    fs::write(&img, bytes(2 << 20, 1)).unwrap();
    ingest(&repo, &img, Some("a"));
    let first_packs = packs(&repo);
    let old = t.path().join("old.sqlite");
    fs::copy(repo.join("index.sqlite"), &old).unwrap();

    // 72 MiB of new, random data (stored as it is): more than one 64 MiB data file.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    sh(&format!(
        "head -c {} /dev/urandom > '{}'",
        72 << 20,
        img.display()
    ))
    .ok();
    let g = ingest(&repo, &img, Some("a"));
    let newer = g["generation"].as_str().unwrap().to_string();
    let all = packs(&repo);
    let new_packs: Vec<&PathBuf> = all.iter().filter(|p| !first_packs.contains(p)).collect();
    assert!(new_packs.len() >= 2, "{new_packs:?}");
    let holder = new_packs
        .iter()
        .find(|p| records_of(p).iter().any(|r| r.1 == 5))
        .expect("a data file holds the manifest");
    let recs = records_of(holder);
    let manifest_at = recs.iter().position(|r| r.1 == 5).unwrap();
    assert!(manifest_at >= 1, "records before the manifest: {recs:?}");
    // A bit of the first record's id, and the descriptions are gone.
    flip_bit(holder, recs[0].0 as u64 + 20, 3);
    fs::remove_dir_all(repo.join("pack-index")).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(repo.join(format!("index.sqlite{suffix}")));
    }
    fs::copy(&old, repo.join("index.sqlite")).unwrap();

    let gc = vmrepo([s("gc"), p(&repo)]);
    assert_eq!(gc.code, 0, "{}{}", gc.stdout, gc.stderr);
    assert_eq!(packs(&repo), all, "gc deleted data files: {}", gc.stdout);
    assert!(
        generations(&repo, "a").contains(&newer),
        "{newer} is not listed after gc: {}",
        gc.stdout
    );

    let out = t.path().join("out");
    let x = vmrepo([
        s("extract"),
        p(&repo),
        s(&newer),
        p(&out),
        s("--allow-damaged"),
    ]);
    let said = format!("{}{}", x.stdout, x.stderr);
    let (want, got) = (
        fs::read(&img).unwrap(),
        fs::read(out.join("a.img")).unwrap(),
    );
    assert_eq!(want.len(), got.len(), "{said}");
    let differing = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    assert!(differing <= 64 << 10, "{differing} bytes differ: {said}");
}
