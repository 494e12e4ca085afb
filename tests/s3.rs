//! Repositories in S3-compatible object storage, against a real store on loopback, started for
//! each test by `scripts/s3-store.sh`: SeaweedFS (three masters, three volume servers, the
//! filer's S3 gateway), or with `VMREPO_TEST_S3_STORE=ceph` Ceph RGW (a monitor, three OSDs
//! keeping three copies, radosgw). `scripts/s3-store.sh install seaweedfs|ceph` installs them;
//! .ci/run runs this file against both.
//! Every command runs on an `s3://` repository; a host with a fresh cache restores from the
//! bucket alone; two hosts ingest at once while a third prunes and collects garbage.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

/// A store running for one test; stopped when dropped.
struct Store {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    bucket: String,
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// `bash scripts/s3-store.sh`, to be given its command.
fn store_script() -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-store.sh"));
    c
}

impl Store {
    fn start() -> Store {
        let dir = tempfile::tempdir().unwrap();
        // Each test its own ports (the script derives the store's other ports from this one);
        // a port some other program holds moves the store on.
        let mut tries = 0;
        let out = loop {
            let n = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
            let port = 9100 + 40 * (n % 200);
            let kind = std::env::var("VMREPO_TEST_S3_STORE").unwrap_or("seaweedfs".into());
            let out = store_script()
                .arg("start")
                .arg(&kind)
                .arg(dir.path().join("store"))
                .env("S3_PORT", port.to_string())
                .output()
                .expect("run scripts/s3-store.sh");
            tries += 1;
            let busy = String::from_utf8_lossy(&out.stderr).contains("already in use");
            if !busy || tries == 5 {
                break out;
            }
        };
        assert!(
            out.status.success(),
            "cannot start the S3 store (run `scripts/s3-store.sh install seaweedfs` (or ceph) \
             first):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env_file = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let text = fs::read_to_string(&env_file).unwrap();
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
            .collect();
        let bucket = env
            .iter()
            .find(|(k, _)| k == "S3_BUCKET")
            .map(|(_, v)| v.clone())
            .expect("S3_BUCKET in the store's env file");
        Store { dir, env, bucket }
    }

    /// A repository URL in the bucket.
    fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Runs vmrepo with the store's credentials and `cache` as this host's cache.
    fn vmrepo<I, S>(&self, cache: &Path, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Run::from(self.command(cache).args(args).output().expect("run vmrepo"))
    }

    /// `vmrepo` with the store's credentials and `cache` as this host's cache.
    fn command(&self, cache: &Path) -> Command {
        let mut c = Command::new(BIN);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("XDG_CACHE_HOME", cache)
            .env("VMREPO_PASSWORD", "s3 test passphrase");
        c
    }
}

impl Store {
    /// Kills one storage node of the cluster (kill -9 of a volume server).
    fn kill_node(&self) {
        let out = store_script()
            .arg("kill-node")
            .arg(self.dir.path().join("store"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `vmrepo ARGS` started in the background.
    fn spawn(&self, cache: &Path, args: &[std::ffi::OsString]) -> std::process::Child {
        self.command(cache)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Store {
    /// Runs Python `code` with `s3` (a boto3 client of the store) and `bucket` defined, and
    /// returns what it prints: to look at and tamper with objects behind vmrepo's back.
    fn python(&self, code: &str) -> String {
        let root = std::env::var("VMREPO_S3_ROOT").unwrap_or("/opt/vmrepo-s3".into());
        let prelude = "import os, boto3\nfrom botocore.config import Config\n\
            s3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'], \
            config=Config(s3={'addressing_style': 'path'}))\nbucket = os.environ['S3_BUCKET']\n";
        let out = Command::new(Path::new(&root).join("venv/bin/python"))
            .arg("-c")
            .arg(format!("{prelude}{code}"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run the store's Python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Keys under `prefix` in the bucket.
    fn keys(&self, prefix: &str) -> Vec<String> {
        self.python(&format!(
            "for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, \
             Prefix='{prefix}'):\n    for o in page.get('Contents', []): print(o['Key'])"
        ))
        .lines()
        .map(str::to_string)
        .collect()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = store_script()
            .arg("stop")
            .arg(self.dir.path().join("store"))
            .output();
    }
}

fn generation_names(store: &Store, cache: &Path, url: &str, vm: &str) -> Vec<String> {
    let j = store
        .vmrepo(cache, [s("list"), s(url), s(vm), s("--json")])
        .ok()
        .json();
    j.as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_command_works_on_an_encrypted_s3_repository() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache-a");
    let url = store.url("every/command");
    let web = make_vm(
        &t.path().join("ds"),
        "web01",
        &[(64 << 20, vec![(0, 12 << 20, 1), (40 << 20, 6 << 20, 2)])],
    );
    let r = store.vmrepo(
        &cache,
        [s("init"), s(&url), s("--encryption"), s("aes-256-gcm")],
    );
    r.ok();
    // A second init into the same prefix is refused: it holds a repository.
    let again = store.vmrepo(&cache, [s("init"), s(&url)]);
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);

    let first = store
        .vmrepo(&cache, [s("ingest"), s(&url), p(&web), s("--json")])
        .ok()
        .json();
    assert!(
        first["stats"]["bytes_new"].as_u64().unwrap() >= 18 << 20,
        "{first}"
    );
    overwrite(&web.join("web01-flat.vmdk"), 1 << 20, 65536, 9);
    let second = store
        .vmrepo(&cache, [s("ingest"), s(&url), p(&web), s("--json")])
        .ok()
        .json();
    let new = second["stats"]["bytes_new"].as_u64().unwrap();
    assert!(
        new < 1 << 20,
        "the second night stored {new} bytes: {second}"
    );
    // What each night cost in requests and bytes: the first sent at least what it stored.
    let (t1, t2) = (&first["transfer"], &second["transfer"]);
    assert!(
        t1["bytes_up"].as_u64().unwrap() >= first["stats"]["bytes_stored"].as_u64().unwrap(),
        "{first}"
    );
    assert!(t2["requests"].as_u64().unwrap() > 0, "{second}");
    assert!(t2["bytes_up"].as_u64().unwrap() < 2 << 20, "{second}");
    let gens = generation_names(&store, &cache, &url, "web01");
    assert_eq!(gens.len(), 2);

    let out = t.path().join("out");
    store
        .vmrepo(&cache, [s("extract"), s(&url), s("web01"), p(&out)])
        .ok();
    assert!(same_file(
        &out.join("web01-flat.vmdk"),
        &web.join("web01-flat.vmdk")
    ));
    assert!(same_file(&out.join("web01.vmx"), &web.join("web01.vmx")));

    let keys = store.vmrepo(&cache, [s("key"), s("list"), s(&url)]);
    keys.ok();
    assert!(keys.stdout.contains("initial"), "{}", keys.stdout);

    store
        .vmrepo(&cache, [s("check"), s(&url), s("--read-data")])
        .ok();
    store
        .vmrepo(&cache, [s("prune"), s(&url), s("--keep-last"), s("1")])
        .ok();
    store.vmrepo(&cache, [s("gc"), s(&url)]).ok();
    assert_eq!(
        generation_names(&store, &cache, &url, "web01"),
        [gens[1].clone()]
    );
    store
        .vmrepo(&cache, [s("check"), s(&url), s("--read-data")])
        .ok();
    let out2 = t.path().join("out2");
    store
        .vmrepo(&cache, [s("extract"), s(&url), s("web01"), p(&out2)])
        .ok();
    assert!(same_file(
        &out2.join("web01-flat.vmdk"),
        &web.join("web01-flat.vmdk")
    ));
}

#[test]
fn a_fresh_host_restores_from_the_bucket_alone_and_a_bad_cache_costs_only_time() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("fresh-host");
    let img = t.path().join("db01.img");
    sparse_image(&img, 32 << 20, &[(0, 8 << 20, 5), (20 << 20, 4 << 20, 6)]);
    let a = t.path().join("cache-a");
    store.vmrepo(&a, [s("init"), s(&url)]).ok();
    store
        .vmrepo(&a, [s("ingest"), s(&url), p(&img), s("--name"), s("db01")])
        .ok();

    // Another host: nothing but the bucket.
    let b = t.path().join("cache-b");
    let out = t.path().join("out");
    let r = store.vmrepo(&b, [s("extract"), s(&url), s("db01"), p(&out)]);
    r.ok();
    assert!(r.stderr.contains("index cache rebuilt"), "{}", r.stderr);
    assert!(same_file(&out.join("db01.img"), &img));

    // Its cache garbled: rebuilt, and the restore is the same.
    let index = find_index(&b);
    fs::write(
        &index,
        b"this is not an SQLite database, just bytes in the way",
    )
    .unwrap();
    let out2 = t.path().join("out2");
    let r = store.vmrepo(&b, [s("extract"), s(&url), s("db01"), p(&out2)]);
    r.ok();
    assert!(same_file(&out2.join("db01.img"), &img));

    // What host A adds later reaches host B's cache.
    overwrite(&img, 0, 4096, 77);
    store
        .vmrepo(&a, [s("ingest"), s(&url), p(&img), s("--name"), s("db01")])
        .ok();
    assert_eq!(generation_names(&store, &b, &url, "db01").len(), 2);
}

fn find_index(cache: &Path) -> PathBuf {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n == "index.sqlite") {
                out.push(p);
            }
        }
    }
    let mut found = Vec::new();
    walk(cache, &mut found);
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Two hosts (separate caches) ingest different VMs night after night into one bucket at the
/// same time, while a third prunes and collects garbage between them. Every generation that
/// was reported saved restores byte for byte on a fresh host, and the whole repository reads
/// back clean.
#[test]
fn two_hosts_ingest_at_once_while_a_third_prunes_and_collects_garbage() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("fleet");
    store
        .vmrepo(&t.path().join("cache-admin"), [s("init"), s(&url)])
        .ok();
    let nights = 3;
    let hosts: Vec<(String, PathBuf)> = ["esx1", "esx2"]
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let img = t.path().join(format!("{h}.img"));
            sparse_image(&img, 24 << 20, &[(0, 6 << 20, 10 + i as u64)]);
            (h.to_string(), img)
        })
        .collect();
    // Each host's saved generations: (name, copy of the disk it saved).
    let saved: Vec<Vec<(String, PathBuf)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = hosts
            .iter()
            .map(|(h, img)| {
                let (store, t, url) = (&store, t.path(), &url);
                scope.spawn(move || {
                    let cache = t.join(format!("cache-{h}"));
                    let mut saved = Vec::new();
                    for night in 0..nights {
                        overwrite(img, (night as u64) << 20, 65536, 100 + night as u64);
                        let r = store.vmrepo(
                            &cache,
                            [
                                s("--lock-wait"),
                                s("120"),
                                s("ingest"),
                                s(url),
                                p(img),
                                s("--name"),
                                s(h),
                                s("--json"),
                            ],
                        );
                        r.ok();
                        let name = r.json()["generation"].as_str().unwrap().to_string();
                        let copy = t.join(format!("{h}-night{night}.img"));
                        fs::copy(img, &copy).unwrap();
                        saved.push((name, copy));
                    }
                    saved
                })
            })
            .collect();
        // The third host: prune and gc while the others work.
        let admin = t.path().join("cache-admin");
        for _ in 0..nights {
            for cmd in [
                vec![
                    s("--lock-wait"),
                    s("300"),
                    s("prune"),
                    s(&url),
                    s("--keep-last"),
                    s("2"),
                ],
                vec![s("--lock-wait"), s("300"), s("gc"), s(&url)],
            ] {
                store.vmrepo(&admin, cmd).ok();
            }
        }
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });

