//! Commands at the same time, and killed at random: ingests of different VMs side by side with
//! prune, gc, check, list and extract. After every round, every generation whose ingest exited
//! 0 (and that no prune removed) is still listed, extracts byte for byte, and the repository
//! passes `check --read-data`. scripts/soak.sh runs the same kind of rounds for hours.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift), seeded per run and printed, so that a failing
/// schedule can be replayed with VMREPO_SOAK_SEED.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("VMREPO_SOAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("soak seed: {seed} (replay with VMREPO_SOAK_SEED={seed})");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn spawn(args: &[std::ffi::OsString]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmrepo")
}

struct Done {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn finish(child: Child) -> Done {
    let out = child.wait_with_output().unwrap();
    Done {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// BLAKE3 of a file's bytes.
fn digest(path: &Path) -> String {
    blake3::hash(&fs::read(path).unwrap()).to_hex().to_string()
}

/// Extracts `generation` into a fresh directory and returns the digest of the image in it.
fn restored_digest(repo: &Path, generation: &str, work: &Path, file: &str) -> String {
    let out = work.join(format!("x-{}", generation.replace([':', '@'], "_")));
    let _ = fs::remove_dir_all(&out);
    vmrepo([s("extract"), p(repo), s(generation), p(&out)]).ok();
    let d = digest(&out.join(file));
    fs::remove_dir_all(&out).unwrap();
    d
}

/// Concurrent ingests of different VMs, a large one with several small ones starting while it
/// runs, and read-only commands in between: every ingest succeeds and restores exactly.
/// (Before the index's read-ahead hint kept its descriptor open, closing it dropped the
/// process's SQLite locks and this corrupted the index or lost a generation.)
#[test]
fn concurrent_ingests_of_different_vms_all_stay_restorable() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let big = t.path().join("big.img");
    fs::write(&big, bytes(160 << 20, 7)).unwrap();
    let small: Vec<PathBuf> = (0..6)
        .map(|i| {
            let f = t.path().join(format!("s{i}.img"));
            fs::write(&f, bytes(3 << 20, 100 + i)).unwrap();
            f
        })
        .collect();
    for round in 0..2 {
        let big_run = spawn(&[
            s("ingest"),
            p(&repo),
            p(&big),
            s("--name"),
            s(&format!("big{round}")),
            s("--json"),
        ]);
        std::thread::sleep(Duration::from_millis(150));
        let mut runs = Vec::new();
        for (i, img) in small.iter().enumerate() {
            runs.push((
                img.clone(),
                spawn(&[
                    s("ingest"),
                    p(&repo),
                    p(img),
                    s("--name"),
                    s(&format!("s{i}-{round}")),
                    s("--json"),
                ]),
            ));
            if i % 2 == 1 {
                vmrepo([s("list"), p(&repo)]).ok();
            }
        }
        runs.push((big.clone(), big_run));
        for (img, child) in runs {
            let d = finish(child);
            assert_eq!(
                d.code,
                Some(0),
                "ingest of {} failed: {}",
                img.display(),
                d.stderr
            );
            let gen: serde_json::Value = serde_json::from_str(&d.stdout).unwrap();
            let name = gen["generation"].as_str().unwrap();
            let file = img.file_name().unwrap().to_str().unwrap();
            assert_eq!(
                restored_digest(&repo, name, t.path(), file),
                digest(&img),
                "{name} does not restore to what was read"
            );
        }
    }
    let c = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(c.stdout.contains("ok: 14 generations"), "{}", c.stdout);
}

/// The nonce of every encrypted record in the repository's packs (docs/FORMAT.md, "Pack
/// files": a 16-byte pack header, then records of a 52-byte header and `stored_len` payload
/// bytes; an encrypted payload starts with its nonce, after the base id for a delta).
fn record_nonces(repo: &Path) -> Vec<[u8; 12]> {
    let mut nonces = Vec::new();
    let mut packs = Vec::new();
    for dir in fs::read_dir(repo.join("data")).unwrap() {
        for f in fs::read_dir(dir.unwrap().path()).unwrap() {
            packs.push(f.unwrap().path());
        }
    }
    for pack in packs {
        let b = fs::read(&pack).unwrap();
        assert_eq!(&b[..8], b"VMREPACK", "{}", pack.display());
        let mut at = 16;
        while at + 52 <= b.len() {
            assert_eq!(&b[at..at + 4], b"vrOB", "{} at {at}", pack.display());
            let (codec, cipher) = (b[at + 5], b[at + 6]);
            let stored = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            assert_eq!(cipher, 1, "an unencrypted record in {}", pack.display());
            let nonce_at = at + 52 + if codec == 2 { 32 } else { 0 };
            nonces.push(b[nonce_at..nonce_at + 12].try_into().unwrap());
            at += 52 + stored;
        }
        assert_eq!(at, b.len(), "{} ends in a torn record", pack.display());
    }
    nonces
}

/// Ingests of different VMs into one encrypted repository, all started at once: each process
/// seals its objects and index rows under nonces of its own, every generation restores byte
/// for byte, `check --read-data` authenticates every object, and an index rebuilt from the
/// packs alone (`check --rebuild-index`) still restores them.
#[test]
fn concurrent_ingests_into_an_encrypted_repository_all_stay_restorable() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let pass = t.path().join("passphrase");
    fs::write(&pass, "concurrent writers\n").unwrap();
    let with_pass = |args: &[std::ffi::OsString]| -> Vec<std::ffi::OsString> {
        let mut a = args.to_vec();
        a.extend([s("--password-file"), p(&pass)]);
        a
    };
    vmrepo(with_pass(&[
        s("init"),
        p(&repo),
        s("--encryption"),
        s("aes-256-gcm"),
        s("--kdf-memory"),
        s("8"),
    ]))
    .ok();
    let images: Vec<PathBuf> = (0..5)
        .map(|i| {
            let f = t.path().join(format!("e{i}.img"));
            fs::write(&f, bytes((3 + i as usize) << 20, 200 + i)).unwrap();
            f
        })
        .collect();
    let runs: Vec<(PathBuf, Child)> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let args = with_pass(&[
                s("ingest"),
                p(&repo),
                p(img),
                s("--name"),
                s(&format!("e{i}")),
                s("--json"),
            ]);
            (img.clone(), spawn(&args))
        })
        .collect();
    let mut saved = Vec::new();
    for (img, child) in runs {
        let d = finish(child);
        assert_eq!(d.code, Some(0), "ingest of {}: {}", img.display(), d.stderr);
        let gen: serde_json::Value = serde_json::from_str(&d.stdout).unwrap();
        saved.push((gen["generation"].as_str().unwrap().to_string(), img));
    }
    let restores_all = |when: &str| {
        for (name, img) in &saved {
            let out = t.path().join("out");
            let _ = fs::remove_dir_all(&out);
            vmrepo(with_pass(&[s("extract"), p(&repo), s(name), p(&out)])).ok();
            let file = img.file_name().unwrap();
            assert!(
                same_file(img, &out.join(file)),
                "{name} does not restore to what was read ({when})"
            );
        }
    };
    restores_all("after the ingests");

    // AES-GCM under one key must never see a nonce twice: not within a writer, and not
    // between writers that ran at the same time.
    let nonces = record_nonces(&repo);
    let distinct: std::collections::HashSet<&[u8; 12]> = nonces.iter().collect();
    assert!(nonces.len() > 1000, "only {} records", nonces.len());
    assert_eq!(
        distinct.len(),
        nonces.len(),
        "a nonce was used twice among {} encrypted records",
        nonces.len()
    );

    let c = vmrepo(with_pass(&[s("check"), p(&repo), s("--read-data")]));
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(c.stdout.contains("ok: 5 generations"), "{}", c.stdout);
    vmrepo(with_pass(&[s("check"), p(&repo), s("--rebuild-index")])).ok();
    restores_all("after the index was rebuilt from the packs");
}

