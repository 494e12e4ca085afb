//! `vmrepo check`: verify the repository; exits non-zero on any damage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use vmrepo::maintain::check::{check, CheckReport, ReadData};
use vmrepo::maintain::rebuild::{rebuild_index, RecordSource};
use vmrepo::maintain::repair::RepairReport;
use vmrepo::repo::lock::LockMode;

use crate::cli::context::Context;
use crate::cli::output::{human, print_json, Bar};

pub const HELP: &str = "Check that the index and the pack files agree and that every generation's \
manifest, disk maps, segments and chunks are present. With --read-data, also read, decompress and \
re-hash every stored object; --read-data-subset reads part of them (10% at random, or slice 3/7 so \
that seven nightly runs read everything once). Damaged generations and disks are named. With \
--rebuild-index, first rebuild index.sqlite from the pack files alone (the old index is kept beside \
it; while it runs the new index and its write-ahead log need about twice the old index's size free \
on the same disk), then check. With --repair, read everything, rebuild the index if it is missing or damaged, drop \
index entries whose data is missing or corrupt, and mark the generations that lost data as damaged \
(extract refuses them unless --allow-damaged; a later ingest that reads the same data again stores \
it again and heals them). Exit status: 0 when nothing is damaged, 1 otherwise.";

/// `vmrepo check` arguments.
#[derive(Args)]
pub struct CheckArgs {
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
}

/// Runs `vmrepo check`.
pub fn run(a: CheckArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let CheckArgs {
        repo,
        read_data,
        read_data_subset,
        rebuild_index: rebuild,
        repair,
        json,
    } = a;
    let bar = Bar::new(!json);
    if repair {
        let r = ctx.open_repo(&repo, LockMode::Exclusive, &bar)?;
        return print_repair(&vmrepo::maintain::repair::repair(&r, &bar)?, json);
    }
    let read = match (read_data, read_data_subset) {
        (_, Some(subset)) => subset,
        (true, None) => ReadData::All,
        (false, None) => ReadData::None,
    };
    let mut rebuilt = None;
    if rebuild {
        let r = ctx.open_repo(&repo, LockMode::Exclusive, &bar)?;
        let rep = rebuild_index(&r, RecordSource::PackFiles, &bar)
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
            for n in &rep.notes {
                println!("  note: {n}");
            }
            for d in &rep.shadowed {
                println!(
                    "  not listed: {d}: a generation of that name is listed from another manifest"
                );
            }
            if rep.uncommitted > 0 {
                println!(
                    "  left out {} pack(s) of ingests that never committed (gc deletes them)",
                    rep.uncommitted
                );
            }
        }
        rebuilt = Some(rep);
    }
    let r = ctx.open_repo(&repo, LockMode::Read, &bar)?;
    let report = check(&r, read, &bar)?;
    if json {
        print_json(&serde_json::json!({ "ok": report.ok(), "check": report, "rebuild": rebuilt }));
    } else {
        print_check_findings(&report);
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

/// Prints check's problems, damaged generations and notes.
pub fn print_check_findings(report: &CheckReport) {
    for p in &report.problems {
        println!("PROBLEM  {p}");
    }
    for d in &report.damaged {
        println!("DAMAGED  {}: {}", d.generation, d.parts.join(", "));
        for p in &d.problems {
            println!("         {p}");
        }
    }
    for n in &report.notes {
        println!("note     {n}");
    }
}

/// Prints a repair report; exit 0 when nothing is damaged any more.
pub fn print_repair(r: &RepairReport, json: bool) -> anyhow::Result<ExitCode> {
    let ok = r.check.ok();
    if json {
        print_json(&serde_json::json!({ "ok": ok, "repair": r }));
    } else {
        if let (Some(why), Some(rb)) = (&r.rebuild_reason, &r.rebuilt) {
            println!(
                "index rebuilt from {} data files ({}): {} objects, {} generations",
                rb.packs, why, rb.objects, rb.generations
            );
        }
        for p in &r.adopted_packs {
            println!("indexed  data file {p}: it was not in the index");
        }
        for g in &r.adopted {
            println!("listed   {g}: it was in the data files but not in the index");
        }
        for p in &r.packs_forgotten {
            println!("forgot   data file {p}: it is gone");
        }
        for p in &r.packs_truncated {
            println!("fixed    data file {p}: recorded its real (truncated) length");
        }
        if r.objects_reindexed > 0 {
            println!(
                "indexed  {} object(s) again: the data files hold them whole, the index had \
                 no entry",
                r.objects_reindexed
            );
        }
        if r.objects_dropped > 0 {
            println!(
                "dropped  {} index entries whose data is missing or corrupt",
                r.objects_dropped
            );
        }
        for (g, d) in &r.damaged {
            println!("DAMAGED  {g}: {d}");
        }
        for g in &r.healed {
            println!("healed   {g}");
        }
        print_check_findings(&r.check);
        if ok {
            println!("ok: the repository is consistent and no generation is damaged");
        } else if !r.damaged.is_empty() {
            println!(
                "repaired: {} generation(s) are marked damaged. Ingest their VMs again to store the \
                 lost data again (they heal if the data is still the same), or prune them; `vmrepo \
                 extract --allow-damaged` restores what is left.",
                r.damaged.len()
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
