//! The `vmrepo` command line: argument parsing, progress display and output formatting. All
//! work is done by the library; errors get their context here.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `println!` for this binary: output to a closed pipe (`vmrepo list | head -1`) is dropped
/// instead of panicking. See [`stdout_write`].
macro_rules! println {
    () => {
        $crate::stdout_write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout_write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for this binary; see [`println!`].
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout_write(format_args!($($arg)*))
    };
}

mod cli;

use vmrepo::ingest::{ingest, IngestOptions};
use vmrepo::maintain::check::{check, rebuild_index, ReadData};
use vmrepo::progress::Progress;
use vmrepo::repo::config::ChunkerParams;
use vmrepo::repo::lock::LockMode;
use vmrepo::restore::extract::{extract, ExtractOptions};
use vmrepo::restore::mount::{mount, MountOptions};
use vmrepo::restore::nbd::{resolve_listen, serve, Export, ServeOptions};
use vmrepo::vmware::relocate::DatastoreMap;
use vmrepo::Repository;

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
    /// waiting for gc, gc waiting for ingests) instead of failing at once.
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
}

#[derive(Subcommand)]
enum Command {
    /// Create a new, empty repository.
    #[command(
        long_about = "Create a new repository in DIR, which must not exist or be empty. The chunking \
and compression parameters are fixed for the life of the repository; the defaults were chosen by \
measurement (docs/PERFORMANCE.md). With --encryption aes-256-gcm every stored object and every \
name, path and size in the index is encrypted under a random master key, wrapped by your passphrase \
(VMREPO_PASSWORD, --password-file, --password-command, or asked twice on a terminal). Losing the \
passphrase means losing the data: add a second one with `vmrepo key add` or keep `vmrepo key \
export`'s output offline. The default, none, is for repositories on storage only you can read \
(docs/SECURITY.md)."
    )]
    Init {
        /// Directory to create the repository in.
        repo: PathBuf,
        /// Average chunk size in KiB (FastCDC target).
        #[arg(long, default_value_t = ChunkerParams::default().avg_size >> 10, value_name = "KIB")]
        chunk_avg: u32,
        /// Minimum chunk size in KiB (default: avg/4).
        #[arg(long, value_name = "KIB")]
        chunk_min: Option<u32>,
        /// Maximum chunk size in KiB (default: avg*4).
        #[arg(long, value_name = "KIB")]
        chunk_max: Option<u32>,
        /// Segment size in MiB: disks are cut at these fixed offsets before chunking.
        #[arg(long, default_value_t = ChunkerParams::default().segment_size >> 20, value_name = "MIB")]
        segment_size: u32,
        /// zstd compression level (1 fastest .. 19 smallest).
        #[arg(long, default_value_t = 3, value_name = "LEVEL")]
        compression_level: i32,
        /// `none` or `aes-256-gcm`.
        #[arg(long, default_value = "none", value_name = "MODE",
              value_parser = clap::builder::PossibleValuesParser::new(vmrepo::repo::config::ENCRYPTION_MODES))]
        encryption: String,
        /// argon2id memory for the first key, in MiB.
        #[arg(long, value_name = "MIB", default_value_t = vmrepo::repo::keyfile::KdfCost::default().memory_kib >> 10)]
        kdf_memory: u32,
    },
    /// Back up a VM directory or a disk image as a new generation.
    #[command(
        long_about = "Read SOURCE and store it as a new generation of its VM. SOURCE is a VM directory \
(its .vmx names the disks; .vmx, .vmxf, .vmsd, .nvram, logs and disk descriptors are stored verbatim), a \
.vmx file, a flat VMDK descriptor, or a raw disk image. Disks are read while frozen (e.g. under a VM \
snapshot); holes and zero runs cost nothing, and only chunks the repository lacks are stored. The \
generation becomes visible only once all its data is durable: an interrupted ingest leaves no \
generation behind, and a re-run reuses what it had stored.\n\nSupported disks: flat VMDKs \
(monolithicFlat, vmfs/vmfsThin pairs, twoGbMaxExtentFlat), hosted sparse VMDKs (monolithicSparse, \
twoGbMaxExtentSparse, streamOptimized), ESXi snapshot deltas (vmfsSparse/COWD, seSparse), ZERO and \
RDONLY extents, qcow2 (v2/v3, compressed clusters, backing files) and raw images. A snapshot chain is \
followed from the file the .vmx (or SOURCE) names down to its base (parentFileNameHint or qcow2 \
backing file, each link's parentCID checked against its parent's CID) and stored as one flattened \
disk; files are only ever opened read-only. Use `vmrepo inspect` to see what would be read."
    )]
    Ingest {
        /// Repository directory.
        repo: PathBuf,
        /// VM directory, .vmx file, flat VMDK descriptor or raw disk image.
        source: PathBuf,
        /// VM name (default: the .vmx displayName, or the image file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// Record the generation at this UTC time (e.g. 2026-09-01T01:30:00Z) instead of now:
        /// how existing backups come in with their real dates. Refused if the VM already has a
        /// generation at that time.
        #[arg(long, value_name = "TIME", value_parser = cli::parse_time)]
        time: Option<jiff::Timestamp>,
        /// Change-aware ingest: a JSON list of the byte ranges that changed since --since (as
        /// exported from VMware CBT or a QEMU dirty bitmap; format in docs/NIGHTLY.md). Only
        /// the segments they touch are read; the rest is taken from that generation.
        #[arg(long, value_name = "FILE")]
        changed_ranges: Option<PathBuf>,
        /// The generation the changed ranges are relative to (VM@TIME, VM@-N, VM).
        #[arg(long, value_name = "GENERATION", requires = "changed_ranges")]
        since: Option<String>,
        /// Re-read this share of the segments the changed ranges call unchanged and fail the
        /// ingest if any differs (catches a wrong list), e.g. 1%.
        #[arg(long, value_name = "PERCENT", requires = "changed_ranges",
              value_parser = cli::parse_percent, default_value = "0%")]
        verify_unchanged: f64,
        /// Run this (sh -c) before reading the VM, e.g. to take a snapshot; if it fails, nothing
        /// is ingested. Gets VMREPO_VM, VMREPO_VMDIR, VMREPO_PHASE=pre.
        #[arg(long, value_name = "CMD")]
        pre_command: Option<String>,
        /// Run this (sh -c) afterwards whatever happened (success, failure, Ctrl-C), e.g. to
        /// remove the snapshot; also gets VMREPO_STATUS. Its failure makes the exit status 1.
        #[arg(long, value_name = "CMD")]
        post_command: Option<String>,
        /// Longest the pre- or post-command may run before it is killed.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        hook_timeout: u64,
        /// Warn (or with --strict refuse) when the VM has a snapshot older than this.
        #[arg(long, value_name = "DAYS", default_value_t = vmrepo::vmware::inspect::OLD_SNAPSHOT_DAYS)]
        max_snapshot_age: f64,
        /// Warn (or with --strict refuse) when a disk has more deltas than this above its base.
        #[arg(long, value_name = "N", default_value_t = vmrepo::vmware::inspect::DEEP_CHAIN)]
        max_chain_depth: usize,
        /// Refuse to back up a VM with old snapshots or deep chains instead of warning.
        #[arg(long)]
        strict: bool,
        /// Read each disk as a snapshot froze it: `latest` (the one the VM runs on, the .vmsd's
        /// snapshot.current: normally the most recently taken, but after a revert the one
        /// reverted to) or a snapshot name or uid from the .vmsd. The hot-backup case: the
        /// running VM writes into the newer delta while vmrepo reads the frozen links. The disk
        /// is restored under the name the .vmx uses.
        #[arg(long, value_name = "latest|NAME")]
        at_snapshot: Option<String>,
        /// Find files named by absolute datastore paths (parentFileNameHint, extents) in a
        /// local directory: `/vmfs/volumes/ds1=/mnt/ds1`. Repeatable. Without it an absolute
        /// path is looked up by its file name in the disk's own directory.
        #[arg(long, value_name = "DATASTORE=DIR", value_parser = vmrepo::source::chain::ChainOptions::parse_map)]
        datastore_map: Vec<(PathBuf, PathBuf)>,
        /// Also read disks, extents, parents and small files that the VM's files name inside DIR.
        /// By default ingest reads only the VM's directory (or the given file and its
        /// directory), /vmfs/volumes on an ESXi host and --datastore-map targets, so that a VM
        /// directory cannot make it store host files; pass this for a datastore or image
        /// directory you trust. Repeatable.
        #[arg(long, value_name = "DIR")]
        allow_path: Vec<PathBuf>,
        /// Read every disk in full, even when its snapshot chain is last generation's plus new
        /// links (which otherwise limits reading to what the new links hold): a periodic full
        /// read, or after storage trouble. Unchanged segments are still not stored again.
        #[arg(long, conflicts_with = "changed_ranges")]
        full_read: bool,
        /// Print one JSON summary on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List VMs, or the generations of one VM.
    List {
        /// Repository directory.
        repo: PathBuf,
        /// Show this VM's generations (default: one line per VM).
        vm: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a generation into a directory.
    #[command(
        long_about = "Write generation GENERATION back into DEST: the VM's small files byte for byte \
and each disk in its original layout as sparse files: flat disks (descriptor plus flat extent files, or \
the raw image) byte for byte; monolithicSparse, twoGbMaxExtentSparse, streamOptimized and qcow2 disks laid \
out afresh by vmrepo's own writers (same content, readable by qemu-img and VMware tools). A disk ingested \
from a snapshot chain restores flattened into one link under the name the VM refers to, in its base \
link's format (an ESXi vmfs base with seSparse deltas comes back as a vmfs flat pair). --disk-format \
converts every disk instead. GENERATION is VM (the latest), VM@-1 (the one before), VM@-N, or VM@YYYY-MM-DDTHH:MM:SSZ. Every \
chunk is verified against its hash; files appear under their final names only when complete."
    )]
    Extract {
        /// Repository directory.
        repo: PathBuf,
        /// VM, VM@-N or VM@TIME.
        generation: String,
        /// Destination directory (created if missing).
        dest: PathBuf,
        /// Overwrite files that exist in DEST.
        #[arg(long)]
        force: bool,
        /// Restore only the disks (descriptors and extent files).
        #[arg(long)]
        disk_only: bool,
        /// Restore a damaged generation anyway: damaged disk ranges stay zero (holes) and are
        /// listed, missing small files are skipped and listed.
        #[arg(long)]
        allow_damaged: bool,
        /// Restore to another datastore path: rewrite paths under OLD to NEW in the .vmx (disk
        /// fileNames and other paths) and in the descriptors' extent lines (repeatable; the
        /// longest matching OLD wins). Relative paths are left alone.
        #[arg(long = "datastore-map", value_name = "OLD=NEW")]
        datastore_map: Vec<String>,
        /// Write each disk in this format instead of its original one: raw, flat (descriptor
        /// plus flat extent; `vmfs` for ESXi disks, else monolithicFlat), monolithicSparse,
        /// twoGbMaxExtentSparse, streamOptimized or qcow2. Output files take the disk's name
        /// with the format's extension (.vmdk, .qcow2, .img).
        #[arg(long, value_name = "FORMAT")]
        disk_format: Option<vmrepo::restore::writer::DiskFormat>,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Mount generations read-only as VM directories (FUSE), for single-file restore.
    #[command(
        long_about = "Mount the repository read-only at MOUNTPOINT (an existing directory) and serve it \
until it is unmounted. The tree is MOUNTPOINT/<vm>/<generation time>/ with each generation's files \
exactly as `vmrepo extract` would write them (.vmx, .nvram, logs, descriptors and flat disk images \
next to them), and MOUNTPOINT/<vm>/latest, a symlink to the newest generation. With VM only that \
VM's generations are shown, with VM@GEN only that one. The tree shows the generations that existed when it was mounted; \
mount again to see newer ones.\n\nReads fetch only the chunks they touch \
and verify them; zero regions cost nothing. Damaged data gives an I/O error (EIO), never zeros. \
Open a disk in place with qemu-img, debugfs or fuse2fs -o ro, or loop-mount it read-only. Leave \
with Ctrl-C (or SIGTERM), or `fusermount3 -u MOUNTPOINT` from another shell. The repository's \
shared lock is held while mounted: prune, gc and index rebuilds wait."
    )]
    Mount {
        /// Repository directory.
        repo: PathBuf,
        /// Existing directory to mount on.
        mountpoint: PathBuf,
        /// Only this VM (VM) or this generation (VM@-N, VM@TIME).
        generation: Option<String>,
        /// Memory for decompressed chunks, in MiB.
        #[arg(long, default_value_t = (vmrepo::restore::reader::DEFAULT_CACHE_BYTES >> 20) as u32, value_name = "MIB")]
        cache_size: u32,
    },
    /// Serve one disk of a generation read-only over NBD (instant recovery, qemu-img).
    #[command(
        name = "serve-nbd",
        long_about = "Serve disk N (default 0, the first in `vmrepo list` order) of GENERATION as a \
read-only NBD export until Ctrl-C (or SIGTERM). Any NBD client reads it straight from the \
repository: `qemu-img compare nbd://127.0.0.1:10809 disk.img`, `qemu-img convert -O qcow2 \
nbd://127.0.0.1:10809 out.qcow2`, or boot the VM from it with `qemu-system-x86_64 -drive \
file=nbd://127.0.0.1:10809,format=raw,snapshot=on` (guest writes go to a temporary overlay; the \
backup is never written). The export is the guest's view of the disk (raw bytes, as the VM sees \
them); its name is the disk's descriptor or image file name, and the default (empty) name works \
too. Several clients may read at once.\n\nNBD has no authentication and no encryption: anyone who \
can connect can read the whole disk. The server listens on 127.0.0.1:10809 unless told otherwise \
and refuses non-loopback addresses without --allow-remote. The repository's shared lock is held \
while serving: prune, gc and index rebuilds wait."
    )]
    ServeNbd {
        /// Repository directory.
        repo: PathBuf,
        /// VM, VM@-N or VM@TIME.
        generation: String,
        /// Which disk of the generation (0-based).
        #[arg(long, default_value_t = 0, value_name = "N")]
        disk: usize,
        /// TCP address to listen on, HOST:PORT (repeatable; port 0 picks a free port). Default
        /// 127.0.0.1:10809 unless only --listen-unix is given.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Vec<String>,
        /// Also (or only) listen on this Unix socket.
        #[arg(long, value_name = "PATH")]
        listen_unix: Option<PathBuf>,
        /// Allow non-loopback addresses. NBD is unauthenticated: anyone who can connect can read
        /// the disk.
        #[arg(long)]
        allow_remote: bool,
        /// Clients served at once.
        #[arg(long, default_value_t = 16, value_name = "N")]
        max_clients: usize,
        /// Memory for decompressed chunks, in MiB.
        #[arg(long, default_value_t = (vmrepo::restore::reader::DEFAULT_CACHE_BYTES >> 20) as u32, value_name = "MIB")]
        cache_size: u32,
    },
    /// Verify the repository; exits non-zero on any damage.
    #[command(
        long_about = "Check that the index and the pack files agree and that every generation's \
manifest, disk maps, segments and chunks are present. With --read-data, also read, decompress and \
re-hash every stored object; --read-data-subset reads part of them (10% at random, or slice 3/7 so \
that seven nightly runs read everything once). Damaged generations and disks are named. With \
--rebuild-index, first rebuild index.sqlite from the pack files alone (the old index is kept beside \
it), then check. With --repair, read everything, rebuild the index if it is missing or damaged, drop \
index entries whose data is missing or corrupt, and mark the generations that lost data as damaged \
(extract refuses them unless --allow-damaged; a later ingest that reads the same data again stores \
it again and heals them). Exit status: 0 when nothing is damaged, 1 otherwise."
    )]
    Check {
        /// Repository directory.
        repo: PathBuf,
        /// Read and verify every stored byte.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Read and verify a subset: a percentage of the data (`10%`, random) or slice N of M
        /// (`2/7`, deterministic).
        #[arg(long, value_name = "SUBSET", value_parser = ReadData::parse_subset)]
        read_data_subset: Option<ReadData>,
        /// Fix the index to match the data files and mark damaged generations (needs the
        /// repository to itself; reads every stored byte).
        #[arg(long, conflicts_with_all = ["rebuild_index", "read_data_subset"])]
        repair: bool,
        /// Rebuild the index from the pack files first (needs the repository to itself).
        #[arg(long)]
        rebuild_index: bool,
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Remove generations by a retention policy (then `gc` frees their space).
    #[command(long_about = cli::PRUNE_HELP)]
    Prune(cli::PruneArgs),
    /// Delete data no generation references and compact half-empty data files.
    #[command(long_about = cli::GC_HELP)]
    Gc(cli::GcArgs),
    /// Import a ghettoVCB backup rotation as generations, with their original dates.
    #[command(long_about = cli::IMPORT_HELP)]
    ImportGhettovcb(cli::ImportArgs),
    /// Run a nightly job file: ingest its VMs with their hooks, then retention and a check.
    #[command(long_about = cli::run::RUN_HELP)]
    Run(cli::run::RunArgs),
    /// Manage the passphrases of an encrypted repository (list, add, remove, passwd, export).
    #[command(subcommand, long_about = cli::keys::KEY_HELP)]
    Key(cli::keys::KeyCommand),
    /// Show the disks, snapshot chains and snapshots a VM has, and what needs attention.
    #[command(long_about = cli::inspect::INSPECT_HELP)]
    Inspect(cli::inspect::InspectArgs),
}

