//! Hostile VM directories (issue #15, defect 4): a VM directory is input from whoever controls
//! the VM's datastore folder, and its files name other files. None of them may make an ingest
//! store a host file: a `.vmx` disk, a `.vmsd` frozen link, a qcow2 backing file, a VMDK extent
//! or a small file naming (directly, with `..`, or through a symlink) a file outside the VM's
//! directory is refused with an error naming the file and saying what to do, as are FIFOs and
//! device nodes; nothing is committed and the secret's bytes are nowhere in the repository.
//! With `--allow-path` (or `--datastore-map`, or `allow_paths` in a job file) naming the outside
//! directory, the same VMs ingest and restore byte for byte.
//!
//! The planted "host file" (`outside/shadow`, next to the VM directories) starts with a text
//! marker followed by incompressible bytes: zstd stores those raw, so had they been stored they
//! would be found verbatim in the repository's files (the positive test checks that the search
//! does find them once they are allowed in).

mod common;
use common::*;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

const MARKER: &str = "HOSTILE-VM-SECRET-MARKER-5c1e9a77d3f0";
const SECRET_LEN: usize = 64 << 10;

/// Incompressible bytes (whole xorshift words).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn secret_bytes() -> Vec<u8> {
    let mut v = format!("{MARKER}\n").into_bytes();
    v.extend(noise(SECRET_LEN - v.len(), 0x5ec7e7));
    v
}

