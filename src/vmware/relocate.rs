//! `extract --datastore-map OLD=NEW`: restore a VM to another datastore path, as vcbRestore's
//! alternate catalog does. Paths inside the restored `.vmx` (disk `fileName`s, and any other
//! value that is a path under OLD) and the extent file names in disk descriptors that start
//! with OLD are rewritten to start with NEW; everything else stays byte for byte as stored.
//!
//! A rule matches at a path-component boundary (`/vmfs/volumes/ds1` matches
//! `/vmfs/volumes/ds1/web01/web01.vmdk` but not `/vmfs/volumes/ds10/...`); with several rules
//! the longest matching OLD wins. Relative paths (the usual case inside a VM directory) never
//! match an absolute OLD, so they keep pointing next to the restored files.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::repo::manifest::Manifest;
use crate::vmware::vmx::unescape;

/// One path rewritten during an extract.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rewrite {
    /// The restored file the path is in.
    pub file: String,
    /// The path as stored.
    pub old: String,
    /// The path as written.
    pub new: String,
}

/// The `--datastore-map` rules of an extract, and what they rewrote.
#[derive(Clone, Debug, Default)]
pub struct DatastoreMap {
    rules: Vec<(String, String)>,
    done: Arc<Mutex<Vec<Rewrite>>>,
}

fn trim_slash(p: &str) -> &str {
    if p.len() > 1 {
        p.trim_end_matches('/')
    } else {
        p
    }
}

impl DatastoreMap {
    /// Parses `OLD=NEW` rules.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<DatastoreMap> {
        let mut out = Vec::new();
        for r in rules {
            let r = r.as_ref();
            let Some((old, new)) = r.split_once('=') else {
                return Err(Error::Usage(format!(
                    "datastore map {r:?}: expected OLD=NEW, e.g. /vmfs/volumes/ds1=/vmfs/volumes/ds2"
                )));
            };
            let (old, new) = (trim_slash(old.trim()), trim_slash(new.trim()));
            if old.is_empty() || new.is_empty() {
                return Err(Error::Usage(format!(
                    "datastore map {r:?}: OLD and NEW must both be non-empty paths"
                )));
            }
            if out.iter().any(|(o, _): &(String, String)| o == old) {
                return Err(Error::Usage(format!(
                    "datastore map: {old:?} is mapped twice"
                )));
            }
            out.push((old.to_string(), new.to_string()));
        }
        Ok(DatastoreMap {
            rules: out,
            done: Arc::default(),
        })
    }

    /// True if there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Paths rewritten so far.
    pub fn rewrites(&self) -> Vec<Rewrite> {
        self.done.lock().unwrap().clone()
    }

    /// Rules that rewrote nothing so far (`OLD=NEW` as given, normalised).
    pub fn unused(&self) -> Vec<String> {
        let done = self.done.lock().unwrap();
        self.rules
            .iter()
            .filter(|(old, _)| {
                !done
                    .iter()
                    .any(|d| self.rule_for(&d.old).is_some_and(|(o, _)| o == old))
            })
            .map(|(o, n)| format!("{o}={n}"))
            .collect()
    }

    fn rule_for(&self, path: &str) -> Option<(&str, &str)> {
        self.rules
            .iter()
            .filter(|(old, _)| {
                path == old
                    || (path.starts_with(old.as_str())
                        && (old.ends_with('/') || path.as_bytes()[old.len()] == b'/'))
            })
            .max_by_key(|(old, _)| old.len())
            .map(|(o, n)| (o.as_str(), n.as_str()))
    }

    /// `path` with its OLD prefix replaced, if a rule matches.
    pub fn map_path(&self, path: &str) -> Option<String> {
        let (old, new) = self.rule_for(path)?;
        let rest = &path[old.len()..];
        Some(if new == "/" && rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("{new}{rest}")
        })
    }

    /// The bytes to write for the stored small file `name` of `manifest`: a `.vmx`/`.vmtx` or a
    /// disk descriptor with its paths mapped, any other file unchanged.
    pub fn apply(&self, manifest: &Manifest, name: &str, data: Vec<u8>) -> Vec<u8> {
        if self.rules.is_empty() {
            return data;
        }
        let lower = name.to_ascii_lowercase();
        let out = if lower.ends_with(".vmx") || lower.ends_with(".vmtx") {
            self.rewrite_lines(name, &data, vmx_line, escape_vmx)
        } else if manifest
            .disks
            .iter()
            .any(|d| d.descriptor.as_deref() == Some(name))
        {
            // Descriptor text ends at the first NUL (QEMU pads to a sector); keep the padding.
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            self.rewrite_lines(name, &data[..end], descriptor_line, str::to_string)
                .map(|mut t| {
                    t.extend_from_slice(&data[end..]);
                    t
                })
        } else {
            None
        };
        out.unwrap_or(data)
    }

    /// Rewrites each line with `f` (which returns the byte range of a path to map and the path),
    /// writing mapped paths through `escape`; `None` if nothing changed.
    fn rewrite_lines(
        &self,
        file: &str,
        data: &[u8],
        f: fn(&str) -> Option<(usize, usize, String)>,
        escape: fn(&str) -> String,
    ) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(data).ok()?;
        let mut out = String::with_capacity(text.len() + 64);
        let mut changed = false;
        for line in text.split_inclusive('\n') {
            match f(line).and_then(|(s, e, path)| Some((s, e, self.map_path(&path)?, path))) {
                Some((s, e, new, old)) => {
                    out.push_str(&line[..s]);
                    out.push_str(&escape(&new));
                    out.push_str(&line[e..]);
                    self.done.lock().unwrap().push(Rewrite {
                        file: file.to_string(),
                        old,
                        new,
                    });
                    changed = true;
                }
                None => out.push_str(line),
            }
        }
        changed.then(|| out.into_bytes())
    }
}

