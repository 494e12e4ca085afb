//! Pre- and post-commands around an ingest: their environment, a failing or hanging
//! pre-command that aborts the ingest, a post-command that always runs (also on Ctrl-C) and
//! whose failure is reported.

mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn recorder(dir: &Path, name: &str) -> String {
    format!(
        "echo \"$VMREPO_PHASE $VMREPO_VM $VMREPO_STATUS $VMREPO_VMDIR\" >> '{}'",
        dir.join(name).display()
    )
}

fn hooked(repo: &Path, img: &Path, pre: &str, post: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        s("ingest"),
        p(repo),
        p(img),
        s("--name"),
        s("web01"),
        s("--pre-command"),
        s(pre),
        s("--post-command"),
        s(post),
    ];
    args.extend(extra.iter().map(|a| s(a)));
    vmrepo(args)
}

#[test]
fn hooks_see_the_vm_and_the_post_command_always_runs() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("web01.img");
    sparse_image(&img, 4 << 20, &[(0, 1 << 20, 1)]);
    let repo = init_repo(t.path());
    let log = t.path().join("hooks.log");

    // Success: pre, ingest, post with status success.
    let r = hooked(
        &repo,
        &img,
        &recorder(t.path(), "hooks.log"),
        &recorder(t.path(), "hooks.log"),
        &["--json"],
    );
    let j = r.ok().json();
    assert_eq!(j["hooks"].as_array().unwrap().len(), 2, "{j}");
    let lines = fs::read_to_string(&log).unwrap();
    let img_s = img.display().to_string();
    assert_eq!(
        lines,
        format!("pre web01  {img_s}\npost web01 success {img_s}\n")
    );
    assert_eq!(generations(&repo, "web01").len(), 1);

    // A failing pre-command: no generation, the post-command runs with status failure.
    fs::remove_file(&log).unwrap();
    let r = hooked(
        &repo,
        &img,
        "echo freeze failed >&2; exit 4",
        &recorder(t.path(), "hooks.log"),
        &[],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("pre-command \"echo freeze failed >&2; exit 4\" failed with exit status 4"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("freeze failed"),
        "hook output goes to stderr: {}",
        r.stderr
    );
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        format!("post web01 failure {img_s}\n")
    );
    assert_eq!(generations(&repo, "web01").len(), 1);

    // A hanging pre-command is killed at the timeout.
    let r = hooked(&repo, &img, "sleep 60", "true", &["--hook-timeout", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("ran longer than its timeout"),
        "{}",
        r.stderr
    );
    assert_eq!(generations(&repo, "web01").len(), 1);

    // A failing post-command after a good ingest: the generation stays, exit status 1.
    let r = hooked(&repo, &img, "true", "exit 9", &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("was recorded, but post-command \"exit 9\" failed with exit status 9"),
        "{}",
        r.stderr
    );
    assert_eq!(generations(&repo, "web01").len(), 2);
}

#[test]
fn ctrl_c_still_runs_the_post_command_and_records_nothing() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("web01.img");
    sparse_image(&img, 4 << 20, &[(0, 1 << 20, 1)]);
    let repo = init_repo(t.path());
    let log = t.path().join("hooks.log");
    let child = Command::new(BIN)
        .args([
            s("ingest"),
            p(&repo),
            p(&img),
            s("--pre-command"),
            s(&format!(
                "touch '{}'; sleep 5",
                t.path().join("pre-started").display()
            )),
            s("--post-command"),
            s(&recorder(t.path(), "hooks.log")),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt while the pre-command runs (vmrepo has set up its signal handling by then).
    wait_for("the pre-command's start", 60, || {
        t.path().join("pre-started").exists()
    });
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = fs::read_to_string(&log).unwrap();
    assert!(lines.starts_with("post web01 interrupted "), "{lines}");
    assert!(generations(&repo, "web01").is_empty());
    vmrepo([s("check"), p(&repo)]).ok();
}

/// Interrupted while reading (not only while a hook runs), with each termination signal and
/// with `--threads` (whose worker threads started before the handler once were killed by the
/// signal, skipping the post-command): the post-command runs with `interrupted`, the exit code
/// is 130, no generation is recorded and the repository is clean.
#[test]
fn a_signal_while_reading_still_runs_the_post_command() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("big.img");
    fs::write(&img, bytes(160 << 20, 5)).unwrap();
    let repo = init_repo(t.path());
    for (i, (sig, threads)) in [
        (libc::SIGINT, true),
        (libc::SIGTERM, true),
        (libc::SIGHUP, false),
    ]
    .into_iter()
    .enumerate()
    {
        let log = format!("hooks-{i}.log");
        let mut args = vec![s("ingest"), p(&repo), p(&img), s("--name"), s("big")];
        args.extend([s("--post-command"), s(&recorder(t.path(), &log))]);
        if threads {
            args.splice(0..0, [s("--threads"), s("2")]);
        }
        // A marker the pre-command leaves tells when reading is about to start.
        let started = t.path().join(format!("started-{i}"));
        args.extend([
            s("--pre-command"),
            s(&format!("touch '{}'", started.display())),
        ]);
        let child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the pre-command's start", 60, || started.exists());
        std::thread::sleep(Duration::from_millis(150));
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "signal {sig}: {err}");
        let lines = fs::read_to_string(t.path().join(&log)).unwrap();
        assert!(
            lines.starts_with("post big interrupted "),
            "signal {sig}: {lines}"
        );
        assert_eq!(lines.lines().count(), 1, "post-command ran twice: {lines}");
        assert!(generations(&repo, "big").is_empty(), "signal {sig}");
    }
    vmrepo([s("check"), p(&repo)]).ok();
}

/// `vmrepo run` with two VMs in flight: an interrupt runs the post-command of each, not only
/// of one.
#[test]
fn an_interrupted_job_runs_the_post_command_of_every_vm_in_flight() {
    let t = tempfile::tempdir().unwrap();
    let ds = t.path().join("ds1");
    make_vm(&ds, "web01", &[(8 << 20, vec![(0, 2 << 20, 1)])]);
    make_vm(&ds, "db01", &[(8 << 20, vec![(0, 2 << 20, 2)])]);
    let repo = init_repo(t.path());
    let log = t.path().join("hooks.log");
    let job = t.path().join("job.toml");
    fs::write(
        &job,
        format!(
            r#"repository = "{repo}"
vms = ["{ds}/*"]
parallel = 2

[defaults]
pre_command = "echo \"pre $VMREPO_VM\" >> '{log}'; sleep 30"
post_command = "echo \"post $VMREPO_VM $VMREPO_STATUS\" >> '{log}'"
"#,
            repo = repo.display(),
            ds = ds.display(),
            log = log.display()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args([s("run"), p(&job)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    wait_for("the start of both pre-commands", 60, || {
        fs::read_to_string(&log).unwrap_or_default().lines().count() >= 2
    });
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "the pre-commands were not stopped"
    );
    let lines = fs::read_to_string(&log).unwrap();
    for vm in ["web01", "db01"] {
        assert!(
            lines.contains(&format!("post {vm} interrupted")),
            "{vm} got no post-command: {lines}"
        );
    }
    assert!(generations(&repo, "web01").is_empty() && generations(&repo, "db01").is_empty());
}
