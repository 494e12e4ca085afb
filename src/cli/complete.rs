//! Completing VM and generation names from the repository: the hidden `vmrepo __complete
//! --line LINE` that the completion scripts call with the command line up to the cursor, and
//! the shell glue added to the generated bash, zsh and fish scripts.
//!
//! The line is split at whitespace (no quoting). The repository is found as the command would
//! find it (the argument given, else `-R`, `VMREPO_REPOSITORY` or the config file), opened for
//! reading without waiting for a lock and without a passphrase prompt. Whatever goes wrong
//! prints nothing: a completion must never block or fail loudly.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Args;

use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::Bar;

/// `vmrepo __complete` arguments.
#[derive(Args)]
pub struct CompleteArgs {
    /// The command line up to the cursor.
    #[arg(long, allow_hyphen_values = true)]
    line: String,
}

/// What a command takes at a positional place.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Names {
    /// VM names.
    Vms,
    /// VM names, and a VM's generations once the word has an `@`.
    Generations,
}

/// What `command` takes as its positional argument number `n` (0 is the repository).
fn names_at(command: &str, n: usize) -> Option<Names> {
    match (command, n) {
        ("extract" | "serve-nbd" | "ls" | "cat" | "restore-file" | "diff", 1)
        | ("diff", 2)
        | ("mount", 2) => Some(Names::Generations),
        ("forget", 1..) | ("copy", 2..) => Some(Names::Generations),
        ("list" | "log", 1) | ("stats" | "prune", 1..) => Some(Names::Vms),
        _ => None,
    }
}

/// The candidates for the last word of `line`, one per line; nothing when there are none.
pub fn run(a: CompleteArgs, ctx: &Context, definition: &clap::Command) -> ExitCode {
    if let Some(words) = candidates(&a.line, ctx, definition) {
        for w in words {
            println!("{w}");
        }
    }
    ExitCode::SUCCESS
}

fn candidates(line: &str, ctx: &Context, definition: &clap::Command) -> Option<Vec<String>> {
    let mut words: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
    let current = if line.ends_with(char::is_whitespace) || words.is_empty() {
        String::new()
    } else {
        words.pop()?.to_string_lossy().into_owned()
    };
    if current.starts_with('-') {
        return None;
    }
    // With the default repository put where the command would put it.
    let words = crate::cli::default_repo::apply(words, definition).ok()?;
    let top = crate::cli::default_repo::positionals(&words, 1, definition);
    let &at = top.first()?;
    let command = words[at].to_string_lossy().into_owned();
    let sub = definition.find_subcommand(&command)?;
    let given = crate::cli::default_repo::positionals(&words, at + 1, sub);
    let names = names_at(&command, given.len())?;
    let repo = std::path::PathBuf::from(&words[*given.first()?]);
    let r = ctx
        .open_repo_for_completion(&repo, LockMode::Read, &Bar::new(false))
        .ok()?;
    let index = r.open_index().ok()?;
    let out: Vec<String> = match (names, current.split_once('@')) {
        (Names::Generations, Some((vm, _))) => index
            .generations(Some(vm))
            .ok()?
            .into_iter()
            .map(|g| g.name)
            .filter(|n| n.starts_with(&current))
            .collect(),
        _ => index
            .vms()
            .ok()?
            .into_iter()
            .map(|v| v.name)
            .filter(|n| n.starts_with(&current))
            .collect(),
    };
    Some(out)
}

/// Bash glue: clap's completion, then the names `vmrepo __complete` offers. Bash splits words
/// at `:` (COMP_WORDBREAKS), which generation times contain, so the word is taken from the line
/// and each name is shortened to what follows the word's last `:`.
pub const BASH_NAMES: &str = r#"
_vmrepo_with_names() {
    _vmrepo "$@"
    local line="${COMP_LINE:0:COMP_POINT}"
    local word="${line##*[[:space:]]}"
    local name strip=""
    [[ "$word" == *:* ]] && strip="${word%:*}:"
    while IFS= read -r name; do
        [[ -n "$name" ]] && COMPREPLY+=("${name#"$strip"}")
    done < <(vmrepo __complete --line "$line" 2>/dev/null)
}
complete -F _vmrepo_with_names -o bashdefault -o default vmrepo
"#;

/// Zsh glue, in place of the generated script's last lines (which bind `_vmrepo`): names first,
/// then clap's completion. The script runs either as an autoloaded `_vmrepo` (its first call
/// completes) or sourced; both bind the wrapper for the calls that follow.
pub const ZSH_NAMES: &str = r#"_vmrepo_names() {
    local -a names
    names=(${(f)"$(vmrepo __complete --line "${words[1,CURRENT]}" 2>/dev/null)"})
    (( $#names )) && compadd -Q -- $names
}
_vmrepo_with_names() {
    _vmrepo_names
    _vmrepo "$@"
}
compdef _vmrepo_with_names vmrepo
if [ "$funcstack[1]" = "_vmrepo" ]; then
    _vmrepo_with_names "$@"
fi
"#;

/// The line where the generated zsh script starts binding `_vmrepo`; [`ZSH_NAMES`] replaces it
/// and what follows.
pub const ZSH_BINDING: &str = "if [ \"$funcstack[1]\" = \"_vmrepo\" ]; then";

/// Fish glue: names added to what the generated script offers.
pub const FISH_NAMES: &str = r#"
complete -c vmrepo -a '(vmrepo __complete --line (commandline -cp | string collect) 2>/dev/null)'
"#;
