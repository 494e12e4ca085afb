//! Helpers for tests of the long-running commands: a real FUSE mount (`vmrepo mount`), a real
//! NBD server (`vmrepo serve-nbd`) and a raw NBD client to speak the protocol byte by byte, and
//! damage to one stored chunk. Included with `#[path = "common/live.rs"] mod live;`.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::BIN;

/// Longest wait for a child to report it is ready or to exit: a guard against hangs, not a
/// performance check.
const GUARD: Duration = Duration::from_secs(60);

/// A running vmrepo child whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
}

/// How a child ended.
pub struct Ended {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Running {
    /// Starts `vmrepo ARGS`, stderr to a file in `dir`.
    pub fn start(dir: &Path, tag: &str, args: &[&std::ffi::OsStr]) -> Running {
        let stderr_path = dir.join(format!("{tag}.stderr"));
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start vmrepo");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines: rx,
            stderr_path,
        }
    }

    /// The next stdout line; panics with the child's stderr if it exits first.
    pub fn line(&mut self) -> String {
        match self.lines.recv_timeout(GUARD) {
            Ok(l) => l,
            Err(_) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("vmrepo printed nothing more; stderr:\n{}", self.stderr());
            }
        }
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the child to exit (bounded by the hang guard) and collects its output.
    pub fn wait(mut self) -> Ended {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > GUARD {
                let _ = self.child.kill();
                panic!("vmrepo did not exit; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            stdout.push_str(&l);
            stdout.push('\n');
        }
        Ended {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr: self.stderr(),
        }
    }
}

/// True if `mp` is a mount point now.
pub fn is_mounted(mp: &Path) -> bool {
    let mp = fs::canonicalize(mp).unwrap_or(mp.to_path_buf());
    let want = mp.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A `vmrepo mount` that is up.
pub struct Mounted {
    pub run: Option<Running>,
    pub mp: PathBuf,
}

/// Mounts `repo` at `dir/mnt` (created), showing `selection` if given; waits until mounted.
/// FUSE must work here: if it does not, this fails loudly rather than skipping.
pub fn mount(dir: &Path, repo: &Path, selection: Option<&str>) -> Mounted {
    let mp = dir.join("mnt");
    fs::create_dir_all(&mp).unwrap();
    let mut args: Vec<&std::ffi::OsStr> = vec!["mount".as_ref(), repo.as_ref(), mp.as_ref()];
    if let Some(s) = selection {
        args.push(s.as_ref());
    }
    let mut run = Running::start(dir, "mount", &args);
    let first = run.line();
    assert!(
        first.starts_with("mounted "),
        "unexpected: {first}\n{}",
        run.stderr()
    );
    assert!(
        is_mounted(&mp),
        "vmrepo said mounted but {} is not a mount point",
        mp.display()
    );
    Mounted { run: Some(run), mp }
}

impl Mounted {
    /// Unmounts with `fusermount3 -u` and returns how vmrepo ended.
    pub fn fusermount_u(mut self) -> Ended {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mp)
            .status()
            .expect("run fusermount3 (apt-get install fuse3)");
        assert!(st.success(), "fusermount3 -u failed");
        self.run.take().unwrap().wait()
    }

    /// Sends `sig` to vmrepo and returns how it ended.
    pub fn signal(mut self, sig: i32) -> Ended {
        let run = self.run.take().unwrap();
        run.signal(sig);
        run.wait()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A failed test must not leave a mount behind.
        if let Some(mut run) = self.run.take() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mp)
                .status();
            let _ = run.child.kill();
            let _ = run.child.wait();
        }
    }
}

/// A running `vmrepo serve-nbd` on a free loopback port (and optionally a Unix socket).
pub struct NbdServer {
    pub run: Running,
    pub port: u16,
}