/// indicatif progress on a terminal's stderr; without a terminal, a progress line every minute.
pub(crate) struct Bar {
    bar: Option<ProgressBar>,
    /// Without a terminal (cron, a log file): a progress line every so often instead.
    log: Option<LogLines>,
}

/// Progress as plain lines on stderr, at most one per `every`.
struct LogLines {
    every: std::time::Duration,
    state: std::sync::Mutex<LogState>,
}

struct LogState {
    label: String,
    total: u64,
    done: u64,
    began: std::time::Instant,
    last: std::time::Instant,
}

/// Seconds between progress lines when stderr is not a terminal (`VMREPO_PROGRESS_INTERVAL`).
const LOG_INTERVAL_SECONDS: f64 = 60.0;

impl LogLines {
    fn new() -> LogLines {
        let every = std::env::var("VMREPO_PROGRESS_INTERVAL")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .unwrap_or(std::time::Duration::from_secs_f64(LOG_INTERVAL_SECONDS));
        let now = std::time::Instant::now();
        LogLines {
            every,
            state: std::sync::Mutex::new(LogState {
                label: String::new(),
                total: 0,
                done: 0,
                began: now,
                last: now,
            }),
        }
    }

    fn line(s: &LogState) -> String {
        let secs = s.began.elapsed().as_secs_f64().max(1e-3);
        let rate = s.done as f64 / secs;
        let mut line = format!("{}: {} of {}", s.label, human(s.done), human(s.total));
        if s.total > 0 {
            line += &format!(" ({:.0}%)", 100.0 * s.done as f64 / s.total as f64);
        }
        line += &format!(", {}/s", human(rate as u64));
        if rate > 0.0 && s.total > s.done {
            let left = ((s.total - s.done) as f64 / rate) as u64;
            line += &format!(", about {}m{:02}s left", left / 60, left % 60);
        }
        line
    }
}

