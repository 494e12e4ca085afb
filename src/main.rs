//! The `vmrepo` command line: the global options, the list of commands, and dispatch to
//! `cli/`, which holds one module per command (its arguments, help, run and output). All work
//! is done by the library; errors get their context in `cli/`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};

/// `println!` for this binary: output to a closed pipe (`vmrepo list | head -1`) is dropped
/// instead of panicking. See [`cli::output::stdout_write`].
macro_rules! println {
    () => {
        $crate::cli::output::stdout_write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::stdout_write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for this binary; see [`println!`].
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::cli::output::stdout_write(format_args!($($arg)*))
    };
}

mod cli;

#[derive(Parser)]
#[command(
    name = "vmrepo",
    version,
    about = "Back up virtual machines into a deduplicating, compressed repository",
    long_about = "vmrepo backs up VMware VM directories (as ESXi, ghettoVCB or vcbMounter leave them) and raw \
disk images into one content-addressed repository. Each ingest of a VM becomes a generation named \
VM@YYYY-MM-DDTHH:MM:SSZ; only data the repository does not hold yet is stored, compressed with zstd, \
so a nightly generation costs what changed.\n\nTypical nightly use (cron):\n  vmrepo init /backup/repo\n  \
vmrepo ingest /backup/repo /vmfs/volumes/ds1/web01\n  vmrepo list /backup/repo\n  vmrepo extract /backup/repo \
web01@-1 /restore/web01\n  vmrepo check /backup/repo --read-data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Wait up to SECONDS for other vmrepo processes to release the repository (an ingest
    /// waiting for gc, gc waiting for ingests) instead of failing at once. Backups come first:
    /// prune and gc do not start while an ingest or restore waits.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 0)]
    lock_wait: u64,
    /// Encrypted repositories: read the passphrase from this file (first line).
    #[arg(long, global = true, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Encrypted repositories: run this command (sh -c) and use the first line it prints as
    /// the passphrase. Without either option: VMREPO_PASSWORD, else a prompt on a terminal.
    #[arg(long, global = true, value_name = "CMD")]
    password_command: Option<String>,
    /// Use at most N threads for hashing, compressing and verifying (default: one per core,
    /// and for ingest twice that to overlap reading with computing). Lower it to leave cores to
    /// the VMs on a shared host.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Keep the index of repositories in object storage (s3://) under DIR: a cache, rebuilt
    /// from the repository when lost. Default: $XDG_CACHE_HOME/vmrepo, else ~/.cache/vmrepo.
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Repositories in object storage: send at most this many MB (10^6 bytes) per second, all
    /// uploads of the process together, so a backup leaves room on a shared link.
    #[arg(long, global = true, value_name = "MB/s", value_parser = parse_rate)]
    limit_upload: Option<f64>,
    /// Repositories in object storage: receive at most this many MB per second.
    #[arg(long, global = true, value_name = "MB/s", value_parser = parse_rate)]
    limit_download: Option<f64>,
    /// Read the VMs' disks at most this many MB per second, all disks and VMs of the process
    /// together (ingest, run, import-ghettovcb), so the datastore keeps serving the VMs.
    #[arg(long, global = true, value_name = "MB/s", value_parser = parse_rate)]
    limit_read: Option<f64>,
    /// The process's I/O priority, as ionice sets it: `idle` (the disk only when no one else
    /// wants it), `best-effort` or `best-effort:0..7` (0 highest).
    #[arg(long, global = true, value_name = "CLASS", value_parser = vmrepo::ioprio::IoPriority::parse)]
    io_priority: Option<vmrepo::ioprio::IoPriority>,
    /// The repository of commands given none: their REPO argument may then be left out.
    /// Default: VMREPO_REPOSITORY, else `repository` in ~/.config/vmrepo/config.toml.
    #[arg(
        id = "default_repository",
        short = 'R',
        long = "repo",
        global = true,
        value_name = "REPO"
    )]
    default_repository: Option<PathBuf>,
}

