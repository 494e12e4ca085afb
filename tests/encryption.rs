//! Encryption at rest, end to end: nothing readable without the key (not even the VM's name),
//! passphrases from every source, key management, a wrong passphrase that changes nothing, and
//! flipped bits in data files and index that are detected rather than restored.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const PASS: &str = "correct horse battery staple";
const MARKER: &str = "MARKER-7f3a9c-do-not-leak";

/// Runs vmrepo with VMREPO_PASSWORD set to `pass`.
fn enc_with(pass: &str, args: &[std::ffi::OsString]) -> Run {
    vmrepo_with_passphrase(pass, None, args)
}

fn enc(args: &[std::ffi::OsString]) -> Run {
    enc_with(PASS, args)
}

fn init_encrypted(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    let r = enc(&[
        s("init"),
        p(&repo),
        s("--encryption"),
        s("aes-256-gcm"),
        s("--kdf-memory"),
        s("8"),
    ]);
    r.ok();
    assert!(r.stdout.contains("encryption: AES-256-GCM"), "{}", r.stdout);
    repo
}

/// A VM named secret-web01 whose files and disk carry the marker.
fn secret_vm(dir: &Path) -> PathBuf {
    let vm = make_vm(
        dir,
        "secret-web01",
        &[(16 << 20, vec![(0, 10 << 20, 5), (12 << 20, 1 << 20, 6)])],
    );
    fs::write(
        vm.join("vmware.log"),
        format!("{MARKER} in the log\n").repeat(40),
    )
    .unwrap();
    let flat = fs::OpenOptions::new()
        .write(true)
        .open(vm.join("secret-web01-flat.vmdk"))
        .unwrap();
    flat.write_all_at(MARKER.as_bytes(), 13 << 20).unwrap();
    vm
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn nothing_in_the_repository_names_or_shows_the_vm() {
    let t = tempfile::tempdir().unwrap();
    let vm = secret_vm(&t.path().join("vmfs"));
    let repo = init_encrypted(t.path());
    enc(&[s("ingest"), p(&repo), p(&vm)]).ok();
    overwrite(&vm.join("secret-web01-flat.vmdk"), 2 << 20, 1 << 20, 77);
    enc(&[s("ingest"), p(&repo), p(&vm)]).ok();
    // Prune (tombstone), gc, and a rebuilt index (old index kept beside it) must not leak either.
    enc(&[s("prune"), p(&repo), s("--keep-last"), s("1"), s("--gc")]).ok();
    let r = enc(&[s("check"), p(&repo), s("--rebuild-index")])
        .ok()
        .stdout
        .clone();
    assert!(r.contains("ok: 1 generations"), "{r}");
    let list = enc(&[s("list"), p(&repo)]).ok().stdout.clone();
    assert!(
        list.contains("secret-web01"),
        "the owner sees the name: {list}"
    );

    let mut files = Vec::new();
    all_files(&repo, &mut files);
    assert!(files.len() > 5);
    let source = vm.to_string_lossy().into_owned();
    for f in &files {
        let bytes = fs::read(f).unwrap();
        for needle in [
            "secret-web01",
            MARKER,
            source.as_str(),
            "secret-web01-flat.vmdk",
            "scsi0:0",
        ] {
            assert!(
                !contains(&bytes, needle.as_bytes()),
                "{} contains {needle:?}",
                f.display()
            );
        }
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(!name.contains("secret"), "{name}");
    }

    // The owner restores byte for byte.
    let out = t.path().join("out");
    enc(&[s("extract"), p(&repo), s("secret-web01"), p(&out)]).ok();
    assert!(same_file(
        &out.join("secret-web01-flat.vmdk"),
        &vm.join("secret-web01-flat.vmdk")
    ));
    assert!(same_file(&out.join("vmware.log"), &vm.join("vmware.log")));
    enc(&[s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn equal_data_gets_different_ids_in_different_encrypted_repositories() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 4 << 20, 9)]);
    let ids = |repo: &Path| -> std::collections::HashSet<vmrepo::ObjectId> {
        let index = vmrepo::repo::index::Index::open(
            &repo.join("index.sqlite"),
            false,
            std::sync::Arc::new(vmrepo::repo::crypto::Keys::none()),
        )
        .unwrap();
        let mut out = std::collections::HashSet::new();
        index
            .for_each_object(|l| {
                out.insert(l.header.id);
                Ok(())
            })
            .unwrap();
        out
    };
    let a = init_encrypted(&t.path().join("a"));
    let b = init_encrypted(&t.path().join("b"));
    let plain = init_repo(&t.path().join("p"));
    for r in [&a, &b] {
        enc(&[s("ingest"), p(r), p(&img)]).ok();
    }
    ingest(&plain, &img, None);
    let (ia, ib, ip) = (ids(&a), ids(&b), ids(&plain));
    assert!(ia.is_disjoint(&ib), "two keys, same ids");
    assert!(ia.is_disjoint(&ip), "keyed ids equal plain BLAKE3 ids");
}