    // A fresh host sees every generation that survived retention and restores each exactly.
    let fresh = t.path().join("cache-fresh");
    store
        .vmrepo(&fresh, [s("check"), s(&url), s("--read-data")])
        .ok();
    for ((vm, _), saved) in hosts.iter().zip(&saved) {
        let listed = generation_names(&store, &fresh, &url, vm);
        assert!(!listed.is_empty(), "{vm}: no generation left");
        // The newest generation is never pruned (keep-last 2): it must be there.
        assert_eq!(listed.last(), Some(&saved.last().unwrap().0), "{vm}");
        for (name, copy) in saved.iter().filter(|(n, _)| listed.contains(n)) {
            let out = t
                .path()
                .join(format!("out-{}", name.replace(['@', ':'], "_")));
            store
                .vmrepo(&fresh, [s("extract"), s(&url), s(name), p(&out)])
                .ok();
            assert!(
                same_file(&out.join(format!("{vm}.img")), copy),
                "{name} differs from what was saved"
            );
        }
    }
}

/// A backup waiting for the repository marks itself waiting; gc and prune give way to such a
/// mark (and say whose it is) instead of keeping the backups out one run after another. A
/// mark left by a killed process of this host does not count.
#[test]
fn commands_that_need_the_repository_alone_give_way_to_waiting_backups() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("turns");
    let cache = t.path().join("cache");
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let img = t.path().join("vm.img");
    sparse_image(&img, 8 << 20, &[(0, 1 << 20, 1)]);
    let ingest = [s("ingest"), s(&url), p(&img), s("--name"), s("vm")];
    store.vmrepo(&cache, &ingest).ok();
    let folder = "turns/locks/repository.lock/";
    let plant = |name: &str, holder: &str| {
        store.python(&format!(
            "s3.put_object(Bucket=bucket, Key='{folder}{name}', Body=b'{holder}\\n')"
        ));
    };
    let remove = |name: &str| {
        store.python(&format!(
            "s3.delete_object(Bucket=bucket, Key='{folder}{name}')"
        ));
    };

    // Another host's backup waits: gc gives way and names it; backups go on.
    plant("waiting-0a0a0a0a0a0a0a0a", "host=esx-other pid=4242");
    let gc = store.vmrepo(&cache, [s("gc"), s(&url)]);
    assert_ne!(gc.code, 0, "gc ran while a backup waited:\n{}", gc.stderr);
    assert!(
        gc.stderr
            .contains("process 4242 on host esx-other is waiting for it"),
        "{}",
        gc.stderr
    );
    overwrite(&img, 0, 65536, 2);
    store.vmrepo(&cache, &ingest).ok();
    remove("waiting-0a0a0a0a0a0a0a0a");

    // A real backup waiting behind another host's gc marks itself while it waits, takes its
    // turn when the gc ends, and removes its mark.
    plant("exclusive-0b0b0b0b0b0b0b0b", "host=esx-other pid=4243");
    let mut waiting = store.command(&cache);
    waiting
        .args([s("--lock-wait"), s("60")])
        .args(&ingest)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    overwrite(&img, 0, 65536, 3);
    let child = waiting.spawn().unwrap();
    wait_for("the waiting backup's mark", 30, || {
        store.keys(folder).iter().any(|k| k.contains("/waiting-"))
    });
    let gc = store.vmrepo(&cache, [s("gc"), s(&url)]);
    assert_ne!(gc.code, 0, "{}", gc.stderr);
    remove("exclusive-0b0b0b0b0b0b0b0b");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(store.keys(folder).is_empty(), "{:?}", store.keys(folder));

    // The mark of a killed waiter of this host is no obstacle, and is removed.
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    plant(
        "waiting-0c0c0c0c0c0c0c0c",
        &format!("host={} pid={dead_pid}", hostname.trim()),
    );
    store.vmrepo(&cache, [s("gc"), s(&url)]).ok();
    assert!(store.keys(folder).is_empty(), "{:?}", store.keys(folder));
    store
        .vmrepo(
            &t.path().join("fresh"),
            [s("check"), s(&url), s("--read-data")],
        )
        .ok();
    assert_eq!(generation_names(&store, &cache, &url, "vm").len(), 3);
}

