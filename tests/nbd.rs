//! `vmrepo serve-nbd` against real clients (qemu-img over TCP and a Unix socket, several at
//! once) and a raw client speaking the protocol byte by byte: option haggling, read-only
//! export, protocol errors for malformed handshakes and out-of-range requests, clients that
//! vanish mid-read, and an error reply (never zeros) for damaged data.

mod common;
#[path = "common/live.rs"]
mod live;

use std::fs;
use std::io::Write;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use live::*;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// A VM with a 40 MiB and an 8 MiB disk in a new repository.
fn vm_repo(t: &Path) -> (PathBuf, PathBuf) {
    let vm = make_vm(
        t,
        "web01",
        &[
            (
                40 << 20,
                vec![
                    (0, 2 << 20, 1),
                    (20 << 20, 6 << 20, 2),
                    ((40 << 20) - 4096, 4096, 3),
                ],
            ),
            (8 << 20, vec![(1 << 20, 1 << 20, 4)]),
        ],
    );
    let repo = init_repo(t);
    ingest(&repo, &vm, None);
    (vm, repo)
}

fn qemu_compare(uri: &str, img: &Path) -> bool {
    let r = sh(&format!(
        "qemu-img compare -f raw -F raw '{uri}' '{}'",
        img.display()
    ));
    r.code == 0 && r.stdout.contains("Images are identical")
}