/// An encrypted repository cuts disks where only its key says: the chunk lengths an outsider
/// reads in the record headers are not the ones they get by backing the same data up themselves,
/// as they are between unencrypted repositories. Its config says so, and a config that claims
/// keyed cut points without a key is refused.
#[test]
fn an_outsider_cannot_compute_where_an_encrypted_repository_cuts() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 8 << 20, &[(0, 8 << 20, 4)]);
    let lengths = |repo: &Path| -> Vec<u32> {
        let index = vmrepo::repo::index::Index::open(
            &repo.join("index.sqlite"),
            false,
            std::sync::Arc::new(vmrepo::repo::crypto::Keys::none()),
        )
        .unwrap();
        let mut out = Vec::new();
        index
            .for_each_object(|l| {
                if l.header.kind == vmrepo::repo::object::ObjectKind::Chunk {
                    out.push(l.header.raw_len);
                }
                Ok(())
            })
            .unwrap();
        out.sort_unstable();
        out
    };
    let a = init_encrypted(&t.path().join("a"));
    let b = init_encrypted(&t.path().join("b"));
    let (p1, p2) = (
        init_repo(&t.path().join("p1")),
        init_repo(&t.path().join("p2")),
    );
    for r in [&a, &b] {
        enc(&[s("ingest"), p(r), p(&img), s("--name"), s("d")]).ok();
    }
    for r in [&p1, &p2] {
        ingest(r, &img, Some("d"));
    }
    let (la, lb, l1, l2) = (lengths(&a), lengths(&b), lengths(&p1), lengths(&p2));
    assert!(l1.len() > 200, "{} chunks", l1.len());
    assert_eq!(
        l1, l2,
        "public cut points: the same lengths for the same data"
    );
    assert_ne!(la, l1, "an encrypted repository cut at the public points");
    assert_ne!(la, lb, "two keys cut alike");
    let config = fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(config.contains("format_version = 4"), "{config}");
    assert!(config.contains("cut_points = \"keyed\""), "{config}");
    let out = t.path().join("out");
    enc(&[s("extract"), p(&a), s("d"), p(&out)]).ok();
    assert!(same_file(&out.join("d.img"), &img));
    enc(&[s("check"), p(&a), s("--read-data")]).ok();

    let plain = fs::read_to_string(p1.join("config.toml")).unwrap();
    assert!(plain.contains("format_version = 4"), "{plain}");
    assert!(!plain.contains("cut_points"), "{plain}");
    let forged = plain.replace("[chunker]", "[chunker]\ncut_points = \"keyed\"");
    fs::write(p1.join("config.toml"), forged).unwrap();
    let r = vmrepo([s("list"), p(&p1)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("keyed cut points need an encrypted repository"),
        "{}",
        r.stderr
    );
}

/// Paths, sizes and modification times of every file under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut files = Vec::new();
    all_files(dir, &mut files);
    files
        .into_iter()
        .map(|f| {
            let m = fs::metadata(&f).unwrap();
            (f, (m.len(), m.modified().unwrap()))
        })
        .collect()
}

