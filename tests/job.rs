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

    // The broken VM would fail the run: the dry run says so and exits 1.
    let dry = vmrepo([s("run"), p(&job), s("--dry-run")]);
    assert_eq!(dry.code, 1, "{}", dry.stderr);
    let dry = dry.stdout;
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

/// The job file of docs/NIGHTLY.md runs as written, once its paths and host commands are the
/// test's: `at_snapshot = "latest"` in [defaults] applies to the VMware VM (read at its
/// snapshot) and not to the KVM image beside it, and the dry run opens each VM as the run does.
#[test]
fn the_nightly_example_job_runs_as_documented() {
    let t = tempfile::tempdir().unwrap();
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/NIGHTLY.md")).unwrap();
    let section = &doc[doc
        .find("## The job file")
        .expect("NIGHTLY.md has a job file section")..];
    let start = section.find("```toml\n").unwrap() + 8;
    let example = &section[start..start + section[start..].find("```").unwrap()];

    let ds = t.path().join("ds1");
    let web = make_vm(&ds, "web01", &[(8 << 20, vec![(0, 2 << 20, 1)])]);
    // The pre-command froze it with a snapshot: the .vmsd names the link the snapshot froze.
    fs::write(
        web.join("web01.vmsd"),
        format!(
            ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"1\"\nsnapshot.current = \"1\"\nsnapshot.numSnapshots = \"1\"\n\
             snapshot0.uid = \"1\"\nsnapshot0.displayName = \"vmrepo\"\nsnapshot0.createTimeHigh = \"{}\"\n\
             snapshot0.createTimeLow = \"0\"\nsnapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"web01.vmdk\"\n\
             snapshot0.disk0.node = \"scsi0:0\"\n",
            (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros()
                >> 32)
        ),
    )
    .unwrap();
    let qcow = t.path().join("db01.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 '{0}' 16M && qemu-io -f qcow2 -c 'write -P 0x42 1M 1M' '{0}' >/dev/null",
        qcow.display()
    ))
    .ok();
    let repo = init_repo(t.path());
    let log = t.path().join("hooks.log");
    // The off-site copy goes to an encrypted repository beside it.
    let offsite = t.path().join("offsite");
    let offsite_pass = t.path().join("offsite.pass");
    fs::write(&offsite_pass, "off-site passphrase\n").unwrap();
    sh(&format!(
        "VMREPO_PASSWORD='off-site passphrase' '{BIN}' init '{}' --encryption aes-256-gcm",
        offsite.display()
    ))
    .ok();
    let job_text: String = example
        .replace("s3://offsite-bucket/vmrepo", &offsite.display().to_string())
        .replace("/root/.vmrepo-offsite", &offsite_pass.display().to_string())
        .replace("/backup/repo", &repo.display().to_string())
        .replace("/mnt/ds1", &ds.display().to_string())
        .replace(
            "/var/lib/libvirt/images/db01.qcow2",
            &qcow.display().to_string(),
        )
        .replace(
            "/var/lib/vmrepo/nightly.json",
            &t.path().join("nightly.json").display().to_string(),
        )
        .lines()
        .map(|l| {
            for hook in ["pre_command", "post_command"] {
                if l.starts_with(hook) {
                    return format!("{hook} = \"echo {hook} $VMREPO_VM >> '{}'\"", log.display());
                }
            }
            l.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let job = t.path().join("nightly.toml");
    fs::write(&job, job_text).unwrap();

    let dry = vmrepo([s("run"), p(&job), s("--dry-run")]);
    assert_eq!(dry.code, 0, "{}{}", dry.stdout, dry.stderr);
    assert!(!dry.stdout.contains("CANNOT BE READ"), "{}", dry.stdout);
    assert!(dry.stdout.contains("db01-prod"), "{}", dry.stdout);
    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(generations(&repo, "web01").len(), 1);
    assert_eq!(generations(&repo, "db01-prod").len(), 1);
    assert!(
        r.stdout.contains("ok (2 generation(s) copied"),
        "{}",
        r.stdout
    );
    let copied = sh(&format!(
        "VMREPO_PASSWORD='off-site passphrase' '{BIN}' list '{}' --json",
        offsite.display()
    ));
    copied.ok();
    assert_eq!(
        copied.json().as_array().unwrap().len(),
        2,
        "{}",
        copied.stdout
    );
    let hooks = fs::read_to_string(&log).unwrap();
    assert!(
        hooks.contains("post_command web01") && hooks.contains("post_command db01-prod"),
        "{hooks}"
    );
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("db01-prod"), p(&out)]).ok();
    assert!(qemu_identical(&qcow, &out.join("db01.qcow2")));
    let out2 = t.path().join("out2");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out2)]).ok();
    assert!(same_file(
        &web.join("web01-flat.vmdk"),
        &out2.join("web01-flat.vmdk")
    ));

    // A VM the run could not open fails the dry run too (exit 1), naming why.
    fs::remove_file(web.join("web01.vmsd")).unwrap();
    let dry = vmrepo([s("run"), p(&job), s("--dry-run")]);
    assert_eq!(dry.code, 1, "{}", dry.stdout);
    assert!(dry.stdout.contains("CANNOT BE READ"), "{}", dry.stdout);
}

