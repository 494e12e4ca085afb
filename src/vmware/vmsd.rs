//! The `.vmsd` snapshot dictionary: which snapshots a VM has, when each was taken, and which
//! disk link each one froze (`snapshotN.diskK.fileName`). Same `key = "value"` syntax as .vmx.

use std::path::{Path, PathBuf};

use crate::error::{Advice, Error, IoContext, Result, Setting};
use crate::source::confine::Confine;
use crate::vmware::vmx::Vmx;

/// Snapshot slots looked at (`snapshot0` ..); real VMs have at most 32 snapshots.
const MAX_SLOTS: u32 = 1024;

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its identity (`snapshotN.uid`).
    pub uid: u32,
    /// `displayName`.
    pub name: String,
    /// `description`, if any.
    pub description: Option<String>,
    /// uid of the parent snapshot.
    pub parent: Option<u32>,
    /// Creation time, when recorded.
    pub created: Option<jiff::Timestamp>,
    /// The disk links this snapshot froze: (node such as `scsi0:0`, descriptor file name).
    pub disks: Vec<(String, String)>,
}

impl Snapshot {
    /// The descriptor frozen for the disk in `slot` (`scsi0:0`), if the snapshot has that disk.
    pub fn disk_for(&self, slot: &str) -> Option<&str> {
        self.disks
            .iter()
            .find(|(node, _)| node.eq_ignore_ascii_case(slot))
            .map(|(_, f)| f.as_str())
    }
}

/// A parsed `.vmsd`.
#[derive(Debug, Clone, Default)]
pub struct Vmsd {
    /// uid the running state descends from.
    pub current: Option<u32>,
    /// Snapshots in slot order.
    pub snapshots: Vec<Snapshot>,
    /// `snapshot.needConsolidate`.
    pub needs_consolidation: bool,
}

impl Vmsd {
    /// Parses `.vmsd` text (lenient: unknown keys are ignored, a snapshot needs a uid).
    pub fn parse(text: &str) -> Vmsd {
        let v = Vmx::parse(text);
        let num = |k: &str| v.get(k).and_then(|x| x.trim().parse::<i64>().ok());
        let mut snapshots = Vec::new();
        for n in 0..MAX_SLOTS {
            let key = |k: &str| format!("snapshot{n}.{k}");
            let Some(uid) = num(&key("uid")).and_then(|u| u32::try_from(u).ok()) else {
                continue;
            };
            let created = match (num(&key("createTimeHigh")), num(&key("createTimeLow"))) {
                (Some(hi), Some(lo)) => {
                    let micros = (hi << 32) | (lo as u32 as i64);
                    jiff::Timestamp::from_microsecond(micros).ok()
                }
                _ => None,
            };
            let ndisks = num(&key("numDisks")).unwrap_or(0).clamp(0, 256);
            let mut disks = Vec::new();
            for k in 0..ndisks {
                let (Some(file), Some(node)) = (
                    v.get(&key(&format!("disk{k}.fileName"))),
                    v.get(&key(&format!("disk{k}.node"))),
                ) else {
                    continue;
                };
                disks.push((node.to_string(), file.to_string()));
            }
            snapshots.push(Snapshot {
                uid,
                name: v.get(&key("displayName")).unwrap_or("").to_string(),
                description: v
                    .get(&key("description"))
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
                parent: num(&key("parent")).and_then(|p| u32::try_from(p).ok()),
                created,
                disks,
            });
        }
        Vmsd {
            current: num("snapshot.current").and_then(|c| u32::try_from(c).ok()),
            snapshots,
            needs_consolidation: v
                .get("snapshot.needConsolidate")
                .is_some_and(|x| x.eq_ignore_ascii_case("true")),
        }
    }

