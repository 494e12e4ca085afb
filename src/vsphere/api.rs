//! The vim25 operations a backup needs: log in, find a VM, read its properties (files,
//! disks, snapshots), create and remove a snapshot, and wait for their tasks.

use std::time::{Duration, Instant};

use super::soap::Soap;
use super::xml::{element, mo_ref, MoRef, Node};
use crate::error::Result;

/// What `RetrieveServiceContent` says about the host.
#[derive(Clone, Debug)]
pub struct ServiceContent {
    /// `VirtualCenter` or `HostAgent` (ESXi).
    pub api_type: String,
    /// Product name and build, for messages.
    pub full_name: String,
    /// The property collector.
    pub property_collector: MoRef,
    /// The session manager.
    pub session_manager: MoRef,
    /// The search index.
    pub search_index: MoRef,
}

/// One file of a VM as `layoutEx.file` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmFile {
    /// Datastore path, `[datastore] dir/file`.
    pub name: String,
    /// `config`, `nvram`, `diskDescriptor`, `diskExtent`, `log`, `snapshotList`, ...
    pub kind: String,
    /// Bytes.
    pub size: u64,
}

/// A disk as a VM's (or a snapshot's) hardware lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    /// The device key (what changed-block queries name the disk by).
    pub key: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Changed-block tracking's change id of this disk as it is (absent without tracking).
    pub change_id: Option<String>,
    /// The .vmx slot (`scsi0:0`, `sata0:1`, `nvme0:0`, `ide0:0`).
    pub slot: String,
    /// Datastore path of its descriptor, `[datastore] dir/disk.vmdk`.
    pub file: String,
    /// Its label, for messages.
    pub label: String,
}

/// A snapshot in a VM's tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot object.
    pub mo: MoRef,
    /// Its name.
    pub name: String,
    /// When it was taken (as the host says, ISO 8601).
    pub created: String,
}

/// What vmrepo reads of a VM.
#[derive(Clone, Debug)]
pub struct VmInfo {
    /// The VM object.
    pub mo: MoRef,
    /// Its name.
    pub name: String,
    /// Datastore path of its .vmx.
    pub vmx: String,
    /// Its files.
    pub files: Vec<VmFile>,
    /// Its disks as they are now.
    pub disks: Vec<VmDisk>,
    /// Its snapshots, flattened.
    pub snapshots: Vec<SnapshotInfo>,
    /// Changed-block tracking is on.
    pub cbt: bool,
}

impl ServiceContent {
    /// Asks the host what it is.
    pub fn get(soap: &Soap) -> Result<ServiceContent> {
        let r = soap.call(
            "RetrieveServiceContent",
            &MoRef::new("ServiceInstance", "ServiceInstance"),
            "",
        )?;
        let rv = r
            .child("returnval")
            .ok_or_else(|| soap.error("RetrieveServiceContent: no answer"))?;
        let mo = |name: &str| {
            rv.child(name)
                .and_then(MoRef::of)
                .ok_or_else(|| soap.error(format!("RetrieveServiceContent: no {name}")))
        };
        Ok(ServiceContent {
            api_type: rv.text_at("about/apiType").unwrap_or("").to_string(),
            full_name: rv.text_at("about/fullName").unwrap_or("").to_string(),
            property_collector: mo("propertyCollector")?,
            session_manager: mo("sessionManager")?,
            search_index: mo("searchIndex")?,
        })
    }
}

/// Logs in; the session cookie is kept by `soap`.
pub fn login(soap: &Soap, sc: &ServiceContent, user: &str, password: &str) -> Result<()> {
    let args = format!(
        "{}{}",
        element("userName", user),
        element("password", password)
    );
    soap.call_raw("Login", &sc.session_manager, &args, None)
        .map(|_| ())
        .map_err(|e| match e {
            Ok(f)
                if f.kind.as_deref() == Some("InvalidLogin")
                    || f.message.contains("Login failure") =>
            {
                crate::error::Advice::new(format!(
                    "vSphere {}: login as {user:?} failed: wrong user name or password ({}); \
                     give the password with VMREPO_SOURCE_PASSWORD or ",
                    soap.host(),
                    f.message
                ))
                .setting(crate::error::Setting::SourcePassword)
                .into()
            }
            Ok(f) => soap.error(format!("login as {user:?} failed: {}", f.message)),
            Err(e) => e,
        })
}

