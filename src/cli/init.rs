//! `vmrepo init`: create a new, empty repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use vmrepo::repo::config::ChunkerParams;
use vmrepo::Repository;

use crate::cli::context::Context;

pub const HELP: &str = "Create a new repository in DIR, which must not exist or be empty. The chunking \
and compression parameters are fixed for the life of the repository; the defaults were chosen by \
measurement (docs/PERFORMANCE.md). With --encryption aes-256-gcm every stored object and every \
name, path and size in the index is encrypted under a random master key, wrapped by your passphrase \
(VMREPO_PASSWORD, --password-file, --password-command, or asked twice on a terminal). Losing the \
passphrase means losing the data: add a second one with `vmrepo key add` or keep `vmrepo key \
export`'s output offline. The default, none, is for repositories on storage only you can read \
(docs/SECURITY.md).";

/// `vmrepo init` arguments.
#[derive(Args)]
pub struct InitArgs {
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
    /// Repository format to make (default: the newest). 3 stores a changed chunk whole instead
    /// of compressed against the chunk it replaces: about a quarter more bytes a night, but an
    /// encrypted repository's stored sizes then do not show how much of each chunk a night
    /// rewrote (docs/SECURITY.md). 1 and 2 (without segment deltas) for repositories that older
    /// vmrepo builds must read; an encrypted repository needs 2 or more.
    #[arg(long, value_name = "N", default_value_t = vmrepo::repo::config::FORMAT_VERSION)]
    format: u32,
    /// argon2id memory for the first key, in MiB (1 to 4096).
    #[arg(long, value_name = "MIB", default_value_t = vmrepo::repo::keyfile::KdfCost::default().memory_kib >> 10,
          value_parser = clap::value_parser!(u32).range(1..=(vmrepo::repo::keyfile::KdfCost::MAX_MEMORY_KIB >> 10) as i64))]
    kdf_memory: u32,
}

/// Runs `vmrepo init`.
pub fn run(a: InitArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let InitArgs {
        repo,
        chunk_avg,
        chunk_min,
        chunk_max,
        segment_size,
        compression_level,
        encryption,
        format,
        kdf_memory,
    } = a;
    let avg = chunk_avg.saturating_mul(1024);
    let params = ChunkerParams {
        avg_size: avg,
        min_size: chunk_min.map_or(avg / 4, |k| k.saturating_mul(1024)),
        max_size: chunk_max.map_or(avg.saturating_mul(4), |k| k.saturating_mul(1024)),
        segment_size: segment_size.saturating_mul(1 << 20),
        ..ChunkerParams::default()
    };
    // Before a passphrase is asked for.
    vmrepo::repo::config::check_new_format(
        format,
        vmrepo::repo::config::CutPoints::for_encryption(encryption != "none"),
    )?;
    let pass = if encryption == "none" {
        None
    } else {
        Some(ctx.passphrase_source().get(true)?)
    };
    let enc = pass.as_ref().map(|p| vmrepo::repo::NewEncryption {
        passphrase: p,
        cost: vmrepo::repo::keyfile::KdfCost {
            memory_kib: kdf_memory.max(1) << 10,
            ..Default::default()
        },
    });
    let config = vmrepo::backend::create(&repo, &ctx.remote)
        .and_then(|backend| Repository::init_in(backend, format, params, compression_level, enc))
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
