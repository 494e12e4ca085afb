//! SOAP over HTTPS to a vSphere host's `/sdk` endpoint (the vim25 API): one request per call,
//! the session cookie kept after login, faults turned into errors naming the host and method.

use std::sync::Mutex;
use std::time::Duration;

use super::xml::{MoRef, Node};
use crate::error::{Advice, Error, Result, Setting};

/// The API version asked for: vim25 6.5 is understood by ESXi and vCenter 6.5 and later.
const SOAP_ACTION: &str = "urn:vim25/6.5";

/// A connection to one host.
pub struct Soap {
    http: reqwest::blocking::Client,
    base: String,
    host: String,
    cookie: Mutex<Option<String>>,
}

/// A SOAP fault: the fault's type (`InvalidLogin`, `NotSupported`, ...) and its message.
#[derive(Debug, Clone)]
pub struct Fault {
    /// The fault type from `detail` (without the `Fault` suffix the wire adds), if any.
    pub kind: Option<String>,
    /// The host's message.
    pub message: String,
}

impl Soap {
    /// A connection to `base` (`https://host:port`) through `http`; `host` names it in errors.
    pub fn new(http: reqwest::blocking::Client, base: &str, host: &str) -> Soap {
        Soap {
            http,
            base: base.to_string(),
            host: host.to_string(),
            cookie: Mutex::new(None),
        }
    }

    /// `host:port`, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `https://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The session cookie header value, once logged in.
    pub fn cookie(&self) -> Option<String> {
        self.cookie.lock().unwrap().clone()
    }

    /// An error about this host.
    pub fn error(&self, what: impl Into<String>) -> Error {
        Error::Vsphere {
            host: self.host.clone(),
            what: what.into(),
        }
    }

    /// Calls `method` on `this` with `args` (already-encoded child elements). Returns the
    /// response element (`<METHODResponse>`), or the fault as `Err(Ok(fault))`; a transport
    /// or parse failure is `Err(Err(error))`.
    pub fn call_raw(
        &self,
        method: &str,
        this: &MoRef,
        args: &str,
        timeout: Option<Duration>,
    ) -> std::result::Result<Node, std::result::Result<Fault, Error>> {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>\
             <{method} xmlns=\"urn:vim25\">{}{args}</{method}></soapenv:Body></soapenv:Envelope>",
            super::xml::mo_ref("_this", this)
        );
        let mut req = self
            .http
            .post(format!("{}/sdk", self.base))
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION)
            .body(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(c) = self.cookie() {
            req = req.header("Cookie", c);
        }
        let resp = req
            .send()
            .map_err(|e| Err(self.transport_error(method, &e)))?;
        for v in resp.headers().get_all("set-cookie") {
            if let Ok(v) = v.to_str() {
                if let Some(c) = v
                    .split(';')
                    .next()
                    .filter(|c| c.starts_with("vmware_soap_session="))
                {
                    *self.cookie.lock().unwrap() = Some(c.to_string());
                }
            }
        }
        let status = resp.status();
        let text = resp
            .text()
            .map_err(|e| Err(self.error(format!("{method}: reading the answer: {e}"))))?;
        let doc = Node::parse(&text).map_err(|why| {
            Err(self.error(format!(
                "{method}: the answer (HTTP {status}) is not XML ({why}); is this a vSphere \
                 host's /sdk endpoint?"
            )))
        })?;
        let body = doc
            .child("Body")
            .and_then(|b| b.children.first())
            .ok_or_else(|| Err(self.error(format!("{method}: the answer has no SOAP body"))))?;
        if body.name == "Fault" {
            let kind = body
                .at("detail")
                .and_then(|d| d.children.first())
                .map(|f| f.xsi_type.clone().unwrap_or_else(|| f.name.clone()))
                .map(|k| k.trim_end_matches("Fault").to_string());
            return Err(Ok(Fault {
                kind,
                message: body.text_at("faultstring").unwrap_or("").to_string(),
            }));
        }
        if !status.is_success() {
            return Err(Err(self.error(format!("{method}: HTTP {status}"))));
        }
        Ok(body.clone())
    }

    /// A request that failed on its way: a certificate the host may not be trusted with is
    /// said so, with the settings that trust it.
    fn transport_error(&self, method: &str, e: &reqwest::Error) -> Error {
        let why = transport(e);
        if why.contains("UnknownIssuer")
            || why.contains("invalid peer certificate")
            || why.contains("CaUsedAsEndEntity")
        {
            return Advice::new(format!(
                "vSphere {}: {method}: {why}; the host's certificate is not trusted: pin it with ",
                self.host
            ))
            .setting(Setting::TlsThumbprint)
            .text(" (the SHA-256 fingerprint `openssl x509 -noout -fingerprint -sha256` prints) or name its CA with ")
            .setting(Setting::TlsCa)
            .into();
        }
        self.error(format!("{method}: {why}"))
    }

    /// [`Soap::call_raw`] with a fault turned into an error naming the method.
    pub fn call(&self, method: &str, this: &MoRef, args: &str) -> Result<Node> {
        self.call_raw(method, this, args, None)
            .map_err(|e| match e {
                Ok(f) => self.error(format!(
                    "{method} failed: {}{}",
                    f.message,
                    f.kind.map(|k| format!(" ({k})")).unwrap_or_default()
                )),
                Err(e) => e,
            })
    }
}

/// An error with the causes it carries, each said once (the TLS verifier's reason is deep in
/// the chain).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

/// A transport error with its causes.
fn transport(e: &reqwest::Error) -> String {
    let mut out = with_causes(e);
    if e.is_timeout() {
        out.push_str(" (the host did not answer in time)");
    }
    out
}