/// Logs out (best effort: the session expires on its own).
pub fn logout(soap: &Soap, sc: &ServiceContent) {
    let _ = soap.call_raw(
        "Logout",
        &sc.session_manager,
        "",
        Some(Duration::from_secs(10)),
    );
}

/// The object at `inventory_path` (a VM, a folder, a vApp, ...), or `None`.
pub fn find_by_path(
    soap: &Soap,
    sc: &ServiceContent,
    inventory_path: &str,
) -> Result<Option<MoRef>> {
    let r = soap.call(
        "FindByInventoryPath",
        &sc.search_index,
        &element("inventoryPath", inventory_path),
    )?;
    Ok(r.child("returnval").and_then(MoRef::of))
}

/// The VM at `inventory_path`, or `None`.
pub fn find_vm(soap: &Soap, sc: &ServiceContent, inventory_path: &str) -> Result<Option<MoRef>> {
    Ok(find_by_path(soap, sc, inventory_path)?.filter(|m| m.kind == "VirtualMachine"))
}

/// The managed object references a property holds (`childEntity`, `datastore`, `vm`).
pub fn references(props: &[(String, Node)], name: &str) -> Vec<MoRef> {
    prop(props, name)
        .map(|v| v.children.iter().filter_map(MoRef::of).collect())
        .unwrap_or_default()
}

/// An inventory object with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entity {
    /// The object.
    pub mo: MoRef,
    /// Its name.
    pub name: String,
    /// A VM template (which cannot be snapshotted, so is not backed up).
    pub template: bool,
}

/// The name (and, for VMs, whether each is a template) of each of `objects`, asked in one
/// request and its continuations, in the host's order; an object the host no longer knows
/// is left out.
pub fn entities_of(soap: &Soap, sc: &ServiceContent, objects: &[MoRef]) -> Result<Vec<Entity>> {
    if objects.is_empty() {
        return Ok(Vec::new());
    }
    let mut kinds: Vec<&str> = objects.iter().map(|o| o.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let prop_sets: String = kinds
        .iter()
        .map(|k| {
            let template = if *k == "VirtualMachine" {
                element("pathSet", "config.template")
            } else {
                String::new()
            };
            format!(
                "<propSet>{}{}{template}</propSet>",
                element("type", k),
                element("pathSet", "name")
            )
        })
        .collect();
    let object_sets: String = objects
        .iter()
        .map(|o| {
            format!(
                "<objectSet>{}<skip>false</skip></objectSet>",
                mo_ref("obj", o)
            )
        })
        .collect();
    let args = format!("<specSet>{prop_sets}{object_sets}</specSet><options></options>");
    let mut answer = soap.call("RetrievePropertiesEx", &sc.property_collector, &args)?;
    let mut out = Vec::new();
    while let Some(rv) = answer.child("returnval") {
        for o in rv.all("objects") {
            let Some(mo) = o.child("obj").and_then(MoRef::of) else {
                continue;
            };
            let value = |name: &str| {
                o.all("propSet")
                    .find(|p| p.text_at("name") == Some(name))
                    .and_then(|p| p.text_at("val"))
            };
            if let Some(name) = value("name") {
                out.push(Entity {
                    template: value("config.template") == Some("true"),
                    name: name.to_string(),
                    mo,
                });
            }
        }
        let Some(token) = rv.text_at("token").map(str::to_string) else {
            break;
        };
        answer = soap.call(
            "ContinueRetrievePropertiesEx",
            &sc.property_collector,
            &element("token", &token),
        )?;
    }
    Ok(out)
}

/// Reads `paths` of `obj`; returns (name, value) pairs for the properties that are set.
pub fn properties(
    soap: &Soap,
    sc: &ServiceContent,
    obj: &MoRef,
    paths: &[&str],
) -> Result<Vec<(String, Node)>> {
    let path_set: String = paths.iter().map(|p| element("pathSet", p)).collect();
    let args = format!(
        "<specSet><propSet>{}{path_set}</propSet><objectSet>{}<skip>false</skip></objectSet>\
         </specSet><options></options>",
        element("type", &obj.kind),
        mo_ref("obj", obj)
    );
    let r = soap.call("RetrievePropertiesEx", &sc.property_collector, &args)?;
    let mut out = Vec::new();
    if let Some(objects) = r.at("returnval/objects") {
        for p in objects.all("propSet") {
            if let (Some(name), Some(val)) = (p.text_at("name"), p.child("val")) {
                out.push((name.to_string(), val.clone()));
            }
        }
    }
    Ok(out)
}

fn prop<'a>(props: &'a [(String, Node)], name: &str) -> Option<&'a Node> {
    props.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// The disks of a hardware device list, with their .vmx slots.
