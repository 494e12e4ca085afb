//! `vmrepo serve-nbd`: one disk of a generation served read-only over the NBD protocol, so that
//! `qemu-img`, `qemu-nbd`, `nbd-client` or a booting `qemu-system-x86_64` read it straight from
//! the repository (instant recovery).
//!
//! Implemented from the public NBD protocol description: fixed newstyle handshake with
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO` and `NBD_OPT_GO`
//! (export size and flags, name, description, block sizes); other options are refused with
//! `NBD_REP_ERR_UNSUP` (TLS with `NBD_REP_ERR_POLICY`). Transmission uses simple replies:
//! `NBD_CMD_READ` and `NBD_CMD_DISC`; writes and trims get `EPERM`, reads outside the export or
//! longer than the advertised maximum `EINVAL`, reads of damaged data `EIO`. A client that
//! breaks the protocol is disconnected; no client can stop the server or disturb another. Each
//! client has its own thread; all share one [`DiskImage`] and its chunk cache.
//!
//! NBD has no authentication: the server listens on loopback addresses unless told otherwise.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::repo::Repository;
use crate::restore::reader::{DiskImage, ReadCache};
use crate::shutdown::TerminationSignals;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;
const NBD_EINVAL: u32 = 22;

/// Largest read served in one request (and the maximum block size advertised).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Preferred block size advertised: one page, the guest's usual unit.
const PREFERRED_BLOCK: u32 = 4096;
/// Largest option payload read during the handshake (export names are at most 4096 bytes).
const MAX_OPTION_LEN: u32 = 16 << 10;
/// A client has this long to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::restore::log::Logger;
use crate::restore::log::ServiceLog;

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
                Error::Usage(format!(
                    "--listen {addr:?} is not an address: {e}; give HOST:PORT, e.g. 127.0.0.1:10809"
                ))
            })?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Error::Usage(format!(
            "--listen {addr:?} resolves to nothing"
        )));
    }
    if !allow_remote {
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(Error::Usage(format!(
                "--listen {addr}: {} is not a loopback address; NBD has no authentication, so \
                 anyone who can reach it could read the whole disk. Pass --allow-remote to serve \
                 it on the network anyway (only on a network you trust)",
                a.ip()
            )));
        }
    }
    Ok(addrs)
}

/// A client connection: TCP or Unix socket.
trait Transport: Read + Write + Send + 'static {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Transport for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Transport for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// Shared state of a running server.
struct Server {
    export: Export,
    log: ServiceLog,
    active: AtomicUsize,
    max_clients: usize,
}

impl Server {
    fn note_once(&self, msg: String) {
        self.log.note_once(msg);
    }

    fn serve_client<S: Transport>(self: &Arc<Self>, stream: S, peer: String) {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max_clients {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.log.note(&format!(
                "client {peer}: refused, {} clients are connected already",
                self.max_clients
            ));
            return;
        }
        let me = self.clone();
        let who = peer.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || {
                let mut stream = stream;
                match me.session(&mut stream) {
                    Ok(()) => me.log.note(&format!("client {who}: disconnected")),
                    // The handshake's read timeout surfaces as WouldBlock/TimedOut.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        me.log.note(&format!(
                            "client {who}: disconnected: it sent nothing for {} s during the \
                             handshake",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ))
                    }
                    Err(e) => me.log.note(&format!("client {who}: disconnected: {e}")),
                }
                me.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.log
                .note(&format!("client {peer}: cannot start a thread: {e}"));
        }
    }

    /// Handshake, then requests until the client disconnects.
    fn session<S: Transport>(&self, s: &mut S) -> io::Result<()> {
        s.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
        if !self.handshake(s)? {
            return Ok(());
        }
        s.set_timeout(None)?;
        self.transmission(s)
    }

    fn transmission_flags(&self) -> u16 {
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    /// Option haggling; true when the client moves on to transmission.
    fn handshake<S: Transport>(&self, s: &mut S) -> io::Result<bool> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello)?;
        let cflags = read_u32(s)?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol(format!("unknown client flags {cflags:#x}")));
        }
        let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        loop {
            let magic = read_u64(s)?;
            if magic != IHAVEOPT {
                return Err(protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = read_u32(s)?;
            let len = read_u32(s)?;
            if len > MAX_OPTION_LEN {
                if !fixed {
                    return Err(protocol(format!("option {opt} of {len} bytes")));
                }
                io::copy(&mut (&mut *s).take(len as u64), &mut io::sink())?;
                self.opt_error(s, opt, REP_ERR_TOO_BIG, "option data too long")?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    if !self.name_matches(&data) {
                        return Err(protocol(format!(
                            "unknown export {:?} requested",
                            String::from_utf8_lossy(&data)
                        )));
                    }
                    let mut out = Vec::with_capacity(10 + 124);
                    out.extend_from_slice(&self.export.image.size().to_be_bytes());
                    out.extend_from_slice(&self.transmission_flags().to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&out)?;
                    return Ok(true);
                }
                _ if !fixed => {
                    return Err(protocol(format!(
                        "option {opt} from a client without fixed newstyle negotiation"
                    )))
                }
                OPT_ABORT => {
                    // The client may already have closed its end.
                    let _ = self.opt_reply(s, opt, REP_ACK, &[]);
                    return Ok(false);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.opt_error(s, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let name = self.export.name.as_bytes();
                    let mut payload = (name.len() as u32).to_be_bytes().to_vec();
                    payload.extend_from_slice(name);
                    self.opt_reply(s, opt, REP_SERVER, &payload)?;
                    self.opt_reply(s, opt, REP_ACK, &[])?;
                }
                OPT_STARTTLS => {
                    self.opt_error(s, opt, REP_ERR_POLICY, "this server does not offer TLS")?
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, requests)) = parse_info_request(&data) else {
                        self.opt_error(s, opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")?;
                        continue;
                    };
                    if !self.name_matches(name) {
                        let msg = format!(
                            "no export named {:?}; this server exports {:?} (or the default, \"\")",
                            String::from_utf8_lossy(name),
                            self.export.name
                        );
                        self.opt_error(s, opt, REP_ERR_UNKNOWN, &msg)?;
                        continue;
                    }
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&self.export.image.size().to_be_bytes());
                    info.extend_from_slice(&self.transmission_flags().to_be_bytes());
                    self.opt_reply(s, opt, REP_INFO, &info)?;
                    if requests.contains(&INFO_NAME) {
                        let mut p = INFO_NAME.to_be_bytes().to_vec();
                        p.extend_from_slice(self.export.name.as_bytes());
                        self.opt_reply(s, opt, REP_INFO, &p)?;
                    }
                    if requests.contains(&INFO_DESCRIPTION) {
                        let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        p.extend_from_slice(self.export.description.as_bytes());
                        self.opt_reply(s, opt, REP_INFO, &p)?;
                    }
                    // Sent whether asked for or not (the protocol allows it): any alignment works.
                    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    p.extend_from_slice(&1u32.to_be_bytes());
                    p.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                    p.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.opt_reply(s, opt, REP_INFO, &p)?;
                    self.opt_reply(s, opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(true);
                    }
                }
                _ => self.opt_error(
                    s,
                    opt,
                    REP_ERR_UNSUP,
                    &format!("option {opt} is not supported by this server"),
                )?,
            }
        }
    }

    fn opt_reply<S: Transport>(
        &self,
        s: &mut S,
        opt: u32,
        typ: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut out = Vec::with_capacity(20 + data.len());
        out.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        s.write_all(&out)
    }

    fn opt_error<S: Transport>(&self, s: &mut S, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
        self.opt_reply(s, opt, typ, msg.as_bytes())
    }

    fn transmission<S: Transport>(&self, s: &mut S) -> io::Result<()> {
        let size = self.export.image.size();
        loop {
            let mut h = [0u8; 28];
            match s.read_exact(&mut h) {
                Ok(()) => {}
                // The client hung up between requests: its way of leaving without NBD_CMD_DISC.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
            if magic != REQUEST_MAGIC {
                return Err(protocol(format!("bad request magic {magic:#x}")));
            }
            let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
            let handle: [u8; 8] = h[8..16].try_into().unwrap();
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
            match typ {
                CMD_READ => {
                    let in_range = offset
                        .checked_add(len as u64)
                        .is_some_and(|end| end <= size);
                    if len > MAX_REQUEST || !in_range {
                        simple_reply(s, NBD_EINVAL, &handle)?;
                        continue;
                    }
                    let mut out = vec![0u8; 16 + len as usize];
                    match self.export.image.read_at(offset, &mut out[16..]) {
                        Ok(()) => {
                            out[..16].copy_from_slice(&reply_header(0, &handle));
                            s.write_all(&out)?;
                        }
                        Err(e) => {
                            self.note_once(format!(
                                "read of {len} bytes at offset {offset} failed (EIO): {e}"
                            ));
                            simple_reply(s, NBD_EIO, &handle)?;
                        }
                    }
                }
                CMD_WRITE => {
                    // Consume the payload to stay in step, then refuse.
                    io::copy(&mut (&mut *s).take(len as u64), &mut io::sink())?;
                    simple_reply(s, NBD_EPERM, &handle)?;
                }
                CMD_DISC => return Ok(()),
                CMD_TRIM | CMD_WRITE_ZEROES => simple_reply(s, NBD_EPERM, &handle)?,
                _ => simple_reply(s, NBD_EINVAL, &handle)?,
            }
        }
    }
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: {msg}"))
}

fn reply_header(error: u32, handle: &[u8; 8]) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(handle);
    h
}

fn simple_reply<S: Write>(s: &mut S, error: u32, handle: &[u8; 8]) -> io::Result<()> {
    s.write_all(&reply_header(error, handle))
}

fn read_u32<S: Read>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<S: Read>(s: &mut S) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// `NBD_OPT_INFO`/`GO` data: name length u32, name, count u16, that many u16 info types.
fn parse_info_request(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let rest = &d[4 + n..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    let reqs = rest[2..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, reqs))
}

/// Prepares a Unix socket path: a stale socket left by a killed server is removed; a live one
/// or any other file is refused.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Usage(format!(
                "--listen-unix {}: a file that is not a socket is in the way; remove it or choose another path",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::Usage(format!(
                "--listen-unix {}: another server is listening on this socket",
                path.display()
            )));
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
        return Err(Error::Usage(
            "nothing to listen on: give --listen or --listen-unix".into(),
        ));
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
    fn info_request_parsing_rejects_bad_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (name, reqs) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"abc");
        assert_eq!(reqs, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_none());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0, 0]);
        assert!(parse_info_request(&huge).is_none());
    }

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