/// Starts `vmrepo serve-nbd REPO SPEC --listen 127.0.0.1:0 EXTRA...` and waits for its address.
pub fn serve_nbd(dir: &Path, repo: &Path, spec: &str, extra: &[&str]) -> NbdServer {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "serve-nbd".as_ref(),
        repo.as_ref(),
        spec.as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let mut run = Running::start(
        dir,
        &format!("nbd-{}", extra.join("_").replace('/', "_")),
        &args,
    );
    let first = run.line();
    assert!(first.starts_with("serving "), "unexpected: {first}");
    let addr = run.line();
    let port = addr
        .strip_prefix("listening on nbd://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected: {addr}"))
        .parse()
        .unwrap();
    NbdServer { run, port }
}

impl NbdServer {
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.run.child.kill();
        let _ = self.run.child.wait();
    }
}

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// One option reply: type and data.
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// One structured reply chunk.
pub struct Chunk {
    pub done: bool,
    pub typ: u16,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// An error chunk's (error, message).
    pub fn error(&self) -> (u32, String) {
        let p = &self.payload;
        let e = u32::from_be_bytes(p[0..4].try_into().unwrap());
        let n = u16::from_be_bytes([p[4], p[5]]) as usize;
        (e, String::from_utf8(p[6..6 + n].to_vec()).unwrap())
    }
}

/// A raw NBD client over TCP.
pub struct RawClient {
    pub s: TcpStream,
    pub handshake_flags: u16,
}

