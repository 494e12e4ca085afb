//! The environment turns against vmrepo: standard output closed early, a read-only
//! repository, a full filesystem, absurd arguments. Reading must keep working, freeing space
//! must work on a full disk, and nothing panics.

mod common;
#[path = "common/live.rs"]
mod live;
use common::*;
use live::serve_nbd;
use std::fs;
use std::path::{Path, PathBuf};

/// A repository with two generations of two small VMs; returns it and the first image.
fn small_repo(dir: &Path) -> (PathBuf, PathBuf) {
    let repo = init_repo(dir);
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    fs::write(&a, bytes(2 << 20, 1)).unwrap();
    fs::write(&b, bytes(2 << 20, 2)).unwrap();
    ingest(&repo, &a, Some("a"));
    ingest(&repo, &b, Some("b"));
    (repo, a)
}

/// A mount point under `dir`, mounted by `cmd` (which gets the path), or None when this
/// process may not mount (not root): the caller then says what it could not test.
fn try_mount(dir: &Path, name: &str, cmd: impl Fn(&Path) -> String) -> Option<PathBuf> {
    let mnt = dir.join(name);
    fs::create_dir_all(&mnt).unwrap();
    (sh(&cmd(&mnt)).code == 0).then_some(mnt)
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        sh(&format!("umount -l '{}'", self.0.display()));
    }
}

#[test]
fn a_closed_stdout_is_not_a_panic_and_the_ingest_still_runs_its_post_command() {
    let t = tempfile::tempdir().unwrap();
    let (repo, a) = small_repo(t.path());
    // `| head -0` closes the pipe before vmrepo writes.
    let r2 = sh(&format!(
        "bash -c \"'{BIN}' list '{}' | head -c 0; echo status=\\${{PIPESTATUS[0]}}\"",
        repo.display()
    ));
    assert!(!r2.stderr.contains("panicked"), "{}", r2.stderr);
    assert!(r2.stdout.contains("status=0"), "{}{}", r2.stdout, r2.stderr);
    // An ingest whose reader goes away commits, runs its post-command with success, exits 0.
    let marker = t.path().join("post.txt");
    fs::write(&a, bytes(2 << 20, 3)).unwrap();
    let r = sh(&format!(
        "bash -c \"'{BIN}' ingest '{}' '{}' --name a --post-command 'echo \\$VMREPO_STATUS > {}' | head -c 0; echo status=\\${{PIPESTATUS[0]}}\"",
        repo.display(),
        a.display(),
        marker.display()
    ));
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stdout.contains("status=0"), "{}{}", r.stdout, r.stderr);
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "success");
    assert_eq!(generations(&repo, "a").len(), 2);
}

