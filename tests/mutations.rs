//! Every input parser (descriptor, .vmx, .vmsd, KDMV, COWD, seSparse, qcow2) run over a few
//! thousand mutated copies of valid files — bytes flipped, header fields set to extreme values,
//! files cut short — in-process through `vmrepo::fuzzing::exercise`. Any panic fails the test;
//! errors are the expected outcome. (`fuzz/` has cargo-fuzz targets for longer runs.)

mod common;
use common::vectors::*;
use common::*;
use std::fs;
use std::path::Path;

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    // Most damage goes into the first 4 KiB, where headers and tables live.
    let pick = |rng: &mut Rng, len: usize| {
        if rng.below(5) < 4 {
            rng.below(len.min(4096))
        } else {
            rng.below(len)
        }
    };
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = pick(rng, d.len());
                d[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let i = pick(rng, d.len()) & !3;
            let v: [u8; 8] = match rng.below(5) {
                0 => [0; 8],
                1 => [0xff; 8],
                2 => (1u64 << 31).to_le_bytes(),
                3 => (1u64 << 40).to_be_bytes(),
                _ => rng.next().to_le_bytes(),
            };
            let n = (d.len() - i).min(if rng.below(2) == 0 { 4 } else { 8 });
            d[i..i + n].copy_from_slice(&v[..n]);
        }
        2 => {
            let cut = rng.below(d.len());
            d.truncate(cut);
        }
        _ => {
            for _ in 0..1 + rng.below(32) {
                let i = rng.below(d.len());
                d[i] = rng.next() as u8;
            }
        }
    }
    d
}

#[test]
fn parsers_survive_thousands_of_mutated_inputs() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sh(&format!(
        "cd {} && qemu-img create -q -f vmdk -o zeroed_grain=on k.vmdk 4M && \
         qemu-io -c 'write -P 0x11 0 64k' -c 'write -z 64k 64k' -c 'write -P 0x22 3M 4k' k.vmdk && \
         qemu-img convert -O vmdk -o subformat=streamOptimized k.vmdk so.vmdk && \
         qemu-img convert -O qcow2 k.vmdk q.qcow2 && qemu-img convert -c -O qcow2 k.vmdk qz.qcow2 && \
         qemu-img convert -c -O qcow2 -o compression_type=zstd k.vmdk qzstd.qcow2 && \
         mkdir -p tree/etc/sub && echo hi > tree/etc/hosts && ln -s etc/hosts tree/link && \
         seq 1 3000 > tree/etc/sub/numbers && mkfs.ext4 -q -d tree fs.ext4 1M && \
         truncate -s 2M gpt.img && sgdisk -n 1:2048:+512K -t 1:8300 gpt.img >/dev/null && \
         dd if=fs.ext4 of=gpt.img bs=512 seek=2048 count=1024 conv=notrunc status=none && \
         truncate -s 2M mbr.img && printf 'start=64, size=512, type=83\nstart=600, type=5\n\
         start=700, size=100, type=83\nstart=900, size=100, type=7\n' | sfdisk -q mbr.img && \
         truncate -s 2M fs.ntfs && mkntfs -q -F -f fs.ntfs 2>/dev/null && \
         ntfscp -q fs.ntfs tree/etc/sub/numbers numbers.txt && \
         mkfs.vfat -C fs.fat 1024 >/dev/null && mmd -i fs.fat ::/EFI && \
         mcopy -i fs.fat tree/etc/sub/numbers '::/EFI/Long Name.txt' && \
         {{ printf 'x\n0 0\nd--755 0 0\n hosts ---644 0 0 tree/etc/hosts\n \
         numbers ---644 0 0 tree/etc/sub/numbers\n link l--777 0 0 numbers\n'; \
         for i in $(seq 100 250); do echo \" entry-with-a-longer-name-$i ---644 0 0 tree/etc/hosts\"; done; \
         echo '$'; }} > xfs.proto && truncate -s 16M fs.xfs && \
         TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 mkfs.xfs -q -f -p xfs.proto fs.xfs && \
         truncate -s 7M fs.xfs",
        d.display()
    ))
    .ok();
    stream_gd_at_end(&d.join("end.vmdk"), &bytes(256 << 10, 5), &[1]);
    cowd_delta(
        d,
        "c",
        "p.vmdk",
        1,
        2,
        16384,
        1,
        &[(1, vec![1; 512]), (5000, vec![2; 512])],
    );
    sesparse_delta_at(
        d,
        "s",
        "p.vmdk",
        1,
        2,
        8192,
        &[
            (0, SeGrain::Zero),
            (1, SeGrain::Unmapped),
            (2, SeGrain::Data(vec![3; 4096])),
        ],
        false,
        1,
    );
    let read = |n: &str| fs::read(d.join(n)).unwrap();
    let vmx = b"displayName = \"a|22b\"\nscsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"a.vmdk\"\nsata0:1.present = \"TRUE\"\nsata0:1.fileName = \"b.vmdk\"\n".to_vec();
    let vmsd = b"snapshot.current = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.displayName = \"x\"\nsnapshot0.createTimeHigh = \"388745\"\nsnapshot0.createTimeLow = \"-1991180826\"\nsnapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"a.vmdk\"\nsnapshot0.disk0.node = \"scsi0:0\"\n".to_vec();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("descriptor", read("c.vmdk")),
        (
            "descriptor",
            vmfs_descriptor("x-flat.vmdk", 1 << 20).into_bytes(),
        ),
        ("vmx", vmx),
        ("vmsd", vmsd),
        ("kdmv", read("k.vmdk")),
        ("kdmv", read("so.vmdk")),
        ("kdmv", read("end.vmdk")),
        ("cowd", read("c-delta.vmdk")),
        ("sesparse", read("s-sesparse.vmdk")),
        ("qcow2", read("q.qcow2")),
        ("qcow2", read("qz.qcow2")),
        ("qcow2", read("qzstd.qcow2")),
        ("partitions", read("gpt.img")),
        ("partitions", read("mbr.img")),
        ("ext4", read("fs.ext4")),
        ("ntfs", read("fs.ntfs")),
        ("fat", read("fs.fat")),
        // An XFS volume's first 7 MiB: its superblock, root directory (block form) and files.
        ("xfs", read("fs.xfs")),
        // The exFAT volume of tests/guest_files.rs (made by mkfs.exfat and exfat-fuse).
        (
            "exfat",
            fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/exfat.img"))
                .unwrap(),
        ),
        ("lvm", {
            // A PV's label and metadata (written by lvm), as long as its metadata area needs
            // (its logical volumes then lie past the end: listed, each with why it is unreadable).
            let mut pv = fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lvm2-pv-head.bin"),
            )
            .unwrap();
            pv.resize(1100 << 10, 0);
            pv
        }),
    ];
    // Every seed is valid as it is: it parses, opens and reads, so the mutations below start
    // from inputs that reach the parsers' deeper code (a parser refusing everything fails here).
    for (i, (parser, seed)) in seeds.iter().enumerate() {
        if let Err(e) = vmrepo::fuzzing::exercise(parser, seed) {
            panic!("seed {i} ({parser}) is refused: {e}");
        }
    }
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut accepted = 0usize;
    for (parser, seed) in &seeds {
        for _ in 0..400 {
            accepted += vmrepo::fuzzing::exercise(parser, &mutate(seed, &mut rng)).is_ok() as usize;
        }
    }
    // Many mutations (a flipped data byte, a cut after the last table) still parse: the
    // parsers are exercised past their first check, not only refusing.
    assert!(
        accepted > seeds.len() * 40,
        "only {accepted} mutated inputs parsed"
    );
}
