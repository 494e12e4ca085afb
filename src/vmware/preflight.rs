//! Checks before a hot backup reads a VM: snapshots left behind (older than a set age) and
//! snapshot chains deeper than expected — the failure mode behind most snapshot-based backup
//! disasters (a datastore filled by a forgotten delta, a host stalled consolidating it).
//! Ingest warns about them; with `--strict` it refuses to read the VM.

use std::path::Path;

use crate::error::Result;
use crate::source::chain::ChainOptions;

/// Limits the checks apply.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A snapshot older than this many days is reported.
    pub max_snapshot_age_days: f64,
    /// A disk whose chain has more than this many deltas above its base is reported.
    pub max_chain_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_snapshot_age_days: crate::vmware::inspect::OLD_SNAPSHOT_DAYS,
            max_chain_depth: crate::vmware::inspect::DEEP_CHAIN,
        }
    }
}

/// The findings for the VM or disk at `path` (empty when all is well).
pub fn check(path: &Path, opts: &ChainOptions, limits: &Limits) -> Result<Vec<String>> {
    let now = jiff::Timestamp::now();
    let i = crate::vmware::inspect::inspect(path, opts, now)?;
    let mut out = Vec::new();
    for s in &i.snapshots {
        if let Some(age) = s.age_days.filter(|a| *a > limits.max_snapshot_age_days) {
            out.push(format!(
                "snapshot {:?} of {} is {age:.1} days old (limit {} days): delete or consolidate \
                 it, a snapshot left behind grows until the datastore is full",
                s.name, i.vm, limits.max_snapshot_age_days
            ));
        }
    }
    for d in &i.disks {
        let deltas = d.chain.len().saturating_sub(1);
        if deltas > limits.max_chain_depth {
            out.push(format!(
                "disk {} ({}) has a chain of {deltas} deltas above its base (limit {}): \
                 snapshots were left behind; consolidate them",
                d.slot, d.file, limits.max_chain_depth
            ));
        }
    }
    Ok(out)
}