#[test]
fn qemu_img_reads_the_disks_over_tcp_and_a_unix_socket_several_at_once() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let flat0 = vm.join("web01-flat.vmdk");
    let srv = serve_nbd(t.path(), &repo, "web01", &[]);
    assert!(qemu_compare(&srv.uri(), &flat0));
    // By its listed name too.
    assert!(qemu_compare(&format!("{}/web01.vmdk", srv.uri()), &flat0));
    // Three clients at once.
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "raw", &srv.uri()])
                .arg(&flat0)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(
            c.wait().unwrap().success(),
            "a parallel client saw different data"
        );
    }
    let qcow = t.path().join("out.qcow2");
    sh(&format!(
        "qemu-img convert -f raw -O qcow2 '{}' '{}'",
        srv.uri(),
        qcow.display()
    ))
    .ok();
    assert!(qemu_identical(&qcow, &flat0));
    // Instant-recovery semantics, as `qemu-system-x86_64 -drive file=nbd://...,snapshot=on`:
    // guest writes land in a temporary overlay; opening the export writable is refused.
    sh(&format!(
        "qemu-io -s -f raw -c 'write -P 0x55 0 64k' -c 'read -P 0x55 0 64k' '{}'",
        srv.uri()
    ))
    .ok();
    let r = sh(&format!(
        "qemu-io -f raw -c 'write -P 0x55 0 64k' '{}'",
        srv.uri()
    ));
    assert_ne!(r.code, 0, "the export was opened for writing");
    assert!(qemu_compare(&srv.uri(), &flat0), "the export changed");
    let r = sh(&format!("qemu-img info --output=json '{}'", srv.uri()))
        .ok()
        .json();
    assert_eq!(r["virtual-size"], 40 << 20);

    // The second disk, on a Unix socket only; SIGINT stops the server and removes the socket.
    let sock = t.path().join("nbd.sock");
    let mut run = Running::start(
        t.path(),
        "unix",
        &[
            "serve-nbd".as_ref(),
            repo.as_os_str(),
            "web01@-0".as_ref(),
            "--disk".as_ref(),
            "1".as_ref(),
            "--listen-unix".as_ref(),
            sock.as_os_str(),
        ],
    );
    assert!(run.line().starts_with("serving "));
    assert_eq!(
        run.line(),
        format!("listening on nbd+unix:///?socket={}", sock.display())
    );
    assert!(qemu_compare(
        &format!("nbd+unix:///?socket={}", sock.display()),
        &vm.join("web01_1-flat.vmdk")
    ));
    run.signal(libc::SIGINT);
    let end = run.wait();
    assert_eq!(end.code, 0, "{}", end.stderr);
    assert!(!sock.exists(), "socket file left behind");

    // Refusals: a disk that does not exist, a non-loopback address.
    let r = vmrepo([
        s("serve-nbd"),
        p(&repo),
        s("web01"),
        s("--disk"),
        s("2"),
        s("--listen"),
        s("127.0.0.1:0"),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("has no disk 2 (its disks: 0: web01.vmdk, 1: web01_1.vmdk)"),
        "{}",
        r.stderr
    );
    let r = vmrepo([
        s("serve-nbd"),
        p(&repo),
        s("web01"),
        s("--listen"),
        s("0.0.0.0:0"),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--allow-remote"), "{}", r.stderr);
}

#[test]
fn option_haggling_and_requests_follow_the_protocol() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let orig = fs::read(vm.join("web01-flat.vmdk")).unwrap();
    let size = orig.len() as u64;
    let mut srv = serve_nbd(t.path(), &repo, "web01", &[]);

    let mut c = RawClient::fixed(srv.port);
    assert_eq!(c.handshake_flags & 1, 1, "fixed newstyle");
    c.send_option(3, &[]); // LIST
    let r = c.replies_until_final();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].typ, REP_SERVER);
    assert_eq!(&r[0].data[4..], b"web01.vmdk");
    assert_eq!(r[1].typ, REP_ACK);
    c.send_option(3, b"x"); // LIST takes no data
    assert_eq!(c.read_opt_reply().typ, REP_ERR_INVALID);
    c.send_option(99, b"whatever"); // unknown option
    let r = c.read_opt_reply();
    assert_eq!((r.opt, r.typ), (99, REP_ERR_UNSUP));
    c.send_option(5, &[]); // STARTTLS
    assert_eq!(c.read_opt_reply().typ, REP_ERR_POLICY);
    c.send_option(8, b"x"); // STRUCTURED_REPLY takes no data
    assert_eq!(c.read_opt_reply().typ, REP_ERR_INVALID);
    // Metadata contexts need structured replies first.
    c.send_option(10, &RawClient::meta_data("", &["base:allocation"]));
    assert_eq!(c.read_opt_reply().typ, REP_ERR_INVALID);
    c.send_option(6, &RawClient::info_data("nope", &[])); // INFO on an unknown export
    assert_eq!(c.read_opt_reply().typ, REP_ERR_UNKNOWN);
    c.send_option(6, &[0, 0, 0, 9, b'a']); // INFO with a bad length
    assert_eq!(c.read_opt_reply().typ, REP_ERR_INVALID);
    c.send_option(6, &RawClient::info_data("", &[1, 2, 3])); // INFO: name, description, block size
    let r = c.replies_until_final();
    assert_eq!(r.last().unwrap().typ, REP_ACK);
    let info = |ty: u16| {
        r.iter()
            .find(|x| x.typ == REP_INFO && x.data[0..2] == ty.to_be_bytes())
            .unwrap_or_else(|| panic!("no NBD_INFO {ty}"))
            .data[2..]
            .to_vec()
    };
    let export = info(0);
    assert_eq!(u64::from_be_bytes(export[0..8].try_into().unwrap()), size);
    let flags = u16::from_be_bytes(export[8..10].try_into().unwrap());
    assert_eq!(flags & 0b11, 0b11, "HAS_FLAGS and READ_ONLY");
    assert_eq!(info(1), b"web01.vmdk");
    assert!(String::from_utf8(info(2)).unwrap().starts_with("web01@"));
    let bs = info(3);
    let u = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((u(0), u(4), u(8)), (1, 4096, 32 << 20));
    c.send_option(7, &RawClient::info_data("web01.vmdk", &[])); // GO
    let r = c.replies_until_final();
    assert_eq!(r.last().unwrap().typ, REP_ACK);

    // Transmission.
    assert_eq!(c.read(1, 0, 65536).unwrap(), orig[..65536]);
    assert_eq!(c.read(2, size - 10, 10).unwrap(), orig[orig.len() - 10..]);
    assert_eq!(
        c.read(3, (20 << 20) + 12345, 1 << 20).unwrap(),
        orig[(20 << 20) + 12345..(21 << 20) + 12345]
    );
    assert_eq!(
        c.read(4, size - 4096, 8192),
        Err(EINVAL),
        "read past the end"
    );
    assert_eq!(
        c.read(5, u64::MAX - 100, 4096),
        Err(EINVAL),
        "offset overflow"
    );
    assert_eq!(
        c.read(6, 0, 64 << 20),
        Err(EINVAL),
        "longer than the maximum block size"
    );
    assert_eq!(c.read(7, size, 0), Ok(Vec::new()));
    c.send_request(1, 8, 0, 4096, &[0xee; 4096]); // WRITE, with its payload
    assert_eq!(c.read_simple_reply(), (EPERM, 8));
    c.send_request(4, 9, 0, 4096, &[]); // TRIM
    assert_eq!(c.read_simple_reply(), (EPERM, 9));
    c.send_request(42, 10, 0, 0, &[]); // unknown command
    assert_eq!(c.read_simple_reply(), (EINVAL, 10));
    // Without structured replies there is no block status to ask for.
    c.send_request(7, 11, 0, 4096, &[]);
    assert_eq!(c.read_simple_reply(), (EINVAL, 11));
    // Still in step after all that, and nothing was written.
    assert_eq!(c.read(12, 0, 4096).unwrap(), orig[..4096]);
    c.send_request(2, 13, 0, 0, &[]); // DISC
    assert!(c.closed_by_server());

    // NBD_OPT_EXPORT_NAME (old-style entry to transmission), with the 124 zero bytes when the
    // client did not ask to drop them.
    let mut c = RawClient::connect(srv.port);
    c.s.write_all(&1u32.to_be_bytes()).unwrap();
    c.send_option(1, b"");
    let mut reply = [0u8; 10 + 124];
    std::io::Read::read_exact(&mut c.s, &mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), size);
    assert!(reply[10..].iter().all(|&b| b == 0));
    assert_eq!(c.read(1, 4096, 4096).unwrap(), orig[4096..8192]);

    // The server holds the repository's shared lock: commands that need it alone must wait.
    let r = vmrepo([s("check"), p(&repo), s("--rebuild-index")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("in use by another vmrepo process"),
        "{}",
        r.stderr
    );

    // ABORT is acknowledged, then the server hangs up.
    let mut c = RawClient::fixed(srv.port);
    c.send_option(2, &[]);
    assert_eq!(c.read_opt_reply().typ, REP_ACK);
    assert!(c.closed_by_server());
    assert!(srv.run.alive());
}

