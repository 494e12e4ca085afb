//! Command-line settings for a VM read over the vSphere API (`esxi://`, `vcenter://`): how to
//! trust the host's certificate, where the password comes from, and the snapshot's options.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::cli::passphrase::Source;
use vmrepo::vsphere::tls::{parse_thumbprint, Trust};
use vmrepo::vsphere::{Connect, SourceUrl};

/// Settings of an `esxi://` or `vcenter://` source.
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "vSphere source (esxi://, vcenter://)")]
pub struct VsphereArgs {
    /// Trust the host's TLS certificate only if its SHA-256 fingerprint is this, as
    /// `openssl x509 -noout -fingerprint -sha256` prints it (ESXi's certificates are
    /// self-signed). A different certificate is refused.
    #[arg(long, value_name = "SHA256", conflicts_with = "tls_ca")]
    tls_thumbprint: Option<String>,
    /// Trust the host's TLS certificate if this CA (PEM file) signed it; the host name is
    /// checked. Without this or --tls-thumbprint the system's CAs are used.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Read the host user's password from this file (first line). Else
    /// --source-password-command, VMREPO_SOURCE_PASSWORD, or a prompt.
    #[arg(long, value_name = "FILE")]
    source_password_file: Option<PathBuf>,
    /// Run this (sh -c) and use the first line of its output as the host user's password.
    #[arg(long, value_name = "CMD", conflicts_with = "source_password_file")]
    source_password_command: Option<String>,
    /// Ask VMware Tools in the guest to quiesce its filesystems for the backup snapshot.
    #[arg(long)]
    quiesce: bool,
    /// Longest wait for the host to create or remove the backup snapshot.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
    snapshot_timeout: u64,
}

/// Seconds a job waits for a snapshot to be created or removed.
const JOB_SNAPSHOT_TIMEOUT: u64 = 1800;

/// How to reach `source` with `settings` (`None` for a local path). `prompt`: ask for the
/// password on the terminal when no file, command or VMREPO_SOURCE_PASSWORD gives it.
fn connect(
    source: &std::path::Path,
    settings: &VsphereArgs,
    strict: bool,
    prompt: bool,
) -> anyhow::Result<Option<Connect>> {
    let Some(text) = source.to_str().filter(|s| vmrepo::vsphere::is_vsphere(s)) else {
        return Ok(None);
    };
    let url = SourceUrl::parse(text)?;
    let trust = match (&settings.tls_thumbprint, &settings.tls_ca) {
        (Some(t), _) => Trust::Pinned(parse_thumbprint(t)?),
        (None, Some(ca)) => Trust::Ca(ca.clone()),
        (None, None) => Trust::System,
    };
    let source = Source {
        file: settings.source_password_file.clone(),
        command: settings.source_password_command.clone(),
        env: "VMREPO_SOURCE_PASSWORD",
        what: "vSphere password",
    };
    let password = if prompt {
        source.get(false)?
    } else {
        source.get_without_prompt()?
    };
    Ok(Some(Connect {
        url,
        password: Arc::new(password),
        trust,
        quiesce: settings.quiesce,
        strict,
        timeout: Duration::from_secs(120),
        task_timeout: Duration::from_secs(settings.snapshot_timeout),
    }))
}

/// A job's VM: how to reach it with its settings (`[defaults]` and `[vm.NAME]`), never asking
/// at a prompt.
pub fn connect_for_job(
    source: &std::path::Path,
    s: &vmrepo::ingest::options::VmSettings,
) -> vmrepo::Result<Option<Connect>> {
    let settings = VsphereArgs {
        tls_thumbprint: s.tls_thumbprint.clone(),
        tls_ca: s.tls_ca.clone(),
        source_password_file: s.source_password_file.clone(),
        source_password_command: s.source_password_command.clone(),
        quiesce: s.quiesce.unwrap_or(false),
        snapshot_timeout: JOB_SNAPSHOT_TIMEOUT,
    };
    connect(source, &settings, s.strict.unwrap_or(false), false).map_err(|e| {
        vmrepo::Error::Usage(format!(
            "{e:#} (for a VM on a vSphere host set tls_thumbprint or tls_ca, and \
             source_password_file or source_password_command, in [defaults] or its [vm.NAME])"
        ))
    })
}

impl VsphereArgs {
    /// How to reach `source`, or `None` when it is a local path.
    pub fn connect(
        &self,
        source: &std::path::Path,
        strict: bool,
    ) -> anyhow::Result<Option<Connect>> {
        connect(source, self, strict, true)
    }

    /// True when any setting was given (they only apply to a vSphere source).
    pub fn any_given(&self) -> bool {
        self.tls_thumbprint.is_some()
            || self.tls_ca.is_some()
            || self.source_password_file.is_some()
            || self.source_password_command.is_some()
            || self.quiesce
    }
}
