//! `vmrepo run JOB.toml`: globbed VMs with exclusions, parallel ingests where one failing VM
//! does not stop the others, hooks from defaults and per-VM sections, retention and check
//! afterwards, the status file, exit codes, and --dry-run.

mod common;
use common::*;
use std::fs;
use std::path::Path;

fn job_file(t: &Path, repo: &Path, extra: &str) -> std::path::PathBuf {
    let ds = t.join("ds1");
    let job = t.join("nightly.toml");
    fs::write(
        &job,
        format!(
            r#"repository = "{repo}"
vms = ["{ds}/*"]
exclude = ["{ds}/test-*"]
parallel = 2
status_file = "{status}"

[defaults]
post_command = "echo \"$VMREPO_VM $VMREPO_STATUS\" >> '{log}'"

[vm.db01]
pre_command = "true"

[retention]
default = {{ keep-last = 1 }}

[check]
read_data_subset = "1/1"
{extra}"#,
            repo = repo.display(),
            ds = ds.display(),
            status = t.join("status.json").display(),
            log = t.join("hooks.log").display(),
        ),
    )
    .unwrap();
    job
}

#[test]
fn a_nightly_job_backs_up_every_vm_it_can_and_says_which_failed() {
    let t = tempfile::tempdir().unwrap();
    let ds = t.path().join("ds1");
    let web = make_vm(&ds, "web01", &[(8 << 20, vec![(0, 2 << 20, 1)])]);
    make_vm(&ds, "db01", &[(8 << 20, vec![(0, 3 << 20, 2)])]);
    make_vm(&ds, "test-x", &[(8 << 20, vec![(0, 1 << 20, 3)])]);
    // A VM whose disk is gone: it fails, the others do not.
    let broken = make_vm(&ds, "broken", &[(8 << 20, vec![(0, 1 << 20, 4)])]);
    fs::remove_file(broken.join("broken-flat.vmdk")).unwrap();
    let repo = init_repo(t.path());
    let job = job_file(t.path(), &repo, "");

    let dry = vmrepo([s("run"), p(&job), s("--dry-run")])
        .ok()
        .stdout
        .clone();
    assert!(dry.contains("web01  ->  web01"), "{dry}");
    assert!(dry.contains("broken  ->  CANNOT BE READ"), "{dry}");
    assert!(!dry.contains("test-x"), "excluded VM listed: {dry}");
    assert!(dry.contains("disk scsi0:0 vmfs: 8.0 MiB virtual"), "{dry}");
    assert!(generations(&repo, "web01").is_empty(), "dry run ingested");

    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 1, "one VM failed: {}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("FAILED: 2 of 3 VM(s) backed up"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("check: ok"), "{}", r.stdout);
    assert_eq!(generations(&repo, "web01").len(), 1);
    assert_eq!(generations(&repo, "db01").len(), 1);
    assert!(generations(&repo, "test-x").is_empty());
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(t.path().join("status.json")).unwrap()).unwrap();
    let statuses: Vec<(String, String)> = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                v["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("broken".into(), "failed".into()),
            ("db01".into(), "ok".into()),
            ("web01".into(), "ok".into())
        ]
    );
    let hooks = fs::read_to_string(t.path().join("hooks.log")).unwrap();
    assert!(
        hooks.contains("broken failure") && hooks.contains("web01 success"),
        "{hooks}"
    );

    // The next night: retention keeps the newest generation of each VM.
    overwrite(&web.join("web01-flat.vmdk"), 0, 65536, 99);
    fs::remove_dir_all(&broken).unwrap();
    let r = vmrepo([s("run"), p(&job), s("--json")]);
    let j = r.ok().json();
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["removed"], 2, "{j}");
    assert_eq!(j["retention"], "applied");
    assert_eq!(generations(&repo, "web01").len(), 1);
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    assert!(same_file(
        &out.join("web01-flat.vmdk"),
        &web.join("web01-flat.vmdk")
    ));
}

#[test]
fn a_bad_job_file_is_exit_status_2_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    let repo = init_repo(t.path());
    let job = job_file(t.path(), &repo, "paralel = 3\n");
    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nightly.toml"), "{}", r.stderr);
    assert!(r.stderr.contains("paralel"), "{}", r.stderr);
}
