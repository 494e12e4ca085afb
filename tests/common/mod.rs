//! Shared helpers for the integration tests: run the real `vmrepo` binary, and build real VM
//! directories and disk images (sparse files, VMDK descriptors, qemu-img made images).
#![allow(dead_code)]

pub mod vectors;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_vmrepo");

/// A finished command.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `vmrepo ARGS`.
pub fn vmrepo<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    vmrepo_batches(false, args)
}

/// Runs `vmrepo ARGS` with the passphrase `pass` in VMREPO_PASSWORD, and `new` (or nothing)
/// in VMREPO_NEW_PASSWORD.
pub fn vmrepo_with_passphrase(pass: &str, new: Option<&str>, args: &[std::ffi::OsString]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.env("VMREPO_PASSWORD", pass).args(args);
    match new {
        Some(n) => cmd.env("VMREPO_NEW_PASSWORD", n),
        None => cmd.env_remove("VMREPO_NEW_PASSWORD"),
    };
    Run::from(cmd.output().expect("run vmrepo"))
}

/// Runs `vmrepo ARGS`; with `tiny`, with its memory-bounding batches made tiny (id sets on disk
/// in many partitions, rewrites in many batches), as on a repository of millions of objects.
pub fn vmrepo_batches<I, S>(tiny: bool, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if tiny {
        cmd.env("VMREPO_TEST_TINY_BATCHES", "1");
    }
    Run::from(cmd.output().expect("run vmrepo"))
}

/// Runs `vmrepo ARGS` and also returns the most memory it held at once (peak resident set, in
/// bytes), as the kernel reports it for that one process.
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its resource usage
pub fn vmrepo_peak_memory<I, S>(args: I) -> (Run, u64)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    use std::io::Read;
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run vmrepo");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for the child spawned above, which nothing else waits for.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let run = Run {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (run, usage.ru_maxrss as u64 * 1024)
}

/// Runs any command and returns its result.
pub fn sh(cmd: &str) -> Run {
    Run::from(
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .expect("run sh"),
    )
}

/// A new repository in `dir/repo`.
pub fn init_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    vmrepo([s("init"), p(&repo)]).ok();
    repo
}

pub fn s(x: &str) -> std::ffi::OsString {
    x.into()
}

pub fn p(x: &Path) -> std::ffi::OsString {
    x.as_os_str().to_owned()
}

/// Ingests with --json and returns the summary.
pub fn ingest(repo: &Path, src: &Path, name: Option<&str>) -> serde_json::Value {
    let mut args = vec![s("ingest"), p(repo), p(src), s("--json")];
    if let Some(n) = name {
        args.push(s("--name"));
        args.push(s(n));
    }
    vmrepo(args).ok().json()
}

/// Ingests `src` into `repo` as VM `vm`, recording the generation at `time` (RFC 3339).
pub fn ingest_at(repo: &Path, src: &Path, vm: &str, time: &str) {
    vmrepo([
        s("ingest"),
        p(repo),
        p(src),
        s("--name"),
        s(vm),
        s("--time"),
        s(time),
    ])
    .ok();
}

/// Deterministic pseudo-random bytes (xorshift), compressible by about `text_share`.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half the 8-byte words are text-like so zstd has something to do.
        if x & 1 == 0 {
            out.extend_from_slice(b"log line");
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(n);
    out
}

/// Creates a sparse file of `size` bytes and writes `(offset, len, seed)` regions into it.
pub fn sparse_image(path: &Path, size: u64, regions: &[(u64, usize, u64)]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &(off, len, seed) in regions {
        f.write_all_at(&bytes(len, seed), off).unwrap();
    }
}

/// Overwrites `len` bytes at `offset` in place.
pub fn overwrite(path: &Path, offset: u64, len: usize, seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&bytes(len, seed), offset).unwrap();
}

/// An ESXi-style descriptor for a `vmfs` flat pair.
pub fn vmfs_descriptor(flat: &str, size: u64) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\n# Extent description\nRW {} VMFS \"{flat}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.adapterType = \"lsilogic\"\nddb.thinProvisioned = \"1\"\nddb.virtualHWVersion = \"19\"\n",
        size / 512
    )
}