#[test]
fn an_absurd_keep_within_is_refused_in_words() {
    let t = tempfile::tempdir().unwrap();
    let (repo, _) = small_repo(t.path());
    let r = vmrepo([s("prune"), p(&repo), s("--keep-within"), s("20000y")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("at most 1000 years"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    // The longest accepted one works.
    vmrepo([
        s("prune"),
        p(&repo),
        s("--keep-within"),
        s("1000y"),
        s("--dry-run"),
    ])
    .ok();
}

#[test]
fn a_read_only_repository_can_be_listed_checked_and_restored() {
    let t = tempfile::tempdir().unwrap();
    let (repo, a) = small_repo(t.path());
    // With no lock file there and none that can be made: the command runs unguarded.
    fs::remove_file(repo.join("locks/repository.lock")).unwrap();
    let Some(ro) = try_mount(t.path(), "ro", |m| {
        format!(
            "mount --bind '{}' '{}' && mount -o remount,bind,ro '{}'",
            repo.display(),
            m.display(),
            m.display()
        )
    }) else {
        eprintln!("SKIPPED: cannot bind-mount read-only here (not root); nothing was tested");
        return;
    };
    let _u = Unmount(ro.clone());
    let l = vmrepo([s("list"), p(&ro)]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    assert!(
        l.stdout.contains("a ") && l.stdout.contains("b "),
        "{}",
        l.stdout
    );
    assert!(l.stderr.contains("no lock was taken"), "{}", l.stderr);
    let c = vmrepo([s("check"), p(&ro), s("--read-data")]);
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    // As on a repository of millions of objects, where check and stats file their id sets in
    // temporary files: beside a read-only index they go elsewhere, and both still answer.
    for args in [[s("check"), p(&ro)], [s("stats"), p(&ro)]] {
        let r = vmrepo_batches(true, &args);
        assert_eq!(r.code, 0, "{args:?}: {}{}", r.stdout, r.stderr);
    }
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&ro), s("a"), p(&out)]).ok();
    assert!(same_file(&a, &out.join("a.img")));
    vmrepo([s("gc"), p(&ro), s("--dry-run")]).ok();
    // Commands that write say why they cannot.
    let g = vmrepo([s("gc"), p(&ro)]);
    assert_ne!(g.code, 0);
    assert!(g.stderr.contains("read-only"), "{}", g.stderr);
}

#[test]
fn a_full_filesystem_can_be_read_and_pruned_and_gc_frees_space() {
    let t = tempfile::tempdir().unwrap();
    let Some(mnt) = try_mount(t.path(), "small", |m| {
        format!("mount -t tmpfs -o size=40m tmpfs '{}'", m.display())
    }) else {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (not root); nothing was tested");
        return;
    };
    let _u = Unmount(mnt.clone());
    let (repo, a) = small_repo(&mnt);
    assert!(repo.join("reserve").exists(), "init makes the reserve");
    sh(&format!(
        "dd if=/dev/zero of='{}/fill' bs=1M 2>/dev/null; true",
        mnt.display()
    ));
    // An ingest fails and says the filesystem is full.
    let big = t.path().join("big.img");
    fs::write(&big, bytes(8 << 20, 9)).unwrap();
    let r = vmrepo([s("ingest"), p(&repo), p(&big), s("--name"), s("big")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("No space left on device") || r.stderr.contains("is full"),
        "{}",
        r.stderr
    );
    // Reading works.
    let l = vmrepo([s("list"), p(&repo)]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("a"), p(&out)]).ok();
    assert!(same_file(&a, &out.join("a.img")));
    // Freeing space works: prune releases the reserve, gc deletes the data.
    let pr = vmrepo([
        s("prune"),
        p(&repo),
        s("b"),
        s("--keep-last"),
        s("0"),
        s("--allow-empty"),
    ]);
    assert_eq!(pr.code, 0, "{}{}", pr.stdout, pr.stderr);
    assert!(
        pr.stderr.contains("released the repository's"),
        "{}",
        pr.stderr
    );
    vmrepo([s("gc"), p(&repo)]).ok();
    assert!(generations(&repo, "b").is_empty());
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let out2 = t.path().join("out2");
    vmrepo([s("extract"), p(&repo), s("a"), p(&out2)]).ok();
    assert!(same_file(&a, &out2.join("a.img")));
}

/// Thin disks far larger than their data: a 4 TiB hosted sparse VMDK (beyond VMware's 2 TiB,
/// as qemu-img makes them) with data at its far end backs up and restores it; 64 TiB and 1 PiB
/// thin qcow2 disks, empty or with data at both ends, back up in seconds and in memory that
/// follows their data, not their size (an empty 64 TiB disk once took 2.6 GB, and a 1 PiB one
/// was killed by the kernel after 24 GB), pass `check --read-data` and serve their data.
#[test]
fn huge_thin_disks_are_backed_up_in_memory_that_follows_their_data() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let big = t.path().join("big.vmdk");
    sh(&format!(
        "qemu-img create -q -f vmdk -o subformat=monolithicSparse '{0}' 4T && \
         qemu-io -f vmdk -c 'write -P 0x5a 4398046380032 65536' '{0}' >/dev/null",
        big.display()
    ))
    .ok();
    let stream = t.path().join("stream.vmdk");
    sh(&format!(
        "qemu-img create -q -f vmdk -o subformat=streamOptimized '{}' 4T",
        stream.display()
    ))
    .ok();
    ingest(&repo, &big, Some("big"));
    ingest(&repo, &stream, Some("stream"));
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("big"), p(&out)]).ok();
    let r = sh(&format!(
        "qemu-io -f vmdk -c 'read -P 0x5a 4398046380032 65536' -c 'read -P 0 0 1048576' '{}'",
        out.join("big.vmdk").display()
    ));
    assert!(
        r.code == 0
            && !r.stdout.contains("verification failed")
            && r.stdout.contains("read 65536/65536"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    for (size, name, data) in [
        ("64T", "t64", false),
        ("1P", "t1p", false),
        ("64T", "t64d", true),
        ("1P", "t1pd", true),
    ] {
        let img = t.path().join(format!("{name}.qcow2"));
        sh(&format!(
            "qemu-img create -q -f qcow2 '{}' {size}",
            img.display()
        ))
        .ok();
        let last = if size == "64T" {
            64u64 << 40
        } else {
            1u64 << 50
        } - 65536;
        if data {
            sh(&format!(
                "qemu-io -f qcow2 -c 'write -P 0x11 0 65536' -c 'write -P 0x22 {last} 65536' \
                 '{}' >/dev/null",
                img.display()
            ))
            .ok();
        }
        let started = std::time::Instant::now();
        let (r, peak) = vmrepo_peak_memory([s("ingest"), p(&repo), p(&img), s("--name"), s(name)]);
        r.ok();
        assert!(
            peak < 256 << 20,
            "{size}: the ingest held {} MiB at its peak",
            peak >> 20
        );
        assert!(
            started.elapsed().as_secs() < 60,
            "{size} took {:?}",
            started.elapsed()
        );
        assert_eq!(generations(&repo, name).len(), 1);
        if data {
            // Read both ends back over NBD (a raw image of 64 TiB is more than most
            // filesystems can hold, so extract is not the way to look at it).
            let srv = serve_nbd(t.path(), &repo, name, &[]);
            let r = sh(&format!(
                "qemu-io -r -f raw -c 'read -P 0x11 0 65536' -c 'read -P 0x22 {last} 65536' \
                 -c 'read -P 0 65536 1048576' -c 'read -P 0 {} 1048576' '{}'",
                last / 2,
                srv.uri()
            ));
            assert!(
                r.code == 0 && !r.stdout.contains("verification failed"),
                "{}{}",
                r.stdout,
                r.stderr
            );
        }
    }
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}