#[test]
fn a_url_this_build_cannot_reach_is_an_error_not_a_directory() {
    let t = tempfile::tempdir().unwrap();
    for url in ["gs://bucket/x", "sftp://host/x"] {
        let r = Command::new(BIN)
            .current_dir(t.path())
            .args(["init", url])
            .output()
            .unwrap();
        assert_ne!(r.status.code(), Some(0));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("not supported"), "{err}");
        assert_eq!(
            fs::read_dir(t.path()).unwrap().count(),
            0,
            "{url} made a directory"
        );
    }
}

/// A storage node killed during an ingest, then the ingest itself killed mid-upload: each run
/// either records a generation that restores exactly or records none, a re-run succeeds, and
/// the repository reads back clean.
#[test]
fn a_killed_storage_node_or_a_killed_ingest_loses_nothing() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("faults");
    let cache = t.path().join("cache");
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let img = t.path().join("vm.img");
    sparse_image(
        &img,
        96 << 20,
        &[(0, 40 << 20, 21), (64 << 20, 20 << 20, 22)],
    );
    let ingest = [s("ingest"), s(&url), p(&img), s("--name"), s("vm")];

    // A node dies while the ingest uploads.
    let child = store.spawn(&cache, &ingest);
    std::thread::sleep(std::time::Duration::from_millis(400));
    store.kill_node();
    let out = child.wait_with_output().unwrap();
    let listed = generation_names(&store, &cache, &url, "vm");
    if out.status.success() {
        assert_eq!(listed.len(), 1, "reported saved but not listed");
        let o = t.path().join("o1");
        store
            .vmrepo(&cache, [s("extract"), s(&url), s("vm"), p(&o)])
            .ok();
        assert!(same_file(&o.join("vm.img"), &img));
    } else {
        assert!(listed.is_empty(), "a failed ingest left {listed:?}");
    }

    // The ingest itself killed mid-upload: no generation appears from it.
    overwrite(&img, 0, 8 << 20, 23);
    let before = generation_names(&store, &cache, &url, "vm");
    let mut child = store.spawn(&cache, &ingest);
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, libc::SIGKILL);
    let killed = child.wait().unwrap();
    let after = generation_names(&store, &cache, &url, "vm");
    if killed.success() || after.len() == before.len() + 1 {
        // It reached its commit: a kill after the commit, before the process exited, leaves a
        // whole generation, which must restore exactly.
        assert_eq!(after.len(), before.len() + 1, "{after:?}");
        let o = t.path().join("o-killed");
        store
            .vmrepo(
                &cache,
                [s("extract"), s(&url), s(after.last().unwrap()), p(&o)],
            )
            .ok();
        assert!(same_file(&o.join("vm.img"), &img));
    } else {
        assert_eq!(after, before, "a killed ingest left a generation");
    }

    // A re-run succeeds at once (the killed process's VM lock is known dead: same host, no such
    // process) and restores exactly; the repository is clean.
    store.vmrepo(&cache, &ingest).ok();
    let o = t.path().join("o2");
    store
        .vmrepo(&cache, [s("extract"), s(&url), s("vm"), p(&o)])
        .ok();
    assert!(same_file(&o.join("vm.img"), &img));
    let fresh = t.path().join("fresh");
    store
        .vmrepo(&fresh, [s("check"), s(&url), s("--read-data")])
        .ok();
}