/// A job's errors name the job file's keys, not `vmrepo ingest` flags, and `datastore_map`
/// finds a disk that a descriptor names by its absolute datastore path.
#[test]
fn a_job_speaks_in_its_own_keys_and_maps_datastores() {
    let t = tempfile::tempdir().unwrap();
    let ds = t.path().join("ds1");
    let web = make_vm(&ds, "web01", &[(8 << 20, vec![(0, 2 << 20, 7)])]);
    // The extent lives on another mount; the descriptor names it as ESXi does.
    let nfs = t.path().join("nfs/web01");
    fs::create_dir_all(&nfs).unwrap();
    fs::rename(web.join("web01-flat.vmdk"), nfs.join("web01-flat.vmdk")).unwrap();
    let desc = fs::read_to_string(web.join("web01.vmdk")).unwrap();
    let abs = desc.replace(
        "\"web01-flat.vmdk\"",
        "\"/vmfs/volumes/datastore9/web01/web01-flat.vmdk\"",
    );
    assert_ne!(abs, desc, "descriptor not rewritten");
    fs::write(web.join("web01.vmdk"), abs).unwrap();
    // A VM without snapshots asked to be read at one.
    make_vm(&ds, "db01", &[(8 << 20, vec![(0, 1 << 20, 8)])]);
    let repo = init_repo(t.path());
    let write_job = |map: &str| {
        let job = t.path().join("keys.toml");
        fs::write(
            &job,
            format!(
                "repository = \"{}\"\nvms = [\"{}/*\"]\n{map}\n[vm.db01]\nat_snapshot = \"latest\"\n",
                repo.display(),
                ds.display()
            ),
        )
        .unwrap();
        job
    };

    let job = write_job("");
    let r = vmrepo([s("run"), p(&job), s("--json")]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    let errors: Vec<String> = j["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["error"].as_str().unwrap_or("").to_string())
        .collect();
    let all = errors.join("\n");
    assert!(all.contains("datastore_map = [\"DATASTORE=DIR\"]"), "{all}");
    assert!(all.contains("without at_snapshot"), "{all}");
    assert!(!all.contains("--"), "a flag named in a job's errors: {all}");
    // The same VM on the command line is told about the flag.
    let r = vmrepo([s("ingest"), p(&repo), p(&web)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--datastore-map"), "{}", r.stderr);

    // With the map (and db01 without a snapshot to read), both VMs are backed up.
    let job = write_job(&format!(
        "datastore_map = [\"/vmfs/volumes/datastore9={}\"]",
        t.path().join("nfs").display()
    ));
    let text = fs::read_to_string(&job)
        .unwrap()
        .replace("at_snapshot = \"latest\"\n", "");
    fs::write(&job, text).unwrap();
    vmrepo([s("run"), p(&job)]).ok();
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("web01"), p(&out)]).ok();
    assert!(same_file(
        &out.join("web01-flat.vmdk"),
        &nfs.join("web01-flat.vmdk")
    ));

    // A bad map is the job file's error, naming it.
    let job = write_job("datastore_map = [\"datastore9\"]");
    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("keys.toml") && r.stderr.contains("datastore_map"),
        "{}",
        r.stderr
    );
}

/// A run tells the outside world: the notify command gets the JSON status and VMREPO_STATUS,
/// sendmail gets a summary (here only on failure), and the metrics file keeps a VM's last
/// success time through a failed night. A failing notification is a warning, never a failed
/// backup.
#[test]
fn a_run_notifies_by_command_email_and_metrics_file() {
    let t = tempfile::tempdir().unwrap();
    let ds = t.path().join("ds1");
    let web = make_vm(&ds, "web01", &[(8 << 20, vec![(0, 2 << 20, 1)])]);
    let broken = make_vm(&ds, "broken", &[(8 << 20, vec![(0, 1 << 20, 4)])]);
    fs::remove_file(broken.join("broken-flat.vmdk")).unwrap();
    let repo = init_repo(t.path());
    let sendmail = t.path().join("sendmail");
    fs::write(
        &sendmail,
        format!(
            "#!/bin/sh\necho \"$@\" > '{args}'\ncat > '{mail}'\n",
            args = t.path().join("args").display(),
            mail = t.path().join("mail.txt").display()
        ),
    )
    .unwrap();
    sh(&format!("chmod +x {}", sendmail.display())).ok();
    let metrics = t.path().join("vmrepo.prom");
    let write_job = |notify: &str| {
        let job = t.path().join("notify.toml");
        fs::write(
            &job,
            format!(
                r#"repository = "{repo}"
vms = ["{ds}/*"]
notify_command = "{notify}"
metrics_file = "{metrics}"
status_file = "{status}"

[email]
to = ["ops@example.com"]
sendmail = "{sendmail}"
when = "failure"
"#,
                repo = repo.display(),
                ds = ds.display(),
                metrics = metrics.display(),
                status = t.path().join("status.json").display(),
                sendmail = sendmail.display(),
            ),
        )
        .unwrap();
        job
    };
    let notified = t.path().join("notify.json");
    let job = write_job(&format!(
        "cat > '{}'; echo $VMREPO_STATUS > '{}'",
        notified.display(),
        t.path().join("notify.status").display()
    ));

    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let sent: serde_json::Value = serde_json::from_slice(&fs::read(&notified).unwrap()).unwrap();
    assert_eq!(sent["ok"], false);
    assert_eq!(sent["vms"].as_array().unwrap().len(), 2);
    assert_eq!(
        fs::read_to_string(t.path().join("notify.status"))
            .unwrap()
            .trim(),
        "failed"
    );
    assert_eq!(
        fs::read_to_string(t.path().join("args")).unwrap().trim(),
        "-t -oi"
    );
    let mail = fs::read_to_string(t.path().join("mail.txt")).unwrap();
    assert!(mail.contains("To: ops@example.com\r\n"), "{mail}");
    assert!(mail.contains("Subject: vmrepo: FAILED on "), "{mail}");
    assert!(mail.contains("2 VM(s), 1 failed"), "{mail}");
    assert!(mail.contains("ok      web01@"), "{mail}");
    assert!(mail.contains("error: "), "{mail}");
    let prom = fs::read_to_string(&metrics).unwrap();
    let value = |series: &str| -> i64 {
        prom.lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("{series} missing:\n{prom}"))
            .rsplit_once(' ')
            .unwrap()
            .1
            .parse::<f64>()
            .unwrap() as i64
    };
    let web_label = format!("{{repository=\"{}\",vm=\"web01\"}}", repo.display());
    let broken_label = format!("{{repository=\"{}\",vm=\"broken\"}}", repo.display());
    assert_eq!(value(&format!("vmrepo_vm_ok{web_label}")), 1);
    assert_eq!(value(&format!("vmrepo_vm_ok{broken_label}")), 0);
    let web_success = value(&format!(
        "vmrepo_vm_last_success_timestamp_seconds{web_label}"
    ));
    assert!(web_success > 1_700_000_000, "{prom}");
    assert_eq!(
        value(&format!(
            "vmrepo_vm_last_success_timestamp_seconds{broken_label}"
        )),
        0
    );
    assert!(value(&format!("vmrepo_vm_read_bytes{web_label}")) >= 2 << 20);
    assert!(prom.contains("# TYPE vmrepo_run_ok gauge"), "{prom}");

    // The next night web01 fails too: its last success stays where it was. A notify command
    // that fails is a warning: it changes neither the exit status nor the backups.
    fs::remove_dir_all(&broken).unwrap();
    fs::remove_file(web.join("web01-flat.vmdk")).unwrap();
    let job = write_job("exit 3");
    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("exited with status 3"), "{}", r.stderr);
    let prom = fs::read_to_string(&metrics).unwrap();
    let again = prom
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "vmrepo_vm_last_success_timestamp_seconds{web_label}"
            ))
        })
        .unwrap();
    assert!(again.ends_with(&format!(" {web_success}")), "{prom}");
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(t.path().join("status.json")).unwrap()).unwrap();
    assert!(
        status["notification_errors"][0]
            .as_str()
            .unwrap()
            .contains("notify_command"),
        "{status}"
    );
    // A night that succeeds sends no mail (`when = "failure"`) and runs fine with a failing
    // notify command: exit 0.
    fs::remove_file(t.path().join("mail.txt")).unwrap();
    make_vm(&ds, "web01", &[(8 << 20, vec![(0, 2 << 20, 1)])]);
    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("exited with status 3"), "{}", r.stderr);
    assert!(!t.path().join("mail.txt").exists());
}
