//! Shell completions and man pages are generated from the command definitions: they list every
//! command and option `--help` does, and bash accepts the script.

mod common;
use common::*;
use std::fs;

#[test]
fn bash_loads_the_completion_script_and_it_knows_the_commands() {
    let r = vmrepo(["completions", "bash"]);
    r.ok();
    for word in [
        "forget",
        "prune",
        "extract",
        "--keep-daily",
        "--read-data",
        "--limit-upload",
    ] {
        assert!(
            r.stdout.contains(word),
            "{word} missing from the bash script"
        );
    }
    let t = tempfile::tempdir().unwrap();
    let script = t.path().join("vmrepo.bash");
    fs::write(&script, &r.stdout).unwrap();
    let loaded = Run::from(
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p vmrepo", script.display()))
            .output()
            .expect("run bash"),
    );
    assert_eq!(loaded.code, 0, "{}", loaded.stderr);
    assert!(loaded.stdout.contains("vmrepo"), "{}", loaded.stdout);
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let r = vmrepo(["completions", shell]);
        r.ok();
        assert!(r.stdout.contains("forget"), "{shell}");
    }
    let r = vmrepo(["completions", "tcsh"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("tcsh"), "{}", r.stderr);
}

#[test]
fn man_pages_are_written_for_every_command_with_its_help() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("man1");
    let r = vmrepo([s("man"), p(&dir)]);
    r.ok();
    for cmd in [
        "ingest", "extract", "prune", "forget", "gc", "check", "copy", "key-add",
    ] {
        let page = dir.join(format!("vmrepo-{cmd}.1"));
        assert!(page.is_file(), "{} missing ({})", page.display(), r.stdout);
    }
    let main = fs::read_to_string(dir.join("vmrepo.1")).unwrap();
    assert!(main.starts_with(".ie") || main.contains(".TH"), "{main}");
    let forget = fs::read_to_string(dir.join("vmrepo-forget.1")).unwrap();
    assert!(
        forget.contains("all or none") || forget.contains("All or none"),
        "{forget}"
    );
    let prune = fs::read_to_string(dir.join("vmrepo-prune.1")).unwrap();
    assert!(prune.contains("keep\\-daily"), "{prune}");
    // Without a directory: the main page on standard output.
    let r = vmrepo(["man"]);
    r.ok();
    assert!(r.stdout.contains(".TH"), "{}", r.stdout);
}