#[test]
fn structured_replies_send_holes_and_block_status_maps_data_and_zeros() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let flat = vm.join("web01-flat.vmdk");
    let orig = fs::read(&flat).unwrap();
    let size = orig.len() as u64;
    let srv = serve_nbd(t.path(), &repo, "web01", &[]);

    let mut c = RawClient::fixed(srv.port);
    c.send_option(8, &[]); // STRUCTURED_REPLY
    assert_eq!(c.read_opt_reply().typ, REP_ACK);
    // LIST_META_CONTEXT: with no query, with the namespace, and with a context it lacks.
    for (queries, listed) in [
        (vec![], true),
        (vec!["base:"], true),
        (vec!["qemu:dirty-bitmap:x"], false),
    ] {
        c.send_option(9, &RawClient::meta_data("", &queries));
        let r = c.replies_until_final();
        assert_eq!(r.last().unwrap().typ, REP_ACK);
        let names: Vec<&[u8]> = r[..r.len() - 1]
            .iter()
            .inspect(|x| assert_eq!(x.typ, REP_META_CONTEXT))
            .map(|x| &x.data[4..])
            .collect();
        let want: Vec<&[u8]> = if listed {
            vec![b"base:allocation"]
        } else {
            vec![]
        };
        assert_eq!(names, want, "{queries:?}");
    }
    c.send_option(10, &RawClient::meta_data("nope", &["base:allocation"]));
    assert_eq!(c.read_opt_reply().typ, REP_ERR_UNKNOWN);
    c.send_option(10, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 99]); // a query longer than the data
    assert_eq!(c.read_opt_reply().typ, REP_ERR_INVALID);
    // SET_META_CONTEXT: the context it has is selected, one it lacks is ignored.
    c.send_option(
        10,
        &RawClient::meta_data("web01.vmdk", &["qemu:dirty-bitmap:x", "base:allocation"]),
    );
    let r = c.replies_until_final();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].typ, REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    c.send_option(7, &RawClient::info_data("web01.vmdk", &[]));
    assert_eq!(c.replies_until_final().last().unwrap().typ, REP_ACK);

    // Block status of the whole disk: the three data regions vm_repo wrote, zeros between.
    const MIB: u32 = 1 << 20;
    let (data, hole) = (0, 3); // NBD_STATE_HOLE | NBD_STATE_ZERO
    assert_eq!(
        c.block_status(0, 1, 0, size as u32).unwrap(),
        vec![
            (2 * MIB, data),
            (18 * MIB, hole),
            (6 * MIB, data),
            (14 * MIB - 4096, hole),
            (4096, data),
        ]
    );
    // REQ_ONE: one extent, no longer than asked for; and from inside a zero run.
    assert_eq!(
        c.block_status(1 << 3, 2, MIB as u64, 4 * MIB).unwrap(),
        vec![(MIB, data)]
    );
    assert_eq!(
        c.block_status(0, 3, 10 * MIB as u64, 11 * MIB).unwrap(),
        vec![(10 * MIB, hole), (MIB, data)]
    );
    let e = c.block_status(0, 4, size - 4096, 8192).unwrap_err();
    assert_eq!(e.0, EINVAL, "block status past the end");
    assert!(e.1.contains("not inside the disk"), "{}", e.1);

    // Reads: the bytes, with the long zero run sent as a hole.
    let (got, holes) = c.read_structured(5, MIB as u64, 21 * MIB).unwrap();
    assert!(
        got == orig[MIB as usize..22 * MIB as usize],
        "structured read differs"
    );
    assert_eq!(holes, 1);
    let (got, holes) = c.read_structured(6, size - 10, 10).unwrap();
    assert_eq!(got, orig[orig.len() - 10..]);
    assert_eq!(holes, 0);
    assert_eq!(c.read_structured(7, 0, 0).unwrap().0, Vec::<u8>::new());
    let e = c.read_structured(8, size - 4096, 8192).unwrap_err();
    assert_eq!(e.0, EINVAL, "read past the end");
    let e = c.read_structured(9, 0, 64 << 20).unwrap_err();
    assert_eq!(e.0, EINVAL, "longer than the maximum block size");

    // qemu-img reads the allocation map over NBD, and a copy of the disk comes out sparse.
    let map = sh(&format!("qemu-img map --output=json '{}'", srv.uri()))
        .ok()
        .json();
    let data_bytes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data_bytes, (8 << 20) + 4096, "{map}");
    let copy = t.path().join("copy.raw");
    sh(&format!(
        "qemu-img convert -f raw -O raw '{}' '{}'",
        srv.uri(),
        copy.display()
    ))
    .ok();
    assert!(fs::read(&copy).unwrap() == orig, "the copy differs");
    let allocated = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&copy).unwrap()) * 512;
    assert!(
        allocated < 16 << 20,
        "the copy of 8 MiB of data allocates {allocated} bytes"
    );
}

