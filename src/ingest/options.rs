//! What an ingest is asked to do: [`IngestOptions`], and [`VmSettings`], the per-VM settings
//! the command line and a job file both give, turned into options in one place.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::ingest::changes::ChangedRanges;
use crate::ingest::hooks::{Hooks, Interrupt};
use crate::ingest::segment::SegmentWorkers;
use crate::vmware::preflight::Limits;

/// Seconds a pre- or post-command may run when no timeout is set.
pub const DEFAULT_HOOK_TIMEOUT_SECONDS: u64 = 600;

/// Options of an ingest.
#[derive(Debug, Default, Clone)]
pub struct IngestOptions {
    /// VM name instead of the .vmx displayName / file name.
    pub name: Option<String>,
    /// Record the generation at this time instead of now (bringing old backups in).
    pub time: Option<jiff::Timestamp>,
    /// Only these ranges may differ from the `since` generation (change-aware ingest).
    pub changes: Option<ChangedRanges>,
    /// The generation the changes are relative to (`VM@GEN`; else the file's `since`).
    pub since: Option<String>,
    /// Share (0..=1) of supposedly unchanged segments to re-read and compare.
    pub verify_unchanged: f64,
    /// Commands to run before and after.
    pub hooks: Hooks,
    /// The interrupt token: the hooks run under it, and an interrupt runs the post-command
    /// owed (the caller's signal handling holds a clone).
    pub interrupt: Interrupt,
    /// Snapshot age and chain depth limits checked before reading (warnings), if any.
    pub limits: Option<Limits>,
    /// Refuse to read a VM that breaks the limits instead of warning.
    pub strict: bool,
    /// Where absolute datastore paths in descriptors are found locally.
    pub datastore_map: Vec<(PathBuf, PathBuf)>,
    /// Read each disk as this snapshot (`latest` or a name from the .vmsd) froze it.
    pub at_snapshot: Option<String>,
    /// Read every disk in full even when its snapshot chain tells what changed.
    pub full_read: bool,
    /// The threads that read and cut segments (shared by the ingests of one process).
    pub workers: SegmentWorkers,
    /// Recorded in the catalog as the source instead of the path read (an import records the
    /// archive, not the temporary directory it was unpacked into).
    pub recorded_source: Option<PathBuf>,
    /// The VM was staged from a host's datastore (`esxi://`): read its placeholders remotely
    /// and its disks as the host's snapshot froze them.
    pub staged: Option<crate::vmware::vm::StagedVm>,
    /// The source is a VM on a vSphere host (`esxi://`, `vcenter://`): how to reach it.
    pub vsphere: Option<crate::vsphere::Connect>,
    /// Changed-block tracking change ids to record in the catalog, by disk slot.
    pub change_ids: std::collections::BTreeMap<String, String>,
}

/// Hook and read settings, for every VM (`[defaults]`) or one (`[vm.NAME]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    /// Command run before the VM is read.
    pub pre_command: Option<String>,
    /// Command run afterwards, whatever happened.
    pub post_command: Option<String>,
    /// Seconds either command may run.
    pub hook_timeout: Option<u64>,
    /// Generation name to give (default: the VM's displayName or file name).
    pub name: Option<String>,
    /// Snapshot to read the disks as (`latest` or a snapshot name).
    pub at_snapshot: Option<String>,
    /// Warn about snapshots older than this many days (default: `Limits::default()`).
    pub max_snapshot_age_days: Option<f64>,
    /// Warn about disks with more deltas than this above their base (default: `Limits::default()`).
    pub max_chain_depth: Option<usize>,
    /// Refuse (fail the VM) instead of warning.
    pub strict: Option<bool>,
    /// Read the disks in full even when their snapshot chains tell what changed.
    pub full_read: Option<bool>,
    /// Directories outside the VM's own whose files the VM's files may name (`--allow-path`);
    /// added to the job's `allow_paths` and `[defaults]`'s.
    #[serde(default)]
    pub allow_paths: Vec<PathBuf>,
    /// A VM on a vSphere host: the SHA-256 fingerprint its certificate must have.
    pub tls_thumbprint: Option<String>,
    /// A VM on a vSphere host: the CA (PEM file) that signed its certificate.
    pub tls_ca: Option<PathBuf>,
    /// A VM on a vSphere host: a file holding the user's password (first line).
    pub source_password_file: Option<PathBuf>,
    /// A VM on a vSphere host: a command (`sh -c`) printing the user's password.
    pub source_password_command: Option<String>,
    /// A VM on a vSphere host: quiesce the guest's filesystems for the backup snapshot.
    pub quiesce: Option<bool>,
}

impl VmSettings {
    /// The options of an ingest with these settings: the one place they are assembled. Unset
    /// limits are [`Limits::default`]'s, an unset hook timeout is
    /// [`DEFAULT_HOOK_TIMEOUT_SECONDS`], and `allow_paths` join `datastore_map` as paths
    /// read in place. Ingest-only options (time, changed ranges) stay at their defaults.
    pub fn ingest_options(
        &self,
        datastore_map: Vec<(PathBuf, PathBuf)>,
        interrupt: &Interrupt,
        workers: &SegmentWorkers,
    ) -> IngestOptions {
        let limits = Limits::default();
        IngestOptions {
            name: self.name.clone(),
            hooks: Hooks {
                pre: self.pre_command.clone(),
                post: self.post_command.clone(),
                timeout: Duration::from_secs(
                    self.hook_timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT_SECONDS),
                ),
            },
            interrupt: interrupt.clone(),
            workers: workers.clone(),
            at_snapshot: self.at_snapshot.clone(),
            limits: Some(Limits {
                max_snapshot_age_days: self
                    .max_snapshot_age_days
                    .unwrap_or(limits.max_snapshot_age_days),
                max_chain_depth: self.max_chain_depth.unwrap_or(limits.max_chain_depth),
            }),
            strict: self.strict.unwrap_or(false),
            full_read: self.full_read.unwrap_or(false),
            datastore_map: crate::source::confine::with_allowed(datastore_map, &self.allow_paths),
            ..IngestOptions::default()
        }
    }
}