/// A transfer limit in MB/s (decimal), as bytes per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim_end_matches("MB/s").trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * 1e6),
        _ => Err(format!(
            "{s:?} is not a rate in MB/s above 0 (e.g. 20 or 0.5)"
        )),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a new, empty repository.
    #[command(long_about = cli::init::HELP)]
    Init(cli::init::InitArgs),
    /// Back up a VM directory or a disk image as a new generation.
    #[command(long_about = cli::ingest::HELP)]
    Ingest(Box<cli::ingest::IngestArgs>),
    /// List VMs, or the generations of one VM.
    List(cli::list::ListArgs),
    /// Show what the repository holds and what each VM and generation costs after dedup.
    #[command(long_about = cli::stats::HELP)]
    Stats(cli::stats::StatsArgs),
    /// Write a self-contained HTML report with charts (nights, growth, durations, last run).
    #[command(long_about = cli::report::HELP)]
    Report(cli::report::ReportArgs),
    /// Restore a generation into a directory.
    #[command(long_about = cli::extract::HELP)]
    Extract(cli::extract::ExtractArgs),
    /// Mount generations read-only as VM directories (FUSE), for single-file restore.
    #[command(long_about = cli::mount::HELP)]
    Mount(cli::mount::MountArgs),
    /// List the volumes, directories and files inside a generation's disks.
    #[command(long_about = cli::files::LS_HELP)]
    Ls(cli::files::LsArgs),
    /// Write one file from inside a generation's disk to standard output.
    #[command(long_about = cli::files::CAT_HELP)]
    Cat(cli::files::CatArgs),
    /// Restore a file or directory tree from inside a generation's disk into a directory.
    #[command(name = "restore-file", long_about = cli::files::RESTORE_FILE_HELP)]
    RestoreFile(cli::files::RestoreFileArgs),
    /// Show the files added, removed and changed between two generations.
    #[command(long_about = cli::files::DIFF_HELP)]
    Diff(cli::files::DiffArgs),
    /// List the generations in which one guest file changed.
    #[command(long_about = cli::files::LOG_HELP)]
    Log(cli::files::LogArgs),
    /// Serve one disk of a generation read-only over NBD (instant recovery, qemu-img).
    #[command(name = "serve-nbd", long_about = cli::serve_nbd::HELP)]
    ServeNbd(cli::serve_nbd::ServeNbdArgs),
    /// Verify the repository; exits non-zero on any damage.
    #[command(long_about = cli::check::HELP)]
    Check(cli::check::CheckArgs),
    /// Remove generations by a retention policy (then `gc` frees their space).
    #[command(long_about = cli::prune::HELP)]
    Prune(cli::prune::PruneArgs),
    /// Remove generations named one by one (then `gc` frees their space).
    #[command(long_about = cli::forget::HELP)]
    Forget(cli::forget::ForgetArgs),
    /// Delete data no generation references and compact half-empty data files.
    #[command(long_about = cli::gc::HELP)]
    Gc(cli::gc::GcArgs),
    /// Raise the repository to the newest format this vmrepo writes (smaller nights).
    #[command(long_about = cli::upgrade::HELP)]
    Upgrade(cli::upgrade::UpgradeArgs),
    /// Copy generations to another repository (off-site, or back), sending only what it lacks.
    #[command(long_about = cli::copy::HELP)]
    Copy(cli::copy::CopyArgs),
    /// Import a ghettoVCB backup rotation as generations, with their original dates.
    #[command(long_about = cli::import::HELP)]
    ImportGhettovcb(cli::import::ImportArgs),
    /// Run a nightly job file: ingest its VMs with their hooks, then retention and a check.
    #[command(long_about = cli::run::HELP)]
    Run(cli::run::RunArgs),
    /// Manage the passphrases of an encrypted repository (list, add, remove, passwd, export).
    #[command(subcommand, long_about = cli::keys::HELP)]
    Key(cli::keys::KeyCommand),
    /// Show the disks, snapshot chains and snapshots a VM has, and what needs attention.
    #[command(long_about = cli::inspect::HELP)]
    Inspect(cli::inspect::InspectArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(long_about = cli::docs::COMPLETIONS_HELP)]
    Completions(cli::docs::CompletionsArgs),
    /// Write the man pages (or print vmrepo.1).
    #[command(long_about = cli::docs::MAN_HELP)]
    Man(cli::docs::ManArgs),
    /// The names completing the last word of a command line (called by completion scripts).
    #[command(name = "__complete", hide = true)]
    Complete(cli::complete::CompleteArgs),
}

