//! How vmrepo trusts a vSphere host's TLS certificate: a pinned SHA-256 fingerprint (ESXi's
//! certificates are self-signed), a CA certificate file, or the system's trust store. Never
//! unverified.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

use crate::error::{Error, Result};

/// What a host's certificate is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The SHA-256 fingerprint of the host's own certificate (DER), as
    /// `openssl x509 -noout -fingerprint -sha256` prints it.
    Pinned([u8; 32]),
    /// A CA certificate (PEM) that signed the host's certificate; the host name is checked.
    Ca(PathBuf),
    /// The system's trust store; the host name is checked.
    System,
}

/// Parses a fingerprint: colon-separated or plain hex, any case, with or without openssl's
/// `sha256 Fingerprint=` prefix.
pub fn parse_thumbprint(s: &str) -> Result<[u8; 32]> {
    let hex_part = s.rsplit('=').next().unwrap_or(s).trim();
    let digits: String = hex_part.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&digits).ok().filter(|b| b.len() == 32);
    bytes.map(|b| b.try_into().unwrap()).ok_or_else(|| {
        Error::Usage(format!(
            "invalid TLS thumbprint {s:?}: give the SHA-256 fingerprint of the host's certificate \
             as `openssl x509 -noout -fingerprint -sha256` prints it (32 bytes in hex, e.g. \
             AB:CD:...); a SHA-1 thumbprint (20 bytes) is not accepted"
        ))
    })
}

/// The fingerprint as openssl prints it.
pub fn format_thumbprint(fp: &[u8; 32]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts exactly the certificate whose fingerprint was pinned, and checks the handshake's
/// signatures with it.
#[derive(Debug)]
struct Pinned {
    want: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the host's certificate has SHA-256 fingerprint {}, not the pinned {}: refusing \
                 to talk to it (if the host's certificate was renewed, check the new \
                 fingerprint on the host and pin that)",
                format_thumbprint(&got),
                format_thumbprint(&self.want)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The TLS settings for `host` that trust as `trust` says, shared by the SOAP calls and the
/// datastore reads.
fn rustls_config(host: &str, trust: &Trust) -> Result<rustls::ClientConfig> {
    let fail = |what: String| Error::Vsphere {
        host: host.to_string(),
        what,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(format!("cannot set up TLS: {e}")))?;
    Ok(match trust {
        Trust::Pinned(want) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                want: *want,
                provider,
            }))
            .with_no_client_auth(),
        Trust::Ca(path) => {
            use rustls::pki_types::pem::PemObject;
            let pem = std::fs::read(path).map_err(|e| {
                fail(format!(
                    "cannot read the CA certificate {}: {e}",
                    path.display()
                ))
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    fail(format!(
                        "{} is not a PEM certificate file: {e}",
                        path.display()
                    ))
                })?;
                roots.add(cert).map_err(|e| {
                    fail(format!(
                        "{} holds an unusable certificate: {e}",
                        path.display()
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(fail(format!("{} holds no PEM certificate", path.display())));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::System => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| fail(format!("cannot load the system's CA certificates: {e}")))?
                .with_no_client_auth()
        }
    })
}

/// An HTTPS client for `host` that trusts as `trust` says; `timeout` bounds connecting and
/// each request. For the SOAP calls.
pub fn client(host: &str, trust: &Trust, timeout: Duration) -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        .http1_only()
        .tls_backend_preconfigured(rustls_config(host, trust)?)
        .build()
        .map_err(|e| Error::Vsphere {
            host: host.to_string(),
            what: format!("cannot set up an HTTPS client: {e}"),
        })
}

/// An HTTPS agent for `host`'s datastore files, trusting as `trust` says; `timeout` bounds
/// connecting and each read or write. The body of an answer is decrypted on the thread that
/// reads it, straight into the caller's buffer (reqwest's blocking client hands each body
/// through a runtime thread and copies it twice, which cost a tenth of a disk read's time).
pub fn agent(host: &str, trust: &Trust, timeout: Duration) -> Result<ureq::Agent> {
    let config = Arc::new(rustls_config(host, trust)?);
    Ok(ureq::AgentBuilder::new()
        .tls_connector(Arc::new(Connector(config)))
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .timeout_write(timeout)
        .max_idle_connections_per_host(16)
        .try_proxy_from_env(true)
        .build())
}

/// rustls under ureq's connections.
struct Connector(Arc<rustls::ClientConfig>);

impl ureq::TlsConnector for Connector {
    fn connect(
        &self,
        dns_name: &str,
        io: Box<dyn ureq::ReadWrite>,
    ) -> std::result::Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let name = ServerName::try_from(dns_name.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .to_owned();
        let conn =
            rustls::ClientConnection::new(self.0.clone(), name).map_err(std::io::Error::other)?;
        Ok(Box::new(TlsStream(rustls::StreamOwned::new(conn, io))))
    }
}

/// One TLS connection of a [`Connector`].
struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

impl std::io::Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl ureq::ReadWrite for TlsStream {
    fn socket(&self) -> Option<&std::net::TcpStream> {
        self.0.sock.socket()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_in_the_forms_people_paste() {
        let colon = "sha256 Fingerprint=0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9:0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9";
        let fp = parse_thumbprint(colon).unwrap();
        assert_eq!(fp[0], 0x0a);
        assert_eq!(parse_thumbprint(&format_thumbprint(&fp)).unwrap(), fp);
        assert_eq!(parse_thumbprint(&hex::encode(fp)).unwrap(), fp);
        // A SHA-1 thumbprint (what older vSphere tools show) is refused with the reason.
        let e = parse_thumbprint("AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01")
            .unwrap_err()
            .to_string();
        assert!(e.contains("SHA-1"), "{e}");
        assert!(parse_thumbprint("zz").is_err());
    }
}