impl Bar {
    pub(crate) fn new(enabled: bool) -> Bar {
        let terminal = std::io::stderr().is_terminal();
        let on = enabled && terminal;
        Bar {
            log: (enabled && !terminal).then(LogLines::new),
            bar: on.then(|| {
                let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .unwrap()
                    .progress_chars("=> "),
                );
                b
            }),
        }
    }
}

impl Progress for Bar {
    fn start(&self, label: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.reset();
            b.set_length(total);
            b.set_position(0);
            b.set_message(label.to_string());
        }
        if let Some(l) = &self.log {
            let now = std::time::Instant::now();
            *l.state.lock().unwrap() = LogState {
                label: label.to_string(),
                total,
                done: 0,
                began: now,
                last: now,
            };
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(l) = &self.log {
            let mut s = l.state.lock().unwrap();
            s.done += n;
            if s.last.elapsed() >= l.every {
                s.last = std::time::Instant::now();
                eprintln!("{}", LogLines::line(&s));
            }
        }
    }
    fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Set once standard output has failed (its reader went away): nothing more is written to it.
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes to standard output. When the reader has gone (a closed pipe), the output is dropped
/// and the command goes on: an ingest still commits and runs its post-command, and the exit
/// code says how the work went, not whether someone read about it.
pub(crate) fn stdout_write(args: std::fmt::Arguments<'_>) {
    use std::sync::atomic::Ordering;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out.write_fmt(args).and_then(|_| out.flush()).is_err() {
        STDOUT_GONE.store(true, Ordering::Relaxed);
    }
}

fn main() -> ExitCode {
    // Before any thread starts (see stop_on_termination_signals).
    let signals = vmrepo::shutdown::TerminationSignals::block();
    let cli = Cli::parse();
    match signals {
        Ok(s)
            if !matches!(
                cli.command,
                Command::Mount { .. } | Command::ServeNbd { .. }
            ) =>
        {
            stop_on_termination_signals(s)
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("vmrepo: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmrepo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(n) = cli.threads {
        vmrepo::ingest::limit_threads(n.into())
            .context("cannot start the worker threads for --threads")?;
    }
    let _ = PASSPHRASE.set(cli::passphrase::Source::repository(
        cli.password_file.clone(),
        cli.password_command.clone(),
    ));
    match cli.command {
        Command::Init {
            repo,
            chunk_avg,
            chunk_min,
            chunk_max,
            segment_size,
            compression_level,
            encryption,
            kdf_memory,
        } => {
            let avg = chunk_avg.saturating_mul(1024);
            let params = ChunkerParams {
                avg_size: avg,
                min_size: chunk_min.map_or(avg / 4, |k| k.saturating_mul(1024)),
                max_size: chunk_max.map_or(avg.saturating_mul(4), |k| k.saturating_mul(1024)),
                segment_size: segment_size.saturating_mul(1 << 20),
                ..ChunkerParams::default()
            };
            let pass = if encryption == "none" {
                None
            } else {
                Some(
                    cli::passphrase::Source::repository(
                        cli.password_file.clone(),
                        cli.password_command.clone(),
                    )
                    .get(true)?,
                )
            };
            let enc = pass.as_ref().map(|p| vmrepo::repo::NewEncryption {
                passphrase: p,
                cost: vmrepo::repo::keyfile::KdfCost {
                    memory_kib: kdf_memory.max(1) << 10,
                    ..Default::default()
                },
            });
            let config = Repository::init(&repo, params, compression_level, enc)
                .with_context(|| format!("cannot create a repository in {}", repo.display()))?;
            let c = config.chunker;
            println!(
                "created repository {} (format {})",
                repo.display(),
                config.format_version
            );
            println!(
                "chunks {}/{}/{} KiB (min/avg/max) in {} MiB segments, zstd level {}",
                c.min_size >> 10,
                c.avg_size >> 10,
                c.max_size >> 10,
                c.segment_size >> 20,
                config.compression.level
            );
            if config.encrypted() {
                println!(
                    "encryption: AES-256-GCM; the passphrase opens it. Losing the passphrase loses \
                     the data: add a second one (`vmrepo key add`) or keep `vmrepo key export` offline"
                );
            } else {
                println!(
                    "encryption: NONE -- anyone who can read {} can read the backups \
                     (use --encryption aes-256-gcm for storage others can read)",
                    repo.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest {
            repo,
            source,
            name,
            time,
            changed_ranges,
            since,
            verify_unchanged,
            pre_command,
            post_command,
            hook_timeout,
            max_snapshot_age,
            max_chain_depth,
            strict,
            at_snapshot,
            datastore_map,
            allow_path,
            full_read,
            json,
        } => {
            let bar = Bar::new(!json);
            let hooks = vmrepo::ingest::hooks::Hooks {
                pre: pre_command,
                post: post_command,
                timeout: std::time::Duration::from_secs(hook_timeout),
            };
            let changes = changed_ranges
                .as_deref()
                .map(vmrepo::ingest::changes::ChangedRanges::load)
                .transpose()?;
            let r = open_repo(&repo, LockMode::Shared, cli.lock_wait, &bar)?;
            let opts = IngestOptions {
                name,
                time,
                changes,
                since,
                verify_unchanged,
                hooks,
                datastore_map: vmrepo::source::confine::with_allowed(datastore_map, &allow_path),
                at_snapshot,
                limits: Some(vmrepo::vmware::preflight::Limits {
                    max_snapshot_age_days: max_snapshot_age,
                    max_chain_depth,
                }),
                strict,
                full_read,
                recorded_source: None,
            };
            let mut report = ingest(&r, &source, &opts, &bar).with_context(|| {
                format!(
                    "ingest of {} failed; no generation was recorded",
                    source.display()
                )
            })?;
            report.healed = vmrepo::maintain::repair::heal_after_ingest(&r, &bar);
            if json {
                print_json(&report);
            } else {
                let s = &report.stats;
                let rate = s.bytes_read as f64 / report.seconds.max(1e-6);
                println!("generation {}", report.generation);
                println!(
                    "  read        {} of {} virtual ({} disks, {} files) in {:.1} s, {}/s",
                    human(s.bytes_read),
                    human(s.virtual_bytes),
                    report.disks,
                    report.files,
                    report.seconds,
                    human(rate as u64)
                );
                println!(
                    "  new         {} in {} chunks; segments: {} total, {} unchanged, {} all zero",
                    human(s.bytes_new),
                    s.chunks_new,
                    s.segments_total,
                    s.segments_reused,
                    s.segments_zero
                );
                println!("  stored      {} after compression", human(s.bytes_stored));
                if let Some(i) = &report.incremental {
                    println!(
                        "  changes     since {} ({}): {} segments taken unread, {} patched around \
                         their changes, {} re-read to verify",
                        i.since,
                        i.source,
                        i.segments_taken,
                        i.segments_patched,
                        i.segments_verified
                    );
                    for f in &i.full_reads {
                        println!("  full read   {f}");
                    }
                }
                for h in &report.hooks {
                    println!(
                        "  {:<11} {:?}: {}",
                        format!("{}-command", h.phase),
                        h.command,
                        if h.ok() {
                            "ok".to_string()
                        } else {
                            h.error().to_string()
                        }
                    );
                }
                for h in &report.healed {
                    println!("  healed      {h}: the data it had lost is stored again");
                }
                if s.bytes_stored == 0 {
                    println!("  nothing new stored: everything read was already in the repository");
                } else {
                    println!(
                        "  dedup+compression ratio {:.1}x (bytes read / bytes stored)",
                        s.bytes_read as f64 / s.bytes_stored as f64
                    );
                }
            }
            if let Some(e) = report.hook_failure() {
                eprintln!(
                    "vmrepo: error: generation {} was recorded, but {e}",
                    report.generation
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List { repo, vm, json } => {
            let r = open_repo(&repo, LockMode::Read, cli.lock_wait, &Bar::new(false))?;
            let index = r.open_index()?;
            match vm {
                None => {
                    let vms = index.vms()?;
                    if json {
                        print_json(&vms);
                    } else if vms.is_empty() {
                        println!("no VMs in {}", repo.display());
                    } else {
                        println!(
                            "{:<24} {:>5}  {:<20}  {:<20}  {:>10}",
                            "VM", "GENS", "OLDEST", "LATEST", "STORED"
                        );
                        for v in vms {
                            println!(
                                "{:<24} {:>5}  {:<20}  {:<20}  {:>10}",
                                v.name,
                                v.generations,
                                v.oldest,
                                v.latest,
                                human(v.bytes_stored)
                            );
                        }
                    }
                }
                Some(vm) => {
                    let gens = index.generations(Some(&vm))?;
                    if gens.is_empty() {
                        // resolve() gives the helpful message.
                        index.resolve(&vm)?;
                    }
                    if json {
                        print_json(&gens);
                    } else {
                        println!(
                            "{:<34} {:>10} {:>10} {:>10}  DISKS",
                            "GENERATION", "VIRTUAL", "READ", "STORED"
                        );
                        for g in gens {
                            let disks: Vec<String> = g
                                .disks
                                .iter()
                                .map(|d| {
                                    format!(
                                        "{} {} {}",
                                        d.slot,
                                        d.create_type,
                                        human(d.virtual_size)
                                    )
                                })
                                .collect();
                            println!(
                                "{:<34} {:>10} {:>10} {:>10}  {}",
                                g.name,
                                human(g.virtual_bytes),
                                human(g.bytes_read),
                                human(g.bytes_stored),
                                disks.join(", ")
                            );
                            if let Some(d) = &g.damaged {
                                println!("  DAMAGED: {d}");
                            }
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Extract {
            repo,
            generation,
            dest,
            force,
            disk_only,
            allow_damaged,
            datastore_map,
            disk_format,
            json,
        } => {
            let map = DatastoreMap::parse(&datastore_map)?;
            let bar = Bar::new(!json);
            let r = open_repo(&repo, LockMode::Read, cli.lock_wait, &bar)?;
            let opts = ExtractOptions {
                force,
                disk_only,
                allow_damaged,
                datastore_map: map.clone(),
                disk_format,
            };
            let report = extract(&r, &generation, &dest, &opts, &bar).with_context(|| {
                format!("extract of {generation} into {} failed", dest.display())
            })?;
            let unused = map.unused();
            if json {
                let mut v = serde_json::to_value(&report).expect("serializable");
                if !map.is_empty() {
                    v["relocated"] = serde_json::to_value(map.rewrites()).expect("serializable");
                    v["unused_datastore_maps"] =
                        serde_json::to_value(&unused).expect("serializable");
                }
                print_json(&v);
            } else {
                println!(
                    "extracted {} into {}: {} files, {} of disk data ({} virtual) in {:.1} s",
                    report.generation,
                    report.destination,
                    report.files.len(),
                    human(report.bytes_written),
                    human(report.virtual_bytes),
                    report.seconds
                );
                for w in map.rewrites() {
                    println!("  rewrote in {}: {} -> {}", w.file, w.old, w.new);
                }
                for f in &report.damaged_files {
                    println!("  DAMAGED  file {f} was not restored");
                }
                for r in &report.damaged_ranges {
                    println!("  DAMAGED  {r}: left as zeros");
                }
            }
            for u in &unused {
                eprintln!("vmrepo: warning: --datastore-map {u} matched no path in the .vmx or the descriptors");
            }
            Ok(
                if report.damaged_ranges.is_empty() && report.damaged_files.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                    "vmrepo: extract of {} is incomplete: {} damaged range(s), {} file(s) missing",
                    report.generation,
                    report.damaged_ranges.len(),
                    report.damaged_files.len()
                );
                    ExitCode::from(3)
                },
            )
        }
        Command::Mount {
            repo,
            mountpoint,
            generation,
            cache_size,
        } => {
            let r = Arc::new(open_repo(
                &repo,
                LockMode::Read,
                cli.lock_wait,
                &Bar::new(false),
            )?);
            let opts = MountOptions {
                selection: generation,
                cache_bytes: (cache_size.max(1) as usize) << 20,
                ..MountOptions::default()
            };
            let log: vmrepo::restore::mount::Logger = Arc::new(|m: &str| eprintln!("vmrepo: {m}"));
            mount(r, &mountpoint, &opts, log, |s| {
                println!(
                    "mounted {} generations of {} VMs read-only at {}; leave with Ctrl-C or `fusermount3 -u {}`",
                    s.generations,
                    s.vms,
                    s.mountpoint.display(),
                    s.mountpoint.display()
                );
                let _ = std::io::stdout().flush();
            })
            .with_context(|| format!("mount of {} at {} failed", repo.display(), mountpoint.display()))?;
            println!("unmounted {}", mountpoint.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::ServeNbd {
            repo,
            generation,
            disk,
            mut listen,
            listen_unix,
            allow_remote,
            max_clients,
            cache_size,
        } => {
            if listen.is_empty() && listen_unix.is_none() {
                listen.push("127.0.0.1:10809".into());
            }
            // Check the addresses before the (slower) repository work.
            for a in &listen {
                resolve_listen(a, allow_remote)?;
            }
            let r = Arc::new(open_repo(
                &repo,
                LockMode::Read,
                cli.lock_wait,
                &Bar::new(false),
            )?);
            let export = Export::open(r, &generation, disk, (cache_size.max(1) as usize) << 20)
                .with_context(|| format!("cannot serve disk {disk} of {generation}"))?;
            let what = format!(
                "{} ({}, export name {:?})",
                export.description,
                human(export.image.size()),
                export.name
            );
            let opts = ServeOptions {
                tcp: listen,
                unix: listen_unix,
                allow_remote,
                max_clients,
            };
            let log: vmrepo::restore::nbd::Logger =
                Arc::new(|m: &str| eprintln!("vmrepo: nbd: {m}"));
            serve(export, &opts, log, |uris| {
                println!("serving {what} read-only; stop with Ctrl-C");
                for u in uris {
                    println!("listening on {u}");
                }
                let _ = std::io::stdout().flush();
            })
            .context("NBD server failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            repo,
            read_data,
            read_data_subset,
            rebuild_index: rebuild,
            repair,
            json,
        } => {
            let bar = Bar::new(!json);
            if repair {
                let r = open_repo(&repo, LockMode::Exclusive, cli.lock_wait, &bar)?;
                return cli::print_repair(&vmrepo::maintain::repair::repair(&r, &bar)?, json);
            }
            let read = match (read_data, read_data_subset) {
                (_, Some(subset)) => subset,
                (true, None) => ReadData::All,
                (false, None) => ReadData::None,
            };
            let mut rebuilt = None;
            if rebuild {
                let r = open_repo(&repo, LockMode::Exclusive, cli.lock_wait, &bar)?;
                let rep = rebuild_index(&r, &bar)
                    .context("index rebuild failed; the old index is untouched")?;
                if !json {
                    println!(
                        "rebuilt index from {} packs: {} objects, {} generations",
                        rep.packs, rep.objects, rep.generations
                    );
                    if let Some(old) = &rep.old_index {
                        println!("  previous index kept as {old}");
                    }
                    for i in &rep.incomplete {
                        println!("  not recovered: {i}");
                    }
                    for d in &rep.damaged {
                        println!("  damaged: {d}");
                    }
                }
                rebuilt = Some(rep);
            }
            let r = open_repo(&repo, LockMode::Read, cli.lock_wait, &bar)?;
            let report = check(&r, read, &bar)?;
            if json {
                print_json(
                    &serde_json::json!({ "ok": report.ok(), "check": report, "rebuild": rebuilt }),
                );
            } else {
                cli::print_check_findings(&report);
                println!(
                    "{}: {} generations, {} objects ({}){}",
                    if report.ok() {
                        "ok"
                    } else if report.damaged.is_empty() && report.index_incomplete {
                        "INDEX INCOMPLETE"
                    } else {
                        "DAMAGE FOUND"
                    },
                    report.generations,
                    report.objects,
                    human(report.stored_bytes),
                    if read != ReadData::None {
                        format!(", {} objects read and verified", report.objects_read)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Prune(args) => cli::prune(args, cli.lock_wait),
        Command::Gc(args) => cli::gc(args, cli.lock_wait),
        Command::ImportGhettovcb(args) => cli::import_ghettovcb(args, cli.lock_wait),
        Command::Key(cmd) => cli::keys::run(cmd, cli.lock_wait),
        Command::Run(args) => cli::run::run(args, cli.lock_wait),
        Command::Inspect(args) => cli::inspect::inspect(args),
    }
}

/// Ctrl-C, SIGTERM and SIGHUP, for every command but mount and serve-nbd (which wait for them
/// themselves to unmount and close cleanly): blocked before any thread starts, so that every
/// thread inherits the mask and none is killed by them, and received by one thread, which
/// kills the running hooks, runs every owed post-command with `VMREPO_STATUS=interrupted`
/// (each VM of a job in flight gets its own) and exits 130. An interrupted ingest records no
/// generation: the generation becomes visible only in its last index transaction.
fn stop_on_termination_signals(signals: vmrepo::shutdown::TerminationSignals) {
    std::thread::spawn(move || {
        let sig = signals.wait();
        eprintln!(
            "vmrepo: {sig}: stopping (an ingest that has not committed records no generation)"
        );
        for e in vmrepo::ingest::hooks::interrupt() {
            eprintln!("vmrepo: error: {e}");
        }
        std::process::exit(130);
    });
}

/// Opens a repository, waiting up to `lock_wait` seconds for its lock (saying so on stderr).
fn open_repo(
    path: &std::path::Path,
    mode: LockMode,
    lock_wait: u64,
    bar: &Bar,
) -> anyhow::Result<Repository> {
    let repo = Repository::open_with(
        path,
        mode,
        &vmrepo::repo::OpenOptions {
            lock_wait: std::time::Duration::from_secs(lock_wait),
            on_wait: &|msg| bar.note(msg),
            passphrase: &|| {
                current_passphrase().map_err(|e| {
                    vmrepo::Error::Usage(format!(
                        "repository {} is encrypted: {e:#}",
                        path.display()
                    ))
                })
            },
        },
    )?;
    if let Some(why) = repo.unguarded() {
        bar.note(&format!("warning: {why}"));
    }
    Ok(repo)
}

/// Where the passphrase of an encrypted repository comes from (set once from the options).
static PASSPHRASE: std::sync::OnceLock<cli::passphrase::Source> = std::sync::OnceLock::new();
/// The passphrase, asked for at most once per run.
static PASSPHRASE_VALUE: std::sync::Mutex<Option<zeroize::Zeroizing<String>>> =
    std::sync::Mutex::new(None);

/// The current passphrase of the repository being opened.
pub(crate) fn current_passphrase() -> anyhow::Result<zeroize::Zeroizing<String>> {
    let mut cached = PASSPHRASE_VALUE.lock().unwrap();
    if let Some(p) = cached.as_ref() {
        return Ok(p.clone());
    }
    let p = PASSPHRASE
        .get()
        .cloned()
        .unwrap_or_else(|| cli::passphrase::Source::repository(None, None))
        .get(false)?;
    *cached = Some(p.clone());
    Ok(p)
}
