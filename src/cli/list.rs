//! `vmrepo list`: list VMs, or the generations of one VM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};

/// `vmrepo list` arguments.
#[derive(Args)]
pub struct ListArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Show this VM's generations (default: one line per VM).
    vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vmrepo list`.
pub fn run(a: ListArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let ListArgs { repo, vm, json } = a;
    let r = ctx.open_repo(&repo, LockMode::Read, &Bar::new(false))?;
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
                        .map(|d| format!("{} {} {}", d.slot, d.create_type, human(d.virtual_size)))
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