/// An ingest killed after uploading its last pack and before its commit (the pending marker
/// still names that pack) saved nothing: no host lists it, the next ingest of the VM may take
/// the same second, a fresh host's cache and `check` list only the committed generation, and
/// gc deletes the left-over and its marker.
#[test]
fn an_ingest_killed_before_its_commit_is_never_a_generation() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("killed");
    let cache = t.path().join("cache");
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let img = t.path().join("vm.img");
    sparse_image(&img, 32 << 20, &[(0, 8 << 20, 41)]);
    let at = |time: &str| {
        [
            s("ingest"),
            s(&url),
            p(&img),
            s("--name"),
            s("vm"),
            s("--time"),
            s(time),
        ]
    };
    store.vmrepo(&cache, at("2026-12-01T01:00:00Z")).ok();

    // The killed ingest: run on another host, then put back in the state of a process that died
    // between uploading its last pack and deleting that pack's marker.
    overwrite(&img, 0, 4 << 20, 42);
    let before = store.keys("killed/data/");
    store
        .vmrepo(&t.path().join("other"), at("2026-12-02T01:00:00Z"))
        .ok();
    let killed: Vec<String> = store
        .keys("killed/data/")
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    assert_eq!(killed.len(), 1, "{killed:?}");
    let pack = killed[0]
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(".pack");
    store.python(&format!(
        "s3.put_object(Bucket=bucket, Key='killed/locks/pending-{pack}', Body=b'')"
    ));
    assert_eq!(
        generation_names(&store, &cache, &url, "vm"),
        ["vm@2026-12-01T01:00:00Z"]
    );

    // The next ingest of the same second, from other bytes, is the generation of that name.
    overwrite(&img, 0, 4 << 20, 43);
    store.vmrepo(&cache, at("2026-12-02T01:00:00Z")).ok();
    for (i, host) in ["cache", "fresh"].into_iter().enumerate() {
        let host = t.path().join(host);
        let c = store.vmrepo(&host, [s("check"), s(&url), s("--read-data")]);
        c.ok();
        assert_eq!(
            generation_names(&store, &host, &url, "vm"),
            ["vm@2026-12-01T01:00:00Z", "vm@2026-12-02T01:00:00Z"]
        );
        let o = t.path().join(format!("out-{i}"));
        store
            .vmrepo(
                &host,
                [s("extract"), s(&url), s("vm@2026-12-02T01:00:00Z"), p(&o)],
            )
            .ok();
        assert!(same_file(&o.join("vm.img"), &img));
    }

    // gc deletes the left-over pack and its marker; the repository reads back clean.
    store.vmrepo(&cache, [s("gc"), s(&url)]).ok();
    assert!(!store.keys("killed/data/").contains(&killed[0]));
    assert!(store.keys("killed/locks/pending-").is_empty());
    store
        .vmrepo(
            &t.path().join("after-gc"),
            [s("check"), s(&url), s("--read-data")],
        )
        .ok();
}

