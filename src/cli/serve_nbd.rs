//! `vmrepo serve-nbd`: serve one disk of a generation read-only over NBD (instant recovery, qemu-img).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use vmrepo::repo::lock::LockMode;
use vmrepo::restore::nbd::{resolve_listen, serve, Export, ServeOptions};

use crate::cli::context::Context;
use crate::cli::output::{human, Bar};

pub const HELP: &str =
    "Serve disk N (default 0, the first in `vmrepo list` order) of GENERATION as a \
read-only NBD export until Ctrl-C (or SIGTERM). Any NBD client reads it straight from the \
repository: `qemu-img compare nbd://127.0.0.1:10809 disk.img`, `qemu-img convert -O qcow2 \
nbd://127.0.0.1:10809 out.qcow2`, or boot the VM from it with `qemu-system-x86_64 -drive \
file=nbd://127.0.0.1:10809,format=raw,snapshot=on` (guest writes go to a temporary overlay; the \
backup is never written). The export is the guest's view of the disk (raw bytes, as the VM sees \
them); its name is the disk's descriptor or image file name, and the default (empty) name works \
too. Several clients may read at once. Clients that ask for it (qemu-img, qemu, nbdinfo) learn \
where the disk holds data and where it is all zeros (NBD block status, `base:allocation`), so \
`qemu-img map` shows the data and `qemu-img convert` copies only the data and leaves holes.\n\nNBD has no authentication and no encryption: anyone who \
can connect can read the whole disk. The server listens on 127.0.0.1:10809 unless told otherwise \
and refuses non-loopback addresses without --allow-remote. The repository's shared lock is held \
while serving: prune, gc and index rebuilds wait.";

/// `vmrepo serve-nbd` arguments.
#[derive(Args)]
pub struct ServeNbdArgs {
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
    /// Clients served at once. Each may cost up to 16 MiB of replies in flight (four requests
    /// answered at once, at most 4 MiB of each held), beside the shared chunk cache.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_clients: usize,
    /// Memory for decompressed chunks, in MiB.
    #[arg(long, default_value_t = (vmrepo::restore::reader::DEFAULT_CACHE_BYTES >> 20) as u32, value_name = "MIB")]
    cache_size: u32,
}

/// Runs `vmrepo serve-nbd`.
pub fn run(a: ServeNbdArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let ServeNbdArgs {
        repo,
        generation,
        disk,
        mut listen,
        listen_unix,
        allow_remote,
        max_clients,
        cache_size,
    } = a;
    if listen.is_empty() && listen_unix.is_none() {
        listen.push("127.0.0.1:10809".into());
    }
    // Check the addresses before the (slower) repository work.
    for a in &listen {
        resolve_listen(a, allow_remote)?;
    }
    let r = Arc::new(ctx.open_repo(&repo, LockMode::Read, &Bar::new(false))?);
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
    let log: vmrepo::restore::nbd::Logger = Arc::new(|m: &str| eprintln!("vmrepo: nbd: {m}"));
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
