//! Instant recovery: a real x86 machine (qemu-system-x86_64, TCG, SeaBIOS) boots a disk straight
//! from a backup served by `vmrepo serve-nbd`, with `snapshot=on` so its writes go to a
//! temporary overlay and the backup is never written.
//!
//! The disk is a boot sector of our own that prints a marker on the serial port: proof that the
//! BIOS read the backup's first sector over NBD and ran it. qemu-system comes from
//! scripts/qemu-system.sh (Debian's packages unpacked beside the newer qemu-utils).

mod common;
#[path = "common/live.rs"]
mod live;

use std::process::Command;

use common::*;
use live::*;

const MARKER: &[u8] = b"BOOTED-FROM-VMREPO-NBD";

/// An 8 MiB raw disk whose boot sector writes MARKER to COM1 and halts.
fn boot_disk(path: &std::path::Path) {
    let mut code: Vec<u8> = vec![
        0xFC, // cld
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBE, 0x00, 0x00, // mov si, msg (patched below)
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xAC, // next: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz done
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp next
        0xB0, 0x00, // done: mov al, 0
        0xE6, 0xF4, // out 0xf4, al: isa-debug-exit ends the machine (exit status 1)
        0xFA, // cli
        0xF4, // hlt
        0xEB, 0xFE, // jmp $
    ];
    let msg = 0x7C00 + code.len() as u16;
    code[6..8].copy_from_slice(&msg.to_le_bytes());
    code.extend_from_slice(MARKER);
    code.extend_from_slice(b"\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    let mut disk = vec![0u8; 8 << 20];
    disk[..512].copy_from_slice(&code);
    // Some data further in, so the backup is more than one sector.
    disk[1 << 20..(1 << 20) + 4096].copy_from_slice(&bytes(4096, 3));
    std::fs::write(path, disk).unwrap();
}

#[test]
fn a_vm_boots_from_a_backup_over_nbd_and_the_backup_is_not_written() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("bootvm.img");
    boot_disk(&img);
    let repo = init_repo(t.path());
    ingest(&repo, &img, Some("bootvm"));
    let server = serve_nbd(t.path(), &repo, "bootvm", &[]);

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/qemu-system.sh");
    let out = Command::new("timeout")
        .args(["-s", "KILL", "60"])
        .arg(&script)
        .args([
            "-display", "none", "-serial", "stdio", "-nic", "none", "-m", "64",
        ])
        .args(["-no-reboot", "-drive"])
        .arg(format!("file={},format=raw,snapshot=on", server.uri()))
        // The boot sector ends the machine through this device once the marker is out.
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/qemu-system.sh");
    // isa-debug-exit with value 0 makes qemu exit with status 1; `timeout` (status 137) only
    // guards against a hang.
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu did not end through the boot sector"
    );
    let serial = out.stdout;
    assert!(
        serial.windows(MARKER.len()).any(|w| w == MARKER),
        "the machine did not boot from nbd://: serial output {:?}, stderr {}",
        String::from_utf8_lossy(&serial),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    // The backup is intact and unchanged.
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
    let back = t.path().join("back");
    vmrepo([s("extract"), p(&repo), s("bootvm"), p(&back)]).ok();
    assert!(same_file(&back.join("bootvm.img"), &img));
}