impl RawClient {
    /// Connects and reads the server greeting (checking its magics).
    pub fn connect(port: u16) -> RawClient {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(
            u64::from_be_bytes(hello[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        RawClient {
            s,
            handshake_flags: u16::from_be_bytes([hello[16], hello[17]]),
        }
    }

    /// Connects and sends fixed-newstyle + no-zeroes client flags.
    pub fn fixed(port: u16) -> RawClient {
        let mut c = RawClient::connect(port);
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        OptReply {
            opt: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            typ: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    /// `NBD_OPT_INFO`/`GO` data for `name` asking for `infos`.
    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Option replies up to and including the final one (ACK or an error).
    pub fn replies_until_final(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.read_opt_reply();
            let last = r.typ == 1 || r.typ & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Full handshake with `NBD_OPT_GO` on the default export; returns (size, flags).
    pub fn go(port: u16) -> (RawClient, u64, u16) {
        let mut c = RawClient::fixed(port);
        c.send_option(7, &RawClient::info_data("", &[3]));
        let replies = c.replies_until_final();
        assert_eq!(
            replies.last().unwrap().typ,
            1,
            "NBD_OPT_GO not acknowledged"
        );
        let export = replies
            .iter()
            .find(|r| r.typ == 3 && r.data[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (c, size, flags)
    }

    pub fn send_request(&mut self, typ: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        self.send_flagged(0, typ, handle, offset, len);
        self.s.write_all(payload).unwrap();
    }

    /// A simple reply: (error, handle).
    pub fn read_simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// `NBD_CMD_READ`: Ok(data) or Err(NBD error number).
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_request(0, handle, offset, len, &[]);
        let (err, h) = self.read_simple_reply();
        assert_eq!(h, handle, "reply to another request");
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        Ok(data)
    }

    /// `NBD_OPT_LIST/SET_META_CONTEXT` data for `name` with `queries`.
    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Sends a request with command flags.
    pub fn send_flagged(&mut self, flags: u16, typ: u16, handle: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// One structured reply chunk, checked to answer `handle`.
    pub fn read_chunk(&mut self, handle: u64) -> Chunk {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC,
            "not a structured reply chunk"
        );
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            handle,
            "reply to another request"
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        Chunk {
            done: u16::from_be_bytes([h[4], h[5]]) & 1 == 1,
            typ: u16::from_be_bytes([h[6], h[7]]),
            payload,
        }
    }

    /// `NBD_CMD_READ` with structured replies: the bytes put together from data and hole
    /// chunks (each checked to lie in the request and to overlap no other) and the number of
    /// hole chunks, or the error chunk's (error, message).
    pub fn read_structured(
        &mut self,
        handle: u64,
        offset: u64,
        len: u32,
    ) -> Result<(Vec<u8>, usize), (u32, String)> {
        self.send_request(0, handle, offset, len, &[]);
        let mut out = vec![0u8; len as usize];
        let mut covered = vec![false; len as usize];
        let mut holes = 0;
        let mut error = None;
        loop {
            let c = self.read_chunk(handle);
            let at = |p: &[u8]| u64::from_be_bytes(p[0..8].try_into().unwrap());
            let mut place = |start: u64, n: usize| {
                assert!(start >= offset && start + n as u64 <= offset + len as u64);
                let i = (start - offset) as usize;
                assert!(covered[i..i + n].iter().all(|c| !c), "chunks overlap");
                covered[i..i + n].fill(true);
                i
            };
            match c.typ {
                0 => assert!(c.done, "NBD_REPLY_TYPE_NONE without the done flag"),
                1 => {
                    let n = c.payload.len() - 8;
                    let i = place(at(&c.payload), n);
                    out[i..i + n].copy_from_slice(&c.payload[8..]);
                }
                2 => {
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                    place(at(&c.payload), n);
                    holes += 1;
                }
                t if t & 0x8000 != 0 => error = Some(c.error()),
                t => panic!("unexpected reply chunk type {t}"),
            }
            if c.done {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        assert!(covered.iter().all(|&c| c), "the reply left bytes out");
        Ok((out, holes))
    }

    /// `NBD_CMD_BLOCK_STATUS` for context `id`: the extents (length, flags), or the error
    /// chunk's (error, message).
    pub fn block_status(
        &mut self,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, (u32, String)> {
        self.send_flagged(flags, 7, handle, offset, len);
        let c = self.read_chunk(handle);
        assert!(c.done, "block status in more than one chunk");
        if c.typ & 0x8000 != 0 {
            return Err(c.error());
        }
        assert_eq!(c.typ, 5, "not NBD_REPLY_TYPE_BLOCK_STATUS");
        assert_eq!((c.payload.len() - 4) % 8, 0);
        Ok(c.payload[4..]
            .chunks_exact(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[0..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..8].try_into().unwrap()),
                )
            })
            .collect())
    }

    /// True once the server has closed the connection (EOF or reset on read).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Flips one byte in the payload of a chunk record near the middle of the repository's packs.
/// Returns the chunk's pack path and the offset of the flipped byte.
pub fn damage_one_chunk(repo: &Path) -> (PathBuf, u64) {
    damage_one_object(repo, 1, 5)
}

/// Flips one byte in the payload of the middle record of `kind` (1 chunk, 3 disk map: see
/// docs/FORMAT.md: 16-byte pack header, then records of a 52-byte header and a payload), of
/// which there must be at least `at_least`. Returns its pack path and the offset of the byte.
pub fn damage_one_object(repo: &Path, kind: u8, at_least: usize) -> (PathBuf, u64) {
    let mut records: Vec<(PathBuf, u64, u32)> = Vec::new();
    let mut packs: Vec<PathBuf> = Vec::new();
    for shard in fs::read_dir(repo.join("data")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for p in fs::read_dir(&shard).unwrap() {
                packs.push(p.unwrap().path());
            }
        }
    }
    packs.sort();
    for pack in packs {
        let bytes = fs::read(&pack).unwrap();
        let mut off = 16usize;
        while off + 52 <= bytes.len() {
            assert_eq!(&bytes[off..off + 4], b"vrOB", "not a record at {off}");
            let stored = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap());
            if bytes[off + 4] == kind {
                records.push((pack.clone(), off as u64, stored));
            }
            off += 52 + stored as usize;
        }
    }
    assert!(
        records.len() >= at_least,
        "too few objects of kind {kind} to damage one"
    );
    let (pack, off, stored) = records[records.len() / 2].clone();
    let at = off + 52 + stored as u64 / 2;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
    (pack, at)
}