/// Byte strings whose presence in the repository means the secret was stored.
fn secret_needles() -> Vec<Vec<u8>> {
    let b = secret_bytes();
    vec![
        MARKER.as_bytes().to_vec(),
        b[100..164].to_vec(),
        b[40_000..40_064].to_vec(),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// `vmrepo ARGS` under a time limit (a FIFO must not hang an ingest): exit code 124 = killed.
fn vmrepo_limited(args: &[OsString]) -> Run {
    let out = Command::new("timeout")
        .args(["-k", "5", "120"])
        .arg(BIN)
        .args(args)
        .output()
        .expect("run vmrepo");
    Run::from(out)
}

/// A temporary "host": a repository, an outside directory with the secret, VM directories.
struct Host {
    _t: tempfile::TempDir,
    root: PathBuf,
    repo: PathBuf,
    outside: PathBuf,
    secret: PathBuf,
}

impl Host {
    fn new() -> Host {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let repo = init_repo(&root);
        let outside = root.join("outside");
        fs::create_dir_all(&outside).unwrap();
        let secret = outside.join("shadow");
        fs::write(&secret, secret_bytes()).unwrap();
        Host {
            _t: t,
            root,
            repo,
            outside,
            secret,
        }
    }

    /// A valid VM `ROOT/CASE/vm` (vm.vmx, one `vmfs` disk vm.vmdk + vm-flat.vmdk of
    /// SECRET_LEN bytes, nvram, vmsd, vmxf, logs).
    fn vm(&self, case: &str) -> PathBuf {
        make_vm(
            &self.root.join(case),
            "vm",
            &[(SECRET_LEN as u64, vec![(0, 16 << 10, 1)])],
        )
    }

    fn secret_str(&self) -> String {
        self.secret.display().to_string()
    }

    /// The secret's path relative to `from`, climbing to `/` first with more `..` than needed.
    fn dotdot_from(&self, from: &Path) -> String {
        "../".repeat(from.components().count() + 2) + self.secret_str().trim_start_matches('/')
    }

    /// Asserts that no generation exists and no byte string of the secret is in any file of
    /// the repository.
    fn assert_nothing_stored(&self) {
        let list = vmrepo([s("list"), p(&self.repo), s("--json")]).ok().json();
        assert!(
            list.as_array().unwrap().is_empty(),
            "a generation was recorded: {list}"
        );
        for f in files_under(&self.repo) {
            let data = fs::read(&f).unwrap();
            for n in secret_needles() {
                assert!(
                    !contains(&data, &n),
                    "{} holds bytes of the host file",
                    f.display()
                );
            }
        }
    }

    /// Ingests `src` (with `extra` options), expecting a refusal whose message holds every
    /// needle, and nothing stored.
    fn refused(&self, src: &Path, extra: &[&str], needles: &[&str]) {
        let mut args = vec![s("ingest"), p(&self.repo), p(src), s("--name"), s("x")];
        args.extend(extra.iter().map(|a| s(a)));
        let r = vmrepo_limited(&args);
        assert_ne!(r.code, 124, "ingest of {} hung", src.display());
        assert_ne!(
            r.code,
            0,
            "ingest of {} succeeded:\n{}",
            src.display(),
            r.stdout
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        for n in needles {
            assert!(r.stderr.contains(n), "missing {n:?} in:\n{}", r.stderr);
        }
        self.assert_nothing_stored();
    }
}

/// Adds disk `scsi0:UNIT` named `file` to `vm/vm.vmx`.
fn add_disk(vm: &Path, unit: u32, file: &str) {
    let path = vm.join("vm.vmx");
    let vmx = fs::read_to_string(&path).unwrap()
        + &format!(
            "scsi0:{unit}.present = \"TRUE\"\nscsi0:{unit}.fileName = \"{file}\"\n\
             scsi0:{unit}.deviceType = \"scsi-hardDisk\"\n"
        );
    fs::write(path, vmx).unwrap();
}

/// Replaces `path` by a symbolic link to `target`.
fn relink(path: &Path, target: &Path) {
    let _ = fs::remove_file(path);
    symlink(target, path).unwrap();
}

fn vmsd_freezing(vm: &Path, file: &str) {
    fs::write(
        vm.join("vm.vmsd"),
        format!(
            ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"1\"\nsnapshot.current = \"1\"\n\
             snapshot.numSnapshots = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.displayName = \"nightly\"\n\
             snapshot0.numDisks = \"1\"\nsnapshot0.disk0.fileName = \"{file}\"\n\
             snapshot0.disk0.node = \"scsi0:0\"\n"
        ),
    )
    .unwrap();
}

#[test]
fn a_vmx_disk_naming_a_host_file_is_refused() {
    let h = Host::new();
    let vm = h.vm("absolute");
    add_disk(&vm, 1, &h.secret_str());
    h.refused(
        &vm,
        &[],
        &[
            &h.secret_str(),
            "vm.vmx",
            "outside the directories",
            "--allow-path",
        ],
    );
    // The .vmx given instead of its directory: the same.
    h.refused(&vm.join("vm.vmx"), &[], &[&h.secret_str(), "--allow-path"]);
}

#[test]
fn a_vmx_disk_path_with_dotdot_is_refused() {
    let h = Host::new();
    let vm = h.vm("dotdot");
    add_disk(&vm, 1, "../../outside/shadow");
    h.refused(
        &vm,
        &[],
        &["../../outside/shadow", &h.secret_str(), "--allow-path"],
    );
    // However many `..`.
    let vm = h.vm("dotdot-deep");
    let deep = h.dotdot_from(&vm);
    add_disk(&vm, 1, &deep);
    h.refused(&vm, &[], &[&deep, "--allow-path"]);
}

#[test]
fn a_symlinked_disk_in_the_vm_directory_pointing_outside_is_refused() {
    let h = Host::new();
    let vm = h.vm("symlinked-disk");
    symlink(&h.secret, vm.join("data.img")).unwrap();
    add_disk(&vm, 1, "data.img");
    h.refused(
        &vm,
        &[],
        &[
            "data.img",
            &format!("resolves to {}", h.secret_str()),
            "--allow-path",
        ],
    );
}

#[test]
fn a_vmsd_disk_path_outside_the_vm_directory_is_refused() {
    let h = Host::new();
    for (case, file) in [
        ("vmsd-absolute", h.secret_str()),
        ("vmsd-dotdot", "../../outside/shadow".to_string()),
    ] {
        let vm = h.vm(case);
        vmsd_freezing(&vm, &file);
        h.refused(
            &vm,
            &["--at-snapshot", "latest"],
            &[&file, "vm.vmsd", "--allow-path"],
        );
    }
}

#[test]
fn a_qcow2_backing_file_climbing_out_with_dotdot_is_refused() {
    let h = Host::new();
    let vm = h.vm("qcow2");
    let backing = h.dotdot_from(&vm);
    sh(&format!(
        "qemu-img create -q -f qcow2 -u -b '{backing}' -F raw '{}' 64K",
        vm.join("disk.qcow2").display()
    ))
    .ok();
    add_disk(&vm, 1, "disk.qcow2");
    h.refused(&vm, &[], &[&backing, "disk.qcow2", "--allow-path"]);
    // Named directly, the image is trusted with its directory, but not its backing file.
    h.refused(&vm.join("disk.qcow2"), &[], &[&backing, "--allow-path"]);
}

#[test]
fn a_vmdk_extent_naming_a_host_file_is_refused() {
    let h = Host::new();
    // A flat extent that is a symlink to the host file (the flat descriptor path).
    let vm = h.vm("extent-symlink");
    relink(&vm.join("vm-flat.vmdk"), &h.secret);
    h.refused(
        &vm,
        &[],
        &["vm-flat.vmdk", "vm.vmdk", &h.secret_str(), "--allow-path"],
    );
    // The extent line names it with `..`.
    let vm = h.vm("extent-dotdot");
    let desc = fs::read_to_string(vm.join("vm.vmdk")).unwrap();
    fs::write(
        vm.join("vm.vmdk"),
        desc.replace("\"vm-flat.vmdk\"", "\"../../outside/shadow\""),
    )
    .unwrap();
    h.refused(&vm, &[], &["../../outside/shadow", "--allow-path"]);
    // A descriptor read by the chain reader (createType custom), extent symlinked out.
    let vm = h.vm("extent-chain");
    fs::write(
        vm.join("vm.vmdk"),
        desc.replace("createType=\"vmfs\"", "createType=\"custom\"")
            .replace(" VMFS ", " FLAT "),
    )
    .unwrap();
    relink(&vm.join("vm-flat.vmdk"), &h.secret);
    h.refused(&vm, &[], &["vm-flat.vmdk", "--allow-path"]);
    // The same descriptor given on the command line: the descriptor is trusted, its extent not.
    h.refused(&vm.join("vm.vmdk"), &[], &["vm-flat.vmdk", "--allow-path"]);
    // A frozen link (--at-snapshot, read by the chain reader) whose extent is symlinked out.
    let vm = h.vm("extent-frozen");
    fs::write(
        vm.join("frozen.vmdk"),
        desc.replace("\"vm-flat.vmdk\"", "\"frozen-flat.vmdk\""),
    )
    .unwrap();
    symlink(&h.secret, vm.join("frozen-flat.vmdk")).unwrap();
    vmsd_freezing(&vm, "frozen.vmdk");
    h.refused(
        &vm,
        &["--at-snapshot", "latest"],
        &["frozen-flat.vmdk", "--allow-path"],
    );
}

#[test]
fn small_files_symlinked_out_of_the_vm_directory_are_refused() {
    let h = Host::new();
    // Text look-alikes for the files that must parse (.vmx, descriptor).
    let template = h.vm("template");
    let host_vmx = h.outside.join("host.vmx");
    fs::write(
        &host_vmx,
        fs::read_to_string(template.join("vm.vmx")).unwrap()
            + &format!("annotation = \"{MARKER}\"\n"),
    )
    .unwrap();
    let host_desc = h.outside.join("host.vmdk");
    fs::write(
        &host_desc,
        fs::read_to_string(template.join("vm.vmdk")).unwrap() + &format!("# {MARKER}\n"),
    )
    .unwrap();
    for (file, target) in [
        ("vmware.log", &h.secret),
        ("vmware-1.log", &h.secret),
        ("vm.nvram", &h.secret),
        ("vm.vmsd", &h.secret),
        ("vm.vmxf", &h.secret),
        ("vm.vmx", &host_vmx),
        ("vm.vmdk", &host_desc),
    ] {
        let vm = h.vm(&format!("small-{file}"));
        relink(&vm.join(file), target);
        h.refused(
            &vm,
            &[],
            &[
                file,
                &format!("resolves to {}", target.display()),
                "--allow-path",
            ],
        );
    }
    // The nvram key naming a host file.
    let vm = h.vm("nvram-key");
    let vmx = fs::read_to_string(vm.join("vm.vmx"))
        .unwrap()
        .replace("nvram = \"vm.nvram\"", "nvram = \"../../outside/shadow\"");
    fs::write(vm.join("vm.vmx"), vmx).unwrap();
    h.refused(
        &vm,
        &[],
        &["../../outside/shadow", "vm.vmx", "--allow-path"],
    );
}

#[test]
fn a_fifo_as_a_disk_or_extent_is_refused_without_hanging() {
    let h = Host::new();
    let vm = h.vm("fifo-disk");
    sh(&format!("mkfifo '{}'", vm.join("data.img").display())).ok();
    add_disk(&vm, 1, "data.img");
    h.refused(&vm, &[], &["data.img", "FIFO"]);
    let vm = h.vm("fifo-extent");
    fs::remove_file(vm.join("vm-flat.vmdk")).unwrap();
    sh(&format!("mkfifo '{}'", vm.join("vm-flat.vmdk").display())).ok();
    h.refused(&vm, &[], &["vm-flat.vmdk", "FIFO"]);
    // A FIFO symlinked in from an allowed directory is still no disk.
    let fifo = h.outside.join("pipe");
    sh(&format!("mkfifo '{}'", fifo.display())).ok();
    let vm = h.vm("fifo-allowed");
    symlink(&fifo, vm.join("pipe.img")).unwrap();
    add_disk(&vm, 1, "pipe.img");
    let allow = h.outside.display().to_string();
    h.refused(&vm, &["--allow-path", &allow], &["pipe.img", "FIFO"]);
}

#[test]
fn device_nodes_named_by_a_vm_are_refused() {
    let h = Host::new();
    // A character device, even in an allowed directory.
    let vm = h.vm("chardev");
    add_disk(&vm, 1, "/dev/zero");
    h.refused(
        &vm,
        &["--allow-path", "/dev"],
        &["/dev/zero", "character device"],
    );
    // A block device node in the VM directory: only one named on the command line is read.
    let vm = h.vm("blockdev");
    let node = vm.join("blk");
    if sh(&format!("mknod '{}' b 7 0", node.display())).code != 0 {
        eprintln!("skipping the block device case: mknod is not permitted here");
        return;
    }
    add_disk(&vm, 1, "blk");
    h.refused(&vm, &[], &["blk", "block device", "command line"]);
}

/// The allowed case: every kind of outside file above, in a directory the user allows, is read
/// and restored byte for byte.
#[test]
fn allowed_directories_are_read_and_round_trip() {
    let h = Host::new();
    let vm = h.vm("good");
    // Disk 0's flat extent is a symlink to the outside file; disk 1 is a qcow2 whose backing
    // file is outside, named with `..`; the log is a symlink to an outside log.
    relink(&vm.join("vm-flat.vmdk"), &h.secret);
    let base = h.outside.join("base.raw");
    fs::write(&base, noise(1 << 20, 3)).unwrap();
    let disk = vm.join("disk.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b ../../outside/base.raw -F raw '{d}' 1M && \
         qemu-io -c 'write -P 0x5a 64k 64k' '{d}' >/dev/null",
        d = disk.display()
    ))
    .ok();
    add_disk(&vm, 1, "disk.qcow2");
    let log = h.outside.join("host.log");
    fs::write(&log, "a log kept on another volume\n".repeat(10)).unwrap();
    relink(&vm.join("vmware.log"), &log);

    // Refused without the option (naming the option), accepted with it.
    h.refused(&vm, &[], &["--allow-path"]);
    let allow = h.outside.display().to_string();
    let r = vmrepo([
        s("ingest"),
        p(&h.repo),
        p(&vm),
        s("--allow-path"),
        s(&allow),
        s("--json"),
    ]);
    r.ok();
    let out = h.root.join("restored");
    vmrepo([s("extract"), p(&h.repo), s("vm"), p(&out)]).ok();
    assert_eq!(fs::read(out.join("vm-flat.vmdk")).unwrap(), secret_bytes());
    assert!(same_file(&log, &out.join("vmware.log")));
    assert!(same_file(&vm.join("vm.vmx"), &out.join("vm.vmx")));
    assert!(qemu_identical(&disk, &out.join("disk.qcow2")));
    // What the refusals above searched for is found once the file is allowed in: the search
    // would have seen it.
    let stored = files_under(&h.repo)
        .iter()
        .any(|f| contains(&fs::read(f).unwrap(), &secret_needles()[2]));
    assert!(
        stored,
        "the allowed file's bytes are not found in the repository"
    );

    // inspect takes the same option.
    let r = vmrepo([s("inspect"), p(&vm), s("--json")]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("--allow-path"), "{}", r.stdout);
    vmrepo([s("inspect"), p(&vm), s("--allow-path"), s(&allow)]).ok();

    // A disk image the user names is trusted with its own directory (here: the same file).
    let r = vmrepo([
        s("ingest"),
        p(&h.repo),
        p(&h.secret),
        s("--name"),
        s("named"),
        s("--json"),
    ]);
    r.ok();
    let img = h.root.join("named");
    vmrepo([s("extract"), p(&h.repo), s("named"), p(&img)]).ok();
    assert_eq!(fs::read(img.join("shadow")).unwrap(), secret_bytes());
}

#[test]
fn a_datastore_map_target_is_an_allowed_root() {
    let h = Host::new();
    let vm = h.vm("mapped");
    // Disk 1 is a qcow2 whose backing file is on another datastore, found through the map;
    // disk 0's flat extent is a symlink into that datastore's local directory.
    let base = h.outside.join("base.raw");
    let mut want = noise(1 << 20, 4);
    fs::write(&base, &want).unwrap();
    let disk = vm.join("disk.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b '{b}' -F raw '{d}' 1M && \
         qemu-io -c 'write -P 0x5a 0 64k' '{d}' >/dev/null && \
         qemu-img rebase -u -b /vmfs/volumes/ds9/base.raw -F raw '{d}'",
        b = base.display(),
        d = disk.display()
    ))
    .ok();
    want[..64 << 10].fill(0x5a);
    add_disk(&vm, 1, "disk.qcow2");
    relink(&vm.join("vm-flat.vmdk"), &h.secret);
    // Without the map the symlink is refused.
    h.refused(&vm, &[], &["vm-flat.vmdk", "--allow-path"]);
    let map = format!("/vmfs/volumes/ds9={}", h.outside.display());
    vmrepo([
        s("ingest"),
        p(&h.repo),
        p(&vm),
        s("--datastore-map"),
        s(&map),
        s("--json"),
    ])
    .ok();
    let out = h.root.join("restored");
    vmrepo([
        s("extract"),
        p(&h.repo),
        s("vm"),
        p(&out),
        s("--disk-format"),
        s("raw"),
    ])
    .ok();
    assert_eq!(fs::read(out.join("disk.img")).unwrap(), want);
    assert_eq!(fs::read(out.join("vm.img")).unwrap(), secret_bytes());
}

#[test]
fn a_job_file_allow_paths_list_lets_a_vm_read_outside() {
    let h = Host::new();
    let ds = h.root.join("ds1");
    let web = make_vm(&ds, "web01", &[(SECRET_LEN as u64, vec![(0, 4096, 1)])]);
    relink(&web.join("web01-flat.vmdk"), &h.secret);
    make_vm(&ds, "db01", &[(1 << 20, vec![(0, 4096, 2)])]);
    let job = |extra_top: &str, extra_tables: &str| {
        let path = h.root.join("job.toml");
        fs::write(
            &path,
            format!(
                "repository = \"{}\"\nvms = [\"{}/*\"]\n{extra_top}\n{extra_tables}",
                h.repo.display(),
                ds.display()
            ),
        )
        .unwrap();
        path
    };
    // No allow_paths: web01 fails naming its extent, db01 is backed up.
    let r = vmrepo_limited(&[s("run"), p(&job("", "")), s("--json")]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    let web_outcome = j["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"].as_str().unwrap().ends_with("web01"))
        .unwrap()
        .clone();
    assert_eq!(web_outcome["status"], "failed");
    let err = web_outcome["error"].as_str().unwrap();
    assert!(
        err.contains("web01-flat.vmdk") && err.contains("allow_paths = [\"DIR\"]"),
        "{err}"
    );
    assert!(generations(&h.repo, "web01").is_empty());
    assert_eq!(generations(&h.repo, "db01").len(), 1);

    // The dry run says the same (exit 1: the run would fail that VM); the job-wide list lets
    // it in.
    let dry = vmrepo([s("run"), p(&job("", "")), s("--dry-run")]);
    assert_eq!(dry.code, 1, "{}", dry.stderr);
    let dry = dry.stdout;
    assert!(
        dry.contains("CANNOT BE READ") && dry.contains("allow_paths = [\"DIR\"]"),
        "{dry}"
    );
    let top = format!("allow_paths = [\"{}\"]", h.outside.display());
    let dry = vmrepo([s("run"), p(&job(&top, "")), s("--dry-run")])
        .ok()
        .stdout
        .clone();
    assert!(!dry.contains("CANNOT BE READ"), "{dry}");

    // A per-VM list.
    let per_vm = format!("[vm.web01]\nallow_paths = [\"{}\"]\n", h.outside.display());
    let r = vmrepo_limited(&[s("run"), p(&job("", &per_vm)), s("--json")]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(generations(&h.repo, "web01").len(), 1);
    let out = h.root.join("restored");
    vmrepo([s("extract"), p(&h.repo), s("web01"), p(&out)]).ok();
    assert_eq!(
        fs::read(out.join("web01-flat.vmdk")).unwrap(),
        secret_bytes()
    );
}
