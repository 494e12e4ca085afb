//! Command-line front ends of the maintenance commands (prune, gc, import-ghettovcb, repair):
//! their arguments, help texts and output.

pub mod inspect;
pub mod keys;
pub mod passphrase;
pub mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use jiff::tz::TimeZone;

use vmrepo::maintain::check::CheckReport;
use vmrepo::maintain::gc::{gc as run_gc, GcOptions, GcReport};
use vmrepo::maintain::prune::{prune as run_prune, PolicySource, PruneOptions};
use vmrepo::maintain::repair::RepairReport;
use vmrepo::maintain::retention::{KeepWithin, Policy, PolicyFile};
use vmrepo::repo::lock::LockMode;

use crate::{human, open_repo, print_json, Bar};

/// Parses `--time`: an RFC 3339 instant (`2026-09-01T01:30:00Z`, or with an offset).
pub fn parse_time(s: &str) -> Result<jiff::Timestamp, String> {
    s.parse::<jiff::Timestamp>().map_err(|e| {
        format!("{s:?} is not a time: give UTC like 2026-09-01T01:30:00Z or an offset like 2026-09-01T03:30:00+02:00 ({e})")
    })
}

pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (e.g. 20%)"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v / 100.0)
}

pub const PRUNE_HELP: &str = "Decide, for each VM, which generations a retention policy keeps and \
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
    /// Show what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run gc afterwards to free the space.
    #[arg(long)]
    gc: bool,
    #[command(flatten)]
    repack: RepackArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vmrepo prune`.
pub fn prune(a: PruneArgs, lock_wait: u64) -> anyhow::Result<ExitCode> {
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
    let bar = Bar::new(!a.json);
    let mode = if a.dry_run {
        LockMode::Read
    } else {
        LockMode::Exclusive
    };
    let repo = open_repo(&a.repo, mode, lock_wait, &bar)?;
    let opts = PruneOptions {
        vms: a.vms.clone(),
        policy,
        local_time: a.local_time,
        allow_empty: a.allow_empty,
        dry_run: a.dry_run,
    };
    let report =
        run_prune(&repo, &opts, &bar).context("prune failed; no generation was removed")?;
    let gc_report =
        if a.gc && !a.dry_run {
            Some(run_gc(&repo, &a.repack.gc_options(false), &bar).context(
                "gc after prune failed (the prune itself is done; run `vmrepo gc` again)",
            )?)
        } else {
            None
        };
    if a.json {
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
    let verb = if a.dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {} generation(s), kept {}{}",
        report.removed,
        report.kept,
        if a.dry_run {
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

pub const GC_HELP: &str = "Find the data no generation references any more (after prune, or left \
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
    fn gc_options(&self, dry_run: bool) -> GcOptions {
        GcOptions {
            dry_run,
            repack_threshold: self.repack_threshold,
            max_unused: self.max_unused,
        }
    }
}

/// Runs `vmrepo gc`.
pub fn gc(a: GcArgs, lock_wait: u64) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    let mode = if a.dry_run {
        LockMode::Read
    } else {
        LockMode::Exclusive
    };
    let repo = open_repo(&a.repo, mode, lock_wait, &bar)?;
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

fn print_gc(r: &GcReport) {
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
    for g in &r.adopted {
        println!("  listed generation {g}: it was in the data files but not in the index");
    }
    for k in &r.kept_unindexed {
        println!("  kept data file not in the index: {k}");
    }
    for d in &r.damaged_generations {
        println!("  note: damaged generation {d}: its unreadable parts could not be followed");
    }
    for p in &r.problems {
        println!("  PROBLEM {p}");
    }
}

/// Prints check's problems, damaged generations and notes.
pub fn print_check_findings(report: &CheckReport) {
    for p in &report.problems {
        println!("PROBLEM  {p}");
    }
    for d in &report.damaged {
        println!("DAMAGED  {}: {}", d.generation, d.parts.join(", "));
        for p in &d.problems {
            println!("         {p}");
        }
    }
    for n in &report.notes {
        println!("note     {n}");
    }
}

/// Prints a repair report; exit 0 when nothing is damaged any more.
pub fn print_repair(r: &RepairReport, json: bool) -> anyhow::Result<ExitCode> {
    let ok = r.check.ok();
    if json {
        print_json(&serde_json::json!({ "ok": ok, "repair": r }));
    } else {
        if let (Some(why), Some(rb)) = (&r.rebuild_reason, &r.rebuilt) {
            println!(
                "index rebuilt from {} data files ({}): {} objects, {} generations",
                rb.packs, why, rb.objects, rb.generations
            );
        }
        for p in &r.adopted_packs {
            println!("indexed  data file {p}: it was not in the index");
        }
        for g in &r.adopted {
            println!("listed   {g}: it was in the data files but not in the index");
        }
        for p in &r.packs_forgotten {
            println!("forgot   data file {p}: it is gone");
        }
        for p in &r.packs_truncated {
            println!("fixed    data file {p}: recorded its real (truncated) length");
        }
        if r.objects_dropped > 0 {
            println!(
                "dropped  {} index entries whose data is missing or corrupt",
                r.objects_dropped
            );
        }
        for (g, d) in &r.damaged {
            println!("DAMAGED  {g}: {d}");
        }
        for g in &r.healed {
            println!("healed   {g}");
        }
        print_check_findings(&r.check);
        if ok {
            println!("ok: the repository is consistent and no generation is damaged");
        } else if !r.damaged.is_empty() {
            println!(
                "repaired: {} generation(s) are marked damaged. Ingest their VMs again to store the \
                 lost data again (they heal if the data is still the same), or prune them; `vmrepo \
                 extract --allow-damaged` restores what is left.",
                r.damaged.len()
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub const IMPORT_HELP: &str = "Import a ghettoVCB backup rotation: BACKUP_DIR holds folders named \
VM-YYYY-MM-DD_HH-MM-SS (each with the .vmx, .nvram and the disks as ghettoVCB copied them) or .gz \
archives of such folders (ghettoVCB's compressed mode). Each becomes a generation of the VM at its \
folder date, oldest first, read as UTC (ESXi hosts keep UTC) unless --local-time; archives are \
unpacked one at a time under --tmp-dir. Backups already in the repository are skipped, so the import \
can be re-run. At the end it prints how much space the rotation took and how much the repository \
stored for it.";

/// `vmrepo import-ghettovcb` arguments.
#[derive(Args)]
pub struct ImportArgs {
    /// Repository directory.
    repo: PathBuf,
    /// The ghettoVCB backup directory of one VM (holding the dated folders).
    backup_dir: PathBuf,
    /// VM name for every backup (default: the folder name before the date).
    #[arg(long)]
    name: Option<String>,
    /// Read folder dates in the local time zone (TZ) instead of UTC.
    #[arg(long)]
    local_time: bool,
    /// Where .gz archives are unpacked (needs room for one backup; default: the system's).
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vmrepo import-ghettovcb`.
pub fn import_ghettovcb(a: ImportArgs, lock_wait: u64) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    let repo = open_repo(&a.repo, LockMode::Shared, lock_wait, &bar)?;
    let tz = if a.local_time {
        TimeZone::system()
    } else {
        TimeZone::UTC
    };
    let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let report =
        vmrepo::ingest::ghettovcb::import(&repo, &a.backup_dir, a.name.as_deref(), &tz, &tmp, &bar)
            .with_context(|| format!("import of {} failed", a.backup_dir.display()))?;
    let failed = report.backups.iter().filter(|b| b.failed).count();
    if a.json {
        print_json(&report);
    } else {
        for b in &report.backups {
            let what = match (&b.ingest, &b.message) {
                (Some(r), _) => format!(
                    "imported as {}: read {}, stored {}",
                    r.generation,
                    human(r.stats.bytes_read),
                    human(r.stats.bytes_stored)
                ),
                (None, Some(m)) if b.failed => format!("FAILED: {m}"),
                (None, Some(m)) => format!("skipped: {m}"),
                (None, None) => "skipped".into(),
            };
            println!("{}  {what}", b.backup.path.display());
        }
        let imported = report.backups.iter().filter(|b| b.ingest.is_some()).count();
        println!(
            "imported {imported} backup(s), skipped {}, failed {failed}",
            report.backups.len() - imported - failed
        );
        if imported > 0 {
            println!(
                "the rotation used {} on disk for them; the repository stored {} ({:.1}x smaller)",
                human(report.rotation_bytes),
                human(report.stored_bytes),
                report.rotation_bytes as f64 / report.stored_bytes.max(1) as f64
            );
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