/// Single files out of a generation in a bucket: `ls`, `cat` and `restore-file` read an ext4
/// disk's files on a host that has only the bucket (its cache built on the way).
#[test]
fn files_inside_a_disk_read_straight_from_the_bucket() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("files");
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    fs::write(tree.join("etc/big.bin"), bytes(3 << 20, 12)).unwrap();
    let img = t.path().join("root.img");
    let r = sh(&format!(
        "mkfs.ext4 -q -d {} {} 32M",
        tree.display(),
        img.display()
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    store.vmrepo(&t.path().join("a"), [s("init"), s(&url)]).ok();
    store
        .vmrepo(
            &t.path().join("a"),
            [s("ingest"), s(&url), p(&img), s("--name"), s("web")],
        )
        .ok();
    let fresh = t.path().join("fresh");
    let ls = store.vmrepo(&fresh, [s("ls"), s(&url), s("web"), s("disk0:/etc")]);
    assert!(ls.ok().stdout.contains(" hosts"), "{}", ls.stdout);
    let cat = store.vmrepo(&fresh, [s("cat"), s(&url), s("web"), s("disk0:/etc/hosts")]);
    assert_eq!(cat.ok().stdout, "127.0.0.1 localhost\n");
    let out = t.path().join("out");
    store
        .vmrepo(
            &fresh,
            [
                s("restore-file"),
                s(&url),
                s("web"),
                s("disk0:/etc"),
                p(&out),
            ],
        )
        .ok();
    assert!(same_file(
        &out.join("etc/big.bin"),
        &tree.join("etc/big.bin")
    ));
}

/// Commands of one host share its cache: while an ingest uploads and records its packs, other
/// commands bring the same cache up to date again and again; none of them may take the
/// ingest's packs for another host's, and the ingest succeeds.
#[test]
fn commands_of_one_host_share_its_cache_while_an_ingest_runs() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("one-host");
    let cache = t.path().join("cache");
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let img = t.path().join("big.img");
    // Random data, so it needs several packs.
    sparse_image(&img, 192 << 20, &[(0, 150 << 20, 31)]);
    let ingest = store.spawn(
        &cache,
        &[s("ingest"), s(&url), p(&img), s("--name"), s("big")],
    );
    let out = std::thread::scope(|scope| {
        let lister = scope.spawn(|| {
            let mut runs = 0;
            for _ in 0..40 {
                let r = store.vmrepo(&cache, [s("list"), s(&url)]);
                assert_eq!(r.code, 0, "{}", r.stderr);
                runs += 1;
            }
            runs
        });
        let out = ingest.wait_with_output().unwrap();
        assert!(lister.join().unwrap() > 0);
        out
    });
    assert!(
        out.status.success(),
        "the ingest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = t.path().join("o");
    store
        .vmrepo(&cache, [s("extract"), s(&url), s("big"), p(&o)])
        .ok();
    assert!(same_file(&o.join("big.img"), &img));
}

/// Reading in place from the bucket: `serve-nbd` serves a generation of an S3 repository, and
/// qemu-img reads it back identical to what was ingested.
#[test]
fn serve_nbd_reads_a_generation_from_the_bucket() {
    use std::io::BufRead;
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("nbd");
    let cache = t.path().join("cache");
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let img = t.path().join("disk.img");
    sparse_image(&img, 40 << 20, &[(0, 6 << 20, 41), (30 << 20, 2 << 20, 42)]);
    store
        .vmrepo(
            &cache,
            [s("ingest"), s(&url), p(&img), s("--name"), s("disk")],
        )
        .ok();
    let sock = t.path().join("nbd.sock");
    let mut server = store
        .command(&cache)
        .args([
            s("serve-nbd"),
            s(&url),
            s("disk"),
            s("--listen-unix"),
            p(&sock),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("listening on"));
    assert!(ready.is_some(), "serve-nbd did not start");
    let r = sh(&format!(
        "qemu-img compare -f raw -F raw 'nbd+unix:///?socket={}' '{}'",
        sock.display(),
        img.display()
    ));
    signal(&server, libc::SIGINT);
    let end = server.wait_with_output().unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        end.status.success(),
        "{}",
        String::from_utf8_lossy(&end.stderr)
    );
}

/// gc on one host finds chunks dead but keeps the pack they are in (its live share is high);
/// another host, whose cache still lists them, backs up a VM holding the same bytes and
/// deduplicates against them, which makes them live again. A later gc that rewrites every pack
/// must copy them: the first host's index still knows where they are. A fresh host then
/// restores that VM byte for byte and the repository reads back clean.
#[test]
fn chunks_gc_left_in_a_kept_pack_stay_known_when_another_host_revives_them() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("revived");
    let (a, b, c) = (
        t.path().join("cache-a"),
        t.path().join("cache-b"),
        t.path().join("cache-c"),
    );
    let db = t.path().join("db01.img");
    sparse_image(&db, 32 << 20, &[(0, 8 << 20, 5), (8 << 20, 8 << 20, 6)]);
    let twin = t.path().join("web02.img");
    fs::copy(&db, &twin).unwrap();
    store.vmrepo(&a, [s("init"), s(&url)]).ok();
    let ingest = |cache: &Path, img: &Path, name: &str| {
        store
            .vmrepo(cache, [s("ingest"), s(&url), p(img), s("--name"), s(name)])
            .ok();
    };
    ingest(&a, &db, "db01");
    // Host B learns the repository: its cache now lists every chunk of that night.
    assert_eq!(generation_names(&store, &b, &url, "db01").len(), 1);

    // The second half changes; the first night is pruned. gc keeps every pack (the first one
    // is half live), so nothing is deleted and no other cache is told to rebuild.
    sparse_image(&db, 32 << 20, &[(0, 8 << 20, 5), (8 << 20, 8 << 20, 7)]);
    ingest(&a, &db, "db01");
    store
        .vmrepo(&a, [s("prune"), s(&url), s("--keep-last"), s("1")])
        .ok();
    let gc = |cache: &Path, threshold: &str| {
        store
            .vmrepo(
                cache,
                [
                    s("gc"),
                    s(&url),
                    s("--repack-threshold"),
                    s(threshold),
                    s("--max-unused"),
                    s("100%"),
                ],
            )
            .ok();
    };
    gc(&a, "0%");

    // Host B backs up a VM with the first night's bytes: deduplicated, almost nothing sent.
    let r = store
        .vmrepo(
            &b,
            [
                s("ingest"),
                s(&url),
                p(&twin),
                s("--name"),
                s("web02"),
                s("--json"),
            ],
        )
        .ok()
        .json();
    let new = r["stats"]["bytes_new"].as_u64().unwrap();
    assert!(new < 1 << 20, "web02 stored {new} new bytes: {r}");

    // Host A rewrites every pack: what web02 uses must be copied.
    gc(&a, "100%");
    let out = t.path().join("out");
    store
        .vmrepo(&c, [s("extract"), s(&url), s("web02"), p(&out)])
        .ok();
    assert!(same_file(&out.join("web02.img"), &twin));
    store
        .vmrepo(&c, [s("check"), s(&url), s("--read-data")])
        .ok();
}