/// The bounded soak: rounds of three ingests of different VMs, a prune, a gc, a check, an
/// extract, a `check --repair` or `--rebuild-index` (alternate rounds) and a copy to a second
/// repository, all started at once; one of them killed with SIGKILL at a random moment. After
/// each round every generation reported saved is still there and restores byte for byte
/// (unless the prune removed it, which never happens to the newest 2 of a VM), one of them
/// restores byte for byte from the copy if it holds it, and `check --read-data` is clean in
/// both repositories.
#[test]
fn soak_concurrent_commands_with_random_kills() {
    // scripts/soak.sh sets VMREPO_SOAK_SECONDS to run rounds for hours.
    let rounds: u64 = std::env::var("VMREPO_SOAK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let for_seconds: Option<f64> = std::env::var("VMREPO_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut rng = Rng::from_env();
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let offsite = t.path().join("offsite");
    vmrepo([s("init"), p(&offsite)]).ok();
    let images: Vec<(String, PathBuf, usize)> =
        [("a", 48usize << 20), ("b", 24 << 20), ("c", 6 << 20)]
            .into_iter()
            .map(|(vm, size)| (vm.to_string(), t.path().join(format!("{vm}.img")), size))
            .collect();
    // generation name -> digest of the image it was read from
    let mut saved: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut kills = 0;
    let started = Instant::now();
    let mut round = 0u64;
    let mut victims: BTreeMap<String, u64> = BTreeMap::new();
    while match for_seconds {
        Some(limit) => started.elapsed().as_secs_f64() < limit,
        None => round < rounds,
    } {
        round += 1;
        for (i, (_, img, size)) in images.iter().enumerate() {
            // Each round changes a part of each image (so ingests store new chunks) and keeps
            // the rest (so they dedup against what earlier, maybe killed, rounds stored): one
            // MiB rewritten, and a few 4 KiB blocks edited here and there, so that chunks are
            // stored as deltas of the ones they replace and gc and prune meet bases.
            let mut data = fs::read(img).unwrap_or_else(|_| bytes(*size, 1 + i as u64));
            let at = rng.below((*size - (1 << 20)) as u64) as usize;
            data[at..at + (1 << 20)].copy_from_slice(&bytes(1 << 20, rng.next()));
            for _ in 0..8 {
                let block = rng.below((*size >> 12) as u64) as usize;
                data[block << 12..(block + 1) << 12].copy_from_slice(&bytes(4096, rng.next()));
            }
            fs::write(img, &data).unwrap();
        }
        let extract_target = saved
            .keys()
            .nth(rng.below(saved.len().max(1) as u64) as usize);
        let mut children: Vec<(String, Child)> = Vec::new();
        for (vm, img, _) in &images {
            children.push((
                format!("ingest {vm}"),
                spawn(&[
                    s("ingest"),
                    p(&repo),
                    p(img),
                    s("--name"),
                    s(vm),
                    s("--json"),
                    s("--lock-wait"),
                    s("60"),
                ]),
            ));
        }
        children.push((
            "prune".into(),
            spawn(&[
                s("prune"),
                p(&repo),
                s("--keep-last"),
                s("2"),
                s("--lock-wait"),
                s("60"),
            ]),
        ));
        children.push((
            "gc".into(),
            spawn(&[s("gc"), p(&repo), s("--lock-wait"), s("60")]),
        ));
        children.push((
            "check".into(),
            spawn(&[s("check"), p(&repo), s("--lock-wait"), s("60")]),
        ));
        let (fix, flag) = if round.is_multiple_of(2) {
            ("repair", "--repair")
        } else {
            ("rebuild", "--rebuild-index")
        };
        children.push((
            fix.into(),
            spawn(&[s("check"), p(&repo), s(flag), s("--lock-wait"), s("60")]),
        ));
        children.push((
            "copy".into(),
            spawn(&[s("copy"), p(&repo), p(&offsite), s("--lock-wait"), s("60")]),
        ));
        if let Some(g) = extract_target {
            let out = t.path().join("soak-extract");
            let _ = fs::remove_dir_all(&out);
            children.push((
                format!("extract {g}"),
                spawn(&[
                    s("extract"),
                    p(&repo),
                    s(g),
                    p(&out),
                    s("--lock-wait"),
                    s("60"),
                ]),
            ));
        }
        let victim = rng.below(children.len() as u64) as usize;
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        let _ = children[victim].1.kill();
        kills += 1;
        *victims
            .entry(children[victim].0.split(' ').next().unwrap().to_string())
            .or_default() += 1;
        // An extract whose generation this round's prune removed first (its VM got two newer
        // ones meanwhile): that is the prune at work, checked below with every gone generation.
        let mut extracted_pruned: Option<String> = None;
        for (what, child) in children {
            let d = finish(child);
            if let Some(g) = what.strip_prefix("extract ") {
                if d.code == Some(1) && d.stderr.contains("has no generation") {
                    extracted_pruned = Some(g.to_string());
                    continue;
                }
            }
            if what.starts_with("ingest") && d.code == Some(0) {
                let vm = what.trim_start_matches("ingest ");
                let gen: serde_json::Value = serde_json::from_str(&d.stdout).unwrap();
                let img = &images.iter().find(|(v, _, _)| v == vm).unwrap().1;
                saved.insert(
                    gen["generation"].as_str().unwrap().to_string(),
                    (
                        digest(img),
                        img.file_name().unwrap().to_str().unwrap().into(),
                    ),
                );
            } else if d.code.is_some() && d.code != Some(0) && !what.starts_with("ingest") {
                // Killed commands have no code; the others must succeed (check: the
                // repository is clean at any moment, whatever else is running).
                panic!(
                    "round {round}: {what} failed ({:?}): {}{}",
                    d.code, d.stdout, d.stderr
                );
            }
        }
        // prune keeps the newest two generations of each VM that the repository lists (which
        // may include one whose ingest was killed after its commit); a saved generation may be
        // gone only if two newer ones of its VM are listed.
        let listed: Vec<String> = ["a", "b", "c"]
            .iter()
            .flat_map(|vm| generations(&repo, vm))
            .collect();
        let gone: Vec<String> = saved
            .keys()
            .filter(|g| !listed.contains(g))
            .cloned()
            .collect();
        for g in gone {
            let vm = &g[..g.find('@').unwrap() + 1];
            let newer = listed
                .iter()
                .filter(|l| l.starts_with(vm) && l.as_str() > g.as_str())
                .count();
            assert!(
                newer >= 2,
                "round {round}: {g} was reported saved and is gone, with {newer} newer generation(s) of its VM listed: {listed:?}"
            );
            saved.remove(&g);
        }
        if let Some(g) = extracted_pruned {
            assert!(
                !listed.contains(&g),
                "round {round}: extract of {g} said it does not exist, and it is listed"
            );
        }
        for (g, (want, file)) in &saved {
            assert!(
                listed.contains(g),
                "round {round}: {g} was reported saved and is gone"
            );
            assert_eq!(
                &restored_digest(&repo, g, t.path(), file),
                want,
                "round {round}: {g} does not restore to what was read"
            );
        }
        let c = vmrepo([s("check"), p(&repo), s("--read-data")]);
        assert_eq!(c.code, 0, "round {round}: {}{}", c.stdout, c.stderr);
        let c = vmrepo([s("check"), p(&offsite), s("--read-data")]);
        assert_eq!(c.code, 0, "round {round}, copy: {}{}", c.stdout, c.stderr);
        let copied: Vec<String> = ["a", "b", "c"]
            .iter()
            .flat_map(|vm| generations(&offsite, vm))
            .filter(|g| saved.contains_key(g))
            .collect();
        if !copied.is_empty() {
            let g = &copied[rng.below(copied.len() as u64) as usize];
            let (want, file) = &saved[g];
            assert_eq!(
                &restored_digest(&offsite, g, t.path(), file),
                want,
                "round {round}: {g} does not restore from the copy to what was read"
            );
        }
    }
    let deltas: i64 = rusqlite::Connection::open(repo.join("index.sqlite"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM all_objects WHERE base IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        deltas > 0,
        "the rounds' edits left no chunk stored as a delta: the soak did not exercise bases"
    );
    eprintln!(
        "soak: {round} rounds, {kills} kills ({victims:?}), {} generations kept and verified, \
         {deltas} deltas indexed, {:.0} s",
        saved.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A command waiting for the repository marks itself waiting (a file it keeps locked under
/// `locks/repository.lock.waiting/`), and gc gives way to a live mark: maintenance cannot keep
/// the night's backups out. A mark whose process is gone is removed, not obeyed.
#[test]
fn gc_gives_way_to_a_waiting_backup_and_ignores_a_dead_one() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let img = t.path().join("vm.img");
    sparse_image(&img, 8 << 20, &[(0, 1 << 20, 1)]);
    ingest(&repo, &img, Some("vm"));
    let waiting = repo.join("locks/repository.lock.waiting");

    // A real ingest waiting behind an exclusive holder (held here) leaves its mark while it
    // waits and removes it once it has run.
    let lock = fs::File::open(repo.join("locks/repository.lock")).unwrap();
    lock.lock().unwrap();
    overwrite(&img, 0, 65536, 2);
    let child = spawn(&[
        s("--lock-wait"),
        s("60"),
        s("ingest"),
        p(&repo),
        p(&img),
        s("--name"),
        s("vm"),
    ]);
    wait_for("the waiting ingest's mark", 30, || {
        fs::read_dir(&waiting).is_ok_and(|d| d.count() == 1)
    });
    // The mark is live: gc, once the lock is free, gives way to it.
    let mark = fs::read_dir(&waiting)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let held = fs::File::open(&mark).unwrap();
    assert!(
        held.try_lock().is_err(),
        "the waiter must keep its mark locked"
    );
    drop(held);
    drop(lock);
    let done = finish(child);
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(fs::read_dir(&waiting).unwrap().count(), 0);

    // A waiter's live mark (this test's own) keeps gc out, with the reason; ingests go on.
    let mark = waiting.join("1-0a0a0a0a0a0a0a0a");
    let held = fs::File::create(&mark).unwrap();
    held.lock_shared().unwrap();
    let gc = vmrepo([s("gc"), p(&repo)]);
    assert_ne!(gc.code, 0);
    assert!(
        gc.stderr.contains("a backup or restore is waiting for it"),
        "{}",
        gc.stderr
    );
    overwrite(&img, 0, 65536, 3);
    ingest(&repo, &img, Some("vm"));
    // The same mark with no process behind it is removed and gc runs.
    drop(held);
    vmrepo([s("gc"), p(&repo)]).ok();
    assert!(!mark.exists());
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    assert_eq!(generations(&repo, "vm").len(), 3);
}
