//! The NBD wire protocol as the server speaks it: the fixed newstyle handshake and its options,
//! then transmission: one thread reads a client's requests, a few answer them at once. Replies
//! are simple, or structured once the client asks for them; structured replies carry the
//! `base:allocation` block status (where the disk holds data and where it is a hole) and reads
//! that send holes as holes.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use super::Export;
use crate::restore::log::ServiceLog;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

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
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
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
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// The one metadata context served, and the id it gets when a client selects it.
const ALLOCATION_CONTEXT: &str = "base:allocation";
const ALLOCATION_ID: u32 = 1;
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;
/// Most extents in one block status reply (the protocol asks for at most 2^20).
const MAX_STATUS_EXTENTS: usize = 1 << 16;
/// Zero runs inside a read shorter than this are sent as data: a hole chunk saves nothing then.
const MIN_HOLE_CHUNK: u64 = 64 << 10;

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

/// Requests of one client answered at once.
const REQUEST_WORKERS: usize = 4;

/// A client connection: TCP or Unix socket.
pub(super) trait Transport: Read + Write + Send + Sized + 'static {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// A second handle on the connection, for writing replies while this one reads.
    fn try_clone(&self) -> io::Result<Self>;
    /// Closes both directions, so that a reply blocked on a client that reads nothing fails.
    fn shut(&self);
}

impl Transport for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Transport for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shut(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// One transmission request, as read from the wire.
struct Request {
    flags: u16,
    typ: u16,
    handle: [u8; 8],
    offset: u64,
    len: u32,
}

/// The writing side of a connection shared by the threads answering requests: each
/// `write_all` goes out whole under the lock, so one reply (or reply chunk) is never cut by
/// another. Every reply is built and written with one `write_all`, but a simple reply to a read
/// longer than [`REPLY_PIECE`], which is written piece by piece under [`Replies::whole`].
struct Replies<'a, S>(&'a Mutex<S>);

impl<S> Replies<'_, S> {
    /// The connection to itself, to write one message in several pieces.
    fn whole(&self) -> std::sync::MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: Write> Write for Replies<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.whole().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.whole().flush()
    }
}

/// What a client and the server agreed on during the handshake.
#[derive(Default)]
struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: reads get structured replies.
    structured: bool,
    /// `base:allocation` is selected: `NBD_CMD_BLOCK_STATUS` is answered.
    allocation: bool,
}

/// Shared state of a running server.
pub(super) struct Server {
    pub(super) export: Export,
    pub(super) log: ServiceLog,
    pub(super) active: AtomicUsize,
    pub(super) max_clients: usize,
}

impl Server {
    fn note_once(&self, msg: String) {
        self.log.note_once(msg);
    }

    pub(super) fn serve_client<S: Transport>(self: &Arc<Self>, stream: S, peer: String) {
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
        let Some(agreed) = self.handshake(s)? else {
            return Ok(());
        };
        s.set_timeout(None)?;
        self.transmission(s, &agreed)
    }