/// A host building its cache reads the packs' descriptions, not the packs. Descriptions that
/// are garbled or missing only cost time: those packs are read instead, and the restore is the
/// same. gc compacts the descriptions into a few objects per shard, and a fresh host restores
/// from those.
#[test]
fn a_fresh_cache_is_built_from_pack_descriptions_and_bad_ones_only_cost_time() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("described");
    let img = t.path().join("app01.img");
    sparse_image(&img, 48 << 20, &[(0, 12 << 20, 3), (30 << 20, 6 << 20, 4)]);
    let a = t.path().join("cache-a");
    store
        .vmrepo(
            &a,
            [s("init"), s(&url), s("--encryption"), s("aes-256-gcm")],
        )
        .ok();
    let ingest = || {
        store
            .vmrepo(&a, [s("ingest"), s(&url), p(&img), s("--name"), s("app01")])
            .ok();
    };
    ingest();
    overwrite(&img, 2 << 20, 1 << 20, 5);
    ingest();
    let packs = store.keys("described/data/");
    let described = store.keys("described/pack-index/");
    assert_eq!(described.len(), packs.len(), "{described:?} {packs:?}");

    let restore = |cache: &Path, out: &str| {
        let out = t.path().join(out);
        let r = store.vmrepo(cache, [s("extract"), s(&url), s("app01"), p(&out)]);
        r.ok();
        assert!(same_file(&out.join("app01.img"), &img));
        r.stderr
    };
    let n = packs.len();
    let said = restore(&t.path().join("cache-b"), "out-b");
    assert!(
        said.contains(&format!(
            "({n} pack(s), {n} of them known from their descriptions"
        )),
        "{said}"
    );

    // One description garbled, one deleted: those two packs are read instead.
    store.python(&format!(
        "s3.put_object(Bucket=bucket, Key='{}', Body=b'not a description')\n\
         s3.delete_object(Bucket=bucket, Key='{}')",
        described[0], described[1]
    ));
    let said = restore(&t.path().join("cache-c"), "out-c");
    assert!(
        said.contains(&format!("({n} pack(s), {} of them known", n - 2)),
        "{said}"
    );
    assert!(said.contains("pack description not used"), "{said}");

    // gc compacts: no per-pack description is left, and a fresh host restores from the rest.
    store
        .vmrepo(&a, [s("prune"), s(&url), s("--keep-last"), s("1")])
        .ok();
    let gc = store.vmrepo(&a, [s("gc"), s(&url), s("--repack-threshold"), s("100%")]);
    gc.ok();
    assert!(
        gc.stdout.contains("pack descriptions compacted"),
        "{}",
        gc.stdout
    );
    let packs = store.keys("described/data/");
    let described = store.keys("described/pack-index/");
    assert!(
        described
            .iter()
            .all(|k| k.rsplit('/').next().unwrap().len() == 2 + 1 + 16),
        "{described:?}"
    );
    let n = packs.len();
    let said = restore(&t.path().join("cache-d"), "out-d");
    assert!(
        said.contains(&format!(
            "({n} pack(s), {n} of them known from their descriptions"
        )),
        "{said}"
    );
    store
        .vmrepo(
            &t.path().join("cache-d"),
            [s("check"), s(&url), s("--read-data")],
        )
        .ok();
}

