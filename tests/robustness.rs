//! Nothing is lost: killed ingests, concurrent ingests, damaged and deleted data files, and a
//! deleted index.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn killed_ingests_leave_a_clean_repository() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 160 << 20, &[(0, 150 << 20, 1)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("vm"));
    let good = generations(&repo, "vm");
    let mut expected = good.len();
    let mut interrupted = 0;

    // Change the image so the next ingests have real work, then kill them at varied moments.
    for i in 0..8u64 {
        overwrite(&img, (i * 11) << 20, 64 << 20, 1000 + i);
        let mut child = Command::new(BIN)
            .args([s("ingest"), p(&repo), p(&img), s("--name"), s("vm")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 + i * 97 % 600));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let gens = generations(&repo, "vm");
        assert!(
            gens.starts_with(&good),
            "older generations changed: {gens:?}"
        );
        // Killed before its commit: no generation. Finished, or killed after the commit: one
        // complete generation that restores to exactly what was read.
        if status.success() || gens.len() == expected + 1 {
            assert_eq!(
                gens.len(),
                expected + 1,
                "a finished ingest left no generation"
            );
            expected += 1;
            let out = t.path().join(format!("night{i}"));
            vmrepo([s("extract"), p(&repo), s("vm"), p(&out)]).ok();
            assert!(
                same_file(&img, &out.join("vm.img")),
                "generation {} is wrong",
                gens[expected - 1]
            );
        }
        assert_eq!(
            gens.len(),
            expected,
            "a killed ingest left a partial generation: {gens:?}"
        );
        interrupted += usize::from(!status.success());
        vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    }
    assert!(
        interrupted >= 1,
        "no ingest was interrupted; the test proved nothing"
    );
    // The repository accepts the next ingest, and it restores exactly.
    ingest(&repo, &img, Some("vm"));
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("vm"), p(&out)]).ok();
    assert!(same_file(&img, &out.join("vm.img")));
    // And the first generation is still intact.
    let first = t.path().join("first");
    vmrepo([s("extract"), p(&repo), s(&good[0]), p(&first)]).ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn concurrent_ingests_of_different_vms_both_succeed() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    sparse_image(&a, 96 << 20, &[(0, 90 << 20, 1)]);
    sparse_image(&b, 96 << 20, &[(0, 90 << 20, 2)]);
    let repo = init_repo(t.path());
    let spawn = |img: &Path, name: &str| {
        Command::new(BIN)
            .args([s("ingest"), p(&repo), p(img), s("--name"), s(name)])
            .output()
            .unwrap()
    };
    let (ra, rb) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| spawn(&a, "vm-a"));
        let hb = sc.spawn(|| spawn(&b, "vm-b"));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert!(
        ra.status.success(),
        "{}",
        String::from_utf8_lossy(&ra.stderr)
    );
    assert!(
        rb.status.success(),
        "{}",
        String::from_utf8_lossy(&rb.stderr)
    );
    for (img, vm) in [(&a, "vm-a"), (&b, "vm-b")] {
        let out = t.path().join(format!("out-{vm}"));
        vmrepo([s("extract"), p(&repo), s(vm), p(&out)]).ok();
        assert!(same_file(img, &out.join(img.file_name().unwrap())));
    }
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

fn two_generation_repo(t: &Path) -> (PathBuf, PathBuf) {
    let vm = make_vm(t, "web01", &[(64 << 20, vec![(0, 40 << 20, 1)])]);
    let repo = init_repo(t);
    ingest(&repo, &vm, None);
    overwrite(&vm.join("web01-flat.vmdk"), 0, 8 << 20, 2);
    ingest(&repo, &vm, None);
    (repo, vm)
}

#[test]
fn flipped_bytes_are_found_by_read_data_and_named() {
    let t = tempfile::tempdir().unwrap();
    let (repo, _) = two_generation_repo(t.path());
    // The oldest pack holds the first generation's data (names are random: order by time).
    let mut all = packs(&repo);
    all.sort_by_key(|p| fs::metadata(p).unwrap().modified().unwrap());
    let pack = all.remove(0);
    let len = fs::metadata(&pack).unwrap().len();
    // Flip a byte in the middle of it (a chunk payload that both generations use).
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, len / 2).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, len / 2).unwrap();
    }
    let r = vmrepo([s("check"), p(&repo), s("--read-data")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("DAMAGED  web01@"), "{}", r.stdout);
    assert!(
        r.stdout.contains("disk scsi0:0 (web01.vmdk)"),
        "{}",
        r.stdout
    );
    // Extract refuses the damaged data rather than writing wrong bytes.
    let out = t.path().join("out");
    let e = vmrepo([s("extract"), p(&repo), s("web01@-1"), p(&out)]);
    assert_ne!(e.code, 0);
    assert!(e.stderr.contains("damaged repository data"), "{}", e.stderr);
}

