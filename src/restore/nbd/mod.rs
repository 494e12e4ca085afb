//! `vmrepo serve-nbd`: one disk of a generation served read-only over the NBD protocol, so that
//! `qemu-img`, `qemu-nbd`, `nbd-client` or a booting `qemu-system-x86_64` read it straight from
//! the repository (instant recovery).
//!
//! Implemented from the public NBD protocol description: fixed newstyle handshake with
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO` and `NBD_OPT_GO`
//! (export size and flags, name, description, block sizes), `NBD_OPT_STRUCTURED_REPLY` and
//! `NBD_OPT_LIST/SET_META_CONTEXT` for the one context `base:allocation`; other options are
//! refused with `NBD_REP_ERR_UNSUP` (TLS with `NBD_REP_ERR_POLICY`). Transmission answers
//! `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` (data extents, and holes that read as zeros) and
//! `NBD_CMD_DISC`, with simple replies or, once negotiated, structured ones (reads then send zero
//! runs of 64 KiB or more as hole chunks, and errors carry a message); writes and trims get
//! `EPERM`, requests outside the export or reads longer than the advertised maximum `EINVAL`,
//! reads of damaged data `EIO`. A client that breaks the protocol is disconnected; no client can
//! stop the server or disturb another. Each client has a thread that reads its requests and
//! four that answer them, several at once (qemu keeps many reads in flight), each holding at
//! most 4 MiB of a reply whatever the read's length; all clients share one [`DiskImage`] and
//! its chunk cache.
//!
//! NBD has no authentication: the server listens on loopback addresses unless told otherwise.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Advice, Error, IoContext, Result, Setting};
use crate::repo::Repository;
use crate::restore::reader::{DiskImage, ReadCache};
use crate::shutdown::TerminationSignals;

mod protocol;

pub use crate::restore::log::Logger;
use crate::restore::log::ServiceLog;
use protocol::Server;
pub use protocol::MAX_REQUEST;

/// The one export of a server.
pub struct Export {
    /// Name clients may ask for (the empty name, the default export, works too).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// The disk's bytes.
    pub image: DiskImage,
}

impl Export {
    /// Disk `disk` (0-based, in the order `vmrepo list` shows) of generation `spec`.
    pub fn open(
        repo: Arc<Repository>,
        spec: &str,
        disk: usize,
        cache_bytes: usize,
    ) -> Result<Export> {
        let gen = repo.with_index(|i| i.resolve(spec))?;
        let stored = repo.load_manifest(&gen.manifest)?;
        // The names extract and mount give the disks: one whose file name another disk has
        // already (one VM folder name on two datastores) is named under its datastore.
        let vmx = crate::restore::extract::stored_vmx(&repo, &stored);
        let manifest = crate::restore::extract::place(&stored, vmx.as_deref(), None)?.manifest;
        let Some(d) = manifest.disks.get(disk) else {
            let list: Vec<String> = manifest
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{i}: {}", d.descriptor.as_deref().unwrap_or(&d.slot)))
                .collect();
            return Err(Error::Usage(format!(
                "generation {} has no disk {disk} (its disks: {})",
                gen.name,
                list.join(", ")
            )));
        };
        let file = d
            .descriptor
            .clone()
            .or_else(|| d.extents.iter().find_map(|e| e.file.clone()))
            .unwrap_or_else(|| format!("disk{disk}"));
        let name = file.clone();
        let description = format!("{} disk {} ({}, {})", gen.name, disk, d.slot, file);
        let image = DiskImage::open(
            repo,
            &stored.disks[disk],
            Arc::new(ReadCache::new(cache_bytes)),
        )?;
        Ok(Export {
            name,
            description,
            image,
        })
    }
}

/// Where and how to listen.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// TCP addresses (`HOST:PORT`; port 0 picks a free port).
    pub tcp: Vec<String>,
    /// A Unix socket path.
    pub unix: Option<PathBuf>,
    /// Allow addresses other than loopback.
    pub allow_remote: bool,
    /// Clients served at once; more are disconnected at once.
    pub max_clients: usize,
}

/// Resolves `addr` and refuses non-loopback addresses unless `allow_remote`.
pub fn resolve_listen(addr: &str, allow_remote: bool) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = match addr.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => addr
            .to_socket_addrs()
            .map_err(|e| {
                Error::from(Advice::new("").setting(Setting::Listen).text(format!(
                    " {addr:?} is not an address: {e}; give HOST:PORT, e.g. 127.0.0.1:10809"
                )))
            })?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Advice::new("")
            .setting(Setting::Listen)
            .text(format!(" {addr:?} resolves to nothing"))
            .into());
    }
    if !allow_remote {
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(Advice::new("")
                .setting(Setting::Listen)
                .text(format!(
                    " {addr}: {} is not a loopback address; NBD has no authentication, so \
                     anyone who can reach it could read the whole disk. Use ",
                    a.ip()
                ))
                .setting(Setting::AllowRemote)
                .text(" to serve it on the network anyway (only on a network you trust)")
                .into());
        }
    }
    Ok(addrs)
}

/// Prepares a Unix socket path: a stale socket left by a killed server is removed; a live one
/// or any other file is refused.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Advice::new("")
                .setting(Setting::ListenUnix)
                .text(format!(
                    " {}: a file that is not a socket is in the way; remove it or choose another \
                     path",
                    path.display()
                ))
                .into());
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Advice::new("")
                .setting(Setting::ListenUnix)
                .text(format!(
                    " {}: another server is listening on this socket",
                    path.display()
                ))
                .into());
        }
        std::fs::remove_file(path).ctx("remove stale socket", path)?;
    }
    UnixListener::bind(path).ctx("listen on socket", path)
}

/// Serves `export` on the listeners in `opts` until SIGINT, SIGTERM or SIGHUP. `on_ready`
/// receives the URI of each listener (`nbd://127.0.0.1:10809`, `nbd+unix:///?socket=PATH`)
/// once clients can connect.
pub fn serve(
    export: Export,
    opts: &ServeOptions,
    log: Logger,
    on_ready: impl FnOnce(&[String]),
) -> Result<()> {
    let mut tcp = Vec::new();
    for a in &opts.tcp {
        for addr in resolve_listen(a, opts.allow_remote)? {
            let l = TcpListener::bind(addr).ctx("listen on", addr.to_string())?;
            tcp.push(l);
        }
    }
    let unix = match &opts.unix {
        Some(p) => Some(bind_unix(p)?),
        None => None,
    };
    if tcp.is_empty() && unix.is_none() {
        return Err(Advice::new("nothing to listen on: give ")
            .setting(Setting::Listen)
            .text(" or ")
            .setting(Setting::ListenUnix)
            .into());
    }
    // Before any thread is started: only the wait below receives the termination signals.
    let signals = TerminationSignals::block()?;
    let server = Arc::new(Server {
        export,
        log: ServiceLog::new(log.clone()),
        active: AtomicUsize::new(0),
        max_clients: opts.max_clients.max(1),
    });
    let mut uris = Vec::new();
    for l in tcp {
        let local = l.local_addr().ctx("listen on", "tcp socket")?;
        uris.push(match local {
            SocketAddr::V6(a) => format!("nbd://[{}]:{}", a.ip(), a.port()),
            SocketAddr::V4(a) => format!("nbd://{a}"),
        });
        let srv = server.clone();
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || loop {
                match l.accept() {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        srv.log.note(&format!("client {peer}: connected"));
                        srv.serve_client(stream, peer.to_string());
                    }
                    Err(e) => {
                        srv.log.note(&format!("accept on {local} failed: {e}"));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .ctx("start a thread for", local.to_string())?;
    }
    if let (Some(l), Some(path)) = (unix, &opts.unix) {
        uris.push(format!("nbd+unix:///?socket={}", path.display()));
        let srv = server.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("nbd-accept-unix".into())
            .spawn(move || {
                let mut n = 0u64;
                loop {
                    match l.accept() {
                        Ok((stream, _)) => {
                            n += 1;
                            let peer = format!("{shown}#{n}");
                            srv.log.note(&format!("client {peer}: connected"));
                            srv.serve_client(stream, peer);
                        }
                        Err(e) => {
                            srv.log.note(&format!("accept on {shown} failed: {e}"));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .ctx("start a thread for", path)?;
    }
    on_ready(&uris);
    let sig = signals.wait();
    log(&format!("{sig}: stopping"));
    if let Some(p) = &opts.unix {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_must_be_loopback_unless_allowed() {
        assert!(resolve_listen("127.0.0.1:0", false).is_ok());
        assert!(resolve_listen("[::1]:0", false).is_ok());
        let e = resolve_listen("0.0.0.0:10809", false).unwrap_err();
        assert!(e.to_string().contains("--allow-remote"), "{e}");
        assert!(resolve_listen("0.0.0.0:10809", true).is_ok());
        assert!(resolve_listen("not an address", false).is_err());
    }
}
