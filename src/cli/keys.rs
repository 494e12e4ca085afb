//! `vmrepo key`: the passphrases (key files) of an encrypted repository, and exporting the
//! master key for safekeeping.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use vmrepo::backend::Backend;
use vmrepo::repo::config::Config;
use vmrepo::repo::keyfile::{self, ExportedKey, KdfCost};
use vmrepo::repo::lock::{lock_keys, LockMode};

use super::passphrase::Source;
use crate::cli::context::Context;
use crate::cli::output::{print_json, Bar};

pub const HELP: &str = "Manage the passphrases of an encrypted repository. Each passphrase is a \
key file in REPO/keys/ holding the repository's random master key, wrapped with a key derived from \
the passphrase by argon2id; any one of them opens the repository. Losing every passphrase (and any \
exported master key) means losing the data: nobody can recover it. New passphrases come from \
VMREPO_NEW_PASSWORD, --new-password-file, --new-password-command or a prompt; the current one from \
VMREPO_PASSWORD, --password-file, --password-command or a prompt.";

/// New-passphrase options.
#[derive(Args, Clone)]
pub struct NewPass {
    /// Read the new passphrase from this file (first line).
    #[arg(long, value_name = "FILE")]
    new_password_file: Option<PathBuf>,
    /// Get the new passphrase from this command's output (first line).
    #[arg(long, value_name = "CMD")]
    new_password_command: Option<String>,
    /// argon2id memory for the new key file, in MiB (1 to 4096).
    #[arg(long, value_name = "MIB", default_value_t = KdfCost::default().memory_kib >> 10,
          value_parser = clap::value_parser!(u32).range(1..=(KdfCost::MAX_MEMORY_KIB >> 10) as i64))]
    kdf_memory: u32,
}

impl NewPass {
    fn source(&self) -> Source {
        Source {
            file: self.new_password_file.clone(),
            command: self.new_password_command.clone(),
            env: "VMREPO_NEW_PASSWORD",
            what: "new passphrase",
        }
    }

    fn cost(&self) -> KdfCost {
        KdfCost {
            memory_kib: self.kdf_memory.max(1) << 10,
            ..KdfCost::default()
        }
    }
}

