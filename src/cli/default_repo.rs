//! The default repository, so that daily commands need not repeat the path: `-R/--repo REPO`,
//! else `VMREPO_REPOSITORY`, else `repository = "..."` in the config file
//! (`$XDG_CONFIG_HOME/vmrepo/config.toml`, else `~/.config/vmrepo/config.toml`). When a command
//! that takes a repository is given none (its first argument is not a repository), the default
//! is put in its place before the command line is parsed.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Commands whose first positional argument is the repository (`key` has its own subcommands).
const TAKES_REPO: &[&str] = &[
    "init",
    "ingest",
    "list",
    "stats",
    "report",
    "extract",
    "mount",
    "serve-nbd",
    "ls",
    "cat",
    "restore-file",
    "diff",
    "log",
    "check",
    "prune",
    "forget",
    "gc",
    "upgrade",
    "copy",
    "import-ghettovcb",
];

/// The config file's path.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("vmrepo").join("config.toml"))
}

/// The config file's `repository`, if the file exists; an unreadable or invalid file is an
/// error naming it.
fn configured() -> Result<Option<OsString>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        repository: Option<PathBuf>,
    }
    let Some(path) = config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the config file {}: {e}",
                path.display()
            ))
        }
    };
    let c: Config = toml::from_str(&text).map_err(|e| {
        format!(
            "the config file {} is not valid (it may set `repository = \"PATH\"`): {e}",
            path.display()
        )
    })?;
    Ok(c.repository.map(PathBuf::into_os_string))
}

/// True when `arg` names a repository: an `s3://` URL, or a directory holding a config.toml.
fn is_repository(arg: &OsStr) -> bool {
    let s = arg.to_string_lossy();
    s.starts_with("s3://") || Path::new(arg).join("config.toml").is_file()
}

/// Long and short names of `cmd`'s options that take a value.
fn value_options(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for a in cmd.get_arguments().filter(|a| !a.is_positional()) {
        if a.get_action().takes_values() {
            if let Some(l) = a.get_long() {
                out.push(format!("--{l}"));
            }
            if let Some(s) = a.get_short() {
                out.push(format!("-{s}"));
            }
        }
    }
    out
}

/// The positional words of `args[from..]` as indices, skipping options of `cmd` and their
/// values.
pub fn positionals(args: &[OsString], from: usize, cmd: &clap::Command) -> Vec<usize> {
    let takes = value_options(cmd);
    let mut out = Vec::new();
    let mut i = from;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            out.extend(i + 1..args.len());
            break;
        }
        if a.starts_with('-') && a.len() > 1 {
            if !a.contains('=') && takes.iter().any(|t| *t == a) {
                i += 1;
            }
        } else {
            out.push(i);
        }
        i += 1;
    }
    out
}

/// `args` with the default repository put in as the repository argument where a command that
/// takes one was given none. `cmd` is the command-line definition.
pub fn apply(mut args: Vec<OsString>, cmd: &clap::Command) -> Result<Vec<OsString>, String> {
    // The subcommand: the first positional word after the global options.
    let top = positionals(&args, 1, cmd);
    let Some(&at) = top.first() else {
        return Ok(args);
    };
    let name = args[at].to_string_lossy().into_owned();
    let (sub, insert_at) = if name == "key" {
        let Some(key) = cmd.find_subcommand("key") else {
            return Ok(args);
        };
        match positionals(&args, at + 1, key).first() {
            Some(&k) => match key.find_subcommand(args[k].to_string_lossy().as_ref()) {
                Some(s) => (s, k + 1),
                None => return Ok(args),
            },
            None => return Ok(args),
        }
    } else if TAKES_REPO.contains(&name.as_str()) {
        (cmd.find_subcommand(&name).expect("listed"), at + 1)
    } else {
        return Ok(args);
    };
    // The flag (global: it may come anywhere), then the environment, then the config file.
    let mut flag = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        if let Some(v) = a.strip_prefix("--repo=") {
            flag = Some(OsString::from(v));
        } else if (a == "--repo" || a == "-R") && i + 1 < args.len() {
            flag = Some(args[i + 1].clone());
            i += 1;
        } else if let Some(v) = a.strip_prefix("-R").filter(|v| !v.is_empty()) {
            flag = Some(OsString::from(v));
        }
        i += 1;
    }
    let given = positionals(&args, insert_at, sub);
    let explicit = match given.first() {
        None => false,
        // init makes a repository: any path it is given is the one meant.
        Some(_) if name == "init" => true,
        // copy SRC DST: a single repository given is the destination.
        Some(_) if name == "copy" => given.get(1).is_some_and(|&i| is_repository(&args[i])),
        Some(&i) => is_repository(&args[i]),
    };
    if explicit {
        return Ok(args);
    }
    // Only now the environment and the config file: a command given its repository does not
    // depend on them (nor fail on a broken config file).
    let default = match flag {
        Some(f) => Some(f),
        None => match std::env::var_os("VMREPO_REPOSITORY").filter(|v| !v.is_empty()) {
            Some(e) => Some(e),
            None => configured()?,
        },
    };
    if let Some(default) = default {
        args.insert(insert_at, default);
    }
    Ok(args)
}
