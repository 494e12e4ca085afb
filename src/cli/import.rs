//! `vmrepo import-ghettovcb`: a ghettoVCB rotation as dated generations.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};
use jiff::tz::TimeZone;
use vmrepo::repo::lock::LockMode;

pub const HELP: &str = "Import a ghettoVCB backup rotation: BACKUP_DIR holds folders named \
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
pub fn run(a: ImportArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    let repo = ctx.open_repo(&a.repo, LockMode::Shared, &bar)?;
    let tz = if a.local_time {
        TimeZone::system()
    } else {
        TimeZone::UTC
    };
    let tmp = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let report = vmrepo::ingest::ghettovcb::import(
        &repo,
        &a.backup_dir,
        a.name.as_deref(),
        &tz,
        &tmp,
        &ctx.workers,
        &bar,
    )
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
