//! The files in contrib/ for running the nightly job on a host: systemd accepts the units, and
//! the command lines in them and in the cron example are ones vmrepo accepts.

mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

const CONTRIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib");

/// A job file with one small VM, and a repository for it.
fn job(t: &Path) -> std::path::PathBuf {
    let ds = t.join("ds1");
    make_vm(&ds, "web01", &[(4 << 20, vec![(0, 1 << 20, 1)])]);
    let repo = init_repo(t);
    let job = t.join("nightly.toml");
    fs::write(
        &job,
        format!(
            "repository = \"{}\"\nvms = [\"{}/*\"]\n",
            repo.display(),
            ds.display()
        ),
    )
    .unwrap();
    job
}

/// `line`'s vmrepo arguments (after the program), with the example's paths replaced by the
/// test's, plus `--dry-run`.
fn arguments(line: &str, t: &Path, job: &Path) -> Vec<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.ends_with("vmrepo"))
        .expect("the line runs vmrepo");
    let pass = t.join("pass");
    fs::write(&pass, "unused\n").unwrap();
    let mut args: Vec<String> = words[at + 1..]
        .iter()
        .take_while(|w| !w.starts_with(">>") && !w.starts_with("2>"))
        .map(|w| match *w {
            "/etc/vmrepo/nightly.toml" => job.display().to_string(),
            "/var/lib/prometheus/node-exporter/vmrepo.prom" => {
                t.join("vmrepo.prom").display().to_string()
            }
            "/root/.vmrepo-pass" => pass.display().to_string(),
            w => w.to_string(),
        })
        .collect();
    args.push("--dry-run".into());
    args
}

#[test]
fn systemd_accepts_the_units_and_vmrepo_their_command_line() {
    let t = tempfile::tempdir().unwrap();
    let units = t.path().join("units");
    fs::create_dir(&units).unwrap();
    let service = fs::read_to_string(format!("{CONTRIB}/systemd/vmrepo-nightly.service")).unwrap();
    // systemd checks that ExecStart's program exists: the built binary stands in for /usr/bin/vmrepo.
    fs::write(
        units.join("vmrepo-nightly.service"),
        service.replace("/usr/bin/vmrepo", BIN),
    )
    .unwrap();
    fs::copy(
        format!("{CONTRIB}/systemd/vmrepo-nightly.timer"),
        units.join("vmrepo-nightly.timer"),
    )
    .unwrap();
    // --man=no: the Documentation= page is made by `vmrepo man`, not installed here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("vmrepo-nightly.service"))
        .arg(units.join("vmrepo-nightly.timer"))
        .output()
        .expect("run systemd-analyze (apt-get install systemd)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("vmrepo-nightly"),
        "systemd-analyze complained: {said}"
    );

    let job = job(t.path());
    let exec = service
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap();
    let r = vmrepo(arguments(exec, t.path(), &job));
    assert_eq!(r.code, 0, "{exec}\n{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("web01  ->  web01"), "{}", r.stdout);
}

#[test]
fn the_cron_example_is_a_command_line_vmrepo_accepts() {
    let t = tempfile::tempdir().unwrap();
    let cron = fs::read_to_string(format!("{CONTRIB}/cron/vmrepo")).unwrap();
    let line = cron
        .lines()
        .find(|l| !l.starts_with('#') && l.contains("vmrepo "))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[5], "root", "cron.d lines name the user: {line}");
    let job = job(t.path());
    let r = vmrepo(arguments(line, t.path(), &job));
    assert_eq!(r.code, 0, "{line}\n{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("web01  ->  web01"), "{}", r.stdout);
}