/// A VM directory like ESXi leaves it: .vmx, .nvram, .vmsd, .vmxf, logs, and one `vmfs` disk
/// per entry of `disks` (size, data regions). Returns the directory.
/// Data regions of a sparse image: (offset, length, seed).
pub type Regions = Vec<(u64, usize, u64)>;

pub fn make_vm(dir: &Path, name: &str, disks: &[(u64, Regions)]) -> PathBuf {
    let vm = dir.join(name);
    fs::create_dir_all(&vm).unwrap();
    let mut vmx = format!(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"{name}\"\n\
         guestOS = \"debian12-64\"\nmemSize = \"2048\"\nnvram = \"{name}.nvram\"\n\
         uuid.bios = \"56 4d 09 6b b0 ff 56 dd-bd 74 a4 03 97 2b f3 37\"\nscsi0.present = \"TRUE\"\n\
         scsi0.virtualDev = \"pvscsi\"\nide1:0.present = \"TRUE\"\nide1:0.deviceType = \"cdrom-image\"\n\
         ide1:0.fileName = \"/vmfs/volumes/ds1/iso/debian.iso\"\nannotation = \"backup test|0Asecond line\"\n"
    );
    for (i, (size, regions)) in disks.iter().enumerate() {
        let base = if i == 0 {
            name.to_string()
        } else {
            format!("{name}_{i}")
        };
        let flat = format!("{base}-flat.vmdk");
        sparse_image(&vm.join(&flat), *size, regions);
        fs::write(
            vm.join(format!("{base}.vmdk")),
            vmfs_descriptor(&flat, *size),
        )
        .unwrap();
        vmx.push_str(&format!(
            "scsi0:{i}.present = \"TRUE\"\nscsi0:{i}.fileName = \"{base}.vmdk\"\nscsi0:{i}.deviceType = \"scsi-hardDisk\"\n"
        ));
    }
    fs::write(vm.join(format!("{name}.vmx")), vmx).unwrap();
    let mut nvram = b"MRVN".to_vec();
    nvram.extend(bytes(8188, 99));
    fs::write(vm.join(format!("{name}.nvram")), nvram).unwrap();
    fs::write(
        vm.join(format!("{name}.vmsd")),
        ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"1\"\n",
    )
    .unwrap();
    fs::write(
        vm.join(format!("{name}.vmxf")),
        "<Foundry><VM/></Foundry>\n",
    )
    .unwrap();
    fs::write(
        vm.join("vmware.log"),
        "2026-11-21T01:00:00.000Z In(05) vmx Log for VMware ESX\n".repeat(50),
    )
    .unwrap();
    fs::write(vm.join("vmware-1.log"), "older log\n".repeat(20)).unwrap();
    vm
}

/// Byte-compares two files.
pub fn same_file(a: &Path, b: &Path) -> bool {
    sh(&format!("cmp -s '{}' '{}'", a.display(), b.display())).code == 0
}

/// `qemu-img compare` of two images (format detected by qemu-img).
pub fn qemu_identical(a: &Path, b: &Path) -> bool {
    let r = sh(&format!(
        "qemu-img compare '{}' '{}'",
        a.display(),
        b.display()
    ));
    r.code == 0 && r.stdout.contains("Images are identical")
}

/// Bytes allocated on disk for a file (to check sparseness).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Apparent size of every file under `dir`, summed.
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            tree_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// Names of generations of `vm`, oldest first.
pub fn generations(repo: &Path, vm: &str) -> Vec<String> {
    let r = vmrepo([s("list"), p(repo), s(vm), s("--json")]);
    if r.code != 0 {
        return Vec::new();
    }
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

/// The pack files of a repository, sorted.
pub fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(repo.join("data")).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Flips bit `bit` of the byte at `at` in `path` (damage for the corruption tests).
pub fn flip_bit(path: &Path, at: u64, bit: u8) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, at).unwrap();
}

/// Waits (polling every 10 ms) until `ready` holds; fails the test naming `what` after `secs`
/// seconds.
pub fn wait_for(what: &str, secs: u64, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not happen within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Sends signal `sig` to a vmrepo this test started.
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child process; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}