#[test]
fn pipelined_requests_are_all_answered_and_a_client_that_reads_nothing_holds_up_no_other() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let orig = fs::read(vm.join("web01-flat.vmdk")).unwrap();
    let mut srv = serve_nbd(t.path(), &repo, "web01", &[]);

    // 64 reads sent before any reply is read; the replies may come in any order.
    const N: u64 = 64;
    const LEN: usize = 512 << 10;
    let at = |h: u64| (h * 601 * 1024) as usize % (orig.len() - LEN);
    let (mut c, _, _) = RawClient::go(srv.port);
    for h in 0..N {
        c.send_request(0, h, at(h) as u64, LEN as u32, &[]);
    }
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..N {
        let (err, h) = c.read_simple_reply();
        assert_eq!(err, 0);
        let mut data = vec![0u8; LEN];
        std::io::Read::read_exact(&mut c.s, &mut data).unwrap();
        assert!(
            data == orig[at(h)..at(h) + LEN],
            "reply {h} holds the wrong bytes"
        );
        assert!(answered.insert(h), "two replies to {h}");
    }
    assert_eq!(answered.len() as u64, N);
    // NBD_CMD_DISC after pipelined reads: every read is answered before the server hangs up.
    for h in 0..8 {
        c.send_request(0, h, at(h) as u64, LEN as u32, &[]);
    }
    c.send_request(2, 99, 0, 0, &[]);
    for _ in 0..8 {
        let (err, h) = c.read_simple_reply();
        assert_eq!(err, 0);
        let mut data = vec![0u8; LEN];
        std::io::Read::read_exact(&mut c.s, &mut data).unwrap();
        assert!(data == orig[at(h)..at(h) + LEN]);
    }
    assert!(c.closed_by_server());

    // A client that asks for 16 reads of 32 MiB and reads none of the replies: the server's
    // writes to it block, and another client is served all the same.
    let (mut stuck, _, _) = RawClient::go(srv.port);
    for h in 0..16 {
        stuck.send_request(0, h, 0, 32 << 20, &[]);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (mut other, _, _) = RawClient::go(srv.port);
    assert_eq!(
        other.read(1, 4096, 65536).unwrap(),
        orig[4096..4096 + 65536]
    );
    assert!(qemu_compare(&srv.uri(), &vm.join("web01-flat.vmdk")));
    drop(stuck);
    assert_eq!(other.read(2, 0, 4096).unwrap(), orig[..4096]);
    assert!(srv.run.alive());
}

