//! `vmrepo extract`: restore a generation into a directory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use vmrepo::repo::lock::LockMode;
use vmrepo::restore::extract::{extract, ExtractOptions};
use vmrepo::vmware::relocate::DatastoreMap;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};

pub const HELP: &str = "Write generation GENERATION back into DEST: the VM's small files byte for byte \
and each disk in its original layout as sparse files: flat disks (descriptor plus flat extent files, or \
the raw image) byte for byte; monolithicSparse, twoGbMaxExtentSparse, streamOptimized and qcow2 disks laid \
out afresh by vmrepo's own writers (same content, readable by qemu-img and VMware tools). A disk ingested \
from a snapshot chain restores flattened into one link under the name the VM refers to, in its base \
link's format (an ESXi vmfs base with seSparse deltas comes back as a vmfs flat pair). --disk-format \
converts every disk instead. GENERATION is VM (the latest), VM@-1 (the one before), VM@-N, or VM@YYYY-MM-DDTHH:MM:SSZ. Every \
chunk is verified against its hash; files appear under their final names only when complete.";

/// `vmrepo extract` arguments.
#[derive(Args)]
pub struct ExtractArgs {
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
}

/// Runs `vmrepo extract`.
pub fn run(a: ExtractArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let ExtractArgs {
        repo,
        generation,
        dest,
        force,
        disk_only,
        allow_damaged,
        datastore_map,
        disk_format,
        json,
    } = a;
    let map = DatastoreMap::parse(&datastore_map)?;
    let bar = Bar::new(!json);
    let r = ctx.open_repo(&repo, LockMode::Read, &bar)?;
    let opts = ExtractOptions {
        force,
        disk_only,
        allow_damaged,
        datastore_map: map.clone(),
        disk_format,
    };
    let report = extract(&r, &generation, &dest, &opts, &bar)
        .with_context(|| format!("extract of {generation} into {} failed", dest.display()))?;
    let unused = map.unused();
    if json {
        let mut v = serde_json::to_value(&report).expect("serializable");
        if !map.is_empty() {
            v["relocated"] = serde_json::to_value(map.rewrites()).expect("serializable");
            v["unused_datastore_maps"] = serde_json::to_value(&unused).expect("serializable");
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
        eprintln!(
            "vmrepo: warning: --datastore-map {u} matched no path in the .vmx or the descriptors"
        );
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
