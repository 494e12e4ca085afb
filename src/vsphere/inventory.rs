//! A host's inventory beyond one VM: the VMs a job names by folder or pattern
//! (`vcenter://u@vc/DC/vm/Prod/`, `esxi://root@esxi01/web*`), and the datastores a VM uses, so
//! a job can hold its reads to so many per datastore.

use super::api::{self, Entity};
use super::frozen::{connect, Session};
use super::url::Endpoint;
use super::xml::MoRef;
use super::Connect;
use crate::error::Result;

/// True when a job's vSphere entry names VMs by a pattern (`*`, `?`, `[` in the VM's path) or
/// a folder (a trailing `/`), to be expanded on the host when the job runs.
pub fn is_selection(source: &str) -> bool {
    let path = source.split_once("://").map_or("", |(_, rest)| rest);
    let path = path.split_once('/').map_or("", |(_, p)| p);
    path.ends_with('/') || path.contains(['*', '?', '['])
}

/// A selection as an address the source parser takes: a trailing `/` (every VM below the
/// folder) becomes `/**`.
pub fn selection_address(source: &str) -> String {
    if source.ends_with('/') {
        format!("{source}**")
    } else {
        source.to_string()
    }
}

fn has_glob(element: &str) -> bool {
    element.contains(['*', '?', '['])
}

/// Inventory paths escape `/` inside a name as `%2f` (and so `%` as `%25`).
fn escape(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2f")
}

/// The VMs (not templates) below `folder`, as paths of names under `prefix`; into folders
/// and vApps below it when `deep`.
fn walk(
    s: &Session,
    folder: &MoRef,
    prefix: &[String],
    deep: bool,
    out: &mut Vec<Vec<String>>,
) -> Result<()> {
    let property = if folder.kind == "VirtualApp" {
        "vm"
    } else {
        "childEntity"
    };
    let props = api::properties(&s.soap, &s.sc, folder, &[property])?;
    let children = api::references(&props, property);
    for Entity { mo, name, template } in api::entities_of(&s.soap, &s.sc, &children)? {
        let mut path = prefix.to_vec();
        path.push(name);
        match mo.kind.as_str() {
            "VirtualMachine" if !template => out.push(path),
            "Folder" | "VirtualApp" if deep => walk(s, &mo, &path, deep, out)?,
            _ => {}
        }
    }
    Ok(())
}

/// The addresses of the VMs that `c.url` (a selection, see [`selection_address`]) names on
/// its host, sorted. A pattern's `*` stays inside one folder, `**` goes into folders below;
/// on an ESXi host only its VMs (not those of vApps) are listed. Templates are left out. A
/// selection that matches no VM is an error, so that a renamed folder does not quietly end
/// its VMs' backups.
pub fn expand(c: &Connect) -> Result<Vec<String>> {
    let pattern = c.url.vm_elements();
    let literal = pattern
        .iter()
        .position(|e| has_glob(e))
        .unwrap_or(pattern.len());
    let root = c
        .url
        .inventory_path
        .splitn(3, '/')
        .take(2)
        .collect::<Vec<_>>()
        .join("/");
    let base_path = std::iter::once(root)
        .chain(pattern[..literal].iter().map(|e| escape(e)))
        .collect::<Vec<_>>()
        .join("/");
    let session = connect(c)?;
    let found = (|| {
        let s = &session;
        let base = api::find_by_path(&s.soap, &s.sc, &base_path)?.ok_or_else(|| {
            s.soap.error(format!(
                "no folder at {base_path:?}; check the path (it is case-sensitive)"
            ))
        })?;
        if literal == pattern.len() {
            return Ok(vec![pattern.clone()]);
        }
        let mut all = Vec::new();
        walk(
            s,
            &base,
            &pattern[..literal],
            c.url.endpoint == Endpoint::Vcenter,
            &mut all,
        )?;
        Ok::<_, crate::Error>(all)
    })();
    api::logout(&session.soap, &session.sc);
    let found = found?;
    let glob = glob::Pattern::new(
        &pattern
            .iter()
            .map(|e| {
                if has_glob(e) {
                    e.clone()
                } else {
                    glob::Pattern::escape(&escape(e))
                }
            })
            .collect::<Vec<_>>()
            .join("/"),
    )
    .map_err(|e| {
        session
            .soap
            .error(format!("{} is not a valid pattern: {e}", c.url))
    })?;
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let mut out: Vec<String> = found
        .iter()
        .filter(|p| {
            let text = p.iter().map(|e| escape(e)).collect::<Vec<_>>().join("/");
            glob.matches_with(&text, options)
        })
        .map(|p| c.url.with_vm(p))
        .collect();
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(session.soap.error(format!(
            "{} names no VM (templates are left out); check the folder and the pattern",
            c.url
        )));
    }
    Ok(out)
}

/// The names of the datastores the VM of `c` uses, as its host lists them.
pub fn datastores(c: &Connect) -> Result<Vec<String>> {
    let session = connect(c)?;
    let s = &session;
    let names = (|| {
        let vm = api::find_vm(&s.soap, &s.sc, &c.url.inventory_path)?
            .ok_or_else(|| s.soap.error(format!("no VM at {:?}", c.url.inventory_path)))?;
        let props = api::properties(&s.soap, &s.sc, &vm, &["datastore"])?;
        let stores = api::references(&props, "datastore");
        Ok::<_, crate::Error>(
            api::entities_of(&s.soap, &s.sc, &stores)?
                .into_iter()
                .map(|e| e.name)
                .collect(),
        )
    })();
    api::logout(&s.soap, &s.sc);
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_are_told_from_vms() {
        for s in [
            "esxi://root@h/*",
            "esxi://root@h/web?",
            "vcenter://u@vc/DC/vm/Prod/",
            "vcenter://u@vc/DC/vm/[ab]*",
        ] {
            assert!(is_selection(s), "{s}");
        }
        for s in ["esxi://root@h/web01", "vcenter://u@vc/DC/vm/Prod/db"] {
            assert!(!is_selection(s), "{s}");
        }
        assert_eq!(
            selection_address("vcenter://u@vc/DC/vm/Prod/"),
            "vcenter://u@vc/DC/vm/Prod/**"
        );
    }

    #[test]
    fn a_star_stays_in_its_folder_and_two_go_below() {
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let one = glob::Pattern::new("Prod/*").unwrap();
        let deep = glob::Pattern::new("Prod/**").unwrap();
        assert!(one.matches_with("Prod/web", options));
        assert!(!one.matches_with("Prod/sub/web", options));
        assert!(deep.matches_with("Prod/web", options));
        assert!(deep.matches_with("Prod/sub/web", options));
        assert!(!deep.matches_with("Test/web", options));
    }
}
