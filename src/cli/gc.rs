//! `vmrepo gc`: delete unreferenced data and compact half-empty data files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};
use vmrepo::maintain::gc::{gc as run_gc, GcOptions, GcReport};
use vmrepo::repo::lock::LockMode;

use crate::cli::parse_percent;

pub const HELP: &str = "Find the data no generation references any more (after prune, or left \
by interrupted ingests) and delete it: data files holding nothing live are deleted, data files whose \
live share is below --repack-threshold are rewritten without the dead part, and then the emptiest \
remaining ones are rewritten until the unreferenced bytes left are at most --max-unused of the live \
data (the rest keep their dead bytes until a later gc). Only metadata is read to find what is live; \
rewritten data is verified on the way. gc needs the repository to itself: it waits for running \
ingests (with --lock-wait) and they for it, so an ingest never reuses data gc is deleting. A gc \
killed at any point leaves every kept generation whole; run it again to finish.";

/// `vmrepo gc` arguments.
#[derive(Args)]
pub struct GcArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Show what would be deleted and rewritten; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    repack: RepackArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// How gc compacts data files (`vmrepo gc` and `vmrepo prune --gc`).
#[derive(Args)]
pub struct RepackArgs {
    /// gc: rewrite data files whose live part is below this share of the file.
    #[arg(long, value_name = "PERCENT", default_value = "20%", value_parser = parse_percent)]
    repack_threshold: f64,
    /// gc: then rewrite the emptiest data files until unreferenced bytes are at most this share
    /// of the live data (100% turns this off).
    #[arg(long, value_name = "PERCENT", default_value = "5%", value_parser = parse_percent)]
    max_unused: f64,
}

impl RepackArgs {
    pub fn gc_options(&self, dry_run: bool) -> GcOptions {
        GcOptions {
            dry_run,
            repack_threshold: self.repack_threshold,
            max_unused: self.max_unused,
        }
    }
}

/// What `prune` and `forget` share: a dry run, gc afterwards, and JSON output.
#[derive(Args)]
pub struct RemovalArgs {
    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run gc afterwards to free the space.
    #[arg(long)]
    pub gc: bool,
    #[command(flatten)]
    pub repack: RepackArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl RemovalArgs {
    /// The progress bar (none with --json).
    pub fn bar(&self) -> Bar {
        Bar::new(!self.json)
    }

    /// The lock the command takes: shared for a dry run.
    pub fn lock_mode(&self) -> LockMode {
        LockMode::for_changes(self.dry_run)
    }

    /// Runs gc after the removal `command` made, when --gc asks for it (never in a dry run).
    pub fn gc_after(
        &self,
        repo: &vmrepo::repo::Repository,
        command: &str,
        bar: &Bar,
    ) -> anyhow::Result<Option<GcReport>> {
        if !self.gc || self.dry_run {
            return Ok(None);
        }
        let report = run_gc(repo, &self.repack.gc_options(false), bar).with_context(|| {
            format!(
                "gc after {command} failed (the generations are removed; run `vmrepo gc` again)"
            )
        })?;
        Ok(Some(report))
    }
}

/// Runs `vmrepo gc`.
pub fn run(a: GcArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    let repo = ctx.open_repo(&a.repo, LockMode::for_changes(a.dry_run), &bar)?;
    let report = run_gc(&repo, &a.repack.gc_options(a.dry_run), &bar)
        .context("gc failed; every kept generation is intact")?;
    if a.json {
        print_json(&report);
    } else {
        print_gc(&report);
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn print_gc(r: &GcReport) {
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "gc{}: {} generations keep {} objects; {} objects ({}) are unreferenced",
        if r.dry_run { " (dry run)" } else { "" },
        r.generations,
        r.objects_live,
        r.objects_dead,
        human(r.bytes_dead)
    );
    println!(
        "  data files: {} {would}deleted, {} {would}rewritten into {} ({} copied), {} left-over {would}deleted",
        r.packs_deleted,
        r.packs_rewritten,
        r.packs_written,
        human(r.bytes_copied),
        r.orphan_packs
    );
    println!(
        "  {} {}returned to the filesystem; {} unreferenced left in data files not worth rewriting",
        human(r.bytes_freed),
        if r.dry_run { "would be " } else { "" },
        human(r.bytes_left)
    );
    println!(
        "  read {} of metadata to find what is live, in {:.1} s",
        human(r.metadata_read),
        r.seconds
    );
    if let Some(c) = &r.descriptions {
        println!(
            "  pack descriptions compacted: {} pack(s) in {} object(s), {} old object(s) removed",
            c.packs, c.written, c.removed
        );
    }
    for g in &r.adopted {
        println!("  listed generation {g}: it was in the data files but not in the index");
    }
    for k in &r.kept_unindexed {
        println!("  kept data file not in the index: {k}");
    }
    for k in &r.kept_for_unlisted {
        println!("  kept data file as it is: {k}");
    }
    for d in &r.damaged_generations {
        println!("  note: damaged generation {d}: its unreadable parts could not be followed");
    }
    for p in &r.problems {
        println!("  PROBLEM {p}");
    }
}
