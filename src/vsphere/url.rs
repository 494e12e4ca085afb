//! `esxi://` and `vcenter://` source addresses: which host to ask, as whom, and which VM.

use crate::error::{Advice, Error, Result, Setting};

/// The two kinds of vSphere endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A standalone ESXi host (its one datacenter is `ha-datacenter`).
    Esxi,
    /// A vCenter Server: the VM is named by datacenter and inventory path.
    Vcenter,
}

/// A parsed `esxi://user@host[:port]/VMNAME` or `vcenter://user@vc[:port]/DC/vm/PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceUrl {
    /// ESXi or vCenter.
    pub endpoint: Endpoint,
    /// Login name (may itself hold `@`, as `administrator@vsphere.local` does).
    pub user: String,
    /// Host name or address (an IPv6 address keeps its brackets).
    pub host: String,
    /// HTTPS port.
    pub port: u16,
    /// The datacenter the VM is in (`ha-datacenter` on ESXi).
    pub datacenter: String,
    /// The VM's inventory path (`DC/vm/FOLDER/NAME`), as `FindByInventoryPath` takes it.
    pub inventory_path: String,
    /// The VM's name (the last element of the path).
    pub vm: String,
}

/// True when `source` names a VM on a vSphere host rather than a local path.
pub fn is_vsphere(source: &str) -> bool {
    source.starts_with("esxi://") || source.starts_with("vcenter://")
}

fn percent_decode(s: &str, whole: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => return Err(bad(whole, "a `%` not followed by two hex digits")),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad(whole, "percent-escapes that are not UTF-8"))
}

fn bad(url: &str, why: &str) -> Error {
    Error::Usage(format!(
        "invalid vSphere source {url:?}: {why}; write esxi://USER@HOST[:PORT]/VMNAME or \
         vcenter://USER@VCENTER[:PORT]/DATACENTER/vm/PATH"
    ))
}

impl SourceUrl {
    /// Parses a source address; the password never travels in it.
    pub fn parse(url: &str) -> Result<SourceUrl> {
        let (endpoint, rest) = if let Some(r) = url.strip_prefix("esxi://") {
            (Endpoint::Esxi, r)
        } else if let Some(r) = url.strip_prefix("vcenter://") {
            (Endpoint::Vcenter, r)
        } else {
            return Err(bad(url, "it starts with neither esxi:// nor vcenter://"));
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad(url, "no VM is named after the host"))?;
        let (user, hostport) = authority
            .rsplit_once('@')
            .ok_or_else(|| bad(url, "no user is named (USER@HOST)"))?;
        let user = percent_decode(user, url)?;
        if user.contains(':') {
            return Err(Advice::new(format!(
                "invalid vSphere source {:?}: a password must not be written in the address (it \
                 would show in `ps` and shell history); give it with VMREPO_SOURCE_PASSWORD or ",
                url.replacen(user.split(':').nth(1).unwrap_or(""), "***", 1)
            ))
            .setting(Setting::SourcePassword)
            .into());
        }
        if user.is_empty() {
            return Err(bad(url, "the user name is empty"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| bad(url, "the port is not a number from 1 to 65535"))?,
            ),
            _ => (hostport.to_string(), 443),
        };
        if host.is_empty() || port == 0 {
            return Err(bad(url, "the host is empty"));
        }
        let parts = path
            .split('/')
            .map(|p| percent_decode(p, url))
            .collect::<Result<Vec<_>>>()?;
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad(url, "the path has an empty element"));
        }
        let (datacenter, inventory_path) = match endpoint {
            Endpoint::Esxi => {
                if parts.len() != 1 {
                    return Err(bad(url, "an ESXi host names the VM by its name alone"));
                }
                let dc = "ha-datacenter".to_string();
                let inv = format!("{dc}/vm/{}", escape_inventory(&parts[0]));
                (dc, inv)
            }
            Endpoint::Vcenter => {
                if parts.len() < 3 || parts[1] != "vm" {
                    return Err(bad(
                        url,
                        "a vCenter path is DATACENTER/vm/[FOLDER/...]VMNAME",
                    ));
                }
                let inv = parts
                    .iter()
                    .map(|p| escape_inventory(p))
                    .collect::<Vec<_>>()
                    .join("/");
                (parts[0].clone(), inv)
            }
        };
        Ok(SourceUrl {
            endpoint,
            user,
            host,
            port,
            datacenter,
            inventory_path,
            vm: parts.last().unwrap().clone(),
        })
    }

    /// `https://host:port`.
    pub fn base(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// `host:port`, for messages.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The VM's inventory path below `DATACENTER/vm`, one element per folder and the VM's
    /// name last (as written, not escaped).
    pub fn vm_elements(&self) -> Vec<String> {
        self.inventory_path
            .splitn(3, '/')
            .nth(2)
            .unwrap_or("")
            .split('/')
            .map(unescape_inventory)
            .collect()
    }

    /// The address of the VM at `elements` (below `DATACENTER/vm`) on the same host, for the
    /// same user: what a job's folder or pattern expands to.
    pub fn with_vm(&self, elements: &[String]) -> String {
        let path: Vec<String> = match self.endpoint {
            Endpoint::Esxi => elements.iter().map(|e| percent_encode(e)).collect(),
            Endpoint::Vcenter => [self.datacenter.clone(), "vm".to_string()]
                .iter()
                .chain(elements)
                .map(|e| percent_encode(e))
                .collect(),
        };
        let scheme = match self.endpoint {
            Endpoint::Esxi => "esxi",
            Endpoint::Vcenter => "vcenter",
        };
        format!(
            "{scheme}://{}@{}:{}/{}",
            percent_encode(&self.user),
            self.host,
            self.port,
            path.join("/")
        )
    }
}

