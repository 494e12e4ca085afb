//! `vmrepo ingest`: back up a VM directory or a disk image as a new generation.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use vmrepo::ingest::options::VmSettings;
use vmrepo::ingest::{ingest, IngestOptions};
use vmrepo::repo::lock::LockMode;
use vmrepo::vmware::preflight::Limits;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};

pub const HELP: &str = "Read SOURCE and store it as a new generation of its VM. SOURCE is a VM directory \
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
disk; files are only ever opened read-only. Use `vmrepo inspect` to see what would be read.";

/// `vmrepo ingest` arguments.
#[derive(Args)]
pub struct IngestArgs {
    /// Repository directory.
    repo: PathBuf,
    /// VM directory, .vmx file, flat VMDK descriptor or raw disk image; or a VM on a vSphere
    /// host: esxi://USER@HOST[:PORT]/VMNAME or vcenter://USER@VC[:PORT]/DATACENTER/vm/PATH
    /// (vmrepo takes a snapshot, reads the frozen disks over HTTPS and removes it).
    source: PathBuf,
    /// VM name (default: the .vmx displayName, or the image file name without extension).
    #[arg(long)]
    name: Option<String>,
    /// Record the generation at this UTC time (e.g. 2026-09-01T01:30:00Z) instead of now:
    /// how existing backups come in with their real dates. Refused if the VM already has a
    /// generation at that time.
    #[arg(long, value_name = "TIME", value_parser = crate::cli::parse_time)]
    time: Option<jiff::Timestamp>,
    /// Change-aware ingest: a JSON list of the byte ranges that changed since --since (as
    /// exported from VMware CBT or a QEMU dirty bitmap; format in docs/NIGHTLY.md). Only
    /// the segments they touch are read; the rest is taken from that generation.
    #[arg(long, value_name = "FILE")]
    changed_ranges: Option<PathBuf>,
    /// The generation the changed ranges are relative to (VM@TIME, VM@-N, VM).
    #[arg(long, value_name = "GENERATION", requires = "changed_ranges")]
    since: Option<String>,
    /// Re-read this share of the segments the changed ranges (or a vSphere host's
    /// changed-block tracking) call unchanged and fail the ingest if any differs (catches a
    /// wrong list), e.g. 1%.
    #[arg(long, value_name = "PERCENT",
          value_parser = crate::cli::parse_percent, default_value = "0%")]
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
    #[arg(long, value_name = "SECONDS", default_value_t = vmrepo::ingest::options::DEFAULT_HOOK_TIMEOUT_SECONDS)]
    hook_timeout: u64,
    /// Warn (or with --strict refuse) when the VM has a snapshot older than this.
    #[arg(long, value_name = "DAYS", default_value_t = Limits::default().max_snapshot_age_days)]
    max_snapshot_age: f64,
    /// Warn (or with --strict refuse) when a disk has more deltas than this above its base.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_chain_depth)]
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
    #[command(flatten)]
    vsphere: crate::cli::vsphere::VsphereArgs,
}

/// Runs `vmrepo ingest`.
pub fn run(a: IngestArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let IngestArgs {
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
        vsphere,
    } = a;
    if verify_unchanged > 0.0
        && changed_ranges.is_none()
        && !vmrepo::vsphere::is_vsphere(&source.to_string_lossy())
    {
        anyhow::bail!(
            "--verify-unchanged checks what a change list calls unchanged: give --changed-ranges \
             (or back up a VM on a vSphere host, whose changed-block tracking gives the list)"
        );
    }
    let connect = vsphere.connect(&source, strict)?;
    if connect.is_none() && vsphere.any_given() {
        anyhow::bail!(
            "--tls-thumbprint, --tls-ca, --source-password-* and --quiesce are for a VM on a \
             vSphere host (esxi://USER@HOST/VM); {} is a local path",
            source.display()
        );
    }
    let bar = Bar::new(!json);
    let changes = changed_ranges
        .as_deref()
        .map(vmrepo::ingest::changes::ChangedRanges::load)
        .transpose()?;
    let r = ctx.open_repo(&repo, LockMode::Shared, &bar)?;
    let settings = VmSettings {
        pre_command,
        post_command,
        hook_timeout: Some(hook_timeout),
        name,
        at_snapshot,
        max_snapshot_age_days: Some(max_snapshot_age),
        max_chain_depth: Some(max_chain_depth),
        strict: Some(strict),
        full_read: Some(full_read),
        allow_paths: allow_path,
        ..VmSettings::default()
    };
    let opts = IngestOptions {
        time,
        changes,
        since,
        verify_unchanged,
        vsphere: connect,
        ..settings.ingest_options(datastore_map, &ctx.interrupt, &ctx.workers)
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
        if let Some(t) = &report.transfer {
            println!(
                "  transfer    {} requests, {} sent, {} received (object storage, whole command)",
                t.requests,
                human(t.bytes_up),
                human(t.bytes_down)
            );
        }
        if let Some(i) = &report.incremental {
            println!(
                "  changes     since {} ({}): {} segments taken unread, {} patched around \
                 their changes, {} re-read to verify",
                i.since, i.source, i.segments_taken, i.segments_patched, i.segments_verified
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
        if let Some(t) = &report.host_traffic {
            println!(
                "  host        {} datastore requests, {} received over HTTPS",
                t.requests,
                human(t.bytes_down)
            );
        }
        if let Some(c) = &report.snapshot_left_behind {
            println!("  snapshot    NOT removed: {c}");
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
