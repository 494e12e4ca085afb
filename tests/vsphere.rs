//! VMs on an ESXi host backed up through the vSphere API, against a simulator serving the
//! real SOAP API and datastore file access over HTTPS (`scripts/vsphere-sim.sh`, govmomi's
//! simulator library; `scripts/vsphere-sim.sh install` builds it, .ci/run does).
//!
//! The simulator's VMs get real files on its datastore (a flat disk, a hosted sparse snapshot
//! chain made by qemu-img); vmrepo takes its snapshot, reads them over HTTPS and removes the
//! snapshot. Snapshots are checked independently of vmrepo's client
//! (tests/fixtures/vsphere_probe.py, raw SOAP from Python's standard library), also after
//! SIGTERM, after kill -9 and after a datastore read that fails midway.

mod common;
#[path = "common/live.rs"]
mod live;
use common::*;
use live::Running;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A simulator running for one test; stopped when dropped.
struct Sim {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

fn sim_script() -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vsphere-sim.sh"));
    c
}

impl Sim {
    /// A standalone ESXi host.
    fn start() -> Sim {
        Sim::start_as("esx")
    }

    /// `esx` (a standalone host) or `vpx` (a vCenter with datacenter DC0).
    fn start_as(mode: &str) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let out = sim_script()
            .arg("start")
            .arg(dir.path().join("sim"))
            .arg(mode)
            .output()
            .expect("run scripts/vsphere-sim.sh");
        assert!(
            out.status.success(),
            "cannot start the vSphere simulator (run `scripts/vsphere-sim.sh install` first):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = fs::read_to_string(dir.path().join("sim/env")).unwrap();
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Sim { dir, env }
    }

