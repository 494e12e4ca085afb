//! `vmrepo stats`: what the repository holds and what each VM and generation costs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use vmrepo::maintain::stats::stats as run_stats;
use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};

pub const HELP: &str = "Show what the repository holds and what each VM and generation really \
costs after deduplication. Per VM and per generation: the logical (virtual) size, the distinct data \
it references, UNIQUE: what only it references, which removing it (forget or prune, then gc) would \
free, stored size after compression in brackets, and SHARED: its data that other generations use \
too. For the repository: what the packs hold, what generations reference (the rest is what gc \
would free), and the dedup and compression ratios. Reads the generations' metadata (each distinct \
segment once), never their data; memory follows the number of stored objects (about 70 bytes \
each). With VM names, only those VMs are shown (sharing is still judged against every VM); \
--generations lists every generation.";

/// `vmrepo stats` arguments.
#[derive(Args)]
pub struct StatsArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Only these VMs (default: every VM).
    vms: Vec<String>,
    /// Also list every generation of the VMs shown.
    #[arg(long)]
    generations: bool,
    /// Print JSON (always with every generation).
    #[arg(long)]
    json: bool,
}

/// Runs `vmrepo stats`.
pub fn run(a: StatsArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    let repo = ctx.open_repo(&a.repo, LockMode::Read, &bar)?;
    let s = run_stats(&repo, &a.vms, &bar).context("stats failed")?;
    if a.json {
        print_json(&s);
        return Ok(ExitCode::SUCCESS);
    }
    let unique =
        |b: &vmrepo::maintain::stats::Bytes| format!("{} ({})", human(b.raw), human(b.stored));
    println!(
        "repository {}: {} VM(s), {} generation(s)",
        a.repo.display(),
        s.vm_count,
        s.generations
    );
    println!(
        "  packs hold      {} in {} objects ({} before compression)",
        human(s.stored.stored),
        s.stored.objects,
        human(s.stored.raw)
    );
    println!(
        "  referenced      {} in {} objects; {} is referenced by no generation (gc frees it)",
        human(s.referenced.stored),
        s.referenced.objects,
        human(s.stored.stored.saturating_sub(s.referenced.stored))
    );
    println!(
        "  logical         {} of disks; {} of data in all generations, kept as {} of chunks",
        human(s.logical_bytes),
        human(s.chunk_bytes),
        human(s.referenced.raw)
    );
    println!(
        "  dedup {:.1}x, compression {:.2}x",
        s.dedup_ratio, s.compression_ratio
    );
    println!();
    println!(
        "{:<24} {:>5}  {:<20}  {:<20}  {:>10}  {:>23}",
        "VM", "GENS", "OLDEST", "NEWEST", "DATA", "UNIQUE (STORED)"
    );
    for v in &s.vms {
        println!(
            "{:<24} {:>5}  {:<20}  {:<20}  {:>10}  {:>23}",
            v.vm,
            v.generations.len(),
            v.oldest,
            v.newest,
            human(v.chunk_bytes),
            unique(&v.unique)
        );
        if a.generations {
            for g in &v.generations {
                println!(
                    "  {:<45} data {:>10}  unique {:>23}  shared {:>10}",
                    g.generation,
                    human(g.chunk_bytes),
                    unique(&g.unique),
                    human(g.shared_bytes)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