#[test]
fn truncated_and_deleted_packs_are_reported() {
    let t = tempfile::tempdir().unwrap();
    let (repo, _) = two_generation_repo(t.path());
    let all = packs(&repo);
    let victim = &all[0];
    let len = fs::metadata(victim).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let r = vmrepo([s("check"), p(&repo)]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("is truncated"), "{}", r.stdout);
    assert!(r.stdout.contains("DAMAGED  web01@"), "{}", r.stdout);

    fs::remove_file(victim).unwrap();
    let r = vmrepo([s("check"), p(&repo)]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("is missing"), "{}", r.stdout);
    assert!(r.stdout.contains("DAMAGED  web01@"), "{}", r.stdout);
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_data_files() {
    let t = tempfile::tempdir().unwrap();
    let (repo, vm) = two_generation_repo(t.path());
    let img = t.path().join("db.img");
    sparse_image(&img, 32 << 20, &[(1 << 20, 4 << 20, 7)]);
    ingest(&repo, &img, Some("db01"));
    let before_web = generations(&repo, "web01");
    let before_db = generations(&repo, "db01");
    let listing = vmrepo([s("list"), p(&repo), s("web01"), s("--json")])
        .ok()
        .json();

    fs::remove_file(repo.join("index.sqlite")).unwrap();
    let r = vmrepo([s("list"), p(&repo)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("check --rebuild-index"), "{}", r.stderr);

    let r = vmrepo([s("check"), p(&repo), s("--rebuild-index"), s("--read-data")]);
    r.ok();
    assert!(r.stdout.contains("3 generations"), "{}", r.stdout);
    assert_eq!(generations(&repo, "web01"), before_web);
    assert_eq!(generations(&repo, "db01"), before_db);
    let after = vmrepo([s("list"), p(&repo), s("web01"), s("--json")])
        .ok()
        .json();
    assert_eq!(after, listing, "the catalog changed in the rebuild");

    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    assert!(same_file(
        &vm.join("web01-flat.vmdk"),
        &out.join("web01-flat.vmdk")
    ));
    // After the rebuild the segment cache works again: an unchanged re-ingest stores nothing new.
    let again = ingest(&repo, &vm, None);
    assert_eq!(again["stats"]["bytes_new"], 0);
}

#[test]
fn a_second_ingest_of_the_same_vm_is_refused_while_one_runs() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 400 << 20, &[(0, 400 << 20, 3)]);
    let repo = init_repo(t.path());
    let mut first = Command::new(BIN)
        .args([s("ingest"), p(&repo), p(&img), s("--name"), s("vm")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first ingest holds its lock (it has created a pack), then try a second.
    wait_for("the first ingest's first pack", 30, || {
        !packs(&repo).is_empty()
    });
    let second = vmrepo([s("ingest"), p(&repo), p(&img), s("--name"), s("vm")]);
    let rebuild = vmrepo([s("check"), p(&repo), s("--rebuild-index")]);
    let done = first.wait().unwrap();
    assert!(done.success());
    assert_ne!(second.code, 0, "two ingests of one VM ran at once");
    assert!(
        second
            .stderr
            .contains("another ingest of VM \"vm\" is running"),
        "{}",
        second.stderr
    );
    // A command that needs the repository alone is refused while the ingest runs...
    assert_ne!(rebuild.code, 0);
    assert!(
        rebuild
            .stderr
            .contains("is in use by another vmrepo process"),
        "{}",
        rebuild.stderr
    );
    // ...and works once it has finished.
    vmrepo([s("check"), p(&repo), s("--rebuild-index")]).ok();
}

/// `--lock-wait` also waits for another ingest of the same VM (the README says so), then runs.
#[test]
fn a_second_ingest_of_the_same_vm_waits_with_lock_wait() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("vm.img");
    sparse_image(&img, 200 << 20, &[(0, 200 << 20, 3)]);
    let repo = init_repo(t.path());
    let mut first = Command::new(BIN)
        .args([s("ingest"), p(&repo), p(&img), s("--name"), s("vm")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first ingest's first pack", 30, || {
        !packs(&repo).is_empty()
    });
    let second = vmrepo([
        s("ingest"),
        p(&repo),
        p(&img),
        s("--name"),
        s("vm"),
        s("--lock-wait"),
        s("120"),
    ]);
    assert!(first.wait().unwrap().success());
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second
            .stderr
            .contains("waiting up to 120 s for another ingest of VM \"vm\""),
        "{}",
        second.stderr
    );
    assert_eq!(generations(&repo, "vm").len(), 2);
}