    fn get(&self, key: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} not in the simulator's env"))
    }

    /// The VM's folder on the simulator's datastore, on this machine.
    fn vm_dir(&self, vm: &str) -> PathBuf {
        PathBuf::from(self.get("VSIM_DS_DIR")).join(vm)
    }

    fn url(&self, vm: &str) -> String {
        format!("esxi://root@{}/{vm}", self.get("VSIM_HOST"))
    }

    /// A file holding the password (for children started without extra environment).
    fn password_file(&self) -> PathBuf {
        let f = self.dir.path().join("password");
        fs::write(&f, format!("{}\n", self.get("VSIM_PASSWORD"))).unwrap();
        f
    }

    /// `vmrepo ARGS` with the password in VMREPO_SOURCE_PASSWORD.
    fn vmrepo(&self, args: &[&str]) -> Run {
        Run::from(
            Command::new(BIN)
                .args(args)
                .env("VMREPO_SOURCE_PASSWORD", self.get("VSIM_PASSWORD"))
                .output()
                .unwrap(),
        )
    }

    /// Runs the independent probe: `snapshots VM` or `snapshot VM NAME`.
    fn probe(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vsphere_probe.py"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "probe {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The VM's snapshot names, as the host reports them.
    fn snapshots(&self, vm: &str) -> Vec<String> {
        self.probe(&["snapshots", vm])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = sim_script()
            .arg("stop")
            .arg(self.dir.path().join("sim"))
            .output();
    }
}

/// Gives the simulator's VM `vm` real files: a .vmx naming `disk1.vmdk` at scsi0:0 (the disk
/// the simulator's hardware lists), a `vmfs` flat disk of `size` with data `regions`, an
/// nvram and a log.
fn flat_vm(sim: &Sim, vm: &str, size: u64, regions: &[(u64, usize, u64)]) -> PathBuf {
    flat_vm_in(&sim.vm_dir(vm), vm, size, regions)
}

/// [`flat_vm`] for the VM whose folder on the simulator's datastores is `d`.
fn flat_vm_in(d: &Path, vm: &str, size: u64, regions: &[(u64, usize, u64)]) -> PathBuf {
    let d = d.to_path_buf();
    fs::write(
        d.join(format!("{vm}.vmx")),
        format!(
            ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"14\"\n\
             displayName = \"{vm}\"\nguestOS = \"debian12-64\"\nnvram = \"{vm}.nvram\"\n\
             scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsilogic\"\n\
             scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"disk1.vmdk\"\n"
        ),
    )
    .unwrap();
    fs::remove_file(d.join("disk1-flat.vmdk")).unwrap();
    sparse_image(&d.join("disk1-flat.vmdk"), size, regions);
    fs::write(
        d.join("disk1.vmdk"),
        vmfs_descriptor("disk1-flat.vmdk", size),
    )
    .unwrap();
    fs::write(d.join(format!("{vm}.nvram")), bytes(8192, 7)).unwrap();
    fs::write(d.join("vmware.log"), "vmx started\n".repeat(40)).unwrap();
    d
}

fn repo(dir: &Path) -> PathBuf {
    init_repo(dir)
}

#[test]
fn a_vm_on_an_esxi_host_is_backed_up_through_the_api_and_its_snapshot_removed() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    let repo = repo(t.path());
    let fp = sim.get("VSIM_THUMBPRINT");

    // A flat disk with data, zeros and holes, read with the certificate pinned.
    let vm0 = flat_vm(
        &sim,
        "ha-host_VM0",
        40 << 20,
        &[
            (0, 3 << 20, 1),
            (9 << 20, 5 << 20, 2),
            (39 << 20, 1 << 20, 3),
        ],
    );
    let url0 = sim.url("ha-host_VM0");
    let r = sim.vmrepo(&[
        "ingest",
        repo.to_str().unwrap(),
        &url0,
        "--tls-thumbprint",
        &fp,
        "--json",
    ]);
    let j = r.ok().json();
    assert!(
        j["generation"]
            .as_str()
            .unwrap()
            .starts_with("ha-host_VM0@"),
        "{j}"
    );
    assert!(
        r.stderr.contains("taking snapshot \"vmrepo-backup-"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("removed snapshot"), "{}", r.stderr);
    assert_eq!(sim.snapshots("ha-host_VM0"), Vec::<String>::new());
    let out = t.path().join("out0");
    vmrepo([s("extract"), p(&repo), s("ha-host_VM0"), p(&out)]).ok();
    // The disk is restored as read, under a descriptor written for it (as a hot backup's frozen
    // link is); the VM's own files byte for byte.
    sh(&format!(
        "qemu-img compare -q '{}' '{}'",
        vm0.join("disk1.vmdk").display(),
        out.join("disk1.vmdk").display()
    ))
    .ok();
    for f in [
        "disk1-flat.vmdk",
        "ha-host_VM0.vmx",
        "ha-host_VM0.nvram",
        "vmware.log",
    ] {
        assert!(same_file(&vm0.join(f), &out.join(f)), "{f} differs");
    }
    let list = vmrepo([s("list"), p(&repo), s("ha-host_VM0"), s("--json")]);
    assert!(
        list.ok().stdout.contains(&format!(
            "\"source\": \"esxi://root@{}",
            sim.get("VSIM_HOST")
        )),
        "{}",
        list.stdout
    );

    // A hosted sparse snapshot chain (a child over its base), trusted through the CA; a
    // snapshot the user took is reported and left alone.
    let vm1 = sim.vm_dir("ha-host_VM1");
    let raw = t.path().join("base.raw");
    sparse_image(&raw, 32 << 20, &[(0, 2 << 20, 4), (20 << 20, 4 << 20, 5)]);
    for f in ["disk1.vmdk", "disk1-flat.vmdk"] {
        let _ = fs::remove_file(vm1.join(f));
    }
    sh(&format!(
        "set -e; cd '{d}'; qemu-img convert -q -f raw -O vmdk -o subformat=monolithicSparse '{raw}' base.vmdk; \
         qemu-img create -q -f vmdk -b base.vmdk -F vmdk disk1.vmdk; \
         qemu-io -f vmdk -c 'write -P 0x5a 1M 3M' -c 'write -P 0x33 21M 64k' disk1.vmdk >/dev/null",
        d = vm1.display(),
        raw = raw.display()
    ))
    .ok();
    fs::write(
        vm1.join("ha-host_VM1.vmx"),
        "displayName = \"ha-host_VM1\"\nnvram = \"ha-host_VM1.nvram\"\nscsi0.present = \"TRUE\"\n\
         scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"disk1.vmdk\"\n",
    )
    .unwrap();
    sim.probe(&["snapshot", "ha-host_VM1", "before-upgrade"]);
    let r = sim.vmrepo(&[
        "ingest",
        repo.to_str().unwrap(),
        &sim.url("ha-host_VM1"),
        "--tls-ca",
        &sim.get("VSIM_CA"),
    ]);
    r.ok();
    assert!(
        r.stderr
            .contains("1 snapshot(s) vmrepo did not take: \"before-upgrade\""),
        "{}",
        r.stderr
    );
    assert_eq!(
        sim.snapshots("ha-host_VM1"),
        vec!["before-upgrade".to_string()]
    );
    let out = t.path().join("out1");
    vmrepo([s("extract"), p(&repo), s("ha-host_VM1"), p(&out)]).ok();
    sh(&format!(
        "qemu-img compare -q '{}' '{}'",
        vm1.join("disk1.vmdk").display(),
        out.join("disk1.vmdk").display()
    ))
    .ok();
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn a_vm_in_a_vcenter_datacenter_is_named_by_its_inventory_path() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start_as("vpx");
    let repo = repo(t.path());
    let vm = flat_vm(&sim, "DC0_H0_VM0", 16 << 20, &[(0, 6 << 20, 21)]);
    let url = format!("vcenter://root@{}/DC0/vm/DC0_H0_VM0", sim.get("VSIM_HOST"));
    sim.vmrepo(&[
        "ingest",
        repo.to_str().unwrap(),
        &url,
        "--tls-thumbprint",
        &sim.get("VSIM_THUMBPRINT"),
    ])
    .ok();
    assert_eq!(sim.snapshots("DC0_H0_VM0"), Vec::<String>::new());
    let out = t.path().join("out");
    vmrepo([s("extract"), p(&repo), s("DC0_H0_VM0"), p(&out)]).ok();
    assert!(same_file(
        &vm.join("disk1-flat.vmdk"),
        &out.join("disk1-flat.vmdk")
    ));
    // A path that is not DATACENTER/vm/...: refused before connecting.
    let r = sim.vmrepo(&[
        "ingest",
        repo.to_str().unwrap(),
        &url.replace("/vm/", "/host/"),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("a vCenter path is DATACENTER/vm/"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_host_that_is_not_the_one_pinned_a_wrong_password_or_a_snapshot_under_strict_get_nothing() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    let repo = repo(t.path());
    flat_vm(&sim, "ha-host_VM0", 8 << 20, &[(0, 1 << 20, 1)]);
    let url = sim.url("ha-host_VM0");
    let fp = sim.get("VSIM_THUMBPRINT");
    let repo_s = repo.to_str().unwrap();

    // Another certificate than the one pinned: refused before anything is sent.
    let wrong = format!(
        "{}{}",
        if fp.starts_with("00") { "11" } else { "00" },
        &fp[2..]
    );
    let r = sim.vmrepo(&["ingest", repo_s, &url, "--tls-thumbprint", &wrong]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "has SHA-256 fingerprint {fp}, not the pinned {wrong}"
        )),
        "{}",
        r.stderr
    );
    // No pin, no CA: the system's CAs do not know the host.
    let r = sim.vmrepo(&["ingest", repo_s, &url]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("certificate is not trusted: pin it with --tls-thumbprint"),
        "{}",
        r.stderr
    );
    // A CA that did not sign the host's certificate (the host's own certificate as the
    // anchor), and a CA file holding no certificate.
    let not_its_ca = sim.get("VSIM_CA").replace("ca.pem", "cert.pem");
    let r = sim.vmrepo(&["ingest", repo_s, &url, "--tls-ca", &not_its_ca]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("UnknownIssuer"), "{}", r.stderr);
    let junk = t.path().join("junk.pem");
    fs::write(&junk, "not a certificate\n").unwrap();
    let r = sim.vmrepo(&["ingest", repo_s, &url, "--tls-ca", junk.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("junk.pem holds no PEM certificate"),
        "{}",
        r.stderr
    );
    // A password in the address is refused before anything is sent.
    let r = sim.vmrepo(&["ingest", repo_s, &url.replace("root@", "root:secret@")]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("a password must not be written in the address"),
        "{}",
        r.stderr
    );

    // A wrong password.
    let r = Run::from(
        Command::new(BIN)
            .args(["ingest", repo_s, &url, "--tls-thumbprint", &fp])
            .env("VMREPO_SOURCE_PASSWORD", "not-the-password")
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("login as \"root\" failed: wrong user name or password"),
        "{}",
        r.stderr
    );

    // A VM that is not there.
    let r = sim.vmrepo(&[
        "ingest",
        repo_s,
        &sim.url("no-such-vm"),
        "--tls-thumbprint",
        &fp,
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("no VM at \"ha-datacenter/vm/no-such-vm\""),
        "{}",
        r.stderr
    );

    // --strict with a snapshot the user left: refused, their snapshot untouched, none added.
    sim.probe(&["snapshot", "ha-host_VM0", "forgotten"]);
    let r = sim.vmrepo(&["ingest", repo_s, &url, "--tls-thumbprint", &fp, "--strict"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("refusing to back up (--strict)"),
        "{}",
        r.stderr
    );
    assert_eq!(sim.snapshots("ha-host_VM0"), vec!["forgotten".to_string()]);
    assert_eq!(generations(&repo, "ha-host_VM0"), Vec::<String>::new());
}

/// The staging directories a vmrepo process `pid` has in the temporary directory.
fn staged_by(pid: u32) -> Vec<PathBuf> {
    fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("vmrepo-vsphere-{pid}-")))
        })
        .collect()
}

/// Waits until `cond` holds (a guard against hangs, not a timing check).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_mid_read_removes_the_snapshot_and_a_later_run_removes_one_kill_9_left() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    let repo = repo(t.path());
    flat_vm(&sim, "ha-host_VM0", 48 << 20, &[(0, 48 << 20, 9)]);
    let url = sim.url("ha-host_VM0");
    let fp = sim.get("VSIM_THUMBPRINT");
    let pw = sim.password_file();
    // Read slowly (4 MB/s: about 12 s for the disk) so the signals land mid-read.
    let args = [
        s("--limit-read"),
        s("4"),
        s("ingest"),
        p(&repo),
        s(&url),
        s("--tls-thumbprint"),
        s(&fp),
        s("--source-password-file"),
        p(&pw),
    ];
    let argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let ours = |sim: &Sim| {
        sim.snapshots("ha-host_VM0")
            .into_iter()
            .filter(|n| n.starts_with("vmrepo-backup-"))
            .count()
    };

    let mut run = Running::start(t.path(), "term", &argv);
    let pid = run.child.id();
    wait_for("the snapshot", || ours(&sim) == 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(run.alive(), "{}", run.stderr());
    assert_eq!(
        staged_by(pid).len(),
        1,
        "the VM's files are staged while it is read"
    );
    run.signal(libc::SIGTERM);
    let ended = run.wait();
    assert_eq!(ended.code, 130, "{}", ended.stderr);
    assert!(
        ended
            .stderr
            .contains("interrupted: removing snapshot \"vmrepo-backup-"),
        "{}",
        ended.stderr
    );
    assert_eq!(sim.snapshots("ha-host_VM0"), Vec::<String>::new());
    assert_eq!(
        staged_by(pid),
        Vec::<PathBuf>::new(),
        "the staged files are removed too"
    );
    assert_eq!(generations(&repo, "ha-host_VM0"), Vec::<String>::new());

    // kill -9 leaves the snapshot; the next run removes it and backs up.
    let run = Running::start(t.path(), "kill", &argv);
    let pid = run.child.id();
    wait_for("the snapshot", || ours(&sim) == 1);
    std::thread::sleep(Duration::from_millis(1000));
    run.signal(libc::SIGKILL);
    let _ = run.wait();
    let left = sim.snapshots("ha-host_VM0");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(staged_by(pid).len(), 1, "kill -9 leaves the staged files");
    let r = sim.vmrepo(&[
        "ingest",
        repo.to_str().unwrap(),
        &url,
        "--tls-thumbprint",
        &fp,
    ]);
    r.ok();
    assert!(
        r.stderr
            .contains(&format!("removing snapshot {:?}", left[0]))
            && r.stderr.contains("that an earlier vmrepo run left behind"),
        "{}",
        r.stderr
    );
    assert_eq!(sim.snapshots("ha-host_VM0"), Vec::<String>::new());
    assert_eq!(
        staged_by(pid),
        Vec::<PathBuf>::new(),
        "the next run removes them"
    );
    assert_eq!(generations(&repo, "ha-host_VM0").len(), 1);
    vmrepo([s("check"), p(&repo)]).ok();
}

#[test]
fn a_datastore_read_that_fails_midway_fails_the_ingest_and_still_removes_the_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    let repo = repo(t.path());
    let d = flat_vm(&sim, "ha-host_VM0", 48 << 20, &[(0, 48 << 20, 11)]);
    let pw = sim.password_file();
    let args = [
        s("--limit-read"),
        s("4"),
        s("ingest"),
        p(&repo),
        s(&sim.url("ha-host_VM0")),
        s("--tls-thumbprint"),
        s(&sim.get("VSIM_THUMBPRINT")),
        s("--source-password-file"),
        p(&pw),
    ];
    let argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut run = Running::start(t.path(), "fail", &argv);
    wait_for("the snapshot", || !sim.snapshots("ha-host_VM0").is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(run.alive(), "{}", run.stderr());
    // The disk's data file disappears from the datastore while it is being read.
    fs::remove_file(d.join("disk1-flat.vmdk")).unwrap();
    let ended = run.wait();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(
        ended
            .stderr
            .contains("[LocalDS_0] ha-host_VM0/disk1-flat.vmdk: no such file on the datastore"),
        "{}",
        ended.stderr
    );
    assert!(
        ended.stderr.contains("no generation was recorded"),
        "{}",
        ended.stderr
    );
    assert_eq!(sim.snapshots("ha-host_VM0"), Vec::<String>::new());
    assert_eq!(generations(&repo, "ha-host_VM0"), Vec::<String>::new());
    vmrepo([s("check"), p(&repo)]).ok();
}

/// When each VM's generation started and finished (UTC, to the second), by VM name.
fn spans(repo: &Path, vms: &[&str]) -> Vec<(String, String)> {
    vms.iter()
        .map(|vm| {
            let j = vmrepo([s("list"), p(repo), s(vm), s("--json")]).ok().json();
            let g = &j.as_array().unwrap()[0];
            (
                g["started"].as_str().unwrap().to_string(),
                g["finished"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn overlap(a: &(String, String), b: &(String, String)) -> bool {
    !(a.1 <= b.0 || b.1 <= a.0)
}

#[test]
fn a_job_reads_one_vm_per_host_and_per_datastore_at_a_time() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    // Two VMs on the first datastore, one on the second.
    sim.probe(&["create-vm", "ds1_vm", &sim.get("VSIM_DS1")]);
    let dirs = [
        flat_vm(&sim, "ha-host_VM0", 16 << 20, &[(0, 16 << 20, 31)]),
        flat_vm(&sim, "ha-host_VM1", 16 << 20, &[(0, 16 << 20, 32)]),
        flat_vm_in(
            &PathBuf::from(sim.get("VSIM_DS1_DIR")).join("ds1_vm"),
            "ds1_vm",
            16 << 20,
            &[(0, 16 << 20, 33)],
        ),
    ];
    let names = ["ha-host_VM0", "ha-host_VM1", "ds1_vm"];
    // Every VM of the host, by pattern; `limits` are the job's parallel settings.
    let run = |tag: &str, limits: &str| {
        let repo = repo(&t.path().join(tag));
        let job = t.path().join(format!("{tag}.toml"));
        fs::write(
            &job,
            format!(
                "repository = \"{}\"\nvms = [\"esxi://root@{}/*\"]\nparallel = 3\n{limits}\n\n\
                 [defaults]\ntls_thumbprint = \"{}\"\nsource_password_file = \"{}\"\n",
                repo.display(),
                sim.get("VSIM_HOST"),
                sim.get("VSIM_THUMBPRINT"),
                sim.password_file().display()
            ),
        )
        .unwrap();
        // Read slowly (8 MB/s, 2 s or more a VM), so that ingests at the same time overlap
        // by whole seconds in the generations' recorded start and end.
        vmrepo([s("--limit-read"), s("8"), s("run"), p(&job)]).ok();
        let spans = spans(&repo, &names);
        (repo, spans)
    };

    let (_, one_per_host) = run("per-host", "parallel_per_host = 1");
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        assert!(
            !overlap(&one_per_host[i], &one_per_host[j]),
            "{} and {} overlap: {one_per_host:?}",
            names[i],
            names[j]
        );
    }
    // Three per host, but one per datastore (the default): the two VMs of the first
    // datastore one after the other, the third beside them.
    let (repo, per_ds) = run("per-ds", "parallel_per_host = 3");
    assert!(!overlap(&per_ds[0], &per_ds[1]), "{per_ds:?}");
    assert!(
        overlap(&per_ds[2], &per_ds[0]) || overlap(&per_ds[2], &per_ds[1]),
        "{per_ds:?}"
    );
    // Two per datastore: the first datastore's VMs run together.
    let (_, two_per_ds) = run(
        "two-per-ds",
        "parallel_per_host = 3\nparallel_per_datastore = 2",
    );
    assert!(overlap(&two_per_ds[0], &two_per_ds[1]), "{two_per_ds:?}");

    for (vm, dir) in names.iter().zip(&dirs) {
        assert_eq!(sim.snapshots(vm), Vec::<String>::new());
        let out = t.path().join(vm);
        vmrepo([s("extract"), p(&repo), s(vm), p(&out)]).ok();
        assert!(same_file(
            &dir.join("disk1-flat.vmdk"),
            &out.join("disk1-flat.vmdk")
        ));
    }
}

#[test]
fn a_job_names_vcenter_folders_and_patterns_and_leaves_templates_out() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start_as("vpx");
    let repo = repo(t.path());
    let host = sim.get("VSIM_HOST");
    // DC0/vm/Prod/DC0_H0_VM0, DC0/vm/Prod/Sub/deep, and a template DC0/vm/DC0_H0_VM1.
    sim.probe(&["create-vm", "deep", &sim.get("VSIM_DS1")]);
    sim.probe(&["folder", "Prod"]);
    sim.probe(&["folder", "Sub", "Prod"]);
    sim.probe(&["move", "DC0_H0_VM0", "Prod"]);
    sim.probe(&["move", "deep", "Prod/Sub"]);
    sim.probe(&["template", "DC0_H0_VM1"]);
    let vm0 = flat_vm(&sim, "DC0_H0_VM0", 4 << 20, &[(0, 2 << 20, 51)]);
    let deep = flat_vm_in(
        &PathBuf::from(sim.get("VSIM_DS1_DIR")).join("deep"),
        "deep",
        4 << 20,
        &[(1 << 20, 2 << 20, 52)],
    );
    let job = t.path().join("nightly.toml");
    let status = t.path().join("status.json");
    let dc = format!("vcenter://root@{host}/DC0/vm");
    fs::write(
        &job,
        format!(
            "repository = \"{}\"\nstatus_file = \"{}\"\n\
             vms = [\"{dc}/Prod/\", \"{dc}/Prod/Sub/deep\", \"{dc}/*\", \"{dc}/Gone/\", \
             \"vcenter://root@127.0.0.1:1/DC0/vm/\"]\n\n\
             [defaults]\ntls_thumbprint = \"{}\"\nsource_password_file = \"{}\"\n",
            repo.display(),
            status.display(),
            sim.get("VSIM_THUMBPRINT"),
            sim.password_file().display()
        ),
    )
    .unwrap();
    let dry = vmrepo([s("run"), p(&job), s("--dry-run")]);
    assert!(
        dry.stdout.contains("named by folder or pattern"),
        "{}",
        dry.stdout
    );
    let r = vmrepo([s("run"), p(&job)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&fs::read_to_string(&status).unwrap()).unwrap();
    let outcomes: Vec<(String, String, String)> = j["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["status"].as_str().unwrap().to_string(),
                v["error"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    // The folder gives both VMs below it; the VM named again is backed up once; `*` finds
    // only the template at the top and leaves it out; the missing folder is an error, and so
    // is a host that cannot be reached: each fails as its own entry.
    let port = host.rsplit(':').next().unwrap();
    let at = |path: &str| format!("vcenter://root@127.0.0.1:{port}/DC0/vm/{path}");
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    assert_eq!(outcomes[0].0, at("Prod/DC0_H0_VM0"));
    assert_eq!(outcomes[1].0, at("Prod/Sub/deep"));
    assert_eq!(
        (outcomes[0].1.as_str(), outcomes[1].1.as_str()),
        ("ok", "ok")
    );
    assert_eq!(outcomes[2].1, "failed");
    assert!(outcomes[2].2.contains("names no VM"), "{outcomes:?}");
    assert_eq!(outcomes[3].1, "failed");
    assert!(
        outcomes[3].2.contains("no folder at \"DC0/vm/Gone\""),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[4].1, "failed");
    assert!(
        outcomes[4].2.starts_with("vSphere 127.0.0.1:1: ")
            && outcomes[4].2.to_lowercase().contains("connect"),
        "{outcomes:?}"
    );
    assert_eq!(generations(&repo, "DC0_H0_VM1"), Vec::<String>::new());
    for (vm, dir) in [("DC0_H0_VM0", &vm0), ("deep", &deep)] {
        let out = t.path().join(vm);
        vmrepo([s("extract"), p(&repo), s(vm), p(&out)]).ok();
        assert!(same_file(
            &dir.join("disk1-flat.vmdk"),
            &out.join("disk1-flat.vmdk")
        ));
    }
    assert_eq!(sim.snapshots("Prod/DC0_H0_VM0"), Vec::<String>::new());
    // A folder given to ingest is refused, naming what it is.
    let r = sim.vmrepo(&[
        "ingest",
        repo.to_str().unwrap(),
        &format!("{dc}/Prod"),
        "--tls-thumbprint",
        &sim.get("VSIM_THUMBPRINT"),
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is a Folder, not a VM"), "{}", r.stderr);
}

/// Changed-block tracking end to end. The simulator does not implement QueryChangedDiskAreas;
/// its wrapper (scripts/vsphere-sim/main.go) answers it, as the API reference shapes the
/// answer, from the areas this test writes to VSIM_CBT_DIR, and the probe gives the VM's disk
/// each night's change id as a host would.
#[test]
fn changed_block_tracking_reads_only_what_changed_and_a_reset_reads_it_all() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    let repo = repo(t.path());
    const MIB: u64 = 1 << 20;
    let size = 16 * MIB;
    let dir = flat_vm(&sim, "ha-host_VM0", size, &[(0, 8 << 20, 61)]);
    let disk = dir.join("disk1-flat.vmdk");
    let cbt = PathBuf::from(sim.get("VSIM_CBT_DIR")).join("ha-host_VM0.json");
    let areas = |since: &[(&str, &[(u64, u64)])]| {
        let since: Vec<String> = since
            .iter()
            .map(|(id, a)| {
                let list: Vec<String> = a.iter().map(|(s, l)| format!("[{s}, {l}]")).collect();
                format!("\"{id}\": [{}]", list.join(", "))
            })
            .collect();
        fs::write(
            &cbt,
            format!(
                "{{\"capacity\": {size}, \"since\": {{{}}}}}",
                since.join(", ")
            ),
        )
        .unwrap();
    };
    let write = |at: u64, len: usize, seed: u64| {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&bytes(len, seed), at).unwrap();
    };
    // One night: the ingest's JSON report and its messages.
    let night = |change_id: &str| {
        sim.probe(&["cbt", "ha-host_VM0", change_id, &size.to_string()]);
        let r = sim.vmrepo(&[
            "ingest",
            repo.to_str().unwrap(),
            &sim.url("ha-host_VM0"),
            "--tls-thumbprint",
            &sim.get("VSIM_THUMBPRINT"),
            "--json",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let received = r.json()["host_traffic"]["bytes_down"].as_u64().unwrap();
        let out = t.path().join(change_id.replace(' ', "_"));
        vmrepo([s("extract"), p(&repo), s("ha-host_VM0"), p(&out)]).ok();
        assert!(same_file(&disk, &out.join("disk1-flat.vmdk")));
        assert_eq!(sim.snapshots("ha-host_VM0"), Vec::<String>::new());
        (received, r.stderr)
    };
    // The small files (.vmx, .nvram, log, descriptor) cross the wire every night.
    let small = 64 * 1024;

    // First night: only the areas in use are read.
    areas(&[("*", &[(0, 8 * MIB)])]);
    let (received, log) = night("52 00/1");
    assert!(
        log.contains("changed-block tracking says 8388608 bytes are in use"),
        "{log}"
    );
    assert!((8 * MIB..8 * MIB + small).contains(&received), "{received}");

    // Second night: 1 MiB rewritten inside the data, 64 KiB written where the disk was
    // zero. Only those, with the few KiB around them a patch needs, are read.
    write(3 * MIB, 1 << 20, 62);
    write(12 * MIB, 64 << 10, 63);
    areas(&[("52 00/1", &[(3 * MIB, MIB), (12 * MIB, 64 << 10)])]);
    let (received, log) = night("52 00/2");
    assert!(
        log.contains("changed-block tracking names 1114112 changed bytes in 2 areas"),
        "{log}"
    );
    assert!(received < 3 * MIB / 2 + small, "{received}");

    // CBT reset (the host no longer knows the change id recorded): a warning, and the disk
    // is read in full, as far as the host says it is in use.
    write(5 * MIB, 4096, 64);
    areas(&[("*", &[(0, 8 * MIB), (12 * MIB, 64 << 10)])]);
    let (received, log) = night("52 00/9");
    assert!(
        log.contains("changed-block tracking cannot say what changed since"),
        "{log}"
    );
    assert!(
        (8 * MIB + (64 << 10)..8 * MIB + (64 << 10) + small).contains(&received),
        "{received}"
    );
    vmrepo([s("check"), p(&repo), s("--read-data")]).ok();
}

#[test]
fn a_vm_whose_descriptor_names_host_files_is_refused_and_its_snapshot_removed() {
    let t = tempfile::tempdir().unwrap();
    let sim = Sim::start();
    let repo = repo(t.path());
    let d = flat_vm(&sim, "ha-host_VM0", 4 << 20, &[(0, 1 << 20, 41)]);
    let fp = sim.get("VSIM_THUMBPRINT");
    let url = sim.url("ha-host_VM0");
    for (extent, why) in [
        (
            "/etc/passwd",
            "[LocalDS_0] ha-host_VM0/disk1.vmdk: extent file \"/etc/passwd\" is not a file of the host's datastores",
        ),
        (
            "../../../../../../etc/passwd",
            "it resolves to /etc/passwd, which is not a file of the host's datastores",
        ),
    ] {
        fs::write(
            d.join("disk1.vmdk"),
            vmfs_descriptor(extent, 4 << 20).replace("RW 8192", "RW 8"),
        )
        .unwrap();
        let r = sim.vmrepo(&["ingest", repo.to_str().unwrap(), &url, "--tls-thumbprint", &fp]);
        assert_eq!(r.code, 1, "{extent}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{extent}: {}", r.stderr);
        assert!(!r.stderr.contains("--datastore-map"), "{}", r.stderr);
        assert!(!r.stderr.contains("root:x:0:0"), "{}", r.stderr);
        assert_eq!(sim.snapshots("ha-host_VM0"), Vec::<String>::new());
    }
    assert_eq!(generations(&repo, "ha-host_VM0"), Vec::<String>::new());
}