    fn transmission_flags(&self) -> u16 {
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    fn unknown_export(&self, name: &[u8]) -> String {
        format!(
            "no export named {:?}; this server exports {:?} (or the default, \"\")",
            String::from_utf8_lossy(name),
            self.export.name
        )
    }

    /// Option haggling; what was agreed when the client moves on to transmission, `None` when it
    /// leaves.
    fn handshake<S: Transport>(&self, s: &mut S) -> io::Result<Option<Negotiated>> {
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
        let mut agreed = Negotiated::default();
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
                    return Ok(Some(agreed));
                }
                _ if !fixed => {
                    return Err(protocol(format!(
                        "option {opt} from a client without fixed newstyle negotiation"
                    )))
                }
                OPT_ABORT => {
                    // The client may already have closed its end.
                    let _ = self.opt_reply(s, opt, REP_ACK, &[]);
                    return Ok(None);
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
                        self.opt_error(s, opt, REP_ERR_UNKNOWN, &self.unknown_export(name))?;
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
                        return Ok(Some(agreed));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        let msg = "NBD_OPT_STRUCTURED_REPLY takes no data";
                        self.opt_error(s, opt, REP_ERR_INVALID, msg)?;
                        continue;
                    }
                    agreed.structured = true;
                    self.opt_reply(s, opt, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let select = opt == OPT_SET_META_CONTEXT;
                    if select {
                        // A selection replaces the former one, also when it fails.
                        agreed.allocation = false;
                    }
                    if !agreed.structured {
                        let msg = "metadata contexts need structured replies: send \
                                   NBD_OPT_STRUCTURED_REPLY first";
                        self.opt_error(s, opt, REP_ERR_INVALID, msg)?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta_request(&data) else {
                        let msg = "malformed NBD_OPT_LIST/SET_META_CONTEXT data";
                        self.opt_error(s, opt, REP_ERR_INVALID, msg)?;
                        continue;
                    };
                    if !self.name_matches(name) {
                        self.opt_error(s, opt, REP_ERR_UNKNOWN, &self.unknown_export(name))?;
                        continue;
                    }
                    let exact = |q: &&[u8]| *q == ALLOCATION_CONTEXT.as_bytes();
                    let matched = if select {
                        queries.iter().any(exact)
                    } else {
                        // Listing: no query, the namespace or the name itself.
                        queries.is_empty() || queries.iter().any(|q| exact(q) || *q == b"base:")
                    };
                    if matched {
                        // Listed contexts carry id 0; a selected one its real id.
                        let id = if select { ALLOCATION_ID } else { 0 };
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(ALLOCATION_CONTEXT.as_bytes());
                        self.opt_reply(s, opt, REP_META_CONTEXT, &p)?;
                    }
                    if select {
                        agreed.allocation = matched;
                    }
                    self.opt_reply(s, opt, REP_ACK, &[])?;
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

    /// Requests until the client disconnects. This thread reads them; [`REQUEST_WORKERS`]
    /// threads answer them, several at once, each reply written whole under one lock (the
    /// protocol lets replies come in any order: the client matches them by handle).
    /// `NBD_CMD_DISC` or the client hanging up ends it once the requests read are answered; a
    /// protocol error ends it at once.
    fn transmission<S: Transport>(&self, s: &mut S, agreed: &Negotiated) -> io::Result<()> {
        let out = Mutex::new(s.try_clone()?);
        let (queue, requests) = mpsc::sync_channel::<Request>(2 * REQUEST_WORKERS);
        let requests = Mutex::new(requests);
        std::thread::scope(|scope| {
            for _ in 0..REQUEST_WORKERS {
                scope.spawn(|| loop {
                    let next = requests
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .recv();
                    let Ok(req) = next else { return };
                    // A reply that cannot be written means the client is gone, and one cut
                    // short leaves the stream out of step: either way the session is over.
                    // Shutting the socket ends the reading thread too.
                    let mut replies = Replies(&out);
                    if self.answer(&mut replies, agreed, req).is_err() {
                        replies.whole().shut();
                    }
                });
            }
            let read = self.read_requests(s, &mut Replies(&out), &queue);
            if read.is_err() {
                // Broken protocol or a dead connection: what is queued is not owed.
                s.shut();
            }
            drop(queue);
            read
        })
    }

    /// Reads requests and queues them for the workers; consumes (and refuses) write payloads
    /// itself, to stay in step with the stream.
    fn read_requests<S: Transport, W: Write>(
        &self,
        s: &mut S,
        replies: &mut W,
        queue: &mpsc::SyncSender<Request>,
    ) -> io::Result<()> {
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
            let req = Request {
                flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
                typ: u16::from_be_bytes(h[6..8].try_into().unwrap()),
                handle: h[8..16].try_into().unwrap(),
                offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
                len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
            };
            match req.typ {
                CMD_WRITE => {
                    // Consume the payload to stay in step, then refuse.
                    io::copy(&mut (&mut *s).take(req.len as u64), &mut io::sink())?;
                    simple_reply(replies, NBD_EPERM, &req.handle)?;
                }
                CMD_DISC => return Ok(()),
                _ => {
                    if queue.send(req).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Answers one request.
    fn answer<S: Write>(
        &self,
        s: &mut Replies<'_, S>,
        agreed: &Negotiated,
        req: Request,
    ) -> io::Result<()> {
        let size = self.export.image.size();
        let Request {
            flags,
            typ,
            handle,
            offset,
            len,
        } = req;
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size);
        let outside =
            || format!("{len} bytes at offset {offset} are not inside the disk ({size} bytes)");
        match typ {
            CMD_READ if len > MAX_REQUEST => {
                let msg = format!("a read of {len} bytes is over the {MAX_REQUEST} advertised");
                error_reply(s, agreed.structured, NBD_EINVAL, &handle, &msg)?;
            }
            CMD_READ if !in_range => {
                error_reply(s, agreed.structured, NBD_EINVAL, &handle, &outside())?
            }
            CMD_READ if agreed.structured => self.structured_read(s, &handle, offset, len)?,
            CMD_READ => self.simple_read(s, &handle, offset, len)?,
            CMD_TRIM | CMD_WRITE_ZEROES => simple_reply(s, NBD_EPERM, &handle)?,
            CMD_BLOCK_STATUS if !agreed.allocation => {
                let msg = "no metadata context is selected: select base:allocation with \
                           NBD_OPT_SET_META_CONTEXT first";
                error_reply(s, agreed.structured, NBD_EINVAL, &handle, msg)?
            }
            CMD_BLOCK_STATUS if !in_range || len == 0 => {
                error_reply(s, true, NBD_EINVAL, &handle, &outside())?
            }
            CMD_BLOCK_STATUS => {
                let limit = if flags & CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    MAX_STATUS_EXTENTS
                };
                let end = offset + len as u64;
                match self.export.image.allocation(offset..end, limit) {
                    Ok(runs) => {
                        let mut p = Vec::with_capacity(4 + 8 * runs.len());
                        p.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
                        for (run, zero) in runs {
                            let state = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                            p.extend_from_slice(&((run.end - run.start) as u32).to_be_bytes());
                            p.extend_from_slice(&state.to_be_bytes());
                        }
                        send_chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &handle, &p)?;
                    }
                    Err(e) => {
                        let msg = format!("block status of {len} bytes at offset {offset}: {e}");
                        self.note_once(msg.clone());
                        error_reply(s, true, NBD_EIO, &handle, &msg)?;
                    }
                }
            }
            _ => error_reply(
                s,
                agreed.structured,
                NBD_EINVAL,
                &handle,
                &format!("command {typ} is not supported by this server"),
            )?,
        }
        Ok(())
    }

    /// A read answered with structured reply chunks: the data, and the longer zero runs inside
    /// it as holes, in order; the last chunk says the reply is done. A failure is an error chunk
    /// that names the offset it happened at and why.
    fn structured_read<W: Write>(
        &self,
        s: &mut W,
        handle: &[u8; 8],
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        let end = offset + len as u64;
        let parts = match self.export.image.allocation(offset..end, usize::MAX) {
            Ok(runs) => content_parts(runs),
            Err(e) => {
                let msg = format!("read of {len} bytes at offset {offset} failed: {e}");
                self.note_once(msg.clone());
                return error_reply(s, true, NBD_EIO, handle, &msg);
            }
        };
        if parts.is_empty() {
            return send_chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, &[]);
        }
        let parts = in_pieces(parts);
        let last = parts.len() - 1;
        for (k, (run, hole)) in parts.into_iter().enumerate() {
            let flags = if k == last { REPLY_FLAG_DONE } else { 0 };
            let n = run.end - run.start;
            if hole {
                let mut p = run.start.to_be_bytes().to_vec();
                p.extend_from_slice(&(n as u32).to_be_bytes());
                send_chunk(s, flags, REPLY_TYPE_OFFSET_HOLE, handle, &p)?;
                continue;
            }
            // Header, offset, then the data read in place behind them.
            let failed = with_reply_buffer(28 + n as usize, |out| {
                if let Err(e) = self.export.image.read_at(run.start, &mut out[28..]) {
                    return Ok(Some(e));
                }
                out[20..28].copy_from_slice(&run.start.to_be_bytes());
                let head = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, handle, &out[20..]);
                out[..20].copy_from_slice(&head);
                s.write_all(out).map(|()| None)
            })?;
            if let Some(e) = failed {
                let msg = format!("read of {n} bytes at offset {} failed: {e}", run.start);
                self.note_once(format!("{msg} (EIO)"));
                let mut p = error_payload(NBD_EIO, &msg);
                p.extend_from_slice(&run.start.to_be_bytes());
                return send_chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, handle, &p);
            }
        }
        Ok(())
    }