#[test]
fn a_wrong_passphrase_is_one_clear_error_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 4 << 20, 9)]);
    let repo = init_encrypted(t.path());
    enc(&[s("ingest"), p(&repo), p(&img)]).ok();
    let before = snapshot(&repo);
    let out = t.path().join("out");
    for args in [
        vec![s("list"), p(&repo)],
        vec![s("ingest"), p(&repo), p(&img)],
        vec![s("extract"), p(&repo), s("d"), p(&out)],
        vec![s("check"), p(&repo), s("--repair")],
        vec![s("prune"), p(&repo), s("--keep-last"), s("1")],
        vec![s("gc"), p(&repo)],
        vec![s("key"), s("export"), p(&repo)],
    ] {
        let r = enc_with("not the passphrase", &args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(
            r.stderr.contains("wrong passphrase for repository"),
            "{}",
            r.stderr
        );
        assert_eq!(r.stderr.lines().count(), 1, "one clear error: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?} printed {}", r.stdout);
    }
    assert!(!out.exists());
    assert_eq!(
        snapshot(&repo),
        before,
        "a wrong passphrase changed the repository"
    );
    // No passphrase at all (and no terminal): says how to give one.
    let r = Command::new(BIN)
        .env_remove("VMREPO_PASSWORD")
        .args([s("list"), p(&repo)])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("is encrypted"), "{err}");
    assert!(err.contains("VMREPO_PASSWORD"), "{err}");
}

/// A key file is read before anything is decrypted, from storage an attacker may write to: one
/// asking argon2id for terabytes of memory, billions of passes or no lanes is refused with an
/// error naming it (it used to abort the process, or would have run for days), and memory the
/// process cannot get is an error, not an abort. Nothing in the repository changes.
#[test]
fn a_key_file_asking_for_unbounded_work_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 4 << 20, 9)]);
    let repo = init_encrypted(t.path());
    enc(&[s("ingest"), p(&repo), p(&img)]).ok();
    let key = fs::read_dir(repo.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|k| k.extension().is_some_and(|x| x == "key"))
        .unwrap();
    let good = fs::read_to_string(&key).unwrap();
    let with_cost = |memory_kib: u64, iterations: u64, parallelism: u64| {
        let mut k: serde_json::Value = serde_json::from_str(&good).unwrap();
        k["cost"] = serde_json::json!({
            "memory_kib": memory_kib, "iterations": iterations, "parallelism": parallelism
        });
        fs::write(&key, serde_json::to_string(&k).unwrap()).unwrap();
    };
    for (m, i, l) in [
        (4_000_000_000, 3, 1),
        (8192, 4_000_000_000, 1),
        (8192, 3, 0),
    ] {
        with_cost(m, i, l);
        let before = snapshot(&repo);
        let r = enc(&[s("list"), p(&repo)]);
        assert_eq!(r.code, 1, "cost {m}/{i}/{l}: {}", r.stderr);
        assert!(
            r.stderr.contains(&key.display().to_string()),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("argon2id cost"), "{}", r.stderr);
        assert_eq!(snapshot(&repo), before);
    }
    // 2 GiB is a cost vmrepo writes; a process limited to 1 GB cannot get it.
    with_cost(2 << 20, 3, 1);
    let r = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 1000000; exec '{BIN}' list '{}'",
            repo.display()
        ))
        .env("VMREPO_PASSWORD", PASS)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("needs 2048 MiB of memory"), "{err}");
    assert!(err.contains("ulimit"), "{err}");
    // The file as vmrepo wrote it opens again; asking to write a larger cost is refused.
    fs::write(&key, &good).unwrap();
    enc(&[s("list"), p(&repo)]).ok();
    let r = enc(&[
        s("init"),
        p(&t.path().join("big")),
        s("--encryption"),
        s("aes-256-gcm"),
        s("--kdf-memory"),
        s("5000"),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("1..=4096"), "{}", r.stderr);
}

