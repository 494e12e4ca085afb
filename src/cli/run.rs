//! `vmrepo run JOB.toml`: the nightly job's front end — progress, the end-of-run table, exit
//! status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use vmrepo::ingest::job::{dry_run, run as run_job, JobCopy, JobFile};
use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};
use crate::cli::passphrase::Source;

pub const HELP: &str = "Run a nightly job file: ingest every VM it lists (directories, .vmx \
files or images, shell globs and exclusions allowed; or esxi:// and vcenter:// VMs, folders \
(a trailing /) and patterns, read through the vSphere API, at most `parallel_per_host` of one \
host and `parallel_per_datastore` of one datastore at once) into its repository, each with its pre- and \
post-commands, at most `parallel` at once (default 1, so the datastore is not flooded); one VM \
failing does not stop the others. Then apply the job's retention (prune and gc), copy the \
generations to each [[copy]] destination (off-site; only what it lacks), and run its partial \
check. Prints a table (VM, status, read, new, stored, time) and writes a JSON status file \
if the job names one. At the end it tells the outside world as the job says: `notify_command` gets \
the JSON status on its standard input, `[email]` sends a summary through the local sendmail, and \
`metrics_file` (or --metrics-file) is a Prometheus text file for node_exporter's textfile \
collector (last success per VM, duration, bytes read, new and stored); a notification that fails \
is reported but does not change the exit status. --dry-run opens every VM as the run would and prints what would be read, \
without running hooks or writing anything (exit 1 if a VM cannot be opened). Exit status: 0 when everything succeeded, 1 when a VM, the retention \
or the check failed, 2 when the job file is unusable. Format: docs/NIGHTLY.md.";

/// `vmrepo run` arguments.
#[derive(Args)]
pub struct RunArgs {
    /// The job file (TOML).
    job: PathBuf,
    /// Show what would be backed up (VMs, disks, sizes, warnings, hooks); change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the run's status as JSON.
    #[arg(long)]
    json: bool,
    /// Write the run's metrics in the Prometheus text format to FILE (node_exporter's textfile
    /// collector), instead of the job's `metrics_file`.
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
}

/// Runs `vmrepo run`.
pub fn run(a: RunArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let mut job = match JobFile::load(&a.job) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("vmrepo: error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if a.dry_run {
        let vms = dry_run(&job)?;
        // Exit 1 when a VM could not be opened as the run would open it: the run would fail it.
        let verdict = if vms.iter().any(|v| v.vm.is_err()) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
        if a.json {
            print_json(&vms);
            return Ok(verdict);
        }
        println!(
            "dry run of {} into {}:",
            a.job.display(),
            job.repository.display()
        );
        for v in &vms {
            match &v.vm {
                Ok(name) => println!("{}  ->  {name}", v.path),
                Err(e) => println!("{}  ->  CANNOT BE READ: {e}", v.path),
            }
            for (slot, ct, size, alloc) in &v.disks {
                println!(
                    "    disk {slot} {ct}: {} virtual, {} allocated",
                    human(*size),
                    human(*alloc)
                );
            }
            for w in &v.warnings {
                println!("    warning: {w}");
            }
            for h in &v.hooks {
                println!("    would run {h}");
            }
        }
        if let Some(r) = &job.retention {
            println!(
                "then prune ({} per-VM policies, default: {}){}",
                r.vm.len(),
                r.default.as_ref().map_or("none".into(), |p| p.describe()),
                if r.gc { " and gc" } else { "" }
            );
        }
        for c in &job.copy {
            println!("then copy to {}", c.to.display());
        }
        if let Some(c) = &job.check {
            println!("then check --read-data-subset {}", c.read_data_subset);
        }
        return Ok(verdict);
    }
    if a.metrics_file.is_some() {
        job.metrics_file = a.metrics_file.clone();
    }
    let bar = Bar::new(!a.json && job.parallel == 1);
    let wait = ctx.lock_wait.max(job.lock_wait);
    let opener = |path: &std::path::Path, mode| -> vmrepo::Result<vmrepo::Repository> {
        ctx.open_repo_waiting(path, mode, wait, &Bar::new(false))
            .map_err(|e| vmrepo::Error::Usage(format!("{e:#}")))
    };
    let copy_opener = |c: &JobCopy| -> vmrepo::Result<vmrepo::Repository> {
        let source = Source {
            file: c.password_file.clone(),
            command: c.password_command.clone(),
            env: "VMREPO_TO_PASSWORD",
            what: "passphrase of the copy's destination",
        };
        ctx.open_other_repo(&c.to, LockMode::Shared, &source, &Bar::new(false))
            .map_err(|e| vmrepo::Error::Usage(format!("{e:#}")))
    };
    let report = run_job(
        &job,
        &opener,
        &copy_opener,
        &crate::cli::vsphere::connect_for_job,
        &ctx.interrupt,
        &ctx.workers,
        &bar,
    )?;
    for e in &report.notification_errors {
        eprintln!("vmrepo: warning: {e}");
    }
    if a.json {
        print_json(&report);
    } else {
        println!(
            "{:<34} {:<7} {:>10} {:>10} {:>10} {:>8}",
            "VM", "STATUS", "READ", "NEW", "STORED", "TIME"
        );
        for v in &report.vms {
            let (name, read, new, stored) = match &v.report {
                Some(r) => (
                    r.generation.clone(),
                    human(r.stats.bytes_read),
                    human(r.stats.bytes_new),
                    human(r.stats.bytes_stored),
                ),
                None => (v.path.clone(), "-".into(), "-".into(), "-".into()),
            };
            println!(
                "{:<34} {:<7} {:>10} {:>10} {:>10} {:>7.1}s",
                name, v.status, read, new, stored, v.seconds
            );
            if let Some(e) = &v.error {
                println!("    {e}");
            }
        }
        println!(
            "retention: {}{}",
            report.retention,
            if report.retention == "applied" {
                format!(
                    " ({} generation(s) removed, {} freed)",
                    report.removed,
                    human(report.freed)
                )
            } else {
                String::new()
            }
        );
        for c in &report.copies {
            println!("copy to {c}");
        }
        println!("check: {}", report.check);
        let failed = report.vms.iter().filter(|v| v.status != "ok").count();
        println!(
            "{}: {} of {} VM(s) backed up",
            if report.ok { "ok" } else { "FAILED" },
            report.vms.len() - failed,
            report.vms.len()
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