pub fn disks_of(devices: &Node) -> Vec<VmDisk> {
    let all: Vec<&Node> = devices.children.iter().collect();
    let controller = |key: &str| {
        all.iter().find(|d| d.text_at("key") == Some(key)).map(|c| {
            let t = c.xsi_type.as_deref().unwrap_or("");
            let bus = if t.contains("IDE") {
                "ide"
            } else if t.contains("AHCI") || t.contains("Sata") {
                "sata"
            } else if t.contains("NVME") || t.contains("Nvme") {
                "nvme"
            } else {
                "scsi"
            };
            (bus, c.text_at("busNumber").unwrap_or("0").to_string())
        })
    };
    all.iter()
        .filter(|d| d.xsi_type.as_deref() == Some("VirtualDisk"))
        .filter_map(|d| {
            let file = d.text_at("backing/fileName")?.to_string();
            let (bus, number) = controller(d.text_at("controllerKey")?)?;
            let unit = d.text_at("unitNumber").unwrap_or("0");
            Some(VmDisk {
                key: d.text_at("key")?.to_string(),
                capacity: d
                    .u64_at("capacityInBytes")
                    .or_else(|| d.u64_at("capacityInKB").map(|k| k * 1024))
                    .unwrap_or(0),
                change_id: d
                    .text_at("backing/changeId")
                    .filter(|c| !c.is_empty())
                    .map(str::to_string),
                slot: format!("{bus}{number}:{unit}"),
                file,
                label: d.text_at("deviceInfo/label").unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// A snapshot tree node and everything under it, parents first.
fn flatten_snapshots(tree: &Node, out: &mut Vec<SnapshotInfo>) {
    if let Some(mo) = tree.child("snapshot").and_then(MoRef::of) {
        out.push(SnapshotInfo {
            mo,
            name: tree.text_at("name").unwrap_or("").to_string(),
            created: tree.text_at("createTime").unwrap_or("").to_string(),
        });
    }
    for c in tree.all("childSnapshotList") {
        flatten_snapshots(c, out);
    }
}

/// Everything vmrepo reads of `vm`.
pub fn vm_info(soap: &Soap, sc: &ServiceContent, vm: &MoRef) -> Result<VmInfo> {
    let props = properties(
        soap,
        sc,
        vm,
        &[
            "name",
            "config.files.vmPathName",
            "config.hardware.device",
            "config.changeTrackingEnabled",
            "layoutEx.file",
            "snapshot",
        ],
    )?;
    let files = prop(&props, "layoutEx.file")
        .map(|v| {
            v.children
                .iter()
                .map(|f| VmFile {
                    name: f.text_at("name").unwrap_or("").to_string(),
                    kind: f.text_at("type").unwrap_or("").to_string(),
                    size: f.u64_at("size").unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut snapshots = Vec::new();
    if let Some(s) = prop(&props, "snapshot") {
        for root in s.all("rootSnapshotList") {
            flatten_snapshots(root, &mut snapshots);
        }
    }
    Ok(VmInfo {
        mo: vm.clone(),
        name: prop(&props, "name")
            .map(|n| n.text.clone())
            .unwrap_or_default(),
        vmx: prop(&props, "config.files.vmPathName")
            .map(|n| n.text.clone())
            .ok_or_else(|| soap.error(format!("VM {} has no configuration file path", vm.value)))?,
        files,
        disks: prop(&props, "config.hardware.device")
            .map(disks_of)
            .unwrap_or_default(),
        snapshots,
        cbt: prop(&props, "config.changeTrackingEnabled").is_some_and(|n| n.text == "true"),
    })
}

/// The disks `snapshot` froze.
pub fn snapshot_disks(soap: &Soap, sc: &ServiceContent, snapshot: &MoRef) -> Result<Vec<VmDisk>> {
    let props = properties(soap, sc, snapshot, &["config.hardware.device"])?;
    Ok(prop(&props, "config.hardware.device")
        .map(disks_of)
        .unwrap_or_default())
}

/// The files (name, size) directly in the datastore folder `[ds] dir`, listed by the
/// datastore browser of the datastore `ds` that `vm` uses.
pub fn list_folder(
    soap: &Soap,
    sc: &ServiceContent,
    vm: &MoRef,
    folder: &str,
    limit: Duration,
) -> Result<Vec<(String, u64)>> {
    let probe = format!("{folder}/x");
    let Some((ds_name, _)) = super::datastore::split_datastore_path(&probe) else {
        return Err(soap.error(format!("{folder:?} is not a datastore folder")));
    };
    let stores = properties(soap, sc, vm, &["datastore"])?;
    let mut browser = None;
    for ds in prop(&stores, "datastore")
        .map(|v| v.children.clone())
        .unwrap_or_default()
    {
        let Some(ds) = MoRef::of(&ds) else { continue };
        let p = properties(soap, sc, &ds, &["name", "browser"])?;
        if prop(&p, "name").is_some_and(|n| n.text == ds_name) {
            browser = prop(&p, "browser").and_then(MoRef::of);
        }
    }
    let browser =
        browser.ok_or_else(|| soap.error(format!("the VM uses no datastore named {ds_name:?}")))?;
    let args = format!(
        "{}<searchSpec><details><fileType>true</fileType>\
         <fileSize>true</fileSize><modification>false</modification><fileOwner>false</fileOwner>\
         </details><matchPattern>*</matchPattern></searchSpec>",
        element("datastorePath", folder)
    );
    let r = soap.call("SearchDatastore_Task", &browser, &args)?;
    let task = r
        .child("returnval")
        .and_then(MoRef::of)
        .ok_or_else(|| soap.error("SearchDatastore_Task: no task in the answer"))?;
    let result = wait_task(soap, sc, &task, &format!("listing {folder}"), limit)?;
    Ok(result
        .map(|r| {
            r.all("file")
                .filter(|f| f.xsi_type.as_deref() != Some("FolderFileInfo"))
                .filter_map(|f| Some((f.text_at("path")?.to_string(), f.u64_at("fileSize")?)))
                .collect()
        })
        .unwrap_or_default())
}

/// The areas of a disk that changed since `change_id` (`*`: every allocated area), as
/// `QueryChangedDiskAreas` answers for the disk `device_key` of `snapshot`. The host answers
/// from a start offset up to some length at a time; the calls go on until `capacity`.
pub fn changed_areas(
    soap: &Soap,
    vm: &MoRef,
    snapshot: &MoRef,
    device_key: &str,
    change_id: &str,
    capacity: u64,
) -> Result<Vec<std::ops::Range<u64>>> {
    // Without the disk's size no answer could be checked to cover it (and an empty list
    // would mean "nothing to read").
    if capacity == 0 {
        return Err(soap.error(format!(
            "the host gave no capacity for disk {device_key}; cannot ask what changed on it"
        )));
    }
    collect_changed_areas(capacity, |start| {
        let args = format!(
            "{}{}{}{}",
            mo_ref("snapshot", snapshot),
            element("deviceKey", device_key),
            element("startOffset", &start.to_string()),
            element("changeId", change_id)
        );
        let r = soap.call("QueryChangedDiskAreas", vm, &args)?;
        r.child("returnval")
            .cloned()
            .ok_or_else(|| soap.error("QueryChangedDiskAreas: no answer"))
    })
    .map_err(|e| match e {
        crate::error::Error::Usage(why) => soap.error(format!("QueryChangedDiskAreas: {why}")),
        e => e,
    })
}

/// The loop of [`changed_areas`] over the answers `fetch(start)` gives (a `DiskChangeInfo`:
/// `startOffset`, `length`, `changedArea` list of `start` and `length`). Areas are checked to
/// lie inside what each answer covers and inside the disk, and come back sorted and merged.
pub fn collect_changed_areas(
    capacity: u64,
    mut fetch: impl FnMut(u64) -> Result<Node>,
) -> Result<Vec<std::ops::Range<u64>>> {
    let bad = |why: String| crate::error::Error::Usage(why);
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    let mut start = 0u64;
    while start < capacity {
        let info = fetch(start)?;
        let from = info
            .u64_at("startOffset")
            .ok_or_else(|| bad("an answer without startOffset".into()))?;
        let len = info
            .u64_at("length")
            .ok_or_else(|| bad("an answer without length".into()))?;
        if from != start || len == 0 {
            return Err(bad(format!(
                "asked from byte {start}, the answer covers {len} bytes from {from}"
            )));
        }
        let covered = from.saturating_add(len).min(capacity);
        for a in info.all("changedArea") {
            let (s, l) = match (a.u64_at("start"), a.u64_at("length")) {
                (Some(s), Some(l)) => (s, l),
                _ => return Err(bad("a changedArea without start or length".into())),
            };
            let e = s
                .checked_add(l)
                .ok_or_else(|| bad(format!("area at {s} overflows")))?;
            if s < from || e > covered {
                return Err(bad(format!(
                    "area {s}..{e} lies outside the answer's {from}..{covered}"
                )));
            }
            if l == 0 {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end >= s => last.end = last.end.max(e),
                _ => out.push(s..e),
            }
        }
        start = covered;
    }
    out.sort_by_key(|r| r.start);
    Ok(out)
}

/// Waits for `task` to finish, at most `limit`; returns its result.
pub fn wait_task(
    soap: &Soap,
    sc: &ServiceContent,
    task: &MoRef,
    what: &str,
    limit: Duration,
) -> Result<Option<Node>> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let props = properties(soap, sc, task, &["info"])?;
        let info = prop(&props, "info")
            .ok_or_else(|| soap.error(format!("{what}: task {} has no info", task.value)))?;
        match info.text_at("state") {
            Some("success") => return Ok(info.child("result").cloned()),
            Some("error") => {
                let msg = info
                    .text_at("error/localizedMessage")
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .or_else(|| info.at("error/fault").and_then(|f| f.xsi_type.clone()))
                    .unwrap_or_else(|| "no reason given".into());
                return Err(soap.error(format!("{what} failed: {msg}")));
            }
            _ => {}
        }
        if start.elapsed() > limit {
            return Err(soap.error(format!(
                "{what}: task {} did not finish within {} s; it may still be running on the host",
                task.value,
                limit.as_secs()
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Takes a snapshot of `vm` (memory never included) and returns it.
pub fn create_snapshot(
    soap: &Soap,
    sc: &ServiceContent,
    vm: &MoRef,
    name: &str,
    description: &str,
    quiesce: bool,
    limit: Duration,
) -> Result<MoRef> {
    let args = format!(
        "{}{}<memory>false</memory><quiesce>{quiesce}</quiesce>",
        element("name", name),
        element("description", description)
    );
    let r = soap
        .call_raw("CreateSnapshot_Task", vm, &args, None)
        .map_err(|e| match e {
            Ok(f)
                if matches!(
                    f.kind.as_deref(),
                    Some("RestrictedVersion") | Some("NotSupported")
                ) || f.message.contains("license") =>
            {
                soap.error(format!(
            "the host refuses to create snapshots through its API ({}): a free ESXi licence \
             does not allow it. Use the ssh + vim-cmd scheme of docs/NIGHTLY.md (pre- and \
             post-commands that take and remove the snapshot, with the datastore mounted on \
             this machine) instead",
            f.message
        ))
            }
            Ok(f) => soap.error(format!("CreateSnapshot_Task failed: {}", f.message)),
            Err(e) => e,
        })?;
    let task = r
        .child("returnval")
        .and_then(MoRef::of)
        .ok_or_else(|| soap.error("CreateSnapshot_Task: no task in the answer"))?;
    let result = wait_task(
        soap,
        sc,
        &task,
        &format!("creating snapshot {name:?}"),
        limit,
    )?;
    result.as_ref().and_then(MoRef::of).ok_or_else(|| {
        soap.error(format!(
            "creating snapshot {name:?}: the task named no snapshot"
        ))
    })
}

/// Removes `snapshot` (its changes are merged into the disks) and waits at most `limit`.
pub fn remove_snapshot(
    soap: &Soap,
    sc: &ServiceContent,
    snapshot: &MoRef,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let r = soap.call(
        "RemoveSnapshot_Task",
        snapshot,
        "<removeChildren>false</removeChildren><consolidate>true</consolidate>",
    )?;
    let task = r
        .child("returnval")
        .and_then(MoRef::of)
        .ok_or_else(|| soap.error("RemoveSnapshot_Task: no task in the answer"))?;
    wait_task(
        soap,
        sc,
        &task,
        &format!("removing snapshot {name:?}"),
        limit,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `DiskChangeInfo` documents shaped as the vSphere API reference defines them
    /// (`QueryChangedDiskAreas` returns `startOffset`, `length` and `changedArea[]` of
    /// `start` and `length`): the simulator does not implement the method, so the client's
    /// handling of the answers is tested on such documents.
    fn change_info(from: u64, len: u64, areas: &[(u64, u64)]) -> Node {
        let areas: String = areas
            .iter()
            .map(|(s, l)| {
                format!("<changedArea><start>{s}</start><length>{l}</length></changedArea>")
            })
            .collect();
        Node::parse(&format!(
            "<returnval xmlns=\"urn:vim25\"><startOffset>{from}</startOffset><length>{len}</length>{areas}</returnval>"
        ))
        .unwrap()
    }

    #[test]
    fn changed_areas_are_collected_over_several_answers() {
        let gib = 1u64 << 30;
        let mut asked = Vec::new();
        let areas = collect_changed_areas(3 * gib, |start| {
            asked.push(start);
            Ok(match start / gib {
                0 => change_info(0, 2 * gib, &[(0, 65536), (65536, 4096), (gib, 1 << 20)]),
                _ => change_info(2 * gib, gib, &[(3 * gib - 4096, 4096)]),
            })
        })
        .unwrap();
        assert_eq!(asked, vec![0, 2 * gib]);
        assert_eq!(
            areas,
            vec![0..69632, gib..gib + (1 << 20), 3 * gib - 4096..3 * gib]
        );
        // No change at all: one answer with no area.
        assert_eq!(
            collect_changed_areas(gib, |_| Ok(change_info(0, gib, &[]))).unwrap(),
            vec![]
        );
    }

    #[test]
    fn an_answer_that_does_not_fit_is_refused() {
        let gib = 1u64 << 30;
        for bad in [
            change_info(4096, gib, &[]),                 // not from where asked
            change_info(0, 0, &[]),                      // covers nothing: would loop forever
            change_info(0, gib, &[(gib - 4096, 8192)]),  // an area past the disk
            change_info(0, gib / 2, &[(gib / 2, 4096)]), // past what the answer covers
        ] {
            assert!(collect_changed_areas(gib, |_| Ok(bad.clone())).is_err());
        }
    }

    #[test]
    fn disk_slots_come_from_their_controllers() {
        let xml = r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
          <VirtualDevice xsi:type="VirtualLsiLogicController"><key>1000</key><busNumber>0</busNumber></VirtualDevice>
          <VirtualDevice xsi:type="VirtualAHCIController"><key>15000</key><busNumber>1</busNumber></VirtualDevice>
          <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo>
            <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web.vmdk</fileName><changeId>52 1f/7</changeId></backing>
            <capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes>
            <controllerKey>1000</controllerKey><unitNumber>0</unitNumber></VirtualDevice>
          <VirtualDevice xsi:type="VirtualDisk"><key>2001</key>
            <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web_1.vmdk</fileName></backing>
            <controllerKey>15000</controllerKey><unitNumber>3</unitNumber></VirtualDevice>
          <VirtualDevice xsi:type="VirtualCdrom"><key>3000</key><controllerKey>1000</controllerKey></VirtualDevice>
        </val>"#;
        let d = disks_of(&Node::parse(xml).unwrap());
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].slot.as_str(), d[0].file.as_str()),
            ("scsi0:0", "[ds1] web/web.vmdk")
        );
        assert_eq!(d[0].label, "Hard disk 1");
        assert_eq!((d[0].key.as_str(), d[0].capacity), ("2000", 1 << 20));
        assert_eq!(d[0].change_id.as_deref(), Some("52 1f/7"));
        assert_eq!(d[1].change_id, None);
        assert_eq!(
            (d[1].slot.as_str(), d[1].file.as_str()),
            ("sata1:3", "[ds1] web/web_1.vmdk")
        );
    }

    /// A host on loopback (plain HTTP) that answers one SOAP request with HTTP 500 and
    /// `body`; returns its base address.
    fn host_answering(body: &'static str) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut request = vec![0u8; length];
            reader.read_exact(&mut request).unwrap();
            let mut conn = reader.into_inner();
            write!(
                conn,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        base
    }

    /// Free ESXi answers `CreateSnapshot_Task` with a `RestrictedVersion` fault (the fault and
    /// text as such a host sends them); the error says why and points to the ssh scheme.
    #[test]
    fn a_free_esxi_refusing_snapshots_is_named_with_the_way_that_works() {
        let base = host_answering(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body><soapenv:Fault>\
             <faultcode>ServerFaultCode</faultcode><faultstring>Current license or ESXi version \
             prohibits execution of the requested operation.</faultstring><detail>\
             <RestrictedVersionFault xmlns=\"urn:vim25\" xsi:type=\"RestrictedVersion\">\
             </RestrictedVersionFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>",
        );
        let soap = Soap::new(reqwest::blocking::Client::new(), &base, "esxi01:443");
        let sc = ServiceContent {
            api_type: "HostAgent".into(),
            full_name: "VMware ESXi 8.0.2".into(),
            property_collector: MoRef::new("PropertyCollector", "ha-property-collector"),
            session_manager: MoRef::new("SessionManager", "ha-sessionmgr"),
            search_index: MoRef::new("SearchIndex", "ha-searchindex"),
        };
        let e = create_snapshot(
            &soap,
            &sc,
            &MoRef::new("VirtualMachine", "1"),
            "vmrepo-backup-x",
            "test",
            false,
            Duration::from_secs(5),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("esxi01:443"), "{e}");
        assert!(
            e.contains("Current license or ESXi version prohibits"),
            "{e}"
        );
        assert!(e.contains("a free ESXi licence does not allow it"), "{e}");
        assert!(e.contains("ssh + vim-cmd scheme of docs/NIGHTLY.md"), "{e}");
    }
}