#[test]
fn passphrases_come_from_files_commands_and_extra_keys() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 4 << 20, 9)]);
    let repo = init_encrypted(t.path());
    enc(&[s("ingest"), p(&repo), p(&img)]).ok();
    let file = t.path().join("pass.txt");
    fs::write(&file, format!("{PASS}\n")).unwrap();
    let list = |args: &[std::ffi::OsString]| {
        Command::new(BIN)
            .env_remove("VMREPO_PASSWORD")
            .arg("list")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(list(&[s("--password-file"), p(&file)]).status.success());
    assert!(
        list(&[s("--password-command"), s(&format!("echo '{PASS}'"))])
            .status
            .success()
    );
    let r = list(&[s("--password-command"), s("exit 3")]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("command \"exit 3\" failed"));

    // A second passphrase, then the first removed: only the second opens.
    let r = Command::new(BIN)
        .env("VMREPO_PASSWORD", PASS)
        .env("VMREPO_NEW_PASSWORD", "second passphrase")
        .args([
            s("key"),
            s("add"),
            p(&repo),
            s("--label"),
            s("offsite"),
            s("--kdf-memory"),
            s("8"),
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let keys = enc(&[s("key"), s("list"), p(&repo), s("--json")])
        .ok()
        .json();
    let keys = keys.as_array().unwrap().clone();
    assert_eq!(keys.len(), 2);
    // Created in the same second, so find the first by its label, not its place in the list.
    let first = keys.iter().find(|k| k["label"] == "initial").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The key that unlocks cannot remove itself; the other passphrase can.
    let r = enc(&[s("key"), s("remove"), p(&repo), s(&first)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("is the one your passphrase opened"),
        "{}",
        r.stderr
    );
    enc_with(
        "second passphrase",
        &[s("key"), s("remove"), p(&repo), s(&first)],
    )
    .ok();
    assert_eq!(enc(&[s("list"), p(&repo)]).code, 1);
    enc_with("second passphrase", &[s("list"), p(&repo)]).ok();

    // Export the master key, forget the passphrase (passwd to something unknown), recover.
    let exported = t.path().join("master.key");
    enc_with(
        "second passphrase",
        &[s("key"), s("export"), p(&repo), s("--output"), p(&exported)],
    )
    .ok();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&exported).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let r = Command::new(BIN)
        .env("VMREPO_PASSWORD", "second passphrase")
        .env("VMREPO_NEW_PASSWORD", "forgotten at once")
        .args([s("key"), s("passwd"), p(&repo), s("--kdf-memory"), s("8")])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        enc_with("second passphrase", &[s("list"), p(&repo)]).code,
        1
    );
    let r = Command::new(BIN)
        .env_remove("VMREPO_PASSWORD")
        .env("VMREPO_NEW_PASSWORD", "recovered")
        .args([
            s("key"),
            s("add"),
            p(&repo),
            s("--from-master-key"),
            p(&exported),
            s("--kdf-memory"),
            s("8"),
        ])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = t.path().join("out");
    enc_with("recovered", &[s("extract"), p(&repo), s("d"), p(&out)]).ok();
    assert!(same_file(&out.join("d.img"), &img));
}

/// xorshift for reproducible "random" flips.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn copy_tree(from: &Path, to: &Path) {
    sh(&format!(
        "rm -rf '{}' && cp -a '{}' '{}'",
        to.display(),
        from.display(),
        to.display()
    ))
    .ok();
}

#[test]
fn flipped_bits_in_data_files_and_index_are_detected_never_restored() {
    let t = tempfile::tempdir().unwrap();
    let vm = secret_vm(&t.path().join("vmfs"));
    let pristine = init_encrypted(t.path());
    enc(&[s("ingest"), p(&pristine), p(&vm)]).ok();
    let flat = vm.join("secret-web01-flat.vmdk");
    let work = t.path().join("work");
    let out = t.path().join("out");
    let mut seed = 0x5eed_1234_u64;

    // Data files: every flipped bit past the 16-byte pack header is in a record header or an
    // encrypted payload; check --read-data must name it, and extract must refuse.
    for _ in 0..8 {
        copy_tree(&pristine, &work);
        let all = packs(&work);
        let pack = &all[(rng(&mut seed) % all.len() as u64) as usize];
        let len = fs::metadata(pack).unwrap().len();
        let at = 16 + rng(&mut seed) % (len - 16);
        flip_bit(pack, at, (rng(&mut seed) % 8) as u8);
        let r = enc(&[s("check"), p(&work), s("--read-data")]);
        assert_eq!(
            r.code,
            1,
            "flip at {at} of {} undetected:\n{}",
            pack.display(),
            r.stdout
        );
        let _ = fs::remove_dir_all(&out);
        let x = enc(&[s("extract"), p(&work), s("secret-web01"), p(&out)]);
        assert_ne!(x.code, 0, "extract restored a damaged generation");
        assert!(!out.join("secret-web01-flat.vmdk").exists());
    }

    // Index: a flipped bit is either reported by check, or harmless (free space, slack): then
    // every generation still restores byte for byte. It is never silently restored wrong.
    let mut reported = 0;
    for _ in 0..12 {
        copy_tree(&pristine, &work);
        let index = work.join("index.sqlite");
        let len = fs::metadata(&index).unwrap().len();
        flip_bit(&index, rng(&mut seed) % len, (rng(&mut seed) % 8) as u8);
        let r = enc(&[s("check"), p(&work), s("--read-data")]);
        if r.code != 0 {
            reported += 1;
            continue;
        }
        let _ = fs::remove_dir_all(&out);
        let x = enc(&[s("extract"), p(&work), s("secret-web01"), p(&out)]);
        assert_eq!(x.code, 0, "check passed but extract failed: {}", x.stderr);
        assert!(same_file(&out.join("secret-web01-flat.vmdk"), &flat));
    }
    eprintln!("{reported} of 12 index flips were reported, the rest were harmless");
}