fn main() -> ExitCode {
    // Before any thread starts (see stop_on_termination_signals).
    let signals = vmrepo::shutdown::TerminationSignals::block();
    // Built, so that the subcommands know the global options.
    let mut definition = Cli::command();
    definition.build();
    let args = match cli::default_repo::apply(std::env::args_os().collect(), &definition) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmrepo: error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let interrupt = vmrepo::ingest::hooks::Interrupt::new();
    match signals {
        Ok(s) if !matches!(cli.command, Command::Mount(_) | Command::ServeNbd(_)) => {
            stop_on_termination_signals(s, interrupt.clone())
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("vmrepo: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(cli, interrupt) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmrepo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, interrupt: vmrepo::ingest::hooks::Interrupt) -> anyhow::Result<ExitCode> {
    // Before the worker threads start, so that they inherit it.
    if let Some(p) = cli.io_priority {
        p.apply()
            .with_context(|| format!("cannot set the I/O priority {p:?} (--io-priority)"))?;
    }
    // --threads caps the global pool (check, extract, inflate) and the ingest's segment workers.
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.into())
            .build_global()
            .context("cannot start the worker threads for --threads")?;
    }
    let ctx = cli::context::Context::new(
        cli.lock_wait,
        interrupt,
        vmrepo::ingest::SegmentWorkers::new(cli.threads.map(usize::from))
            .with_read_limit(cli.limit_read),
        vmrepo::backend::RemoteOptions {
            cache_root: cli.cache_dir,
            limit_upload: cli.limit_upload,
            limit_download: cli.limit_download,
        },
        cli::passphrase::Source::repository(cli.password_file, cli.password_command),
    );
    match cli.command {
        Command::Init(a) => cli::init::run(a, &ctx),
        Command::Ingest(a) => cli::ingest::run(*a, &ctx),
        Command::List(a) => cli::list::run(a, &ctx),
        Command::Stats(a) => cli::stats::run(a, &ctx),
        Command::Report(a) => cli::report::run(a, &ctx),
        Command::Extract(a) => cli::extract::run(a, &ctx),
        Command::Mount(a) => cli::mount::run(a, &ctx),
        Command::ServeNbd(a) => cli::serve_nbd::run(a, &ctx),
        Command::Ls(a) => cli::files::ls(a, &ctx),
        Command::Cat(a) => cli::files::cat(a, &ctx),
        Command::RestoreFile(a) => cli::files::restore_file(a, &ctx),
        Command::Diff(a) => cli::files::diff(a, &ctx),
        Command::Log(a) => cli::files::log(a, &ctx),
        Command::Check(a) => cli::check::run(a, &ctx),
        Command::Prune(a) => cli::prune::run(a, &ctx),
        Command::Forget(a) => cli::forget::run(a, &ctx),
        Command::Gc(a) => cli::gc::run(a, &ctx),
        Command::Upgrade(a) => cli::upgrade::run(a, &ctx),
        Command::Copy(a) => cli::copy::run(a, &ctx),
        Command::ImportGhettovcb(a) => cli::import::run(a, &ctx),
        Command::Key(cmd) => cli::keys::run(cmd, &ctx),
        Command::Run(a) => cli::run::run(a, &ctx),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Completions(a) => cli::docs::completions(a, Cli::command()),
        Command::Man(a) => cli::docs::man(a, Cli::command()),
        Command::Complete(a) => {
            let mut definition = Cli::command();
            definition.build();
            Ok(cli::complete::run(a, &ctx, &definition))
        }
    }
}

/// Ctrl-C, SIGTERM and SIGHUP, for every command but mount and serve-nbd (which wait for them
/// themselves to unmount and close cleanly): blocked before any thread starts, so that every
/// thread inherits the mask and none is killed by them, and received by one thread, which
/// through the interrupt token kills the running pre-commands, runs every owed post-command
/// with `VMREPO_STATUS=interrupted` (each VM of a job in flight gets its own), waits for the
/// post-commands already running, and exits 130. An interrupted ingest records no
/// generation: the generation becomes visible only in its last index transaction.
fn stop_on_termination_signals(
    signals: vmrepo::shutdown::TerminationSignals,
    interrupt: vmrepo::ingest::hooks::Interrupt,
) {
    std::thread::spawn(move || {
        let sig = signals.wait();
        eprintln!(
            "vmrepo: {sig}: stopping (an ingest that has not committed records no generation)"
        );
        for e in interrupt.interrupt() {
            eprintln!("vmrepo: error: {e}");
        }
        std::process::exit(130);
    });
}
