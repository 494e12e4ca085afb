//! `vmrepo prune`: remove generations by a retention policy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json};
use vmrepo::maintain::prune::{prune as run_prune, PolicySource, PruneOptions};
use vmrepo::maintain::retention::{KeepWithin, Policy, PolicyFile};

use crate::cli::gc::{print_gc, RemovalArgs};

pub const HELP: &str = "Decide, for each VM, which generations a retention policy keeps and \
remove the others from the repository. A generation is kept if any rule keeps it: --keep-last N keeps \
the N newest; --keep-hourly/daily/weekly/monthly/yearly N keep the newest generation of each of the N \
most recent hours/days/ISO weeks/months/years that have one; --keep-within 10d keeps everything \
younger than the duration, measured back from the VM's newest generation (units y m w d h). Buckets \
are UTC unless --local-time. With VM names, only those VMs are considered. --policy FILE gives a \
default and per-VM policies instead (see docs/RETENTION.md); a VM the file has no policy for is never \
touched. Every generation is printed with keep/remove and the rules that kept it. Removing frees no \
space by itself: `vmrepo gc` (or --gc) deletes the data no remaining generation references. \
Needs the repository to itself.";

/// `vmrepo prune` arguments.
#[derive(Args)]
pub struct PruneArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Only these VMs (default: every VM).
    vms: Vec<String>,
    /// Keep the N newest generations.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest generation of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// ... of each of the last N days.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// ... of each of the last N months.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// ... of each of the last N years.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_yearly: u32,
    /// Keep everything younger than this, relative to the newest generation (10d, 2w, 1y6m, 36h).
    #[arg(long, value_name = "DURATION", value_parser = KeepWithin::parse)]
    keep_within: Option<KeepWithin>,
    /// Per-VM policies from a TOML file instead of --keep-* (see docs/RETENTION.md).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily",
        "keep_weekly", "keep_monthly", "keep_yearly", "keep_within"])]
    policy: Option<PathBuf>,
    /// Put generations into hours/days/weeks in the local time zone (TZ) instead of UTC.
    #[arg(long)]
    local_time: bool,
    /// Accept a policy that keeps nothing (removes every generation it applies to).
    #[arg(long)]
    allow_empty: bool,
    #[command(flatten)]
    removal: RemovalArgs,
}

/// Runs `vmrepo prune`.
pub fn run(a: PruneArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let policy = match &a.policy {
        Some(path) => PolicySource::File(PolicyFile::load(path)?),
        None => PolicySource::Rules(Policy {
            keep_last: a.keep_last,
            keep_hourly: a.keep_hourly,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
            keep_within: a.keep_within.clone(),
        }),
    };
    let r = &a.removal;
    let bar = r.bar();
    let repo = ctx.open_repo(&a.repo, r.lock_mode(), &bar)?;
    let opts = PruneOptions {
        vms: a.vms.clone(),
        policy,
        local_time: a.local_time,
        allow_empty: a.allow_empty,
        dry_run: r.dry_run,
    };
    let report =
        run_prune(&repo, &opts, &bar).context("prune failed; no generation was removed")?;
    let gc_report = r.gc_after(&repo, "prune", &bar)?;
    if r.json {
        print_json(&serde_json::json!({ "prune": report, "gc": gc_report }));
        return Ok(ExitCode::SUCCESS);
    }
    for vm in &report.vms {
        println!("{}: {}", vm.vm, vm.policy);
        if !vm.applied {
            continue;
        }
        for g in &vm.generations {
            if g.keep {
                println!("  keep    {}  {}", g.generation, g.reasons.join(", "));
            } else {
                println!("  remove  {}", g.generation);
            }
        }
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} generation(s), kept {}{}",
        report.removed,
        report.kept,
        if r.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    if report.removed > 0 {
        println!(
            "{} in {} object(s) is referenced by no remaining generation{}",
            human(report.bytes_unreferenced),
            report.objects_unreferenced,
            if gc_report.is_some() {
                ""
            } else {
                "; `vmrepo gc` returns it to the filesystem"
            }
        );
    }
    if let Some(g) = &gc_report {
        print_gc(g);
    }
    Ok(ExitCode::SUCCESS)
}
