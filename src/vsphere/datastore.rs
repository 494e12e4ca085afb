//! Files on a host's datastores over HTTPS (`/folder/PATH?dcPath=DC&dsName=DS`): whole small
//! files, and large ones read by byte ranges as a [`RandomRead`], with retries.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::source::RandomRead;

/// Attempts per request before a read fails (timeouts, resets, 5xx, 429).
const ATTEMPTS: u32 = 4;

/// What went wrong on the way to the host, with the causes ureq gives.
fn transport(t: &ureq::Transport) -> String {
    let mut out = super::soap::with_causes(t);
    if matches!(t.kind(), ureq::ErrorKind::Io) && out.contains("timed out") {
        out.push_str(" (the host did not answer in time)");
    }
    out
}

/// `[datastore] dir/file` split into its datastore and path.
pub fn split_datastore_path(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix('[')?;
    let (ds, path) = rest.split_once(']')?;
    let path = path.trim_start();
    (!ds.is_empty() && !path.is_empty()).then_some((ds, path))
}

/// `text` with every staged path (`VOLUMES/DS/dir/file`) written as the datastore path it
/// stands for (`[DS] dir/file`), so messages name the host's files, not the staging copies.
pub fn unstage(text: &str, volumes: &Path) -> String {
    let prefix = format!("{}/", volumes.display());
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&prefix) {
        out.push_str(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let end = after
            .find(|c: char| c.is_whitespace() || c == '"' || c == ':' || c == ',' || c == ')')
            .unwrap_or(after.len());
        let (path, tail) = after.split_at(end);
        match path.split_once('/') {
            Some((ds, file)) => out.push_str(&format!("[{ds}] {file}")),
            None => out.push_str(&format!("[{path}]")),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn encode_query(v: &str) -> String {
    encode_path(v).replace('/', "%2F")
}

/// How to reach one host's datastores.
#[derive(Clone)]
pub struct Datastores {
    /// The HTTPS agent for the datastore files (trusting as the SOAP session does).
    pub agent: ureq::Agent,
    /// `https://host:port`.
    pub base: String,
    /// `host:port`, for messages.
    pub host: String,
    /// The session cookie.
    pub cookie: Option<String>,
    /// The datacenter the VM is in.
    pub datacenter: String,
    /// Requests sent and bytes received, for the summary.
    pub counters: Arc<Counters>,
}

/// What reading a VM cost on the wire.
#[derive(Debug, Default)]
pub struct Counters {
    /// HTTP requests sent to the host's datastore file access.
    pub requests: AtomicU64,
    /// Payload bytes received.
    pub bytes: AtomicU64,
}

impl Datastores {
    fn url(&self, ds: &str, path: &str) -> String {
        format!(
            "{}/folder/{}?dcPath={}&dsName={}",
            self.base,
            encode_path(path),
            encode_query(&self.datacenter),
            encode_query(ds)
        )
    }

    fn error(&self, what: String) -> Error {
        Error::Vsphere {
            host: self.host.clone(),
            what,
        }
    }

    /// GETs `[ds] path` (bytes `range`, if given), retrying what may pass; `expect` is the
    /// number of bytes the answer must hold.
    fn get(&self, name: &str, range: Option<(u64, u64)>, into: &mut [u8]) -> Result<()> {
        let (ds, path) = split_datastore_path(name).ok_or_else(|| {
            self.error(format!("{name:?} is not a datastore path ([ds] dir/file)"))
        })?;
        let url = self.url(ds, path);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            let mut req = self.agent.get(&url);
            if let Some(c) = &self.cookie {
                req = req.set("Cookie", c);
            }
            if let Some((off, len)) = range {
                req = req.set("Range", &format!("bytes={}-{}", off, off + len - 1));
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(status, _)) => {
                    if status >= 500 || status == 429 {
                        last = format!("HTTP {status}");
                        continue;
                    }
                    if status == 404 {
                        return Err(
                            self.error(format!("{name}: no such file on the datastore (HTTP 404)"))
                        );
                    }
                    if status == 401 || status == 403 {
                        return Err(self.error(format!(
                            "{name}: reading the datastore was refused (HTTP {status}); the user \
                             needs the Datastore.Browse privilege"
                        )));
                    }
                    return Err(self.error(format!("{name}: unexpected answer HTTP {status}")));
                }
                Err(ureq::Error::Transport(t)) => {
                    last = transport(&t);
                    continue;
                }
            };
            let status = resp.status();
            let ranged = status == 206;
            if !(ranged || (status == 200 && range.is_none_or(|(o, _)| o == 0))) {
                return Err(self.error(format!("{name}: unexpected answer HTTP {status}")));
            }
            let mut body = resp.into_reader();
            let mut got = 0;
            let mut failed = None;
            while got < into.len() {
                match body.read(&mut into[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            self.counters.bytes.fetch_add(got as u64, Ordering::Relaxed);
            if failed.is_none() && got == into.len() {
                // The end of the body, which gives the connection back for the next request.
                let _ = body.read(&mut [0u8; 1]);
            }
            if let Some(e) = failed {
                last = format!("the connection broke after {got} bytes: {e}");
                continue;
            }
            if got < into.len() {
                return Err(self.error(format!(
                    "{name}: the host sent {got} bytes where {} were asked for; the file is \
                     shorter than its size said (is the VM writing to it?)",
                    into.len()
                )));
            }
            return Ok(());
        }
        Err(self.error(format!(
            "{name}: read failed {ATTEMPTS} times, last: {last}"
        )))
    }

    /// The size of `[ds] path`, or `None` when there is no such file (asked with a one-byte
    /// range, which every datastore file server answers with the total in `Content-Range`).
    pub fn size_of(&self, name: &str) -> Result<Option<u64>> {
        let (ds, path) = split_datastore_path(name).ok_or_else(|| {
            self.error(format!("{name:?} is not a datastore path ([ds] dir/file)"))
        })?;
        let url = self.url(ds, path);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            let mut req = self.agent.get(&url).set("Range", "bytes=0-0");
            if let Some(c) = &self.cookie {
                req = req.set("Cookie", c);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let (status, resp) = match req.call() {
                Ok(r) => (r.status(), Some(r)),
                Err(ureq::Error::Status(status, _)) => (status, None),
                Err(ureq::Error::Transport(t)) => {
                    last = transport(&t);
                    continue;
                }
            };
            match (status, resp) {
                (404, _) => return Ok(None),
                (206, Some(resp)) => {
                    let total = resp
                        .header("content-range")
                        .and_then(|v| v.rsplit('/').next())
                        .and_then(|t| t.trim().parse::<u64>().ok());
                    return total.map(Some).ok_or_else(|| {
                        self.error(format!(
                            "{name}: the answer to a range request has no total size"
                        ))
                    });
                }
                (200, Some(resp)) => {
                    return resp
                        .header("content-length")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Some)
                        .ok_or_else(|| {
                            self.error(format!(
                                "{name}: the host ignored a range request and gave no size"
                            ))
                        })
                }
                // An empty file cannot satisfy a range.
                (416, _) => return Ok(Some(0)),
                (500..=599 | 429, _) => last = format!("HTTP {status}"),
                _ => {
                    return Err(self.error(format!(
                        "{name}: unexpected answer HTTP {status} (the user needs the \
                         Datastore.Browse privilege)"
                    )))
                }
            }
        }
        Err(self.error(format!(
            "{name}: asking its size failed {ATTEMPTS} times, last: {last}"
        )))
    }

    /// The whole of a small file of `size` bytes.
    pub fn read_whole(&self, name: &str, size: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        if size > 0 {
            self.get(name, Some((0, size)), &mut buf)?;
        }
        Ok(buf)
    }

    /// A large file read by ranges.
    pub fn open(&self, name: &str, size: u64) -> DatastoreFile {
        DatastoreFile {
            store: self.clone(),
            name: name.to_string(),
            shown: PathBuf::from(name),
            len: size,
        }
    }
}

/// A file on a datastore read by byte ranges.
pub struct DatastoreFile {
    store: Datastores,
    name: String,
    shown: PathBuf,
    len: u64,
}

impl RandomRead for DatastoreFile {
    fn path(&self) -> &Path {
        &self.shown
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(Error::bad_input(
                    &self.shown,
                    format!(
                        "a read of {} bytes at offset {offset} goes past the end of the file \
                         ({} bytes): a table or header entry points outside it",
                        buf.len(),
                        self.len
                    ),
                ))
            }
        }
        self.store
            .get(&self.name, Some((offset, buf.len() as u64)), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths() {
        assert_eq!(
            split_datastore_path("[LocalDS_0] web 01/web 01.vmx"),
            Some(("LocalDS_0", "web 01/web 01.vmx"))
        );
        assert_eq!(split_datastore_path("web.vmx"), None);
        assert_eq!(split_datastore_path("[] x"), None);
        assert_eq!(encode_path("web 01/a+b.vmdk"), "web%2001/a%2Bb.vmdk");
        assert_eq!(encode_query("ha-datacenter"), "ha-datacenter");
        let v = Path::new("/tmp/stage/vmfs/volumes");
        assert_eq!(
            unstage("/tmp/stage/vmfs/volumes/ds1/web/web.vmdk: extent \"x\" is missing (named by /tmp/stage/vmfs/volumes/ds1/web/a.vmdk)", v),
            "[ds1] web/web.vmdk: extent \"x\" is missing (named by [ds1] web/a.vmdk)"
        );
    }
}
