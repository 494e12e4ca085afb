//! `vmrepo upgrade`: raise a repository to the newest format this build writes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::cli::context::Context;
use crate::cli::output::{print_json, Bar};
use vmrepo::maintain::upgrade::upgrade;
use vmrepo::repo::lock::LockMode;

pub const HELP: &str = "Raise the repository to the newest format this vmrepo writes, so that \
what is stored from now on can use it: since format 3, a night that changes a few chunks of a \
4 MiB piece of a disk stores its edits instead of the piece's whole chunk list (about 2 MB less \
a night on a 4 GiB VM with 2% churn); since format 4, a changed chunk is stored compressed \
against the chunk it replaces, so a night costs about the blocks the guest rewrote, not the \
chunks around them (about 8 MB less a night on that VM; see docs/FORMAT.md). Only the format number in config.toml \
changes, atomically; nothing stored is rewritten, and every generation stays as restorable as it \
was. A repository keeps the format `init` gave it until it is upgraded, because vmrepo builds that \
know only older formats refuse a newer one: upgrade once every host that uses the repository runs \
this version or a later one. Needs the repository to itself (it waits with --lock-wait).";

/// `vmrepo upgrade` arguments.
#[derive(Args)]
pub struct UpgradeArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Say what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vmrepo upgrade`.
pub fn run(a: UpgradeArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    let repo = ctx.open_repo(&a.repo, LockMode::for_changes(a.dry_run), &bar)?;
    let u = upgrade(&repo, a.dry_run)
        .with_context(|| format!("cannot upgrade {}; it is unchanged", a.repo.display()))?;
    if a.json {
        print_json(&serde_json::json!({ "upgrade": u, "dry_run": a.dry_run }));
    } else if !u.changed() {
        println!(
            "{} is already format {}: nothing to do",
            a.repo.display(),
            u.from
        );
    } else if a.dry_run {
        println!(
            "would upgrade {} from format {} to {} (dry run: nothing changed)",
            a.repo.display(),
            u.from,
            u.to
        );
    } else {
        println!(
            "upgraded {} from format {} to {}: vmrepo builds that know only format {} no longer \
             open it",
            a.repo.display(),
            u.from,
            u.to,
            u.from
        );
    }
    Ok(ExitCode::SUCCESS)
}