/// `vmrepo copy` between a local repository and a bucket, both ways: off-site and back. The
/// bucket's repository has its own passphrase; the copy back restores byte for byte.
#[test]
fn copy_sends_generations_off_site_and_brings_them_back() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("offsite");
    let cache = t.path().join("cache");
    let local = t.path().join("local");
    let img = t.path().join("fs01.img");
    sparse_image(&img, 40 << 20, &[(0, 9 << 20, 11), (24 << 20, 5 << 20, 12)]);
    let plain = |args: &[std::ffi::OsString]| {
        Run::from(
            store
                .command(&cache)
                .args(args)
                .env_remove("VMREPO_PASSWORD")
                .output()
                .unwrap(),
        )
    };
    plain(&[s("init"), p(&local)]).ok();
    plain(&[s("ingest"), p(&local), p(&img), s("--name"), s("fs01")]).ok();
    store
        .vmrepo(
            &cache,
            [s("init"), s(&url), s("--encryption"), s("aes-256-gcm")],
        )
        .ok();
    let to_bucket = |cache: &Path| {
        Run::from(
            store
                .command(cache)
                .args([s("copy"), p(&local), s(&url), s("--json")])
                .env_remove("VMREPO_PASSWORD")
                .env("VMREPO_TO_PASSWORD", "s3 test passphrase")
                .output()
                .unwrap(),
        )
    };
    let r = to_bucket(&cache);
    r.ok();
    assert_eq!(
        r.json()["copied"].as_array().unwrap().len(),
        1,
        "{}",
        r.stdout
    );
    // The next night: only the change goes.
    overwrite(&img, 1 << 20, 256 << 10, 13);
    plain(&[s("ingest"), p(&local), p(&img), s("--name"), s("fs01")]).ok();
    let r = to_bucket(&cache);
    r.ok();
    let j = r.json();
    assert_eq!(j["copied"].as_array().unwrap().len(), 1, "{j}");
    assert!(j["bytes_stored"].as_u64().unwrap() < 1 << 20, "{j}");

    // Back, from a host with nothing but the bucket, into a new local repository.
    let back = t.path().join("back");
    plain(&[s("init"), p(&back)]).ok();
    let r = Run::from(
        store
            .command(&t.path().join("cache-fresh"))
            .args([s("copy"), s(&url), p(&back)])
            .output()
            .unwrap(),
    );
    r.ok();
    assert_eq!(generations(&back, "fs01").len(), 2);
    let out = t.path().join("out");
    plain(&[s("extract"), p(&back), s("fs01"), p(&out)]).ok();
    assert!(same_file(&out.join("fs01.img"), &img));
    plain(&[s("check"), p(&back), s("--read-data")]).ok();
    store
        .vmrepo(&cache, [s("check"), s(&url), s("--read-data")])
        .ok();
}

/// `--limit-upload` and `--limit-download` hold a transfer to the rate asked: 24 MB of data
/// that does not compress take at least the time the limit allows. A lower bound only: a slow machine makes it longer, never shorter.
#[test]
fn transfer_limits_hold_the_rate() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("limited");
    let cache = t.path().join("cache");
    let img = t.path().join("noise.img");
    sh(&format!(
        "head -c 24000000 /dev/urandom > '{}'",
        img.display()
    ))
    .ok();
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let began = std::time::Instant::now();
    store
        .vmrepo(
            &cache,
            [s("ingest"), s(&url), p(&img), s("--limit-upload"), s("4")],
        )
        .ok();
    let up = began.elapsed().as_secs_f64();
    // 24 MB at 4 MB/s: at least 6 s.
    assert!(up >= 5.9, "uploaded 24 MB in {up:.2} s at --limit-upload 4");
    let began = std::time::Instant::now();
    let out = t.path().join("out");
    store
        .vmrepo(
            &cache,
            [
                s("extract"),
                s(&url),
                s("noise"),
                p(&out),
                s("--limit-download"),
                s("8"),
            ],
        )
        .ok();
    let down = began.elapsed().as_secs_f64();
    assert!(
        down >= 2.9,
        "downloaded 24 MB in {down:.2} s at --limit-download 8"
    );
    assert!(same_file(&out.join("noise.img"), &img));
    let bad = store.vmrepo(&cache, [s("list"), s(&url), s("--limit-upload"), s("0")]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("not a rate in MB/s"), "{}", bad.stderr);
}

