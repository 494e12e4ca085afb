//! `vmrepo copy`: copy generations to another repository (off-site, or back).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};
use crate::cli::passphrase::Source;
use vmrepo::copy::{copy, CopyOptions, CopyReport};
use vmrepo::progress::Progress;
use vmrepo::repo::index::GenerationInfo;
use vmrepo::repo::lock::LockMode;
use vmrepo::Repository;

pub const HELP: &str = "Copy generations from SRC to DST, two repositories anywhere (a \
directory or s3://BUCKET/PREFIX): a local repository off-site, or back. Name VMs (all their \
generations) or single generations as VM@-N, VM@latest or VM@TIME; without any, every generation \
of every VM is copied. Generations DST holds already (same VM and time) are skipped, so running \
the same copy every night sends only the new ones, and of those only the data DST lacks. When \
the repositories have different keys (another passphrase's master key, or one is not encrypted), \
every object is read from SRC, verified and stored under DST's keys. Each generation appears in \
DST whole or not at all; afterwards what was stored is read back and verified (--no-verify \
skips that). DST must cut disks with the same chunker parameters as SRC (the default for every \
repository). DST's passphrase comes from VMREPO_TO_PASSWORD, --to-password-file, \
--to-password-command or a prompt; SRC's as usual.";

/// `vmrepo copy` arguments.
#[derive(Args)]
pub struct CopyArgs {
    /// The repository to copy from.
    src: PathBuf,
    /// The repository to copy into (made with `vmrepo init`).
    dst: PathBuf,
    /// VMs or generations to copy (VM, VM@-N, VM@latest, VM@TIME); all when none.
    generations: Vec<String>,
    /// Read DST's passphrase from this file (first line).
    #[arg(long, value_name = "FILE")]
    to_password_file: Option<PathBuf>,
    /// Get DST's passphrase from this command's output (first line).
    #[arg(long, value_name = "CMD")]
    to_password_command: Option<String>,
    /// Do not read back what was stored in DST.
    #[arg(long)]
    no_verify: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl CopyArgs {
    fn to_passphrase(&self) -> Source {
        Source {
            file: self.to_password_file.clone(),
            command: self.to_password_command.clone(),
            env: "VMREPO_TO_PASSWORD",
            what: "passphrase of the destination",
        }
    }
}

/// The generations `specs` name in `src` (all when empty), oldest first, each once.
pub fn select(src: &Repository, specs: &[String]) -> anyhow::Result<Vec<GenerationInfo>> {
    let mut out: Vec<GenerationInfo> = Vec::new();
    src.with_index(|index| {
        if specs.is_empty() {
            out = index.generations(None)?;
            return Ok(());
        }
        for spec in specs {
            if spec.contains('@') {
                out.push(index.resolve(spec)?);
            } else {
                let gens = index.generations(Some(spec))?;
                if gens.is_empty() {
                    // Says which VMs there are.
                    index.resolve(spec)?;
                }
                out.extend(gens);
            }
        }
        Ok(())
    })?;
    out.sort_by(|a, b| (&a.vm, &a.time).cmp(&(&b.vm, &b.time)));
    out.dedup_by(|a, b| a.manifest == b.manifest);
    Ok(out)
}

/// Runs `vmrepo copy`.
pub fn run(a: CopyArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let bar = Bar::new(!a.json);
    if a.src == a.dst {
        bail!("SRC and DST are the same repository ({})", a.src.display());
    }
    let src = ctx.open_repo(&a.src, LockMode::Read, &bar)?;
    let dst = ctx
        .open_other_repo(&a.dst, LockMode::Shared, &a.to_passphrase(), &bar)
        .with_context(|| {
            format!(
                "cannot open the destination {} (an encrypted destination's passphrase comes \
                 from VMREPO_TO_PASSWORD, --to-password-file or --to-password-command)",
                a.dst.display()
            )
        })?;
    if src.keys().encrypted() && !dst.keys().encrypted() {
        bar.note(&format!(
            "warning: {} is encrypted and {} is not: the copies are readable by anyone who can \
             read {}",
            a.src.display(),
            a.dst.display(),
            a.dst.display()
        ));
    }
    let gens = select(&src, &a.generations)?;
    let report = copy(
        &src,
        &dst,
        &gens,
        &CopyOptions {
            verify: !a.no_verify,
        },
        &bar,
    )
    .with_context(|| {
        format!(
            "copy from {} to {} failed",
            a.src.display(),
            a.dst.display()
        )
    })?;
    if a.json {
        print_json(&report);
    } else {
        print_copy(&report);
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn print_copy(r: &CopyReport) {
    for c in &r.copied {
        println!(
            "copied {}: {} new object(s), {}{}",
            c.generation,
            c.objects_new,
            human(c.bytes_new),
            if c.objects_verified > 0 {
                format!(", {} read back and verified", c.objects_verified)
            } else {
                String::new()
            }
        );
    }
    for p in &r.present {
        println!("already there: {p}");
    }
    for (g, why) in &r.failed {
        println!("NOT COPIED {g}: {why}");
    }
    println!(
        "{} generation(s) copied, {} already there, {} failed; read {}, stored {} in {:.1} s",
        r.copied.len(),
        r.present.len(),
        r.failed.len(),
        human(r.bytes_read),
        human(r.bytes_stored),
        r.seconds
    );
}