    /// A simple reply to a read: its header, then the data at most [`REPLY_PIECE`] at a time,
    /// all under the connection's lock so that no other reply comes in between. The first piece
    /// (the whole read, up to that length) is read before the header goes out, so damage in it
    /// gets an EIO reply. A later piece that cannot be read cannot be reported any more: the
    /// reply is cut short with an error, which ends the session (a structured reply says where
    /// the read failed instead).
    fn simple_read<S: Write>(
        &self,
        s: &mut Replies<'_, S>,
        handle: &[u8; 8],
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        let end = offset + len as u64;
        let first = (REPLY_PIECE as u64).min(len as u64) as usize;
        with_reply_buffer(16 + first, |buf| {
            if let Err(e) = self.export.image.read_at(offset, &mut buf[16..16 + first]) {
                self.note_once(format!(
                    "read of {len} bytes at offset {offset} failed (EIO): {e}"
                ));
                return simple_reply(s, NBD_EIO, handle);
            }
            buf[..16].copy_from_slice(&reply_header(0, handle));
            let mut out = s.whole();
            out.write_all(&buf[..16 + first])?;
            let mut at = offset + first as u64;
            while at < end {
                let n = (end - at).min(REPLY_PIECE as u64) as usize;
                if let Err(e) = self.export.image.read_at(at, &mut buf[..n]) {
                    let msg = format!(
                        "read of {len} bytes at offset {offset} failed at offset {at}, after \
                         its reply began: {e}; the client is disconnected"
                    );
                    self.note_once(msg.clone());
                    return Err(io::Error::other(msg));
                }
                out.write_all(&buf[..n])?;
                at += n as u64;
            }
            Ok(())
        })
    }
}