#[test]
fn reads_at_any_offset_and_length_return_the_image_whatever_the_cache_holds() {
    // Reads that cut chunks anywhere, from one 512-byte sector to 3 MiB: whole chunks are
    // decoded into the reply, cut ones go through a 1 MiB cache and are evicted again.
    let t = tempfile::tempdir().unwrap();
    let vm = make_vm(
        t.path(),
        "web01",
        &[(
            24 << 20,
            vec![
                (0, 6 << 20, 1),
                (12 << 20, 2 << 20, 2),
                (20 << 20, 4 << 20, 3),
            ],
        )],
    );
    let flat = vm.join("web01-flat.vmdk");
    // From 8 MiB: one 32 KiB blob, then 32 KiB of other bytes, each alone between zeros, eight
    // times. A data run is cut from its start, so every copy of the blob is the same chunk.
    let noise = fs::read(&flat).unwrap()[..1 << 20].to_vec();
    let out = fs::OpenOptions::new().write(true).open(&flat).unwrap();
    for k in 0..8u64 {
        let at = (8 << 20) + k * (192 << 10);
        let other = &noise[(64 + k as usize * 32) << 10..(96 + k as usize * 32) << 10];
        std::os::unix::fs::FileExt::write_all_at(&out, &noise[..32 << 10], at).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&out, other, at + (96 << 10)).unwrap();
    }
    drop(out);
    let orig = fs::read(&flat).unwrap();
    let repo = init_repo(t.path());
    ingest(&repo, &vm, None);
    let srv = serve_nbd(t.path(), &repo, "web01", &["--cache-size", "1"]);
    let (mut c, _, _) = RawClient::go(srv.port);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    // A read that meets the blob cut first and whole further on, past another chunk.
    let mut reads: Vec<(u64, u64)> = (0..7)
        .map(|k| ((8 << 20) + k * (192 << 10) + 1000, 300 << 10))
        .collect();
    for _ in 0..200 {
        let len = match next(3) {
            0 => 512 * (1 + next(16)),
            1 => 512 * (1 + next(512)),
            _ => 512 * (1 + next(6144)),
        };
        reads.push((512 * next((orig.len() as u64 - len) / 512), len));
    }
    for (h, &(at, len)) in reads.iter().enumerate() {
        let got = c.read(h as u64, at, len as u32).unwrap();
        assert!(
            got == orig[at as usize..(at + len) as usize],
            "read of {len} bytes at {at} returned other bytes"
        );
    }
    assert!(qemu_compare(&srv.uri(), &flat));
}

/// A client that asked for structured replies, then for the default export.
fn structured_client(port: u16) -> RawClient {
    let mut c = RawClient::fixed(port);
    c.send_option(8, &[]); // STRUCTURED_REPLY
    assert_eq!(c.read_opt_reply().typ, REP_ACK);
    c.send_option(7, &RawClient::info_data("", &[]));
    assert_eq!(c.replies_until_final().last().unwrap().typ, REP_ACK);
    c
}

/// The most memory the process has held so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kib << 10
}

