//! `vmrepo mount`: mount generations read-only as VM directories (FUSE), for single-file restore.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use vmrepo::repo::lock::LockMode;
use vmrepo::restore::mount::{mount, FilesViews, MountOptions};

use crate::cli::context::Context;
use crate::cli::output::Bar;

pub const HELP: &str = "Mount the repository read-only at MOUNTPOINT (an existing directory) and serve it \
until it is unmounted. The tree is MOUNTPOINT/<vm>/<generation time>/ with each generation's files \
exactly as `vmrepo extract` would write them (.vmx, .nvram, logs, descriptors and flat disk images \
next to them), and MOUNTPOINT/<vm>/latest, a symlink to the newest generation. With VM only that \
VM's generations are shown, with VM@GEN only that one. The tree shows the generations that existed when it was mounted; \
mount again to see newer ones.\n\nEach generation directory also holds files/: the files inside its \
disks, by volume (files/disk0/p2/etc/hosts, files/disk0/lvm/vg0/root/...), on the volumes `vmrepo ls` \
reads (ext2/3/4, XFS, NTFS, FAT, exFAT), with the guest's modes and owners, which the kernel \
enforces (root reads everything). No root tools and no loop device are needed for them.\n\n\
Reads fetch only the chunks they touch \
and verify them; zero regions cost nothing. Run as root, the mount widens the kernel's readahead \
for itself to 4 MiB, so sequential reads (cp, dd, qemu-img) come in large requests decoded on \
every core. Damaged data gives an I/O error (EIO), never zeros. \
Open a disk in place with qemu-img, debugfs or fuse2fs -o ro, or loop-mount it read-only. Leave \
with Ctrl-C (or SIGTERM), or `fusermount3 -u MOUNTPOINT` from another shell. The repository's \
shared lock is held while mounted: prune, gc and index rebuilds wait.";

/// `vmrepo mount` arguments.
#[derive(Args)]
pub struct MountArgs {
    /// Repository directory.
    repo: PathBuf,
    /// Existing directory to mount on.
    mountpoint: PathBuf,
    /// Only this VM (VM) or this generation (VM@-N, VM@TIME).
    generation: Option<String>,
    /// Memory for decompressed chunks, in MiB.
    #[arg(long, default_value_t = (vmrepo::restore::reader::DEFAULT_CACHE_BYTES >> 20) as u32, value_name = "MIB")]
    cache_size: u32,
}

/// Runs `vmrepo mount`.
pub fn run(a: MountArgs, ctx: &Context) -> anyhow::Result<ExitCode> {
    let MountArgs {
        repo,
        mountpoint,
        generation,
        cache_size,
    } = a;
    let r = Arc::new(ctx.open_repo(&repo, LockMode::Read, &Bar::new(false))?);
    let for_files = r.clone();
    let opts = MountOptions {
        selection: generation,
        cache_bytes: (cache_size.max(1) as usize) << 20,
        files: Some(FilesViews(Arc::new(move |info, cache| {
            vmrepo::guest::view::open(for_files.clone(), info, cache)
        }))),
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
