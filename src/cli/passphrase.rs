//! Where the CLI gets passphrases: a file, a command, an environment variable, or a prompt on
//! the terminal — never a plain command-line argument (it would show in `ps` and shell history).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use zeroize::{Zeroize, Zeroizing};

/// One way to get a passphrase, in order of precedence: file, command, environment, prompt.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// Read the passphrase from this file (first line).
    pub file: Option<PathBuf>,
    /// Run this through `sh -c` and use the first line of its output.
    pub command: Option<String>,
    /// The environment variable to read (`VMREPO_PASSWORD`, `VMREPO_NEW_PASSWORD`).
    pub env: &'static str,
    /// What to call it at the prompt and in errors.
    pub what: &'static str,
}

fn first_line(s: &str) -> Zeroizing<String> {
    Zeroizing::new(s.lines().next().unwrap_or("").to_string())
}

impl Source {
    /// The repository passphrase: `--password-file`, `--password-command`, `VMREPO_PASSWORD`,
    /// else a prompt.
    pub fn repository(file: Option<PathBuf>, command: Option<String>) -> Source {
        Source {
            file,
            command,
            env: "VMREPO_PASSWORD",
            what: "passphrase",
        }
    }

    /// Gets the passphrase from a file, a command or the environment, never from a prompt.
    pub fn get_without_prompt(&self) -> anyhow::Result<Zeroizing<String>> {
        if self.file.is_none() && self.command.is_none() && std::env::var_os(self.env).is_none() {
            bail!("no {} without a prompt", self.what);
        }
        self.get(false)
    }

    /// Gets the passphrase; `confirm` asks twice at a prompt (for a new passphrase).
    pub fn get(&self, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
        let pass = if let Some(f) = &self.file {
            let text =
                Zeroizing::new(std::fs::read_to_string(f).with_context(|| {
                    format!("cannot read the {} from {}", self.what, f.display())
                })?);
            first_line(&text)
        } else if let Some(cmd) = &self.command {
            let mut out = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .output()
                .with_context(|| format!("cannot run the {} command {cmd:?}", self.what))?;
            if !out.status.success() {
                bail!(
                    "the {} command {cmd:?} failed ({}): {}",
                    self.what,
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let text = Zeroizing::new(String::from_utf8_lossy(&out.stdout).into_owned());
            out.stdout.zeroize();
            first_line(&text)
        } else if let Ok(v) = std::env::var(self.env) {
            Zeroizing::new(v)
        } else if std::io::stdin().is_terminal() {
            let p = Zeroizing::new(
                rpassword::prompt_password(format!("{}: ", capitalized(self.what)))
                    .context("cannot read the passphrase from the terminal")?,
            );
            if confirm {
                let again = Zeroizing::new(
                    rpassword::prompt_password(format!("Repeat the {}: ", self.what))
                        .context("cannot read the passphrase from the terminal")?,
                );
                if *again != *p {
                    bail!("the two {}s differ; nothing was changed", self.what);
                }
            }
            p
        } else {
            bail!(
                "no {} given: set {}, or pass a file or command option (see --help)",
                self.what,
                self.env
            );
        };
        if pass.is_empty() {
            bail!("the {} is empty", self.what);
        }
        Ok(pass)
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