#[test]
fn clients_that_ask_for_32_mib_reads_and_take_no_replies_cannot_grow_the_server() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let orig = fs::read(vm.join("web01-flat.vmdk")).unwrap();
    let mut srv = serve_nbd(t.path(), &repo, "web01", &[]);
    let pid = srv.run.child.id();
    // Long reads answered whole first: a simple reply streamed in pieces, a structured one cut
    // in several data chunks, both the right bytes.
    let (mut c, _, _) = RawClient::go(srv.port);
    assert!(c.read(1, 0, 32 << 20).unwrap() == orig[..32 << 20]);
    let mut s = structured_client(srv.port);
    let (got, _) = s.read_structured(2, 4 << 20, 32 << 20).unwrap();
    assert!(got == orig[4 << 20..36 << 20]);
    let before = peak_rss(pid);

    // Eight clients each send sixteen reads of 32 MiB (zeros mostly: nothing to decode) and
    // read no reply. Built whole, their replies would hold 8 x 4 x 32 MiB = 1 GiB; the server
    // holds one 4 MiB piece per answering thread instead.
    let stuck: Vec<RawClient> = (0..8)
        .map(|_| {
            let (mut c, _, _) = RawClient::go(srv.port);
            for h in 0..16 {
                c.send_request(0, h, 0, 32 << 20, &[]);
            }
            c
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(
        grown < 256 << 20,
        "the server grew by {} MiB for replies nobody takes",
        grown >> 20
    );
    // Everyone else is served all the same, and when the stuck clients go, so do their replies.
    let (mut other, _, _) = RawClient::go(srv.port);
    assert!(other.read(1, 20 << 20, 1 << 20).unwrap() == orig[20 << 20..21 << 20]);
    drop(stuck);
    assert!(other.read(2, 0, 32 << 20).unwrap() == orig[..32 << 20]);
    assert!(srv.run.alive());
}

#[test]
fn malformed_handshakes_get_errors_or_a_hang_up_and_the_server_keeps_serving() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let mut srv = serve_nbd(t.path(), &repo, "web01", &[]);

    // Unknown client flags.
    let mut c = RawClient::connect(srv.port);
    c.s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert!(c.closed_by_server());
    // A bad option magic.
    let mut c = RawClient::fixed(srv.port);
    c.s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(c.closed_by_server());
    // An option too long to be real: its data is skipped and it is refused.
    let mut c = RawClient::fixed(srv.port);
    c.send_option(7, &vec![0u8; 100_000]);
    assert_eq!(c.read_opt_reply().typ, REP_ERR_TOO_BIG);
    // ... and the connection is still usable.
    c.send_option(3, &[]);
    assert_eq!(c.replies_until_final().last().unwrap().typ, REP_ACK);
    // An unknown export by NBD_OPT_EXPORT_NAME cannot be answered with an error: hang up.
    let mut c = RawClient::fixed(srv.port);
    c.send_option(1, b"no-such-export");
    assert!(c.closed_by_server());
    // A client without fixed newstyle may only use NBD_OPT_EXPORT_NAME.
    let mut c = RawClient::connect(srv.port);
    c.s.write_all(&0u32.to_be_bytes()).unwrap();
    c.send_option(3, &[]);
    assert!(c.closed_by_server());
    // Garbage instead of a request after GO.
    let (mut c, _, _) = RawClient::go(srv.port);
    c.s.write_all(&[0xab; 28]).unwrap();
    assert!(c.closed_by_server());
    // Half a greeting reply, half an option, half a request, then gone.
    let mut c = RawClient::connect(srv.port);
    c.s.write_all(&[0, 0]).unwrap();
    drop(c);
    let mut c = RawClient::fixed(srv.port);
    c.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(c);
    let (mut c, _, _) = RawClient::go(srv.port);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);
    // Connected and silent, then gone.
    drop(std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap());

    assert!(srv.run.alive(), "the server died");
    assert!(qemu_compare(&srv.uri(), &vm.join("web01-flat.vmdk")));
}

#[test]
fn a_client_that_disconnects_mid_read_does_not_disturb_the_others() {
    let t = tempfile::tempdir().unwrap();
    let (vm, repo) = vm_repo(t.path());
    let flat = vm.join("web01-flat.vmdk");
    let mut srv = serve_nbd(t.path(), &repo, "web01", &[]);
    let port = srv.port;
    // A steady reader, compared at the end.
    let mut reader = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", &srv.uri()])
        .arg(&flat)
        .spawn()
        .unwrap();
    // Meanwhile clients ask for 32 MiB and hang up before (or while) the reply comes.
    for i in 0..8u64 {
        let (mut c, _, _) = RawClient::go(port);
        c.send_request(0, i, (i % 2) * (8 << 20), 32 << 20, &[]);
        if i % 2 == 0 {
            // Read a little of the reply first.
            let mut some = [0u8; 1000];
            std::io::Read::read_exact(&mut c.s, &mut some).unwrap();
        }
        c.s.shutdown(Shutdown::Both).unwrap();
    }
    // One that reads its whole reply while the abandoned ones are being written.
    let (mut c, _, _) = RawClient::go(port);
    let orig = fs::read(&flat).unwrap();
    assert_eq!(
        c.read(1, 8 << 20, 16 << 20).unwrap(),
        orig[8 << 20..24 << 20]
    );
    assert!(
        reader.wait().unwrap().success(),
        "the steady reader saw different data"
    );
    assert!(srv.run.alive());
    assert!(qemu_compare(&srv.uri(), &flat));
}

