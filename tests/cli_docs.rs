//! Shell completions and man pages are generated from the command definitions: they list every
//! command and option `--help` does, and bash accepts the script. In bash, zsh and fish, VM and
//! generation names are completed from the repository, including the default one, and never by a
//! prompt.

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

/// Runs bash completion of `line` (cursor at its end) with the script loaded, as bash would:
/// the words split at blanks and at `:`, the function `complete` names called. Returns what
/// bash offers in place of the last word.
fn bash_complete(script: &std::path::Path, line: &str, env: &[(&str, &str)]) -> Vec<String> {
    let program = format!(
        r#"source '{}'
COMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<< "$(sed 's/:/ : /g' <<< "$COMP_LINE")"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
f=$(complete -p vmrepo | sed 's/.*-F \([^ ]*\) .*/\1/')
"$f" vmrepo "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}" < /dev/null
printf '%s\n' "${{COMPREPLY[@]}}""#,
        script.display()
    );
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(program)
        .arg("bash")
        .arg(line)
        .env("PATH", path_with_vmrepo())
        .env_remove("VMREPO_PASSWORD")
        .env_remove("VMREPO_REPOSITORY")
        .envs(env.iter().copied())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_vm_and_generation_names_from_the_repository() {
    let t = tempfile::tempdir().unwrap();
    let repo = named_repo(t.path());
    let img = t.path().join("d.img");
    let script = t.path().join("vmrepo.bash");
    fs::write(
        &script,
        vmrepo(["completions", "bash"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let r = repo.display();

    assert_eq!(
        bash_complete(&script, &format!("vmrepo extract {r} w"), &[]),
        ["web01"]
    );
    assert_eq!(
        bash_complete(&script, &format!("vmrepo extract {r} web01@"), &[]),
        ["web01@2026-11-01T01:00:00Z", "web01@2026-11-02T01:00:00Z"]
    );
    // Past a `:`, bash replaces only what follows it.
    assert_eq!(
        bash_complete(
            &script,
            &format!("vmrepo forget {r} web01@2026-11-02T01:0"),
            &[]
        ),
        ["00:00Z"]
    );
    // An empty word: the options as well, then the names.
    let all = bash_complete(&script, &format!("vmrepo list {r} "), &[]);
    assert!(all.contains(&"--json".to_string()), "{all:?}");
    let names: Vec<_> = all.iter().filter(|w| !w.starts_with('-')).collect();
    assert_eq!(names, ["db01", "web01"]);
    // The default repository, when the command line names none.
    let env = [("VMREPO_REPOSITORY", r.to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(bash_complete(&script, "vmrepo stats d", &env), ["db01"]);
    // Where a command takes no name (extract's destination), none is offered.
    let dest = bash_complete(&script, &format!("vmrepo extract {r} web01 zz"), &[]);
    assert!(dest.is_empty(), "{dest:?}");

    // An encrypted repository without a passphrase at hand: nothing, and no prompt (stdin is
    // closed above, so a prompt would fail the run rather than wait).
    let enc = t.path().join("enc");
    let init = std::process::Command::new(BIN)
        .args([
            s("init"),
            p(&enc),
            s("--encryption"),
            s("aes-256-gcm"),
            s("--kdf-memory"),
            s("8"),
        ])
        .env("VMREPO_PASSWORD", "pw")
        .output()
        .unwrap();
    assert!(init.status.success());
    let ingest = std::process::Command::new(BIN)
        .args([s("ingest"), p(&enc), p(&img), s("--name"), s("secret01")])
        .env("VMREPO_PASSWORD", "pw")
        .output()
        .unwrap();
    assert!(ingest.status.success());
    let e = enc.display();
    assert!(bash_complete(&script, &format!("vmrepo extract {e} s"), &[]).is_empty());
    assert_eq!(
        bash_complete(
            &script,
            &format!("vmrepo extract {e} s"),
            &[("VMREPO_PASSWORD", "pw")]
        ),
        ["secret01"]
    );
}

/// A repository with VMs web01 (two generations) and db01, for the completion tests.
fn named_repo(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("d.img");
    sparse_image(&img, 1 << 20, &[(0, 256 << 10, 1)]);
    let repo = init_repo(dir);
    ingest_at(&repo, &img, "web01", "2026-11-01T01:00:00Z");
    ingest_at(&repo, &img, "web01", "2026-11-02T01:00:00Z");
    ingest_at(&repo, &img, "db01", "2026-11-02T02:00:00Z");
    repo
}

/// The directory of the binary under test, for PATH: the scripts call `vmrepo`.
fn path_with_vmrepo() -> String {
    let dir = std::path::Path::new(BIN).parent().unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn fish_completes_vm_and_generation_names_from_the_repository() {
    let t = tempfile::tempdir().unwrap();
    let repo = named_repo(t.path());
    let script = t.path().join("vmrepo.fish");
    fs::write(
        &script,
        vmrepo(["completions", "fish"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let complete = |line: &str| -> Vec<String> {
        let out = std::process::Command::new("fish")
            .arg("-c")
            .arg(format!(
                "source '{}'; complete -C '{line}'",
                script.display()
            ))
            .env("PATH", path_with_vmrepo())
            .current_dir(t.path())
            .output()
            .expect("run fish (apt-get install -y fish)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let r = repo.display();
    assert_eq!(complete(&format!("vmrepo extract {r} w")), ["web01"]);
    assert_eq!(
        complete(&format!("vmrepo forget {r} web01@")),
        ["web01@2026-11-01T01:00:00Z", "web01@2026-11-02T01:00:00Z"]
    );
}

/// zsh completes in its line editor only: an interactive zsh in a pseudo-terminal (zsh/zpty)
/// gets the line and a TAB, then prints what the line became.
#[test]
fn zsh_completes_generation_names_from_the_repository() {
    let t = tempfile::tempdir().unwrap();
    let repo = named_repo(t.path());
    let functions = t.path().join("zfunc");
    fs::create_dir(&functions).unwrap();
    fs::write(
        functions.join("_vmrepo"),
        vmrepo(["completions", "zsh"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let driver = r#"
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1='> '; fpath=($ZDIR \$fpath); autoload -U compinit; compinit -u -D"
zpty -w -n z "$ZLINE"$'\t'
local all="" chunk
for i in {1..200}; do
    while zpty -r -t z chunk; do all+=$chunk; done
    [[ $all == *$ZWANT* ]] && break
    sleep 0.05
done
zpty -w z $'\C-aprint -r -- BUF='
for i in {1..200}; do
    while zpty -r -t z chunk; do all+=$chunk; done
    [[ $all == *BUF=vmrepo* ]] && break
    sleep 0.05
done
zpty -d z
print -r -- "$all"
"#;
    let line = format!("vmrepo extract {} web01@", repo.display());
    let out = std::process::Command::new("zsh")
        .arg("-f")
        .arg("-c")
        .arg(driver)
        .env("PATH", path_with_vmrepo())
        .env("ZDIR", &functions)
        .env("ZLINE", &line)
        .env("ZWANT", "2026-11-0")
        .output()
        .expect("run zsh (apt-get install -y zsh)");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let want = format!("BUF={line}2026-11-0");
    assert!(text.contains(&want), "{want} not in: {text}");
}