/// In `key = "value"`, the byte range of the quoted value and its decoded text.
fn vmx_line(line: &str) -> Option<(usize, usize, String)> {
    let eq = line.find('=')?;
    if line[..eq].trim_start().starts_with('#') {
        return None;
    }
    let open = eq + 1 + line[eq + 1..].find('"')?;
    let close = open + 1 + line[open + 1..].rfind('"')?;
    Some((open + 1, close, unescape(&line[open + 1..close])))
}

/// In an extent line `RW 8388608 VMFS "file" [offset]`, the byte range of the file name.
fn descriptor_line(line: &str) -> Option<(usize, usize, String)> {
    let first = line.split_whitespace().next()?;
    if !["RW", "RDONLY", "NOACCESS"]
        .iter()
        .any(|a| first.eq_ignore_ascii_case(a))
    {
        return None;
    }
    let open = line.find('"')?;
    let close = open + 1 + line[open + 1..].find('"')?;
    Some((open + 1, close, line[open + 1..close].to_string()))
}

/// The `.vmx` encoding of a value: `|` and `"` and control characters as `|XX`.
fn escape_vmx(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c == '|' || c == '"' || (c as u32) < 0x20 {
            out.push_str(&format!("|{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rules: &[&str]) -> DatastoreMap {
        DatastoreMap::parse(rules).unwrap()
    }

    #[test]
    fn parses_rules_and_matches_whole_components() {
        let m = map(&[
            "/vmfs/volumes/ds1/=/vmfs/volumes/ds2",
            "/vmfs/volumes/ds1/web=/x",
        ]);
        assert_eq!(
            m.map_path("/vmfs/volumes/ds1/db/db.vmdk").as_deref(),
            Some("/vmfs/volumes/ds2/db/db.vmdk")
        );
        // The longest OLD wins.
        assert_eq!(
            m.map_path("/vmfs/volumes/ds1/web/web.vmdk").as_deref(),
            Some("/x/web.vmdk")
        );
        assert_eq!(m.map_path("/vmfs/volumes/ds10/a.vmdk"), None);
        assert_eq!(m.map_path("web01.vmdk"), None);
        assert!(DatastoreMap::parse(&["nope"]).is_err());
        assert!(DatastoreMap::parse(&["=/x"]).is_err());
        assert!(DatastoreMap::parse(&["/a=/b", "/a/=/c"]).is_err());
    }

    #[test]
    fn rewrites_vmx_values_and_descriptor_extents_only() {
        let m = map(&["/vmfs/volumes/ds1=/vmfs/volumes/new|ds"]);
        let vmx =
            "displayName = \"web\"\r\nscsi0:1.fileName = \"/vmfs/volumes/ds1/web/web_1.vmdk\"\r\n\
                   scsi0:0.fileName = \"web.vmdk\"\r\n# x = \"/vmfs/volumes/ds1/c\"\r\n";
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "version": 1,
            "catalog": {"vm": "web", "time": "t", "uuid": null, "display_name": null,
                "source_kind": "vm-directory", "source": "/s", "started": "t", "finished": "t",
                "vmrepo_version": "0", "stats": {"virtual_bytes": 0, "bytes_read": 0, "bytes_data": 0,
                "bytes_new": 0, "bytes_stored": 0, "chunks_total": 0, "chunks_new": 0,
                "segments_reused": 0, "segments_total": 0}},
            "files": [],
            "disks": [{"slot": "scsi0:1", "descriptor": "web_1.vmdk", "create_type": "vmfs",
                "virtual_size": 0, "disk_map": "00".repeat(32), "extents": []}]
        }))
        .unwrap();
        let out = m.apply(&manifest, "web.vmx", vmx.as_bytes().to_vec());
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("scsi0:1.fileName = \"/vmfs/volumes/new|7Cds/web/web_1.vmdk\"\r\n"));
        assert!(out.contains("scsi0:0.fileName = \"web.vmdk\"\r\n"));
        assert!(
            out.contains("# x = \"/vmfs/volumes/ds1/c\""),
            "comments stay"
        );
        let desc = b"version=1\ncreateType=\"vmfs\"\nRW 100 VMFS \"/vmfs/volumes/ds1/web/web_1-flat.vmdk\"\n\0\0\0";
        let out = m.apply(&manifest, "web_1.vmdk", desc.to_vec());
        assert_eq!(
            out,
            b"version=1\ncreateType=\"vmfs\"\nRW 100 VMFS \"/vmfs/volumes/new|ds/web/web_1-flat.vmdk\"\n\0\0\0"
        );
        // Other files are never touched.
        let log = b"/vmfs/volumes/ds1/web/web.vmx".to_vec();
        assert_eq!(m.apply(&manifest, "vmware.log", log.clone()), log);
        assert_eq!(m.rewrites().len(), 2);
        assert!(m.unused().is_empty());
        assert_eq!(map(&["/a=/b"]).unused(), vec!["/a=/b".to_string()]);
    }
}