/// `s` with everything but unreserved characters (RFC 3986) written as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The name an inventory path element stands for (`%2f` is `/`, `%25` is `%`).
fn unescape_inventory(element: &str) -> String {
    let mut out = String::with_capacity(element.len());
    let mut rest = element;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let esc = rest.get(at..at + 3).unwrap_or("");
        if esc.eq_ignore_ascii_case("%2f") {
            out.push('/');
            rest = &rest[at + 3..];
        } else if esc == "%25" {
            out.push('%');
            rest = &rest[at + 3..];
        } else {
            out.push('%');
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

impl std::fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.endpoint {
            Endpoint::Esxi => "esxi",
            Endpoint::Vcenter => "vcenter",
        };
        let path = match self.endpoint {
            Endpoint::Esxi => self.vm.clone(),
            Endpoint::Vcenter => self.inventory_path.clone(),
        };
        write!(
            f,
            "{scheme}://{}@{}:{}/{path}",
            self.user, self.host, self.port
        )
    }
}

/// Inventory paths escape `/` inside a name as `%2f` (and so `%` as `%25`).
fn escape_inventory(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2f")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        let u = SourceUrl::parse("esxi://root@10.0.0.5/web01").unwrap();
        assert_eq!(u.endpoint, Endpoint::Esxi);
        assert_eq!(
            (u.user.as_str(), u.host.as_str(), u.port),
            ("root", "10.0.0.5", 443)
        );
        assert_eq!(u.inventory_path, "ha-datacenter/vm/web01");
        assert_eq!(u.to_string(), "esxi://root@10.0.0.5:443/web01");
        let v =
            SourceUrl::parse("vcenter://administrator@vsphere.local@vc:8443/DC0/vm/prod/db%20one")
                .unwrap();
        assert_eq!(v.user, "administrator@vsphere.local");
        assert_eq!((v.host.as_str(), v.port), ("vc", 8443));
        assert_eq!(v.datacenter, "DC0");
        assert_eq!(v.inventory_path, "DC0/vm/prod/db one");
        assert_eq!(v.vm, "db one");
    }

    #[test]
    fn vm_addresses_are_built_back_from_inventory_elements() {
        let v = SourceUrl::parse("vcenter://a%40b@vc:8443/DC0/vm/prod/%2A").unwrap();
        let names = ["prod".to_string(), "db/one %x".to_string()];
        let url = v.with_vm(&names);
        assert_eq!(url, "vcenter://a%40b@vc:8443/DC0/vm/prod/db%2Fone%20%25x");
        let back = SourceUrl::parse(&url).unwrap();
        assert_eq!(back.vm_elements(), names);
        assert_eq!(back.user, "a@b");
        assert_eq!(back.inventory_path, "DC0/vm/prod/db%2fone %25x");
        let e = SourceUrl::parse("esxi://root@h/*").unwrap();
        assert_eq!(e.vm_elements(), ["*"]);
        let one = e.with_vm(&["web 1".to_string()]);
        assert_eq!(one, "esxi://root@h:443/web%201");
        assert_eq!(
            SourceUrl::parse(&one).unwrap().inventory_path,
            "ha-datacenter/vm/web 1"
        );
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for bad in [
            "esxi://host/vm",
            "esxi://root@host",
            "esxi://root:secret@host/vm",
            "esxi://root@host:99999/vm",
            "esxi://root@host/a/b",
            "vcenter://u@vc/DC0/host/x",
            "vcenter://u@vc/DC0/vm",
            "esxi://root@host/%zz",
            "http://root@host/vm",
        ] {
            assert!(SourceUrl::parse(bad).is_err(), "{bad}");
        }
        let e = SourceUrl::parse("esxi://root:pw@h/vm")
            .unwrap_err()
            .to_string();
        assert!(e.contains("VMREPO_SOURCE_PASSWORD"), "{e}");
    }
}
