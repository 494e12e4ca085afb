//! Reading VMs without starving their datastore: `--limit-read` holds the reads to a rate,
//! `--io-priority` puts the process (and the hooks it starts) in an I/O class, and a job's
//! `stagger` spaces the starts of its VMs.

mod common;
use common::*;
use std::fs;
use std::time::Instant;

#[test]
fn limit_read_holds_an_ingest_to_its_rate_and_changes_nothing_stored() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    // 12 MiB of data in a 32 MiB disk.
    sparse_image(&img, 32 << 20, &[(0, 6 << 20, 1), (16 << 20, 6 << 20, 2)]);
    let repo = init_repo(t.path());
    let began = Instant::now();
    vmrepo([
        s("--limit-read"),
        s("8"),
        s("ingest"),
        p(&repo),
        p(&img),
        s("--name"),
        s("vm"),
    ])
    .ok();
    let took = began.elapsed().as_secs_f64();
    // 12.6 MB at 8 MB/s: at least 1.57 s, however the reads are cut.
    assert!(
        took >= 1.55,
        "12 MiB read in {took:.2} s under an 8 MB/s limit"
    );
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("vm"), p(&out)]).ok();
    assert!(same_file(&out.join("d.img"), &img));
    let r = vmrepo([s("--limit-read"), s("0"), s("list"), p(&repo)]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("not a rate in MB/s above 0"),
        "{}",
        r.stderr
    );
}

#[test]
fn io_priority_is_inherited_by_the_hooks_and_bad_classes_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 1 << 20, 1)]);
    let repo = init_repo(t.path());
    let seen = t.path().join("ionice.txt");
    for (class, ionice_says) in [("idle", "idle"), ("best-effort:7", "best-effort: prio 7")] {
        vmrepo([
            s("--io-priority"),
            s(class),
            s("ingest"),
            p(&repo),
            p(&img),
            s("--name"),
            s("vm"),
            s("--pre-command"),
            s(&format!("ionice -p $$ > '{}'", seen.display())),
        ])
        .ok();
        assert_eq!(fs::read_to_string(&seen).unwrap().trim(), ionice_says);
    }
    let r = vmrepo([s("--io-priority"), s("realtime"), s("list"), p(&repo)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not an I/O priority"), "{}", r.stderr);
}

#[test]
fn a_job_staggers_the_starts_of_its_vms() {
    let t = tempfile::tempdir().unwrap();
    let ds = t.path().join("ds1");
    make_vm(&ds, "a", &[(4 << 20, vec![(0, 1 << 20, 1)])]);
    make_vm(&ds, "b", &[(4 << 20, vec![(0, 1 << 20, 2)])]);
    let repo = init_repo(t.path());
    let log = t.path().join("starts.log");
    let job = t.path().join("job.toml");
    fs::write(
        &job,
        format!(
            r#"repository = "{repo}"
vms = ["{ds}/*"]
parallel = 2
stagger = 2

[defaults]
pre_command = "date +%s.%N >> '{log}'"
"#,
            repo = repo.display(),
            ds = ds.display(),
            log = log.display()
        ),
    )
    .unwrap();
    vmrepo([s("run"), p(&job)]).ok();
    let starts: Vec<f64> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 2);
    let gap = (starts[1] - starts[0]).abs();
    assert!(
        gap >= 1.8,
        "the two VMs started {gap:.2} s apart, stagger is 2 s"
    );
    assert_eq!(
        generations(&repo, "a").len() + generations(&repo, "b").len(),
        2
    );
}
