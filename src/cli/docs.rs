//! `vmrepo completions SHELL` and `vmrepo man [DIR]`: shell completion scripts and man pages,
//! generated from the command-line definition itself, so they never disagree with `--help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

pub const COMPLETIONS_HELP: &str = "Print a completion script for SHELL on standard output. \
Install it where your shell looks, for example:\n  vmrepo completions bash > \
/etc/bash_completion.d/vmrepo\n  vmrepo completions zsh > \"${fpath[1]}/_vmrepo\"\n  vmrepo \
completions fish > ~/.config/fish/completions/vmrepo.fish\nCommands and options are completed \
in every shell. In bash, zsh and fish, VM names and generations (type VM@ first) are completed from the \
repository on the command line, or the default one (-R, VMREPO_REPOSITORY, the config file); an \
encrypted repository's names need its passphrase from VMREPO_PASSWORD, --password-file or \
--password-command, since a completion never prompts.";

pub const MAN_HELP: &str = "Write man pages generated from the commands' help: vmrepo.1 and \
one vmrepo-COMMAND.1 per command, into DIR (created if missing), for example \
/usr/local/share/man/man1. Without DIR, print vmrepo.1 on standard output (`vmrepo man | man -l -`).";

/// A shell to complete in.
#[derive(Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
}

/// `vmrepo completions` arguments.
#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell the script is for.
    shell: Shell,
}

/// `vmrepo man` arguments.
#[derive(Args)]
pub struct ManArgs {
    /// Directory to write the pages into (default: print vmrepo.1).
    dir: Option<PathBuf>,
}

/// Prints the completion script of `cmd` for the shell asked.
pub fn completions(a: CompletionsArgs, mut cmd: clap::Command) -> anyhow::Result<ExitCode> {
    use clap_complete::Shell as S;
    let shell = match a.shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
        Shell::Elvish => S::Elvish,
        Shell::Powershell => S::PowerShell,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "vmrepo", &mut out);
    let script = String::from_utf8_lossy(&out);
    use crate::cli::complete::{BASH_NAMES, FISH_NAMES, ZSH_BINDING, ZSH_NAMES};
    match a.shell {
        Shell::Bash => print!("{script}{BASH_NAMES}"),
        Shell::Fish => print!("{script}{FISH_NAMES}"),
        Shell::Zsh => {
            let binding = script
                .rfind(ZSH_BINDING)
                .context("the generated zsh script has no binding to replace")?;
            print!("{}{ZSH_NAMES}", &script[..binding]);
        }
        Shell::Elvish | Shell::Powershell => print!("{script}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the man pages of `cmd` into the directory asked, or prints the main one.
pub fn man(a: ManArgs, cmd: clap::Command) -> anyhow::Result<ExitCode> {
    let Some(dir) = a.dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .context("render the man page")?;
        print!("{}", String::from_utf8_lossy(&out));
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let mut written = 0;
    write_pages(&cmd, &dir, "vmrepo", &mut written)?;
    println!("wrote {written} man page(s) into {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `cmd` as `name.1`, then one per subcommand (`name-sub.1`), recursively.
fn write_pages(
    cmd: &clap::Command,
    dir: &Path,
    name: &str,
    written: &mut u32,
) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("render the man page {name}.1"))?;
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, &format!("{name}-{}", sub.get_name()), written)?;
    }
    Ok(())
}