/// Credentials, region and endpoint from an AWS profile when the environment does not set
/// them, as AWS tools read them; a profile no file holds is an error that says so.
#[test]
fn an_aws_profile_configures_the_client() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    fs::create_dir_all(home.join(".aws")).unwrap();
    let var = |k: &str| {
        store
            .env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    fs::write(
        home.join(".aws/credentials"),
        format!(
            "[backup]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY")
        ),
    )
    .unwrap();
    fs::write(
        home.join(".aws/config"),
        format!(
            "[profile backup]\nregion = {}\nendpoint_url = {}\n",
            var("AWS_REGION"),
            var("AWS_ENDPOINT_URL")
        ),
    )
    .unwrap();
    let url = store.url("profiled");
    let run = |profile: &str, args: &[std::ffi::OsString]| {
        let mut c = store.command(&t.path().join("cache"));
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        ] {
            c.env_remove(k);
        }
        Run::from(
            c.env("HOME", &home)
                .env("AWS_PROFILE", profile)
                .args(args)
                .output()
                .unwrap(),
        )
    };
    run("backup", &[s("init"), s(&url)]).ok();
    run("backup", &[s("list"), s(&url)]).ok();
    let r = run("nobody", &[s("list"), s(&url)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("\"nobody\""), "{}", r.stderr);
    assert!(r.stderr.contains(".aws/credentials"), "{}", r.stderr);
    // A bucket that does not exist is named as such, not as a missing repository.
    for cmd in ["init", "list"] {
        let r = run("backup", &[s(cmd), s("s3://no-such-bucket-here/x")]);
        assert_ne!(r.code, 0);
        assert!(
            r.stderr.contains("the bucket does not exist"),
            "{cmd}: {}",
            r.stderr
        );
    }
}

/// import-ghettovcb and mount on a repository in object storage: a ghettoVCB rotation comes in
/// at its folder dates, and the FUSE mount shows each generation's disk byte for byte as the
/// backup folder held it.
#[test]
fn a_ghettovcb_rotation_is_imported_and_mounted_from_the_bucket() {
    use std::io::BufRead;
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("mounted");
    let cache = t.path().join("cache");
    let rotation = t.path().join("web01");
    fs::create_dir(&rotation).unwrap();
    let mut flats = Vec::new();
    for (i, date) in ["2026-11-18_01-00-03", "2026-11-19_01-00-02"]
        .iter()
        .enumerate()
    {
        let i = i as u64;
        let vm = make_vm(
            &t.path().join(format!("build{i}")),
            "web01",
            &[(
                16 << 20,
                vec![(0, 6 << 20, 1), ((8 + i) << 20, 1 << 20, 10 + i)],
            )],
        );
        let dated = rotation.join(format!("web01-{date}"));
        fs::rename(&vm, &dated).unwrap();
        flats.push(dated.join("web01-flat.vmdk"));
    }
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    let r = store.vmrepo(&cache, [s("import-ghettovcb"), s(&url), p(&rotation)]);
    r.ok();
    assert!(r.stdout.contains("imported 2 backup(s)"), "{}", r.stdout);
    let gens = generation_names(&store, &cache, &url, "web01");
    assert_eq!(gens.len(), 2, "{gens:?}");
    assert!(gens[0].starts_with("web01@2026-11-18"), "{gens:?}");

    let mp = t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let mut child = store
        .command(&cache)
        .args([s("mount"), s(&url), p(&mp)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let unmount = || {
        Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&mp)
            .status()
            .expect("run fusermount3 (apt-get install fuse3)")
    };
    let checked = std::panic::catch_unwind(|| {
        assert!(first.starts_with("mounted "), "{first}");
        for (g, flat) in gens.iter().zip(&flats) {
            let time = g.split_once('@').unwrap().1;
            let shown = mp.join("web01").join(time).join("web01-flat.vmdk");
            assert!(same_file(&shown, flat), "{g}: the mounted disk differs");
        }
    });
    let unmounted = unmount();
    if checked.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
    assert!(unmounted.success(), "fusermount3 -u failed");
    assert!(status.success(), "vmrepo mount ended with {status}");
}

/// A nightly job file whose repository is a bucket: ingest, retention, a copy back to a local
/// directory, and a check, all in one `vmrepo run`.
#[test]
fn a_nightly_job_runs_against_the_bucket() {
    let store = Store::start();
    let t = tempfile::tempdir().unwrap();
    let url = store.url("nightly");
    let cache = t.path().join("cache");
    let img = t.path().join("app02.img");
    sparse_image(&img, 24 << 20, &[(0, 5 << 20, 51)]);
    let local = t.path().join("local-copy");
    store.vmrepo(&cache, [s("init"), s(&url)]).ok();
    Run::from(
        store
            .command(&cache)
            .env_remove("VMREPO_PASSWORD")
            .args([s("init"), p(&local)])
            .output()
            .unwrap(),
    )
    .ok();
    let job = t.path().join("job.toml");
    fs::write(
        &job,
        format!(
            "repository = {url:?}\nvms = [{img:?}]\n\n[retention]\ndefault = {{ keep-last = 2 }}\n\n\
             [[copy]]\nto = {local:?}\n\n[check]\nread_data_subset = \"all\"\n"
        ),
    )
    .unwrap();
    for night in 0..3 {
        overwrite(&img, 0, 4096, 60 + night);
        let r = store.vmrepo(&cache, [s("run"), p(&job)]);
        r.ok();
        assert!(r.stdout.contains("check: ok"), "{}", r.stdout);
    }
    assert_eq!(generation_names(&store, &cache, &url, "app02").len(), 2);
    // The copy got every night the bucket held when it ran.
    assert_eq!(generations(&local, "app02").len(), 3);
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&local), s("app02"), p(&out)]).ok();
    assert!(same_file(&out.join("app02.img"), &img));
}