/// The most data a worker holds for a reply, in the buffer it keeps: a structured read sends
/// longer data as several chunks, and a simple reply longer than this (up to [`MAX_REQUEST`]) is
/// read and written a piece at a time. A client's four workers hold at most 16 MiB however large
/// its reads, and however slowly it takes the replies.
const REPLY_PIECE: usize = 4 << 20;

thread_local! {
    static REPLY_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `n` bytes of buffer whose contents are unspecified (`f` overwrites what it
/// sends): this thread's kept buffer, so that a read costs no allocation and no zeroing.
fn with_reply_buffer<R>(n: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    debug_assert!(n <= REPLY_PIECE + 28, "a reply of {n} bytes is built whole");
    REPLY_BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < n {
            b.resize(n, 0);
        }
        f(&mut b[..n])
    })
}

/// The chunks of a structured read from its allocation runs: zero runs of at least
/// [`MIN_HOLE_CHUNK`] as holes (`true`), everything between them as data.
fn content_parts(runs: Vec<(Range<u64>, bool)>) -> Vec<(Range<u64>, bool)> {
    let mut parts: Vec<(Range<u64>, bool)> = Vec::new();
    for (run, zero) in runs {
        let hole = zero && run.end - run.start >= MIN_HOLE_CHUNK;
        match parts.last_mut() {
            Some((last, false)) if !hole => last.end = run.end,
            _ => parts.push((run, hole)),
        }
    }
    parts
}

/// `parts` with every data part longer than [`REPLY_PIECE`] cut into pieces of that length.
fn in_pieces(parts: Vec<(Range<u64>, bool)>) -> Vec<(Range<u64>, bool)> {
    let mut out = Vec::with_capacity(parts.len());
    for (run, hole) in parts {
        if hole {
            out.push((run, hole));
            continue;
        }
        let mut at = run.start;
        while at < run.end {
            let end = run.end.min(at + REPLY_PIECE as u64);
            out.push((at..end, false));
            at = end;
        }
    }
    out
}

/// Sends one structured reply chunk, header and payload in one write (see [`Replies`]).
fn send_chunk<W: Write>(
    s: &mut W,
    flags: u16,
    typ: u16,
    handle: &[u8; 8],
    payload: &[u8],
) -> io::Result<()> {
    let head = chunk_header(flags, typ, handle, payload);
    s.write_all(&[&head[..], payload].concat())
}

/// The header of a structured reply chunk whose payload is `payload`.
fn chunk_header(flags: u16, typ: u16, handle: &[u8; 8], payload: &[u8]) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&typ.to_be_bytes());
    h[8..16].copy_from_slice(handle);
    h[16..20].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    h
}

/// An error chunk's payload: the error number and a message for the user (at most 4096 bytes).
fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let mut cut = msg.len().min(4096);
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut p = error.to_be_bytes().to_vec();
    p.extend_from_slice(&(cut as u16).to_be_bytes());
    p.extend_from_slice(&msg.as_bytes()[..cut]);
    p
}

/// An error answer: a structured error chunk carrying `msg` when structured replies are in use,
/// a simple reply otherwise.
fn error_reply<S: Write>(
    s: &mut S,
    structured: bool,
    error: u32,
    handle: &[u8; 8],
    msg: &str,
) -> io::Result<()> {
    if !structured {
        return simple_reply(s, error, handle);
    }
    let p = error_payload(error, msg);
    send_chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, &p)
}

pub(super) fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: {msg}"))
}

pub(super) fn reply_header(error: u32, handle: &[u8; 8]) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(handle);
    h
}

pub(super) fn simple_reply<S: Write>(s: &mut S, error: u32, handle: &[u8; 8]) -> io::Result<()> {
    s.write_all(&reply_header(error, handle))
}

pub(super) fn read_u32<S: Read>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub(super) fn read_u64<S: Read>(s: &mut S) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// `NBD_OPT_LIST/SET_META_CONTEXT` data: name length u32, name, count u32, then that many
/// queries, each a length u32 and the query.
pub(super) fn parse_meta_request(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let mut rest = &d[4 + n..];
    let count = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let q = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
        queries.push(rest.get(4..4usize.checked_add(q)?)?);
        rest = &rest[4 + q..];
    }
    rest.is_empty().then_some((name, queries))
}

/// `NBD_OPT_INFO`/`GO` data: name length u32, name, count u16, that many u16 info types.
pub(super) fn parse_info_request(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
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
}