#[test]
fn damaged_data_gets_an_eio_reply_not_zeros() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img.raw");
    sparse_image(&img, 16 << 20, &[(0, 12 << 20, 9)]);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("img"));
    damage_one_chunk(&repo);
    let mut srv = serve_nbd(t.path(), &repo, "img", &[]);
    let orig = fs::read(&img).unwrap();
    let (mut c, size, _) = RawClient::go(srv.port);
    assert_eq!(size, orig.len() as u64);
    const BLOCK: usize = 64 << 10;
    let mut failed = Vec::new();
    for (i, want) in orig.chunks(BLOCK).enumerate() {
        match c.read(i as u64, (i * BLOCK) as u64, want.len() as u32) {
            Ok(got) => assert!(got == want, "block {i} read back wrong data"),
            Err(e) => {
                assert_eq!(e, EIO, "block {i}");
                failed.push(i);
            }
        }
    }
    // A chunk is at most 64 KiB: it lies in one or two aligned 64 KiB requests.
    assert!(
        !failed.is_empty(),
        "the damaged chunk was served without an error"
    );
    assert!(failed.len() <= 2, "{failed:?}");
    // With structured replies the error chunk names the damage to the client too.
    let mut c = structured_client(srv.port);
    let at = (failed[0] * BLOCK) as u64;
    let (e, msg) = c.read_structured(1, at, BLOCK as u32).unwrap_err();
    assert_eq!(e, EIO);
    assert!(msg.contains("damaged"), "{msg}");
    let next = failed.last().unwrap() + 1;
    if next * BLOCK < orig.len() {
        let (got, _) = c
            .read_structured(2, (next * BLOCK) as u64, BLOCK as u32)
            .unwrap();
        assert!(got == orig[next * BLOCK..(next + 1) * BLOCK]);
    }
    // A simple reply longer than the 4 MiB the server holds at once: damage in its first
    // piece still gets EIO; damage further on, after the reply began, cannot be said any more,
    // so the server hangs up rather than send wrong bytes, and serves on.
    let size = orig.len() as u64;
    let (mut c, _, _) = RawClient::go(srv.port);
    let len = (8 << 20).min(size - at) as u32;
    assert_eq!(c.read(1, at, len), Err(EIO));
    if at >= 4 << 20 {
        let start = at - (4 << 20);
        let (mut c, _, _) = RawClient::go(srv.port);
        let len = (8 << 20).min(size - start) as u32;
        assert!(len > (4 << 20) + BLOCK as u32);
        c.send_request(0, 2, start, len, &[]);
        assert_eq!(c.read_simple_reply(), (0, 2));
        let mut data = vec![0u8; len as usize];
        assert!(
            std::io::Read::read_exact(&mut c.s, &mut data).is_err(),
            "a reply with damage in it arrived whole"
        );
    } else {
        // The damage lies in the first 4 MiB: a long read from the start gets EIO.
        let (mut c, _, _) = RawClient::go(srv.port);
        assert_eq!(c.read(2, 0, 8 << 20), Err(EIO));
    }
    let (mut c, _, _) = RawClient::go(srv.port);
    let sound = if next * BLOCK < orig.len() {
        next
    } else {
        failed[0] - 1
    };
    let want = &orig[sound * BLOCK..(sound + 1) * BLOCK];
    assert!(c.read(3, (sound * BLOCK) as u64, BLOCK as u32).unwrap() == want);
    assert!(!qemu_compare(&srv.uri(), &img));
    assert!(srv.run.alive());
    assert!(
        srv.run.stderr().contains("damaged repository data"),
        "the damage was not reported: {}",
        srv.run.stderr()
    );
}
