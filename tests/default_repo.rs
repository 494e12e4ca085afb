//! The default repository: `-R/--repo`, `VMREPO_REPOSITORY`, or `repository` in the config file,
//! used by commands whose REPO argument is left out; an explicit repository still wins.

mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

/// `vmrepo ARGS` with `HOME` and `XDG_CONFIG_HOME` under `home` and `env` set.
fn run(home: &Path, env: &[(&str, &Path)], args: &[&str]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("VMREPO_REPOSITORY");
    for (k, v) in env {
        c.env(k, v);
    }
    Run::from(c.output().expect("run vmrepo"))
}

#[test]
fn commands_without_a_repository_use_the_default_and_an_explicit_one_wins() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    fs::create_dir(&home).unwrap();
    let (r1, r2) = (t.path().join("r1"), t.path().join("r2"));
    for r in [&r1, &r2] {
        run(&home, &[], &["init", r.to_str().unwrap()]).ok();
    }
    let img = t.path().join("d.img");
    sparse_image(&img, 4 << 20, &[(0, 1 << 20, 1)]);
    let env = [("VMREPO_REPOSITORY", r1.as_path())];
    let img_s = img.to_str().unwrap();

    // From the environment: ingest, list, extract, stats, check, with no REPO.
    run(&home, &env, &["ingest", img_s, "--name", "web01"]).ok();
    let r = run(&home, &env, &["list"]);
    assert!(r.ok().stdout.contains("web01"), "{}", r.stdout);
    let out = t.path().join("out");
    run(&home, &env, &["extract", "web01", out.to_str().unwrap()]).ok();
    assert!(same_file(&out.join("d.img"), &img));
    run(&home, &env, &["stats", "--json"]).ok();
    run(&home, &env, &["check", "--read-data"]).ok();
    // Options before the arguments are fine too.
    let r = run(&home, &env, &["list", "--json", "web01"]);
    assert!(r.ok().stdout.contains("web01@"), "{}", r.stdout);

    // An explicit repository wins over the default; so does -R over the environment.
    let r = run(&home, &env, &["list", r2.to_str().unwrap()]);
    assert!(r.ok().stdout.contains("no VMs"), "{}", r.stdout);
    let r = run(&home, &env, &["-R", r2.to_str().unwrap(), "list"]);
    assert!(r.ok().stdout.contains("no VMs"), "{}", r.stdout);
    let r = run(&home, &env, &["list", "--repo", r2.to_str().unwrap()]);
    assert!(r.ok().stdout.contains("no VMs"), "{}", r.stdout);
    // init makes the repository it is given.
    let r3 = t.path().join("r3");
    run(&home, &env, &["init", r3.to_str().unwrap()]).ok();
    assert!(r3.join("config.toml").is_file());
    // copy with one repository: it is the destination, the default the source.
    run(&home, &env, &["copy", r3.to_str().unwrap(), "web01"]).ok();
    let r = run(&home, &[], &["list", r3.to_str().unwrap()]);
    assert!(r.ok().stdout.contains("web01"), "{}", r.stdout);
    // Both given: both as given.
    run(
        &home,
        &env,
        &["copy", r2.to_str().unwrap(), r3.to_str().unwrap()],
    )
    .ok();

    // The config file, when nothing else names one.
    let config = home.join("config/vmrepo/config.toml");
    fs::create_dir_all(config.parent().unwrap()).unwrap();
    fs::write(&config, format!("repository = \"{}\"\n", r1.display())).unwrap();
    let r = run(&home, &[], &["list"]);
    assert!(r.ok().stdout.contains("web01"), "{}", r.stdout);
    // The environment is stronger than the file.
    let r = run(&home, &[("VMREPO_REPOSITORY", r2.as_path())], &["list"]);
    assert!(r.ok().stdout.contains("no VMs"), "{}", r.stdout);
    // A broken file is an error naming it.
    fs::write(&config, "repositroy = 1\n").unwrap();
    let r = run(&home, &[], &["list"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("config.toml is not valid"),
        "{}",
        r.stderr
    );
    // ... but not for a command given its repository.
    let r = run(&home, &[], &["list", r1.to_str().unwrap()]);
    assert!(r.ok().stdout.contains("web01"), "{}", r.stdout);

    // No default at all: REPO is required, as before.
    fs::remove_file(&config).unwrap();
    let r = run(&home, &[], &["list"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("<REPO>"), "{}", r.stderr);
}
