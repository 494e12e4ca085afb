//! `vmrepo inspect`: arguments, help text and the human-readable report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use vmrepo::source::chain::ChainOptions;
use vmrepo::vmware::inspect::{inspect as run_inspect, Inspection};

use crate::cli::output::{human, print_json};

pub const HELP: &str = "Show what `vmrepo ingest` would read from SOURCE (a VM directory, a \
.vmx file or a disk file) without reading the data: the VM name; each disk with its chain from the \
file the VM names down to the base (file, createType, CID and parentCID, virtual size, bytes each link \
stores); the snapshots listed in the .vmsd with their age; and warnings: a broken chain (missing parent, \
CID mismatch, loop, damaged file), a snapshot older than 3 days or a chain deeper than 2 links \
(snapshots left behind slow the VM and fill the datastore), independent disks (a snapshot does not \
freeze them), physical RDMs (their data is not in files). Files are opened read-only, and only inside \
the VM's directory, /vmfs/volumes, --datastore-map targets and --allow-path directories (as ingest). \
Exit status: 0, or 1 when a disk's chain is broken.";

#[derive(Args)]
pub struct InspectArgs {
    /// VM directory, .vmx file or disk file (VMDK descriptor, sparse VMDK, qcow2, raw).
    source: PathBuf,
    /// Find files named by absolute datastore paths in a local directory
    /// (`/vmfs/volumes/ds1=/mnt/ds1`). Repeatable.
    #[arg(long, value_name = "DATASTORE=DIR", value_parser = ChainOptions::parse_map)]
    datastore_map: Vec<(PathBuf, PathBuf)>,
    /// Also read files the VM's files name inside DIR (a datastore or image directory you
    /// trust); by default only the VM's own directory, /vmfs/volumes and --datastore-map
    /// targets. Repeatable.
    #[arg(long, value_name = "DIR")]
    allow_path: Vec<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let opts = ChainOptions {
        datastore_map: vmrepo::source::confine::with_allowed(a.datastore_map, &a.allow_path),
    };
    let r = run_inspect(&a.source, &opts, jiff::Timestamp::now())
        .with_context(|| format!("cannot inspect {}", a.source.display()))?;
    if a.json {
        print_json(&r);
    } else {
        print(&r);
    }
    Ok(if r.disks.iter().any(|d| d.error.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print(r: &Inspection) {
    println!("VM {} ({})", r.vm, r.source);
    for d in &r.disks {
        let mode = d
            .mode
            .as_deref()
            .map(|m| format!(" [{m}]"))
            .unwrap_or_default();
        println!("disk {} {}{}", d.slot, d.file, mode);
        for (i, l) in d.chain.iter().enumerate() {
            let cid = match (&l.cid, &l.parent_cid) {
                (Some(c), Some(pc)) => format!("  CID {c} parent {pc}"),
                (Some(c), None) => format!("  CID {c}"),
                _ => String::new(),
            };
            println!(
                "  {}{}{}{}  {} virtual, {} allocated",
                "  ".repeat(i),
                if i == 0 { "" } else { "└ " },
                l.file,
                format_args!(" ({}){cid}", l.create_type),
                human(l.virtual_size),
                human(l.allocated_bytes)
            );
        }
        if let Some(e) = &d.error {
            println!("  BROKEN: {e}");
        }
    }
    if !r.snapshots.is_empty() {
        println!("snapshots:");
        for s in &r.snapshots {
            println!(
                "  {:?} (uid {}){}  {}{}",
                s.name,
                s.uid,
                if s.current { " current" } else { "" },
                s.created.as_deref().unwrap_or("no creation time"),
                s.age_days
                    .map(|a| format!(", {a:.1} days old"))
                    .unwrap_or_default()
            );
            for (slot, file) in &s.disks {
                println!("    {slot}: {file}");
            }
        }
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
}
