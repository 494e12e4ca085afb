//! Before reading a VM, ingest warns about snapshots left behind (older than
//! --max-snapshot-age) and, with --strict, refuses to back it up.

mod common;
use common::*;
use std::fs;

/// `.vmsd` createTimeHigh/Low for a snapshot taken `days` ago.
fn create_time(days: f64) -> (i64, i32) {
    let micros = jiff::Timestamp::now().as_microsecond() - (days * 86_400e6) as i64;
    (micros >> 32, (micros & 0xffff_ffff) as u32 as i32)
}

#[test]
fn an_old_snapshot_is_warned_about_and_refused_with_strict() {
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(t.path(), "web01", &[(4 << 20, vec![(0, 1 << 20, 1)])]);
    let (hi, lo) = create_time(9.0);
    fs::write(
        vm.join("web01.vmsd"),
        format!(
            ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"1\"\nsnapshot.numSnapshots = \"1\"\n\
             snapshot0.uid = \"1\"\nsnapshot0.displayName = \"before upgrade\"\n\
             snapshot0.createTimeHigh = \"{hi}\"\nsnapshot0.createTimeLow = \"{lo}\"\n\
             snapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"web01.vmdk\"\n\
             snapshot0.disk0.node = \"scsi0:0\"\n"
        ),
    )
    .unwrap();
    let repo = init_repo(t.path());
    let r = vmrepo([s("ingest"), p(&repo), p(&vm)]);
    r.ok();
    assert!(
        r.stderr
            .contains("snapshot \"before upgrade\" of web01 is 9.0 days old (limit 3 days)"),
        "{}",
        r.stderr
    );
    // A larger limit is quiet; --strict refuses and records nothing.
    let r = vmrepo([
        s("ingest"),
        p(&repo),
        p(&vm),
        s("--max-snapshot-age"),
        s("30"),
    ]);
    assert!(!r.ok().stderr.contains("days old"), "{}", r.stderr);
    let r = vmrepo([s("ingest"), p(&repo), p(&vm), s("--strict")]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("refusing to back up"), "{}", r.stderr);
    assert!(r.stderr.contains("(--strict)"), "{}", r.stderr);
    assert_eq!(generations(&repo, "web01").len(), 2);
}
