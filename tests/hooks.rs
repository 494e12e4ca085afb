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
    let started = std::time::Instant::now();
    while !t.path().join("pre-started").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the pre-command never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
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