/// Key files are removed one command at a time: `key remove` and `key passwd` take the keys
/// lock, so two removals at once (each passphrase removing the other's key) can never leave a
/// repository with no key at all. A removal that meets another key command fails at once,
/// saying so and how to wait, or waits with --lock-wait; the repository opens afterwards.
#[test]
fn key_removals_never_run_at_once_and_never_leave_no_key() {
    let t = tempfile::tempdir().unwrap();
    // An encrypted repository at `repo` with two passphrases: (key of PASS, key of "second").
    let two_keys = |repo: &Path| -> (String, String) {
        enc(&[
            s("init"),
            p(repo),
            s("--encryption"),
            s("aes-256-gcm"),
            s("--kdf-memory"),
            s("8"),
        ])
        .ok();
        vmrepo_with_passphrase(
            PASS,
            Some("second"),
            &[
                s("key"),
                s("add"),
                p(repo),
                s("--label"),
                s("second"),
                s("--kdf-memory"),
                s("8"),
            ],
        )
        .ok();
        let keys = enc(&[s("key"), s("list"), p(repo), s("--json")])
            .ok()
            .json();
        let id = |label: &str| {
            keys.as_array()
                .unwrap()
                .iter()
                .find(|k| k["label"] == label)
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        (id("initial"), id("second"))
    };
    let opens = |repo: &Path, pass: &str| enc_with(pass, &[s("list"), p(repo)]).code == 0;

    let repo = t.path().join("repo");
    let (first, _) = two_keys(&repo);
    // Another key command holds the keys lock: a removal fails at once, naming the way to wait.
    let lock = repo.join("locks/keys.lock");
    // Held long enough for the two removals below to meet it even on a loaded machine.
    let mut holder = Command::new("flock")
        .args([p(&lock), s("sleep"), s("5")])
        .spawn()
        .unwrap();
    wait_for("the keys lock to be held", 5, || {
        Command::new("flock")
            .args([s("-n"), p(&lock), s("true")])
            .status()
            .is_ok_and(|st| !st.success())
    });
    let r = enc_with("second", &[s("key"), s("remove"), p(&repo), s(&first)]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("another `vmrepo key` command") && r.stderr.contains("--lock-wait"),
        "{}",
        r.stderr
    );
    assert!(opens(&repo, PASS), "nothing was removed");
    // With --lock-wait it waits for the holder, then removes.
    let r = enc_with(
        "second",
        &[
            s("--lock-wait"),
            s("30"),
            s("key"),
            s("remove"),
            p(&repo),
            s(&first),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("waiting up to 30 s"), "{}", r.stderr);
    holder.wait().unwrap();
    assert!(!opens(&repo, PASS) && opens(&repo, "second"));

    // Crossed removals started together, a few times: one key always stays, and opens.
    for round in 0..5 {
        let repo = t.path().join(format!("r{round}"));
        let (a, b) = two_keys(&repo);
        let spawn = |pass: &str, id: &str| {
            Command::new(BIN)
                .env("VMREPO_PASSWORD", pass)
                .args([s("key"), s("remove"), p(&repo), s(id)])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut children = [spawn(PASS, &b), spawn("second", &a)];
        for c in &mut children {
            c.wait().unwrap();
        }
        let still = [PASS, "second"]
            .into_iter()
            .filter(|pass| opens(&repo, pass))
            .count();
        assert_eq!(
            still, 1,
            "round {round}: passphrases that still open: {still}"
        );
    }
}
