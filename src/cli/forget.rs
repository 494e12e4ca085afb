//! `vmrepo forget`: remove generations named one by one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::cli::context::Context;
use crate::cli::gc::{print_gc, RemovalArgs};
use crate::cli::output::{human, print_json};
use vmrepo::maintain::prune::forget as run_forget;

pub const HELP: &str = "Remove the named generations from the repository: a night that should \
not be kept (it captured a broken VM, or data that must go). Each GENERATION is VM@TIME as `vmrepo \
list REPO VM` shows it, or VM@-N (the N-th before the newest; counted before anything is removed); a \
bare VM name is refused. All or none: if one name matches no generation, nothing is removed. Like \
prune, the removal is recorded in the repository (a tombstone), so an index rebuilt later does not \
bring the generations back, and frees no space by itself: `vmrepo gc` (or --gc) deletes the data no \
remaining generation references. Needs the repository to itself.";

/// `vmrepo forget` arguments.
#[derive(Args)]
pub struct ForgetArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Generations to remove: VM@TIME or VM@-N.
    #[arg(required = true, value_name = "GENERATION")]
    generations: Vec<String>,
    #[command(flatten)]
    removal: RemovalArgs,
}

/// Runs `vmrepo forget`.
pub fn run(a: ForgetArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let r = &a.removal;
    let bar = r.bar();
    let repo = ctx.open_repo(&a.repo, r.lock_mode(), &bar)?;
    let report = run_forget(&repo, &a.generations, r.dry_run, &bar)
        .context("forget failed; no generation was removed")?;
    let gc_report = r.gc_after(&repo, "forget", &bar)?;
    if r.json {
        print_json(&serde_json::json!({ "forget": report, "gc": gc_report }));
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for g in &report.removed {
        println!("{verb}  {g}");
    }
    println!(
        "{} in {} object(s) is referenced by no remaining generation{}",
        human(report.bytes_unreferenced),
        report.objects_unreferenced,
        if r.dry_run {
            " (dry run: nothing changed)"
        } else if gc_report.is_some() {
            ""
        } else {
            "; `vmrepo gc` returns it to the filesystem"
        }
    );
    if let Some(g) = &gc_report {
        print_gc(g);
    }
    Ok(ExitCode::SUCCESS)
}