/// `vmrepo key` subcommands.
#[derive(Subcommand)]
pub enum KeyCommand {
    /// List the key files (one per passphrase).
    List {
        /// Repository directory.
        repo: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase (unlocking with a current one, or with an exported master key).
    Add {
        /// Repository directory.
        repo: PathBuf,
        /// A note to tell keys apart (`offsite`, `alice`).
        #[arg(long, default_value = "")]
        label: String,
        /// Use a master key written by `vmrepo key export` instead of a current passphrase
        /// (how access is regained when every passphrase is lost).
        #[arg(long, value_name = "FILE")]
        from_master_key: Option<PathBuf>,
        #[command(flatten)]
        new: NewPass,
    },
    /// Remove a key file (never the last one, nor the one used to unlock).
    Remove {
        /// Repository directory.
        repo: PathBuf,
        /// Key id (see `vmrepo key list`).
        id: String,
    },
    /// Change the passphrase that unlocks: add a key with the new one, then remove the old.
    Passwd {
        /// Repository directory.
        repo: PathBuf,
        #[command(flatten)]
        new: NewPass,
    },
    /// Write the master key (for safekeeping offline: whoever holds it can read every backup).
    Export {
        /// Repository directory.
        repo: PathBuf,
        /// Write to this file (created with mode 0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// The repository's backend and its configuration, which must say it is encrypted.
fn need_encrypted(
    repo: &std::path::Path,
    ctx: &Context,
) -> anyhow::Result<(std::sync::Arc<dyn Backend>, Config)> {
    let backend = vmrepo::backend::open(repo, &ctx.remote)?;
    let config = Config::load(&*backend)?;
    if !config.encrypted() {
        bail!(
            "repository {} is not encrypted: it has no keys (create an encrypted one with \
             `vmrepo init --encryption aes-256-gcm`)",
            repo.display()
        );
    }
    Ok((backend, config))
}

/// Runs `vmrepo key ...`.
pub fn run(cmd: KeyCommand, ctx: &Context) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(false);
    match cmd {
        KeyCommand::List { repo, json } => {
            let (backend, _) = need_encrypted(&repo, ctx)?;
            let keys = keyfile::list(&*backend)?;
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({"id": k.id, "created": k.created, "label": k.label,
                            "kdf": k.kdf, "cost": k.cost})
                    })
                    .collect();
                print_json(&v);
            } else {
                println!("{:<18} {:<22} {:<12} KDF", "ID", "CREATED", "LABEL");
                for k in &keys {
                    println!(
                        "{:<18} {:<22} {:<12} argon2id {} MiB, {} passes",
                        k.id,
                        k.created,
                        k.label,
                        k.cost.memory_kib >> 10,
                        k.cost.iterations
                    );
                }
            }
        }
        KeyCommand::Add {
            repo,
            label,
            from_master_key,
            new,
        } => {
            let (backend, config) = need_encrypted(&repo, ctx)?;
            let master = match from_master_key {
                Some(path) => {
                    let text = Zeroizing::new(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?,
                    );
                    let m = ExportedKey::parse(&path, &text, &config.repository_id)?;
                    vmrepo::repo::verify_master_key(&repo, &ctx.remote, &m)
                        .context("this master key does not decrypt the repository's data")?;
                    m
                }
                None => {
                    // Unlock with a current passphrase (proves the caller may add one).
                    let r = ctx.open_repo(&repo, LockMode::Shared, &bar)?;
                    drop(r);
                    let pass = ctx.passphrase()?;
                    keyfile::unlock(&*backend, &config.repository_id, &pass)?.0
                }
            };
            let pass = new.source().get(true)?;
            let k = keyfile::create(
                &*backend,
                &config.repository_id,
                &master,
                &pass,
                new.cost(),
                &label,
            )?;
            println!("added key {} to {}", k.id, repo.display());
        }
        KeyCommand::Remove { repo, id } => {
            let (backend, _) = need_encrypted(&repo, ctx)?;
            let r = ctx.open_repo(&repo, LockMode::Shared, &bar)?;
            if r.key_id() == Some(id.as_str()) {
                bail!(
                    "key {id} is the one your passphrase opened; remove it with another passphrase, \
                     or use `vmrepo key passwd` to replace it"
                );
            }
            let _keys = lock_keys(
                &*backend,
                std::time::Duration::from_secs(ctx.lock_wait),
                &|m| eprintln!("{m}"),
            )?;
            keyfile::remove(&*backend, &id)?;
            println!("removed key {id} from {}", repo.display());
        }
        KeyCommand::Passwd { repo, new } => {
            let (backend, config) = need_encrypted(&repo, ctx)?;
            let r = ctx.open_repo(&repo, LockMode::Shared, &bar)?;
            let old = r.key_id().expect("encrypted").to_string();
            drop(r);
            let pass = ctx.passphrase()?;
            let (master, _) = keyfile::unlock(&*backend, &config.repository_id, &pass)?;
            let newpass = new.source().get(true)?;
            // The new key file is written and the old one removed under the lock a removal
            // takes: another removal never counts the old key as the one that stays.
            let _keys = lock_keys(
                &*backend,
                std::time::Duration::from_secs(ctx.lock_wait),
                &|m| eprintln!("{m}"),
            )?;
            let k = keyfile::create(
                &*backend,
                &config.repository_id,
                &master,
                &newpass,
                new.cost(),
                "",
            )?;
            keyfile::remove(&*backend, &old)?;
            println!(
                "passphrase changed: key {old} replaced by {} in {}",
                k.id,
                repo.display()
            );
        }
        KeyCommand::Export { repo, output } => {
            if let Some(path) = &output {
                // Beside the data it opens, the key would defeat the encryption for anyone
                // who copies the repository.
                vmrepo::repo::refuse_inside(&repo, path, "the key file")?;
            }
            let (backend, config) = need_encrypted(&repo, ctx)?;
            drop(ctx.open_repo(&repo, LockMode::Shared, &bar)?);
            let pass = ctx.passphrase()?;
            let (master, _) = keyfile::unlock(&*backend, &config.repository_id, &pass)?;
            let e = ExportedKey {
                kind: "vmrepo master key".into(),
                repository_id: config.repository_id.clone(),
                master_key: hex::encode(&master[..]),
            };
            let text = Zeroizing::new(serde_json::to_string_pretty(&e)? + "\n");
            match output {
                Some(path) => {
                    // All or nothing, mode 0600, never through a link or over an existing file.
                    vmrepo::restore::safe_fs::write_new_file(&path, text.as_bytes(), 0o600)?;
                    eprintln!(
                        "wrote the master key of {} to {}: keep it offline; whoever holds it can \
                         read every backup",
                        repo.display(),
                        path.display()
                    );
                }
                None => print!("{}", *text),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
