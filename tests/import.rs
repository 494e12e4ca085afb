//! import-ghettovcb: a rotation of dated folders and .gz archives becomes generations at the
//! folder dates, oldest first; a re-run skips what is there; every generation restores exactly.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

/// One ghettoVCB backup folder `web01-DATE` holding a VM whose disk has `seed`-dependent churn.
fn backup(rotation: &Path, date: &str, seed: u64) -> PathBuf {
    let tmp = rotation.join(".build");
    let vm = make_vm(
        &tmp,
        "web01",
        &[(
            16 << 20,
            vec![(0, 12 << 20, 1), (seed << 20, 1 << 20, seed)],
        )],
    );
    let dated = rotation.join(format!("web01-{date}"));
    fs::rename(&vm, &dated).unwrap();
    fs::remove_dir_all(&tmp).unwrap();
    dated
}

#[test]
fn a_ghettovcb_rotation_comes_in_with_its_dates() {
    let t = tempfile::tempdir().unwrap();
    let rotation = t.path().join("web01");
    fs::create_dir(&rotation).unwrap();
    let dates = [
        "2026-11-18_01-00-03",
        "2026-11-19_01-00-02",
        "2026-11-20_01-00-04",
    ];
    let mut flats = Vec::new();
    for (i, d) in dates.iter().enumerate() {
        let dir = backup(&rotation, d, 3 + i as u64);
        let keep = t.path().join(format!("flat{i}.vmdk"));
        fs::copy(dir.join("web01-flat.vmdk"), &keep).unwrap();
        flats.push(keep);
    }
    // The middle one as ghettoVCB's compressed mode leaves it: a gzip tar of the folder.
    let middle = format!("web01-{}", dates[1]);
    sh(&format!(
        "cd '{}' && tar czf '{middle}.gz' '{middle}' && rm -r '{middle}'",
        rotation.display()
    ))
    .ok();
    fs::write(rotation.join("notes.txt"), "not a backup").unwrap();

    let repo = init_repo(t.path());
    let r = vmrepo([s("import-ghettovcb"), p(&repo), p(&rotation)])
        .ok()
        .stdout
        .clone();
    assert!(
        r.contains("imported 3 backup(s), skipped 0, failed 0"),
        "{r}"
    );
    assert!(r.contains("the repository stored"), "{r}");
    assert_eq!(
        generations(&repo, "web01"),
        [
            "web01@2026-11-18T01:00:03Z",
            "web01@2026-11-19T01:00:02Z",
            "web01@2026-11-20T01:00:04Z"
        ]
    );
    // Each generation names what it came from: the folder, or the archive (not the temporary
    // directory the archive was unpacked into).
    let listed = vmrepo([s("list"), p(&repo), s("web01"), s("--json")])
        .ok()
        .json();
    let sources: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        [
            rotation.join(format!("web01-{}", dates[0])),
            rotation.join(format!("{middle}.gz")),
            rotation.join(format!("web01-{}", dates[2])),
        ]
        .map(|p| p.to_string_lossy().into_owned()),
        "{listed}"
    );
    // Dedup: the rotation holds three full disks, the repository about one.
    let stored = tree_size(&repo.join("data"));
    assert!(
        stored < 16 << 20,
        "stored {stored} bytes for three 13 MiB disks"
    );

    let again = vmrepo([s("import-ghettovcb"), p(&repo), p(&rotation)])
        .ok()
        .stdout
        .clone();
    assert!(
        again.contains("imported 0 backup(s), skipped 3, failed 0"),
        "{again}"
    );

    for (i, d) in dates.iter().enumerate() {
        let time = d.replacen('_', "T", 1);
        let (day, clock) = time.split_once('T').unwrap();
        let gen = format!("web01@{day}T{}Z", clock.replace('-', ":"));
        let out = t.path().join(format!("out{i}"));
        vmrepo([s("extract"), p(&repo), s(&gen), p(&out)]).ok();
        assert!(same_file(&out.join("web01-flat.vmdk"), &flats[i]), "{gen}");
        assert!(out.join("web01.vmx").exists());
    }
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn import_names_a_directory_without_backups_and_a_broken_archive() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let r = vmrepo([s("import-ghettovcb"), p(&repo), p(&empty)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no ghettoVCB backups"), "{}", r.stderr);
    assert!(r.stderr.contains("empty"), "{}", r.stderr);

    let rotation = t.path().join("rot");
    fs::create_dir(&rotation).unwrap();
    backup(&rotation, "2026-11-18_01-00-03", 3);
    fs::write(
        rotation.join("web01-2026-11-19_01-00-03.gz"),
        b"this is not gzip",
    )
    .unwrap();
    let r = vmrepo([
        s("import-ghettovcb"),
        p(&repo),
        p(&rotation),
        s("--name"),
        s("web"),
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stdout
            .contains("imported 1 backup(s), skipped 0, failed 1"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("web01-2026-11-19_01-00-03.gz  FAILED"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("not a readable gzip tar archive"),
        "{}",
        r.stdout
    );
    assert_eq!(generations(&repo, "web"), ["web@2026-11-18T01:00:03Z"]);
}