    /// The `.vmsd` of the VM whose .vmx is `vmx`: `<name>.vmsd` beside it, or the only .vmsd in
    /// its directory. `Ok(None)` when there is none. Read only if `confine` allows (a `.vmsd`
    /// that is a symlink out of the VM directory is refused).
    pub fn find(vmx: &Path, confine: &Confine) -> Result<Option<(PathBuf, Vmsd)>> {
        let dir = vmx.parent().unwrap_or(Path::new("."));
        let mut path = vmx.with_extension("vmsd");
        if !path.is_file() {
            let mut found = Vec::new();
            for e in std::fs::read_dir(dir).ctx("list", dir)? {
                let p = e.ctx("list", dir)?.path();
                if p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("vmsd"))
                    && p.is_file()
                {
                    found.push(p);
                }
            }
            if found.len() != 1 {
                return Ok(None);
            }
            path = found.remove(0);
        }
        let opened = confine.open(&path, None)?;
        if opened.len() > 16 << 20 {
            return Err(Error::bad_input(
                &path,
                "is larger than 16 MiB: not a .vmsd file",
            ));
        }
        let bytes = opened.read_all(&path, 16 << 20)?;
        Ok(Some((
            path.clone(),
            Vmsd::parse(&String::from_utf8_lossy(&bytes)),
        )))
    }

    /// The snapshot named `which`: `latest` (the one the VM runs on: the .vmsd's
    /// `snapshot.current`, which after a revert is not the most recently taken; without it, the
    /// most recently taken), or a display name (exact, then case-insensitive), or a uid.
    pub fn select(&self, which: &str, vmsd: &Path) -> Result<&Snapshot> {
        if self.snapshots.is_empty() {
            return Err(Advice::new(format!(
                "{} lists no snapshots; take one first (vim-cmd vmsvc/snapshot.create) or ingest \
                 without ",
                vmsd.display()
            ))
            .setting(Setting::AtSnapshot)
            .into());
        }
        if which == "latest" {
            let current = self
                .current
                .and_then(|c| self.snapshots.iter().find(|s| s.uid == c));
            return Ok(current.unwrap_or_else(|| {
                self.snapshots
                    .iter()
                    .max_by_key(|s| (s.created, s.uid))
                    .expect("not empty")
            }));
        }
        self.snapshots
            .iter()
            .find(|s| s.name == which)
            .or_else(|| {
                self.snapshots
                    .iter()
                    .find(|s| s.name.eq_ignore_ascii_case(which))
            })
            .or_else(|| self.snapshots.iter().find(|s| s.uid.to_string() == which))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{} has no snapshot named {which:?}; it has: {}",
                    vmsd.display(),
                    self.snapshots
                        .iter()
                        .map(|s| format!("{:?} (uid {})", s.name, s.uid))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#".encoding = "UTF-8"
snapshot.lastUID = "2"
snapshot.current = "2"
snapshot.numSnapshots = "2"
snapshot0.uid = "1"
snapshot0.filename = "vm-Snapshot1.vmsn"
snapshot0.displayName = "before upgrade"
snapshot0.createTimeHigh = "388745"
snapshot0.createTimeLow = "-1991180826"
snapshot0.numDisks = "1"
snapshot0.disk0.fileName = "vm.vmdk"
snapshot0.disk0.node = "scsi0:0"
snapshot1.uid = "2"
snapshot1.parent = "1"
snapshot1.displayName = "nightly"
snapshot1.createTimeHigh = "400000"
snapshot1.createTimeLow = "5"
snapshot1.numDisks = "1"
snapshot1.disk0.fileName = "vm-000001.vmdk"
snapshot1.disk0.node = "scsi0:0"
"#;

    #[test]
    fn parses_snapshots_and_selects() {
        let v = Vmsd::parse(SAMPLE);
        assert_eq!(v.current, Some(2));
        assert_eq!(v.snapshots.len(), 2);
        let s = &v.snapshots[0];
        assert_eq!(s.name, "before upgrade");
        assert_eq!(s.disk_for("SCSI0:0"), Some("vm.vmdk"));
        // High 388745, low -1991180826 read as u32: a date in 2022.
        let t = s.created.unwrap().to_string();
        assert!(t.starts_with("2022-"), "{t}");
        let p = Path::new("vm.vmsd");
        assert_eq!(v.select("latest", p).unwrap().uid, 2);
        assert_eq!(v.select("Before Upgrade", p).unwrap().uid, 1);
        assert_eq!(v.select("1", p).unwrap().name, "before upgrade");
        let e = v.select("nope", p).unwrap_err().to_string();
        assert!(e.contains("\"nightly\" (uid 2)"), "{e}");
    }

    #[test]
    fn latest_is_the_snapshot_the_vm_runs_on() {
        // Reverted to "before upgrade": the running VM's delta sits on snapshot 1's disks, so
        // snapshot 2 (newer, on another branch) is not what the VM has now.
        let reverted = SAMPLE.replace("snapshot.current = \"2\"", "snapshot.current = \"1\"");
        let p = Path::new("vm.vmsd");
        assert_eq!(Vmsd::parse(&reverted).select("latest", p).unwrap().uid, 1);
        // No (or a dangling) current: the most recently taken.
        let none = SAMPLE.replace("snapshot.current = \"2\"\n", "");
        assert_eq!(Vmsd::parse(&none).select("latest", p).unwrap().uid, 2);
        let dangling = SAMPLE.replace("snapshot.current = \"2\"", "snapshot.current = \"9\"");
        assert_eq!(Vmsd::parse(&dangling).select("latest", p).unwrap().uid, 2);
    }
}
